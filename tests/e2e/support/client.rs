//! [`Client`]: a small HTTP client for talking to the gateway, and readers for its
//! server-sent event streams.

use std::sync::Once;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::Value;

/// Bound on every request a test makes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP client bound to one base URL.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// A finished response, body read.
#[derive(Debug)]
pub struct Resp {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body as text.
    pub text: String,
}

impl Resp {
    /// The body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}: {}",
                self.status, self.text
            )
        })
    }

    /// A header as a string ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

/// Installs the rustls crypto provider reqwest needs (the workspace builds it without one).
pub fn init_tls() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Client {
    /// A client for `base` (`http://127.0.0.1:PORT`).
    pub fn new(base: String) -> Client {
        init_tls();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .expect("reqwest client");
        Client { base, http }
    }

    /// The underlying reqwest client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Base URL followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Resp {
        read(
            self.http
                .get(self.url(path))
                .send()
                .await
                .expect("GET failed"),
        )
        .await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.post_raw(path, body.to_string()).await
    }

    /// `POST path` with a JSON body and extra headers.
    pub async fn post_json_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        read(req.send().await.expect("POST failed")).await
    }

    /// `POST path` with any body, sent as `application/json`.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Resp {
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST failed");
        read(resp).await
    }

    /// `POST path` with a JSON body; returns the response with its body unread, to stream.
    pub async fn open_stream(&self, path: &str, body: &Value) -> EventReader {
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST failed");
        EventReader {
            resp,
            buf: String::new(),
        }
    }
}

async fn read(resp: reqwest::Response) -> Resp {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("read body");
    Resp {
        status,
        headers,
        text,
    }
}

/// Reads a server-sent event stream one event at a time.
pub struct EventReader {
    /// The response (status and headers are available before any event).
    pub resp: reqwest::Response,
    buf: String,
}

impl EventReader {
    /// The next complete event's raw text (without its blank-line terminator), `Ok(None)` at
    /// a clean end of the body, `Err` if the body broke. Panics after `timeout`.
    pub async fn next_event(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<String>, reqwest::Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event = self.buf[..end].to_owned();
                self.buf.drain(..end + 2);
                return Ok(Some(event));
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .unwrap_or_else(|_| {
                    panic!("no event within {timeout:?}; buffered: {:?}", self.buf)
                })?;
            match chunk {
                Some(bytes) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                None => {
                    assert!(
                        self.buf.trim().is_empty(),
                        "stream ended inside an event: {:?}",
                        self.buf
                    );
                    return Ok(None);
                }
            }
        }
    }

    /// The next event's `data:` payload as JSON (panics on anything else).
    pub async fn next_json(&mut self, timeout: Duration) -> Value {
        let event = self
            .next_event(timeout)
            .await
            .expect("stream broke")
            .expect("stream ended");
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data event: {event:?}"));
        serde_json::from_str(data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"))
    }
}

/// Splits an OpenAI-style stream body into its `data:` payloads, checking the framing
/// exactly: every event is `data: <payload>\n\n` and the body ends with `data: [DONE]\n\n`.
/// Returns the JSON payloads before `[DONE]`.
pub fn openai_stream(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "stream must end with `data: [DONE]\\n\\n`; body:\n{body}"
    );
    let events: Vec<&str> = body
        .strip_suffix("\n\n")
        .unwrap_or(body)
        .split("\n\n")
        .collect();
    let (done, chunks) = events.split_last().expect("at least [DONE]");
    assert_eq!(*done, "data: [DONE]");
    chunks
        .iter()
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event is not `data: ...`: {e:?}"));
            assert!(
                !data.contains('\n'),
                "one data line per event expected: {e:?}"
            );
            serde_json::from_str(data)
                .unwrap_or_else(|err| panic!("chunk is not JSON ({err}): {data}"))
        })
        .collect()
}

/// Parses an event-stream body with named events (Anthropic): `(event, data JSON)` pairs.
/// Checks the framing: `event: NAME\ndata: JSON\n\n` with `data.type == NAME`.
pub fn named_events(body: &str) -> Vec<(String, Value)> {
    assert!(
        body.ends_with("\n\n"),
        "stream must end with a blank line; body:\n{body}"
    );
    body.strip_suffix("\n\n")
        .unwrap_or(body)
        .split("\n\n")
        .map(|e| {
            let mut lines = e.lines();
            let name = lines
                .next()
                .and_then(|l| l.strip_prefix("event: "))
                .unwrap_or_else(|| panic!("event must start with `event: `: {e:?}"));
            let data = lines
                .next()
                .and_then(|l| l.strip_prefix("data: "))
                .unwrap_or_else(|| panic!("event needs one `data: ` line: {e:?}"));
            assert!(
                lines.next().is_none(),
                "unexpected extra lines in event: {e:?}"
            );
            let v: Value = serde_json::from_str(data)
                .unwrap_or_else(|err| panic!("data is not JSON ({err}): {data}"));
            assert_eq!(
                v["type"], name,
                "data.type must match the event name: {e:?}"
            );
            (name.to_owned(), v)
        })
        .collect()
}

/// Concatenates `choices[0].delta.content` over OpenAI chunks.
pub fn stream_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

/// The last non-null `choices[0].finish_reason` over OpenAI chunks.
pub fn stream_finish_reason(chunks: &[Value]) -> Option<String> {
    chunks
        .iter()
        .rev()
        .find_map(|c| {
            c.pointer("/choices/0/finish_reason")
                .and_then(Value::as_str)
        })
        .map(str::to_owned)
}

/// A tool call reassembled from stream deltas: id, name, arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamedCall {
    /// Call id.
    pub id: String,
    /// Function name.
    pub name: String,
    /// Concatenated arguments.
    pub args: String,
}

/// Reassembles `choices[0].delta.tool_calls` over OpenAI chunks, by `index`, the way the
/// OpenAI SDKs do.
pub fn stream_tool_calls(chunks: &[Value]) -> Vec<StreamedCall> {
    let mut calls: Vec<StreamedCall> = Vec::new();
    for c in chunks {
        let Some(deltas) = c
            .pointer("/choices/0/delta/tool_calls")
            .and_then(Value::as_array)
        else {
            continue;
        };
        for d in deltas {
            let i = d["index"]
                .as_u64()
                .unwrap_or_else(|| panic!("tool call delta without index: {d}"))
                as usize;
            if calls.len() <= i {
                calls.resize(i + 1, StreamedCall::default());
            }
            let call = &mut calls[i];
            if let Some(id) = d["id"].as_str() {
                call.id = id.to_owned();
            }
            if let Some(name) = d.pointer("/function/name").and_then(Value::as_str) {
                call.name.push_str(name);
            }
            if let Some(args) = d.pointer("/function/arguments").and_then(Value::as_str) {
                call.args.push_str(args);
            }
        }
    }
    calls
}
