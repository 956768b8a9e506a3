//! Per-instance store data: the memory limiter, the minimal WASI context, and the
//! `weir:plugin/host` imports backed by the plugin's [`HostApi`].

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, Resource, ResourceTable, ResourceType};
use wasmtime::{Engine, ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::RequestHandle;
use super::bindings::weir::plugin::{host, views};
use crate::plugin::contract::{
    Dialect, Endpoint, FetchRequest, HostApi, LogLevel, MessageView, Pairs, RequestView,
};

/// Data of one instance's `Store`.
pub(crate) struct StoreState {
    limits: StoreLimits,
    /// Set when a memory grow was refused, so the trap that follows is reported as OOM.
    pub(crate) out_of_memory: bool,
    wasi: WasiCtx,
    table: ResourceTable,
    host: Arc<dyn HostApi>,
    /// The request's metadata bag, moved in for the duration of one call.
    pub(crate) metadata: BTreeMap<String, String>,
    /// The calling plugin's request scratch, moved in for one call.
    pub(crate) scratch: BTreeMap<String, Vec<u8>>,
    /// The request under `on-request`, moved in for the call (read by the `request`
    /// resource's methods).
    pub(crate) request: RequestView,
}

impl StoreState {
    pub(crate) fn new(host: Arc<dyn HostApi>, memory_bytes: usize) -> Self {
        // No preopened directories, no environment, no arguments, no network: the WASI
        // context only exists so that `wasi:random` (used by std's HashMap) works.
        let wasi = WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .instances(16)
                .tables(16)
                .memories(4)
                .build(),
            out_of_memory: false,
            wasi,
            table: ResourceTable::new(),
            host,
            metadata: BTreeMap::new(),
            scratch: BTreeMap::new(),
            request: RequestView::default(),
        }
    }
}

impl ResourceLimiter for StoreState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if !allowed {
            self.out_of_memory = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Adds the host API and the few side-effect-free WASI interfaces (random, an empty
/// environment, exit) to `linker`. Everything else a component imports (filesystem,
/// sockets, stdio, clocks) is stubbed per component to trap when called, see
/// [`super::WasmPlugin::load`].
pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    use wasmtime_wasi::cli::WasiCli;
    use wasmtime_wasi::cli::WasiCliView;
    use wasmtime_wasi::p2::bindings::{cli, random};
    use wasmtime_wasi::random::WasiRandom;

    host::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    views::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    random::random::add_to_linker::<StoreState, WasiRandom>(linker, |s| s.wasi.random())?;
    random::insecure::add_to_linker::<StoreState, WasiRandom>(linker, |s| s.wasi.random())?;
    random::insecure_seed::add_to_linker::<StoreState, WasiRandom>(linker, |s| s.wasi.random())?;
    cli::environment::add_to_linker::<StoreState, WasiCli>(linker, StoreState::cli)?;
    cli::exit::add_to_linker::<StoreState, WasiCli>(linker, StoreState::cli)?;
    Ok(())
}

impl host::Host for StoreState {
    fn kv_get(&mut self, key: String) -> Result<Option<Vec<u8>>, String> {
        self.host.kv_get(&key)
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), String> {
        self.host.kv_set(&key, &value, ttl_ms)
    }

    fn kv_incr(&mut self, key: String, delta: i64, ttl_ms: Option<u64>) -> Result<i64, String> {
        self.host.kv_incr(&key, delta, ttl_ms)
    }

