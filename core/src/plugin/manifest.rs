//! `plugin.toml`: what a plugin is, what it may touch, and how it fails.
//!
//! Two layers, as for the gateway config: [`ManifestFile`] is the file shape (serde, unknown
//! keys rejected, a doc comment per field); [`Manifest::load`] validates it into the runtime
//! [`Manifest`] (entry path resolved, hooks parsed, limits in bytes and durations, config
//! schema compiled). Every error names the file and the key.
//!
//! ```toml
//! name = "prompt-guard"
//! version = "0.1.0"
//! kind = "lua"                       # or "wasm"
//! entry = "plugin.lua"               # default: plugin.lua / plugin.wasm
//! hooks = ["on-request"]             # which hooks the host calls
//! headers = ["x-tenant"]             # headers the plugin sees; ["*"] for all
//! failure = "closed"                 # or "open"
//!
//! [capabilities]
//! kv = true                          # key-value state
//! body = false                       # the full request body as JSON
//! fetch = ["api.example.com"]        # hosts `http-fetch` may reach
//!
//! [limits]
//! memory_mb = 32
//! deadline_ms = 10                   # on-request, on-response
//! log_deadline_ms = 50               # on-log, off the hot path
//! chunk_deadline_ms = 2              # on-response-chunk
//! deadline_per_mib_ms = 20           # more time per MiB of input ...
//! max_deadline_ms = 250              # ... up to this
//!
//! [metadata]                         # declared data dependencies (see `deps`)
//! provides = ["tenant"]
//! requires = ["key"]
//!
//! serves_models = "aliases"          # config key naming the models it serves (`/v1/models`)
//!
//! [config_schema]                    # JSON Schema (a subset) for the instance's config
//! type = "object"
//! required = ["phrases"]
//! properties.phrases = { type = "array", items = { type = "string" } }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::PluginError;
use super::contract::{Hook, ResponseView, StreamEvent};
use super::deps::{MetadataDeps, MetadataFile};
use super::schema::Schema;

/// The file name of a manifest inside a plugin folder.
pub const MANIFEST_FILE: &str = "plugin.toml";

/// The file shape of `plugin.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Plugin name: lower-case letters, digits, `-` and `_`. Also the default instance name,
    /// which namespaces the plugin's key-value state.
    pub name: String,
    /// Plugin version (free text, semver recommended).
    pub version: String,
    /// One line saying what the plugin does.
    #[serde(default)]
    pub description: Option<String>,
    /// `wasm` (a component built for `wasm32-wasip2`) or `lua` (a Luau script).
    pub kind: PluginKind,
    /// The code, relative to the plugin folder. Default `plugin.wasm` or `plugin.lua`.
    #[serde(default)]
    pub entry: Option<String>,
    /// Hooks the host calls: `on-request`, `on-response`, `on-response-chunk`, `on-log`
    /// (`init` is always called when the plugin defines it).
    #[serde(default)]
    pub hooks: Vec<String>,
    /// Request headers copied into the request view (case-insensitive); `["*"]` for all.
    /// Fewer headers make a faster hook.
    #[serde(default)]
    pub headers: Vec<String>,
    /// What the plugin may use beyond its own code.
    #[serde(default)]
    pub capabilities: CapabilitiesFile,
    /// Resource limits per hook call.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Metadata keys the plugin provides to later plugins and needs from earlier ones.
    #[serde(default)]
    pub metadata: MetadataFile,
    /// What happens to the request when the plugin fails: `closed` (default: the request
    /// fails with a 503 naming the plugin) or `open` (the plugin is skipped).
    #[serde(default)]
    pub failure: FailurePolicy,
    /// JSON Schema (subset: `type`, `properties`, `required`, `additionalProperties`, `items`,
    /// `enum`, `minimum`, `maximum`, `minLength`, `maxLength`, `minItems`, `maxItems`) that an
    /// instance's `config` must satisfy; checked when the gateway loads.
    #[serde(default)]
    pub config_schema: Option<serde_json::Value>,
    /// The key of the instance's `config` that names the model names this plugin serves (a
    /// routing plugin's aliases): a table (its keys) or a list of strings. `/v1/models` lists
    /// them beside the `[[models]]` of the gateway config. Default: none.
    #[serde(default)]
    pub serves_models: Option<String>,
}

/// Which runtime hosts the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// A WebAssembly component (wasmtime).
    Wasm,
    /// A Luau script (mlua).
    Lua,
}

