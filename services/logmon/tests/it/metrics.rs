//! The metrics server over real sockets: many clients at once, a deadline on request heads, a
//! cap on connections, 404/405, HEAD without a body, and a stop that frees the port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use logmon::metrics::{self, MetricsServer, ServerLimits, CONTENT_TYPE};

const TEXT: &str = "# HELP up Up.\n# TYPE up gauge\nup 1\n";

fn server(limits: ServerLimits) -> MetricsServer {
    let snapshot = Arc::new(Mutex::new(TEXT.to_string()));
    metrics::serve_with("127.0.0.1:0".parse().unwrap(), snapshot, limits).unwrap()
}

/// A connection that sends `bytes` and then nothing.
fn silent(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// Everything the server sends on `stream` until it closes (a reset counts as closed).
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading until the server closes: {e}"),
    }
    got
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

#[test]
fn many_clients_at_once_while_others_stay_silent() {
    let limits = ServerLimits {
        header_read_timeout: Duration::from_secs(5),
        ..ServerLimits::default()
    };
    let server = server(limits);
    let addr = server.addr();
    // Clients that connect and say nothing, or half a head: the old server answered one
    // connection at a time and made everyone behind them wait for their timeout.
    let _quiet: Vec<TcpStream> = (0..4)
        .map(|i| silent(addr, &b"GET /metrics HTTP/1.1\r\nHo"[..i * 8]))
        .collect();
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || metrics::fetch(addr)))
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap().unwrap(), TEXT);
    }
    assert!(
        started.elapsed() < limits.header_read_timeout,
        "answered only after {:?}: the silent clients held the server",
        started.elapsed()
    );
}

#[test]
fn paths_methods_and_head() {
    let server = server(ServerLimits::default());
    let base = format!("http://{}", server.addr());
    let agent = agent();

    let response = agent.get(&format!("{base}/metrics?x=1")).call().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], CONTENT_TYPE);
    assert_eq!(response.into_body().read_to_string().unwrap(), TEXT);

    let response = agent.get(&format!("{base}/")).call().unwrap();
    assert_eq!(response.status(), 404);
    let response = agent.delete(&format!("{base}/nope")).call().unwrap();
    assert_eq!(response.status(), 404);
    let response = agent
        .post(&format!("{base}/metrics"))
        .send(&b"x"[..])
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, HEAD");

    // HEAD: the GET's head (its length included), and not one byte of body on the wire.
    let mut stream = silent(
        server.addr(),
        b"HEAD /metrics HTTP/1.1\r\nHost: logmon\r\nConnection: close\r\n\r\n",
    );
    let answer = String::from_utf8(read_until_closed(&mut stream)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    let length = format!("content-length: {}\r\n", TEXT.len());
    assert!(answer.contains(&length), "{length:?} not in {answer:?}");
    assert!(
        answer.ends_with("\r\n\r\n"),
        "a body after the head: {answer:?}"
    );
}

#[test]
fn a_head_that_does_not_arrive_in_time_is_dropped() {
    let limits = ServerLimits {
        header_read_timeout: Duration::from_millis(500),
        ..ServerLimits::default()
    };
    let server = server(limits);
    for partial in [&b""[..], b"GET /metrics HTTP/1.1\r\nHost: x\r\n"] {
        let mut stream = silent(server.addr(), partial);
        let started = Instant::now();
        let answer = read_until_closed(&mut stream);
        let waited = started.elapsed();
        assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
        assert!(
            waited >= limits.header_read_timeout - Duration::from_millis(100)
                && waited < Duration::from_secs(10),
            "closed after {waited:?}"
        );
    }
    // A kept-alive connection gets the same deadline for its next head.
    let mut stream = silent(
        server.addr(),
        b"GET /metrics HTTP/1.1\r\nHost: logmon\r\n\r\n",
    );
    let answer = String::from_utf8(read_until_closed(&mut stream)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(answer.ends_with(TEXT), "{answer:?}");
}

#[test]
fn connections_over_the_cap_are_closed_until_one_ends() {
    let limits = ServerLimits {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(30),
        ..ServerLimits::default()
    };
    let server = server(limits);
    let addr = server.addr();
    let first = silent(addr, b"");
    let _second = silent(addr, b"");
    // The third is accepted and closed at once, long before any timeout.
    let mut third = silent(addr, b"GET /metrics HTTP/1.1\r\nHost: logmon\r\n\r\n");
    let started = Instant::now();
    assert!(read_until_closed(&mut third).is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(metrics::fetch(addr).is_err(), "served over the cap");

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match metrics::fetch(addr) {
            Ok(text) => {
                assert_eq!(text, TEXT);
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "a freed connection slot is not reused: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dropping_the_server_stops_it_and_frees_the_port() {
    let server = server(ServerLimits::default());
    let addr = server.addr();
    let idle = silent(addr, b"");
    assert_eq!(metrics::fetch(addr).unwrap(), TEXT);
    drop(server);
    assert!(metrics::fetch(addr).is_err(), "still served after the drop");
    drop(idle);
    let again = metrics::serve(addr, Arc::new(Mutex::new(String::new()))).unwrap();
    assert_eq!(again.addr(), addr);
}
