//! Hostile clients (issue 10): a request head always has a deadline, even after an `Upgrade:`
//! or `CONNECT` the backend did not take up; connections are capped globally and per client
//! address; a request body that breaks its own framing is the client's 400, never a 502.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balancer::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// The header timeout these tests configure; every bound below is a generous multiple of it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a trickling connection may live before the test calls it immortal (the idle
/// timeout, 60 s, would otherwise end it).
const TRICKLE_CAP: Duration = Duration::from_secs(12);
/// Closed within this after the trickle started: the header timeout plus a slow machine.
const CLOSED_WITHIN: Duration = Duration::from_secs(6);

/// One response read off `s`: its head and a `Content-Length` body (what nginx and the
/// balancer send here).
fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return String::from_utf8_lossy(&got).into_owned();
            }
        }
        match s.read(&mut b) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
    }
}

struct Trickled {
    /// The response to the complete request sent first.
    first: String,
    /// What the balancer sent while the next head trickled in (nothing, or a 408).
    after: String,
    /// From the first trickled byte until the balancer closed (or the cap).
    lived: Duration,
    closed: bool,
    bytes_trickled: usize,
}

/// Send `first` (a complete request, in these separate writes) and read its response, then
/// trickle a head that never ends, one byte every 100 ms, until the balancer closes the
/// connection or `TRICKLE_CAP`.
fn trickle_after(addr: SocketAddr, first: &[&[u8]]) -> Trickled {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for part in first {
        s.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = read_response(&mut s);
    let stop = Arc::new(AtomicBool::new(false));
    let mut w = s.try_clone().unwrap();
    let t0 = Instant::now();
    let writer = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let head = b"GET /trickle HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < TRICKLE_CAP {
                let byte = head.get(sent).copied().unwrap_or(b'a');
                if w.write_all(&[byte]).is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            sent
        }
    });
    s.set_read_timeout(Some(TRICKLE_CAP + Duration::from_secs(1)))
        .unwrap();
    let mut after = Vec::new();
    let closed = match s.read_to_end(&mut after) {
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    };
    let lived = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let bytes_trickled = writer.join().unwrap();
    Trickled {
        first,
        after: String::from_utf8_lossy(&after).into_owned(),
        lived,
        closed,
        bytes_trickled,
    }
}

fn assert_trickle_cut(what: &str, t: &Trickled) {
    eprintln!(
        "{what}: first {:?}, trickled {} bytes, connection lived {:?} (closed: {})",
        t.first.lines().next().unwrap_or(""),
        t.bytes_trickled,
        t.lived,
        t.closed
    );
    assert!(
        t.closed && t.lived < CLOSED_WITHIN,
        "{what}: a head trickled after it lived {:?} (closed: {}); the header timeout is {HEADER_TIMEOUT:?}",
        t.lived,
        t.closed
    );
    assert!(
        t.lived >= HEADER_TIMEOUT - Duration::from_millis(100),
        "{what}: closed after {:?}, before the header timeout",
        t.lived
    );
    assert!(
        t.after.is_empty() || t.after.starts_with("HTTP/1.1 408"),
        "{what}: {:?}",
        t.after
    );
}

