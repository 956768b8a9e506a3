//! The plugin's admin endpoint: virtual keys over its own key-value records, served at
//! `/admin/plugins/<instance>/...` on the gateway's admin listener (behind the admin
//! token).
//!
//! | call | does |
//! | --- | --- |
//! | `POST /keys` | create ([`NewKey`]); answers the record plus `secret` (shown once), 201 |
//! | `GET /keys?limit=N&tenant=T&include_revoked=true` | list, newest first |
//! | `GET /keys/{id}` | one key |
//! | `PATCH /keys/{id}` | update ([`KeyPatch`]) |
//! | `DELETE /keys/{id}`, `POST /keys/{id}/revoke` | revoke (the record is kept) |
//!
//! Storage is exactly the gateway's `/admin/keys` (`core/src/admin/keys.rs`):
//! `key/<sha256 hex of the secret>` -> [`KeyRecord`] JSON, `id/<key id>` -> the hash. The
//! secret itself is never stored. Errors answer `{"error": {"message", "code"}}`: 400 for a
//! bad request, 404 for an unknown id, 409 when a key kept changing under a
//! read-modify-write, 500 when state failed or a record is unreadable.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use weir_sdk::{AdminRequest, AdminResponse};

use crate::{AuthConfig, ID_PREFIX, KEY_PREFIX, KeyRecord, hash_secret};

/// Keys returned by a list call without `limit`.
const DEFAULT_LIST_LIMIT: usize = 1_000;
/// Records read by one list call (the scan is bounded; lists are for operators).
const SCAN_LIMIT: u32 = 100_000;
/// Attempts of a read-modify-write before giving up on a busy key.
const CAS_ATTEMPTS: usize = 16;
/// Random bytes in a secret (64 hex digits after the prefix).
const SECRET_BYTES: u32 = 32;

/// The body of `POST /keys`.
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

/// The body of `PATCH /keys/{id}`: fields present are replaced; `null` clears an optional
/// one.
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// No key with this id.
    NotFound(String),
    /// The request was malformed.
    Invalid(String),
    /// The state store failed.
    State(String),
    /// A stored record could not be read.
    Corrupt {
        /// Which.
        id: String,
        /// Why.
        reason: String,
    },
    /// The key kept changing under us.
    Busy(String),
}

impl KeyError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            KeyError::NotFound(_) => 404,
            KeyError::Invalid(_) => 400,
            KeyError::Busy(_) => 409,
            KeyError::State(_) | KeyError::Corrupt { .. } => 500,
        }
    }

    fn message(&self) -> String {
        match self {
            KeyError::NotFound(id) => format!("no key with id '{id}'"),
            KeyError::Invalid(m) => m.clone(),
            KeyError::State(m) => format!("state backend: {m}"),
            KeyError::Corrupt { id, reason } => format!("key record {id} is unreadable: {reason}"),
            KeyError::Busy(id) => format!("key '{id}' is being changed concurrently; try again"),
        }
    }

    fn response(&self) -> AdminResponse {
        if self.status() >= 500 {
            weir_sdk::log::error(&format!("key operation failed: {}", self.message()));
        }
        AdminResponse::error(self.status(), &self.message())
    }
}

fn state(e: String) -> KeyError {
    KeyError::State(e)
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

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn parse(id: &str, raw: &[u8]) -> Result<KeyRecord, KeyError> {
    serde_json::from_slice(raw).map_err(|e| KeyError::Corrupt {
        id: id.to_owned(),
        reason: e.to_string(),
    })
}

fn to_json(record: &KeyRecord) -> Result<Vec<u8>, KeyError> {
    serde_json::to_vec(record).map_err(|e| KeyError::Invalid(e.to_string()))
}

/// Creates a key; returns its record and the secret (the only time it is available).
pub fn create(config: &AuthConfig, new: NewKey) -> Result<(KeyRecord, String), KeyError> {
    if new.name.trim().is_empty() {
        return Err(KeyError::Invalid("name must not be empty".to_owned()));
    }
    check_period(new.budget_period.as_deref())?;
    check_budget(new.budget_usd)?;
    let now = weir_sdk::now_ms();
    let secret = format!(
        "{}{}",
        config.key_prefix,
        hex(&weir_sdk::random_bytes(SECRET_BYTES))
    );
    let id = format!("key_{}", hex(&weir_sdk::random_bytes(8)));
    let hash = hash_secret(&secret);
    let prefix_len = config.key_prefix.len() + 4;
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
        prefix: secret.get(..prefix_len).unwrap_or(&secret).to_owned(),
        created_at: now,
        extra: BTreeMap::new(),
    };
    // The record first: an id entry never points at nothing.
    weir_sdk::kv::set(&format!("{KEY_PREFIX}{hash}"), &to_json(&record)?, None).map_err(state)?;
    weir_sdk::kv::set(&format!("{ID_PREFIX}{id}"), hash.as_bytes(), None).map_err(state)?;
    weir_sdk::log::info(&format!("key {id} created"));
    Ok((record, secret))
}

