//! Model prices: the gateway-level `[prices]` table of `weir.toml`, read by the request log
//! (`cost_usd`) and by plugins.
//!
//! ```toml
//! [prices."gpt-4o-mini"]      # a client-facing or upstream model name, or "*" for any other
//! input = 0.15                # USD per 1M prompt tokens
//! output = 0.60               # USD per 1M completion tokens
//! cache_read = 0.015          # prompt tokens read from the provider's cache
//!                             # (alias cached_input; default: 0.1 x input)
//! cache_write = 0.1875        # prompt tokens written to the provider's cache
//!                             # (default: 1.25 x input)
//! ```
//!
//! The table is part of [`crate::config::Config`] (`config.prices`), so each snapshot has its
//! own and a reload replaces it.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

/// The entry that prices models the table does not name.
pub const ANY_MODEL: &str = "*";

/// Default price of a cache read, as a multiple of `input`.
pub const CACHE_READ_FACTOR: f64 = 0.1;

/// Default price of a cache write, as a multiple of `input`.
pub const CACHE_WRITE_FACTOR: f64 = 1.25;

/// `[prices.MODEL]`: one model's prices, in USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Prompt (input) tokens, USD per 1M.
    pub input: f64,
    /// Completion (output) tokens, USD per 1M.
    pub output: f64,
    /// Prompt tokens read from the provider's prompt cache, USD per 1M (`cache_read` or
    /// `cached_input`). Default: 0.1 x `input` (Anthropic's and OpenAI's usual discount).
    #[serde(default, alias = "cache_read")]
    pub cached_input: Option<f64>,
    /// Prompt tokens written to the provider's prompt cache, USD per 1M. Default: 1.25 x
    /// `input` (Anthropic's 5-minute cache write).
    #[serde(default)]
    pub cache_write: Option<f64>,
}

/// A price table that does not validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricesError {
    /// A key of `[prices]` is invalid.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted key path, e.g. `prices."gpt-4o-mini".input`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// One model's prices, validated, in USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PriceEntry {
    /// Prompt tokens not served from or written to a cache.
    pub input: f64,
    /// Completion tokens.
    pub output: f64,
    /// Prompt tokens read from the provider's cache.
    pub cached_input: f64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write: f64,
}

impl PriceEntry {
    /// The cost of one request in USD. `cached` and `cache_write` are part of `prompt`
    /// (as providers report them) and priced at their own rates; counts larger than
    /// `prompt` are clamped to it.
    pub fn cost_usd(&self, prompt: u64, completion: u64, cached: u64, cache_write: u64) -> f64 {
        let cached = cached.min(prompt);
        let cache_write = cache_write.min(prompt - cached);
        let uncached = prompt - cached - cache_write;
        let micro = tokens(uncached) * self.input
            + tokens(cached) * self.cached_input
            + tokens(cache_write) * self.cache_write
            + tokens(completion) * self.output;
        micro / 1_000_000.0
    }
}

/// A token count as a float (exact below 2^53, far above any real count).
fn tokens(n: u64) -> f64 {
    n as f64
}

/// The runtime price table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prices {
    by_model: HashMap<String, PriceEntry>,
}

impl Prices {
    /// Validates the file's `[prices]` table: every price must be a finite number >= 0.
    pub fn from_config(table: &BTreeMap<String, PriceConfig>) -> Result<Prices, PricesError> {
        let mut by_model = HashMap::with_capacity(table.len());
        for (model, p) in table {
            let key = format!("prices.{}", toml_key(model));
            if model.is_empty() {
                return Err(PricesError::Invalid {
                    key,
                    reason: "the model name must not be empty".to_owned(),
                });
            }
            let check = |field: &str, v: f64| -> Result<f64, PricesError> {
                if v.is_finite() && v >= 0.0 {
                    Ok(v)
                } else {
                    Err(PricesError::Invalid {
                        key: format!("{key}.{field}"),
                        reason: format!(
                            "{v} is not a price: must be a finite number >= 0 (USD per 1M tokens)"
                        ),
                    })
                }
            };
            let input = check("input", p.input)?;
            let entry = PriceEntry {
                input,
                output: check("output", p.output)?,
                cached_input: check(
                    "cached_input",
                    p.cached_input.unwrap_or(input * CACHE_READ_FACTOR),
                )?,
                cache_write: check(
                    "cache_write",
                    p.cache_write.unwrap_or(input * CACHE_WRITE_FACTOR),
                )?,
            };
            by_model.insert(model.clone(), entry);
        }
        Ok(Prices { by_model })
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }

    /// The prices of exactly this model name (`"*"` is the catch-all entry).
    pub fn get(&self, model: &str) -> Option<PriceEntry> {
        self.by_model.get(model).copied()
    }

    /// The prices that apply to a request: the client-facing `model`'s, else the upstream
    /// `target_model`'s, else the `"*"` entry's.
    pub fn resolve(&self, model: &str, target_model: &str) -> Option<PriceEntry> {
        self.get(model)
            .or_else(|| self.get(target_model))
            .or_else(|| self.get(ANY_MODEL))
    }

    /// The cost of a request in USD, `None` when no entry applies (see [`Prices::resolve`]
    /// and [`PriceEntry::cost_usd`]).
    pub fn cost_usd(
        &self,
        model: &str,
        target_model: &str,
        prompt: u64,
        completion: u64,
        cached: u64,
        cache_write: u64,
    ) -> Option<f64> {
        self.resolve(model, target_model)
            .map(|p| p.cost_usd(prompt, completion, cached, cache_write))
    }
}

