//! Where plugins' `on_log` hooks run: a few dedicated threads fed by a bounded queue.
//!
//! `on_log` runs after the response is on its way, so it must not hold a request worker.
//! It used to go to tokio's blocking pool, which starts a thread per concurrent call (up to
//! 512), and every such thread builds its own Lua VMs and WASM instances of each plugin with
//! a log hook (about 0.5 MiB per Lua VM): 1,000 streams ending together built hundreds of
//! them. A fixed set of threads keeps that memory bounded and its VMs warm.
//!
//! The queue holds [`QUEUE_CAPACITY`] requests. Should it ever be full (log hooks far slower
//! than the traffic), the entry runs on tokio's blocking pool as before rather than being
//! dropped: `on_log` settles rate-limit reservations and budgets, losing it is worse than a
//! thread more. At shutdown, [`LogWorkers::drain`] waits for the queue to empty.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::plugin::Chain;
use crate::plugin::contract::LogEntry;
use crate::request::Scratch;

/// Requests whose `on_log` may wait in the queue.
pub const QUEUE_CAPACITY: usize = 16_384;

/// Most threads running `on_log`.
const MAX_THREADS: usize = 4;

type Job = (Chain, LogEntry, Scratch);

/// The `on_log` threads (started on first use).
#[derive(Default)]
pub struct LogWorkers {
    queue: OnceLock<Option<SyncSender<Job>>>,
    /// Entries submitted and not finished yet.
    pending: Arc<AtomicUsize>,
}

impl std::fmt::Debug for LogWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWorkers")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl LogWorkers {
    fn start(&self) -> Option<SyncSender<Job>> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_THREADS);
        let (tx, rx) = sync_channel::<Job>(QUEUE_CAPACITY);
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..threads {
            let rx = rx.clone();
            let pending = self.pending.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("weir-on-log-{i}"))
                .spawn(move || run(&rx, &pending));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!(error = %e, "Cannot start an on_log thread."),
            }
        }
        (started > 0).then_some(tx)
    }

    /// Runs `chain.on_log(entry)` on an `on_log` thread (or, if the queue is full or the
    /// threads could not start, on tokio's blocking pool).
    pub fn submit(&self, chain: Chain, entry: LogEntry, scratch: Scratch) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let job = match self.queue.get_or_init(|| self.start()) {
            Some(tx) => match tx.try_send((chain, entry, scratch)) {
                Ok(()) => return,
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
            },
            None => (chain, entry, scratch),
        };
        let pending = self.pending.clone();
        let (chain, entry, mut scratch) = job;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || {
                    chain.on_log(&entry, &mut scratch);
                    pending.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(_) => {
                chain.on_log(&entry, &mut scratch);
                pending.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Entries submitted and not finished.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for every submitted entry to finish; returns how many did not.
    pub fn drain(&self, timeout: Duration) -> usize {
        let until = Instant::now() + timeout;
        loop {
            let left = self.pending();
            if left == 0 || Instant::now() >= until {
                return left;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn run(rx: &Mutex<Receiver<Job>>, pending: &AtomicUsize) {
    loop {
        // The lock is held only to take one job, never while running it.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((chain, entry, mut scratch)) = job else {
            return; // the gateway is gone
        };
        // A panicking hook must not take the thread (and the pending count) with it.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            chain.on_log(&entry, &mut scratch)
        }));
        if ran.is_err() {
            tracing::error!(request_id = %entry.request_id, "on_log panicked.");
        }
        pending.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;
    use std::path::Path;

    use super::*;
    use crate::plugin::breaker::BreakerConfigFile;
    use crate::plugin::chain::Instance;
    use crate::plugin::config::{Mode, PluginInstanceConfig};
    use crate::plugin::contract::{
        AdminRequest, AdminResponse, ChunkAction, Decision, HookCtx, HookError, Mutations,
        PluginRuntime, RequestView, ResponseDecision, ResponseMutations, ResponseView, StreamEvent,
    };
    use crate::plugin::host::PluginMetrics;
    use crate::plugin::manifest::Manifest;

    /// Records which thread ran each `on_log`.
    #[derive(Default)]
    struct Recorder {
        threads: Mutex<Vec<String>>,
    }

    impl PluginRuntime for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }
        fn on_request(
            &self,
            _: &mut HookCtx<'_>,
            _: &mut RequestView,
        ) -> Result<Decision, HookError> {
            Ok(Decision::Continue(Mutations::default()))
        }
        fn on_response(
            &self,
            _: &mut HookCtx<'_>,
            _: &ResponseView,
        ) -> Result<ResponseDecision, HookError> {
            Ok(ResponseDecision::Continue(ResponseMutations::default()))
        }
        fn on_chunk(&self, _: &mut HookCtx<'_>, _: &StreamEvent) -> Result<ChunkAction, HookError> {
            Ok(ChunkAction::Pass)
        }
        fn on_log(&self, _: &mut HookCtx<'_>, _: &LogEntry) -> Result<(), HookError> {
            std::thread::sleep(Duration::from_millis(1));
            let name = std::thread::current().name().unwrap_or("?").to_owned();
            self.threads.lock().unwrap().push(name);
            Ok(())
        }
        fn admin(&self, _: &mut HookCtx<'_>, _: &AdminRequest) -> Result<AdminResponse, HookError> {
            Err(HookError::Plugin("no admin hook".into()))
        }
    }

    fn chain(recorder: Arc<Recorder>) -> Chain {
        let manifest = Manifest::parse(
            Path::new("/fake"),
            "name = \"recorder\"\nversion = \"1\"\nkind = \"wasm\"\nhooks = [\"on-log\"]\n",
        )
        .unwrap();
        let cfg = PluginInstanceConfig {
            path: ".".into(),
            name: None,
            config: None,
            failure: None,
            mode: Mode::Enforce,
            deadline_ms: None,
            chunk_deadline_ms: None,
            breaker: BreakerConfigFile::default(),
        };
        let inst = Instance::new(
            "recorder".into(),
            Arc::new(manifest),
            recorder,
            &cfg,
            PluginMetrics::unregistered().unwrap(),
        );
        Chain::new(vec![Arc::new(inst)]).unwrap()
    }

    #[test]
    fn every_entry_runs_on_a_bounded_set_of_threads_and_drain_waits() {
        let recorder = Arc::new(Recorder::default());
        let chain = chain(recorder.clone());
        let workers = Arc::new(LogWorkers::default());
        // Many submitters at once: the old spawn_blocking grew a thread per concurrent call.
        let submitters: Vec<_> = (0..8)
            .map(|t| {
                let (workers, chain) = (workers.clone(), chain.clone());
                std::thread::spawn(move || {
                    for i in 0..50 {
                        workers.submit(
                            chain.clone(),
                            LogEntry {
                                request_id: format!("r{t}-{i}"),
                                ..LogEntry::default()
                            },
                            Scratch::default(),
                        );
                    }
                })
            })
            .collect();
        for s in submitters {
            s.join().unwrap();
        }
        assert_eq!(workers.drain(Duration::from_secs(30)), 0);
        let threads = recorder.threads.lock().unwrap();
        assert_eq!(threads.len(), 400, "every entry ran exactly once");
        let distinct: HashSet<&String> = threads.iter().collect();
        assert!(distinct.len() <= MAX_THREADS, "{distinct:?}");
        assert!(
            distinct.iter().all(|n| n.starts_with("weir-on-log-")),
            "{distinct:?}"
        );
    }
}
