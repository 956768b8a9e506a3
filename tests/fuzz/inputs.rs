//! Inputs for the bounded drivers: the golden fixtures of `tests/golden/` as seeds, edited at
//! random (a subtree replaced, removed or turned into a string, a member added, the text cut
//! short or a byte flipped), and JSON built from the dialects' own field names.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::Value;
use weir::api::sse::{SseEvent, SseParser};

/// Field names of every dialect: random objects use them, so they reach the translators'
/// branches instead of being skipped as unknown fields.
const KEYS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "image_url",
    "url",
    "detail",
    "tool_calls",
    "tool_call_id",
    "id",
    "function",
    "name",
    "arguments",
    "tools",
    "tool_choice",
    "parameters",
    "stream",
    "stream_options",
    "include_usage",
    "max_tokens",
    "stop",
    "n",
    "system",
    "source",
    "media_type",
    "data",
    "input",
    "tool_use_id",
    "is_error",
    "choices",
    "delta",
    "index",
    "finish_reason",
    "usage",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "candidates",
    "parts",
    "functionCall",
    "args",
    "inlineData",
    "usageMetadata",
    "promptTokenCount",
    "candidatesTokenCount",
    "finishReason",
    "promptFeedback",
    "blockReason",
    "event",
    "message",
    "content_block",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "partial_json",
    "response_format",
    "json_schema",
    "schema",
    "properties",
    "items",
    "anyOf",
    "$ref",
    "$defs",
    "enum",
    "required",
    "error",
];

/// String values that mean something somewhere.
const STRINGS: &[&str] = &[
    "",
    "user",
    "assistant",
    "system",
    "tool",
    "developer",
    "function",
    "model",
    "text",
    "image",
    "image_url",
    "tool_use",
    "tool_result",
    "base64",
    "url",
    "stop",
    "length",
    "tool_calls",
    "content_filter",
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "STOP",
    "MAX_TOKENS",
    "SAFETY",
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "text_delta",
    "input_json_delta",
    "ping",
    "error",
    "auto",
    "none",
    "any",
    "required",
    "json_object",
    "json_schema",
    "object",
    "string",
    "image/png",
    "data:image/png;base64,iVBORw0KGgo=",
    "https://example.com/a.png",
    "#/$defs/a",
    "{\"a\":1}",
    "{",
    "[DONE]",
    "é😀\u{0}\u{7f}\u{2028}",
];

/// A JSON leaf. Numbers are integers or binary fractions, which survive a JSON round trip
/// exactly.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(i64::from(u32::MAX) + 1),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>(),
        ]
        .prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        prop::sample::select(&[0.5, -1.5, 2.25, 1e6][..]).prop_map(Value::from),
        prop::sample::select(STRINGS).prop_map(Value::from),
        prop::collection::vec(any::<char>(), 0..8).prop_map(|c| Value::from(String::from_iter(c))),
    ]
}

/// A JSON value a few levels deep, objects keyed by [`KEYS`].
pub fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

/// One edit of a JSON document; the `usize`s pick the node (preorder, modulo the count).
#[derive(Debug, Clone)]
pub enum Edit {
    /// Replace the node.
    Replace(usize, Value),
    /// Remove a child of the node (an element or member, picked by the second index).
    Remove(usize, usize),
    /// Add a member (to an object) or an element (to an array).
    Insert(usize, &'static str, Value),
    /// Replace the node by its JSON text as a string (`{"a":1}` -> `"{\"a\":1}"`).
    Stringify(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), value()).prop_map(|(n, v)| Edit::Replace(n, v)),
        (any::<usize>(), any::<usize>()).prop_map(|(n, i)| Edit::Remove(n, i)),
        (any::<usize>(), prop::sample::select(KEYS), value())
            .prop_map(|(n, k, v)| Edit::Insert(n, k, v)),
        any::<usize>().prop_map(Edit::Stringify),
    ]
}