impl PluginKind {
    /// `wasm` or `lua`, for metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Wasm => "wasm",
            PluginKind::Lua => "lua",
        }
    }
}

/// Failure policy: what a failed hook call (error, trap, timeout, out of memory, open
/// circuit breaker) does to the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Fail the request: a 503 JSON error naming the plugin.
    #[default]
    Closed,
    /// Skip the plugin and go on as if it had continued without changes.
    Open,
}

/// `[capabilities]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitiesFile {
    /// Key-value state (`kv-*`). Default false.
    #[serde(default)]
    pub kv: bool,
    /// The full request body as JSON in the request view. Default false.
    #[serde(default)]
    pub body: bool,
    /// Hosts `http-fetch` may call (exact host names). Default none: fetch refused.
    #[serde(default)]
    pub fetch: Vec<String>,
}

/// `[limits]`; every field has a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Memory cap of one instance, MiB. Default 32.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// CPU deadline of `on-request` and `on-response`, ms. Default 10.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// CPU deadline of `on-log` (off the hot path), ms. Default 50.
    #[serde(default)]
    pub log_deadline_ms: Option<u64>,
    /// CPU deadline of `on-response-chunk`, ms. Default 2.
    #[serde(default)]
    pub chunk_deadline_ms: Option<u64>,
    /// CPU deadline of `init`, ms. Default 1000.
    #[serde(default)]
    pub init_deadline_ms: Option<u64>,
    /// Extra time per MiB of input for every hook but `init`, ms; 0 turns the scaling off.
    /// Default 20.
    #[serde(default)]
    pub deadline_per_mib_ms: Option<u64>,
    /// Ceiling of a deadline scaled by input size, ms (never below the hook's own
    /// deadline). Default 250.
    #[serde(default)]
    pub max_deadline_ms: Option<u64>,
    /// Stack cap (WASM), KiB. Default 512.
    #[serde(default)]
    pub stack_kb: Option<u64>,
    /// Most text a chunk hook may hold back before the host releases it, bytes.
    /// Default 16384.
    #[serde(default)]
    pub hold_bytes: Option<usize>,
}

/// Which request headers a plugin sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderSelection {
    /// Every header (`headers = ["*"]`).
    All,
    /// Only these (lower-case names); empty means none.
    Only(Vec<String>),
}

impl Default for HeaderSelection {
    /// No headers.
    fn default() -> Self {
        HeaderSelection::Only(Vec::new())
    }
}

impl HeaderSelection {
    /// Whether the header `name` (lower-case) is visible.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            HeaderSelection::All => true,
            HeaderSelection::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// What a plugin may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Key-value state.
    pub kv: bool,
    /// The full request body.
    pub body: bool,
    /// Hosts `http-fetch` may reach (lower-case); empty: fetch refused.
    pub fetch: Vec<String>,
}

/// Resource limits per hook call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory cap of one instance, bytes.
    pub memory_bytes: usize,
    /// Deadline of the request and response hooks.
    pub deadline: Duration,
    /// Deadline of the log hook.
    pub log_deadline: Duration,
    /// Deadline of the chunk hook.
    pub chunk_deadline: Duration,
    /// Deadline of `init`.
    pub init_deadline: Duration,
    /// Extra time per MiB of a hook's input (zero: no scaling).
    pub deadline_per_mib: Duration,
    /// Ceiling of a scaled deadline (a hook's own deadline above it still applies).
    pub max_deadline: Duration,
    /// Stack cap, bytes (WASM).
    pub stack_bytes: usize,
    /// Hold buffer cap, bytes.
    pub hold_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 32 << 20,
            deadline: Duration::from_millis(10),
            log_deadline: Duration::from_millis(50),
            chunk_deadline: Duration::from_millis(2),
            init_deadline: Duration::from_millis(1000),
            deadline_per_mib: Duration::from_millis(20),
            max_deadline: Duration::from_millis(250),
            stack_bytes: 512 << 10,
            hold_bytes: 16 << 10,
        }
    }
}

impl Limits {
    /// The deadline of `hook`.
    pub fn deadline_of(&self, hook: Hook) -> Duration {
        match hook {
            Hook::Init => self.init_deadline,
            Hook::OnResponseChunk => self.chunk_deadline,
            Hook::OnRequest | Hook::OnResponse => self.deadline,
            Hook::OnLog => self.log_deadline,
            // Operators' calls (listing thousands of keys) get room; they are not on any
            // request's path.
            Hook::Admin => self.log_deadline.max(ADMIN_DEADLINE),
        }
    }

