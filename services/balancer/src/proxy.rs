//! One request: answered locally (health path, redirect, limits) or forwarded to a backend,
//! with the forwarding headers added, retried once elsewhere when that is safe.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Limited;
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;

use crate::backend::{Backend, Routes};
use crate::body::{client_body_error, ClientBodyError, Inflight, ReqBody, RespBody};
use crate::conn::ConnShared;
use crate::core::admission::Admission;
use crate::core::health::{Observation, Transition};
use crate::core::retry::{self, Failure};
use crate::metrics::Global;
use crate::plan::Plan;
use crate::pool::SendError;
use crate::Limits;

/// What every connection task shares.
pub struct Shared {
    pub routes: ArcSwap<Routes>,
    pub settings: ArcSwap<Settings>,
    pub global: Global,
    pub limits: Limits,
    /// Wakes every health check at once (see `health_check`).
    pub recheck: tokio::sync::Notify,
    /// keepalived's "has a healthy backend" track file, when the node has a floating IP.
    pub track: Option<crate::vip::TrackFile>,
    /// The node's view of the floating IP (metrics).
    pub vip: Option<Arc<crate::vip::VipState>>,
    /// Client connections held, in all and per address (`Limits::max_connections*`).
    pub admission: Mutex<Admission>,
}

/// The parts of the configuration requests read; swapped whole on reload.
pub struct Settings {
    pub plan: Plan,
    /// `Strict-Transport-Security` value, `None` when `hsts_max_age` is 0.
    pub hsts: Option<HeaderValue>,
    /// Port in redirects to HTTPS (the first HTTPS listener's).
    pub https_port: u16,
}

impl Settings {
    pub fn new(plan: Plan, https_port: u16) -> Settings {
        let hsts = (plan.hsts_max_age > 0).then(|| {
            HeaderValue::from_str(&format!("max-age={}", plan.hsts_max_age))
                .unwrap_or(HeaderValue::from_static("max-age=31536000"))
        });
        Settings {
            plan,
            hsts,
            https_port,
        }
    }
}

impl Shared {
    pub fn lock_admission(&self) -> MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record a health observation for `backend`; on a state change, log the event and
    /// rebuild the schedule of the current routing table.
    pub fn observe(&self, backend: &Backend, obs: Observation, reason: &str) {
        let routes = self.routes.load();
        if let Some(t) = backend.observe(obs, routes.thresholds, Instant::now()) {
            log_transition(backend, t, reason);
            routes.rebuild();
            self.update_track();
        }
    }

    /// Tells keepalived whether this node could serve: at least one backend is up.
    pub fn update_track(&self) {
        if let Some(track) = &self.track {
            let any_up = self.routes.load().entries.iter().any(|e| e.backend.is_up());
            track.set(any_up);
        }
    }
}

pub(crate) fn log_transition(backend: &Backend, t: Transition, reason: &str) {
    let state = t.to.as_str();
    let addr = backend.addr.to_string();
    match t.to {
        crate::core::health::State::Up => tracing::info!(
            target: "health", backend = %backend.name, addr = %addr, state, reason,
            "backend {} ({addr}) is up", backend.name
        ),
        crate::core::health::State::Down => tracing::warn!(
            target: "health", backend = %backend.name, addr = %addr, state, reason,
            "backend {} ({addr}) is down", backend.name
        ),
    }
}

/// Which port a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Plain HTTP: the health path, else a redirect to HTTPS.
    Redirect,
    /// Proxy to the backends; `tls` says whether the client used TLS.
    Proxy { tls: bool },
}

/// Per client connection.
pub(crate) struct ConnCtx {
    pub shared: Arc<Shared>,
    pub role: Role,
    pub conn: Arc<ConnShared>,
    /// HTTP/1.x (framing verdicts apply, `Connection: close` means something).
    pub h1: bool,
    pub fwd: Forwarding,
}

