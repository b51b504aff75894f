//! Listeners and client connections: accept (within the connection caps), TLS handshake,
//! HTTP/1 or HTTP/2 by ALPN, and the timers that close idle and slow connections (408 for a
//! slow request head).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::core::admission::{Caps, Refusal};
use crate::core::framing::{Framing, HeadVerdict, Progress};
use crate::core::timeouts::{self, ConnTimes, Decision};
use crate::proxy::{self, ConnCtx, Role, Shared};
use crate::BalancerError;

/// Bind a listening socket. IPv4 sockets get `IP_FREEBIND`, so the floating IP can be bound
/// before this node holds it.
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener, BalancerError> {
    let l = bind_std(addr, false)?;
    TcpListener::from_std(l).map_err(|source| BalancerError::Bind { addr, source })
}

/// [`bind`] without a runtime: the socket is registered later, by the runtime that serves it.
/// `reuse_port`: `SO_REUSEPORT`, so that every worker thread binds the same address and the
/// kernel spreads the connections among their listeners.
pub(crate) fn bind_std(
    addr: SocketAddr,
    reuse_port: bool,
) -> Result<std::net::TcpListener, BalancerError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| BalancerError::Bind { addr, source };
    let s =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    if reuse_port {
        s.set_reuse_port(true).map_err(err)?;
    }
    if addr.is_ipv4() {
        s.set_freebind_v4(true).map_err(err)?;
    }
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.listen(4096).map_err(err)?;
    Ok(s.into())
}

/// State of one client connection shared by its IO wrapper, its driver and its requests.
pub struct ConnShared {
    pub inflight: AtomicU64,
    track: Mutex<Track>,
}

struct Track {
    /// HTTP/1 only.
    framing: Option<Framing>,
    verdicts: VecDeque<HeadVerdict>,
    seen_bytes: bool,
    last_read: std::time::Instant,
    head_started: Option<std::time::Instant>,
    /// HTTP/1: bytes between requests are a request head, whatever the tracker says.
    h1: bool,
    /// See [`ConnTimes::unanswered_since`].
    unanswered_since: Option<std::time::Instant>,
}

