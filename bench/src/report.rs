//! Result shapes: one load run, as `load` prints it and `suite` reads it (wrk's output is
//! mapped onto the same shape), and the hot-reload series, with the markdown tables of the
//! latter.

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

/// Resident memory of one gateway over a series of hot reloads, each of which built a new
/// snapshot, with a little traffic after each.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadRss {
    /// Row label (`Weir, no plugins`, ...).
    pub target: String,
    /// RSS right after start, before any request, KiB.
    pub idle_kib: u64,
    /// RSS after this many reloads, KiB, in order.
    pub checkpoints: Vec<(u32, u64)>,
    /// Generations accepted during the series (one per reload when all went well).
    pub generations: u64,
    /// Requests sent between reloads.
    pub requests: u64,
    /// Those that failed (transport error or a status other than 200).
    pub failures: u64,
    /// The first failure, for the report.
    pub first_failure: Option<String>,
}

impl ReloadRss {
    /// RSS after the last checkpoint, KiB.
    pub fn last_kib(&self) -> Option<u64> {
        self.checkpoints.last().map(|&(_, k)| k)
    }

    /// Growth between the first and the last checkpoint, KiB (negative when it shrank).
    pub fn growth_after_first_kib(&self) -> Option<i64> {
        let first = self.checkpoints.first()?.1;
        Some(self.last_kib()? as i64 - first as i64)
    }
}

/// One series of hot reloads under light load: for each file write, the time until the
/// admin API reports the new generation, until the first response served by it, and the
/// gateway's own build time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadLatency {
    /// How the reload was triggered (`file watcher, debounce 50 ms`, ...).
    pub trigger: String,
    /// The watcher's quiet period in force, ms; `None` for an admin call.
    pub debounce_ms: Option<u64>,
    /// Write -> `GET /admin/status` reports the new generation, ms, one per write.
    pub to_generation_ms: Vec<f64>,
    /// Write -> the first response carrying the new version's marker, ms.
    pub to_answer_ms: Vec<f64>,
    /// The gateway's own `reload.last.duration_ms` (read, hash, build, swap), ms.
    pub build_ms: Vec<f64>,
    /// Requests of the background load during the series.
    pub requests: u64,
    /// Those that failed.
    pub failures: u64,
    /// The first failure, for the report.
    pub first_failure: Option<String>,
    /// Length of the series, s.
    pub seconds: f64,
}

/// The `p`-th percentile (0-100) of `v` by nearest rank; NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// The largest value of `v`; NaN when empty.
pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn signed_mib(kib: i64) -> String {
    format!("{:+.1} MiB", kib as f64 / 1024.0)
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.0} ms")
    }
}

/// The aim of issue 4 for a six-plugin reload, write to live, ms.
pub const RELOAD_AIM_MS: f64 = 300.0;

/// The "Hot reload" table: one row per series, p50 and max of each time, against
/// [`RELOAD_AIM_MS`]. `note` (the setup) goes above the table.
pub fn render_reload_latency(series: &[ReloadLatency], note: &str) -> String {
    let mut s = format!("{note}\n\n");
    s.push_str(
        "| Trigger | Reloads | Write -> generation p50 | max | Write -> first new answer p50 | max | Gateway build p50 | max | Requests (failed) | Aim: first new answer <= 300 ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for x in series {
        let worst = max(&x.to_answer_ms);
        let met = if worst <= RELOAD_AIM_MS {
            "met (max)"
        } else if percentile(&x.to_answer_ms, 50.0) <= RELOAD_AIM_MS {
            "**p50 only**"
        } else {
            "**no**"
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {met} |\n",
            x.trigger,
            x.to_answer_ms.len(),
            ms(percentile(&x.to_generation_ms, 50.0)),
            ms(max(&x.to_generation_ms)),
            ms(percentile(&x.to_answer_ms, 50.0)),
            ms(worst),
            ms(percentile(&x.build_ms, 50.0)),
            ms(max(&x.build_ms)),
            x.requests,
            x.failures,
        ));
    }
    for x in series.iter().filter(|x| x.failures > 0) {
        s.push_str(&format!(
            "\n{}: first failed request: {}\n",
            x.trigger,
            x.first_failure.as_deref().unwrap_or("?")
        ));
    }
    s
}

/// The "Memory over hot reloads" table: RSS after start and after each checkpoint, and the
/// growth. `note` goes above the table.
pub fn render_reload_rss(rows: &[ReloadRss], note: &str) -> String {
    let mut s = format!("{note}\n\n");
    let points: Vec<u32> = rows
        .first()
        .map(|r| r.checkpoints.iter().map(|&(n, _)| n).collect())
        .unwrap_or_default();
    let (first, last) = (
        points.first().copied().unwrap_or(0),
        points.last().copied().unwrap_or(0),
    );
    s.push_str("| Target | RSS after start |");
    for n in &points {
        s.push_str(&format!(" After {n} reloads |"));
    }
    s.push_str(&format!(
        " Growth from start | Growth {first} -> {last} reloads | Generations | Requests (failed) |\n|---|---:|"
    ));
    for _ in &points {
        s.push_str("---:|");
    }
    s.push_str("---:|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&format!("| {} | {} |", r.target, mib(r.idle_kib)));
        for &(_, k) in &r.checkpoints {
            s.push_str(&format!(" {} |", mib(k)));
        }
        let from_start = r
            .last_kib()
            .map_or_else(|| "-".into(), |k| signed_mib(k as i64 - r.idle_kib as i64));
        let flat = r
            .growth_after_first_kib()
            .map_or_else(|| "-".into(), signed_mib);
        s.push_str(&format!(
            " {from_start} | {flat} | {} | {} ({}) |\n",
            r.generations, r.requests, r.failures
        ));
    }
    for r in rows.iter().filter(|r| r.failures > 0) {
        s.push_str(&format!(
            "\n{}: first failed request: {}\n",
            r.target,
            r.first_failure.as_deref().unwrap_or("?")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 100.0), 5.0);
        assert_eq!(percentile(&[2.0, 1.0], 50.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(max(&v), 5.0);
    }
}