/// What is done to the text after the JSON edits.
#[derive(Debug, Clone)]
pub enum ByteEdit {
    /// Nothing.
    None,
    /// Cut the text at a point (as a truncated upstream body would be).
    Truncate(usize),
    /// Replace one byte.
    Flip(usize, u8),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => Just(ByteEdit::None),
        1 => any::<usize>().prop_map(ByteEdit::Truncate),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
    ]
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

fn nth_mut<'a>(v: &'a mut Value, n: &mut usize) -> Option<&'a mut Value> {
    if *n == 0 {
        return Some(v);
    }
    *n -= 1;
    match v {
        Value::Array(a) => a.iter_mut().find_map(|x| nth_mut(x, n)),
        Value::Object(o) => o.values_mut().find_map(|x| nth_mut(x, n)),
        _ => None,
    }
}

/// Applies `edits` to `seed`.
pub fn apply(seed: &Value, edits: &[Edit]) -> Value {
    let mut doc = seed.clone();
    for e in edits {
        let pick = |doc: &mut Value, n: usize| {
            let mut n = n % count(doc);
            nth_mut(doc, &mut n).map(std::mem::take)
        };
        let node_index = match e {
            Edit::Replace(n, _)
            | Edit::Remove(n, _)
            | Edit::Insert(n, _, _)
            | Edit::Stringify(n) => *n,
        };
        let Some(node) = pick(&mut doc, node_index) else {
            continue;
        };
        let new = match (e, node) {
            (Edit::Replace(_, v), _) => v.clone(),
            (Edit::Remove(_, i), Value::Array(mut a)) if !a.is_empty() => {
                a.remove(i % a.len());
                Value::Array(a)
            }
            (Edit::Remove(_, i), Value::Object(mut o)) if !o.is_empty() => {
                let key = o.keys().nth(i % o.len()).cloned().unwrap_or_default();
                o.remove(&key);
                Value::Object(o)
            }
            (Edit::Insert(_, k, v), Value::Object(mut o)) => {
                o.insert((*k).to_owned(), v.clone());
                Value::Object(o)
            }
            (Edit::Insert(_, _, v), Value::Array(mut a)) => {
                a.push(v.clone());
                Value::Array(a)
            }
            (Edit::Stringify(_), node) => Value::String(node.to_string()),
            (_, node) => node,
        };
        let mut n = node_index % count(&doc);
        if let Some(slot) = nth_mut(&mut doc, &mut n) {
            *slot = new;
        }
    }
    doc
}

fn bytes_of(doc: &Value, b: &ByteEdit) -> Vec<u8> {
    let mut out = serde_json::to_vec(doc).unwrap_or_default();
    match *b {
        ByteEdit::None => {}
        ByteEdit::Truncate(i) => out.truncate(i % (out.len() + 1)),
        ByteEdit::Flip(i, byte) => {
            if !out.is_empty() {
                let i = i % out.len();
                out[i] = byte;
            }
        }
    }
    out
}