impl ConnShared {
    fn new(framing: Option<Framing>) -> ConnShared {
        ConnShared {
            inflight: AtomicU64::new(0),
            track: Mutex::new(Track {
                h1: framing.is_some(),
                framing,
                verdicts: VecDeque::new(),
                seen_bytes: false,
                last_read: std::time::Instant::now(),
                head_started: None,
                unanswered_since: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// hyper delivered the next request head (HTTP/1): its framing verdict, in order. Stops
    /// the tracker-independent head deadline.
    pub fn on_head(&self) -> Option<HeadVerdict> {
        let mut t = self.lock();
        t.unanswered_since = None;
        t.verdicts.pop_front()
    }

    /// The backend accepted an upgrade and its 101 goes out now: from here on the connection is
    /// a tunnel, no longer HTTP (called before the 101 is sent, so that no head timer can write
    /// a 408 into the tunnel).
    pub fn tunnel(&self) {
        let mut t = self.lock();
        if let Some(f) = &mut t.framing {
            f.tunnel();
        }
        t.verdicts.clear();
        t.h1 = false;
        t.unanswered_since = None;
        t.head_started = None;
    }

    fn on_read(&self, data: &[u8]) {
        let now = crate::clock::coarse_now();
        let mut t = self.lock();
        let t = &mut *t;
        t.last_read = now;
        t.seen_bytes = true;
        if t.h1 && t.unanswered_since.is_none() && self.inflight.load(Relaxed) == 0 {
            t.unanswered_since = Some(now);
        }
        if let Some(f) = &mut t.framing {
            let before = f.progress();
            f.feed(data, &mut t.verdicts);
            match f.progress() {
                Progress::InHead if before != Progress::InHead => t.head_started = Some(now),
                Progress::InHead => {}
                _ => t.head_started = None,
            }
        }
    }

    fn times(&self) -> ConnTimes {
        let t = self.lock();
        ConnTimes {
            progress: t.framing.as_ref().map_or(Progress::Idle, Framing::progress),
            inflight: self.inflight.load(Relaxed),
            seen_bytes: t.seen_bytes,
            last_read: t.last_read,
            head_started: t.head_started,
            unanswered_since: t.unanswered_since,
        }
    }
}

/// The client stream, reporting every read to the connection's [`ConnShared`]. It holds the
/// connection's slot, so a connection counts against the caps for as long as its socket is
/// open, in hyper or in an upgraded tunnel.
struct TrackedIo<S> {
    inner: S,
    shared: Arc<ConnShared>,
    _slot: ConnSlot,
}

impl<S: AsyncRead + Unpin> AsyncRead for TrackedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                this.shared.on_read(new);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TrackedIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, b)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What an accept loop serves.
#[derive(Clone)]
pub(crate) struct Listener {
    pub role: Role,
    pub tls: Option<TlsAcceptor>,
}

/// A client connection's place within the caps; given back when dropped.
pub(crate) struct ConnSlot {
    shared: Arc<Shared>,
    client: IpAddr,
}

impl ConnSlot {
    /// Admit a connection from `peer`, or say why not (and whether to warn about it now).
    fn admit(shared: &Arc<Shared>, peer: SocketAddr) -> Result<ConnSlot, (Refusal, Option<u64>)> {
        let client = peer.ip().to_canonical();
        let caps = Caps {
            global: shared.limits.max_connections,
            per_client: shared.limits.max_connections_per_client,
        };
        let mut a = shared.lock_admission();
        match a.admit(client, caps) {
            Ok(()) => {
                drop(a);
                shared.global.connections.fetch_add(1, Relaxed);
                shared.global.active_connections.fetch_add(1, Relaxed);
                Ok(ConnSlot {
                    shared: shared.clone(),
                    client,
                })
            }
            Err(r) => Err((r, a.refused(crate::clock::coarse_now()))),
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.shared.lock_admission().release(self.client);
        self.shared.global.active_connections.fetch_sub(1, Relaxed);
    }
}

/// What a refused plain-HTTP connection gets (nginx's `limit_conn` answers 503 too).
const REFUSED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\nconnection: close\r\n\r\n\
too many connections\n";

/// Refuse a connection over a cap, without a task and without waiting. Plain HTTP gets a 503:
/// one non-blocking write into a fresh socket, cheap enough to make while refusing. TLS gets a
/// bare close: a 503 would first need the handshake, the expensive part a refusal saves.
fn refuse(stream: TcpStream, plain: bool) {
    if plain {
        let sock = socket2::SockRef::from(&stream);
        // Closing a socket with unread bytes sends a reset, which can destroy the 503 before
        // the client reads it: take what already arrived (a request sent with the handshake).
        let mut sink = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        for _ in 0..4 {
            if !matches!(sock.recv(&mut sink), Ok(n) if n > 0) {
                break;
            }
        }
        // Directly on the socket: tokio has not seen it writable yet.
        let _ = sock.send(REFUSED_RESPONSE);
    }
}

/// Accept until shutdown; every connection task holds a clone of `tasks` (senders of channels
/// nothing is sent on) so the caller can wait for all of them to end.
pub(crate) async fn accept_loop<T: Clone + Send + 'static>(
    listener: TcpListener,
    what: Listener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    tasks: T,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let slot = match ConnSlot::admit(&shared, peer) {
                    Ok(slot) => slot,
                    Err((reason, warn)) => {
                        shared.global.refused(reason).fetch_add(1, Relaxed);
                        tracing::debug!(%peer, reason = reason.as_str(), "connection refused: cap reached");
                        if let Some(n) = warn {
                            tracing::warn!(
                                reason = reason.as_str(),
                                refused = n,
                                max_connections = shared.limits.max_connections,
                                max_connections_per_client = shared.limits.max_connections_per_client,
                                "refusing client connections over the cap ({n} since the last warning)"
                            );
                        }
                        refuse(stream, what.tls.is_none());
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (what, shared, shutdown, tasks) = (
                    what.clone(),
                    shared.clone(),
                    shutdown.clone(),
                    tasks.clone(),
                );
                tokio::spawn(async move {
                    serve(stream, peer, what, shared, shutdown, slot).await;
                    drop(tasks);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    what: Listener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    slot: ConnSlot,
) {
    // Each protocol's connection future is boxed on its own: the task then holds only the one
    // in use (a task's future is as large as its largest state, which all its connections
    // pay: 16.7 KiB per connection before, the HTTP/1-over-TLS one alone 7.6 KiB).
    let Some(acceptor) = what.tls else {
        Box::pin(serve_h1(stream, peer, what.role, shared, shutdown, slot)).await;
        return;
    };
    // The handshake's state (1.3 KiB) is boxed too, so that it is held only while it lasts.
    let handshake = Box::pin(tokio::time::timeout(
        shared.limits.header_timeout,
        acceptor.accept(stream),
    ));
    let tls = match handshake.await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.global.tls_handshake_failures.fetch_add(1, Relaxed);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.global.tls_handshake_failures.fetch_add(1, Relaxed);
            return;
        }
    };
    // The TLS stream (1.2 KiB) in a box of its own: moved by value, it would be stored twice
    // in the connection's future (an `async fn` keeps the argument's place beside the
    // connection it is moved into). 2.5 KiB less per connection, for a pointer per read.
    let tls = Box::new(tls);
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    if h2 {
        Box::pin(serve_h2(tls, peer, what.role, shared, shutdown, slot)).await;
    } else {
        Box::pin(serve_h1(tls, peer, what.role, shared, shutdown, slot)).await;
    }
}

/// hyper's own header limit. Setting a limit, even this one, makes hyper build two
/// 100-entry arrays per request head instead of keeping them uninitialized on the stack.
const HYPER_MAX_HEADERS: usize = 100;

const REQUEST_TIMEOUT_RESPONSE: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

async fn serve_h1<S>(
    io: S,
    peer: SocketAddr,
    role: Role,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    slot: ConnSlot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits.clone();
    let conn_shared = Arc::new(ConnShared::new(Some(Framing::new(
        limits.max_header_bytes,
        limits.max_headers,
    ))));
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        role,
        conn: conn_shared.clone(),
        h1: true,
        fwd: proxy::Forwarding::new(peer, role == (Role::Proxy { tls: true })),
    });
    let svc = service_fn(move |req| proxy::handle(req, ctx.clone()));
    let io = TrackedIo {
        inner: io,
        shared: conn_shared.clone(),
        _slot: slot,
    };
    let mut builder = http1::Builder::new();
    if limits.max_headers != HYPER_MAX_HEADERS {
        builder.max_headers(limits.max_headers);
    }
    let mut conn = builder
        // hyper's minimum buffer is 8 KiB; a head larger than the buffer gets 431.
        .max_buf_size(limits.max_header_bytes.max(8192))
        // Mostly small responses: one flat buffer and one write() beat writev() (measured).
        .writev(false)
        // Backend responses carry their Date; this saves a clock read per response.
        .auto_date_header(false)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let timer = tokio::time::sleep(limits.header_timeout);
    tokio::pin!(timer);
    let mut draining = false;
    let reply_408 = loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP/1 connection ended with an error");
                }
                return;
            }
            _ = &mut timer => {
                let now = Instant::now();
                let d = timeouts::decide(conn_shared.times(), now.into_std(), limits.header_timeout, limits.idle_timeout);
                match d {
                    Decision::WaitUntil(t) => timer.as_mut().reset(Instant::from_std(t)),
                    Decision::Close => return,
                    Decision::RequestTimeout => break true,
                }
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    if reply_408 {
        shared.global.request_timeout.fetch_add(1, Relaxed);
        // Boxed, and the connection's parts not kept across the wait: a second copy of the
        // connection's IO in this future would make every connection's task larger for a path
        // few take.
        let reply = conn
            .into_parts()
            .map(|parts| Box::pin(reply_request_timeout(parts.io.into_inner())));
        if let Some(reply) = reply {
            reply.await;
        }
    }
}

/// The 408 on a connection whose request head did not arrive in time, then a close. The slot
/// stays taken until the 408 is out and the socket closed.
async fn reply_request_timeout<S: AsyncWrite + Unpin>(io: TrackedIo<S>) {
    let TrackedIo {
        inner: mut io,
        _slot,
        ..
    } = io;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(REQUEST_TIMEOUT_RESPONSE).await?;
        io.shutdown().await
    })
    .await;
}