fn hash_of(id: &str) -> Result<String, KeyError> {
    let hash = weir_sdk::kv::get(&format!("{ID_PREFIX}{id}"))
        .map_err(state)?
        .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
    String::from_utf8(hash).map_err(|e| KeyError::Corrupt {
        id: id.to_owned(),
        reason: e.to_string(),
    })
}

/// One key by id.
pub fn get(id: &str) -> Result<KeyRecord, KeyError> {
    let hash = hash_of(id)?;
    let raw = weir_sdk::kv::get(&format!("{KEY_PREFIX}{hash}"))
        .map_err(state)?
        .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
    parse(id, &raw)
}

/// Keys, newest first, at most `limit`; revoked ones only with `include_revoked`.
pub fn list(
    limit: usize,
    tenant: Option<&str>,
    include_revoked: bool,
) -> Result<Vec<KeyRecord>, KeyError> {
    let mut out = Vec::new();
    for (k, raw) in weir_sdk::kv::scan(KEY_PREFIX, SCAN_LIMIT).map_err(state)? {
        let record = parse(&k, &raw)?;
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

/// Applies `f` to a stored key with compare-and-swap, so concurrent updates (here or
/// through the gateway's `/admin/keys`) never lose one another.
fn modify(
    id: &str,
    mut f: impl FnMut(&mut KeyRecord) -> Result<(), KeyError>,
) -> Result<KeyRecord, KeyError> {
    let hash = hash_of(id)?;
    let key = format!("{KEY_PREFIX}{hash}");
    for _ in 0..CAS_ATTEMPTS {
        let raw = weir_sdk::kv::get(&key)
            .map_err(state)?
            .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
        let mut record = parse(id, &raw)?;
        f(&mut record)?;
        let json = to_json(&record)?;
        if weir_sdk::kv::cas(&key, Some(&raw), Some(&json), None).map_err(state)? {
            return Ok(record);
        }
    }
    Err(KeyError::Busy(id.to_owned()))
}

/// Updates a key.
pub fn update(id: &str, patch: KeyPatch) -> Result<KeyRecord, KeyError> {
    if let Some(Some(p)) = &patch.budget_period {
        check_period(Some(p))?;
    }
    if let Some(usd) = patch.budget_usd {
        check_budget(usd)?;
    }
    if patch.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(KeyError::Invalid("name must not be empty".to_owned()));
    }
    let record = modify(id, |r| {
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
    weir_sdk::log::info(&format!("key {id} updated"));
    Ok(record)
}

/// Revokes a key: it stops authenticating on the next request. The record stays.
pub fn revoke(id: &str) -> Result<KeyRecord, KeyError> {
    let now = weir_sdk::now_ms();
    let record = modify(id, |r| {
        if !r.revoked {
            r.revoked = true;
            r.revoked_at = Some(now);
        }
        Ok(())
    })?;
    weir_sdk::log::info(&format!("key {id} revoked"));
    Ok(record)
}

/// The query of `GET /keys`.
fn list_query(req: &AdminRequest) -> Result<(usize, Option<String>, bool), KeyError> {
    for pair in req.query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(k, _)| k);
        if !matches!(name, "limit" | "tenant" | "include_revoked") {
            return Err(KeyError::Invalid(format!(
                "unknown query parameter '{name}'"
            )));
        }
    }
    let limit = match req.query_param("limit") {
        None => DEFAULT_LIST_LIMIT,
        Some(v) => v
            .parse()
            .map_err(|_| KeyError::Invalid(format!("limit must be a number, not '{v}'")))?,
    };
    let include_revoked = match req.query_param("include_revoked").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(KeyError::Invalid(format!(
                "include_revoked must be true or false, not '{other}'"
            )));
        }
    };
    Ok((limit, req.query_param("tenant"), include_revoked))
}

