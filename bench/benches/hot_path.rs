//! Criterion micro-benchmarks of the per-request work Weir does without plugins: parsing the
//! inbound body, translating to each provider's dialect and back, and server-sent events
//! (parse upstream, decode chunks, encode frames). Plugin hook benchmarks live with the
//! plugin hosts.
//!
//! `cargo bench -p weir-bench` (`bench/run.sh` runs it pinned to the proxy's CPU and copies
//! the means into `BENCHMARKS.md`).

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use weir::api::openai::{ChatChunk, ChatRequest, ChatResponse};
use weir::api::sse::{SseEvent, SseParser, data_frame};
use weir::provider::{Provider, ProviderConfig, ProviderImpl};
use weir_bench::bodies;

/// A live HTTP provider built from a config given as JSON (the file's `[providers.NAME]`).
fn provider(cfg: serde_json::Value) -> Box<dyn Provider> {
    let cfg: ProviderConfig = serde_json::from_value(cfg).expect("provider config");
    match weir::provider::build("bench", &cfg).expect("provider").imp {
        ProviderImpl::Http(p) => p,
        ProviderImpl::Mock(_) => panic!("not an HTTP provider"),
    }
}

fn providers() -> Vec<(&'static str, Box<dyn Provider>, Vec<u8>)> {
    let openai_resp = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000u64, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "A short answer of a few words."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 250, "completion_tokens": 40, "total_tokens": 290}
    });
    let anthropic_resp = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "A short answer of a few words."}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 250, "output_tokens": 40}
    });
    let gemini_resp = json!({
        "candidates": [{"content": {"role": "model", "parts": [{"text": "A short answer of a few words."}]},
                        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 250, "candidatesTokenCount": 40, "totalTokenCount": 290},
        "modelVersion": "m"
    });
    vec![
        (
            "openai",
            provider(
                json!({"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-x"}),
            ),
            openai_resp.to_string().into_bytes(),
        ),
        (
            "azure",
            provider(
                json!({"kind": "azure", "endpoint": "https://r.openai.azure.com", "api_key": "k"}),
            ),
            openai_resp.to_string().into_bytes(),
        ),
        (
            "anthropic",
            provider(
                json!({"kind": "anthropic", "base_url": "http://127.0.0.1:9", "api_key": "k"}),
            ),
            anthropic_resp.to_string().into_bytes(),
        ),
        (
            "gemini",
            provider(
                json!({"kind": "gemini", "base_url": "http://127.0.0.1:9/v1beta", "api_key": "k"}),
            ),
            gemini_resp.to_string().into_bytes(),
        ),
    ]
}

fn parse(c: &mut Criterion) {
    let body = bodies::chat("gpt-4o-mini", false);
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("chat_request_1k/serde_json", |b| {
        b.iter(|| serde_json::from_slice::<ChatRequest>(black_box(&body)).expect("parse"));
    });
    g.bench_function("chat_request_1k/server_parse_json", |b| {
        b.iter(|| weir::server::parse_json::<ChatRequest>(black_box(&body)).expect("parse"));
    });
    let messages = bodies::messages("claude", false);
    g.throughput(Throughput::Bytes(messages.len() as u64));
    g.bench_function("anthropic_messages_1k/to_chat_request", |b| {
        b.iter(|| {
            let m: weir::api::anthropic::MessagesRequest =
                serde_json::from_slice(black_box(&messages)).expect("parse");
            weir::api::anthropic::to_chat_request(m).expect("translate")
        });
    });
    g.finish();

    let req: ChatRequest = serde_json::from_slice(&body).expect("parse");
    let resp: ChatResponse = serde_json::from_slice(&providers()[0].2).expect("parse");
    let mut g = c.benchmark_group("encode");
    g.bench_function("chat_request/to_vec", |b| {
        b.iter(|| serde_json::to_vec(black_box(&req)).expect("encode"))
    });
    g.bench_function("chat_response/to_vec", |b| {
        b.iter(|| serde_json::to_vec(black_box(&resp)).expect("encode"))
    });
    g.bench_function("chat_response/to_anthropic", |b| {
        b.iter(|| {
            serde_json::to_vec(&weir::api::anthropic::from_chat_response(
                black_box(&resp),
                "claude",
            ))
            .expect("encode")
        });
    });
    g.finish();
}

fn translate(c: &mut Criterion) {
    let req: ChatRequest = serde_json::from_slice(&bodies::chat("alias", false)).expect("parse");
    let mut g = c.benchmark_group("translate");
    for (name, p, resp) in providers() {
        g.bench_function(format!("{name}/chat_request"), |b| {
            b.iter(|| {
                p.chat_request(black_box(&req), "upstream-model")
                    .expect("translate")
            });
        });
        g.bench_function(format!("{name}/chat_response"), |b| {
            b.iter(|| {
                p.chat_response(black_box(&resp), "upstream-model")
                    .expect("translate")
            });
        });
    }
    g.finish();
}

/// An OpenAI stream of 20 content chunks, a usage chunk and `[DONE]`, as the upstream sends it.
fn openai_stream() -> Vec<u8> {
    let mut s = Vec::new();
    for i in 0..20 {
        let chunk = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000u64,
            "model": "m", "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]});
        s.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
    }
    s.extend_from_slice(b"data: [DONE]\n\n");
    s
}

fn sse(c: &mut Criterion) {
    let stream = openai_stream();
    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("parse/openai_21_events_one_read", |b| {
        b.iter_batched(
            || (SseParser::new(), Vec::with_capacity(32)),
            |(mut p, mut out)| {
                p.feed(black_box(&stream), &mut out).expect("parse");
                out
            },
            BatchSize::SmallInput,
        );
    });
    g.bench_function("parse/openai_21_events_one_read_per_event", |b| {
        let pieces: Vec<&[u8]> = stream.split_inclusive(|&c| c == b'\n').collect();
        b.iter_batched(
            || (SseParser::new(), Vec::with_capacity(32)),
            |(mut p, mut out)| {
                for piece in &pieces {
                    p.feed(black_box(piece), &mut out).expect("parse");
                }
                out
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();

    let mut events = Vec::new();
    SseParser::new().feed(&stream, &mut events).expect("parse");
    let event: SseEvent = events[3].clone();
    let chunk: ChatChunk = serde_json::from_str(&event.data).expect("chunk");
    let json = serde_json::to_vec(&chunk).expect("encode");
    let mut g = c.benchmark_group("sse_chunk");
    g.bench_function("decode/openai_chunk", |b| {
        let p = &providers()[0].1;
        let mut d = p.stream_decoder("m");
        b.iter(|| d.decode(black_box(&event)).expect("decode"));
    });
    g.bench_function("validate/ignored_any", |b| {
        b.iter(|| {
            serde_json::from_str::<serde::de::IgnoredAny>(black_box(&event.data)).expect("json")
        });
    });
    g.bench_function("encode/chunk_to_vec", |b| {
        b.iter(|| serde_json::to_vec(black_box(&chunk)).expect("encode"))
    });
    g.bench_function("encode/data_frame", |b| {
        b.iter(|| data_frame(black_box(&json)))
    });
    g.bench_function("encode/anthropic_chunk", |b| {
        let mut enc = weir::api::anthropic::MessagesStreamEncoder::new("claude");
        let mut out = Vec::with_capacity(4);
        b.iter(|| {
            out.clear();
            enc.encode(black_box(&chunk), &mut out);
            out.len()
        });
    });
    g.finish();
}

criterion_group!(benches, parse, translate, sse);
criterion_main!(benches);
