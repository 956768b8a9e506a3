//! Spend and usage per key and tenant: `GET /admin/usage` and `weir usage`.
//!
//! The numbers are the budget plugin's (`plugins/budget`), read from its namespace
//! (`plugin/budget`) in the shared [`StateStore`]: for every key and tenant, and for the
//! current day, month and all time, the settled cost (integer nano-dollars), tokens and
//! requests:
//!
//! ```text
//! spend/<scope>/<id>/<period>      scope: key | tenant
//! tokens/<scope>/<id>/<period>     period: 2025-01-31 | 2025-01 | total (UTC)
//! requests/<scope>/<id>/<period>
//! ```
//!
//! `GET /admin/usage?scope=key&id=key_...&period=month` answers
//! `{"usage": [{scope, id, period, period_id, spend_usd, tokens, requests, name?, budget_usd?,
//! budget_period?}]}`; without `period` it reports the current day, the current month and all
//! time; `period_id=2025-01` picks another day or month. Keys also show their name and budget
//! from the auth plugin's records.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::cli::AdminArgs;
use super::keys::{AdminHttp, KeyError, Keys, run_cli, urlencode};
use crate::state::{StateStore, plugin_namespace};

/// The plugin instance whose namespace holds the counters.
pub const BUDGET_PLUGIN: &str = "budget";

/// Nano-dollars per dollar.
const NANO: f64 = 1e9;

/// One line of the usage report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageLine {
    /// `key` or `tenant`.
    pub scope: String,
    /// Key id or tenant name.
    pub id: String,
    /// `day`, `month` or `total`.
    pub period: String,
    /// `2025-01-31`, `2025-01` or `total`.
    pub period_id: String,
    /// Settled cost, USD.
    pub spend_usd: f64,
    /// Settled tokens (prompt + completion).
    pub tokens: u64,
    /// Settled requests.
    pub requests: u64,
    /// The key's name (keys only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The key's budget, USD (keys only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    /// The key's budget period (keys only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_period: Option<String>,
}

/// Query of `GET /admin/usage`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// `key` or `tenant`; default both.
    #[serde(default)]
    pub scope: Option<String>,
    /// One key id or tenant.
    #[serde(default)]
    pub id: Option<String>,
    /// `day`, `month` or `total`; default all three (current day and month).
    #[serde(default)]
    pub period: Option<String>,
    /// A specific day (`2025-01-31`) or month (`2025-01`) instead of the current one.
    #[serde(default)]
    pub period_id: Option<String>,
}

/// The civil date (UTC) of `days` since 1970-01-01 (H. Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// `YYYY-MM-DD` (UTC) of a Unix time in seconds.
pub fn utc_date(secs: u64) -> String {
    let (y, m, d) = civil(i64::try_from(secs / 86_400).unwrap_or(0));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The period ids of a Unix time in ms: (day, month), as the budget plugin writes them.
pub fn period_ids(now_ms: u64) -> (String, String) {
    let day = utc_date(now_ms / 1000);
    let month = day[..7].to_owned();
    (day, month)
}

fn period_kind(period_id: &str) -> &'static str {
    match period_id.len() {
        10 => "day",
        7 => "month",
        _ => "total",
    }
}