/// A JSON body: a seed edited, or random JSON, or random bytes.
pub fn body(seeds: Vec<Value>) -> impl Strategy<Value = Vec<u8>> {
    let edited = (
        prop::sample::select(seeds),
        prop::collection::vec(edit(), 0..4),
        byte_edit(),
    )
        .prop_map(|(seed, edits, b)| bytes_of(&apply(&seed, &edits), &b));
    prop_oneof![
        8 => edited,
        2 => value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// A stream of events: a seed stream whose event data (JSON) is edited, with events dropped,
/// repeated or made up, and the stream cut short.
pub fn events(seeds: Vec<Vec<SseEvent>>) -> impl Strategy<Value = Vec<SseEvent>> {
    let edited = (
        prop::sample::select(seeds),
        prop::collection::vec((any::<usize>(), prop::collection::vec(edit(), 0..3)), 0..4),
        prop::collection::vec((any::<usize>(), event()), 0..3),
        any::<usize>(),
    )
        .prop_map(|(mut evs, edits, inserts, cut)| {
            for (i, e) in edits {
                if evs.is_empty() {
                    break;
                }
                let i = i % evs.len();
                if let Ok(doc) = serde_json::from_str::<Value>(&evs[i].data) {
                    evs[i].data = apply(&doc, &e).to_string();
                } else {
                    evs.remove(i);
                }
            }
            for (i, e) in inserts {
                let i = i % (evs.len() + 1);
                evs.insert(i, e);
            }
            // Mostly whole; sometimes cut short (a truncated upstream stream).
            if cut % 3 == 0 {
                let keep = cut % (evs.len() + 1);
                evs.truncate(keep);
            }
            evs
        });
    prop_oneof![
        8 => edited,
        1 => prop::collection::vec(event(), 0..8),
    ]
}

fn event() -> impl Strategy<Value = SseEvent> {
    (
        prop::sample::select(STRINGS),
        prop_oneof![
            value().prop_map(|v| v.to_string()),
            prop::sample::select(STRINGS).prop_map(str::to_owned),
        ],
    )
        .prop_map(|(event, data)| SseEvent {
            event: event.to_owned(),
            data,
        })
}

/// Bytes in the event-stream alphabet: field names, separators and every line ending.
pub fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(&b"data:"[..]),
        Just(&b"data: "[..]),
        Just(&b"event: "[..]),
        Just(&b"id: 1"[..]),
        Just(&b": comment"[..]),
        Just(&b"\n"[..]),
        Just(&b"\r"[..]),
        Just(&b"\r\n"[..]),
        Just(&b"\n\n"[..]),
        Just(&b"{\"a\":1}"[..]),
        Just(&b"[DONE]"[..]),
        Just("é".as_bytes()),
        Just(&b"\xff"[..]),
        Just(&b"\xc3"[..]),
        Just(&b":"[..]),
        Just(&b" "[..]),
        Just(&b"x"[..]),
    ];
    prop::collection::vec(token, 0..48).prop_map(|t| t.concat())
}

/// `tests/golden/`.
fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

/// The JSON fixtures `tests/golden/<dir>/*<suffix>`.
pub fn json_seeds(dirs: &[&str], suffix: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for dir in dirs {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(golden().join(dir))
            .unwrap_or_else(|e| panic!("read {dir}: {e}"))
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).expect("read fixture");
            out.push(serde_json::from_str(&text).expect("fixture is JSON"));
        }
    }
    assert!(!out.is_empty(), "no seeds *{suffix} in {dirs:?}");
    out
}

/// The event-stream fixtures `tests/golden/<dir>/*<suffix>`, parsed into events.
pub fn stream_seeds(dirs: &[&str], suffix: &str) -> Vec<Vec<SseEvent>> {
    let mut out = Vec::new();
    for dir in dirs {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(golden().join(dir))
            .unwrap_or_else(|e| panic!("read {dir}: {e}"))
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        paths.sort();
        for p in paths {
            let bytes = std::fs::read(&p).expect("read fixture");
            let mut events = Vec::new();
            SseParser::new()
                .feed(&bytes, &mut events)
                .expect("fixture is an event stream");
            out.push(events);
        }
    }
    assert!(!out.is_empty(), "no seeds *{suffix} in {dirs:?}");
    out
}

/// A seed stream encoded as event-stream bytes, cut short or with a byte replaced.
pub fn stream_bytes(seeds: Vec<Vec<SseEvent>>) -> impl Strategy<Value = Vec<u8>> {
    (prop::sample::select(seeds), byte_edit()).prop_map(|(events, b)| {
        let mut out = Vec::new();
        for e in events {
            if !e.event.is_empty() {
                out.extend_from_slice(format!("event: {}\n", e.event).as_bytes());
            }
            for line in e.data.split('\n') {
                out.extend_from_slice(format!("data: {line}\n").as_bytes());
            }
            out.push(b'\n');
        }
        match b {
            ByteEdit::None => {}
            ByteEdit::Truncate(i) => out.truncate(i % (out.len() + 1)),
            ByteEdit::Flip(i, byte) => {
                if !out.is_empty() {
                    let i = i % out.len();
                    out[i] = byte;
                }
            }
        }
        out
    })
}
