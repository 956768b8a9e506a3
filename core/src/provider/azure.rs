//! `azure`: Azure OpenAI. The wire format is OpenAI's; what differs is addressing and auth:
//!
//! - the URL names a *deployment*, not a model:
//!   `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version={api_version}`;
//! - the key travels in the `api-key` header.
//!
//! The upstream model name of a target is looked up in `deployments`; a model not listed is
//! used as the deployment name. Bodies, responses and stream chunks are OpenAI's, so this file
//! reuses [`super::openai`]: Azure's extra fields (`prompt_filter_results`,
//! `content_filter_results`, the first stream chunk with empty `choices`) are kept in the
//! canonical types' `rest` and pass through.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use serde::Deserialize;

use super::openai::{OpenAiDecoder, header_map, parse_chat_response, parse_embeddings_response};
use super::{Provider, ProviderError, StreamDecoder, UpstreamRequest};
use crate::api::openai::{ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse};
use crate::config::{ConfigError, TimeoutsConfig};

/// `[providers.NAME]` with `kind = "azure"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// Resource endpoint, e.g. `https://myres.openai.azure.com` (a trailing `/openai` is
    /// accepted and ignored).
    pub endpoint: String,
    /// API key, sent as the `api-key` header. Optional: Entra ID tokens can go in `headers`
    /// (`Authorization`) instead.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The `api-version` query parameter. Default `2024-10-21`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Upstream model name -> deployment name. A model not listed here is used as the
    /// deployment name.
    #[serde(default)]
    pub deployments: BTreeMap<String, String>,
    /// Extra headers sent on every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Timeouts and connection settings.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Largest non-streamed 2xx answer (chat or embeddings) read from this provider, in
    /// bytes; a larger one is not read further and the client gets a 502. Default 32 MiB.
    #[serde(default = "crate::config::file::default_max_response_bytes")]
    pub max_response_bytes: u64,
}

fn default_api_version() -> String {
    "2024-10-21".to_owned()
}

/// A live `azure` provider.
#[derive(Debug)]
pub struct Azure {
    /// `{endpoint}/openai/deployments`.
    deployments_url: String,
    api_version: String,
    deployments: BTreeMap<String, String>,
    headers: HeaderMap,
}

impl Azure {
    /// Builds the provider, validating endpoint, API version, deployments and headers.
    pub fn new(name: &str, cfg: &AzureConfig) -> Result<Self, ConfigError> {
        let endpoint_key = format!("providers.{name}.endpoint");
        let endpoint =
            crate::config::validate_base_url(name, &cfg.endpoint).map_err(|e| match e {
                ConfigError::Invalid { reason, .. } => ConfigError::invalid(&endpoint_key, reason),
                other => other,
            })?;
        let endpoint = endpoint.strip_suffix("/openai").unwrap_or(&endpoint);
        if !is_url_safe(&cfg.api_version) {
            return Err(ConfigError::invalid(
                format!("providers.{name}.api_version"),
                "must be a version such as 2024-10-21",
            ));
        }
        for (model, deployment) in &cfg.deployments {
            if !is_url_safe(deployment) {
                return Err(ConfigError::invalid(
                    format!("providers.{name}.deployments.{model}"),
                    "a deployment name may only hold letters, digits, '-', '_' and '.'",
                ));
            }
        }
        let mut headers = header_map(name, &cfg.headers)?;
        if let Some(key) = cfg.api_key.as_deref().filter(|k| !k.is_empty()) {
            let mut v = HeaderValue::from_str(key).map_err(|_| {
                ConfigError::invalid(
                    format!("providers.{name}.api_key"),
                    "contains characters not allowed in a header",
                )
            })?;
            v.set_sensitive(true);
            headers.insert("api-key", v);
        }
        Ok(Azure {
            deployments_url: format!("{endpoint}/openai/deployments"),
            api_version: cfg.api_version.clone(),
            deployments: cfg.deployments.clone(),
            headers,
        })
    }

    /// `{endpoint}/openai/deployments/{deployment}/{operation}?api-version=..`.
    fn url(&self, model: &str, operation: &str) -> Result<String, ProviderError> {
        let deployment = self.deployments.get(model).map_or(model, String::as_str);
        if !is_url_safe(deployment) {
            return Err(ProviderError::Unsupported(format!(
                "'{deployment}' is not a valid Azure deployment name"
            )));
        }
        Ok(format!(
            "{}/{deployment}/{operation}?api-version={}",
            self.deployments_url, self.api_version
        ))
    }

    fn request(
        &self,
        url: String,
        body: &impl serde::Serialize,
    ) -> Result<UpstreamRequest, ProviderError> {
        let body = serde_json::to_vec(body)
            .map(Bytes::from)
            .map_err(|e| ProviderError::Unsupported(format!("cannot encode request: {e}")))?;
        Ok(UpstreamRequest {
            url,
            headers: self.headers.clone(),
            body,
        })
    }
}