/// Builds the usage report from the budget plugin's counters.
pub fn report(
    store: &dyn StateStore,
    keys: Option<&Keys>,
    q: &UsageQuery,
    now_ms: u64,
) -> Result<Vec<UsageLine>, KeyError> {
    let ns = plugin_namespace(BUDGET_PLUGIN);
    let (today, this_month) = period_ids(now_ms);
    let wanted: Vec<String> = match (q.period.as_deref(), q.period_id.as_deref()) {
        (_, Some(id)) => vec![id.to_owned()],
        (Some("day"), None) => vec![today],
        (Some("month"), None) => vec![this_month],
        (Some("total"), None) => vec!["total".to_owned()],
        (None, None) => vec![today, this_month, "total".to_owned()],
        (Some(other), None) => {
            return Err(KeyError::Invalid(format!(
                "period must be day, month or total, not '{other}'"
            )));
        }
    };
    if let Some(s) = q.scope.as_deref()
        && s != "key"
        && s != "tenant"
    {
        return Err(KeyError::Invalid(format!(
            "scope must be key or tenant, not '{s}'"
        )));
    }
    // (scope, id, period_id) -> line
    let mut lines: BTreeMap<(String, String, String), UsageLine> = BTreeMap::new();
    for counter in ["spend", "tokens", "requests"] {
        let prefix = match (q.scope.as_deref(), q.id.as_deref()) {
            (Some(s), Some(id)) => format!("{counter}/{s}/{id}/"),
            (Some(s), None) => format!("{counter}/{s}/"),
            _ => format!("{counter}/"),
        };
        for (k, v) in store.scan_prefix(&ns, &prefix, usize::MAX)? {
            let rest = &k[counter.len() + 1..];
            let (Some((scope, tail)), Some((_, period_id))) =
                (rest.split_once('/'), rest.rsplit_once('/'))
            else {
                continue;
            };
            let Some(id) = tail.rsplit_once('/').map(|(id, _)| id) else {
                continue;
            };
            if !wanted.iter().any(|w| w == period_id) || q.id.as_deref().is_some_and(|w| w != id) {
                continue;
            }
            let value: i64 = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            let line = lines
                .entry((scope.to_owned(), id.to_owned(), period_id.to_owned()))
                .or_insert_with(|| UsageLine {
                    scope: scope.to_owned(),
                    id: id.to_owned(),
                    period: period_kind(period_id).to_owned(),
                    period_id: period_id.to_owned(),
                    spend_usd: 0.0,
                    tokens: 0,
                    requests: 0,
                    name: None,
                    budget_usd: None,
                    budget_period: None,
                });
            let value_u = u64::try_from(value.max(0)).unwrap_or(0);
            match counter {
                "spend" => line.spend_usd = value as f64 / NANO,
                "tokens" => line.tokens = value_u,
                _ => line.requests = value_u,
            }
        }
    }
    let mut out: Vec<UsageLine> = lines.into_values().collect();
    if let Some(keys) = keys {
        let mut cache: BTreeMap<String, Option<KeyInfo>> = BTreeMap::new();
        for line in out.iter_mut().filter(|l| l.scope == "key") {
            let info = cache.entry(line.id.clone()).or_insert_with(|| {
                keys.get(&line.id)
                    .ok()
                    .map(|r| (r.name, r.budget_usd, r.budget_period))
            });
            if let Some((name, budget, period)) = info.clone() {
                line.name = Some(name);
                line.budget_usd = budget;
                line.budget_period = budget.map(|_| period.unwrap_or_else(|| "month".to_owned()));
            }
        }
    }
    Ok(out)
}

/// A key's name, budget and budget period, joined into its usage lines.
type KeyInfo = (String, Option<f64>, Option<String>);

#[derive(Clone)]
struct UsageState {
    store: Arc<dyn StateStore>,
    keys: Keys,
}

/// The usage route, ready to merge into the admin router (which adds authentication);
/// generic over the outer router's state.
pub fn routes<S: Clone + Send + Sync + 'static>(store: Arc<dyn StateStore>) -> Router<S> {
    Router::new()
        .route("/admin/usage", get(usage))
        .with_state(UsageState {
            keys: Keys::new(store.clone()),
            store,
        })
}

async fn usage(
    State(state): State<UsageState>,
    Query(q): Query<UsageQuery>,
) -> Result<Response, KeyError> {
    let lines = tokio::task::spawn_blocking(move || {
        report(
            state.store.as_ref(),
            Some(&state.keys),
            &q,
            crate::plugin::contract::now_ms(),
        )
    })
    .await
    .map_err(|e| KeyError::Invalid(format!("task failed: {e}")))??;
    Ok(axum::Json(json!({"usage": lines})).into_response())
}

/// `weir usage`: spend, tokens and requests per key and tenant.
#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// Connection.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The budget plugin instance that keeps the spend (default: the one instance of the
    /// `budget` plugin in the serving config).
    #[arg(long, env = "WEIR_USAGE_PLUGIN")]
    pub plugin: Option<String>,
    /// The auth plugin instance whose key names and budgets are shown beside keys
    /// (default: the one instance of `auth`, if any).
    #[arg(long, env = "WEIR_KEYS_PLUGIN")]
    pub keys_plugin: Option<String>,
    /// Only one key (by id).
    #[arg(long, conflicts_with = "tenant")]
    pub key: Option<String>,
    /// Only one tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only keys or only tenants.
    #[arg(long, value_parser = ["key", "tenant"])]
    pub scope: Option<String>,
    /// day, month or total (default: all three).
    #[arg(long, value_parser = ["day", "month", "total"])]
    pub period: Option<String>,
    /// A specific day (2025-01-31) or month (2025-01).
    #[arg(long)]
    pub period_id: Option<String>,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `weir usage`.
pub fn run(args: UsageArgs) -> ExitCode {
    run_cli(execute(args))
}

