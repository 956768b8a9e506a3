//! `openai`: OpenAI and every OpenAI-compatible server (Ollama, vLLM, Groq, Mistral,
//! Together, LM Studio, ...). The canonical form is this dialect, so translation is nearly
//! the identity: the model name is replaced and the body re-serialized.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use std::collections::BTreeMap;

use super::{Decoded, Provider, ProviderError, StreamDecoder, UpstreamRequest};
use crate::api::openai::{
    ChatChunk, ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse, Usage,
};
use crate::api::sse::SseEvent;
use crate::config::ConfigError;

/// `[providers.NAME]` with `kind = "openai"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Base URL up to and including `/v1`. Default `https://api.openai.com/v1`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// API key sent as `Authorization: Bearer`. Optional: local servers often need none.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Extra headers sent on every request (`OpenAI-Organization`, ...).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Timeouts and connection settings.
    #[serde(default)]
    pub timeouts: super::super::config::TimeoutsConfig,
    /// Largest non-streamed 2xx answer (chat or embeddings) read from this provider, in
    /// bytes; a larger one is not read further and the client gets a 502. Default 32 MiB.
    #[serde(default = "crate::config::file::default_max_response_bytes")]
    pub max_response_bytes: u64,
}

fn default_base_url() -> String {
    "https://api.openai.com/v1".to_owned()
}

/// A live `openai` provider.
#[derive(Debug)]
pub struct OpenAi {
    base_url: String,
    headers: HeaderMap,
}

impl OpenAi {
    /// Builds the provider, validating URL and headers.
    pub fn new(name: &str, cfg: &OpenAiConfig) -> Result<Self, ConfigError> {
        let base_url = super::super::config::validate_base_url(name, &cfg.base_url)?;
        let mut headers = header_map(name, &cfg.headers)?;
        if let Some(key) = cfg.api_key.as_deref().filter(|k| !k.is_empty()) {
            let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                ConfigError::invalid(
                    format!("providers.{name}.api_key"),
                    "contains characters not allowed in a header",
                )
            })?;
            v.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, v);
        }
        Ok(OpenAi { base_url, headers })
    }
}

/// Builds a header map from config, naming the provider in errors.
pub fn header_map(name: &str, map: &BTreeMap<String, String>) -> Result<HeaderMap, ConfigError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (k, v) in map {
        let key = format!("providers.{name}.headers.{k}");
        let hn = HeaderName::try_from(k.as_str())
            .map_err(|_| ConfigError::invalid(key.clone(), "not a valid header name"))?;
        let hv = HeaderValue::from_str(v)
            .map_err(|_| ConfigError::invalid(key, "not a valid header value"))?;
        headers.insert(hn, hv);
    }
    Ok(headers)
}

/// Serializes a request body with the upstream model name. The pipeline has usually set the
/// model already, so the common case encodes without copying the request.
fn body_with_model<T: serde::Serialize + Clone>(
    req: &T,
    has_model: bool,
    set_model: impl FnOnce(&mut T),
) -> Result<Bytes, ProviderError> {
    let encoded = if has_model {
        serde_json::to_vec(req)
    } else {
        let mut req = req.clone();
        set_model(&mut req);
        serde_json::to_vec(&req)
    };
    encoded
        .map(Bytes::from)
        .map_err(|e| ProviderError::Unsupported(format!("cannot encode request: {e}")))
}

/// The members of a JSON object in order, values left as raw JSON text.
struct RawMembers<'a>(Vec<(crate::api::open::Key<'a>, &'a serde_json::value::RawValue)>);

impl<'de> serde::Deserialize<'de> for RawMembers<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> serde::de::Visitor<'de> for MembersVisitor {
            type Value = RawMembers<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawMembers<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key()? {
                    members.push((key, map.next_value()?));
                }
                Ok(RawMembers(members))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

