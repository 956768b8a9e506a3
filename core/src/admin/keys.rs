//! Virtual API keys: the admin endpoints and the `weir keys` CLI.
//!
//! Keys belong to the `auth` plugin (`plugins/auth`): this module writes exactly the records
//! that plugin reads, through the same [`StateStore`] namespace (`plugin/auth`), so a key
//! created, changed or revoked here takes effect on the next request, with no reload.
//!
//! Storage (namespace `plugin/auth`):
//! - `key/<sha256 hex of the secret>` -> [`KeyRecord`] as JSON; the secret itself is never
//!   stored and is shown once, in the answer to the create call;
//! - `id/<key id>` -> the hash, so keys are addressed by their public id.
//!
//! | call | does |
//! | --- | --- |
//! | `POST /admin/keys` | create ([`NewKey`]); answers the record plus `secret` (shown once) |
//! | `GET /admin/keys?limit=N&tenant=T&include_revoked=true` | list, newest first |
//! | `GET /admin/keys/{id}` | one key |
//! | `PATCH /admin/keys/{id}` | update ([`KeyPatch`]) |
//! | `POST /admin/keys/{id}/revoke`, `DELETE /admin/keys/{id}` | revoke (the record is kept) |
//!
//! CLI: `weir keys create --name ci --tenant acme --models 'gpt-4o*' --rpm 60`,
//! `weir keys list`, `weir keys revoke key_...` (see [`KeysCommand`]).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::cli::AdminArgs;
use crate::state::{StateError, StateStore, plugin_namespace};

/// The plugin instance whose namespace holds the keys.
pub const AUTH_PLUGIN: &str = "auth";
/// Every secret starts with this (the auth plugin's default `key_prefix`).
pub const SECRET_PREFIX: &str = "wk-";
/// Keys returned by a list call without `limit`.
const DEFAULT_LIST_LIMIT: usize = 1_000;
/// Attempts of a read-modify-write before giving up on a busy key.
const CAS_ATTEMPTS: usize = 16;

/// A key as stored under `key/<hash>` (the auth plugin's `KeyRecord` reads the same JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id (`key_` + 16 hex digits).
    pub id: String,
    /// Human name.
    pub name: String,
    /// Tenant the key belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Model globs the key may use; empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Expiry, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Whether the key was revoked.
    #[serde(default)]
    pub revoked: bool,
    /// When it was revoked, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    /// Requests per minute (read by the rate-limit plugin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute (read by the rate-limit plugin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Budget in USD per `budget_period` (read by the budget plugin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    /// `day`, `month` (default) or `total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_period: Option<String>,
    /// Free-form facts, visible to later plugins as `key.meta.<name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The first characters of the secret (`wk-1a2b`), to recognise a key in a list.
    pub prefix: String,
    /// Creation time, ms since the epoch.
    pub created_at: u64,
}

/// The body of `POST /admin/keys`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// Human name (required).
    pub name: String,
    /// Tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Model globs; empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Absolute expiry, ms since the epoch.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Relative expiry, seconds from now (ignored when `expires_at` is given).
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Budget in USD.
    #[serde(default)]
    pub budget_usd: Option<f64>,
    /// Budget period: `day`, `month` or `total`.
    #[serde(default)]
    pub budget_period: Option<String>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// The body of `PATCH /admin/keys/{id}`: fields present are replaced; `null` clears an
/// optional one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New tenant (`null` clears).
    #[serde(default, with = "double")]
    pub tenant: Option<Option<String>>,
    /// New model globs.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// New expiry (`null` clears).
    #[serde(default, with = "double")]
    pub expires_at: Option<Option<u64>>,
    /// New RPM (`null` clears).
    #[serde(default, with = "double")]
    pub rpm: Option<Option<u64>>,
    /// New TPM (`null` clears).
    #[serde(default, with = "double")]
    pub tpm: Option<Option<u64>>,
    /// New budget (`null` clears).
    #[serde(default, with = "double")]
    pub budget_usd: Option<Option<f64>>,
    /// New budget period (`null` clears).
    #[serde(default, with = "double")]
    pub budget_period: Option<Option<String>>,
    /// New metadata (replaces the whole map).
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `Option<Option<T>>` that tells "absent" (outer `None`) from `null` (`Some(None)`).
mod double {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(de).map(Some)
    }
}

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No key with this id.
    #[error("no key with id '{0}'")]
    NotFound(String),
    /// The request was malformed.
    #[error("{0}")]
    Invalid(String),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A stored record could not be read.
    #[error("key record {id} is unreadable: {reason}")]
    Corrupt {
        /// Which.
        id: String,
        /// Why.
        reason: String,
    },
    /// The key kept changing under us.
    #[error("key '{0}' is being changed concurrently; try again")]
    Busy(String),
}

