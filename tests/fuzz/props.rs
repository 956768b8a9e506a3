//! The properties every fuzz target checks, on Weir's public API only, so that the bounded
//! proptest drivers (`main.rs`) and a coverage-guided harness can share them.
//!
//! Each function takes one input and panics when a property fails:
//! - nothing panics, whatever the bytes;
//! - output is linear in the input (a few times its size plus a constant), so no input makes
//!   the gateway allocate without bound;
//! - where it is cheap, what goes in comes back out (parse, encode, parse gives the same
//!   request; feeding an event stream in pieces gives the events of feeding it whole).

use bytes::Bytes;
use weir::api::anthropic::{self, MessagesRequest, MessagesStreamEncoder};
use weir::api::openai::{ChatChunk, ChatRequest, StreamOptions};
use weir::api::sse::{SseEvent, SseParser};
use weir::provider::{self, Provider, ProviderConfig, ProviderImpl, StreamDecoder};
use weir::server::parse_json;

/// Output may be this many times the input, plus [`SLACK`]: generous for every translation
/// (an Anthropic client stream wraps each chunk in several events), far below a blow-up.
pub const FACTOR: usize = 8;
/// Constant part of the output bound, bytes.
pub const SLACK: usize = 4096;

fn bounded(what: &str, input: usize, output: usize) {
    assert!(
        output <= FACTOR * input + SLACK,
        "{what}: {output} bytes out of {input} bytes in"
    );
}

/// The upstream dialects, each as a configured provider (no I/O: translation only).
pub fn providers() -> Vec<(&'static str, Box<dyn Provider>)> {
    let configs = [
        ("openai", "kind = \"openai\"\napi_key = \"sk-fuzz\""),
        (
            "azure",
            "kind = \"azure\"\nendpoint = \"https://fuzz.openai.azure.com\"\napi_key = \"k\"",
        ),
        ("anthropic", "kind = \"anthropic\"\napi_key = \"k\""),
        ("gemini", "kind = \"gemini\"\napi_key = \"k\""),
    ];
    configs
        .into_iter()
        .map(|(name, toml_src)| {
            let cfg: ProviderConfig = toml::from_str(toml_src).expect("provider config");
            match provider::build(name, &cfg).expect("provider builds").imp {
                ProviderImpl::Http(p) => (name, p),
                ProviderImpl::Mock(_) => unreachable!("no mock configured"),
            }
        })
        .collect()
}

/// Parses `data` whole; returns the events and whether the parser failed.
fn parse_whole(data: &[u8]) -> (Vec<SseEvent>, bool) {
    let mut out = Vec::new();
    let failed = SseParser::new().feed(data, &mut out).is_err();
    (out, failed)
}

/// SSE parser: the events of `data` fed in pieces (cut at `cuts`, an empty read after each) are
/// the events of `data` fed whole, errors included; events never hold more bytes than came in.
pub fn sse(data: &[u8], cuts: &[usize]) {
    let (whole, whole_failed) = parse_whole(data);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.sort_unstable();
    let mut parser = SseParser::new();
    let mut pieces = Vec::new();
    let mut failed = false;
    let mut start = 0;
    for end in points.into_iter().chain([data.len()]) {
        // An empty read (HTTP/2 may deliver one) after every piece must change nothing.
        let fed = parser.feed(&data[start..end], &mut pieces);
        if fed.and_then(|()| parser.feed(&[], &mut pieces)).is_err() {
            failed = true;
            break;
        }
        start = end;
    }
    assert_eq!(whole_failed, failed, "error differs when fed in pieces");
    assert_eq!(whole, pieces, "events differ when fed in pieces");
    let held: usize = whole.iter().map(|e| e.event.len() + e.data.len()).sum();
    assert!(
        held <= data.len(),
        "{held} bytes of events from {}",
        data.len()
    );
    parser.finish();
}

