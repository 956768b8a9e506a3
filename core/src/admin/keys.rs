//! `weir keys`: virtual API keys, through the auth plugin's own admin endpoint.
//!
//! Keys belong to the auth plugin (`plugins/auth`, its `admin` export): it stores them in its
//! own namespace and serves `/admin/plugins/<instance>/keys...` on the admin listener. This
//! CLI finds the instance by manifest name (`auth`) in `GET /admin/plugins`, or takes
//! `--plugin NAME`, so renaming the instance (or changing its `key_prefix`) breaks nothing.
//! The gateway itself knows nothing of key records.
//!
//! `weir keys create --name ci --tenant acme --models 'gpt-4o*' --rpm 60`,
//! `weir keys list`, `weir keys revoke key_...` (see [`KeysCommand`]).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

use super::cli::AdminArgs;

/// Keys returned by a list call without `--limit`.
const DEFAULT_LIST_LIMIT: usize = 1_000;

fn now_ms() -> u64 {
    crate::plugin::contract::now_ms()
}

/// `weir keys ...`.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// The auth plugin instance that owns the keys (default: the one instance of the
    /// `auth` plugin in the serving config).
    #[arg(long, global = true, env = "WEIR_KEYS_PLUGIN")]
    pub plugin: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// The `weir keys` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret (shown only this once).
    Create {
        /// Connection.
        #[command(flatten)]
        admin: AdminArgs,
        /// Human name.
        #[arg(long)]
        name: String,
        /// Tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Allowed model globs, comma-separated (default: every model).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Expiry: seconds from now, or with a unit: `90m`, `12h`, `30d`.
        #[arg(long)]
        expires_in: Option<String>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute.
        #[arg(long)]
        tpm: Option<u64>,
        /// Budget in USD.
        #[arg(long)]
        budget_usd: Option<f64>,
        /// Budget period: day, month or total.
        #[arg(long)]
        budget_period: Option<String>,
        /// Metadata `name=value` (repeatable).
        #[arg(long = "meta", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        /// Connection.
        #[command(flatten)]
        admin: AdminArgs,
        /// Only this tenant's keys.
        #[arg(long)]
        tenant: Option<String>,
        /// Include revoked keys.
        #[arg(long)]
        all: bool,
        /// How many.
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: usize,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id; it stops working on the next request.
    Revoke {
        /// The key id (`key_...`).
        id: String,
        /// Connection.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("'{s}' is not name=value"))
}

/// `30`, `90s`, `15m`, `12h`, `30d` -> seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a duration such as 3600, 90m, 12h or 30d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("'{s}': unit must be s, m, h or d")),
    };
    Ok(n.saturating_mul(mult))
}

