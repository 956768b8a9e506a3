//! `auth`: virtual API keys for Weir, as a WASM plugin built with `weir-sdk`.
//!
//! Clients present `Authorization: Bearer wk-...` (OpenAI style) or `x-api-key: wk-...`
//! (Anthropic style). The plugin hashes the secret with SHA-256 and looks the hash up in
//! its key-value namespace (`plugin/auth`), where the admin API (`POST /admin/keys`,
//! `weir keys create`) stores one [`KeyRecord`] per key under `key/<sha256 hex>`. The
//! secret itself is never stored.
//!
//! - unknown, revoked or expired key: **401** in the caller's dialect;
//! - model not allowed by the key's globs: **403**;
//! - otherwise the request continues with the client's credential headers removed (they
//!   never go upstream) and the key's facts in the request metadata bag, for the plugins
//!   after it (rate-limit, budget, routing) and for the request log:
//!   `key`, `key.name`, `tenant`, `key.rpm`, `key.tpm`, `key.budget_usd`,
//!   `key.budget_period`, `key.meta.<name>`.
//!
//! Keys are managed through the gateway's admin API (`/admin/keys`, `weir keys`) or the
//! plugin's own admin endpoint, `/admin/plugins/<instance>/keys` ([`admin`]): both write
//! the same records, so either works with keys the other created.
//!
//! Start at [`Auth::on_request`]; the record format is [`KeyRecord`] (the admin API in
//! `core/src/admin/keys.rs` writes the same JSON).

pub mod admin;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use weir_sdk::{AdminRequest, AdminResponse, Decision, Dialect, Plugin, Reply, Request};

/// The key-value prefix of key records: `key/<sha256 hex of the secret>`.
pub const KEY_PREFIX: &str = "key/";
/// The key-value prefix of the id index: `id/<key id>` -> the hash.
pub const ID_PREFIX: &str = "id/";

/// The plugin's configuration (the `config` table of its `[[plugins]]` entry).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Let requests without any credential through, unauthenticated (no key metadata is
    /// set; later plugins then apply their tenant-less defaults). A credential that is
    /// present but wrong is still rejected. Default `false`.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// The prefix every virtual key starts with; a credential without it is rejected
    /// without a state lookup. Default `wk-`.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
}

fn default_prefix() -> String {
    "wk-".to_owned()
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: false,
            key_prefix: default_prefix(),
        }
    }
}

/// One virtual key as stored (JSON) under `key/<sha256 hex>`. Written by the admin API
/// (`core/src/admin/keys.rs`) or this plugin's [`admin`] endpoint, field for field the
/// same JSON. Unknown fields are kept (in `extra`) so newer admin versions can add some
/// without breaking, or losing them through, older plugins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Stable public id (`key_...`), used by the admin API, logs and usage.
    pub id: String,
    /// Human name.
    #[serde(default)]
    pub name: String,
    /// Tenant the key belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Model globs the key may use (`gpt-4o*`, `claude-*`); empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Expiry, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Revoked keys stay stored (for the audit trail) but never authenticate.
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
    /// `day`, `month` or `total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_period: Option<String>,
    /// Free-form facts later plugins read as `key.meta.<name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The first characters of the secret (`wk-1a2b`), to recognise a key in a list.
    #[serde(default)]
    pub prefix: String,
    /// Creation time, ms since the epoch.
    #[serde(default)]
    pub created_at: u64,
    /// Fields this version does not know, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credential at all.
    Missing,
    /// Not a key we know (or malformed).
    Unknown,
    /// The key was revoked.
    Revoked,
    /// The key expired.
    Expired,
    /// The key may not use this model.
    ModelNotAllowed,
    /// The key store could not be read (e.g. the shared state server is down): refused with
    /// a 503 so clients retry, rather than told their key is wrong.
    StoreUnavailable,
}

impl Refusal {
    /// The HTTP status: 403 for a model the key may not use, 503 when the key store is
    /// unavailable, 401 otherwise.
    pub fn status(self) -> u16 {
        match self {
            Refusal::ModelNotAllowed => 403,
            Refusal::StoreUnavailable => 503,
            _ => 401,
        }
    }

