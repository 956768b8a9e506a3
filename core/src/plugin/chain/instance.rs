//! One loaded plugin instance: its runtime, failure policy, mode and circuit breaker.

use std::path::Path;
use std::sync::Arc;

use super::PluginFailure;
use crate::plugin::PluginError;
use crate::plugin::breaker::{Admission, Breaker, BreakerConfig};
use crate::plugin::config::{Mode, PluginInstanceConfig};
use crate::plugin::contract::{
    Access, AdminRequest, AdminResponse, Hook, HookCtx, HookError, PluginRuntime,
};
use crate::plugin::host::{GatewayHost, HostLookups, PluginMetrics};
use crate::plugin::lua::LuaPlugin;
use crate::plugin::manifest::deadline_for;
use crate::plugin::manifest::{FailurePolicy, Manifest, PluginKind, validate_name};
use crate::plugin::wasm::{WasmEngine, WasmLimits, WasmPlugin};
use crate::state::StateStore;

/// What [`Instance::guard`] came to when it did not stop the request.
#[derive(Debug)]
pub(super) enum Guarded<T> {
    /// The hook ran and its answer was applied.
    Done(T),
    /// The hook failed (or its breaker refused it) and the instance fails open (or is in
    /// shadow mode): the request goes on without it. The failure kind.
    Skipped(&'static str),
}

/// One loaded plugin instance.
pub struct Instance {
    pub(super) name: String,
    pub(super) kind: PluginKind,
    pub(super) manifest: Arc<Manifest>,
    pub(super) runtime: Arc<dyn PluginRuntime>,
    pub(super) failure: FailurePolicy,
    pub(super) mode: Mode,
    pub(super) breaker: Breaker,
    pub(super) metrics: PluginMetrics,
    /// What its request hook may read (from the manifest), shared with every view.
    pub(super) access: Arc<Access>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("failure", &self.failure)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Loads the instance described by `cfg`; `base` is the config file's folder and `key`
    /// its position in the config (`plugins[0]`), for error messages.
    pub fn load(
        base: &Path,
        cfg: &PluginInstanceConfig,
        key: &str,
        state: Arc<dyn StateStore>,
        metrics: &PluginMetrics,
        lookups: Arc<HostLookups>,
    ) -> Result<Arc<Instance>, PluginError> {
        let mut manifest = Manifest::load(&base.join(&cfg.path))?;
        manifest.limits =
            cfg.limits(manifest.limits)
                .map_err(|(k, reason)| PluginError::Config {
                    key: format!("{key}.{k}"),
                    reason,
                })?;
        let name = cfg.name.clone().unwrap_or_else(|| manifest.name.clone());
        validate_name(&name).map_err(|reason| PluginError::Config {
            key: format!("{key}.name"),
            reason,
        })?;
        let config = cfg
            .config
            .clone()
            .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new()));
        manifest
            .check_config(&config)
            .map_err(|(path, reason)| PluginError::Config {
                key: format!("{key}.{path}"),
                reason,
            })?;
        let host = Arc::new(GatewayHost::new(
            &name,
            state,
            manifest.capabilities.clone(),
            metrics.clone(),
            lookups,
        ));
        let runtime = load_runtime(&manifest, &name, config, host)?;
        Ok(Arc::new(Instance::new(
            name,
            Arc::new(manifest),
            runtime,
            cfg,
            metrics.clone(),
        )))
    }

    /// An instance around an already loaded runtime (tests, the harness).
    pub fn new(
        name: String,
        manifest: Arc<Manifest>,
        runtime: Arc<dyn PluginRuntime>,
        cfg: &PluginInstanceConfig,
        metrics: PluginMetrics,
    ) -> Instance {
        Instance {
            access: Arc::new(Access {
                headers: manifest.headers.clone(),
                body: manifest.capabilities.body,
            }),
            kind: manifest.kind,
            failure: cfg.failure.unwrap_or(manifest.failure),
            mode: cfg.mode,
            breaker: Breaker::new(BreakerConfig::from(&cfg.breaker)),
            name,
            manifest,
            runtime,
            metrics,
        }
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Runs one request-path hook call with everything around it, in one place: the
    /// breaker's admission, the call (`run`, which also applies the answer: a malformed
    /// answer is a failure like a trap), the outcome recorded in the breaker and metrics,
    /// and on failure the instance's policy: `Err` stops the request (fail-closed,
    /// enforced), [`Guarded::Skipped`] goes on without the plugin.
    ///
    /// `caller` (the request's metadata `key`, see [`caller_of`](crate::plugin::breaker::caller_of))
    /// is who the breaker counts the outcome against, so one caller's failures cannot open
    /// the breaker for everyone.
    pub(super) fn guard<T>(
        &self,
        hook: Hook,
        caller: Option<&str>,
        run: impl FnOnce() -> Result<T, HookError>,
    ) -> Result<Guarded<T>, PluginFailure> {
        let Some(admission) = self.admit(caller) else {
            self.on_failure("circuit_open")?;
            return Ok(Guarded::Skipped("circuit_open"));
        };
        crate::plugin::host::take_state_unavailable();
        crate::state::take_blocked();
        match run() {
            Ok(value) => {
                self.record(admission, Ok(()), caller);
                Ok(Guarded::Done(value))
            }
            Err(e) => {
                tracing::debug!(plugin = %self.name, hook = hook.as_str(), error = %e, "Plugin hook failed.");
                // A hook that failed after the state store did names the store, not itself,
                // and is not held against the plugin's breaker: the store has its own
                // bounded timeouts and failure modes, and a healthy plugin must serve again
                // the moment the store is back.
                let kind = if crate::plugin::host::take_state_unavailable() {
                    self.count_failure("state_unavailable");
                    self.breaker
                        .record(admission, true, caller)
                        .log(&self.name, caller);
                    "state_unavailable"
                } else {
                    self.record(admission, Err(&e), caller);
                    e.kind()
                };
                self.on_failure(kind)?;
                Ok(Guarded::Skipped(kind))
            }
        }
    }

    /// Runs an `on-log` call: failures are counted (and may open the breaker), a success
    /// never closes it, so a plugin failing its request hooks is not healed by its logs.
    ///
    /// `on-log` runs whatever the breaker's state (it settles what `on-request` reserved,
    /// off the request path).
    pub(super) fn run_log(
        &self,
        caller: Option<&str>,
        run: impl FnOnce() -> Result<(), HookError>,
    ) {
        crate::state::take_blocked();
        crate::plugin::host::take_state_unavailable();
        let result = run();
        if result.is_err() && crate::plugin::host::take_state_unavailable() {
            // As in `guard`: the store failed, not the plugin; its breaker is left alone.
            self.count_failure("state_unavailable");
            return;
        }
        self.record_log(Admission::Allow, result.as_ref().map(|_| ()), caller);
    }

    /// The deadline of a `hook` call given `input_bytes` of text: the manifest's (or the
    /// instance's `deadline_ms`), grown by `deadline_per_mib_ms` per MiB up to
    /// `max_deadline_ms` (docs/plugins.md, "Failures").
    pub(super) fn deadline(&self, hook: Hook, input_bytes: usize) -> Option<std::time::Duration> {
        Some(deadline_for(&self.manifest.limits, hook, input_bytes))
    }

    /// Serves a call to `/admin/plugins/<instance>/...` (hook `admin`). Not counted in the
    /// breaker: an operator's call must not open or close it.
    pub fn admin(&self, req: &AdminRequest) -> Result<AdminResponse, HookError> {
        if !self.manifest.hooks.admin {
            return Err(HookError::Plugin(format!(
                "plugin '{}' has no admin endpoint (hook `admin` is not in its plugin.toml)",
                self.name
            )));
        }
        let mut metadata = std::collections::BTreeMap::new();
        let mut scratch = std::collections::BTreeMap::new();
        let mut ctx = HookCtx {
            request_id: "admin",
            metadata: &mut metadata,
            scratch: &mut scratch,
            deadline: None,
        };
        self.runtime.admin(&mut ctx, req)
    }

    /// Admission by the breaker; a refusal is counted as a failure.
    pub(super) fn admit(&self, caller: Option<&str>) -> Option<Admission> {
        match self.breaker.admit(caller) {
            Admission::Reject => {
                self.count_failure("circuit_open");
                None
            }
            a => Some(a),
        }
    }

    /// Records a call's outcome in the breaker (and metrics and logs on failure).
    pub(super) fn record(
        &self,
        admission: Admission,
        result: Result<(), &HookError>,
        caller: Option<&str>,
    ) {
        self.report(result);
        self.breaker
            .record(admission, result.is_ok(), caller)
            .log(&self.name, caller);
    }

    /// [`Instance::record`] for `on_log`: a success there never closes or resets the breaker.
    fn record_log(
        &self,
        admission: Admission,
        result: Result<(), &HookError>,
        caller: Option<&str>,
    ) {
        self.report(result);
        self.breaker
            .record_log(admission, result.is_ok(), caller)
            .log(&self.name, caller);
    }

    fn report(&self, result: Result<(), &HookError>) {
        if let Err(e) = result {
            self.count_failure(e.kind());
            tracing::warn!(plugin = %self.name, kind = e.kind(), error = %e, "Plugin hook failed.");
        }
    }

    pub(super) fn count_failure(&self, kind: &str) {
        self.metrics
            .failures
            .with_label_values(&[self.name.as_str(), kind])
            .inc();
    }

    /// The policy for a failure of `kind`: `Err` stops the request.
    /// Counts a shadow-mode decision (never enforced).
    pub(super) fn shadow(&self, decision: &str) {
        self.metrics
            .shadow
            .with_label_values(&[self.name.as_str(), decision])
            .inc();
    }

    pub(super) fn on_failure(&self, kind: &'static str) -> Result<(), PluginFailure> {
        if self.mode == Mode::Shadow {
            self.shadow("failure");
        }
        match (self.mode, self.failure) {
            (Mode::Enforce, FailurePolicy::Closed) => Err(PluginFailure {
                plugin: self.name.clone(),
                kind,
            }),
            _ => Ok(()),
        }
    }
}