/// The upstream body for an OpenAI-compatible provider made from the client's own request
/// bytes, when no plugin changed the request: every member is copied as it came, except
/// `model` (the target's model) and, for a stream, `stream_options` (the pipeline asks for
/// usage). Re-encoding the parsed request instead escapes every string again, which was
/// the largest single cost of a plain request in profiles.
pub fn splice_chat_body(raw: &[u8], req: &ChatRequest) -> Result<Bytes, ProviderError> {
    let invalid =
        |e: serde_json::Error| ProviderError::Unsupported(format!("cannot encode request: {e}"));
    let RawMembers(members) = serde_json::from_slice(raw).map_err(invalid)?;
    let mut out = Vec::with_capacity(raw.len() + 64);
    out.push(b'{');
    let mut wrote_options = false;
    for (key, value) in &members {
        if out.len() > 1 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, key.as_str()).map_err(invalid)?;
        out.push(b':');
        match key.as_str() {
            "model" => serde_json::to_writer(&mut out, &req.model).map_err(invalid)?,
            "stream_options" if req.stream => {
                serde_json::to_writer(&mut out, &req.stream_options).map_err(invalid)?;
                wrote_options = true;
            }
            _ => out.extend_from_slice(value.get().as_bytes()),
        }
    }
    if req.stream && !wrote_options && req.stream_options.is_some() {
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(b"\"stream_options\":");
        serde_json::to_writer(&mut out, &req.stream_options).map_err(invalid)?;
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

impl Provider for OpenAi {
    fn chat_request(
        &self,
        req: &ChatRequest,
        model: &str,
    ) -> Result<UpstreamRequest, ProviderError> {
        // Earlier reasoning (Anthropic thinking) has no OpenAI form: dropped.
        let reasoning = req.messages.iter().any(|m| m.reasoning.is_some());
        if reasoning {
            tracing::debug!("Reasoning blocks of earlier turns dropped for an OpenAI upstream.");
        }
        Ok(UpstreamRequest {
            url: format!("{}/chat/completions", self.base_url),
            headers: self.headers.clone(),
            body: body_with_model(req, req.model == model && !reasoning, |r| {
                r.model = model.to_owned();
                for m in &mut r.messages {
                    m.reasoning = None;
                }
            })?,
        })
    }

    fn chat_request_from_client_body(
        &self,
        raw: &[u8],
        req: &ChatRequest,
        model: &str,
    ) -> Option<Result<UpstreamRequest, ProviderError>> {
        if req.model != model {
            return None;
        }
        Some(splice_chat_body(raw, req).map(|body| UpstreamRequest {
            url: format!("{}/chat/completions", self.base_url),
            headers: self.headers.clone(),
            body,
        }))
    }

    fn chat_response(&self, body: &[u8], _model: &str) -> Result<ChatResponse, ProviderError> {
        parse_chat_response(body)
    }

    fn stream_decoder(&self, _model: &str) -> Box<dyn StreamDecoder> {
        Box::new(OpenAiDecoder::default())
    }

    fn embeddings_request(
        &self,
        req: &EmbeddingsRequest,
        model: &str,
    ) -> Result<UpstreamRequest, ProviderError> {
        Ok(UpstreamRequest {
            url: format!("{}/embeddings", self.base_url),
            headers: self.headers.clone(),
            body: body_with_model(req, req.model == model, |r| r.model = model.to_owned())?,
        })
    }

    fn embeddings_response(
        &self,
        body: &[u8],
        _model: &str,
    ) -> Result<EmbeddingsResponse, ProviderError> {
        parse_embeddings_response(body)
    }

    fn passthrough_stream(&self) -> bool {
        true
    }
}

/// Parses an OpenAI chat completion body.
pub fn parse_chat_response(body: &[u8]) -> Result<ChatResponse, ProviderError> {
    serde_json::from_slice(body).map_err(|e| ProviderError::InvalidResponse(e.to_string()))
}

/// Checks that an OpenAI body is a chat completion (an object with an `id` and a `choices`
/// array) and reads its usage, without building the response: for forwarding the body as is.
pub fn peek_chat_response(body: &[u8]) -> Result<Option<Usage>, ProviderError> {
    use serde::de::IgnoredAny;
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "id")]
        _id: IgnoredAny,
        #[serde(rename = "choices")]
        _choices: Vec<IgnoredAny>,
        #[serde(default)]
        usage: Option<Usage>,
    }
    serde_json::from_slice::<Peek>(body)
        .map(|p| p.usage)
        .map_err(|e| ProviderError::InvalidResponse(e.to_string()))
}

/// Parses an OpenAI embeddings body.
pub fn parse_embeddings_response(body: &[u8]) -> Result<EmbeddingsResponse, ProviderError> {
    serde_json::from_slice(body).map_err(|e| ProviderError::InvalidResponse(e.to_string()))
}

