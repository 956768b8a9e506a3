//! Recall and false positives of every detector over the labelled corpus in
//! `tests/fixtures/pii/` (run natively: `cargo test --test corpus -- --nocapture` prints
//! the table recorded in the README).
//!
//! A finding counts as a true positive when its detector and byte span equal a label's;
//! anything else it reports is a false positive (split into findings in prompts with PII
//! and findings in the clean prompts, the near-misses).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use weir_plugin_redaction::detect::{Builtin, Kind, Scanner};

#[derive(serde::Deserialize)]
struct Case {
    id: String,
    text: String,
    labels: Vec<Label>,
}

#[derive(serde::Deserialize)]
struct Label {
    detector: String,
    start: usize,
    end: usize,
    text: String,
}

fn load(file: &str) -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/pii")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    labels: usize,
    found: usize,
    fp_in_pii: usize,
    fp_in_clean: usize,
}

fn run(
    scanner: &Scanner,
    cases: &[Case],
    clean: bool,
    tally: &mut BTreeMap<&'static str, Tally>,
    misses: &mut Vec<String>,
) {
    for case in cases {
        let findings = scanner.scan(&case.text);
        for label in &case.labels {
            assert_eq!(
                &case.text[label.start..label.end],
                label.text,
                "{}: bad span",
                case.id
            );
            let t = tally
                .entry(Builtin::from_name(&label.detector).unwrap().name())
                .or_default();
            t.labels += 1;
            let hit = findings.iter().any(|f| {
                f.kind == Kind::Builtin(Builtin::from_name(&label.detector).unwrap())
                    && f.start == label.start
                    && f.end == label.end
            });
            if hit {
                t.found += 1;
            } else {
                misses.push(format!(
                    "miss {} {}: {:?}",
                    case.id, label.detector, label.text
                ));
            }
        }
        for f in &findings {
            let Kind::Builtin(b) = f.kind else { continue };
            let labelled = case
                .labels
                .iter()
                .any(|l| l.detector == b.name() && l.start == f.start && l.end == f.end);
            if !labelled {
                let t = tally.entry(b.name()).or_default();
                if clean {
                    t.fp_in_clean += 1;
                } else {
                    t.fp_in_pii += 1;
                }
                misses.push(format!(
                    "false positive {} {}: {:?}",
                    case.id,
                    b.name(),
                    &case.text[f.start..f.end]
                ));
            }
        }
    }
}

#[test]
fn corpus_recall_and_false_positives() {
    let with_pii = load("with_pii.jsonl");
    let without = load("without_pii.jsonl");
    assert!(
        with_pii.len() >= 50 && without.len() >= 50,
        "the corpus needs 50 + 50 prompts"
    );
    let scanner = Scanner::new(&Builtin::ALL, &[]).unwrap();
    let mut tally = BTreeMap::new();
    let mut notes = Vec::new();
    run(&scanner, &with_pii, false, &mut tally, &mut notes);
    run(&scanner, &without, true, &mut tally, &mut notes);

    println!(
        "corpus: {} prompts with PII ({} labels), {} without",
        with_pii.len(),
        with_pii.iter().map(|c| c.labels.len()).sum::<usize>(),
        without.len()
    );
    println!("| detector | labels | found | recall | FP in PII prompts | FP in clean prompts |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut total = Tally::default();
    for b in Builtin::ALL {
        let t = tally.get(b.name()).copied().unwrap_or_default();
        total.labels += t.labels;
        total.found += t.found;
        total.fp_in_pii += t.fp_in_pii;
        total.fp_in_clean += t.fp_in_clean;
        println!(
            "| {} | {} | {} | {:.0}% | {} | {} |",
            b.name(),
            t.labels,
            t.found,
            100.0 * t.found as f64 / t.labels.max(1) as f64,
            t.fp_in_pii,
            t.fp_in_clean
        );
    }
    println!(
        "| **all** | {} | {} | {:.1}% | {} | {} |",
        total.labels,
        total.found,
        100.0 * total.found as f64 / total.labels.max(1) as f64,
        total.fp_in_pii,
        total.fp_in_clean
    );
    for n in &notes {
        println!("  {n}");
    }
    // Regression floor, not a target: the README records the measured numbers.
    assert!(
        total.found * 100 >= total.labels * 95,
        "recall fell below 95%: {notes:#?}"
    );
    assert!(
        total.fp_in_clean <= 2,
        "too many false positives on clean prompts: {notes:#?}"
    );
}