/// Whether `s` can go into a URL path or query unescaped (deployment names, API versions).
fn is_url_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Provider for Azure {
    fn chat_request(
        &self,
        req: &ChatRequest,
        model: &str,
    ) -> Result<UpstreamRequest, ProviderError> {
        let url = self.url(model, "chat/completions")?;
        // Azure ignores `model` (the deployment decides); it is set for upstream logs.
        let mut body = req.clone();
        body.model = model.to_owned();
        self.request(url, &body)
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
        let url = self.url(model, "embeddings")?;
        let mut body = req.clone();
        body.model = model.to_owned();
        self.request(url, &body)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai::ChatChunk;
    use crate::api::sse::SseParser;
    use serde_json::{Value, json};

    const CONFIG: &str = r#"
        endpoint = "https://myres.openai.azure.com/"
        api_key = "azure-secret"
        headers = { "x-ms-client-request-id" = "weir-test" }
        deployments = { "gpt-4o-mini" = "prod-4o-mini", "text-embedding-3-small" = "embed-small" }
    "#;

    fn provider() -> Azure {
        let cfg: AzureConfig = toml::from_str(CONFIG).expect("cfg");
        Azure::new("azure", &cfg).expect("provider")
    }

    fn read(name: &str) -> String {
        super::super::golden::read("azure", name)
    }

    fn check_golden(name: &str, actual: &Value) {
        super::super::golden::check("azure", name, actual);
    }

    use super::super::golden::upstream_json;

    #[test]
    fn golden_chat_request() {
        let req: ChatRequest = serde_json::from_str(&read("chat.request.json")).expect("request");
        let up = provider()
            .chat_request(&req, "gpt-4o-mini")
            .expect("translate");
        check_golden("chat.upstream.json", &upstream_json(&up));
    }

    #[test]
    fn golden_chat_response() {
        let resp = provider()
            .chat_response(read("chat.response.json").as_bytes(), "gpt-4o-mini")
            .expect("parse");
        check_golden(
            "chat.canonical.json",
            &serde_json::to_value(resp).expect("json"),
        );
    }

    #[test]
    fn golden_stream_with_content_filter_chunks() {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        parser
            .feed(read("stream.stream.txt").as_bytes(), &mut events)
            .expect("sse");
        let mut decoder = provider().stream_decoder("gpt-4o-mini");
        let mut chunks: Vec<ChatChunk> = Vec::new();
        let mut done = false;
        for event in &events {
            assert!(!done, "no events after [DONE]");
            let decoded = decoder.decode(event).expect("decode");
            chunks.extend(decoded.chunks);
            done = decoded.done;
        }
        assert!(done, "[DONE] ends the stream");
        chunks.extend(decoder.finish().expect("finish"));
        check_golden(
            "stream.chunks.json",
            &serde_json::to_value(chunks).expect("json"),
        );
    }

    #[test]
    fn golden_embeddings() {
        let p = provider();
        let req: EmbeddingsRequest =
            serde_json::from_str(&read("embeddings.request.json")).expect("request");
        let up = p
            .embeddings_request(&req, "text-embedding-3-small")
            .expect("translate");
        check_golden("embeddings.upstream.json", &upstream_json(&up));
        let resp = p
            .embeddings_response(
                read("embeddings.response.json").as_bytes(),
                "text-embedding-3-small",
            )
            .expect("parse");
        check_golden(
            "embeddings.canonical.json",
            &serde_json::to_value(resp).expect("json"),
        );
    }

    #[test]
    fn unlisted_model_is_the_deployment() {
        let req: ChatRequest = serde_json::from_value(
            json!({ "model": "alias", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .expect("req");
        let up = provider().chat_request(&req, "gpt-4.1").expect("translate");
        assert_eq!(
            up.url,
            "https://myres.openai.azure.com/openai/deployments/gpt-4.1/chat/completions?api-version=2024-10-21"
        );
        assert!(provider().chat_request(&req, "bad/name").is_err());
        assert!(provider().passthrough_stream());
    }

    #[test]
    fn error_message_reads_azure_errors() {
        let body = br#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#;
        assert_eq!(
            provider().error_message(body).as_deref(),
            Some("The API deployment for this resource does not exist.")
        );
    }

    #[test]
    fn config_validation() {
        let ok: AzureConfig =
            toml::from_str("endpoint = \"https://r.openai.azure.com/openai\"\napi_version = \"2025-01-01-preview\"")
                .expect("cfg");
        let p = Azure::new("az", &ok).expect("valid");
        assert_eq!(
            p.deployments_url,
            "https://r.openai.azure.com/openai/deployments"
        );
        assert!(p.headers.get("api-key").is_none());

        let bad_url: AzureConfig =
            toml::from_str("endpoint = \"myres.openai.azure.com\"").expect("cfg");
        let err = Azure::new("az", &bad_url)
            .expect_err("no scheme")
            .to_string();
        assert!(err.contains("providers.az.endpoint"), "{err}");

        let bad_dep: AzureConfig = toml::from_str(
            "endpoint = \"https://r.openai.azure.com\"\ndeployments = { m = \"a b\" }",
        )
        .expect("cfg");
        assert!(Azure::new("az", &bad_dep).is_err());

        let bad_version: AzureConfig =
            toml::from_str("endpoint = \"https://r.openai.azure.com\"\napi_version = \"x&y=1\"")
                .expect("cfg");
        assert!(Azure::new("az", &bad_version).is_err());

        assert!(
            toml::from_str::<AzureConfig>("endpoint = \"https://r\"\nbase_url = \"x\"").is_err()
        );
    }
}