    /// A stable code for clients and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Missing => "missing_api_key",
            Refusal::Unknown => "invalid_api_key",
            Refusal::Revoked => "revoked_api_key",
            Refusal::Expired => "expired_api_key",
            Refusal::ModelNotAllowed => "model_not_allowed",
            Refusal::StoreUnavailable => "key_store_unavailable",
        }
    }

    fn message(self, model: &str) -> String {
        match self {
            Refusal::Missing => {
                "Missing API key: send `Authorization: Bearer wk-...` or `x-api-key: wk-...`."
                    .to_owned()
            }
            Refusal::Unknown => "Incorrect API key provided.".to_owned(),
            Refusal::Revoked => "This API key has been revoked.".to_owned(),
            Refusal::Expired => "This API key has expired.".to_owned(),
            Refusal::ModelNotAllowed => format!("This API key may not use the model '{model}'."),
            Refusal::StoreUnavailable => {
                "The key store is unavailable; the request was refused. Retry shortly.".to_owned()
            }
        }
    }

    /// The error reply in the caller's dialect.
    pub fn reply(self, dialect: Dialect, model: &str) -> Reply {
        let message = self.message(model);
        let status = self.status();
        let body = match dialect {
            Dialect::Anthropic => serde_json::json!({
                "type": "error",
                "error": {
                    "type": match status {
                        403 => "permission_error",
                        503 => "overloaded_error",
                        _ => "authentication_error",
                    },
                    "message": message,
                }
            }),
            Dialect::Openai => serde_json::json!({
                "error": {
                    "message": message,
                    "type": match status {
                        403 => "permission_error",
                        503 => "server_error",
                        _ => "invalid_request_error",
                    },
                    "param": null,
                    "code": self.code(),
                }
            }),
        };
        let mut reply = Reply::json(status, &body);
        if status == 401 {
            reply = reply.header("www-authenticate", "Bearer");
        }
        if status == 503 {
            reply = reply.header("retry-after", "1");
        }
        reply
    }
}

/// The plugin.
#[derive(Debug)]
pub struct Auth {
    config: AuthConfig,
}

/// SHA-256 of `secret`, lower-case hex: the only form in which a key is stored.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    out
}

/// The credential the client presented: `Authorization: Bearer X` first, then
/// `x-api-key: X`.
pub fn credential(req: &Request) -> Option<String> {
    if let Some(value) = req.header("authorization") {
        let value = value.trim();
        let token = value
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
            .map(|_| value[7..].trim());
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            return Some(token.to_owned());
        }
    }
    req.header("x-api-key")
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// Whether `text` matches the glob `pattern` (`*` any run, `?` one character).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl KeyRecord {
    /// Checks the key against the clock and the requested model.
    pub fn check(&self, now_ms: u64, model: &str) -> Result<(), Refusal> {
        if self.revoked {
            return Err(Refusal::Revoked);
        }
        if self.expires_at.is_some_and(|exp| exp <= now_ms) {
            return Err(Refusal::Expired);
        }
        if !self.models.is_empty() && !self.models.iter().any(|g| glob_match(g, model)) {
            return Err(Refusal::ModelNotAllowed);
        }
        Ok(())
    }

    /// The metadata entries later plugins read.
    pub fn metadata_pairs(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("key".to_owned(), self.id.clone()),
            ("key.name".to_owned(), self.name.clone()),
        ];
        if let Some(tenant) = &self.tenant {
            out.push(("tenant".to_owned(), tenant.clone()));
        }
        if let Some(rpm) = self.rpm {
            out.push(("key.rpm".to_owned(), rpm.to_string()));
        }
        if let Some(tpm) = self.tpm {
            out.push(("key.tpm".to_owned(), tpm.to_string()));
        }
        if let Some(usd) = self.budget_usd {
            out.push(("key.budget_usd".to_owned(), usd.to_string()));
            let period = self.budget_period.as_deref().unwrap_or("month");
            out.push(("key.budget_period".to_owned(), period.to_owned()));
        }
        for (k, v) in &self.metadata {
            out.push((format!("key.meta.{k}"), v.clone()));
        }
        out
    }
}

impl Auth {
    /// Finds and checks the key of a request.
    fn authenticate(&self, req: &Request, model: &str) -> Result<Option<KeyRecord>, Refusal> {
        let Some(secret) = credential(req) else {
            return if self.config.allow_anonymous {
                Ok(None)
            } else {
                Err(Refusal::Missing)
            };
        };
        if !secret.starts_with(&self.config.key_prefix) {
            return Err(Refusal::Unknown);
        }
        let stored = match weir_sdk::kv::get(&format!("{KEY_PREFIX}{}", hash_secret(&secret))) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(Refusal::Unknown),
            Err(e) => {
                // State unavailable: refuse (fail closed) rather than let anyone in, and say
                // so, rather than telling a good key it is wrong.
                weir_sdk::log::error(&format!("key lookup failed: {e}"));
                return Err(Refusal::StoreUnavailable);
            }
        };
        let record: KeyRecord = serde_json::from_slice(&stored).map_err(|e| {
            weir_sdk::log::error(&format!("unreadable key record: {e}"));
            Refusal::Unknown
        })?;
        record.check(weir_sdk::now_ms(), model)?;
        Ok(Some(record))
    }
}

impl Plugin for Auth {
    type Config = AuthConfig;

    fn new(config: AuthConfig) -> Result<Self, String> {
        if config.key_prefix.is_empty() {
            return Err("key_prefix must not be empty".to_owned());
        }
        Ok(Auth { config })
    }