impl KeyError {
    fn status(&self) -> StatusCode {
        match self {
            KeyError::NotFound(_) => StatusCode::NOT_FOUND,
            KeyError::Invalid(_) => StatusCode::BAD_REQUEST,
            KeyError::Busy(_) => StatusCode::CONFLICT,
            KeyError::State(_) | KeyError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for KeyError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "Key operation failed.");
        }
        let body = json!({"error": {"message": self.to_string(), "code": status.as_u16()}});
        (status, axum::Json(body)).into_response()
    }
}

/// SHA-256 of a secret, lower-case hex: the only form a key is stored in.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn now_ms() -> u64 {
    crate::plugin::contract::now_ms()
}

fn check_period(period: Option<&str>) -> Result<(), KeyError> {
    match period {
        None | Some("day" | "month" | "total") => Ok(()),
        Some(other) => Err(KeyError::Invalid(format!(
            "budget_period must be day, month or total, not '{other}'"
        ))),
    }
}

fn check_budget(usd: Option<f64>) -> Result<(), KeyError> {
    match usd {
        Some(v) if !v.is_finite() || v < 0.0 => Err(KeyError::Invalid(
            "budget_usd must be a number >= 0".to_owned(),
        )),
        _ => Ok(()),
    }
}

/// Keys in a [`StateStore`], in the auth plugin's namespace.
#[derive(Clone)]
pub struct Keys {
    store: Arc<dyn StateStore>,
    ns: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("ns", &self.ns).finish()
    }
}

impl Keys {
    /// Keys of the auth plugin instance named [`AUTH_PLUGIN`].
    pub fn new(store: Arc<dyn StateStore>) -> Keys {
        Keys::for_instance(store, AUTH_PLUGIN)
    }

    /// Keys of the auth plugin instance named `instance`.
    pub fn for_instance(store: Arc<dyn StateStore>, instance: &str) -> Keys {
        Keys {
            store,
            ns: plugin_namespace(instance),
        }
    }

