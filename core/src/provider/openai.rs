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

impl Provider for OpenAi {
    fn chat_request(
        &self,
        req: &ChatRequest,
        model: &str,
    ) -> Result<UpstreamRequest, ProviderError> {
        Ok(UpstreamRequest {
            url: format!("{}/chat/completions", self.base_url),
            headers: self.headers.clone(),
            body: body_with_model(req, req.model == model, |r| r.model = model.to_owned())?,
        })
    }

    fn chat_response(&self, body: &[u8], _model: &str) -> Result<ChatResponse, ProviderError> {
        parse_chat_response(body)
    }

    fn stream_decoder(&self, _model: &str) -> Box<dyn StreamDecoder> {
        Box::new(OpenAiDecoder)
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

/// Decodes OpenAI `chat.completion.chunk` events; `[DONE]` ends the stream.
#[derive(Debug, Default)]
pub struct OpenAiDecoder;

impl StreamDecoder for OpenAiDecoder {
    fn decode(&mut self, event: &SseEvent) -> Result<Decoded, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(Decoded {
                chunks: Vec::new(),
                done: true,
            });
        }
        if event.event == "error" || data.starts_with("{\"error\"") {
            let msg =
                super::openai_error_message(data.as_bytes()).unwrap_or_else(|| data.to_owned());
            return Err(ProviderError::StreamError(msg));
        }
        let chunk: ChatChunk = serde_json::from_str(data)
            .map_err(|e| ProviderError::InvalidResponse(format!("bad stream chunk: {e}")))?;
        Ok(Decoded {
            chunks: vec![chunk],
            done: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn decoder_handles_done_and_error() {
        let mut d = OpenAiDecoder;
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
