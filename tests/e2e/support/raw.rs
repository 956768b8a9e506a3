//! [`RawConn`]: a plain TCP connection to the gateway for what an HTTP client will not do:
//! send nothing, stop halfway through a head or a body, or send a malformed request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One TCP connection.
pub struct RawConn {
    stream: TcpStream,
}

/// How a read to the end of the connection went.
#[derive(Debug)]
pub struct Ending {
    /// Everything the gateway sent.
    pub bytes: Vec<u8>,
    /// Whether the gateway closed the connection (EOF or reset) before the wait ran out.
    pub closed: bool,
    /// Time from the start of the read until it ended.
    pub after: Duration,
}

impl Ending {
    /// The response's status code, if a response came.
    pub fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    /// The response's body as JSON (after the blank line; not for chunked bodies).
    pub fn json(&self) -> serde_json::Value {
        let text = String::from_utf8_lossy(&self.bytes);
        let (_, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response: {text:?}"));
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?}"))
    }
}

impl RawConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawConn { stream }
    }

    /// Sends `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Sends `bytes`; an error once the gateway has closed the connection.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads until the gateway closes the connection or `wait` passes.
    pub async fn read_to_close(&mut self, wait: Duration) -> Ending {
        let started = Instant::now();
        let mut bytes = Vec::new();
        let mut buf = [0u8; 8192];
        let closed = loop {
            let left = wait.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            }
        };
        Ending {
            bytes,
            closed,
            after: started.elapsed(),
        }
    }

    /// Reads one response whose head and `content-length` body arrive within `wait`.
    pub async fn read_response(&mut self, wait: Duration) -> Vec<u8> {
        let started = Instant::now();
        let mut bytes = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            if let Some(end) = complete_response(&bytes) {
                bytes.truncate(end);
                return bytes;
            }
            let left = wait.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&buf[..n]),
                other => panic!(
                    "no complete response within {wait:?} ({other:?}): {:?}",
                    String::from_utf8_lossy(&bytes)
                ),
            }
        }
    }
}

/// The length of the first complete response in `bytes` (head plus `content-length` body).
fn complete_response(bytes: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(bytes);
    let (head, _) = text.split_once("\r\n\r\n")?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let end = head.len() + 4 + length;
    (bytes.len() >= end).then_some(end)
}