    fn kv_cas(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, String> {
        self.host
            .kv_cas(&key, expected.as_deref(), value.as_deref(), ttl_ms)
    }

    fn kv_delete(&mut self, key: String) -> Result<bool, String> {
        self.host.kv_delete(&key)
    }

    fn kv_scan(&mut self, prefix: String, limit: u32) -> Result<Vec<(String, Vec<u8>)>, String> {
        self.host
            .kv_scan(&prefix, usize::try_from(limit).unwrap_or(usize::MAX))
    }

    fn log(&mut self, level: host::Level, message: String) {
        let level = match level {
            host::Level::Trace => LogLevel::Trace,
            host::Level::Debug => LogLevel::Debug,
            host::Level::Info => LogLevel::Info,
            host::Level::Warn => LogLevel::Warn,
            host::Level::Error => LogLevel::Error,
        };
        self.host.log(level, &message);
    }

    fn counter_add(&mut self, name: String, value: u64) {
        self.host.counter_add(&name, value);
    }

    fn histogram_observe(&mut self, name: String, value: f64) {
        self.host.histogram_observe(&name, value);
    }

    fn now_ms(&mut self) -> u64 {
        self.host.now_ms()
    }

    fn ctx_get(&mut self, key: String) -> Option<String> {
        self.metadata.get(&key).cloned()
    }

    fn ctx_set(&mut self, key: String, value: String) {
        self.metadata.insert(key, value);
    }

    fn count_tokens(&mut self, text: String) -> u32 {
        self.host.count_tokens(&text)
    }

    fn scratch_get(&mut self, key: String) -> Option<Vec<u8>> {
        self.scratch.get(&key).cloned()
    }

    fn scratch_set(&mut self, key: String, value: Option<Vec<u8>>) {
        match value {
            Some(v) => {
                self.scratch.insert(key, v);
            }
            None => {
                self.scratch.remove(&key);
            }
        }
    }

    fn limit_reserve(
        &mut self,
        key: String,
        limit: u64,
        window_ms: u64,
        amount: u64,
    ) -> Result<host::LimitResult, String> {
        let r = self.host.limit_reserve(&key, limit, window_ms, amount)?;
        Ok(host::LimitResult {
            allowed: r.allowed,
            limit: r.limit,
            remaining: r.remaining,
            retry_after_ms: r.retry_after_ms,
            reset_ms: r.reset_ms,
        })
    }

    fn limit_settle(
        &mut self,
        key: String,
        limit: u64,
        window_ms: u64,
        reserved: u64,
        used: u64,
    ) -> Result<(), String> {
        self.host
            .limit_settle(&key, limit, window_ms, reserved, used)
    }

    fn ledger_reserve(
        &mut self,
        account: String,
        limit: f64,
        amount: f64,
        ttl_ms: Option<u64>,
    ) -> Result<host::LedgerResult, String> {
        let r = self.host.ledger_reserve(&account, limit, amount, ttl_ms)?;
        Ok(host::LedgerResult {
            allowed: r.allowed,
            balance: balance(r.balance),
        })
    }

    fn ledger_settle(
        &mut self,
        account: String,
        reserved: f64,
        cost: f64,
        ttl_ms: Option<u64>,
    ) -> Result<host::LedgerBalance, String> {
        self.host
            .ledger_settle(&account, reserved, cost, ttl_ms)
            .map(balance)
    }

    fn ledger_release(
        &mut self,
        account: String,
        reserved: f64,
    ) -> Result<host::LedgerBalance, String> {
        self.host.ledger_release(&account, reserved).map(balance)
    }

    fn ledger_read(&mut self, account: String) -> Result<host::LedgerBalance, String> {
        self.host.ledger_balance(&account).map(balance)
    }

    fn target_stats(&mut self, provider: String, model: String) -> Option<host::TargetSnapshot> {
        self.host
            .target_stats(&provider, &model)
            .map(|t| host::TargetSnapshot {
                latency_ewma_ms: t.latency_ewma_ms,
                error_rate: t.error_rate,
                in_flight: t.in_flight,
                attempts: t.attempts,
            })
    }

    fn price(&mut self, model: String) -> Option<host::ModelPrice> {
        self.host.price(&model).map(|p| host::ModelPrice {
            input: p.input,
            output: p.output,
            cached_input: p.cached_input,
            cache_write: p.cache_write,
        })
    }

    fn random_bytes(&mut self, len: u32) -> Vec<u8> {
        // A refused length (over 4096) yields nothing rather than a trap.
        self.host
            .random_bytes(usize::try_from(len).unwrap_or(usize::MAX))
            .unwrap_or_default()
    }

    fn sha256(&mut self, data: Vec<u8>) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(&data).to_vec()
    }

