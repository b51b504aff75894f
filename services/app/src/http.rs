//! The application's HTTP/1.1 server: hyper on tokio, keep-alive on (nginx keeps upstream
//! connections open), with hard limits. The handler sees a whole [`Request`] (head and a body of
//! at most [`MAX_BODY`]) and returns a whole [`Response`].
//!
//! What hyper does for us, tested below: a head larger than [`MAX_HEAD`] gets 431; conflicting
//! `Content-Length` values (two headers, or a list) get 400 and the connection is closed;
//! identical duplicates are read as one (RFC 9112 §6.3: the framing is the same); with both
//! `Transfer-Encoding: chunked` and `Content-Length` the body is read chunked and the connection
//! closed after the answer; a response to HEAD carries the GET answer's headers and no body.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Longest accepted request head (request line + headers): hyper's read buffer, 431 beyond.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Longest accepted request body: 413 beyond.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// What a connection over [`Limits::max_connections`] gets before it is closed.
const REFUSED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

/// The server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Connections open at once, idle keep-alive ones included; a connection beyond gets 503
    /// and is closed.
    pub(crate) max_connections: usize,
    /// Requests handled at once; a request beyond gets 503 at once (the connection stays).
    pub(crate) max_requests: usize,
    /// A request head must arrive within this long, counted from the connection's start or
    /// from the end of the previous answer: it is also how long an idle keep-alive connection
    /// stays open (hyper's `header_read_timeout`).
    pub(crate) head_timeout: Duration,
    /// The whole body must arrive within this long after the head (408 otherwise).
    pub(crate) body_timeout: Duration,
}

/// A request as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) method: String,
    /// The path without the query string.
    pub(crate) path: String,
    /// The query string (after `?`), empty when there is none.
    pub(crate) query: String,
    /// Lower-case names.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Bytes,
}

impl Request {
    /// The first value of header `name` (lower case).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The decoded value of query parameter `name`, if present.
    pub(crate) fn query_param(&self, name: &str) -> Option<String> {
        form_value(self.query.as_bytes(), name)
    }

    /// Whether the client asked for JSON rather than a page.
    pub(crate) fn wants_json(&self) -> bool {
        self.path.ends_with(".json")
            || self
                .header("accept")
                .is_some_and(|a| a.contains("application/json"))
            || self
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/json"))
    }

    fn from_hyper(parts: &http::request::Parts, body: Bytes) -> Request {
        Request {
            method: parts.method.as_str().to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    let value = String::from_utf8_lossy(v.as_bytes()).trim().to_string();
                    (n.as_str().to_string(), value)
                })
                .collect(),
            body,
        }
    }
}

/// The decoded value of field `name` in `application/x-www-form-urlencoded` text.
pub(crate) fn form_value(text: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(text)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A response; `Content-Length` and `Date` are hyper's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) location: Option<String>,
    /// `Retry-After` in seconds (429, 503).
    pub(crate) retry_after: Option<u64>,
    /// Close the connection after this answer (its request's framing cannot be trusted).
    pub(crate) close: bool,
    pub(crate) body: Bytes,
}

impl Response {
    /// A response with `body` of `content_type`.
    pub(crate) fn new(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response {
        Response {
            status,
            content_type,
            location: None,
            retry_after: None,
            close: false,
            body: body.into(),
        }
    }

    /// `value` as JSON, one line.
    pub(crate) fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec(value).unwrap_or_default();
        body.push(b'\n');
        Response::new(status, "application/json", body)
    }

    /// `text` and a newline, as plain text.
    pub(crate) fn text(status: u16, text: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{text}\n"))
    }

    /// 303 to `to`.
    pub(crate) fn redirect(to: &str) -> Response {
        Response {
            location: Some(to.to_string()),
            ..Response::new(303, "text/plain; charset=utf-8", "")
        }
    }

    fn closing(self) -> Response {
        Response {
            close: true,
            ..self
        }
    }

    fn into_hyper(self) -> hyper::Response<Full<Bytes>> {
        let mut r = hyper::Response::new(Full::new(self.body));
        *r.status_mut() = hyper::StatusCode::from_u16(self.status)
            .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(location) = self.location.and_then(|l| HeaderValue::try_from(l).ok()) {
            h.insert(LOCATION, location);
        }
        if let Some(seconds) = self.retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.close {
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// What answers requests.
pub(crate) trait Handler: Send + Sync + 'static {
    /// The answer to `request` from `peer` (the connection's; the client may be behind it).
    fn handle(&self, request: Request, peer: IpAddr) -> impl Future<Output = Response> + Send;
}

/// Serves `listener` until the task is dropped; errors of single connections are logged at
/// debug level and end only that connection.
pub(crate) async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, limits: Limits) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let requests = Arc::new(Semaphore::new(limits.max_requests));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&connections).try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (handler, requests) = (Arc::clone(&handler), Arc::clone(&requests));
        tokio::spawn(connection(
            stream,
            peer.ip(),
            handler,
            requests,
            limits,
            slot,
        ));
    }
}