    /// The deadline of one call of `hook` given `input_bytes` of input: see [`deadline_for`].
    pub fn deadline_for(&self, hook: Hook, input_bytes: usize) -> Duration {
        match hook {
            Hook::Init => self.init_deadline,
            _ => scale_deadline(
                self.deadline_of(hook),
                self.deadline_per_mib,
                self.max_deadline,
                input_bytes,
            ),
        }
    }
}

/// The deadline of one call of `hook` whose input (messages, body, choices, event text) is
/// `input_bytes` long: the hook's deadline plus `deadline_per_mib` per MiB of input, capped
/// at `max_deadline` (a hook deadline above the cap is kept as it is). `init` is not scaled.
///
/// A fixed deadline makes a hook's failures depend on what a caller sends: a 2 MB prompt
/// takes a scanning plugin longer than a 1 KB one, and every timeout feeds the plugin's
/// circuit breaker. Scaling gives big inputs their time; the cap bounds what one request
/// can cost.
pub fn deadline_for(limits: &Limits, hook: Hook, input_bytes: usize) -> Duration {
    limits.deadline_for(hook, input_bytes)
}

/// `base + per_mib * input_bytes / MiB`, at most `max(base, max)`.
pub fn scale_deadline(
    base: Duration,
    per_mib: Duration,
    max: Duration,
    input_bytes: usize,
) -> Duration {
    if per_mib.is_zero() || input_bytes == 0 {
        return base;
    }
    let per_mib_us = u64::try_from(per_mib.as_micros()).unwrap_or(u64::MAX);
    let bytes = u64::try_from(input_bytes).unwrap_or(u64::MAX);
    let extra_us = u128::from(per_mib_us) * u128::from(bytes) / (1 << 20);
    let extra = Duration::from_micros(u64::try_from(extra_us).unwrap_or(u64::MAX));
    base.saturating_add(extra).min(base.max(max))
}

/// Input size of `on-response` for [`deadline_for`]: choice text and tool-call arguments.
pub fn response_bytes(resp: &ResponseView) -> usize {
    resp.choices
        .iter()
        .map(|c| {
            c.text.len()
                + c.tool_calls
                    .iter()
                    .map(|t| t.arguments.len())
                    .sum::<usize>()
        })
        .sum()
}

/// Input size of `on-response-chunk` for [`deadline_for`]: the delta's text or arguments.
pub fn event_bytes(event: &StreamEvent) -> usize {
    match event {
        StreamEvent::TextDelta(d) => d.text.len(),
        StreamEvent::ToolCallDelta(d) => d.arguments.len(),
        StreamEvent::Usage(_) | StreamEvent::Finish(_) => 0,
    }
}

/// The least deadline of an `admin` call.
pub const ADMIN_DEADLINE: Duration = Duration::from_secs(2);

/// The set of hooks a plugin declares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks {
    /// `on-request`.
    pub on_request: bool,
    /// `on-response`.
    pub on_response: bool,
    /// `on-response-chunk`.
    pub on_response_chunk: bool,
    /// `on-log`.
    pub on_log: bool,
    /// `admin` (the plugin serves `/admin/plugins/<instance>/...`).
    pub admin: bool,
}

impl Hooks {
    /// Whether `hook` is declared (`init` always counts as declared).
    pub fn has(&self, hook: Hook) -> bool {
        match hook {
            Hook::Init => true,
            Hook::OnRequest => self.on_request,
            Hook::OnResponse => self.on_response,
            Hook::OnResponseChunk => self.on_response_chunk,
            Hook::OnLog => self.on_log,
            Hook::Admin => self.admin,
        }
    }

    /// The declared hooks, `init` excluded.
    pub fn iter(&self) -> impl Iterator<Item = Hook> + '_ {
        [
            Hook::OnRequest,
            Hook::OnResponse,
            Hook::OnResponseChunk,
            Hook::OnLog,
            Hook::Admin,
        ]
        .into_iter()
        .filter(|h| self.has(*h))
    }
}

/// Parses a hook name as written in a manifest (`on-request`; `on_request` is accepted too).
pub fn parse_hook(name: &str) -> Option<Hook> {
    match name.replace('_', "-").as_str() {
        "init" => Some(Hook::Init),
        "on-request" => Some(Hook::OnRequest),
        "on-response" => Some(Hook::OnResponse),
        "on-response-chunk" => Some(Hook::OnResponseChunk),
        "on-log" => Some(Hook::OnLog),
        "admin" => Some(Hook::Admin),
        _ => None,
    }
}

