//! A small closed-loop HTTP/1.1 load generator that sees what `wrk` cannot: the time to the
//! first body byte of a response (for a stream, the first token) as well as the total time,
//! and how many HTTP body frames a response arrived in (a proxy that forwards each event as
//! it comes shows one frame per event). With `--vary`, a placeholder in the body becomes a
//! per-request counter, so no two requests are alike (a cache plugin always misses).
//!
//! `--concurrency` connections each send the same POST back to back (keep-alive) for
//! `--duration` seconds after `--warmup` seconds; the result is one JSON object
//! ([`weir_bench::report::LoadResult`]) on stdout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use weir_bench::report::LoadResult;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "load",
    about = "Closed-loop HTTP/1.1 load generator with first-byte timing"
)]
struct Args {
    /// Target URL, `http://127.0.0.1:PORT/path` (plain HTTP, IP literal).
    #[arg(long)]
    url: Uri,
    /// File holding the JSON request body.
    #[arg(long)]
    body: PathBuf,
    /// Extra request header, `name: value`; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Connections, each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 16)]
    concurrency: usize,
    /// Measured seconds.
    #[arg(long, short = 'd', default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Runtime threads; 1 runs a current-thread runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Replace this placeholder in the body with a per-request counter (empty: send the
    /// body as is).
    #[arg(long, default_value = weir_bench::bodies::COUNTER)]
    vary: String,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

/// What every connection needs.
struct Target {
    addr: SocketAddr,
    authority: HeaderValue,
    path: Uri,
    /// The body, split at the counter placeholder (`tail` is `None` without one).
    head: Bytes,
    tail: Option<Bytes>,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
}

/// One connection's tallies.
struct Stats {
    total: Histogram<u64>,
    ttfb: Histogram<u64>,
    reads: u64,
    measured: u64,
    in_window: u64,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Stats {
    fn new() -> anyhow::Result<Self> {
        Ok(Stats {
            total: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            ttfb: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            reads: 0,
            measured: 0,
            in_window: 0,
            completed: 0,
            errors: 0,
            first_error: None,
        })
    }

    fn error(&mut self, measured: bool, e: impl std::fmt::Display) {
        if measured {
            self.errors += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    fn merge(&mut self, other: Stats) -> anyhow::Result<()> {
        self.total.add(&other.total)?;
        self.ttfb.add(&other.ttfb)?;
        self.reads += other.reads;
        self.measured += other.measured;
        self.in_window += other.in_window;
        self.completed += other.completed;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let target = Arc::new(target(&args)?);
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let result = runtime.block_on(run(&args, target))?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn target(args: &Args) -> anyhow::Result<Target> {
    let authority = args.url.authority().context("the URL needs host:port")?;
    let port = authority.port_u16().unwrap_or(80);
    let ip: std::net::IpAddr = authority
        .host()
        .parse()
        .context("the URL host must be an IP literal")?;
    let path = args
        .url
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()?;
    let body =
        std::fs::read(&args.body).with_context(|| format!("reading {}", args.body.display()))?;
    let split = if args.vary.is_empty() {
        None
    } else {
        memchr::memmem::find(&body, args.vary.as_bytes())
    };
    let (head, tail) = match split {
        Some(i) => (
            Bytes::copy_from_slice(&body[..i]),
            Some(Bytes::copy_from_slice(&body[i + args.vary.len()..])),
        ),
        None => (Bytes::from(body), None),
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("header '{h}' needs name: value"))?;
        headers.push((
            HeaderName::try_from(k.trim())?,
            HeaderValue::try_from(v.trim())?,
        ));
    }
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        authority: HeaderValue::try_from(authority.as_str())?,
        path,
        head,
        tail,
        headers,
        timeout: Duration::from_secs_f64(args.timeout),
    })
}

async fn run(args: &Args, target: Arc<Target>) -> anyhow::Result<LoadResult> {
    let start = Instant::now();
    let window_start = start + Duration::from_secs_f64(args.warmup);
    let window_end = window_start + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|id| tokio::spawn(connection(target.clone(), id, window_start, window_end)))
        .collect();
    let mut all = Stats::new()?;
    for t in tasks {
        all.merge(t.await??)?;
    }
    let seconds = args.duration;
    let us = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64
        }
    };
    Ok(LoadResult {
        requests: all.measured,
        completed: all.completed,
        errors: all.errors,
        first_error: all.first_error,
        seconds,
        rps: all.in_window as f64 / seconds,
        total_p50_us: us(&all.total, 0.5),
        total_p99_us: us(&all.total, 0.99),
        ttfb_p50_us: Some(us(&all.ttfb, 0.5)),
        ttfb_p99_us: Some(us(&all.ttfb, 0.99)),
        frames_per_response: Some(if all.measured == 0 {
            0.0
        } else {
            all.reads as f64 / all.measured as f64
        }),
    })
}

async fn connect(t: &Target) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(t.addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The body of request number `n` of connection `id`.
fn body(t: &Target, id: usize, n: u64) -> Bytes {
    match &t.tail {
        None => t.head.clone(),
        Some(tail) => {
            let counter = format!("{id}-{n}");
            let mut b = Vec::with_capacity(t.head.len() + counter.len() + tail.len());
            b.extend_from_slice(&t.head);
            b.extend_from_slice(counter.as_bytes());
            b.extend_from_slice(tail);
            Bytes::from(b)
        }
    }
}

/// One keep-alive connection sending requests back to back until `window_end`.
async fn connection(
    t: Arc<Target>,
    id: usize,
    window_start: Instant,
    window_end: Instant,
) -> anyhow::Result<Stats> {
    let mut n = 0u64;
    let mut stats = Stats::new()?;
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    while Instant::now() < window_end {
        let measured = Instant::now() >= window_start;
        let mut s = match sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => match connect(&t).await {
                Ok(s) => s,
                Err(e) => {
                    stats.error(measured, format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if s.ready().await.is_err() {
            continue;
        }
        n += 1;
        let mut req = Request::post(t.path.clone()).body(Full::new(body(&t, id, n)))?;
        let h = req.headers_mut();
        h.insert(header::HOST, t.authority.clone());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (k, v) in &t.headers {
            h.insert(k.clone(), v.clone());
        }
        let sent = Instant::now();
        let outcome = tokio::time::timeout(t.timeout, exchange(&mut s, req, sent)).await;
        let done = Instant::now();
        stats.completed += 1;
        if done >= window_start && done <= window_end {
            stats.in_window += 1;
        }
        match outcome {
            Ok(Ok((ttfb, reads))) => {
                sender = Some(s);
                if measured {
                    stats.measured += 1;
                    stats.reads += reads;
                    let micros =
                        |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
                    stats.total.saturating_record(micros(done - sent));
                    stats.ttfb.saturating_record(micros(ttfb));
                }
            }
            Ok(Err(e)) => {
                if measured {
                    stats.measured += 1;
                }
                stats.error(measured, e);
            }
            Err(_) => {
                if measured {
                    stats.measured += 1;
                }
                stats.error(measured, "timeout");
            }
        }
    }
    Ok(stats)
}

/// Sends one request and reads the whole body: (time to first body byte, body reads).
async fn exchange(
    s: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    sent: Instant,
) -> anyhow::Result<(Duration, u64)> {
    let resp = s.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut first = None;
    let mut reads = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if frame.data_ref().is_some_and(|d| !d.is_empty()) {
            first.get_or_insert_with(|| sent.elapsed());
            reads += 1;
        }
    }
    if !status.is_success() {
        anyhow::bail!("status {status}");
    }
    Ok((first.unwrap_or_else(|| sent.elapsed()), reads))
}
