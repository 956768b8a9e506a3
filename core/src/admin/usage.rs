//! `weir usage`: spend and usage per key and tenant, from the budget plugin's own admin
//! endpoint (`/admin/plugins/<instance>/usage`, the `admin` export of `plugins/budget`,
//! which reads its spend ledger). The instance is found by manifest name (`budget`) or
//! `--plugin NAME`; key names and budgets are joined in from the auth plugin's
//! `/keys`, best effort. The gateway itself reads no plugin's records.
//!
//! The answer is `{"usage": [UsageLine, ...]}` (see [`UsageLine`]).

use std::process::ExitCode;

use serde::{Deserialize, Serialize};

use super::cli::AdminArgs;
use super::keys::{AdminHttp, run_cli, urlencode};

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
    #[serde(default)]
    pub tokens: u64,
    /// Settled requests.
    #[serde(default)]
    pub requests: u64,
    /// Reserved by requests in flight, USD.
    #[serde(default)]
    pub reserved_usd: f64,
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
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_735_689_599), "2024-12-31");
        assert_eq!(period_ids(1_735_689_600_000).1, "2025-01");
    }

    #[test]
    fn lines_without_counters_parse() {
        let line: UsageLine = serde_json::from_str(
            r#"{"scope":"key","id":"k","period":"day","period_id":"2025-01-01","spend_usd":1.5}"#,
        )
        .unwrap();
        assert_eq!(line.tokens, 0);
        assert_eq!(line.spend_usd, 1.5);
    }
}