    /// Creates a key; returns its record and the secret (the only time it is available).
    pub fn create(&self, new: NewKey) -> Result<(KeyRecord, String), KeyError> {
        if new.name.trim().is_empty() {
            return Err(KeyError::Invalid("name must not be empty".to_owned()));
        }
        check_period(new.budget_period.as_deref())?;
        check_budget(new.budget_usd)?;
        let now = now_ms();
        // 244 random bits from the OS-seeded generator behind uuid v4.
        let secret = format!(
            "{SECRET_PREFIX}{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let id = format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let hash = hash_secret(&secret);
        let record = KeyRecord {
            id: id.clone(),
            name: new.name,
            tenant: new.tenant.filter(|t| !t.is_empty()),
            models: new.models,
            expires_at: new.expires_at.or_else(|| {
                new.expires_in_secs
                    .map(|s| now.saturating_add(s.saturating_mul(1000)))
            }),
            revoked: false,
            revoked_at: None,
            rpm: new.rpm,
            tpm: new.tpm,
            budget_usd: new.budget_usd,
            budget_period: new.budget_period,
            metadata: new.metadata,
            prefix: secret[..SECRET_PREFIX.len() + 4].to_owned(),
            created_at: now,
        };
        let json = serde_json::to_vec(&record).map_err(|e| KeyError::Invalid(e.to_string()))?;
        // The record first: an id entry never points at nothing.
        self.store
            .set(&self.ns, &format!("key/{hash}"), &json, None)?;
        self.store
            .set(&self.ns, &format!("id/{id}"), hash.as_bytes(), None)?;
        tracing::info!(key = %id, tenant = record.tenant.as_deref().unwrap_or(""), "Key created.");
        Ok((record, secret))
    }

    fn hash_of(&self, id: &str) -> Result<String, KeyError> {
        let hash = self
            .store
            .get(&self.ns, &format!("id/{id}"))?
            .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
        String::from_utf8(hash).map_err(|e| KeyError::Corrupt {
            id: id.to_owned(),
            reason: e.to_string(),
        })
    }

    fn parse(id: &str, raw: &[u8]) -> Result<KeyRecord, KeyError> {
        serde_json::from_slice(raw).map_err(|e| KeyError::Corrupt {
            id: id.to_owned(),
            reason: e.to_string(),
        })
    }

    /// One key by id.
    pub fn get(&self, id: &str) -> Result<KeyRecord, KeyError> {
        let hash = self.hash_of(id)?;
        let raw = self
            .store
            .get(&self.ns, &format!("key/{hash}"))?
            .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
        Self::parse(id, &raw)
    }

    /// Keys, newest first, at most `limit`; revoked ones only with `include_revoked`.
    pub fn list(
        &self,
        limit: usize,
        tenant: Option<&str>,
        include_revoked: bool,
    ) -> Result<Vec<KeyRecord>, KeyError> {
        let mut out = Vec::new();
        for (k, raw) in self.store.scan_prefix(&self.ns, "key/", usize::MAX)? {
            let record = Self::parse(&k, &raw)?;
            if (include_revoked || !record.revoked)
                && tenant.is_none_or(|t| record.tenant.as_deref() == Some(t))
            {
                out.push(record);
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        out.truncate(limit);
        Ok(out)
    }

    /// Applies `f` to a stored key with compare-and-swap, so concurrent updates never lose
    /// one another.
    fn modify(
        &self,
        id: &str,
        mut f: impl FnMut(&mut KeyRecord) -> Result<(), KeyError>,
    ) -> Result<KeyRecord, KeyError> {
        let hash = self.hash_of(id)?;
        let key = format!("key/{hash}");
        for _ in 0..CAS_ATTEMPTS {
            let raw = self
                .store
                .get(&self.ns, &key)?
                .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
            let mut record = Self::parse(id, &raw)?;
            f(&mut record)?;
            let json = serde_json::to_vec(&record).map_err(|e| KeyError::Invalid(e.to_string()))?;
            if self
                .store
                .cas(&self.ns, &key, Some(&raw), Some(&json), None)?
            {
                return Ok(record);
            }
        }
        Err(KeyError::Busy(id.to_owned()))
    }

    /// Updates a key.
    pub fn update(&self, id: &str, patch: KeyPatch) -> Result<KeyRecord, KeyError> {
        if let Some(Some(p)) = &patch.budget_period {
            check_period(Some(p))?;
        }
        if let Some(usd) = patch.budget_usd {
            check_budget(usd)?;
        }
        if patch.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err(KeyError::Invalid("name must not be empty".to_owned()));
        }
        let record = self.modify(id, |r| {
            let p = patch.clone();
            if let Some(v) = p.name {
                r.name = v;
            }
            if let Some(v) = p.tenant {
                r.tenant = v;
            }
            if let Some(v) = p.models {
                r.models = v;
            }
            if let Some(v) = p.expires_at {
                r.expires_at = v;
            }
            if let Some(v) = p.rpm {
                r.rpm = v;
            }
            if let Some(v) = p.tpm {
                r.tpm = v;
            }
            if let Some(v) = p.budget_usd {
                r.budget_usd = v;
            }
            if let Some(v) = p.budget_period {
                r.budget_period = v;
            }
            if let Some(v) = p.metadata {
                r.metadata = v;
            }
            Ok(())
        })?;
        tracing::info!(key = %id, "Key updated.");
        Ok(record)
    }

    /// Revokes a key: it stops authenticating on the next request. The record stays, for
    /// the audit trail and usage reports.
    pub fn revoke(&self, id: &str) -> Result<KeyRecord, KeyError> {
        let now = now_ms();
        let record = self.modify(id, |r| {
            if !r.revoked {
                r.revoked = true;
                r.revoked_at = Some(now);
            }
            Ok(())
        })?;
        tracing::info!(key = %id, "Key revoked.");
        Ok(record)
    }
}

/// Query of `GET /admin/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    include_revoked: bool,
}

/// The key routes, ready to merge into the admin router (which adds authentication);
/// generic over the outer router's state.
pub fn routes<S: Clone + Send + Sync + 'static>(store: Arc<dyn StateStore>) -> Router<S> {
    Router::new()
        .route("/admin/keys", post(create).get(list))
        .route("/admin/keys/{id}", get(show).patch(update).delete(revoke))
        .route("/admin/keys/{id}/revoke", post(revoke))
        .with_state(Keys::new(store))
}

/// Runs a (synchronous, disk-touching) key operation off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KeyError> + Send + 'static,
) -> Result<T, KeyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KeyError::Invalid(format!("task failed: {e}")))?
}

async fn create(State(keys): State<Keys>, body: axum::body::Bytes) -> Result<Response, KeyError> {
    let new: NewKey = serde_json::from_slice(&body)
        .map_err(|e| KeyError::Invalid(format!("invalid key request: {e}")))?;
    let (record, secret) = blocking(move || keys.create(new)).await?;
    let mut body = serde_json::to_value(&record).map_err(|e| KeyError::Invalid(e.to_string()))?;
    body["secret"] = Value::String(secret);
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

async fn list(State(keys): State<Keys>, Query(q): Query<ListQuery>) -> Result<Response, KeyError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    let records =
        blocking(move || keys.list(limit, q.tenant.as_deref(), q.include_revoked)).await?;
    Ok(axum::Json(json!({"keys": records})).into_response())
}

async fn show(State(keys): State<Keys>, Path(id): Path<String>) -> Result<Response, KeyError> {
    let record = blocking(move || keys.get(&id)).await?;
    Ok(axum::Json(record).into_response())
}

