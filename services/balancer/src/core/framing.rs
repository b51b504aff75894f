//! HTTP/1 request framing, followed byte by byte on the client side of a connection.
//!
//! hyper parses the requests; this tracker follows the same byte stream beside it for two things
//! hyper does not offer:
//! - **Conflicting framing.** hyper resolves a request carrying both `Content-Length` and
//!   `Transfer-Encoding` as RFC 9112 allows (drops the length, closes afterwards) and hides the
//!   dropped header. The balancer rejects such a request with 400 instead, so the verdict for
//!   every request head is recorded here, in order.
//! - **Timeouts.** Whether the connection sits between requests, inside a request head (a slow
//!   head gets 408) or inside a body.
//!
//! The tracker never decides framing for hyper: when it meets something it does not follow (an
//! upgrade, a head hyper will reject) it turns itself off and reports nothing more.

/// Where the byte stream of a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Between requests: no byte of the next head yet.
    Idle,
    /// Some bytes of a request head arrived, not all of it.
    InHead,
    /// Inside a request body.
    InBody,
    /// No longer followed (upgrade, CONNECT, or something hyper will refuse).
    Off,
}

/// What the tracker concluded about one complete request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadVerdict {
    /// Both `Content-Length` and `Transfer-Encoding`: must be refused, never forwarded.
    pub conflicting_length: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum St {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    Off,
}

/// Longest chunk-size or trailer line followed; longer ones turn the tracker off.
const MAX_LINE: usize = 4096;

#[derive(Debug)]
pub struct Framing {
    st: St,
    /// The head so far (state `Head`), or the current line (chunk size, trailers).
    buf: Vec<u8>,
    max_head_bytes: usize,
    max_headers: usize,
}

impl Framing {
    pub fn new(max_head_bytes: usize, max_headers: usize) -> Framing {
        Framing {
            st: St::Head,
            buf: Vec::new(),
            max_head_bytes,
            max_headers,
        }
    }

    pub fn progress(&self) -> Progress {
        match self.st {
            St::Head if self.buf.is_empty() => Progress::Idle,
            St::Head => Progress::InHead,
            St::Off => Progress::Off,
            _ => Progress::InBody,
        }
    }

    /// Follow `data`, the next bytes read from the client; pushes one verdict per complete head.
    pub fn feed(&mut self, mut data: &[u8], verdicts: &mut impl Extend<HeadVerdict>) {
        while !data.is_empty() {
            match self.st {
                St::Off => return,
                St::Head => {
                    if self.buf.is_empty() {
                        // Empty lines before a request line are allowed (RFC 9112 §2.2).
                        let skip = data
                            .iter()
                            .position(|&b| b != b'\r' && b != b'\n')
                            .unwrap_or(data.len());
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let old = self.buf.len();
                    let room = (self.max_head_bytes + 1).saturating_sub(old);
                    let take = data.len().min(room);
                    self.buf.extend_from_slice(&data[..take]);
                    if !data[..take].contains(&b'\n') {
                        if self.buf.len() > self.max_head_bytes {
                            self.off();
                        }
                        return;
                    }
                    match self.parse_head() {
                        Some((len, verdict, next)) => {
                            verdicts.extend(Some(verdict));
                            // Bytes of this feed past the end of the head belong to what follows.
                            let used = len - old;
                            data = &data[used..];
                            self.buf.clear();
                            self.st = next;
                        }
                        None => {
                            if self.buf.len() > self.max_head_bytes {
                                self.off();
                            }
                            return;
                        }
                    }
                }
                St::Body(n) => {
                    let k = (data.len() as u64).min(n);
                    data = &data[k as usize..];
                    self.st = if n == k { St::Head } else { St::Body(n - k) };
                }
                St::ChunkData(n) => {
                    let k = (data.len() as u64).min(n);
                    data = &data[k as usize..];
                    self.st = if n == k {
                        St::ChunkDataEnd
                    } else {
                        St::ChunkData(n - k)
                    };
                }
                St::ChunkSize | St::ChunkDataEnd | St::Trailers => {
                    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                        self.buf.extend_from_slice(data);
                        if self.buf.len() > MAX_LINE {
                            self.off();
                        }
                        return;
                    };
                    self.buf.extend_from_slice(&data[..nl]);
                    data = &data[nl + 1..];
                    let line = std::mem::take(&mut self.buf);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.st = match self.st {
                        St::ChunkDataEnd if line.is_empty() => St::ChunkSize,
                        St::ChunkDataEnd => St::Off,
                        St::ChunkSize => match chunk_size(line) {
                            Some(0) => St::Trailers,
                            Some(n) => St::ChunkData(n),
                            None => St::Off,
                        },
                        _ if line.is_empty() => St::Head,
                        _ => St::Trailers,
                    };
                }
            }
        }
    }

    fn off(&mut self) {
        self.st = St::Off;
        self.buf = Vec::new();
    }

