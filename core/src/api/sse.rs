//! Server-sent events: an incremental parser for upstream streams and an encoder for clients.
//!
//! The parser follows the WHATWG event-stream rules that matter for model APIs: `event:` and
//! `data:` fields, multi-line data joined with `\n`, comments (`:`) ignored, events ended by a
//! blank line, `\n`, `\r\n` and `\r` line endings, and lines split anywhere across reads.

use bytes::{Bytes, BytesMut};

/// One parsed event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, empty when absent (the default `message` type).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Error from [`SseParser`]: the upstream sent something that is not an event stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    /// A line exceeded [`MAX_LINE`] bytes without ending.
    #[error("event-stream line longer than {0} bytes")]
    LineTooLong(usize),
    /// An event's data was not UTF-8.
    #[error("event-stream data is not UTF-8")]
    NotUtf8,
}

/// Longest line accepted before the stream is declared broken (an upstream sending garbage
/// without newlines must not make us buffer forever).
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// Incremental event-stream parser: feed it bytes as they arrive, take out whole events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
    event: String,
    data: String,
    has_data: bool,
    /// The previous chunk ended with `\r`: a `\n` at the start of the next one belongs to it.
    skip_lf: bool,
}

impl SseParser {
    /// A parser with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; pushes every event they complete onto `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut input = chunk;
        // An empty read says nothing about the byte after a `\r`: keep waiting for it.
        if self.skip_lf && !input.is_empty() {
            if let Some(rest) = input.strip_prefix(b"\n") {
                input = rest;
            }
            self.skip_lf = false;
        }
        self.buf.extend_from_slice(input);
        loop {
            let Some(pos) = memchr::memchr2(b'\n', b'\r', &self.buf) else {
                if self.buf.len() > MAX_LINE {
                    return Err(SseError::LineTooLong(MAX_LINE));
                }
                return Ok(());
            };
            let line = self.buf.split_to(pos + 1);
            let ending = line[pos];
            if ending == b'\r' {
                if self.buf.first() == Some(&b'\n') {
                    let _ = self.buf.split_to(1);
                } else if self.buf.is_empty() {
                    self.skip_lf = true;
                }
            }
            self.line(&line[..pos], out)?;
        }
    }

    /// Ends the stream: an event not terminated by a blank line is discarded, as the spec says.
    pub fn finish(&mut self) {
        self.buf.clear();
        self.event.clear();
        self.data.clear();
        self.has_data = false;
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            } else {
                self.event.clear();
            }
            self.has_data = false;
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = std::str::from_utf8(value).map_err(|_| SseError::NotUtf8)?;
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Encodes `data: {json}\n\n`.
pub fn data_frame(json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(json);
    b.extend_from_slice(b"\n\n");
    b.freeze()
}

/// Encodes `event: {name}\ndata: {json}\n\n` (the Anthropic framing).
pub fn named_frame(event: &str, json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + event.len() + 16);
    b.extend_from_slice(b"event: ");
    b.extend_from_slice(event.as_bytes());
    b.extend_from_slice(b"\ndata: ");
    b.extend_from_slice(json);
    b.extend_from_slice(b"\n\n");
    b.freeze()
}

/// The OpenAI end-of-stream marker.
pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(pieces: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for piece in pieces {
            p.feed(piece, &mut out).expect("valid stream");
        }
        out
    }

    #[test]
    fn events_split_anywhere_are_reassembled() {
        let whole = b"event: a\ndata: {\"x\":1}\n\n: comment\ndata: l1\ndata: l2\n\n";
        let expect = vec![
            SseEvent {
                event: "a".into(),
                data: "{\"x\":1}".into(),
            },
            SseEvent {
                event: String::new(),
                data: "l1\nl2".into(),
            },
        ];
        for cut in 0..whole.len() {
            assert_eq!(
                parse_all(&[&whole[..cut], &whole[cut..]]),
                expect,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        assert_eq!(
            parse_all(&[b"data: a\r", b"\n\r\ndata: b\r\r"]),
            vec![
                SseEvent {
                    event: String::new(),
                    data: "a".into()
                },
                SseEvent {
                    event: String::new(),
                    data: "b".into()
                },
            ]
        );
    }

    #[test]
    fn empty_read_between_cr_and_lf_keeps_one_line_ending() {
        // Found by the fuzz target `sse_parser`: an empty read after a `\r` forgot that a
        // `\n` may still follow, and the `\n` then ended the event early.
        let whole = parse_all(&[b"data: a\r\ndata: b\n\n"]);
        assert_eq!(parse_all(&[b"data: a\r", b"", b"\ndata: b\n\n"]), whole);
    }

    #[test]
    fn unterminated_line_is_bounded() {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        let big = vec![b'x'; MAX_LINE + 1];
        assert_eq!(p.feed(&big, &mut out), Err(SseError::LineTooLong(MAX_LINE)));
    }

    #[test]
    fn event_without_data_is_dropped() {
        assert_eq!(parse_all(&[b"event: ping\n\n"]), vec![]);
    }
}