fn load_runtime(
    manifest: &Manifest,
    name: &str,
    config: serde_json::Value,
    host: Arc<GatewayHost>,
) -> Result<Arc<dyn PluginRuntime>, PluginError> {
    match manifest.kind {
        PluginKind::Lua => Ok(Arc::new(LuaPlugin::load(manifest, name, config, host)?)),
        PluginKind::Wasm => {
            let load_err = |reason: String| PluginError::Load {
                plugin: name.to_owned(),
                reason,
            };
            let engine = WasmEngine::global().map_err(|e| load_err(e.to_string()))?;
            let limits = WasmLimits {
                memory_bytes: manifest.limits.memory_bytes,
                request_deadline: manifest.limits.deadline,
                chunk_deadline: manifest.limits.chunk_deadline,
                log_deadline: manifest.limits.log_deadline,
                init_deadline: manifest.limits.init_deadline,
                deadline_per_mib: manifest.limits.deadline_per_mib,
                max_deadline: manifest.limits.max_deadline,
                ..WasmLimits::default()
            };
            let plugin = WasmPlugin::load_file(
                &engine,
                name,
                &manifest.entry,
                &config.to_string(),
                limits,
                host,
            )
            .map_err(|e| load_err(e.to_string()))?;
            Ok(Arc::new(plugin))
        }
    }
}