/// A 503 and a close, without a task: what already arrived is read first, since closing a
/// socket with unread bytes sends a reset that can destroy the answer before it is read.
fn refuse(stream: TcpStream) {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = stream.into_std() else {
        return;
    };
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = stream.write_all(REFUSED_RESPONSE);
}

async fn connection<H: Handler>(
    stream: TcpStream,
    peer: IpAddr,
    handler: Arc<H>,
    requests: Arc<Semaphore>,
    limits: Limits,
    _slot: OwnedSemaphorePermit,
) {
    let service = service_fn(move |req| {
        let (handler, requests) = (Arc::clone(&handler), Arc::clone(&requests));
        async move {
            Ok::<_, Infallible>(
                respond(req, peer, &*handler, &requests, limits)
                    .await
                    .into_hyper(),
            )
        }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

async fn respond<H: Handler>(
    req: hyper::Request<Incoming>,
    peer: IpAddr,
    handler: &H,
    requests: &Semaphore,
    limits: Limits,
) -> Response {
    let Ok(_permit) = requests.try_acquire() else {
        return Response::text(503, "busy: too many requests at once");
    };
    let (parts, body) = req.into_parts();
    let too_large = || Response::text(413, "request body too large").closing();
    if body
        .size_hint()
        .exact()
        .is_some_and(|n| n > MAX_BODY as u64)
    {
        return too_large();
    }
    let body =
        match tokio::time::timeout(limits.body_timeout, Limited::new(body, MAX_BODY).collect())
            .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Ok(Err(_)) => return Response::text(400, "malformed request body").closing(),
            Err(_) => {
                return Response::text(
                    408,
                    &format!(
                        "the request body did not arrive within {} s",
                        limits.body_timeout.as_secs()
                    ),
                )
                .closing()
            }
        };
    handler
        .handle(Request::from_hyper(&parts, body), peer)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::SocketAddr;

    /// Echoes method, path, query and body; `/wait` waits for the test's signal first, `/page`
    /// is a fixed text.
    struct Echo {
        release: Arc<Semaphore>,
        waiting: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Handler for Echo {
        async fn handle(&self, r: Request, _peer: IpAddr) -> Response {
            match r.path.as_str() {
                "/wait" => {
                    self.waiting
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = self.release.acquire().await.map(|p| p.forget());
                }
                "/page" => return Response::text(200, "the same page for GET and HEAD"),
                _ => {}
            }
            let body = format!(
                "{} {} {} {}",
                r.method,
                r.path,
                r.query,
                String::from_utf8_lossy(&r.body)
            );
            Response::text(200, &body)
        }
    }

    const TEST_LIMITS: Limits = Limits {
        max_connections: 4,
        max_requests: 2,
        head_timeout: Duration::from_millis(400),
        body_timeout: Duration::from_millis(300),
    };

    struct Server {
        addr: SocketAddr,
        release: Arc<Semaphore>,
        waiting: Arc<std::sync::atomic::AtomicUsize>,
        _runtime: tokio::runtime::Runtime,
    }

    fn start(limits: Limits) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let release = Arc::new(Semaphore::new(0));
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let handler = Arc::new(Echo {
            release: Arc::clone(&release),
            waiting: Arc::clone(&waiting),
        });
        runtime.spawn(serve(listener, handler, limits));
        Server {
            addr,
            release,
            waiting,
            _runtime: runtime,
        }
    }

    /// A client connection that reads whole answers (Content-Length framed).
    struct Conn(std::net::TcpStream, Vec<u8>);

    impl Conn {
        fn open(addr: SocketAddr) -> Conn {
            let s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            Conn(s, Vec::new())
        }

        fn send(&mut self, raw: &str) {
            self.0.write_all(raw.as_bytes()).unwrap();
        }

        /// The next answer's head and body; the body is read only when `body` is true.
        fn answer(&mut self, body: bool) -> (String, String) {
            loop {
                if let Some(end) = self.1.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8(self.1[..end].to_vec()).unwrap();
                    let length =
                        header(&head, "content-length").map_or(0, |l| l.parse::<usize>().unwrap());
                    let want = end + 4 + if body { length } else { 0 };
                    while self.1.len() < want {
                        self.fill();
                    }
                    let text = String::from_utf8(self.1[end + 4..want].to_vec()).unwrap();
                    self.1.drain(..want);
                    return (head, text);
                }
                self.fill();
            }
        }

        fn fill(&mut self) {
            let mut buf = [0u8; 4096];
            let n = self.0.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "closed before a whole answer: {:?}",
                String::from_utf8_lossy(&self.1)
            );
            self.1.extend_from_slice(&buf[..n]);
        }

        /// Whether the server closed the connection (nothing more to read).
        fn closed(&mut self) -> bool {
            let mut buf = [0u8; 64];
            match self.0.read(&mut buf) {
                Ok(n) => n == 0,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn status(head: &str) -> &str {
        head.split(' ').nth(1).unwrap_or("")
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        let server = start(TEST_LIMITS);
        let mut c = Conn::open(server.addr);
        c.send("GET /a?x=1 HTTP/1.1\r\nHost: app\r\n\r\n");
        let (head, body) = c.answer(true);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(header(&head, "connection"), None, "{head}");
        assert_eq!(header(&head, "cache-control"), Some("no-store"));
        assert_eq!(body, "GET /a x=1 \n");
        c.send("POST /b HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello");
        let (head, body) = c.answer(true);
        assert_eq!(status(&head), "200");
        assert_eq!(body, "POST /b  hello\n");
        // Two requests sent at once (pipelined) are answered in order on the same connection.
        c.send("GET /c HTTP/1.1\r\nHost: app\r\n\r\nGET /d HTTP/1.1\r\nHost: app\r\n\r\n");
        assert_eq!(c.answer(true).1, "GET /c  \n");
        assert_eq!(c.answer(true).1, "GET /d  \n");
        // A client that asks to close is answered and closed.
        c.send("GET /e HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
        let (head, _) = c.answer(true);
        assert_eq!(header(&head, "connection"), Some("close"), "{head}");
        assert!(c.closed());
    }

    #[test]
    fn head_is_answered_without_a_body() {
        let server = start(TEST_LIMITS);
        let mut c = Conn::open(server.addr);
        c.send("GET /page HTTP/1.1\r\nHost: app\r\n\r\n");
        let (get, get_body) = c.answer(true);
        c.send("HEAD /page HTTP/1.1\r\nHost: app\r\n\r\n");
        let (head, _) = c.answer(false);
        assert_eq!(status(&head), "200");
        assert_eq!(
            header(&head, "content-length"),
            header(&get, "content-length"),
            "{head}"
        );
        assert!(!get_body.is_empty());
        // Nothing follows the head: the next answer starts right away.
        c.send("GET /next HTTP/1.1\r\nHost: app\r\n\r\n");
        let (next, body) = c.answer(true);
        assert!(next.starts_with("HTTP/1.1 200 OK\r\n"), "{next}");
        assert_eq!(body, "GET /next  \n");
    }

    #[test]
    fn conflicting_content_lengths_are_refused() {
        let server = start(TEST_LIMITS);
        for framing in [
            "Content-Length: 3\r\nContent-Length: 4\r\n",
            "Content-Length: 3, 4\r\n",
            "Content-Length: 3, 3\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: +3\r\n",
            "Transfer-Encoding: gzip\r\n",
        ] {
            let mut c = Conn::open(server.addr);
            c.send(&format!("POST /x HTTP/1.1\r\nHost: app\r\n{framing}\r\n"));
            let (head, _) = c.answer(true);
            assert_eq!(status(&head), "400", "{framing:?}: {head}");
            assert!(c.closed(), "{framing:?}: left open");
        }
        // Identical duplicates frame the body the same way: read as one.
        let mut c = Conn::open(server.addr);
        c.send(
            "POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert_eq!(c.answer(true).1, "POST /x  abc\n");
        // Chunked wins over a Content-Length beside it, and the connection is closed after.
        let mut c = Conn::open(server.addr);
        c.send("POST /x HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        let (head, body) = c.answer(true);
        assert_eq!(body, "POST /x  abc\n", "{head}");
        assert!(c.closed());
    }

    #[test]
    fn heads_and_bodies_are_bounded_in_size_and_time() {
        let server = start(TEST_LIMITS);
        // A head larger than the limit.
        let mut c = Conn::open(server.addr);
        c.send(&format!(
            "GET / HTTP/1.1\r\nHost: app\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        ));
        assert_eq!(status(&c.answer(true).0), "431");
        // A body larger than the limit, announced or chunked.
        let mut c = Conn::open(server.addr);
        c.send(&format!(
            "POST / HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        ));
        let (head, _) = c.answer(true);
        assert_eq!(status(&head), "413", "{head}");
        assert_eq!(header(&head, "connection"), Some("close"));
        let mut c = Conn::open(server.addr);
        let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
        c.send("POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n");
        c.send(&chunk.repeat(MAX_BODY / 0x4000));
        c.send("1\r\nx\r\n");
        let (head, _) = c.answer(true);
        assert_eq!(status(&head), "413", "{head}");
        // A body that stops arriving: 408 after the body deadline, and closed.
        let mut c = Conn::open(server.addr);
        c.send("POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nabc");
        let at = std::time::Instant::now();
        let (head, _) = c.answer(true);
        assert_eq!(status(&head), "408", "{head}");
        assert!(at.elapsed() >= TEST_LIMITS.body_timeout);
        assert!(c.closed());
        // A head that stops arriving: closed after the head deadline.
        let mut c = Conn::open(server.addr);
        c.send("GET / HTTP/1.1\r\nHost: ");
        let at = std::time::Instant::now();
        let mut rest = Vec::new();
        let _ = c.0.read_to_end(&mut rest);
        let took = at.elapsed();
        assert!(
            took >= TEST_LIMITS.head_timeout && took < Duration::from_secs(3),
            "{took:?}"
        );
        // An idle keep-alive connection: closed after the same deadline.
        let mut c = Conn::open(server.addr);
        c.send("GET / HTTP/1.1\r\nHost: app\r\n\r\n");
        c.answer(true);
        let at = std::time::Instant::now();
        assert!(c.closed());
        let took = at.elapsed();
        assert!(
            took >= TEST_LIMITS.head_timeout && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[test]
    fn requests_and_connections_over_the_limits_get_503_at_once() {
        let server = start(TEST_LIMITS);
        // Two requests held by the handler: a third, on another connection, is refused at once
        // and that connection stays usable.
        let mut held: Vec<Conn> = (0..2)
            .map(|_| {
                let mut c = Conn::open(server.addr);
                c.send("GET /wait HTTP/1.1\r\nHost: app\r\n\r\n");
                c
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while server.waiting.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the handler never got both"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut third = Conn::open(server.addr);
        third.send("GET /now HTTP/1.1\r\nHost: app\r\n\r\n");
        let (head, body) = third.answer(true);
        assert_eq!(status(&head), "503", "{head}");
        assert!(body.starts_with("busy"), "{body}");
        // Four connections open (one idle): a fifth is answered 503 and closed.
        let _idle = Conn::open(server.addr);
        let mut fifth = Conn::open(server.addr);
        fifth.send("GET / HTTP/1.1\r\nHost: app\r\n\r\n");
        let (head, body) = fifth.answer(true);
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert_eq!(body, "busy\n");
        assert!(fifth.closed());
        server.release.add_permits(2);
        for c in &mut held {
            assert_eq!(status(&c.answer(true).0), "200");
        }
        third.send("GET /now HTTP/1.1\r\nHost: app\r\n\r\n");
        assert_eq!(third.answer(true).1, "GET /now  \n");
    }

    #[test]
    fn forms_and_queries_decode() {
        let form = b"body=hello+world%21&x=%zz&y&a=%C3%A9%";
        assert_eq!(form_value(form, "body").as_deref(), Some("hello world!"));
        assert_eq!(form_value(form, "x").as_deref(), Some("%zz"));
        assert_eq!(form_value(form, "y").as_deref(), Some(""));
        assert_eq!(form_value(form, "a").as_deref(), Some("é%"));
        assert_eq!(form_value(form, "z"), None);
        let r = Request {
            method: "GET".into(),
            path: "/notes.json".into(),
            query: "before=7".into(),
            headers: vec![("accept".into(), "text/html".into())],
            body: Bytes::new(),
        };
        assert_eq!(r.query_param("before").as_deref(), Some("7"));
        assert!(r.wants_json());
        let page = Request {
            path: "/".into(),
            ..r.clone()
        };
        assert!(!page.wants_json());
        let json_body = Request {
            headers: vec![(
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            )],
            ..page
        };
        assert!(json_body.wants_json());
    }
}