    fn http_fetch(&mut self, request: host::FetchRequest) -> Result<host::FetchResponse, String> {
        let request = FetchRequest {
            method: request.method,
            url: request.url,
            headers: request.headers,
            body: request.body,
            timeout_ms: request.timeout_ms,
        };
        self.host
            .http_fetch(&request)
            .map(|response| host::FetchResponse {
                status: response.status,
                headers: response.headers,
                body: response.body,
            })
    }
}

fn balance(b: crate::plugin::contract::LedgerBalance) -> host::LedgerBalance {
    host::LedgerBalance {
        spent: b.spent,
        reserved: b.reserved,
    }
}

/// `weir:plugin/views`: nothing but the `request` resource.
impl views::Host for StoreState {}

/// The `request` resource: each method reads the view moved into the store for the call.
impl views::HostRequest for StoreState {
    fn id(&mut self, _: Resource<RequestHandle>) -> String {
        self.request.request_id.clone()
    }

    fn dialect(&mut self, _: Resource<RequestHandle>) -> Dialect {
        self.request.dialect
    }

    fn endpoint(&mut self, _: Resource<RequestHandle>) -> Endpoint {
        self.request.endpoint()
    }

    fn model(&mut self, _: Resource<RequestHandle>) -> String {
        self.request.model().to_owned()
    }

    fn stream(&mut self, _: Resource<RequestHandle>) -> bool {
        self.request.stream()
    }

    fn header(&mut self, _: Resource<RequestHandle>, name: String) -> Option<String> {
        self.request.header(&name)
    }

    fn headers(&mut self, _: Resource<RequestHandle>) -> Pairs {
        self.request.headers()
    }

    fn message_count(&mut self, _: Resource<RequestHandle>) -> u32 {
        self.request.message_count()
    }

    fn message(&mut self, _: Resource<RequestHandle>, index: u32) -> Option<MessageView> {
        self.request.message(index)
    }

    fn messages(&mut self, _: Resource<RequestHandle>) -> Vec<MessageView> {
        self.request.messages()
    }

    fn max_tokens(&mut self, _: Resource<RequestHandle>) -> Option<u32> {
        self.request.max_tokens()
    }

    fn body(&mut self, _: Resource<RequestHandle>) -> Option<String> {
        self.request.body_json()
    }

    fn drop(&mut self, _: Resource<RequestHandle>) -> wasmtime::Result<()> {
        // Handles are only ever lent for one call; nothing is stored per handle.
        Ok(())
    }
}

/// Interfaces a plugin may import, by name without version: the host API and the
/// side-effect-free WASI pieces linked by [`add_to_linker`].
const GRANTED: &[&str] = &[
    "weir:plugin/host",
    "weir:plugin/types",
    "weir:plugin/views",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/environment",
    "wasi:cli/exit",
];

/// Defines every other import of `component` (filesystem, sockets, stdio, clocks...) as
/// a function that traps when called, so components built with std instantiate but get
/// nothing. (wasmtime's `define_unknown_imports_as_traps` is not used because it matches
/// exact versions only and would shadow the granted interfaces a guest imports at
/// another 0.2.x version.)
pub(crate) fn stub_denied_imports(
    linker: &mut Linker<StoreState>,
    component: &Component,
    engine: &Engine,
) -> wasmtime::Result<()> {
    for (name, import) in component.component_type().imports(engine) {
        let unversioned = name.split('@').next().unwrap_or(name);
        if GRANTED.contains(&unversioned) {
            continue;
        }
        match import.ty {
            ComponentItem::ComponentInstance(instance) => {
                let mut stub = linker.instance(name)?;
                for (item, export) in instance.exports(engine) {
                    match export.ty {
                        ComponentItem::ComponentFunc(_) => {
                            let what = format!("{unversioned}#{item}");
                            stub.func_new(item, move |_, _, _, _| {
                                Err(wasmtime::format_err!(
                                    "{what} is not available to plugins (sandbox)"
                                ))
                            })?;
                        }
                        ComponentItem::Resource(_) => {
                            stub.resource(item, ResourceType::host::<()>(), |_, _| Ok(()))?;
                        }
                        _ => {}
                    }
                }
            }
            ComponentItem::ComponentFunc(_) => {
                let what = name.to_owned();
                linker.root().func_new(name, move |_, _, _, _| {
                    Err(wasmtime::format_err!(
                        "{what} is not available to plugins (sandbox)"
                    ))
                })?;
            }
            _ => {}
        }
    }
    Ok(())
}
