//! Tenant tagger: reads the tenant from a request header, records it in the request's
//! metadata (`tenant`, seen by later plugins and the log entry), and echoes it back to the
//! client in a response header. With `required = true`, a request without the header is
//! rejected with 400.
//!
//! Build: `scripts/build-plugins.sh` (writes `plugin.wasm`); test: `cargo test`.

use serde::Deserialize;
use weir_sdk::{Decision, Plugin, Request};

/// The `config` table of this plugin in the gateway config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The request header carrying the tenant (declare it in `plugin.toml` `headers`).
    #[serde(default = "default_header")]
    pub header: String,
    /// Reject requests without the header (400) instead of tagging them `default_tenant`.
    #[serde(default)]
    pub required: bool,
    /// Tenant used when the header is missing and not required.
    #[serde(default = "default_tenant")]
    pub default_tenant: String,
    /// Response header that echoes the tenant; empty disables it.
    #[serde(default = "default_response_header")]
    pub response_header: String,
}

fn default_header() -> String {
    "x-tenant".into()
}

fn default_tenant() -> String {
    "default".into()
}

fn default_response_header() -> String {
    "x-weir-tenant".into()
}

/// The plugin.
pub struct TenantTagger {
    config: Config,
}

/// A tenant name is 1-64 characters of `[A-Za-z0-9._-]`: it ends up in metrics labels
/// and key-value keys, so anything else is refused.
fn valid_tenant(tenant: &str) -> bool {
    (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Plugin for TenantTagger {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.header.is_empty() {
            return Err("`header` must not be empty".into());
        }
        if !valid_tenant(&config.default_tenant) {
            return Err(format!(
                "invalid default_tenant {:?}",
                config.default_tenant
            ));
        }
        Ok(TenantTagger { config })
    }

    fn on_request(&self, req: &Request) -> Decision {
        let header = req.header(&self.config.header);
        let tenant = match header.as_deref().map(str::trim) {
            Some(t) if valid_tenant(t) => t,
            Some(_) => {
                return Decision::error(400, &format!("invalid {} header", self.config.header));
            }
            None if self.config.required => {
                return Decision::error(400, &format!("missing {} header", self.config.header));
            }
            None => self.config.default_tenant.as_str(),
        };
        let decision = Decision::cont().set_metadata("tenant", tenant);
        if self.config.response_header.is_empty() {
            decision
        } else {
            decision.set_response_header(&self.config.response_header, tenant)
        }
    }
}

weir_sdk::export!(TenantTagger);
