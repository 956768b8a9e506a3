//! The request log: one [`Record`] per request, kept in the state store with a bounded size,
//! read by the admin API (`GET /admin/logs`, `weir logs --follow`).
//!
//! ```text
//!  request ends (pipeline's accounting) ──try_send──> bounded channel ──> writer thread
//!        never blocks: a full channel drops                                 │ seq += 1
//!        the record and counts it in                                        │ store.set(r/<seq>)
//!        weir_request_log_dropped_total                                     │ delete the oldest
//!                                                                           └─> followers (SSE)
//! ```
//!
//! A record never holds prompt or completion text: only names, numbers and decisions.
//! Records are numbered by a dense sequence (1, 2, 3, ...), so reading "everything after
//! N" is a run of point reads, and bounding the log to `max` records deletes exactly one old
//! record per new one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::state::{StateError, StateStore};

/// The state-store namespace of the request log.
pub const NAMESPACE: &str = "weir/request-log";

/// Records waiting for the writer; more are dropped (and counted), never waited for.
const CHANNEL_CAPACITY: usize = 8192;

/// Records the writer takes from the channel at once.
const BATCH: usize = 256;

/// Buffered records per follower before it is told it lagged.
const FOLLOW_CAPACITY: usize = 1024;

const LAST_KEY: &str = "meta/last";
const FLOOR_KEY: &str = "meta/floor";

/// What a plugin decided about one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginDecision {
    /// Plugin instance name.
    pub plugin: String,
    /// `continue`, `reply_<status>`, `failure_<kind>`; shadow instances prefix theirs with
    /// `shadow_` (the plugin contract's `plugin-decision`).
    pub decision: String,
}

/// One request, as the log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the log, assigned by the writer (0 until written).
    pub seq: u64,
    /// When the request ended, ms since the Unix epoch.
    pub time_ms: u64,
    /// The request id (`x-request-id`).
    pub request_id: String,
    /// Id of the API key that made the request (request metadata `key`), when an auth
    /// plugin set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Tenant (request metadata `tenant`), when a plugin set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The model the client asked for.
    pub model: String,
    /// The provider that answered, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The upstream model name, if a target answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_model: Option<String>,
    /// HTTP status returned to the client.
    pub status: u16,
    /// Prompt tokens reported by the upstream.
    pub tokens_in: u64,
    /// Completion tokens reported by the upstream.
    pub tokens_out: u64,
    /// Cost in US dollars from the `[prices]` table and the usage, when both are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Receipt to last byte, ms.
    pub latency_ms: f64,
    /// Receipt to first streamed content, ms (streams only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    /// Whether the answer was streamed.
    pub stream: bool,
    /// `served`, `failed` or `client_gone`.
    pub outcome: String,
    /// Short error reason (`upstream_timeout`, ...) when the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The config generation that served the request.
    pub generation: u64,
    /// Every upstream attempt in order (retries and fallbacks), the serving one last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<crate::pipeline::upstream::AttemptRecord>,
    /// Plugins' decisions, in chain order.
    #[serde(default, alias = "plugins", skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<PluginDecision>,
}

/// Per-request fields the pipeline fills in as it learns them (everything a [`Record`]
/// needs that the accounting does not already track).
#[derive(Debug, Clone, Default)]
pub struct Details {
    /// The request id.
    pub request_id: String,
    /// The upstream model that answered.
    pub target_model: Option<String>,
    /// The generation of the snapshot serving the request.
    pub generation: u64,
}

/// The request path's end of the log: a non-blocking, possibly absent, sender.
///
/// A [`crate::pipeline::Gateway`] owns one; it does nothing until [`Sink::install`] is called
/// (the request log is off in tests that build a gateway by hand, and when
/// `admin.request_log_max_records = 0`).
#[derive(Default)]
pub struct Sink {
    inner: OnceLock<(SyncSender<Record>, IntCounter)>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("installed", &self.inner.get().is_some())
            .finish()
    }
}

impl Sink {
    /// Connects the sink to a running [`RequestLog`]. A second call is ignored.
    pub fn install(&self, log: &RequestLog, tx: SyncSender<Record>) {
        let _ = self.inner.set((tx, log.dropped.clone()));
    }

