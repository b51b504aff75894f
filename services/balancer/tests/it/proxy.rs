//! Balancing, health, retries, forwarding headers, redirects, reload, metrics, WebSocket.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_config::{Algorithm, BalancerMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// `n` sequential requests to `addr`; how many each backend answered.
async fn split(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let c = client();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let (status, body) = get(&c, addr, "/").await.unwrap();
        assert_eq!(status, 200, "{body}");
        *counts.entry(body.trim().to_string()).or_insert(0) += 1;
    }
    counts
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_1000_requests_500_500() {
    init_tracing();
    let s = Setup::new();
    let h = s.start().await;
    let got = split(h.http_proxy_addrs()[0], 1000).await;
    assert_eq!(
        got,
        counts(&[("backend server1", 500), ("backend server2", 500)])
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_weights() {
    init_tracing();
    let s = Setup::with(|c| {
        c.balancer.algorithm = Algorithm::WeightedRoundRobin;
        c.nodes[0].weight = 3;
        c.nodes[1].weight = 1;
    });
    let h = s.start().await;
    let got = split(h.http_proxy_addrs()[0], 1000).await;
    assert_eq!(
        got,
        counts(&[("backend server1", 750), ("backend server2", 250)])
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_spreads_sequential_requests() {
    init_tracing();
    let s = Setup::with(|c| c.balancer.algorithm = Algorithm::LeastConnections);
    let h = s.start().await;
    let got = split(h.http_proxy_addrs()[0], 100).await;
    assert_eq!(
        got,
        counts(&[("backend server1", 50), ("backend server2", 50)])
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_passive_uses_the_backup_only_when_the_active_is_down() {
    init_tracing();
    let mut s = Setup::with(|c| {
        c.balancer.mode = BalancerMode::ActivePassive;
        c.nodes[1].backup = true;
    });
    let h = s.start().await;
    let addr = h.http_proxy_addrs()[0];
    assert_eq!(split(addr, 100).await, counts(&[("backend server1", 100)]));

    s.backends[0].kill();
    // The first request may find it dead: it is retried on the backup, never failed.
    assert_eq!(split(addr, 100).await, counts(&[("backend server2", 100)]));
    wait_for(&h, "server1 down", |b| !b[0].up).await;

    s.backends[0].restart();
    wait_for(&h, "server1 back up after rise", |b| b[0].up).await;
    assert_eq!(split(addr, 100).await, counts(&[("backend server1", 100)]));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_the_client_nothing_and_rejoins_after_rise() {
    init_tracing();
    let mut s = Setup::new();
    let h = s.start().await;
    let addr = h.http_proxy_addrs()[0];
    wait_for(&h, "both up", |b| b.iter().all(|b| b.up)).await;

    // 8 concurrent keep-alive clients, bounded in count and time.
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (failures, done) = (failures.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..20_000 {
                if Instant::now() > stop_at {
                    break;
                }
                match get(&c, addr, "/").await {
                    Ok((200, _)) => {}
                    Ok((status, body)) => failures.lock().unwrap().push(format!("{status} {body}")),
                    Err(e) => failures.lock().unwrap().push(e),
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.backends[1].kill();
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let n = done.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n > 100, "only {n} requests made");
    assert!(
        failures.is_empty(),
        "{} of {n} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    wait_for(&h, "server2 down", |b| !b[1].up).await;
    // The requests that met the dead backend were retried on the live one.
    let metrics = h.metrics_text();
    let retries: u64 = metrics
        .lines()
        .find(|l| l.starts_with("tandem_balancer_backend_retries_total{backend=\"server2\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no retries metric for server2:\n{metrics}"));
    assert!(retries >= 1, "no request was retried:\n{metrics}");
    assert!(
        metrics.contains("tandem_balancer_backend_up{backend=\"server2\""),
        "{metrics}"
    );

    s.backends[1].restart();
    let t0 = Instant::now();
    wait_for(&h, "server2 rejoins", |b| b[1].up).await;
    // rise = 2 checks at 200 ms: not before the second check.
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "rejoined after {:?}",
        t0.elapsed()
    );
    let got = split(addr, 100).await;
    assert_eq!(
        got,
        counts(&[("backend server1", 50), ("backend server2", 50)])
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_added() {
    init_tracing();
    let s = Setup::new();
    let h = s.start().await;
    let addr = h.http_proxy_addrs()[0];
    let got = raw(
        addr,
        b"GET /headers HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: evil\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    // The test connects from 127.0.0.1; the client's Connection header is hop-by-hop.
    let expected = "host=shop.example xff=192.0.2.7, 127.0.0.1 proto=http \
                    fwd=for=127.0.0.1;proto=http conn=\n";
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains(expected), "expected {expected:?} in\n{got}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_port_redirects_to_https_and_answers_the_health_path() {
    init_tracing();
    let s = Setup::new();
    let h = s.start().await;
    let http = h.http_addrs()[0];
    let https_port = h.https_addrs()[0].port();
    let got = raw(
        http,
        b"GET /a/b?c=d HTTP/1.1\r\nHost: tandem.test\r\n\r\n",
        Duration::from_millis(500),
    );
    assert!(got.starts_with("HTTP/1.1 301"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains(&format!(
            "location: https://tandem.test:{https_port}/a/b?c=d\r\n"
        )),
        "{got}"
    );
    assert!(
        !got.to_ascii_lowercase()
            .contains("strict-transport-security"),
        "HSTS on plain HTTP: {got}"
    );
    let got = raw(
        http,
        b"POST /form HTTP/1.1\r\nHost: tandem.test:80\r\nContent-Length: 0\r\n\r\n",
        Duration::from_millis(500),
    );
    assert!(got.starts_with("HTTP/1.1 308"), "{got}");
    // A Host that would inject into Location falls back to the cluster domain.
    let got = raw(
        http,
        b"GET / HTTP/1.1\r\nHost: evil.example/x\r\n\r\n",
        Duration::from_millis(500),
    );
    assert!(
        got.to_ascii_lowercase()
            .contains(&format!("location: https://tandem.test:{https_port}/\r\n")),
        "{got}"
    );
    let got = raw(
        http,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    );
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("ok: 2/2 backends up"), "{got}");
    for b in &s.backends {
        assert!(
            !b.access_log().contains("GET /a/b"),
            "redirected request reached a backend"
        );
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_routing_without_failing_requests_in_flight() {
    reload_changes_routing(None).await;
}

/// The routing table is shared: a reload reaches every worker thread at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_routing_on_every_worker_thread() {
    reload_changes_routing(Some(3)).await;
}

async fn reload_changes_routing(workers: Option<usize>) {
    init_tracing();
    let s = Setup::new();
    let mut o = s.options();
    o.workers = workers;
    let h = Arc::new(s.start_with(o).await);
    let addr = h.http_proxy_addrs()[0];
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut bad = Vec::new();
            while Instant::now() < stop_at {
                match get(&c, addr, "/").await {
                    Ok((200, _)) => {}
                    other => bad.push(format!("{other:?}")),
                }
            }
            bad
        }));
    }
    let mut c2 = s.cluster.clone();
    c2.balancer.algorithm = Algorithm::WeightedRoundRobin;
    c2.nodes[0].weight = 1;
    c2.nodes[1].weight = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.reload(&c2).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.reload(&s.cluster).unwrap();
    }
    h.reload(&c2).unwrap();
    for t in tasks {
        let bad = t.await.unwrap();
        assert!(bad.is_empty(), "{bad:?}");
    }
    assert_eq!(split(addr, 20).await, counts(&[("backend server1", 20)]));
    // Unknown node names are refused and change nothing.
    let mut broken = s.cluster.clone();
    broken.nodes.retain(|n| n.name != "server1");
    assert!(h.reload(&broken).is_err());
    assert_eq!(split(addr, 4).await, counts(&[("backend server1", 4)]));
    Arc::into_inner(h).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_format() {
    init_tracing();
    let s = Setup::new();
    let h = s.start().await;
    split(h.http_proxy_addrs()[0], 10).await;
    let (status, text) = get(&client(), h.metrics_addr().unwrap(), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    for (name, addr) in [
        ("server1", s.backends[0].addr),
        ("server2", s.backends[1].addr),
    ] {
        let l = format!("{{backend=\"{name}\",addr=\"{addr}\"}}");
        for line in [
            format!("tandem_balancer_backend_requests_total{l} 5"),
            format!("tandem_balancer_backend_up{l} 1"),
            format!("tandem_balancer_backend_active_requests{l} 0"),
            format!("tandem_balancer_backend_errors_total{l} 0"),
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing {line:?} in\n{text}"
            );
        }
        let count = format!("tandem_balancer_backend_response_seconds_count{l} 5");
        assert!(text.lines().any(|x| x == count), "missing {count:?}");
        // Sequential requests reuse one kept-alive connection per backend.
        let opened = format!("tandem_balancer_backend_connections_opened_total{l} 1");
        assert!(
            text.lines().any(|x| x == opened),
            "missing {opened:?} in\n{text}"
        );
    }
    assert!(text.contains("# TYPE tandem_balancer_backend_response_seconds histogram"));
    let (status, _) = get(&client(), h.metrics_addr().unwrap(), "/other")
        .await
        .unwrap();
    assert_eq!(status, 404);
    h.shutdown().await;
}

/// A backend that answers health checks, accepts WebSocket upgrades (then echoes), and answers
/// `/slow` after 800 ms.
async fn upgrade_backend(addr: SocketAddr) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut b).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(b[0]);
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            if head.contains("upgrade: websocket") && head.contains("connection: upgrade") {
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await
                    .unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            } else if head.starts_with("get /slow ") {
                tokio::time::sleep(Duration::from_millis(800)).await;
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nslow\n";
                let _ = s.write_all(ok).await;
            } else {
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
                let _ = s.write_all(ok).await;
            }
        });
    }
}

/// The balancer in front of one [`upgrade_backend`].
async fn start_with_scripted_backend(
    workers: Option<usize>,
) -> (balancer::Handle, tempfile::TempDir) {
    let net = subnet();
    let backend = SocketAddr::from((ip(net, 11), free_port(&[ip(net, 11)])));
    tokio::spawn(upgrade_backend(backend));
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
    o.workers = workers;
    let h = balancer::Balancer::start(c, "server1", o).await.unwrap();
    (h, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_stops_accepting() {
    shutdown_finishes_requests_in_flight(None).await;
}

/// Slow requests on several connections (the kernel spreads them over the worker threads):
/// every worker finishes its own before shutdown returns, and none accepts after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_on_every_worker_thread() {
    shutdown_finishes_requests_in_flight(Some(3)).await;
}

async fn shutdown_finishes_requests_in_flight(workers: Option<usize>) {
    init_tracing();
    let (h, _state) = start_with_scripted_backend(workers).await;
    let addr = h.http_proxy_addrs()[0];
    let slow: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { get(&client(), addr, "/slow").await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    h.shutdown().await;
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "shutdown did not wait: {waited:?}"
    );
    for slow in slow {
        assert_eq!(slow.await.unwrap().unwrap(), (200, "slow\n".to_string()));
    }
    let refused = tokio::net::TcpStream::connect(addr).await.is_err();
    assert!(refused, "still accepting after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through() {
    init_tracing();
    let (h, _state) = start_with_scripted_backend(None).await;
    let mut s = tokio::net::TcpStream::connect(h.http_proxy_addrs()[0])
        .await
        .unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in [&b"hello"[..], b"binary\x00\x01\x02 frames"] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
    drop(s);
    h.shutdown().await;
}