/// A map key as TOML writes it: bare when it can be, quoted otherwise.
fn toml_key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        k.to_owned()
    } else {
        format!("\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, PriceConfig)]) -> BTreeMap<String, PriceConfig> {
        entries.iter().map(|(m, p)| ((*m).to_owned(), *p)).collect()
    }

    fn price(input: f64, output: f64) -> PriceConfig {
        PriceConfig {
            input,
            output,
            cached_input: None,
            cache_write: None,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn cache_read_and_write_default_to_a_tenth_and_five_quarters_of_input() {
        let p = Prices::from_config(&table(&[("m", price(2.0, 8.0))])).unwrap();
        assert_eq!(
            p.get("m"),
            Some(PriceEntry {
                input: 2.0,
                output: 8.0,
                cached_input: 0.2,
                cache_write: 2.5
            })
        );
        assert_eq!(p.get("other"), None);
    }

    #[test]
    fn cost_prices_each_kind_of_token_at_its_rate() {
        let p = Prices::from_config(&table(&[(
            "gpt-4o-mini",
            PriceConfig {
                input: 0.15,
                output: 0.60,
                cached_input: Some(0.075),
                cache_write: Some(0.1875),
            },
        )]))
        .unwrap();
        // 1M prompt tokens of which 200k cached and 100k written, 500k completion:
        // 700k * 0.15 + 200k * 0.075 + 100k * 0.1875 + 500k * 0.60, per 1M.
        let cost = p
            .cost_usd("gpt-4o-mini", "", 1_000_000, 500_000, 200_000, 100_000)
            .unwrap();
        assert!(close(cost, 0.105 + 0.015 + 0.01875 + 0.30), "{cost}");
        // 11 in, 7 out at 0.15 / 0.60.
        let small = p.cost_usd("gpt-4o-mini", "", 11, 7, 0, 0).unwrap();
        assert!(close(small, (11.0 * 0.15 + 7.0 * 0.60) / 1e6), "{small}");
        assert_eq!(p.cost_usd("gpt-4o-mini", "", 0, 0, 0, 0), Some(0.0));
    }

    #[test]
    fn cached_counts_beyond_the_prompt_are_clamped() {
        let entry = PriceEntry {
            input: 1.0,
            output: 0.0,
            cached_input: 0.5,
            cache_write: 2.0,
        };
        // Everything cached: 100 * 0.5.
        assert!(close(entry.cost_usd(100, 0, 500, 0), 50.0 / 1e6));
        // 60 cached, the 40 left written (not 100): 60 * 0.5 + 40 * 2.
        assert!(close(entry.cost_usd(100, 0, 60, 100), 110.0 / 1e6));
    }

    #[test]
    fn client_model_then_upstream_model_then_any() {
        let p = Prices::from_config(&table(&[
            ("smart", price(10.0, 10.0)),
            ("gpt-4o", price(2.5, 10.0)),
            ("*", price(1.0, 1.0)),
        ]))
        .unwrap();
        let per_token = |model: &str, target: &str| p.cost_usd(model, target, 1, 0, 0, 0);
        assert_eq!(per_token("smart", "gpt-4o"), Some(10.0 / 1e6));
        assert_eq!(per_token("alias", "gpt-4o"), Some(2.5 / 1e6));
        assert_eq!(per_token("alias", "unknown"), Some(1.0 / 1e6));
        let no_default = Prices::from_config(&table(&[("gpt-4o", price(2.5, 10.0))])).unwrap();
        assert_eq!(no_default.cost_usd("alias", "unknown", 1, 1, 0, 0), None);
        assert!(Prices::default().is_empty());
    }

    #[test]
    fn negative_or_non_finite_prices_name_the_key() {
        let cases = [
            (price(-1.0, 1.0), "prices.\"gpt-4.1\".input"),
            (price(1.0, f64::NAN), "prices.\"gpt-4.1\".output"),
            (
                PriceConfig {
                    cached_input: Some(f64::INFINITY),
                    ..price(1.0, 1.0)
                },
                "prices.\"gpt-4.1\".cached_input",
            ),
            (
                PriceConfig {
                    cache_write: Some(-0.5),
                    ..price(1.0, 1.0)
                },
                "prices.\"gpt-4.1\".cache_write",
            ),
        ];
        for (p, key) in cases {
            let err = Prices::from_config(&table(&[("gpt-4.1", p)])).unwrap_err();
            let PricesError::Invalid { key: got, reason } = &err;
            assert_eq!(got, key, "{err}");
            assert!(reason.contains(">= 0"), "{err}");
        }
        let err = Prices::from_config(&table(&[("", price(1.0, 1.0))])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "prices.\"\": the model name must not be empty"
        );
        let err = Prices::from_config(&table(&[("mini", price(-2.0, 1.0))])).unwrap_err();
        assert!(err.to_string().starts_with("prices.mini.input: "), "{err}");
    }

    #[test]
    fn file_shape_rejects_unknown_and_missing_keys() {
        let ok: BTreeMap<String, PriceConfig> =
            toml::from_str("[m]\ninput = 1\noutput = 2.5\ncached_input = 0.5\n").unwrap();
        assert_eq!(ok["m"].cached_input, Some(0.5));
        assert!(toml::from_str::<BTreeMap<String, PriceConfig>>("[m]\ninput = 1\n").is_err());
        let err = toml::from_str::<BTreeMap<String, PriceConfig>>(
            "[m]\ninput = 1\noutput = 1\ncached = 1\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `cached`"), "{err}");
    }
}