/// A small client of the admin API for `weir keys` and `weir usage`.
pub(crate) struct AdminHttp {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminHttp {
    pub(crate) fn new(args: &AdminArgs) -> Result<AdminHttp, String> {
        let token = args
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or("no admin token: pass --token or set WEIR_ADMIN_TOKEN")?;
        let base = if args.admin.contains("://") {
            args.admin.clone()
        } else {
            format!("http://{}", args.admin)
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(AdminHttp {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    /// The admin path of the plugin instance that serves `plugin` (a manifest name such as
    /// `auth`): `explicit` when given, else the one instance of that plugin with an admin
    /// endpoint in the serving config (`GET /admin/plugins`), so renaming an instance
    /// breaks nothing.
    pub(crate) async fn plugin_base(
        &self,
        plugin: &str,
        explicit: Option<&str>,
    ) -> Result<String, String> {
        if let Some(name) = explicit {
            return Ok(format!("/admin/plugins/{}", urlencode(name)));
        }
        let v = self
            .call(reqwest::Method::GET, "/admin/plugins", None)
            .await?;
        let found: Vec<&str> = v["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["plugin"] == plugin && i["admin"] == true)
            .filter_map(|i| i["name"].as_str())
            .collect();
        match found.as_slice() {
            [one] => Ok(format!("/admin/plugins/{}", urlencode(one))),
            [] => Err(format!(
                "the serving config has no instance of the '{plugin}' plugin with an admin \
                 endpoint (pass --plugin NAME to pick another instance)"
            )),
            many => Err(format!(
                "the serving config has several instances of the '{plugin}' plugin ({}); \
                 pick one with --plugin NAME",
                many.join(", ")
            )),
        }
    }

    /// Sends a call and returns the JSON answer; an error status becomes `Err(message)`.
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach the admin API at {url}: {e}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{url}: unexpected answer ({status}): {e}"))?;
        if !status.is_success() {
            let message = value
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("error");
            return Err(format!("{}: {message}", status.as_u16()));
        }
        Ok(value)
    }
}

/// Runs a blocking CLI future on a small runtime; prints errors to stderr.
pub(crate) fn run_cli(f: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    // rustls needs one process-wide crypto provider, even for plain-HTTP clients.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `weir keys ...`.
pub fn run(args: KeysArgs) -> ExitCode {
    run_cli(execute(args.command, args.plugin))
}

fn fmt_time(ms: Option<u64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) => super::usage::utc_date(ms / 1000),
    }
}

async fn execute(cmd: KeysCommand, plugin: Option<String>) -> Result<(), String> {
    let plugin = plugin.as_deref();
    match cmd {
        KeysCommand::Create {
            admin,
            name,
            tenant,
            models,
            expires_in,
            rpm,
            tpm,
            budget_usd,
            budget_period,
            metadata,
            json,
        } => {
            let expires_in_secs = expires_in.as_deref().map(parse_duration_secs).transpose()?;
            let body = json!({
                "name": name,
                "tenant": tenant,
                "models": models,
                "expires_in_secs": expires_in_secs,
                "rpm": rpm,
                "tpm": tpm,
                "budget_usd": budget_usd,
                "budget_period": budget_period,
                "metadata": metadata.into_iter().collect::<BTreeMap<_, _>>(),
            });
            let http = AdminHttp::new(&admin)?;
            let base = http.plugin_base("auth", plugin).await?;
            let v = http
                .call(reqwest::Method::POST, &format!("{base}/keys"), Some(&body))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!("id:     {}", v["id"].as_str().unwrap_or(""));
                println!("name:   {}", v["name"].as_str().unwrap_or(""));
                if let Some(t) = v["tenant"].as_str() {
                    println!("tenant: {t}");
                }
                println!("secret: {}", v["secret"].as_str().unwrap_or(""));
                println!("Store the secret now: it is not shown again.");
            }
            Ok(())
        }
        KeysCommand::List {
            admin,
            tenant,
            all,
            limit,
            json,
        } => {
            let http = AdminHttp::new(&admin)?;
            let base = http.plugin_base("auth", plugin).await?;
            let mut path = format!("{base}/keys?limit={limit}&include_revoked={all}");
            if let Some(t) = tenant {
                path.push_str(&format!("&tenant={}", urlencode(&t)));
            }
            let v = http.call(reqwest::Method::GET, &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            let keys = v["keys"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<20}  {:<9}  {:<20}  {:<12}  {:<10}  {:<10}  status",
                "id", "prefix", "name", "tenant", "created", "expires"
            );
            let now = now_ms();
            for k in &keys {
                let expires_at = k["expires_at"].as_u64();
                let status = if k["revoked"] == true {
                    "revoked"
                } else if expires_at.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                let text = |name: &str| k[name].as_str().unwrap_or("-").to_owned();
                println!(
                    "{:<20}  {:<9}  {:<20}  {:<12}  {:<10}  {:<10}  {status}",
                    text("id"),
                    text("prefix"),
                    text("name"),
                    text("tenant"),
                    fmt_time(k["created_at"].as_u64()),
                    fmt_time(expires_at),
                );
            }
            Ok(())
        }
        KeysCommand::Revoke { id, admin } => {
            let http = AdminHttp::new(&admin)?;
            let base = http.plugin_base("auth", plugin).await?;
            let path = format!("{base}/keys/{}/revoke", urlencode(&id));
            http.call(reqwest::Method::POST, &path, None).await?;
            println!("revoked {id}");
            Ok(())
        }
    }
}

/// Percent-encodes a query or path value.
pub(crate) fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("30").unwrap(), 30);
        assert_eq!(parse_duration_secs("90m").unwrap(), 5_400);
        assert_eq!(parse_duration_secs("2d").unwrap(), 172_800);
        assert!(parse_duration_secs("3w").is_err());
    }
}