    /// Whether records go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.inner.get().is_some()
    }

    /// Hands a record to the writer without ever blocking: when the channel is full the
    /// record is dropped and counted. `make` runs only when the log is on.
    pub fn push(&self, make: impl FnOnce() -> Record) {
        let Some((tx, dropped)) = self.inner.get() else {
            return;
        };
        match tx.try_send(make()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => dropped.inc(),
            // The writer is gone (shutting down): nothing to count.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The stored log: written by a background thread, read by the admin API.
pub struct RequestLog {
    store: Arc<dyn StateStore>,
    max: u64,
    /// Highest sequence number written (0 = empty).
    last: AtomicU64,
    /// Lowest sequence number still kept.
    floor: AtomicU64,
    live: broadcast::Sender<Arc<Record>>,
    dropped: IntCounter,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("max", &self.max)
            .field("last", &self.last.load(Ordering::Relaxed))
            .field("floor", &self.floor.load(Ordering::Relaxed))
            .finish()
    }
}

fn record_key(seq: u64) -> String {
    format!("r/{seq:020}")
}

fn read_u64(store: &dyn StateStore, key: &str) -> Result<Option<u64>, StateError> {
    Ok(store
        .get(NAMESPACE, key)?
        .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok())))
}

impl RequestLog {
    /// Opens the log in `store`, keeping at most `max` records, registers
    /// `weir_request_log_dropped_total` in `registry` and starts the writer thread. Returns
    /// the log and the sender to [`Sink::install`].
    pub fn start(
        store: Arc<dyn StateStore>,
        max: u64,
        registry: &Registry,
    ) -> Result<(Arc<RequestLog>, SyncSender<Record>), RequestLogError> {
        let dropped = IntCounter::new(
            "weir_request_log_dropped_total",
            "Request-log records dropped because the writer fell behind.",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        let last = read_u64(&*store, LAST_KEY)?.unwrap_or(0);
        let floor = read_u64(&*store, FLOOR_KEY)?.unwrap_or(1).max(1);
        let (live, _) = broadcast::channel(FOLLOW_CAPACITY);
        let log = Arc::new(RequestLog {
            store,
            max: max.max(1),
            last: AtomicU64::new(last),
            floor: AtomicU64::new(floor),
            live,
            dropped,
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_CAPACITY);
        let writer = log.clone();
        std::thread::Builder::new()
            .name("weir-request-log".to_owned())
            .spawn(move || writer.run(rx))
            .map_err(RequestLogError::Thread)?;
        Ok((log, tx))
    }

    /// The writer loop: ends when every sender is gone.
    fn run(&self, rx: Receiver<Record>) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.write(&mut batch) {
                tracing::warn!(error = %e, lost = batch.len(), "Request log write failed.");
            }
            batch.clear();
        }
    }

    fn write(&self, batch: &mut [Record]) -> Result<(), StateError> {
        let mut last = self.last.load(Ordering::Acquire);
        for record in batch.iter_mut() {
            last += 1;
            record.seq = last;
            let json =
                serde_json::to_vec(record).map_err(|e| StateError::Backend(e.to_string()))?;
            self.store.set(NAMESPACE, &record_key(last), &json, None)?;
        }
        self.store
            .set(NAMESPACE, LAST_KEY, last.to_string().as_bytes(), None)?;
        self.last.store(last, Ordering::Release);
        // Keep at most `max`: delete from the bottom.
        let mut floor = self.floor.load(Ordering::Acquire);
        let keep_from = last.saturating_sub(self.max) + 1;
        if floor < keep_from {
            while floor < keep_from {
                self.store.delete(NAMESPACE, &record_key(floor))?;
                floor += 1;
                self.floor.store(floor, Ordering::Release);
            }
            self.store
                .set(NAMESPACE, FLOOR_KEY, floor.to_string().as_bytes(), None)?;
        }
        for record in batch.iter() {
            // No followers is the usual case; that is not an error.
            let _ = self.live.send(Arc::new(record.clone()));
        }
        Ok(())
    }