    /// `Some((head length, verdict, next state))` once the head in `buf` is complete.
    fn parse_head(&mut self) -> Option<(usize, HeadVerdict, St)> {
        // Up to STACK headers without an allocation (the default limit is 100).
        const STACK: usize = 128;
        let mut on_stack = [httparse::EMPTY_HEADER; STACK];
        let mut on_heap = Vec::new();
        let headers = if self.max_headers <= STACK {
            &mut on_stack[..self.max_headers]
        } else {
            on_heap.resize(self.max_headers, httparse::EMPTY_HEADER);
            &mut on_heap[..]
        };
        let mut req = httparse::Request::new(headers);
        let len = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            // hyper refuses the same head (400/431); nothing more to follow.
            Err(_) => {
                self.off();
                return None;
            }
        };
        let mut te = None::<bool>; // Some(final encoding is chunked)
        let mut cl = None::<Option<u64>>; // Some(parsed length, None if invalid or unequal)
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
                te = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok());
                cl = Some(match cl {
                    None => v,
                    Some(prev) if prev == v => v,
                    Some(_) => None,
                });
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let verdict = HeadVerdict {
            conflicting_length: te.is_some() && cl.is_some(),
        };
        let next = match (te, cl) {
            _ if verdict.conflicting_length || upgrade => St::Off,
            (Some(true), None) => St::ChunkSize,
            (Some(false), None) => St::Off,
            (None, Some(Some(0))) | (None, None) => St::Head,
            (None, Some(Some(n))) => St::Body(n),
            (None, Some(None)) => St::Off,
            (Some(_), Some(_)) => St::Off,
        };
        Some((len, verdict, next))
    }
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let end = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let hex = &line[..end];
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    let s = std::str::from_utf8(hex).ok()?;
    u64::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of every size from 1 to its length; every split must give the
    /// same verdicts (`ok`/`CONFLICT`, one per head) and the same final progress.
    fn check(input: &str, expected: &[&str], progress: Progress) {
        let bytes = input.as_bytes();
        for piece in 1..=bytes.len().max(1) {
            let mut f = Framing::new(8192, 100);
            let mut v = Vec::new();
            for chunk in bytes.chunks(piece) {
                f.feed(chunk, &mut v);
            }
            let got: Vec<&str> = v
                .iter()
                .map(|v| {
                    if v.conflicting_length {
                        "CONFLICT"
                    } else {
                        "ok"
                    }
                })
                .collect();
            assert_eq!(got, expected, "pieces of {piece}: {input:?}");
            assert_eq!(f.progress(), progress, "pieces of {piece}: {input:?}");
        }
    }

    #[test]
    fn framing_table() {
        use Progress::*;
        let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        check("", &[], Idle);
        check(get, &["ok"], Idle);
        check(&format!("\r\n{get}{get}{get}"), &["ok", "ok", "ok"], Idle);
        check("GET / HTTP/1.1\r\nHost: a\r\n", &[], InHead);
        check("GET / HTTP/1.1\nHost: a\n\n", &["ok"], Idle);
        // A body that looks like a conflicting head is body, not a head.
        let smuggled =
            "POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        );
        check(&format!("{body}{get}"), &["ok", "ok"], Idle);
        check(&body[..body.len() - 3], &["ok"], InBody);
        // Chunked bodies, with extensions and trailers, then the next request.
        let chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                       5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n";
        check(&format!("{chunked}{get}"), &["ok", "ok"], Idle);
        check(&chunked[..chunked.len() - 2], &["ok"], InBody);
        // Conflicts, in either order and with any casing, are flagged; then nothing is followed.
        check(smuggled, &["CONFLICT"], Off);
        check(
            &format!(
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-LENGTH: 3\r\n\r\n{get}"
            ),
            &["CONFLICT"],
            Off,
        );
        check(&format!("{get}{smuggled}"), &["ok", "CONFLICT"], Off);
        // Upgrades and heads hyper refuses end the tracking.
        check(
            &format!("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n{get}"),
            &["ok"],
            Off,
        );
        check("GET / HTTP/1.1\r\nBad Header\r\n\r\n", &[], Off);
        check(
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nxx",
            &["ok"],
            Off,
        );
        check(
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            &["ok"],
            Off,
        );
    }

    #[test]
    fn oversized_heads_and_lines_turn_tracking_off() {
        let mut f = Framing::new(64, 100);
        let mut v = Vec::new();
        f.feed(
            format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(100)).as_bytes(),
            &mut v,
        );
        assert_eq!((f.progress(), v.len()), (Progress::Off, 0));

        let mut f = Framing::new(8192, 3);
        f.feed(
            b"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\n\r\n",
            &mut v,
        );
        assert_eq!((f.progress(), v.len()), (Progress::Off, 0));

        let mut f = Framing::new(8192, 100);
        f.feed(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            &mut v,
        );
        f.feed("f".repeat(MAX_LINE + 2).as_bytes(), &mut v);
        assert_eq!(f.progress(), Progress::Off);
    }
}