/// The forwarding header values of one client connection, made once per connection.
pub(crate) struct Forwarding {
    ip: IpAddr,
    /// `X-Forwarded-For` when the client sent none: its address.
    xff: HeaderValue,
    /// `X-Forwarded-Proto`.
    proto: HeaderValue,
    /// `Forwarded: for=<ip>;proto=<proto>`.
    forwarded: HeaderValue,
    /// `Host` made of the first request's authority (HTTP/2: every stream of a connection
    /// names the same one, usually), so that later requests share it instead of copying.
    host: std::sync::OnceLock<HeaderValue>,
}

impl Forwarding {
    pub(crate) fn new(peer: SocketAddr, tls: bool) -> Forwarding {
        let ip = peer.ip().to_canonical();
        let proto = if tls { "https" } else { "http" };
        let node = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        #[allow(
            clippy::expect_used,
            reason = "the values are an IP address, `for=`, `;proto=http(s)`, quotes and brackets: visible ASCII, always a valid header value"
        )]
        let value =
            |s: String| HeaderValue::from_str(&s).expect("an address is a valid header value");
        Forwarding {
            ip,
            xff: value(ip.to_string()),
            proto: HeaderValue::from_static(proto),
            forwarded: value(format!("for={node};proto={proto}")),
            host: std::sync::OnceLock::new(),
        }
    }

    /// `authority` as a `Host` value.
    fn host(&self, authority: &str) -> Option<HeaderValue> {
        if let Some(v) = self.host.get() {
            if v.as_bytes() == authority.as_bytes() {
                return Some(v.clone());
            }
        }
        let v = HeaderValue::from_str(authority).ok()?;
        let _ = self.host.set(v.clone());
        Some(v)
    }
}