fn hostile_options(s: &Setup) -> balancer::Options {
    let mut o = s.options();
    o.limits = Limits {
        header_timeout: HEADER_TIMEOUT,
        ..Limits::default()
    };
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_after_an_upgrade_the_backend_refused_still_has_a_deadline() {
    init_tracing();
    let s = Setup::new();
    let h = s.start_with(hostile_options(&s)).await;
    let addr = h.http_proxy_addrs()[0];
    // nginx answers an upgrade request like any other: 200, the connection stays HTTP/1.1.
    let t = tokio::task::spawn_blocking(move || {
        trickle_after(
            addr,
            &[b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"],
        )
    })
    .await
    .unwrap();
    assert!(t.first.starts_with("HTTP/1.1 200"), "{:?}", t.first);
    assert_trickle_cut("after Upgrade", &t);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_after_a_connect_the_backend_refused_still_has_a_deadline() {
    init_tracing();
    let s = Setup::new();
    let h = s.start_with(hostile_options(&s)).await;
    let addr = h.http_proxy_addrs()[0];
    let t = tokio::task::spawn_blocking(move || {
        trickle_after(
            addr,
            &[b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"],
        )
    })
    .await
    .unwrap();
    // nginx refuses CONNECT; hyper keeps the client connection for the next request.
    assert!(t.first.starts_with("HTTP/1.1 4"), "{:?}", t.first);
    assert_trickle_cut("after CONNECT", &t);
    h.shutdown().await;
}

/// The framing tracker stops following a chunk-size line longer than it buffers (hyper takes
/// up to 16 KiB of extensions; the line comes in two reads so the tracker sees it grow past
/// its limit): the head deadline must not depend on the tracker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_after_a_body_the_tracker_cannot_follow_still_has_a_deadline() {
    init_tracing();
    let s = Setup::new();
    let h = s.start_with(hostile_options(&s)).await;
    let addr = h.http_proxy_addrs()[0];
    let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let line_start = format!("5;{}", "e".repeat(5000));
    let line_end = format!("{}\r\nhello\r\n0\r\n\r\n", "e".repeat(1000));
    let t = tokio::task::spawn_blocking(move || {
        trickle_after(
            addr,
            &[head.as_bytes(), line_start.as_bytes(), line_end.as_bytes()],
        )
    })
    .await
    .unwrap();
    assert!(t.first.starts_with("HTTP/1.1 200"), "{:?}", t.first);
    assert_trickle_cut("after a long chunk extension", &t);
    h.shutdown().await;
}

/// A connection from the address `from` (the caps count per address) to `to`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// A keep-alive GET on `s`: the status line of the answer, or what went wrong.
async fn get_on(s: &mut tokio::net::TcpStream) -> String {
    if let Err(e) = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await {
        return format!("write: {e}");
    }
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        Ok(Err(e)) => format!("read: {e}"),
        Err(_) => "read: timed out".into(),
    }
}

/// Everything sent on a connection the client does not write to, until the balancer closes
/// it; `None` if it is still open after 5 s: it was admitted (the cap tests give an admitted
/// silent connection `CAP_TESTS_HEADER_TIMEOUT`, far longer).
async fn refused_with(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

fn metric(text: &str, line_prefix: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix:?} in\n{text}"))
}

const CAP_TESTS_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

const REFUSED_PER_CLIENT: &str = "tandem_balancer_connections_refused_total{reason=\"per_client\"}";
const REFUSED_GLOBAL: &str = "tandem_balancer_connections_refused_total{reason=\"global\"}";

/// After one of the held connections closed, a new one from `from` is served (the balancer
/// notices the close asynchronously: retried for a while).
async fn admitted_again(from: IpAddr, to: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = connect_from(from, to).await;
        let got = get_on(&mut s).await;
        if got.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a connection from {from} is still refused after one closed: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_client_cap_get_503_and_are_counted() {
    per_client_cap(None).await;
}

/// The caps are counted for the whole process, not per worker thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_cap_holds_across_worker_threads() {
    per_client_cap(Some(3)).await;
}

async fn per_client_cap(workers: Option<usize>) {
    init_tracing();
    let s = Setup::new();
    let mut o = s.options();
    o.workers = workers;
    o.limits = Limits {
        max_connections_per_client: 3,
        header_timeout: CAP_TESTS_HEADER_TIMEOUT,
        ..Limits::default()
    };
    let h = s.start_with(o).await;
    let (plain, tls) = (h.http_proxy_addrs()[0], h.https_addrs()[0]);
    let (me, other) = (IpAddr::from(ip(s.net, 50)), IpAddr::from(ip(s.net, 51)));
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from(me, plain).await;
        assert_eq!(get_on(&mut c).await, "HTTP/1.1 200 OK");
        held.push(c);
    }
    // The 4th from the same address: 503 and a close on plain HTTP, a bare close on TLS.
    let mut c = connect_from(me, plain).await;
    let got = refused_with(&mut c)
        .await
        .expect("a 4th connection from one client was admitted (cap 3)");
    assert!(
        got.starts_with("HTTP/1.1 503") && got.to_ascii_lowercase().contains("connection: close"),
        "{got:?}"
    );
    let mut c = connect_from(me, tls).await;
    let got = refused_with(&mut c)
        .await
        .expect("a TLS connection over the cap was admitted");
    assert_eq!(got, "", "a refused TLS connection gets no bytes");
    let text = h.metrics_text();
    assert_eq!(metric(&text, REFUSED_PER_CLIENT), 2, "{text}");
    assert_eq!(metric(&text, REFUSED_GLOBAL), 0, "{text}");
    // Another client is not affected.
    let mut c = connect_from(other, plain).await;
    assert_eq!(get_on(&mut c).await, "HTTP/1.1 200 OK");
    drop(c);
    // One closes: the client may connect again.
    drop(held.pop());
    admitted_again(me, plain).await;
    // All closed: nothing is left in the per-client table.
    drop(held);
    all_released(&h).await;
    h.shutdown().await;
}

/// Wait until the balancer holds no client connection and no per-client entry.
async fn all_released(h: &balancer::Handle) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = h.metrics_text();
        let left = (
            metric(&text, "tandem_balancer_connections_active "),
            metric(&text, "tandem_balancer_connections_clients "),
        );
        if left == (0, 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connections and client addresses still held after every client closed: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_global_cap_get_503_and_are_counted() {
    global_cap(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_cap_holds_across_worker_threads() {
    global_cap(Some(3)).await;
}

async fn global_cap(workers: Option<usize>) {
    init_tracing();
    let s = Setup::new();
    let mut o = s.options();
    o.workers = workers;
    o.limits = Limits {
        max_connections: 3,
        header_timeout: CAP_TESTS_HEADER_TIMEOUT,
        ..Limits::default()
    };
    let h = s.start_with(o).await;
    let plain = h.http_proxy_addrs()[0];
    let mut held = Vec::new();
    for k in 0..3 {
        let mut c = connect_from(ip(s.net, 60 + k).into(), plain).await;
        assert_eq!(get_on(&mut c).await, "HTTP/1.1 200 OK");
        held.push(c);
    }
    let fresh = IpAddr::from(ip(s.net, 70));
    let mut c = connect_from(fresh, plain).await;
    let got = refused_with(&mut c)
        .await
        .expect("a 4th connection was admitted (global cap 3)");
    assert!(got.starts_with("HTTP/1.1 503"), "{got:?}");
    let text = h.metrics_text();
    assert_eq!(metric(&text, REFUSED_GLOBAL), 1, "{text}");
    assert_eq!(metric(&text, REFUSED_PER_CLIENT), 0, "{text}");
    drop(held.pop());
    admitted_again(fresh, plain).await;
    drop(held);
    all_released(&h).await;
    h.shutdown().await;
}

/// A backend that reads every request body to its end (by `Content-Length` or chunked)
/// before it answers 200; health checks get 200 too.
async fn body_reading_backend(l: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                let n = s.read(&mut b).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&b[..n]);
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let body = &buf[end + 4..];
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let complete = match len {
                    Some(n) => body.len() >= n,
                    None if head.contains("transfer-encoding: chunked") => {
                        body.ends_with(b"0\r\n\r\n")
                    }
                    None => true,
                };
                if complete {
                    let ok =
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
                    let _ = s.write_all(ok).await;
                    return;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_breaks_its_framing_is_the_clients_400_not_a_502() {
    init_tracing();
    let net = subnet();
    let l = tokio::net::TcpListener::bind((ip(net, 11), 0))
        .await
        .unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(body_reading_backend(l));
    let mut c = cluster_config::Cluster::default_cluster();
    c.nodes.truncate(1);
    c.nodes[0].address = ip(net, 11);
    c.ports.web = backend.port();
    let state = tempfile::tempdir().unwrap();
    let mut o = balancer::Options::new(state.path());
    o.listen = Some(balancer::Listen {
        http_proxy: vec![SocketAddr::from((ip(net, 10), 0))],
        ..Default::default()
    });
    let h = balancer::Balancer::start(c, "server1", o).await.unwrap();
    let addr = h.http_proxy_addrs()[0];

    // A good body first: the backend reads bodies and answers.
    let got = raw(
        addr,
        b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        Duration::from_secs(5),
    );
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");

    // More of each than `fall` (3): a backend blamed for them would go down.
    for k in 0..4 {
        let got = tokio::task::spawn_blocking(move || {
            raw(
                addr,
                b"POST /bad-chunk HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
                Duration::from_secs(5),
            )
        })
        .await
        .unwrap();
        eprintln!("malformed chunk size #{k}: {:?}", got.lines().next());
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 400"),
            "malformed chunk size #{k}: {got:?}"
        );
        let got = tokio::task::spawn_blocking(move || {
            // The client sends part of the body, then closes its side.
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"POST /cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .unwrap();
        eprintln!("body cut short #{k}: {:?}", got.lines().next());
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 400"),
            "body cut short #{k}: {got:?}"
        );
    }
    let text = h.metrics_text();
    let l = format!("{{backend=\"server1\",addr=\"{backend}\"}}");
    assert_eq!(
        metric(
            &text,
            "tandem_balancer_local_responses_total{reason=\"bad_gateway\"}"
        ),
        0,
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("tandem_balancer_backend_errors_total{l}")),
        0,
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("tandem_balancer_backend_up{l}")),
        1,
        "{text}"
    );
    assert!(h.backends()[0].up, "{:?}", h.backends());
    assert!(
        metric(
            &text,
            "tandem_balancer_local_responses_total{reason=\"bad_request\"}"
        ) >= 4,
        "{text}"
    );
    // And the backend still serves.
    let got = raw(
        addr,
        b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        Duration::from_secs(5),
    );
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    h.shutdown().await;
}