async fn serve_h2<S>(
    io: S,
    peer: SocketAddr,
    role: Role,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    slot: ConnSlot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.limits.clone();
    let conn_shared = Arc::new(ConnShared::new(None));
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        role,
        conn: conn_shared.clone(),
        h1: false,
        fwd: proxy::Forwarding::new(peer, role == (Role::Proxy { tls: true })),
    });
    // Boxed: hyper runs every stream in a task of its own, and the stream's future is moved
    // whole three times (spawned, stored, overwritten by its output); the request's future is
    // the largest part of it (2.7 KiB, measured). Boxed, it is made in place once, on the first
    // poll. (HTTP/1 keeps it inline: there it is moved once, and a box costs more.)
    let svc = service_fn(move |req| Box::pin(proxy::handle(req, ctx.clone())));
    let io = TrackedIo {
        inner: io,
        shared: conn_shared.clone(),
        _slot: slot,
    };
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Backend responses carry their Date; this saves a clock read per response.
        .auto_date_header(false)
        .max_concurrent_streams(limits.max_h2_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let timer = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(timer);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            _ = &mut timer => {
                let now = Instant::now();
                match timeouts::decide(conn_shared.times(), now.into_std(), limits.header_timeout, limits.idle_timeout) {
                    Decision::WaitUntil(t) => timer.as_mut().reset(Instant::from_std(t)),
                    Decision::Close | Decision::RequestTimeout if !draining => {
                        // GOAWAY, let the client see it, then close.
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                        timer.as_mut().reset(now + Duration::from_secs(5));
                    }
                    _ => return,
                }
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_one_whole_response() {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut r = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = r.parse(REFUSED_RESPONSE).unwrap() else {
            panic!("incomplete head");
        };
        assert_eq!(r.code, Some(503));
        let len = r
            .headers
            .iter()
            .find(|h| h.name == "content-length")
            .unwrap();
        let len: usize = std::str::from_utf8(len.value).unwrap().parse().unwrap();
        assert_eq!(len, REFUSED_RESPONSE.len() - head);
    }

    /// The floating IP is bound before this node holds it. Binding sends nothing: this only
    /// needs the address to be absent from every interface.
    #[tokio::test]
    async fn binds_an_address_this_host_does_not_have() {
        let vip: SocketAddr = "10.88.0.10:0".parse().unwrap();
        assert!(
            std::net::TcpListener::bind(vip).is_err(),
            "10.88.0.10 is configured on this host; the test needs an address that is not"
        );
        let l = bind(vip).expect("IP_FREEBIND lets the floating IP be bound early");
        assert_eq!(l.local_addr().unwrap().ip(), vip.ip());
    }
}