async fn execute(args: UsageArgs) -> Result<(), String> {
    let mut params = Vec::new();
    let (scope, id) = match (&args.key, &args.tenant) {
        (Some(k), _) => (Some("key".to_owned()), Some(k.clone())),
        (None, Some(t)) => (Some("tenant".to_owned()), Some(t.clone())),
        (None, None) => (args.scope.clone(), None),
    };
    if let Some(s) = scope {
        params.push(format!("scope={s}"));
    }
    if let Some(id) = id {
        params.push(format!("id={}", urlencode(&id)));
    }
    if let Some(p) = &args.period {
        params.push(format!("period={p}"));
    }
    if let Some(p) = &args.period_id {
        params.push(format!("period_id={}", urlencode(p)));
    }
    let http = AdminHttp::new(&args.admin)?;
    let base = http.plugin_base("budget", args.plugin.as_deref()).await?;
    let path = if params.is_empty() {
        format!("{base}/usage")
    } else {
        format!("{base}/usage?{}", params.join("&"))
    };
    let mut v = http.call(reqwest::Method::GET, &path, None).await?;
    // Names and budgets of keys are the auth plugin's: joined here, best effort.
    if let Ok(keys_base) = http.plugin_base("auth", args.keys_plugin.as_deref()).await
        && let Ok(keys) = http
            .call(
                reqwest::Method::GET,
                &format!("{keys_base}/keys?limit=100000&include_revoked=true"),
                None,
            )
            .await
        && let Some(lines) = v["usage"].as_array_mut()
    {
        for line in lines.iter_mut().filter(|l| l["scope"] == "key") {
            let key = keys["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|k| k["id"] == line["id"]);
            if let Some(k) = key {
                line["name"] = k["name"].clone();
                if !k["budget_usd"].is_null() {
                    line["budget_usd"] = k["budget_usd"].clone();
                    line["budget_period"] = k
                        .get("budget_period")
                        .cloned()
                        .filter(|p| !p.is_null())
                        .unwrap_or_else(|| serde_json::Value::String("month".into()));
                }
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let lines: Vec<UsageLine> =
        serde_json::from_value(v["usage"].clone()).map_err(|e| e.to_string())?;
    println!(
        "{:<7}  {:<22}  {:<10}  {:>12}  {:>12}  {:>9}  budget",
        "scope", "id", "period", "spend_usd", "tokens", "requests"
    );
    for l in &lines {
        let budget = match (l.budget_usd, &l.budget_period) {
            (Some(b), Some(p)) => format!("{b:.2}/{p}"),
            _ => "-".to_owned(),
        };
        let id = match &l.name {
            Some(name) => format!("{} ({name})", l.id),
            None => l.id.clone(),
        };
        println!(
            "{:<7}  {:<22}  {:<10}  {:>12.6}  {:>12}  {:>9}  {budget}",
            l.scope, id, l.period_id, l.spend_usd, l.tokens, l.requests
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_735_689_599), "2024-12-31");
        assert_eq!(period_ids(1_735_689_600_000).1, "2025-01");
    }

    #[test]
    fn report_groups_counters() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
        let ns = plugin_namespace(BUDGET_PLUGIN);
        let now = 1_735_689_600_000; // 2025-01-01
        for (k, v) in [
            ("spend/key/key_a/2025-01-01", "1500000000"),
            ("tokens/key/key_a/2025-01-01", "300"),
            ("requests/key/key_a/2025-01-01", "2"),
            ("spend/key/key_a/total", "2500000000"),
            ("spend/tenant/acme/2025-01", "7"),
            ("spend/key/key_a/2024-12-31", "1"),
        ] {
            store.set(&ns, k, v.as_bytes(), None).unwrap();
        }
        let all = report(store.as_ref(), None, &UsageQuery::default(), now).unwrap();
        assert_eq!(all.len(), 3, "{all:?}");
        let day = all
            .iter()
            .find(|l| l.id == "key_a" && l.period == "day")
            .unwrap();
        assert_eq!(day.spend_usd, 1.5);
        assert_eq!(day.tokens, 300);
        assert_eq!(day.requests, 2);
        let q = UsageQuery {
            scope: Some("tenant".into()),
            ..UsageQuery::default()
        };
        let tenants = report(store.as_ref(), None, &q, now).unwrap();
        assert_eq!(tenants.len(), 1);
        assert_eq!(tenants[0].period, "month");
        let q = UsageQuery {
            period_id: Some("2024-12-31".into()),
            ..UsageQuery::default()
        };
        assert_eq!(report(store.as_ref(), None, &q, now).unwrap().len(), 1);
    }
}
