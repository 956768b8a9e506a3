//! The result of one load run, as `load` prints it and `suite` reads it (wrk's output is
//! mapped onto the same shape).

use serde::{Deserialize, Serialize};

/// One load run's figures. Latencies are in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Requests completed inside the measured window (errors included).
    pub requests: u64,
    /// Every request that completed during the invocation, those that ended after the window
    /// included: the divisor for CPU time per request.
    pub completed: u64,
    /// Failed requests: connection errors, non-2xx statuses, broken bodies.
    pub errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// Length of the measured window in seconds.
    pub seconds: f64,
    /// Completed requests per second.
    pub rps: f64,
    /// Median time from sending the request to the end of the response.
    pub total_p50_us: f64,
    /// 99th percentile of the same.
    pub total_p99_us: f64,
    /// Median time from sending the request to the first byte of the response body
    /// (for streams: the first token). `None` where the tool cannot see it (wrk).
    pub ttfb_p50_us: Option<f64>,
    /// 99th percentile of the same.
    pub ttfb_p99_us: Option<f64>,
    /// Mean number of HTTP body frames (chunked-encoding chunks) per response. A proxy that
    /// forwards each upstream event as it arrives shows one per event; one that coalesces
    /// what it read (nginx) shows fewer.
    pub frames_per_response: Option<f64>,
}
