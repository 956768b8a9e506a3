//! Scan cost of the redaction detectors on a 4 KiB prompt, natively (the plugin runs the same
//! code compiled to WASM, typically 1.5-3x slower).
//!
//!     cargo bench --manifest-path plugins/redaction/Cargo.toml --bench scan

use std::path::PathBuf;
use std::time::Instant;

use weir_plugin_redaction::detect::{Builtin, Scanner};

fn texts(file: &str) -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/pii")
        .join(file);
    let Ok(text) = std::fs::read_to_string(&path) else {
        panic!("cannot read {}", path.display());
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_owned))
        .collect()
}

fn main() {
    let clean = texts("without_pii.jsonl");
    let mut prompt = String::new();
    for c in clean.iter().cycle() {
        if prompt.len() >= 4096 {
            break;
        }
        prompt.push_str(c);
        prompt.push('\n');
    }
    prompt.truncate(4096);
    let with_pii = texts("with_pii.jsonl");
    let mut dirty = prompt.clone();
    dirty.truncate(3600);
    if let Some(t) = with_pii.get(55) {
        dirty.push_str(t);
    }
    let Ok(scanner) = Scanner::new(&Builtin::ALL, &[]) else {
        panic!("scanner");
    };
    for (name, text) in [("clean 4 KiB", &prompt), ("4 KiB with PII", &dirty)] {
        let mut samples = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = Instant::now();
            std::hint::black_box(scanner.scan(std::hint::black_box(text)));
            samples.push(t.elapsed().as_nanos());
        }
        samples.sort_unstable();
        println!(
            "{name}: p50 {:.1} us, p99 {:.1} us",
            samples[samples.len() / 2] as f64 / 1000.0,
            samples[samples.len() * 99 / 100] as f64 / 1000.0
        );
    }
}