/// One request, answered: here (the health path, redirects, a refused head) or by a backend,
/// with the forwarding headers added, retried once elsewhere when that is safe.
///
/// One `async fn` for all of it, on purpose: each level of `async fn` nesting is one more copy
/// of the inner future per request (the whole future, about 1 KiB; measured with callgrind),
/// and this future is what hyper stores per request. The backend exchange, the large part, is
/// boxed below for the same reason.
pub(crate) async fn handle(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<RespBody>, Infallible> {
    let ctx = &*ctx;
    let guard = Inflight::conn(&ctx.conn);
    let mut resp = match to_forward(req, ctx) {
        Err(resp) => resp,
        Ok(Forward {
            mut parts,
            mut body,
            client_upgrade,
            replayable,
            needs_host,
        }) => 'forwarded: {
            let shared = &ctx.shared;
            let g = &shared.global;
            let limits = &shared.limits;
            // Hold this table for the whole request: a reload does not disturb it.
            let routes = shared.routes.load_full();
            let mut failed = None;
            let mut attempts = 0;
            loop {
                attempts += 1;
                let picked = match failed {
                    None => routes.pick(),
                    Some(f) => routes.pick_retry(f),
                };
                let Some(i) = picked else {
                    g.no_backend.fetch_add(1, Relaxed);
                    break 'forwarded local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no backend available\n",
                        false,
                    );
                };
                let backend = &routes.entries[i].backend;
                let req_body = match body.take() {
                    // The request stays in flight on the client connection until its body was read to
                    // the end (or dropped), not only until the response was sent: bytes hyper reads
                    // meanwhile are body, not a head, and get no head deadline.
                    Some(b) => ReqBody::stream(b, Inflight::conn(&ctx.conn)),
                    None => ReqBody::Empty,
                };
                let last = !retry::may_retry(replayable, attempts);
                let Some(out) = backend_request(&mut parts, backend, needs_host, last, req_body)
                else {
                    g.bad_request.fetch_add(1, Relaxed);
                    break 'forwarded local(StatusCode::BAD_REQUEST, "bad request\n", ctx.h1);
                };
                backend.metrics.requests.fetch_add(1, Relaxed);
                let active = Inflight::backend(backend);
                let start = Instant::now();
                let opened = &backend.metrics.connections;
                // Boxed: made in place once. Inline, the exchange (1 KiB) would be copied into the
                // timeout and again into this future, and would make this future (and so every
                // request's) that much larger to copy.
                let sent = Box::pin(backend.pool.send(
                    backend.addr,
                    out,
                    limits.connect_timeout,
                    opened,
                ));
                let result = tokio::time::timeout(limits.response_timeout, sent).await;
                match result {
                    Ok(Ok((mut resp, conn))) => {
                        backend.metrics.latency.observe(start.elapsed());
                        backend.metrics.response(resp.status().as_u16());
                        shared.observe(backend, Observation::TrafficOk, "response");
                        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                            if let Some(client_upgrade) = client_upgrade {
                                // Only now, with the backend's 101 in hand, is the connection a tunnel.
                                ctx.conn.tunnel();
                                let backend_upgrade = hyper::upgrade::on(&mut resp);
                                tokio::spawn(async move {
                                    let _active = active;
                                    if let (Ok(c), Ok(b)) =
                                        (client_upgrade.await, backend_upgrade.await)
                                    {
                                        let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                                        let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                                    }
                                });
                                let (mut p, _) = resp.into_parts();
                                strip_hop_by_hop(&mut p.headers, true);
                                p.headers.insert(
                                    header::CONNECTION,
                                    HeaderValue::from_static("upgrade"),
                                );
                                break 'forwarded Response::from_parts(p, RespBody::empty());
                            }
                        }
                        let (mut p, b) = resp.into_parts();
                        strip_hop_by_hop(&mut p.headers, false);
                        let body =
                            RespBody::backend(b, backend.clone(), conn, [Some(active), None]);
                        break 'forwarded Response::from_parts(p, body);
                    }
                    Ok(Err(e)) => {
                        if let SendError::Http(h) = &e {
                            // The client's own body failed (too large, framing broken, cut short): the
                            // client's error. Not the backend's: no error, no health observation, no
                            // 502 (which would feed the 5xx alert and blame a healthy backend).
                            match client_body_error(h) {
                                Some(ClientBodyError::TooLarge) => break 'forwarded too_large(ctx),
                                Some(ClientBodyError::Broken(cause)) => {
                                    tracing::debug!(error = %cause, "request body broken by the client");
                                    g.bad_request.fetch_add(1, Relaxed);
                                    break 'forwarded local(
                                        StatusCode::BAD_REQUEST,
                                        "malformed request body\n",
                                        ctx.h1,
                                    );
                                }
                                None => {}
                            }
                        }
                        backend.metrics.errors.fetch_add(1, Relaxed);
                        let failure = classify(&e);
                        match failure {
                            Failure::Connect => shared.observe(
                                backend,
                                Observation::ConnectFailed,
                                failure_reason(failure),
                            ),
                            Failure::ClosedBeforeResponse => shared.observe(
                                backend,
                                Observation::TrafficFailed,
                                failure_reason(failure),
                            ),
                            _ => {}
                        }
                        tracing::debug!(backend = %backend.addr, error = %e, ?failure, "backend request failed");
                        if retry::should_retry(&parts.method, replayable, failure, attempts) {
                            backend.metrics.retries.fetch_add(1, Relaxed);
                            failed = Some(i);
                            continue;
                        }
                        g.bad_gateway.fetch_add(1, Relaxed);
                        break 'forwarded local(StatusCode::BAD_GATEWAY, "bad gateway\n", false);
                    }
                    Err(_elapsed) => {
                        backend.metrics.errors.fetch_add(1, Relaxed);
                        g.gateway_timeout.fetch_add(1, Relaxed);
                        break 'forwarded local(
                            StatusCode::GATEWAY_TIMEOUT,
                            "gateway timeout\n",
                            false,
                        );
                    }
                }
            }
        }
    };
    if ctx.role == (Role::Proxy { tls: true }) {
        if let Some(v) = &ctx.shared.settings.load().hsts {
            resp.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, v.clone());
        }
    }
    resp.body_mut().add_guard(guard);
    Ok(resp)
}

/// A request on its way to a backend, its headers made ready by [`prepare_backend_headers`].
struct Forward {
    parts: Parts,
    /// The client's body, cut off at the limit; `None` when there is none (replayable).
    body: Option<Limited<Incoming>>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    replayable: bool,
    needs_host: bool,
}