/// How an OpenAI stream ended, to tell a finished stream from a truncated one.
///
/// A stream is complete once `[DONE]` arrived. Some OpenAI-compatible servers never send
/// `[DONE]`, so a stream whose every choice sent a `finish_reason` counts as complete too (its
/// answer is whole; only a usage chunk may be missing). Anything else that ends is truncated.
#[derive(Debug, Default)]
pub struct StreamEnd {
    done: bool,
    /// Choices that have appeared and not finished yet.
    open: Vec<u32>,
    /// At least one choice sent its `finish_reason`.
    finished_any: bool,
}

impl StreamEnd {
    /// `[DONE]` arrived.
    pub fn done(&mut self) {
        self.done = true;
    }

    /// A chunk's choice `index` appeared, with (`finished`) or without a `finish_reason`.
    pub fn choice(&mut self, index: u32, finished: bool) {
        if finished {
            self.finished_any = true;
            self.open.retain(|&i| i != index);
        } else if !self.open.contains(&index) {
            self.open.push(index);
        }
    }

    /// Whether the stream said it is complete.
    pub fn is_complete(&self) -> bool {
        self.done || (self.finished_any && self.open.is_empty())
    }

    /// `Ok` if the stream is complete, the truncation error otherwise.
    pub fn check(&self) -> Result<(), ProviderError> {
        if self.is_complete() {
            Ok(())
        } else {
            Err(ProviderError::InvalidResponse(
                "stream ended before [DONE] or a finish reason".to_owned(),
            ))
        }
    }
}

/// What the pass-through path needs to know about one OpenAI stream chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPeek {
    /// The chunk's usage, if it carries one.
    pub usage: Option<Usage>,
    /// The chunk has no choices and carries usage (the usage-only chunk).
    pub usage_only: bool,
}

/// Checks that `data` is a chunk (or an error event) and reads what the pass-through path
/// needs from it (usage, the end of each choice) in one parse, without building the chunk.
/// Whitespace anywhere is fine: this is a JSON parse, not a byte match.
pub fn peek_chunk(data: &str, end: &mut StreamEnd) -> Result<ChunkPeek, ProviderError> {
    use serde::de::IgnoredAny;
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        choices: Vec<PeekChoice>,
        #[serde(default)]
        usage: Option<Usage>,
        #[serde(default)]
        error: Option<IgnoredAny>,
    }
    #[derive(Deserialize)]
    struct PeekChoice {
        #[serde(default)]
        index: u32,
        #[serde(default)]
        finish_reason: Option<IgnoredAny>,
    }
    let peek: Peek = serde_json::from_str(data)
        .map_err(|e| ProviderError::InvalidResponse(format!("bad stream chunk: {e}")))?;
    if peek.error.is_some() {
        return Err(stream_error(data));
    }
    for c in &peek.choices {
        end.choice(c.index, c.finish_reason.is_some());
    }
    Ok(ChunkPeek {
        usage: peek.usage,
        usage_only: peek.choices.is_empty() && peek.usage.is_some(),
    })
}

/// The error an OpenAI error event reports.
fn stream_error(data: &str) -> ProviderError {
    let msg = super::openai_error_message(data.as_bytes()).unwrap_or_else(|| data.to_owned());
    ProviderError::StreamError(msg)
}

/// Decodes OpenAI `chat.completion.chunk` events; `[DONE]` ends the stream, and a stream
/// that ends before it is truncated (see [`StreamEnd`]).
#[derive(Debug, Default)]
pub struct OpenAiDecoder {
    end: StreamEnd,
}

