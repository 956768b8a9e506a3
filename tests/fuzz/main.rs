//! Bounded fuzzing of everything that reads bytes from outside: the event-stream parser,
//! both inbound dialects, and every provider's response and stream translation. The
//! properties are in [`props`] (written against the public API only, so that a libFuzzer crate can share them), the inputs in
//! [`inputs`] (golden fixtures edited at random, and made-up JSON).
//!
//! Run: `cargo test -p weir --test fuzz` (a few hundred cases per target, a few seconds).
//! Longer: `PROPTEST_CASES=100000 cargo test --release -p weir --test fuzz`; see
//! `tests/fuzz/README.md`.

#![allow(clippy::unwrap_used, missing_docs)]

mod inputs;
mod props;

use proptest::prelude::*;
use proptest::test_runner::Config;

/// `cases` per target unless `PROPTEST_CASES` says otherwise. Failures are not written to
/// `proptest-regressions/`: a failure found here becomes a named regression test.
fn config(cases: u32) -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

proptest! {
    #![proptest_config(config(2000))]
    #[test]
    fn sse_parser(data in inputs::sse_bytes(), cuts in prop::collection::vec(0usize..160, 0..8)) {
        props::sse(&data, &cuts);
    }
}

/// OpenAI-dialect chat requests: the canonical inputs of the provider goldens.
fn openai_seeds() -> Vec<serde_json::Value> {
    let mut seeds = inputs::json_seeds(&["gemini", "azure"], ".request.json");
    seeds.extend(inputs::json_seeds(
        &["anthropic/provider/request"],
        ".in.json",
    ));
    seeds
}

/// Upstream answers of every dialect (each provider also gets the others' answers).
fn response_seeds() -> Vec<serde_json::Value> {
    let mut seeds = inputs::json_seeds(&["azure", "gemini"], ".response.json");
    seeds.extend(inputs::json_seeds(
        &["anthropic/provider/response"],
        ".in.json",
    ));
    seeds
}

/// Upstream streams of every dialect.
fn stream_seeds() -> Vec<Vec<weir::api::sse::SseEvent>> {
    let mut seeds = inputs::stream_seeds(&["azure", "gemini"], ".stream.txt");
    seeds.extend(inputs::stream_seeds(
        &["anthropic/provider/stream"],
        ".in.sse",
    ));
    seeds
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn openai_request(body in inputs::body(openai_seeds())) {
        props::openai_request(&body, &props::providers());
    }

    #[test]
    fn anthropic_request(body in inputs::body(inputs::json_seeds(&["anthropic/inbound/request"], ".in.json"))) {
        props::anthropic_request(&body, &props::providers());
    }

    #[test]
    fn provider_responses(body in inputs::body(response_seeds())) {
        for (name, p) in props::providers() {
            props::provider_response(p.as_ref(), name, &body);
        }
    }

    #[test]
    fn provider_streams(events in inputs::events(stream_seeds())) {
        for (name, p) in props::providers() {
            props::provider_stream(p.as_ref(), name, &events);
        }
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// The seed streams as bytes, cut short or with a byte flipped: the event parser and the
    /// decoders together, as the gateway's stream reader runs them.
    #[test]
    fn provider_stream_bytes(body in inputs::stream_bytes(stream_seeds())) {
        for (name, p) in props::providers() {
            props::provider_stream_bytes(p.as_ref(), name, &body);
        }
    }
}
