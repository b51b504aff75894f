//! The webhook sender against a local https receiver with a private CA.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cluster_config::WebhookUrl;
use logmon::webhook::Webhook;

use crate::{receiver, CapturedLogs, TestCa};

/// The secret parts of the URL: neither may reach a log line.
const PATH_TOKEN: &str = "P4TH-T0KEN";
const QUERY_TOKEN: &str = "QU3RY-T0KEN";

fn url(addr: std::net::SocketAddr) -> WebhookUrl {
    WebhookUrl::parse(&format!(
        "https://{addr}/hooks/{PATH_TOKEN}?token={QUERY_TOKEN}"
    ))
    .unwrap()
}

/// Fails with the logs when they show a token, or do not name the webhook at all (then
/// nothing was captured and the check proves nothing).
fn assert_logs_name_only_the_origin(logs: &str, origin: &str) {
    assert!(logs.contains(origin), "no log line names {origin}:\n{logs}");
    for secret in [PATH_TOKEN, QUERY_TOKEN, "/hooks"] {
        assert!(!logs.contains(secret), "{secret:?} logged:\n{logs}");
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn https_webhook_with_a_private_ca_delivers_after_a_retry_and_logs_no_path() {
    let ca = TestCa::generate();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    // The first attempt is answered 503: the retry is logged, the second is delivered.
    let (addr, received) = receiver(1, Some(ca.server_config()));
    let url = url(addr);
    let logs = CapturedLogs::default();
    // This thread's log lines and the sender thread's (it inherits the subscriber).
    let _logging = tracing::subscriber::set_default(logs.subscriber());
    let webhook = Webhook::spawn(&url, Some(&ca_file)).unwrap();
    webhook.send(br#"{"rule":"cert-expiry","state":"firing"}"#.to_vec());

    let (target, body) = received
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no delivery; logs:\n{}", logs.text()));
    assert_eq!(
        target,
        format!("/hooks/{PATH_TOKEN}?token={QUERY_TOKEN}"),
        "the path and query are sent as given"
    );
    assert_eq!(body["rule"], "cert-expiry");
    let stats = webhook.stats();
    wait_until("the delivery counted", || {
        stats.delivered.load(Ordering::Relaxed) == 1
    });
    assert_eq!(stats.failed_attempts.load(Ordering::Relaxed), 1);
    let text = logs.text();
    assert!(text.contains("503"), "{text}");
    assert_logs_name_only_the_origin(&text, &format!("https://{addr}"));
}

#[test]
fn https_webhook_refuses_a_certificate_outside_its_roots_and_logs_no_path() {
    let ca = TestCa::generate();
    let (addr, received) = receiver(0, Some(ca.server_config()));
    let url = url(addr);
    let logs = CapturedLogs::default();
    // Mozilla's roots: the private CA is not among them. This thread's log lines and the sender thread's (it inherits the subscriber).
    let _logging = tracing::subscriber::set_default(logs.subscriber());
    let webhook = Webhook::spawn(&url, None).unwrap();
    webhook.send(b"{}".to_vec());
    wait_until("a failed attempt", || {
        webhook.stats().failed_attempts.load(Ordering::Relaxed) > 0
    });
    assert!(
        received.try_recv().is_err(),
        "delivered to an untrusted server"
    );
    assert_eq!(webhook.stats().delivered.load(Ordering::Relaxed), 0);
    let text = logs.text();
    assert!(text.to_ascii_lowercase().contains("certificate"), "{text}");
    assert_logs_name_only_the_origin(&text, &format!("https://{addr}"));
}

#[test]
fn a_full_queue_drops_instead_of_blocking() {
    // Nothing listens there: every attempt fails, and the sender sits in its backoff.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let url = WebhookUrl::parse(&format!("http://{addr}/hooks/{PATH_TOKEN}")).unwrap();
    let logs = CapturedLogs::default();
    // This thread's log lines and the sender thread's (it inherits the subscriber).
    let _logging = tracing::subscriber::set_default(logs.subscriber());
    let webhook = Webhook::spawn(&url, None).unwrap();
    let extra = 10;
    let started = Instant::now();
    // One in flight, QUEUE_LEN waiting, the rest dropped (one more may be taken off the
    // queue meanwhile).
    for _ in 0..logmon::webhook::QUEUE_LEN + 1 + extra {
        webhook.send(b"{}".to_vec());
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "send blocked for {:?}",
        started.elapsed()
    );
    let dropped = webhook.stats().dropped.load(Ordering::Relaxed);
    assert!(
        (extra as u64 - 1..=extra as u64 + 1).contains(&dropped),
        "{dropped} dropped"
    );
    assert_logs_name_only_the_origin(&logs.text(), &format!("http://{addr}"));
}