    fn on_request(&self, req: &Request) -> Decision {
        let model = req.model();
        match self.authenticate(req, &model) {
            Err(refusal) => {
                weir_sdk::metrics::counter_add(refusal.code(), 1);
                Decision::Reply(refusal.reply(req.dialect(), &model))
            }
            Ok(record) => {
                // The client's credential never goes upstream.
                let mut decision = Decision::cont()
                    .remove_header("authorization")
                    .remove_header("x-api-key");
                if let Some(record) = record {
                    for (k, v) in record.metadata_pairs() {
                        decision = decision.set_metadata(&k, &v);
                    }
                }
                decision
            }
        }
    }

    /// The keys endpoint: see [`admin`].
    fn admin(&self, req: &AdminRequest) -> AdminResponse {
        admin::serve(&self.config, req)
    }
}

weir_sdk::export!(Auth);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use weir_sdk::testing::{self, Harness};

    const SECRET: &str = "wk-0123456789abcdef0123456789abcdef";

    fn store(record: serde_json::Value) {
        weir_sdk::kv::set(
            &format!("{KEY_PREFIX}{}", hash_secret(SECRET)),
            record.to_string().as_bytes(),
            None,
        )
        .unwrap();
    }

    fn harness() -> Harness<Auth> {
        Harness::new("{}").unwrap()
    }

    fn status(d: &Decision) -> Option<u16> {
        match d {
            Decision::Reply(r) => Some(r.status),
            Decision::Continue(_) => None,
        }
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("gpt-4o*", "gpt-4o-mini"));
        assert!(glob_match("*", ""));
        assert!(glob_match("claude-?-x", "claude-3-x"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("gpt-4o", "gpt-4o-mini"));
        assert!(!glob_match("a*b", "ac"));
    }

    #[test]
    fn valid_key_sets_metadata_and_strips_credentials() {
        let h = harness();
        store(serde_json::json!({
            "id": "key_1", "name": "ci", "tenant": "acme", "models": ["mock*"],
            "rpm": 60, "tpm": 1000, "budget_usd": 5.0, "budget_period": "day",
            "metadata": {"team": "core"}
        }));
        let req = testing::request()
            .model("mock")
            .header("authorization", &format!("Bearer {SECRET}"))
            .build();
        let Decision::Continue(m) = h.on_request(&req) else {
            panic!("expected continue");
        };
        assert_eq!(m.remove_headers, vec!["authorization", "x-api-key"]);
        let md: BTreeMap<_, _> = m.set_metadata.into_iter().collect();
        assert_eq!(md["key"], "key_1");
        assert_eq!(md["tenant"], "acme");
        assert_eq!(md["key.rpm"], "60");
        assert_eq!(md["key.tpm"], "1000");
        assert_eq!(md["key.budget_usd"], "5");
        assert_eq!(md["key.budget_period"], "day");
        assert_eq!(md["key.meta.team"], "core");
    }

    #[test]
    fn anthropic_header_works() {
        let h = harness();
        store(serde_json::json!({"id": "key_1"}));
        let req = testing::request()
            .dialect(Dialect::Anthropic)
            .header("x-api-key", SECRET)
            .build();
        assert_eq!(status(&h.on_request(&req)), None);
    }

    #[test]
    fn refusals() {
        let h = harness();
        let req = testing::request().model("mock").build();
        assert_eq!(status(&h.on_request(&req)), Some(401));

        let with_key = |model: &str| {
            testing::request()
                .model(model)
                .header("authorization", &format!("Bearer {SECRET}"))
                .build()
        };
        // Unknown.
        assert_eq!(status(&h.on_request(&with_key("mock"))), Some(401));
        // Revoked.
        store(serde_json::json!({"id": "k", "revoked": true}));
        assert_eq!(status(&h.on_request(&with_key("mock"))), Some(401));
        // Expired.
        testing::set_now_ms(2_000);
        store(serde_json::json!({"id": "k", "expires_at": 1_000}));
        assert_eq!(status(&h.on_request(&with_key("mock"))), Some(401));
        // Model not allowed.
        store(serde_json::json!({"id": "k", "models": ["gpt-*"]}));
        assert_eq!(status(&h.on_request(&with_key("mock"))), Some(403));
        assert_eq!(status(&h.on_request(&with_key("gpt-4o"))), None);
        // Wrong prefix: no lookup.
        let req = testing::request().header("x-api-key", "sk-xyz").build();
        assert_eq!(status(&h.on_request(&req)), Some(401));
    }

    #[test]
    fn anthropic_dialect_error_shape() {
        let reply = Refusal::Unknown.reply(Dialect::Anthropic, "m");
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "authentication_error");
        let reply = Refusal::ModelNotAllowed.reply(Dialect::Openai, "m");
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["error"]["code"], "model_not_allowed");
        assert_eq!(reply.status, 403);
    }

    #[test]
    fn anonymous_mode() {
        let h: Harness<Auth> = Harness::new(r#"{"allow_anonymous": true}"#).unwrap();
        let req = testing::request().build();
        assert_eq!(status(&h.on_request(&req)), None);
        let req = testing::request().header("x-api-key", "wk-nope").build();
        assert_eq!(status(&h.on_request(&req)), Some(401));
    }
}