/// What of `req` goes to a backend, or the answer made here. A plain function, so that the
/// request, taken apart here, is not also held whole across the exchange in [`handle`]'s future.
#[allow(
    clippy::result_large_err,
    reason = "the common case is the request to forward, not an error"
)]
fn to_forward(req: Request<Incoming>, ctx: &ConnCtx) -> Result<Forward, Response<RespBody>> {
    if let Some(resp) = answer_here(&req, ctx) {
        return Err(resp);
    }
    let g = &ctx.shared.global;
    let limits = &ctx.shared.limits;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        return Err(too_large(ctx));
    }
    let upgrade = ctx.h1 && is_upgrade(&req);
    let (mut parts, body) = req.into_parts();
    // What `hyper::upgrade::on` would take from the request.
    let client_upgrade = upgrade
        .then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    let replayable = body.is_end_stream();
    let Some(needs_host) = prepare_backend_headers(&mut parts, &ctx.fwd, upgrade) else {
        g.bad_request.fetch_add(1, Relaxed);
        return Err(local(StatusCode::BAD_REQUEST, "bad request\n", ctx.h1));
    };
    let body = (!replayable).then(|| Limited::new(body, limits.max_body_bytes as usize));
    Ok(Forward {
        parts,
        body,
        client_upgrade,
        replayable,
        needs_host,
    })
}

/// The 413 for a body over the limit, declared or found while forwarding it.
fn too_large(ctx: &ConnCtx) -> Response<RespBody> {
    ctx.shared.global.too_large.fetch_add(1, Relaxed);
    local(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body too large\n",
        ctx.h1,
    )
}

/// The answer to `req` when the balancer makes it itself; `None` when it goes to a backend.
fn answer_here(req: &Request<Incoming>, ctx: &ConnCtx) -> Option<Response<RespBody>> {
    let g = &ctx.shared.global;
    if ctx.h1 && ctx.conn.on_head().is_some_and(|v| v.conflicting_length) {
        g.bad_request.fetch_add(1, Relaxed);
        return Some(local(
            StatusCode::BAD_REQUEST,
            "conflicting Content-Length and Transfer-Encoding\n",
            ctx.h1,
        ));
    }
    match ctx.role {
        Role::Redirect => {
            let settings = ctx.shared.settings.load();
            if req.uri().path() == settings.plan.health.path {
                let routes = ctx.shared.routes.load();
                let up = routes.entries.iter().filter(|e| e.backend.is_up()).count();
                let body = format!("ok: {up}/{} backends up\n", routes.entries.len());
                return Some(text(StatusCode::OK, body));
            }
            g.redirects.fetch_add(1, Relaxed);
            Some(redirect(req, &settings))
        }
        Role::Proxy { .. } => None,
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A response made by the balancer; `close` ends an HTTP/1 connection after it (the rest of
/// the request was not read).
fn local(status: StatusCode, body: &'static str, close: bool) -> Response<RespBody> {
    let mut r = text(status, body);
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn redirect(req: &Request<Incoming>, settings: &Settings) -> Response<RespBody> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .and_then(host_without_port)
        .unwrap_or(&settings.plan.domain);
    let port = match settings.https_port {
        443 => String::new(),
        p => format!(":{p}"),
    };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{pq}");
    let status = if matches!(*req.method(), Method::GET | Method::HEAD) {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    let mut r = Response::new(RespBody::empty());
    *r.status_mut() = status;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => *r.status_mut() = StatusCode::BAD_REQUEST,
    }
    r
}

/// The host part of a `Host` value, if it is a plausible name or address (no injection into
/// `Location`).
fn host_without_port(h: &str) -> Option<&str> {
    let host = if let Some(rest) = h.strip_prefix('[') {
        let end = rest.find(']')?;
        &h[..end + 2]
    } else {
        h.rsplit_once(':').map_or(h, |(host, _)| host)
    };
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    ok.then_some(host)
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && header_has_token(req.headers(), &header::CONNECTION, "upgrade")
}

fn header_has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn failure_reason(f: Failure) -> &'static str {
    match f {
        Failure::Connect => "connect failed",
        Failure::ClosedBeforeResponse => "connection reset",
        Failure::Timeout => "timeout",
        Failure::Other => "error",
    }
}

fn classify(e: &SendError) -> Failure {
    let h = match e {
        SendError::Connect(_) => return Failure::Connect,
        SendError::Http(h) => h,
    };
    if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
        return Failure::ClosedBeforeResponse;
    }
    if h.is_timeout() {
        return Failure::Timeout;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(h);
    while let Some(s) = cur {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return Failure::ClosedBeforeResponse;
            }
        }
        cur = s.source();
    }
    Failure::Other
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let (mut any, mut only_connection) = (false, true);
    for name in h.keys().filter(|n| is_hop_by_hop(n)) {
        any = true;
        only_connection &= name == header::CONNECTION;
    }
    if !any {
        return;
    }
    // The usual backend answer: `Connection: keep-alive` and nothing else to strip (the
    // `Keep-Alive` header it names is hop-by-hop, so absent here).
    if only_connection
        && h.get_all(header::CONNECTION).iter().all(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .all(|t| t.trim_ascii().eq_ignore_ascii_case(b"keep-alive"))
        })
    {
        h.remove(header::CONNECTION);
        return;
    }
    remove_connection_and_named(h, |name| {
        keep_upgrade && name.eq_ignore_ascii_case("upgrade")
    });
    if h.keys().any(is_hop_by_hop) {
        remove_fixed_hop_by_hop(h, keep_upgrade);
    }
}