/// A validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The plugin folder.
    pub dir: PathBuf,
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// Description, if any.
    pub description: Option<String>,
    /// Runtime.
    pub kind: PluginKind,
    /// Absolute (or config-relative) path of the code.
    pub entry: PathBuf,
    /// Declared hooks.
    pub hooks: Hooks,
    /// Visible request headers.
    pub headers: HeaderSelection,
    /// Capabilities.
    pub capabilities: Capabilities,
    /// Limits.
    pub limits: Limits,
    /// Failure policy.
    pub failure: FailurePolicy,
    /// Declared metadata dependencies.
    pub metadata: MetadataDeps,
    /// The compiled config schema, if any.
    pub config_schema: Option<Schema>,
    /// The config key naming the models the plugin serves, if any.
    pub serves_models: Option<String>,
}

impl Manifest {
    /// Reads and validates `DIR/plugin.toml`.
    pub fn load(dir: &Path) -> Result<Manifest, PluginError> {
        let file = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&file).map_err(|source| PluginError::Io {
            path: file.clone(),
            source,
        })?;
        Self::parse(dir, &text)
    }

    /// Parses and validates manifest text of the plugin in folder `dir`.
    pub fn parse(dir: &Path, text: &str) -> Result<Manifest, PluginError> {
        let file = dir.join(MANIFEST_FILE);
        let invalid = |key: &str, reason: String| PluginError::Manifest {
            file: file.clone(),
            key: key.to_owned(),
            reason,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| invalid("", e.to_string()))?;
        let raw: ManifestFile = serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(&e.path().to_string(), e.inner().to_string()))?;
        Self::validate(dir, raw).map_err(|(key, reason)| invalid(&key, reason))
    }

    fn validate(dir: &Path, raw: ManifestFile) -> Result<Manifest, (String, String)> {
        validate_name(&raw.name).map_err(|r| ("name".to_owned(), r))?;
        if raw.version.trim().is_empty() {
            return Err(("version".into(), "must not be empty".into()));
        }
        let entry = raw.entry.clone().unwrap_or_else(|| match raw.kind {
            PluginKind::Wasm => "plugin.wasm".to_owned(),
            PluginKind::Lua => "plugin.lua".to_owned(),
        });
        if Path::new(&entry).is_absolute() || entry.split(['/', '\\']).any(|p| p == "..") {
            return Err((
                "entry".into(),
                format!("'{entry}' must be a path inside the plugin folder"),
            ));
        }
        let mut hooks = Hooks::default();
        for (i, h) in raw.hooks.iter().enumerate() {
            let key = format!("hooks[{i}]");
            match parse_hook(h) {
                Some(Hook::OnRequest) => hooks.on_request = true,
                Some(Hook::OnResponse) => hooks.on_response = true,
                Some(Hook::OnResponseChunk) => hooks.on_response_chunk = true,
                Some(Hook::OnLog) => hooks.on_log = true,
                Some(Hook::Admin) => hooks.admin = true,
                Some(Hook::Init) => {
                    return Err((key, "`init` is implied; list only the on-* hooks".into()));
                }
                None => {
                    return Err((
                        key,
                        format!(
                            "unknown hook '{h}' (expected on-request, on-response, \
                             on-response-chunk or on-log)"
                        ),
                    ));
                }
            }
        }
        let headers = if raw.headers.iter().any(|h| h == "*") {
            HeaderSelection::All
        } else {
            let mut names = Vec::new();
            for (i, h) in raw.headers.iter().enumerate() {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err((
                        format!("headers[{i}]"),
                        format!("'{h}' is not a header name"),
                    ));
                }
                names.push(h.to_ascii_lowercase());
            }
            HeaderSelection::Only(names)
        };
        let mut fetch = Vec::new();
        for (i, host) in raw.capabilities.fetch.iter().enumerate() {
            if host.is_empty() || host.contains(['/', ':', ' ']) {
                return Err((
                    format!("capabilities.fetch[{i}]"),
                    format!("'{host}' must be a bare host name such as api.example.com"),
                ));
            }
            fetch.push(host.to_ascii_lowercase());
        }
        let defaults = Limits::default();
        let l = &raw.limits;
        let positive = |key: &str, v: Option<u64>| -> Result<Option<u64>, (String, String)> {
            match v {
                Some(0) => Err((format!("limits.{key}"), "must be greater than 0".into())),
                other => Ok(other),
            }
        };
        let mb = positive("memory_mb", l.memory_mb)?;
        let limits = Limits {
            memory_bytes: mb.map_or(defaults.memory_bytes, |m| {
                usize::try_from(m.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
            }),
            deadline: positive("deadline_ms", l.deadline_ms)?
                .map_or(defaults.deadline, Duration::from_millis),
            log_deadline: positive("log_deadline_ms", l.log_deadline_ms)?
                .map_or(defaults.log_deadline, Duration::from_millis),
            chunk_deadline: positive("chunk_deadline_ms", l.chunk_deadline_ms)?
                .map_or(defaults.chunk_deadline, Duration::from_millis),
            init_deadline: positive("init_deadline_ms", l.init_deadline_ms)?
                .map_or(defaults.init_deadline, Duration::from_millis),
            // 0 is allowed: no scaling.
            deadline_per_mib: l
                .deadline_per_mib_ms
                .map_or(defaults.deadline_per_mib, Duration::from_millis),
            max_deadline: positive("max_deadline_ms", l.max_deadline_ms)?
                .map_or(defaults.max_deadline, Duration::from_millis),
            stack_bytes: positive("stack_kb", l.stack_kb)?.map_or(defaults.stack_bytes, |k| {
                usize::try_from(k.saturating_mul(1 << 10)).unwrap_or(usize::MAX)
            }),
            hold_bytes: match l.hold_bytes {
                Some(0) => {
                    return Err(("limits.hold_bytes".into(), "must be greater than 0".into()));
                }
                Some(n) => n,
                None => defaults.hold_bytes,
            },
        };
        let metadata = MetadataDeps::from_file(&raw.metadata)?;
        let config_schema = raw
            .config_schema
            .as_ref()
            .map(Schema::compile)
            .transpose()
            .map_err(|(path, reason)| (join_key("config_schema", &path), reason))?;
        Ok(Manifest {
            dir: dir.to_owned(),
            entry: dir.join(entry),
            name: raw.name,
            version: raw.version,
            description: raw.description,
            kind: raw.kind,
            hooks,
            headers,
            capabilities: Capabilities {
                kv: raw.capabilities.kv,
                body: raw.capabilities.body,
                fetch,
            },
            limits,
            failure: raw.failure,
            metadata,
            config_schema,
            serves_models: raw.serves_models,
        })
    }

    /// The model names an instance with `config` serves (see `serves_models`), in config
    /// order; empty when the manifest declares none or the key is absent.
    pub fn served_models(&self, config: Option<&serde_json::Value>) -> Vec<String> {
        let Some(value) = self
            .serves_models
            .as_deref()
            .and_then(|key| config?.get(key))
        else {
            return Vec::new();
        };
        match value {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            serde_json::Value::Array(items) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Checks an instance's `config` against the manifest's schema (no schema: anything).
    /// The error names the offending key (`config.phrases[2]`).
    pub fn check_config(&self, config: &serde_json::Value) -> Result<(), (String, String)> {
        match &self.config_schema {
            None => Ok(()),
            Some(schema) => schema
                .validate(config)
                .map_err(|(path, reason)| (join_key("config", &path), reason)),
        }
    }
}

fn join_key(root: &str, path: &str) -> String {
    if path.is_empty() {
        root.to_owned()
    } else if path.starts_with('[') {
        format!("{root}{path}")
    } else {
        format!("{root}.{path}")
    }
}

/// Checks a plugin or instance name: 1-64 of `a-z 0-9 - _`, starting with a letter.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' must be 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, PluginError> {
        Manifest::parse(Path::new("/plugins/p"), text)
    }

    #[test]
    fn full_manifest_parses() {
        let m = parse(
            r#"
            name = "guard"
            version = "0.1.0"
            kind = "lua"
            hooks = ["on-request", "on_response_chunk"]
            headers = ["X-Tenant"]
            failure = "open"
            [capabilities]
            kv = true
            fetch = ["API.example.com"]
            [limits]
            memory_mb = 8
            deadline_ms = 5
            [config_schema]
            type = "object"
            required = ["phrases"]
            properties.phrases = { type = "array", items = { type = "string" } }
            "#,
        )
        .unwrap();
        assert_eq!(m.entry, Path::new("/plugins/p/plugin.lua"));
        assert!(m.hooks.on_request && m.hooks.on_response_chunk && !m.hooks.on_log);
        assert_eq!(m.headers, HeaderSelection::Only(vec!["x-tenant".into()]));
        assert_eq!(m.capabilities.fetch, vec!["api.example.com"]);
        assert_eq!(m.limits.memory_bytes, 8 << 20);
        assert_eq!(m.limits.deadline, Duration::from_millis(5));
        assert_eq!(m.limits.chunk_deadline, Duration::from_millis(2));
        assert_eq!(m.failure, FailurePolicy::Open);
        assert!(
            m.check_config(&serde_json::json!({"phrases": ["a"]}))
                .is_ok()
        );
        let (key, _) = m
            .check_config(&serde_json::json!({"phrases": ["a", 3]}))
            .unwrap_err();
        assert_eq!(key, "config.phrases[1]");
        let (key, _) = m.check_config(&serde_json::json!({})).unwrap_err();
        assert_eq!(key, "config.phrases");
    }

    #[test]
    fn errors_name_file_and_key() {
        let err = parse("name = \"g\"\nversion = \"1\"\nkind = \"lua\"\ncolour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/plugins/p/plugin.toml"), "{err}");
        assert!(err.contains("colour"), "{err}");

        let err = parse("name = \"g\"\nversion = \"1\"\nkind = \"lua\"\n[limits]\nmemory_mb = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.memory_mb"), "{err}");

        let err = parse("name = \"g\"\nversion = \"1\"\nkind = \"lua\"\nhooks = [\"on-x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hooks[0]"), "{err}");

        let err = parse("name = \"Bad Name\"\nversion = \"1\"\nkind = \"lua\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(": name:"), "{err}");

        let err = parse("name = \"g\"\nversion = \"1\"\nkind = \"lua\"\nentry = \"../x.lua\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry"), "{err}");

        let err = parse("name = \"g\"\nversion = \"1\"\nkind = \"python\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kind"), "{err}");
    }

    #[test]
    fn deadlines_scale_with_input_up_to_the_cap() {
        let m = parse(
            "name = \"g\"\nversion = \"1\"\nkind = \"lua\"\n[limits]\ndeadline_ms = 25\n\
             deadline_per_mib_ms = 20\nmax_deadline_ms = 100\nlog_deadline_ms = 200\n",
        )
        .unwrap();
        let l = &m.limits;
        let ms = Duration::from_millis;
        assert_eq!(deadline_for(l, Hook::OnRequest, 0), ms(25));
        assert_eq!(
            deadline_for(l, Hook::OnRequest, 1024),
            ms(25) + Duration::from_micros(19)
        );
        assert_eq!(deadline_for(l, Hook::OnRequest, 2 << 20), ms(65));
        assert_eq!(deadline_for(l, Hook::OnResponse, 1 << 20), ms(45));
        assert_eq!(
            deadline_for(l, Hook::OnRequest, 100 << 20),
            ms(100),
            "capped"
        );
        assert_eq!(deadline_for(l, Hook::OnResponseChunk, 1 << 20), ms(22));
        // A hook deadline above the cap is kept, and not scaled past itself.
        assert_eq!(deadline_for(l, Hook::OnLog, 10 << 20), ms(200));
        assert_eq!(deadline_for(l, Hook::Init, 10 << 20), ms(1000));
        assert_eq!(deadline_for(l, Hook::OnRequest, usize::MAX), ms(100));

        let defaults = Limits::default();
        assert_eq!(defaults.deadline_per_mib, ms(20));
        assert_eq!(defaults.max_deadline, ms(250));
        let off = parse(
            "name = \"g\"\nversion = \"1\"\nkind = \"lua\"\n[limits]\ndeadline_per_mib_ms = 0\n",
        )
        .unwrap();
        assert_eq!(deadline_for(&off.limits, Hook::OnRequest, 50 << 20), ms(10));
        let err =
            parse("name = \"g\"\nversion = \"1\"\nkind = \"lua\"\n[limits]\nmax_deadline_ms = 0\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("limits.max_deadline_ms"), "{err}");
    }

    #[test]
    fn input_sizes_count_text_and_arguments() {
        let ev = StreamEvent::TextDelta(crate::plugin::contract::TextDelta {
            choice: 0,
            text: "abc".into(),
            last: false,
        });
        assert_eq!(event_bytes(&ev), 3);
        assert_eq!(response_bytes(&ResponseView::default()), 0);
    }

    #[test]
    fn star_selects_all_headers() {
        let m =
            parse("name = \"g\"\nversion = \"1\"\nkind = \"wasm\"\nheaders = [\"*\"]\n").unwrap();
        assert_eq!(m.headers, HeaderSelection::All);
        assert_eq!(m.entry, Path::new("/plugins/p/plugin.wasm"));
        assert!(m.headers.allows("anything"));
    }
}