impl StreamDecoder for OpenAiDecoder {
    fn decode(&mut self, event: &SseEvent) -> Result<Decoded, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.end.done();
            return Ok(Decoded {
                chunks: Vec::new(),
                done: true,
            });
        }
        if event.event == "error" {
            return Err(stream_error(data));
        }
        let chunk: ChatChunk = serde_json::from_str(data)
            .map_err(|e| ProviderError::InvalidResponse(format!("bad stream chunk: {e}")))?;
        if chunk.rest.get("error").is_some_and(|e| !e.is_null()) {
            return Err(stream_error(data));
        }
        for c in &chunk.choices {
            self.end.choice(c.index, c.finish_reason.is_some());
        }
        Ok(Decoded {
            chunks: vec![chunk],
            done: false,
        })
    }

    fn finish(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        self.end.check().map(|()| Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_body_is_copied_with_model_and_stream_options_replaced() {
        let raw = br#"{"model":"alias","messages":[{"role":"user","content":"caf\u00e9 \"q\"","x":[1, 2]}],"seed":7,"stream":true,"stream_options":{"other":1}}"#;
        let mut req: ChatRequest = serde_json::from_slice(raw).expect("parses");
        req.model = "gpt-4o".into();
        req.stream_options.as_mut().expect("present").include_usage = Some(true);
        let body = splice_chat_body(raw, &req).expect("splices");
        let text = std::str::from_utf8(&body).expect("utf-8");
        // Untouched members are the client's bytes, escapes and spacing included.
        assert!(
            text.contains(r#""content":"caf\u00e9 \"q\"","x":[1, 2]"#),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["seed"], 7);
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "other": 1})
        );
        // And it says exactly what the parsed request says.
        let again: ChatRequest = serde_json::from_slice(&body).expect("parses again");
        assert_eq!(again, req);
    }

    #[test]
    fn stream_options_are_added_when_the_client_sent_none() {
        let raw = br#"{"messages":[{"role":"user","content":"hi"}],"model":"m","stream":true}"#;
        let mut req: ChatRequest = serde_json::from_slice(raw).expect("parses");
        req.stream_options = Some(crate::api::openai::StreamOptions {
            include_usage: Some(true),
            rest: Default::default(),
        });
        let body = splice_chat_body(raw, &req).expect("splices");
        let again: ChatRequest = serde_json::from_slice(&body).expect("parses again");
        assert_eq!(again, req);
        // A non-stream request keeps the client's stream_options bytes as they were.
        let raw = br#"{"model":"m","messages":[],"stream_options":{"include_usage":false}}"#;
        let req: ChatRequest = serde_json::from_slice(raw).expect("parses");
        let body = splice_chat_body(raw, &req).expect("splices");
        assert_eq!(&body[..], &raw[..]);
    }

    #[test]
    fn request_substitutes_model_and_keeps_unknown_fields() {
        let cfg: OpenAiConfig =
            toml::from_str("base_url = \"http://127.0.0.1:9/v1\"\napi_key = \"sk-x\"")
                .expect("cfg");
        let p = OpenAi::new("local", &cfg).expect("provider");
        let req: ChatRequest = serde_json::from_str(
            r#"{"model":"alias","messages":[{"role":"user","content":"hi"}],"seed":7,"logprobs":true}"#,
        )
        .expect("req");
        let up = p.chat_request(&req, "gpt-4o-mini").expect("up");
        assert_eq!(up.url, "http://127.0.0.1:9/v1/chat/completions");
        let body: serde_json::Value = serde_json::from_slice(&up.body).expect("json");
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["seed"], 7);
        assert_eq!(body["logprobs"], true);
        assert_eq!(
            up.headers.get("authorization").map(|v| v.is_sensitive()),
            Some(true)
        );
    }

    #[test]
    fn decoder_tells_a_finished_stream_from_a_truncated_one() {
        let event = |data: &str| SseEvent {
            event: String::new(),
            data: data.to_owned(),
        };
        let content =
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"par"},"finish_reason":null}]}"#;
        let mut d = OpenAiDecoder::default();
        d.decode(&event(content)).expect("chunk");
        assert!(matches!(d.finish(), Err(ProviderError::InvalidResponse(_))));

        let mut d = OpenAiDecoder::default();
        d.decode(&event(content)).expect("chunk");
        d.decode(&event(
            r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        ))
        .expect("finish");
        assert!(
            d.finish().is_ok(),
            "every choice finished: complete without [DONE]"
        );

        let mut d = OpenAiDecoder::default();
        d.decode(&event(content)).expect("chunk");
        d.decode(&event("[DONE]")).expect("done");
        assert!(d.finish().is_ok());

        let spaced = d.decode(&event(r#"{ "error" : { "message" : "late" } }"#));
        assert!(matches!(spaced, Err(ProviderError::StreamError(m)) if m == "late"));
    }

    #[test]
    fn decoder_handles_done_and_error() {
        let mut d = OpenAiDecoder::default();
        let done = d
            .decode(&SseEvent {
                event: String::new(),
                data: "[DONE]".into(),
            })
            .expect("done");
        assert!(done.done);
        let err = d.decode(&SseEvent {
            event: String::new(),
            data: r#"{"error":{"message":"boom"}}"#.into(),
        });
        assert!(matches!(err, Err(ProviderError::StreamError(m)) if m == "boom"));
        let bad = d.decode(&SseEvent {
            event: String::new(),
            data: "{not json".into(),
        });
        assert!(matches!(bad, Err(ProviderError::InvalidResponse(_))));
    }
}