async fn update(
    State(keys): State<Keys>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, KeyError> {
    let patch: KeyPatch = serde_json::from_slice(&body)
        .map_err(|e| KeyError::Invalid(format!("invalid key update: {e}")))?;
    let record = blocking(move || keys.update(&id, patch)).await?;
    Ok(axum::Json(record).into_response())
}

async fn revoke(State(keys): State<Keys>, Path(id): Path<String>) -> Result<Response, KeyError> {
    let record = blocking(move || keys.revoke(&id)).await?;
    Ok(axum::Json(record).into_response())
}

// ---------------------------------------------------------------------------------------
// CLI

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
            let keys: Vec<KeyRecord> =
                serde_json::from_value(v["keys"].clone()).map_err(|e| e.to_string())?;
            println!(
                "{:<20}  {:<9}  {:<20}  {:<12}  {:<10}  {:<10}  status",
                "id", "prefix", "name", "tenant", "created", "expires"
            );
            let now = now_ms();
            for k in &keys {
                let status = if k.revoked {
                    "revoked"
                } else if k.expires_at.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<20}  {:<9}  {:<20}  {:<12}  {:<10}  {:<10}  {status}",
                    k.id,
                    k.prefix,
                    k.name,
                    k.tenant.as_deref().unwrap_or("-"),
                    fmt_time(Some(k.created_at)),
                    fmt_time(k.expires_at),
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn keys() -> Keys {
        Keys::new(Arc::new(MemoryStore::new()))
    }

    #[test]
    fn create_stores_only_the_hash() {
        let k = keys();
        let (record, secret) = k
            .create(NewKey {
                name: "ci".into(),
                tenant: Some("acme".into()),
                rpm: Some(60),
                ..NewKey::default()
            })
            .unwrap();
        assert!(secret.starts_with("wk-") && secret.len() == 67, "{secret}");
        assert!(record.id.starts_with("key_"));
        let all = k.store.scan_prefix(&k.ns, "", usize::MAX).unwrap();
        for (name, value) in &all {
            assert!(!name.contains(&secret[3..]));
            assert!(!String::from_utf8_lossy(value).contains(&secret[3..]));
        }
        let stored = k
            .store
            .get(&k.ns, &format!("key/{}", hash_secret(&secret)))
            .unwrap()
            .unwrap();
        let parsed: KeyRecord = serde_json::from_slice(&stored).unwrap();
        assert_eq!(parsed, record);
        assert_eq!(k.get(&record.id).unwrap(), record);
    }

    #[test]
    fn update_and_revoke() {
        let k = keys();
        let (record, _) = k
            .create(NewKey {
                name: "a".into(),
                rpm: Some(1),
                ..NewKey::default()
            })
            .unwrap();
        let patch: KeyPatch =
            serde_json::from_str(r#"{"rpm": null, "tpm": 5, "models": ["gpt-*"]}"#).unwrap();
        let updated = k.update(&record.id, patch).unwrap();
        assert_eq!(updated.rpm, None);
        assert_eq!(updated.tpm, Some(5));
        assert_eq!(updated.models, vec!["gpt-*"]);
        let revoked = k.revoke(&record.id).unwrap();
        assert!(revoked.revoked && revoked.revoked_at.is_some());
        assert!(k.list(10, None, false).unwrap().is_empty());
        assert_eq!(k.list(10, None, true).unwrap().len(), 1);
        assert!(matches!(k.revoke("key_nope"), Err(KeyError::NotFound(_))));
    }

    #[test]
    fn validation() {
        let k = keys();
        assert!(matches!(
            k.create(NewKey::default()),
            Err(KeyError::Invalid(_))
        ));
        let bad = NewKey {
            name: "x".into(),
            budget_period: Some("week".into()),
            ..NewKey::default()
        };
        assert!(matches!(k.create(bad), Err(KeyError::Invalid(_))));
        assert!(serde_json::from_str::<NewKey>(r#"{"name": "x", "colour": 1}"#).is_err());
    }

    #[test]
    fn list_filters_by_tenant() {
        let k = keys();
        for (name, tenant) in [("a", "t1"), ("b", "t2"), ("c", "t1")] {
            k.create(NewKey {
                name: name.into(),
                tenant: Some(tenant.into()),
                ..NewKey::default()
            })
            .unwrap();
        }
        assert_eq!(k.list(10, Some("t1"), false).unwrap().len(), 2);
        assert_eq!(k.list(1, None, false).unwrap().len(), 1);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("30").unwrap(), 30);
        assert_eq!(parse_duration_secs("90m").unwrap(), 5_400);
        assert_eq!(parse_duration_secs("2d").unwrap(), 172_800);
        assert!(parse_duration_secs("3w").is_err());
    }
}
