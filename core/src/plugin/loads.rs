//! The plugin loads of one snapshot, so that what a generation keeps warm is given back when
//! it stops serving, and built again before it serves again (a rollback).
//!
//! A loaded plugin keeps things ready so that a call never waits for them: a Lua plugin its
//! spare VMs and the VMs in worker threads' pools, a WASM plugin its idle instances. For the
//! serving generation that is the point. For the generations kept for rollback (the last
//! `[reload] keep_generations`), it is memory and nothing else: about 0.6 MiB per Lua VM, and
//! each generation of a chain holds several. So the reloader *parks* a generation when it stops
//! serving ([`Loads::park`]): its spares and idle instances are dropped, and threads drop its
//! VMs from their pools the next time they return one. Requests still in flight on it (a long
//! stream) keep working; they take a VM or instance from a small shared pool, built on demand.
//! A rollback *unparks* the generation before swapping it in ([`Loads::unpark`]), so that its
//! first requests find spares again.
//!
//! Which runtimes belong to a snapshot: a reload builds its snapshot on one thread, and
//! [`Loads::record`] collects every runtime loaded on that thread while the build runs (the
//! runtimes report themselves through [`loaded`]). Loads made outside `record` (the startup
//! snapshot, `weir check`, tests, the harness) are simply not parked.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

/// What a plugin runtime keeps ready, and can give back.
pub(crate) trait Warm: Send + Sync {
    /// The generation holding this load stopped serving: free what only makes calls fast.
    /// Calls keep working, colder.
    fn park(&self);
    /// The generation is about to serve again: build again what [`Warm::park`] freed. Best
    /// effort: a failure is logged, and calls build what they need.
    fn unpark(&self);
    /// VMs or instances it holds ready now (not counting those in threads' pools).
    fn ready(&self) -> usize;
}

thread_local! {
    /// The loads made on this thread inside [`Loads::record`]; `None` outside it.
    static RECORDING: RefCell<Option<Vec<Weak<dyn Warm>>>> = const { RefCell::new(None) };
}

/// Called by a runtime when it has loaded: recorded if a [`Loads::record`] runs on this thread.
pub(crate) fn loaded(load: Weak<dyn Warm>) {
    RECORDING.with(|r| {
        if let Some(loads) = r.borrow_mut().as_mut() {
            loads.push(load);
        }
    });
}

/// The runtimes loaded by one snapshot build. Cheap to clone. Holds them weakly: the snapshot
/// owns them.
#[derive(Clone, Default)]
pub struct Loads(Arc<[Weak<dyn Warm>]>);

impl std::fmt::Debug for Loads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loads").field("len", &self.0.len()).finish()
    }
}

impl Loads {
    /// Runs `build` (which loads plugins on this thread) and returns what it returned, with the
    /// runtimes it loaded.
    pub fn record<T>(build: impl FnOnce() -> T) -> (T, Loads) {
        /// Puts the outer recording (if any) back when dropped, `build` panicking included.
        struct Scope(Option<Vec<Weak<dyn Warm>>>);
        impl Drop for Scope {
            fn drop(&mut self) {
                let outer = self.0.take();
                RECORDING.with(|r| *r.borrow_mut() = outer);
            }
        }
        let scope = Scope(RECORDING.with(|r| r.borrow_mut().replace(Vec::new())));
        let out = build();
        let mine = RECORDING
            .with(|r| r.borrow_mut().take())
            .unwrap_or_default();
        drop(scope);
        (out, Loads(mine.into()))
    }

    /// How many runtimes were recorded.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing was recorded (a snapshot without plugins, or one built outside
    /// [`Loads::record`]).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The generation stopped serving: every runtime frees what it keeps warm.
    pub fn park(&self) {
        for load in self.0.iter().filter_map(Weak::upgrade) {
            load.park();
        }
    }

    /// VMs and instances these runtimes hold ready (spares, shared pools, idle instances; not
    /// the VMs in threads' pools): 0 once parked, unless calls were made on it since.
    pub fn ready(&self) -> usize {
        self.0
            .iter()
            .filter_map(Weak::upgrade)
            .map(|l| l.ready())
            .sum()
    }

    /// The generation is about to serve again: every runtime builds its warm state again.
    /// Blocking (builds VMs and instances, running `init`): call it off the async workers.
    pub fn unpark(&self) {
        for load in self.0.iter().filter_map(Weak::upgrade) {
            load.unpark();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records what it was asked.
    #[derive(Default)]
    struct Probe(Mutex<Vec<&'static str>>);

    impl Warm for Probe {
        fn park(&self) {
            self.0.lock().unwrap().push("park");
        }
        fn unpark(&self) {
            self.0.lock().unwrap().push("unpark");
        }
        fn ready(&self) -> usize {
            1
        }
    }

    fn report(probe: &Arc<Probe>) {
        let weak: Weak<dyn Warm> = Arc::downgrade(probe) as Weak<Probe>;
        loaded(weak);
    }

    #[test]
    fn records_the_loads_of_this_thread_inside_record_only() {
        let (a, b, c) = (Arc::default(), Arc::default(), Arc::default());
        report(&a);
        let (out, loads) = Loads::record(|| {
            report(&b);
            // Another thread's loads are not this build's.
            std::thread::scope(|s| {
                s.spawn(|| report(&c));
            });
            7
        });
        assert_eq!((out, loads.len(), loads.ready()), (7, 1, 1));
        loads.park();
        loads.unpark();
        assert_eq!(*b.0.lock().unwrap(), ["park", "unpark"]);
        assert!(a.0.lock().unwrap().is_empty() && c.0.lock().unwrap().is_empty());
        // Weak: a dropped load is skipped.
        drop(b);
        assert_eq!(loads.ready(), 0);
        loads.park();
    }

    #[test]
    fn nested_and_panicking_builds_leave_the_outer_recording_intact() {
        let (a, b) = (Arc::default(), Arc::default());
        let ((), outer) = Loads::record(|| {
            report(&a);
            let caught = std::panic::catch_unwind(|| {
                Loads::record(|| {
                    report(&b);
                    panic!("build failed");
                })
            });
            assert!(caught.is_err());
        });
        assert_eq!(outer.len(), 1);
        outer.park();
        assert_eq!(*a.0.lock().unwrap(), ["park"]);
        assert!(b.0.lock().unwrap().is_empty());
        // Outside any recording, loads are not kept anywhere.
        report(&b);
        let ((), none) = Loads::record(|| {});
        assert!(none.is_empty());
    }
}