fn json_of(record: &KeyRecord) -> Value {
    serde_json::to_value(record).unwrap_or(Value::Null)
}

fn answer(result: Result<(u16, Value), KeyError>) -> AdminResponse {
    match result {
        Ok((status, body)) => AdminResponse::json(status, &body),
        Err(e) => e.response(),
    }
}

/// Routes an admin call.
pub fn serve(config: &AuthConfig, req: &AdminRequest) -> AdminResponse {
    let segments = req.segments();
    let method = req.method.to_ascii_uppercase();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["keys"]) => answer(
            req.json::<NewKey>()
                .map_err(|e| KeyError::Invalid(format!("invalid key request: {e}")))
                .and_then(|new| create(config, new))
                .map(|(record, secret)| {
                    let mut body = json_of(&record);
                    body["secret"] = Value::String(secret);
                    (201, body)
                }),
        ),
        ("GET", ["keys"]) => answer(list_query(req).and_then(|(limit, tenant, revoked)| {
            let keys = list(limit, tenant.as_deref(), revoked)?;
            Ok((200, serde_json::json!({ "keys": keys })))
        })),
        ("GET", ["keys", id]) => answer(get(id).map(|r| (200, json_of(&r)))),
        ("PATCH", ["keys", id]) => answer(
            req.json::<KeyPatch>()
                .map_err(|e| KeyError::Invalid(format!("invalid key update: {e}")))
                .and_then(|patch| update(id, patch))
                .map(|r| (200, json_of(&r))),
        ),
        ("DELETE", ["keys", id]) | ("POST", ["keys", id, "revoke"]) => {
            answer(revoke(id).map(|r| (200, json_of(&r))))
        }
        (_, ["keys"] | ["keys", _] | ["keys", _, "revoke"]) => {
            AdminResponse::error(405, &format!("{method} is not allowed on {}", req.path))
        }
        _ => AdminResponse::not_found(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::Auth;
    use weir_sdk::Decision;
    use weir_sdk::testing::{self, Harness};

    fn call(h: &Harness<Auth>, method: &str, path: &str, body: &str) -> (u16, Value) {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let mut req = testing::admin_request(method, path);
        req.query = query.to_owned();
        req.body = body.as_bytes().to_vec();
        let resp = h.admin(&req);
        (resp.status, serde_json::from_slice(&resp.body).unwrap())
    }

    fn authenticates(h: &Harness<Auth>, secret: &str, model: &str) -> Option<u16> {
        let req = testing::request()
            .model(model)
            .header("authorization", &format!("Bearer {secret}"))
            .build();
        match h.on_request(&req) {
            Decision::Reply(r) => Some(r.status),
            Decision::Continue(_) => None,
        }
    }

    #[test]
    fn create_show_list_revoke() {
        let h: Harness<Auth> = Harness::new("{}").unwrap();
        testing::set_now_ms(1_000);
        let (status, created) = call(
            &h,
            "POST",
            "/keys",
            r#"{"name": "ci", "tenant": "acme", "models": ["gpt-*"], "rpm": 60, "expires_in_secs": 60}"#,
        );
        assert_eq!(status, 201, "{created}");
        let secret = created["secret"].as_str().unwrap().to_owned();
        let id = created["id"].as_str().unwrap().to_owned();
        assert!(
            secret.starts_with("wk-") && secret.len() == 3 + 64,
            "{secret}"
        );
        assert!(id.starts_with("key_") && id.len() == 4 + 16, "{id}");
        assert_eq!(created["prefix"], secret[..7]);
        assert_eq!(created["expires_at"], 61_000);
        assert_eq!(created["created_at"], 1_000);
        // Stored as the gateway stores it: the record under the hash, the id index.
        let stored = testing::kv_get_string(&format!("key/{}", hash_secret(&secret))).unwrap();
        assert!(!stored.contains(&secret), "the secret is never stored");
        assert_eq!(
            testing::kv_get_string(&format!("id/{id}")).unwrap(),
            hash_secret(&secret)
        );
        // The new key works, within its models.
        assert_eq!(authenticates(&h, &secret, "gpt-4o"), None);
        assert_eq!(authenticates(&h, &secret, "claude"), Some(403));

        let (status, shown) = call(&h, "GET", &format!("/keys/{id}"), "");
        assert_eq!(status, 200);
        assert_eq!(shown["name"], "ci");
        assert!(shown.get("secret").is_none(), "shown only once");

        testing::set_now_ms(2_000);
        let (_, other) = call(&h, "POST", "/keys", r#"{"name": "web"}"#);
        let (status, listed) = call(&h, "GET", "/keys", "");
        assert_eq!(status, 200);
        let names: Vec<&str> = listed["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web", "ci"], "newest first");
        let (_, acme) = call(&h, "GET", "/keys?tenant=acme&limit=5", "");
        assert_eq!(acme["keys"].as_array().unwrap().len(), 1);

        let (status, revoked) = call(&h, "DELETE", &format!("/keys/{id}"), "");
        assert_eq!(status, 200);
        assert_eq!(revoked["revoked"], true);
        assert_eq!(revoked["revoked_at"], 2_000);
        assert_eq!(authenticates(&h, &secret, "gpt-4o"), Some(401));
        let (_, listed) = call(&h, "GET", "/keys", "");
        assert_eq!(listed["keys"].as_array().unwrap().len(), 1);
        let (_, all) = call(&h, "GET", "/keys?include_revoked=true", "");
        assert_eq!(all["keys"].as_array().unwrap().len(), 2);
        assert_ne!(other["secret"], created["secret"]);
    }

    #[test]
    fn records_written_by_the_gateway_are_served_and_kept_whole() {
        let h: Harness<Auth> = Harness::new("{}").unwrap();
        // What core/src/admin/keys.rs writes (plus a field from a newer version).
        let hash = hash_secret("wk-from-core");
        let record = r#"{"id":"key_00000000000000aa","name":"old","models":[],"revoked":false,"prefix":"wk-from","created_at":5,"future":{"x":1}}"#;
        weir_sdk::kv::set(&format!("key/{hash}"), record.as_bytes(), None).unwrap();
        weir_sdk::kv::set("id/key_00000000000000aa", hash.as_bytes(), None).unwrap();
        let (status, shown) = call(&h, "GET", "/keys/key_00000000000000aa", "");
        assert_eq!(status, 200);
        assert_eq!(shown["future"]["x"], 1);
        let (status, _) = call(
            &h,
            "PATCH",
            "/keys/key_00000000000000aa",
            r#"{"rpm": 10, "tenant": "acme"}"#,
        );
        assert_eq!(status, 200);
        let stored: Value =
            serde_json::from_str(&testing::kv_get_string(&format!("key/{hash}")).unwrap()).unwrap();
        assert_eq!(stored["rpm"], 10);
        assert_eq!(stored["tenant"], "acme");
        assert_eq!(stored["future"]["x"], 1, "unknown fields survive an update");
        // Unchanged fields keep the gateway's serialization (no nulls for absent options).
        assert!(stored.get("expires_at").is_none());
        // Clearing with null.
        call(
            &h,
            "PATCH",
            "/keys/key_00000000000000aa",
            r#"{"rpm": null}"#,
        );
        let (_, shown) = call(&h, "GET", "/keys/key_00000000000000aa", "");
        assert!(shown.get("rpm").is_none());
    }

    #[test]
    fn errors() {
        let h: Harness<Auth> = Harness::new("{}").unwrap();
        let (status, body) = call(&h, "GET", "/keys/key_nope", "");
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], 404);
        assert_eq!(call(&h, "POST", "/keys", r#"{"name": " "}"#).0, 400);
        assert_eq!(
            call(&h, "POST", "/keys", r#"{"name": "x", "colour": 1}"#).0,
            400
        );
        assert_eq!(
            call(
                &h,
                "POST",
                "/keys",
                r#"{"name": "x", "budget_period": "week"}"#
            )
            .0,
            400
        );
        assert_eq!(
            call(&h, "POST", "/keys", r#"{"name": "x", "budget_usd": -1}"#).0,
            400
        );
        assert_eq!(call(&h, "GET", "/keys?limit=x", "").0, 400);
        assert_eq!(call(&h, "GET", "/keys?colour=red", "").0, 400);
        assert_eq!(call(&h, "PUT", "/keys", "").0, 405);
        assert_eq!(call(&h, "GET", "/elsewhere", "").0, 404);
        assert_eq!(call(&h, "DELETE", "/keys/key_nope", "").0, 404);
    }
}
