//! Logs and metrics: the `tracing` subscriber (pretty or JSON) and the Prometheus registry
//! with the gateway's own metrics.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;

use crate::config::LogFormat;

/// Installs the global `tracing` subscriber. `RUST_LOG`, when set, overrides `level`.
/// Logs go to stderr.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: escape codes in files and pipes cost ~10% of a request.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests, `weir check` then `serve`) is harmless: keep the first.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Pretty if ansi => builder.compact().try_init(),
        // Off a terminal, fields are written as plain `name=value`: the default field
        // formatter styles every name even with colours off (~5% of a request in profiles).
        LogFormat::Pretty => builder
            .compact()
            .fmt_fields(
                tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
                    if field.name() == "message" {
                        write!(w, "{value:?}")
                    } else {
                        write!(w, "{field}={value:?}")
                    }
                })
                .delimited(" "),
            )
            .try_init(),
    };
}

/// Latency buckets in seconds, from 100 us to 2 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Gateway overhead buckets in seconds, from 5 us to 100 ms.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1,
];

/// The gateway's metrics. Cheap to clone (each metric is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders; plugins register their own metrics here too.
    pub registry: Registry,
    /// `weir_requests_total{model,provider,status}`.
    pub requests: IntCounterVec,
    /// `weir_request_duration_seconds{model}`: receipt to last byte.
    pub request_duration: HistogramVec,
    /// `weir_upstream_duration_seconds{provider}`: upstream exchange, all attempts.
    pub upstream_duration: HistogramVec,
    /// `weir_gateway_overhead_seconds{model}`: total time minus upstream time.
    pub overhead: HistogramVec,
    /// `weir_time_to_first_token_seconds{model}`: receipt to the first streamed content.
    pub ttft: HistogramVec,
    /// `weir_tokens_total{model,direction}`: `input` / `output` tokens reported by upstreams.
    pub tokens: IntCounterVec,
    /// `weir_upstream_attempts_total{provider,outcome}`: every upstream attempt, retries included.
    pub attempts: IntCounterVec,
    /// `weir_active_streams{model}`: streams in flight.
    pub active_streams: IntGaugeVec,
    /// `weir_state_healthy`: 1 while the state store serves, 0 while it fails (a full
    /// disk); set from [`crate::state::StateStore::health`] at every scrape and `/readyz`.
    /// Its companion `weir_state_write_errors_total` is [`crate::state::write_errors`].
    pub state_healthy: IntGauge,
    /// `weir_unknown_route_total{method}`: requests to a path no route serves (the path is
    /// logged at debug, never a label: it is client-controlled).
    pub unknown_routes: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "weir_requests_total",
                "Requests answered, by model, provider and HTTP status.",
            ),
            &["model", "provider", "status"],
        )?;
        let hist = |name: &str, help: &str, label: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &[label],
            )
        };
        let request_duration = hist(
            "weir_request_duration_seconds",
            "Time from receiving a request to its last byte.",
            "model",
            LATENCY_BUCKETS,
        )?;
        let upstream_duration = hist(
            "weir_upstream_duration_seconds",
            "Time spent in upstream exchanges (all attempts).",
            "provider",
            LATENCY_BUCKETS,
        )?;
        let overhead = hist(
            "weir_gateway_overhead_seconds",
            "Time the gateway adds: total minus upstream time.",
            "model",
            OVERHEAD_BUCKETS,
        )?;
        let ttft = hist(
            "weir_time_to_first_token_seconds",
            "Time from receiving a streaming request to its first content chunk.",
            "model",
            LATENCY_BUCKETS,
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "weir_tokens_total",
                "Tokens reported by upstreams, by model and direction.",
            ),
            &["model", "direction"],
        )?;
        let attempts = IntCounterVec::new(
            Opts::new(
                "weir_upstream_attempts_total",
                "Upstream attempts, by provider and outcome.",
            ),
            &["provider", "outcome"],
        )?;
        let active_streams = IntGaugeVec::new(
            Opts::new("weir_active_streams", "Streams in flight, by model."),
            &["model"],
        )?;
        let state_healthy = IntGauge::new(
            "weir_state_healthy",
            "1 while the state store serves, 0 while it is failing (e.g. a full disk).",
        )?;
        state_healthy.set(1);
        let unknown_routes = IntCounterVec::new(
            Opts::new(
                "weir_unknown_route_total",
                "Requests to a path no route serves, by HTTP method.",
            ),
            &["method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(overhead.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(active_streams.clone()))?;
        registry.register(Box::new(state_healthy.clone()))?;
        registry.register(Box::new(unknown_routes.clone()))?;
        registry.register(Box::new(crate::state::write_errors().clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            overhead,
            ttft,
            tokens,
            attempts,
            active_streams,
            state_healthy,
            unknown_routes,
        })
    }

    /// Renders every registered metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "Metrics encoding failed.");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