/// Inbound OpenAI chat request: parsing never panics; a request that parses encodes to JSON
/// that parses to the same request, and every provider translates it without panicking into
/// a JSON body linear in size; the pass-through splice keeps the request too.
pub fn openai_request(body: &[u8], providers: &[(&'static str, Box<dyn Provider>)]) {
    let Ok(req) = parse_json::<ChatRequest>(body) else {
        return;
    };
    let encoded = serde_json::to_vec(&req).expect("a parsed request encodes");
    bounded("openai request re-encoded", body.len(), encoded.len());
    let again = parse_json::<ChatRequest>(&encoded).expect("an encoded request parses");
    assert_eq!(req, again, "request changed through encode and parse");
    splice(body, &req);
    translate(&req, body.len(), providers);
}

/// The OpenAI pass-through body (the client's bytes with the model and stream options
/// replaced) says what the parsed request says with those two changes.
fn splice(body: &[u8], req: &ChatRequest) {
    let mut expect = req.clone();
    "upstream-model".clone_into(&mut expect.model);
    if expect.stream {
        // As the pipeline does: keep the client's options, ask for usage.
        let opts = expect.stream_options.get_or_insert_with(|| StreamOptions {
            include_usage: None,
            rest: Default::default(),
        });
        opts.include_usage = Some(true);
    }
    let Ok(spliced) = weir::provider::openai::splice_chat_body(body, &expect) else {
        return;
    };
    bounded("spliced body", body.len(), spliced.len());
    let back = parse_json::<ChatRequest>(&spliced).expect("a spliced body parses");
    assert_eq!(
        back, expect,
        "the splice changed more than model and stream options"
    );
}

/// Inbound Anthropic Messages request: parsing and the translation to the canonical request
/// never panic; a translated request is checked like an OpenAI one.
pub fn anthropic_request(body: &[u8], providers: &[(&'static str, Box<dyn Provider>)]) {
    let Ok(msg) = parse_json::<MessagesRequest>(body) else {
        return;
    };
    let Ok(req) = anthropic::to_chat_request(msg) else {
        return;
    };
    let encoded = serde_json::to_vec(&req).expect("a translated request encodes");
    bounded("anthropic request translated", body.len(), encoded.len());
    let again = parse_json::<ChatRequest>(&encoded).expect("a translated request parses");
    assert_eq!(
        req, again,
        "translated request changed through encode and parse"
    );
    translate(&req, body.len(), providers);
}

fn translate(req: &ChatRequest, input: usize, providers: &[(&'static str, Box<dyn Provider>)]) {
    for (name, p) in providers {
        if let Ok(up) = p.chat_request(req, "upstream-model") {
            let _: serde_json::Value = serde_json::from_slice(&up.body)
                .unwrap_or_else(|e| panic!("{name}: upstream body is not JSON: {e}"));
            bounded(name, input, up.body.len());
        }
    }
}

/// A provider's non-streamed answer: parsing never panics; a parsed answer encodes, for an
/// OpenAI client and for an Anthropic one, linearly in size.
pub fn provider_response(p: &dyn Provider, name: &str, body: &[u8]) {
    let _ = p.error_message(body);
    let Ok(resp) = p.chat_response(body, "upstream-model") else {
        return;
    };
    let openai = serde_json::to_vec(&resp).expect("a response encodes");
    bounded(name, body.len(), openai.len());
    let anthropic = serde_json::to_vec(&anthropic::from_chat_response(&resp, "client-model"))
        .expect("an Anthropic response encodes");
    bounded(name, body.len(), anthropic.len());
}

/// A provider's stream, as events: decoding never panics; the chunks it yields encode, for
/// an OpenAI client and for an Anthropic one (whose encoder keeps block state across
/// chunks), linearly in the size of the events.
pub fn provider_stream(p: &dyn Provider, name: &str, events: &[SseEvent]) {
    let mut decoder: Box<dyn StreamDecoder> = p.stream_decoder("upstream-model");
    let mut encoder = MessagesStreamEncoder::new("client-model");
    let mut frames: Vec<Bytes> = Vec::new();
    let mut input = 0;
    let mut output = 0;
    let emit = |chunks: &[ChatChunk], frames: &mut Vec<Bytes>, enc: &mut MessagesStreamEncoder| {
        let mut n = 0;
        for chunk in chunks {
            n += serde_json::to_vec(chunk).expect("a chunk encodes").len();
            enc.encode(chunk, frames);
        }
        n + frames.drain(..).map(|f| f.len()).sum::<usize>()
    };
    for event in events {
        input += event.event.len() + event.data.len() + 16;
        match decoder.decode(event) {
            Ok(decoded) => {
                output += emit(&decoded.chunks, &mut frames, &mut encoder);
                if decoded.done {
                    break;
                }
            }
            Err(e) => {
                encoder.error(&e.to_string(), &mut frames);
                output += emit(&[], &mut frames, &mut encoder);
                break;
            }
        }
        bounded(name, input, output);
    }
    match decoder.finish() {
        Ok(chunks) => {
            output += emit(&chunks, &mut frames, &mut encoder);
            encoder.finish(&mut frames);
        }
        Err(e) => encoder.error(&e.to_string(), &mut frames),
    }
    output += emit(&[], &mut frames, &mut encoder);
    bounded(name, input, output);
}

/// [`provider_stream`] on raw bytes: what the gateway's stream reader does with an upstream
/// body (parse events, decode them).
pub fn provider_stream_bytes(p: &dyn Provider, name: &str, data: &[u8]) {
    let (events, _) = parse_whole(data);
    provider_stream(p, name, &events);
}