    /// The highest sequence number written so far (0 when the log is empty).
    pub fn last_seq(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    /// Records dropped since start because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Up to `limit` records: the ones after `after`, oldest first, or the newest `limit`
    /// when `after` is `None`. Blocking (reads the store): call it off the async workers.
    pub fn query(&self, after: Option<u64>, limit: usize) -> Result<Vec<Record>, StateError> {
        let limit = u64::try_from(limit).unwrap_or(u64::MAX);
        let last = self.last_seq();
        let floor = self.floor.load(Ordering::Acquire);
        if limit == 0 || last == 0 {
            return Ok(Vec::new());
        }
        let from = match after {
            Some(after) => after.saturating_add(1),
            None => last.saturating_sub(limit) + 1,
        }
        .max(floor);
        let to = from.saturating_add(limit - 1).min(last);
        let mut out = Vec::new();
        for seq in from..=to {
            // A record deleted by the trimmer between our reads is simply skipped.
            if let Some(raw) = self.store.get(NAMESPACE, &record_key(seq))?
                && let Ok(record) = serde_json::from_slice::<Record>(&raw)
            {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// New records as they are written (for `follow`). A slow reader sees
    /// [`broadcast::error::RecvError::Lagged`] and may catch up with [`RequestLog::query`].
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.live.subscribe()
    }
}

/// Error starting the request log.
#[derive(Debug, thiserror::Error)]
pub enum RequestLogError {
    /// Reading its position from the state store failed.
    #[error("request log: {0}")]
    State(#[from] StateError),
    /// Registering its metric failed.
    #[error("request log metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The writer thread could not start.
    #[error("request log: cannot start the writer thread: {0}")]
    Thread(std::io::Error),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;
    use std::time::Duration;

    fn record(model: &str) -> Record {
        Record {
            seq: 0,
            time_ms: now_ms(),
            request_id: "r".into(),
            key: None,
            tenant: None,
            model: model.into(),
            provider: None,
            target_model: None,
            status: 200,
            tokens_in: 1,
            tokens_out: 2,
            cost_usd: None,
            latency_ms: 1.0,
            ttft_ms: None,
            stream: false,
            outcome: "served".into(),
            error: None,
            generation: 1,
            attempts: Vec::new(),
            decisions: Vec::new(),
        }
    }

    fn wait_for(log: &RequestLog, seq: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while log.last_seq() < seq {
            assert!(
                std::time::Instant::now() < deadline,
                "writer stalled at {}",
                log.last_seq()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn bounded_and_queryable_and_survives_restart() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
        let registry = Registry::new();
        let (log, tx) = RequestLog::start(store.clone(), 10, &registry).unwrap();
        let sink = Sink::default();
        sink.install(&log, tx);
        for i in 0..25 {
            sink.push(|| record(&format!("m{i}")));
        }
        wait_for(&log, 25);
        let newest = log.query(None, 3).unwrap();
        assert_eq!(
            newest.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![23, 24, 25]
        );
        assert_eq!(newest[2].model, "m24");
        // Only the last 10 are kept.
        let all = log.query(Some(0), 100).unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!(all[0].seq, 16);
        assert_eq!(
            log.query(Some(20), 2)
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![21, 22]
        );
        assert!(log.query(Some(25), 10).unwrap().is_empty());
        // A new log on the same store continues the sequence.
        let (log2, tx2) = RequestLog::start(store, 10, &Registry::new()).unwrap();
        assert_eq!(log2.last_seq(), 25);
        tx2.send(record("after")).unwrap();
        wait_for(&log2, 26);
        assert_eq!(log2.query(None, 1).unwrap()[0].model, "after");
    }

    #[test]
    fn record_fields_round_trip_and_old_records_still_read() {
        let mut r = record("m");
        r.key = Some("key_1".into());
        r.tenant = Some("acme".into());
        r.cost_usd = Some(0.0000123);
        r.attempts = vec![
            crate::pipeline::upstream::AttemptRecord {
                provider: "primary".into(),
                target_model: "p-model".into(),
                status: 500,
                latency_ms: 3,
                error: Some("status".into()),
            },
            crate::pipeline::upstream::AttemptRecord {
                provider: "secondary".into(),
                target_model: "s-model".into(),
                status: 200,
                latency_ms: 5,
                error: None,
            },
        ];
        r.decisions = vec![PluginDecision {
            plugin: "auth".into(),
            decision: "continue".into(),
        }];
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["key"], "key_1");
        assert_eq!(json["tenant"], "acme");
        assert_eq!(json["cost_usd"], 0.0000123);
        assert_eq!(json["attempts"][0]["status"], 500);
        assert_eq!(json["attempts"][0]["error"], "status");
        assert!(json["attempts"][1].get("error").is_none());
        assert_eq!(json["decisions"][0]["plugin"], "auth");
        assert_eq!(serde_json::from_value::<Record>(json).unwrap(), r);
        // Records written before `attempts` and `decisions` existed (decisions were `plugins`).
        let mut old = serde_json::to_value(record("m")).unwrap();
        old["plugins"] = serde_json::json!([{"plugin": "cache", "decision": "skipped"}]);
        let read: Record = serde_json::from_value(old).unwrap();
        assert!(read.attempts.is_empty());
        assert_eq!(read.decisions[0].plugin, "cache");
        // Absent fields stay absent.
        let plain = serde_json::to_value(record("m")).unwrap();
        for field in ["key", "tenant", "cost_usd", "attempts", "decisions"] {
            assert!(plain.get(field).is_none(), "{field} in {plain}");
        }
    }

    #[test]
    fn uninstalled_sink_builds_nothing() {
        let sink = Sink::default();
        assert!(!sink.is_enabled());
        sink.push(|| panic!("must not build a record when the log is off"));
    }
}
