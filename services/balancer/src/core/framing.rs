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
//! The tracker never decides framing for hyper: when it meets something it does not follow (a
//! head hyper will reject, a line longer than it buffers) it turns itself off and reports
//! nothing more. An `Upgrade:` or `CONNECT` request is followed like any other: the backend may
//! refuse it, and then the connection carries more requests whose heads need their deadline.
//! Only the proxy knows when the connection really became a tunnel (it sent the backend's 101)
//! and says so with [`Framing::tunnel`].
//!
//! The same bytes give the same verdicts and progress however they are split into reads
//! (`fuzz_*` property tests below).

/// Where the byte stream of a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Between requests: no byte of the next head yet.
    Idle,
    /// Some bytes of a request head arrived, not all of it.
    InHead,
    /// Inside a request body.
    InBody,
    /// No longer followed: a tunnel after an accepted upgrade, or something hyper will refuse.
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

    /// The connection became a tunnel (the backend accepted an upgrade): what follows is not
    /// HTTP, and is not followed.
    pub fn tunnel(&mut self) {
        self.off();
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
                    // A head is looked at only up to its last complete line, so that how the
                    // bytes were split into reads never changes when a verdict is reached.
                    let Some(last_nl) = data[..take].iter().rposition(|&b| b == b'\n') else {
                        if self.buf.len() > self.max_head_bytes {
                            self.off();
                        }
                        return;
                    };
                    match self.parse_head(old + last_nl + 1) {
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
                    // The same limit whether the line came in one read or several.
                    if self.buf.len() > MAX_LINE {
                        self.off();
                        return;
                    }
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

    /// `Some((head length, verdict, next state))` once the head in `buf[..lines]` is complete.
    fn parse_head(&mut self, lines: usize) -> Option<(usize, HeadVerdict, St)> {
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
        let len = match req.parse(&self.buf[..lines]) {
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
            }
        }
        let verdict = HeadVerdict {
            conflicting_length: te.is_some() && cl.is_some(),
        };
        let next = match (te, cl) {
            _ if verdict.conflicting_length => St::Off,
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
        // An upgrade or CONNECT the backend refuses leaves an HTTP/1.1 connection: the next head
        // is followed (and gets its deadline). An accepted one is reported with `tunnel()`.
        let upgrade = "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        check(&format!("{upgrade}{get}"), &["ok", "ok"], Idle);
        check(&format!("{upgrade}GET / HTTP/1.1\r\n"), &["ok"], InHead);
        let connect = "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
        check(&format!("{connect}{get}GET"), &["ok", "ok"], InHead);
        check(
            &format!("POST / HTTP/1.1\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc{get}"),
            &["ok", "ok"],
            Idle,
        );
        // Heads hyper refuses end the tracking.
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

        // The same over-long line with its end in the same read (found by `fuzz_*`).
        let mut f = Framing::new(8192, 100);
        f.feed(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            &mut v,
        );
        f.feed(format!("1;{}\r\n", "e".repeat(MAX_LINE)).as_bytes(), &mut v);
        assert_eq!(f.progress(), Progress::Off);
    }

    /// A head is judged at line ends only: a bad line found early in one big read and late in
    /// small ones would give different progress for the same bytes (found by `fuzz_*`).
    #[test]
    fn a_head_is_judged_at_line_ends() {
        for pieces in [
            &["GET / HTTP/1.1\r\nGET "][..],
            &["GET / HTTP/1.1\r\n", "GET "],
        ] {
            let mut f = Framing::new(8192, 100);
            let mut v = Vec::new();
            for p in pieces {
                f.feed(p.as_bytes(), &mut v);
            }
            assert_eq!(f.progress(), Progress::InHead, "{pieces:?}");
            f.feed(b"/ HTTP/1.1\r\n", &mut v);
            assert_eq!(f.progress(), Progress::Off, "{pieces:?}");
        }
    }

    #[test]
    fn a_tunnel_is_not_followed() {
        let mut f = Framing::new(8192, 100);
        let mut v = Vec::new();
        f.feed(
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            &mut v,
        );
        assert_eq!((f.progress(), v.len()), (Progress::Idle, 1));
        f.tunnel();
        f.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET", &mut v);
        assert_eq!((f.progress(), v.len()), (Progress::Off, 1));
    }

    /// Property tests ("fuzzing" on stable): `PROPTEST_CASES` sets how many cases (256 by
    /// default; the long run uses 100000).
    mod fuzz {
        use proptest::prelude::*;
        use proptest::sample::Index;

        use super::super::*;

        /// What the tracker decided after each byte, fed one byte at a time: the reference every
        /// other split must agree with.
        struct Trace {
            progress: Vec<Progress>,
            verdicts_seen: Vec<usize>,
            verdicts: Vec<HeadVerdict>,
        }

        fn trace(bytes: &[u8], max_head: usize, max_headers: usize) -> Trace {
            let mut f = Framing::new(max_head, max_headers);
            let mut verdicts = Vec::new();
            let (mut progress, mut verdicts_seen) = (vec![f.progress()], vec![0]);
            for b in bytes {
                f.feed(std::slice::from_ref(b), &mut verdicts);
                progress.push(f.progress());
                verdicts_seen.push(verdicts.len());
            }
            Trace {
                progress,
                verdicts_seen,
                verdicts,
            }
        }

        /// Feeds `bytes` split at `cuts` and checks, at the end of every read, the same progress
        /// and verdicts as the byte-at-a-time reference; then the same for one single read.
        fn check_splits(
            bytes: &[u8],
            cuts: &[Index],
            max_head: usize,
            max_headers: usize,
        ) -> Result<(), TestCaseError> {
            let reference = trace(bytes, max_head, max_headers);
            let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            ends.push(bytes.len());
            ends.sort_unstable();
            ends.dedup();
            for ends in [ends, vec![bytes.len()]] {
                let mut f = Framing::new(max_head, max_headers);
                let mut verdicts = Vec::new();
                let mut start = 0;
                for end in ends {
                    f.feed(&bytes[start..end], &mut verdicts);
                    start = end;
                    prop_assert_eq!(f.progress(), reference.progress[end], "after byte {}", end);
                    prop_assert_eq!(
                        verdicts.len(),
                        reference.verdicts_seen[end],
                        "verdicts after byte {}",
                        end
                    );
                }
                prop_assert_eq!(&verdicts, &reference.verdicts);
            }
            Ok(())
        }

        /// Pieces of HTTP/1 requests, bodies and junk, so that streams reach every state.
        fn fragment() -> impl Strategy<Value = Vec<u8>> {
            let s = |t: &'static str| Just(t.as_bytes().to_vec());
            prop_oneof![
                4 => s("GET / HTTP/1.1\r\n"),
                4 => s("POST /x HTTP/1.1\r\n"),
                1 => s("CONNECT a:443 HTTP/1.1\r\n"),
                4 => s("Host: a\r\n"),
                3 => s("Transfer-Encoding: chunked\r\n"),
                1 => s("Transfer-Encoding: gzip, chunked\r\n"),
                1 => s("Transfer-Encoding: gzip\r\n"),
                3 => (0u64..40).prop_map(|n| format!("Content-Length: {n}\r\n").into_bytes()),
                1 => s("Content-Length: +1\r\n"),
                1 => s("Content-Length: 99999999999999999999\r\n"),
                2 => s("Upgrade: websocket\r\nConnection: upgrade\r\n"),
                6 => s("\r\n"),
                1 => s("\n"),
                1 => s("\r"),
                4 => (0u64..0x30).prop_map(|n| format!("{n:x}\r\n").into_bytes()),
                1 => (0u64..0x30).prop_map(|n| format!("{n:X};ext=1\r\n").into_bytes()),
                2 => s("0\r\n\r\n"),
                1 => s("X-Trailer: 1\r\n"),
                3 => prop::collection::vec(any::<u8>(), 0..16),
                3 => prop::collection::vec(
                    prop::sample::select(b"abcdef0123456789 :;\r\n".to_vec()),
                    0..24
                ),
                // Chunk-size and trailer lines around the tracker's line limit.
                1 => ((MAX_LINE - 6)..(MAX_LINE + 2))
                    .prop_map(|n| format!("1;{}\r\n", "e".repeat(n)).into_bytes()),
                1 => ((MAX_LINE - 8)..(MAX_LINE + 2))
                    .prop_map(|n| format!("X-T: {}\r\n", "t".repeat(n)).into_bytes()),
            ]
        }

        /// A whole request, mostly well formed: a head, then a body by its own framing (with
        /// chunk extensions and trailers of every length, around the line limit too).
        fn message() -> impl Strategy<Value = Vec<u8>> {
            let line = prop_oneof![
                Just("GET / HTTP/1.1\r\n".to_string()),
                Just("POST /up HTTP/1.1\r\n".to_string()),
                Just("CONNECT a:443 HTTP/1.1\r\n".to_string()),
                Just(
                    "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n".to_string()
                ),
            ];
            let text = |max: usize| {
                prop_oneof![
                    4 => (0..max.min(40)).prop_map(|n| "x".repeat(n)),
                    1 => ((MAX_LINE - 12)..(MAX_LINE + 4)).prop_map(|n| "x".repeat(n)),
                ]
            };
            let chunk = (
                prop::collection::vec(any::<u8>(), 1..40),
                prop::option::of(text(MAX_LINE)),
            )
                .prop_map(|(data, ext)| {
                    let ext = ext.map(|e| format!(";{e}")).unwrap_or_default();
                    let mut c = format!("{:x}{ext}\r\n", data.len()).into_bytes();
                    c.extend_from_slice(&data);
                    c.extend_from_slice(b"\r\n");
                    c
                });
            let chunked = (
                prop::collection::vec(chunk, 0..4),
                prop::collection::vec(text(MAX_LINE), 0..3),
            )
                .prop_map(|(chunks, trailers)| {
                    let mut b = b"Transfer-Encoding: chunked\r\n\r\n".to_vec();
                    b.extend(chunks.concat());
                    b.extend_from_slice(b"0\r\n");
                    for t in trailers {
                        b.extend_from_slice(format!("X-T: {t}\r\n").as_bytes());
                    }
                    b.extend_from_slice(b"\r\n");
                    b
                });
            let sized = prop::collection::vec(any::<u8>(), 0..64).prop_map(|data| {
                let mut b = format!("Content-Length: {}\r\n\r\n", data.len()).into_bytes();
                b.extend(data);
                b
            });
            let body = prop_oneof![Just(b"\r\n".to_vec()), sized, chunked];
            let headers = prop::collection::vec(fragment(), 0..4);
            (line, headers, body).prop_map(|(line, headers, body)| {
                let mut m = line.into_bytes();
                m.extend_from_slice(b"Host: a\r\n");
                m.extend(headers.concat());
                m.extend(body);
                m
            })
        }

        fn limits() -> impl Strategy<Value = (usize, usize)> {
            prop_oneof![Just((8192, 100)), (8usize..300, 1usize..8)]
        }

        proptest! {
            #[test]
            fn fuzz_framing_is_split_invariant_on_arbitrary_bytes(
                bytes in prop::collection::vec(any::<u8>(), 0..2048),
                cuts in prop::collection::vec(any::<Index>(), 0..16),
                (max_head, max_headers) in limits(),
            ) {
                check_splits(&bytes, &cuts, max_head, max_headers)?;
            }

            #[test]
            fn fuzz_framing_is_split_invariant_on_http_like_streams(
                parts in prop::collection::vec(fragment(), 0..64),
                cuts in prop::collection::vec(any::<Index>(), 0..16),
                (max_head, max_headers) in limits(),
            ) {
                check_splits(&parts.concat(), &cuts, max_head, max_headers)?;
            }

            #[test]
            fn fuzz_framing_is_split_invariant_on_request_sequences(
                parts in prop::collection::vec(
                    prop_oneof![8 => message(), 1 => fragment()],
                    0..8
                ),
                cuts in prop::collection::vec(any::<Index>(), 0..16),
                (max_head, max_headers) in limits(),
            ) {
                check_splits(&parts.concat(), &cuts, max_head, max_headers)?;
            }
        }
    }
}
