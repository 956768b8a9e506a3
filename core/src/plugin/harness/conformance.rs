//! The conformance suite: one policy written in Lua and in Rust (WASM), the same fixtures,
//! identical outcomes. See `tests/conformance/README.md`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use super::run_fixtures;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds `dir/plugin.wasm` with `scripts/build-plugins.sh` when it is missing or older
/// than the crate's source.
fn ensure_wasm(dir: &Path) {
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let wasm = dir.join("plugin.wasm");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match (modified(&wasm), modified(&dir.join("src/lib.rs"))) {
        (Some(w), Some(src)) => w < src,
        _ => true,
    };
    if stale {
        let status = std::process::Command::new(root().join("scripts/build-plugins.sh"))
            .arg(dir)
            .status()
            .expect("run scripts/build-plugins.sh");
        assert!(
            status.success(),
            "scripts/build-plugins.sh {} failed",
            dir.display()
        );
    }
}

#[test]
fn lua_and_wasm_decide_alike() {
    let suite = root().join("tests/conformance");
    ensure_wasm(&suite.join("rust"));
    let lua = run_fixtures(&suite.join("lua")).unwrap();
    let wasm = run_fixtures(&suite.join("rust")).unwrap();
    for report in [&lua, &wasm] {
        let mut table = Vec::new();
        report.print(&mut table).unwrap();
        assert!(report.passed(), "{}", String::from_utf8_lossy(&table));
    }
    assert_eq!(lua.cases.len(), wasm.cases.len());
    assert!(lua.cases.len() >= 16);
    for (l, w) in lua.cases.iter().zip(&wasm.cases) {
        assert_eq!(l.name, w.name);
        // Whole outcomes, step by step: decisions, bodies, streamed text, the log entry,
        // admin answers and the plugin's kv namespace after each step.
        let (ls, ws) = (steps(&l.outcome), steps(&w.outcome));
        assert_eq!(ls.len(), ws.len(), "{}: step counts differ", l.name);
        for (i, (lo, wo)) in ls.iter().zip(&ws).enumerate() {
            assert_eq!(
                lo, wo,
                "{} (step {i}): Lua and WASM disagree\n lua:  {lo}\n wasm: {wo}",
                l.name
            );
        }
    }
}

/// The outcome of each step of a fixture.
fn steps(outcome: &Value) -> Vec<&Value> {
    match outcome {
        Value::Array(steps) => steps.iter().collect(),
        one => vec![one],
    }
}