/// Remove `Connection` and the fields it names, but those `keep` keeps; names are looked up
/// as written (no allocation for one `Connection` field).
fn remove_connection_and_named(h: &mut HeaderMap, keep: impl Fn(&str) -> bool) {
    if let header::Entry::Occupied(e) = h.entry(header::CONNECTION) {
        let mut values = e.remove_entry_mult().1;
        let first = values.next();
        let rest: Vec<HeaderValue> = values.collect();
        for v in first.iter().chain(&rest) {
            let Ok(v) = v.to_str() else { continue };
            for name in v.split(',').map(str::trim) {
                if !(name.is_empty() || keep(name)) {
                    h.remove(name);
                }
            }
        }
    }
}

/// The hop-by-hop headers RFC 9110 §7.6.1 names, whatever `Connection` lists; `Upgrade` stays
/// for a tunnel.
fn remove_fixed_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    for name in [
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(name);
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The request's parts made into what every backend gets, once per request and in place (no
/// second header map): hop-by-hop headers and those `Connection` names removed (`Upgrade`
/// kept for an upgrade), `X-Forwarded-For` extended with the client's address (several fields
/// merged into one), `X-Forwarded-Proto` replaced, `Forwarded` appended, HTTP/2's split
/// cookies joined (RFC 9113 §8.2.3), `Host` from the request's authority when it has none.
/// `Some(true)`: the request has no `Host` and no authority (HTTP/1.0), the backend's address
/// is its `Host`. `None`: a header that cannot be forwarded (400).
fn prepare_backend_headers(parts: &mut Parts, fwd: &Forwarding, upgrade: bool) -> Option<bool> {
    let h = &mut parts.headers;
    // Room for the additions at once (growing the map rehashes it).
    h.reserve(4);
    // One pass over the names to find what needs work; usually nothing but the additions.
    let (mut hop, mut only_connection) = (false, true);
    let (mut xff, mut xfp, mut cookie, mut host) = (false, false, false, false);
    for name in h.keys() {
        if is_hop_by_hop(name) {
            hop = true;
            only_connection &= name == header::CONNECTION;
        } else if name == X_FORWARDED_FOR {
            xff = true;
        } else if name == X_FORWARDED_PROTO {
            xfp = true;
        } else if name == header::COOKIE {
            cookie = true;
        } else if name == header::HOST {
            host = true;
        }
    }
    // Several client `X-Forwarded-For` fields are one list (RFC 9110 §5.3); taken out before
    // the names `Connection` lists are removed, as it is always forwarded.
    let prior_xff = if xff {
        let mut joined = Vec::new();
        if let header::Entry::Occupied(e) = h.entry(&X_FORWARDED_FOR) {
            for v in e.remove_entry_mult().1 {
                if !joined.is_empty() {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(v.as_bytes());
            }
        }
        Some(joined)
    } else {
        None
    };
    if hop {
        remove_connection_and_named(h, |name| {
            // With `Connection` the only hop-by-hop field, its usual `keep-alive` names no
            // field of this request (no lookup for it).
            let absent = only_connection && name.eq_ignore_ascii_case("keep-alive");
            absent || (upgrade && name.eq_ignore_ascii_case("upgrade"))
        });
        if !only_connection {
            remove_fixed_hop_by_hop(h, upgrade);
        }
        if host {
            // `Connection` may have named it.
            host = h.contains_key(header::HOST);
        }
    }
    if xfp {
        h.remove(&X_FORWARDED_PROTO);
    }
    if cookie
        && parts.version == Version::HTTP_2
        && h.get_all(header::COOKIE).iter().nth(1).is_some()
    {
        let joined: Vec<&[u8]> = h
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            h.insert(header::COOKIE, v);
        }
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let mut needs_host = false;
    if !host {
        match parts.uri.authority() {
            Some(a) => {
                h.insert(header::HOST, fwd.host(a.as_str())?);
            }
            None => needs_host = true,
        }
    }
    let xff = match prior_xff {
        None => fwd.xff.clone(),
        Some(mut prior) => {
            if !prior.is_empty() {
                prior.extend_from_slice(b", ");
            }
            prior.extend_from_slice(fwd.ip.to_string().as_bytes());
            HeaderValue::from_bytes(&prior).ok()?
        }
    };
    h.insert(X_FORWARDED_FOR.clone(), xff);
    h.insert(X_FORWARDED_PROTO.clone(), fwd.proto.clone());
    h.append(header::FORWARDED, fwd.forwarded.clone());
    // Origin form (`/path?query`): the connection already goes to the backend.
    parts.uri = match parts.uri.path_and_query() {
        Some(_) if parts.uri.scheme().is_none() => return Some(needs_host),
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    };
    Some(needs_host)
}

/// The request to send to `backend`, of parts made by [`prepare_backend_headers`]: taken when
/// this is the last attempt, else copied (a retry needs them again). Always HTTP/1.1.
fn backend_request(
    parts: &mut Parts,
    backend: &Backend,
    needs_host: bool,
    last: bool,
    body: ReqBody,
) -> Option<Request<ReqBody>> {
    let (uri, mut headers) = if last {
        (
            std::mem::take(&mut parts.uri),
            std::mem::take(&mut parts.headers),
        )
    } else {
        (parts.uri.clone(), parts.headers.clone())
    };
    if needs_host {
        headers.insert(
            header::HOST,
            HeaderValue::from_str(backend.authority.as_str()).ok()?,
        );
    }
    let mut out = Request::new(body);
    *out.method_mut() = parts.method.clone();
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: Version, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn values(p: &Parts, name: &str) -> Vec<String> {
        p.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    fn client() -> Forwarding {
        Forwarding::new("192.0.2.7:5555".parse().unwrap(), true)
    }

    #[test]
    fn backend_headers_drop_hop_by_hop_and_connection_names_and_add_forwarding() {
        let mut p = parts(
            Version::HTTP_11,
            "/a?b",
            &[
                ("host", "example.com"),
                ("connection", "keep-alive, X-Private, x-forwarded-for"),
                ("x-private", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("upgrade", "h2c"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-for", "10.0.0.2, 10.0.0.3"),
                ("x-forwarded-proto", "spoofed"),
                ("forwarded", "for=10.0.0.1"),
                ("accept", "*/*"),
            ],
        );
        assert_eq!(
            prepare_backend_headers(&mut p, &client(), false),
            Some(false)
        );
        let mut names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "forwarded",
                "host",
                "x-forwarded-for",
                "x-forwarded-proto"
            ]
        );
        assert_eq!(
            values(&p, "x-forwarded-for"),
            ["10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.7"]
        );
        assert_eq!(values(&p, "x-forwarded-proto"), ["https"]);
        assert_eq!(
            values(&p, "forwarded"),
            ["for=10.0.0.1", "for=192.0.2.7;proto=https"]
        );
        assert_eq!(values(&p, "host"), ["example.com"]);
        assert_eq!(p.uri, "/a?b");
    }

    #[test]
    fn backend_headers_of_http2_get_host_from_the_authority_and_one_cookie() {
        let mut p = parts(
            Version::HTTP_2,
            "https://example.com/x",
            &[("cookie", "a=1"), ("cookie", "b=2"), ("te", "trailers")],
        );
        assert_eq!(
            prepare_backend_headers(&mut p, &client(), false),
            Some(false)
        );
        assert_eq!(values(&p, "host"), ["example.com"]);
        assert_eq!(values(&p, "cookie"), ["a=1; b=2"]);
        assert!(!p.headers.contains_key("te"));
        assert_eq!(values(&p, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(p.uri, "/x");
    }

    #[test]
    fn backend_headers_of_an_upgrade_keep_upgrade() {
        let mut p = parts(
            Version::HTTP_11,
            "/ws",
            &[
                ("host", "example.com"),
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
            ],
        );
        assert_eq!(
            prepare_backend_headers(&mut p, &client(), true),
            Some(false)
        );
        assert_eq!(values(&p, "upgrade"), ["websocket"]);
        assert_eq!(values(&p, "connection"), ["upgrade"]);
    }

    #[test]
    fn a_backend_request_is_a_copy_until_the_last_attempt() {
        let backend = Backend::new("b", "127.0.0.1:8080".parse().unwrap(), Instant::now());
        let mut p = parts(Version::HTTP_10, "/", &[]);
        let needs_host = prepare_backend_headers(&mut p, &client(), false).unwrap();
        assert!(needs_host, "HTTP/1.0 without Host");
        let first = backend_request(&mut p, &backend, needs_host, false, ReqBody::Empty).unwrap();
        assert_eq!(first.headers()["host"], "127.0.0.1:8080");
        assert_eq!(first.version(), Version::HTTP_11);
        assert_eq!(values(&p, "x-forwarded-for"), ["192.0.2.7"]);
        let last = backend_request(&mut p, &backend, needs_host, true, ReqBody::Empty).unwrap();
        assert_eq!(last.headers(), first.headers());
        assert_eq!(last.uri(), "/");
        assert!(p.headers.is_empty(), "the last attempt takes the headers");
    }

    #[test]
    fn host_without_port_accepts_names_and_addresses_only() {
        for (input, expected) in [
            ("example.com", Some("example.com")),
            ("example.com:8080", Some("example.com")),
            ("10.88.0.10:80", Some("10.88.0.10")),
            ("[::1]:80", Some("[::1]")),
            ("[::1]", Some("[::1]")),
            ("", None),
            ("evil.com/path", None),
            ("a b", None),
            ("x@y", None),
        ] {
            assert_eq!(host_without_port(input), expected, "{input:?}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_from_responses() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/html"),
            ("upgrade", "websocket"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn keep_alive_connection_header_is_stripped() {
        for (conn, expected) in [
            ("keep-alive", &["content-type", "x-keep"][..]),
            ("Keep-Alive , keep-alive", &["content-type", "x-keep"]),
            ("keep-alive, x-keep", &["content-type"]),
            ("close", &["content-type", "x-keep"]),
        ] {
            let mut h = HeaderMap::new();
            h.append(header::CONNECTION, HeaderValue::from_static(conn));
            h.append(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            h.append(
                HeaderName::from_static("x-keep"),
                HeaderValue::from_static("1"),
            );
            strip_hop_by_hop(&mut h, false);
            let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, expected, "{conn:?}");
        }
    }
}
