use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logmon::store::{Entry, Limits, LogStore, LOG_DIR};
use logmon::{alerts, metrics, AlertState, Config};

use crate::{promtool_check, webhook_receiver, TestCa};

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The supervisor's `events` table as `appliance::state` creates it.
fn state_db(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("state.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.execute_batch(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, service TEXT NOT NULL,
         kind TEXT NOT NULL, pid INTEGER NULL, detail TEXT NOT NULL);",
    )
    .unwrap();
    conn
}

fn event(conn: &rusqlite::Connection, service: &str, kind: &str) {
    conn.execute(
        "INSERT INTO events (ts_ms, service, kind, pid, detail) VALUES (?1, ?2, ?3, NULL, '')",
        rusqlite::params![logmon::time::now_ms(), service, kind],
    )
    .unwrap();
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn monitor_counts_requests_raises_alerts_and_serves_valid_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let db = state_db(state);
    event(&db, "nginx", "started");
    event(&db, "nginx", "ready");
    let (hook, received) = webhook_receiver(1);
    let cluster = cluster_config::Cluster::default_cluster();
    let mut config = Config::new(&cluster, cluster.node("server1").unwrap(), state);
    config.webhook =
        Some(cluster_config::WebhookUrl::parse(&format!("http://{hook}/alerts")).unwrap());
    let addr = free_port();
    config.metrics_addr = Some(addr);
    config.poll = Duration::from_millis(100);
    config.rules.cooldown = Duration::from_secs(3600);

    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = shutdown.clone();
    let monitor = std::thread::spawn(move || logmon::run(config, &flag));
    wait_for("the metrics endpoint", Duration::from_secs(10), || {
        metrics::fetch(addr).ok()
    });

    // 40 requests, 10 of them 5xx (25 %, over the default 5 %), and a line that is not one.
    let mut store = LogStore::open(&state.join(LOG_DIR), Limits::default()).unwrap();
    for n in 0..40 {
        let status = if n % 4 == 0 { 502 } else { 200 };
        let text = format!(
            r#"10.88.0.1 [2025-01-02T03:04:05+00:00] "GET /{n} HTTP/1.1" {status} 100 0.0{n:02}"#
        );
        store
            .append(&Entry {
                ts_ms: logmon::time::now_ms(),
                log: "nginx".into(),
                tag: "stdout".into(),
                pid: Some(9),
                text,
            })
            .unwrap();
    }
    let text = "not an access line".to_string();
    store
        .append(&Entry {
            ts_ms: 0,
            log: "nginx".into(),
            tag: "stdout".into(),
            pid: Some(9),
            text,
        })
        .unwrap();
    store.flush().unwrap();
    // The database agent reports a replica whose IO thread does not run.
    std::fs::create_dir_all(state.join("run")).unwrap();
    let status = api::db::AgentStatus {
        node: "server1".into(),
        role: api::db::Role::Replica,
        primary: api::db::PrimaryRef {
            name: "server2".into(),
            address: std::net::Ipv4Addr::new(10, 88, 0, 12),
            port: 3306,
        },
        healthy: false,
        error: None,
        lag_s: None,
        read_only: Some(true),
        io_running: Some("Connecting".into()),
        sql_running: Some(true),
        gtid_current_pos: None,
        gtid_slave_pos: None,
        gtid_binlog_pos: None,
        updated_ms: logmon::time::now_ms(),
    };
    std::fs::write(
        state.join("run").join(api::db::STATUS_FILE),
        serde_json::to_vec(&status).unwrap(),
    )
    .unwrap();

    // The webhook answers 503 first: the alert arrives by a retry.
    let mut rules_seen = Vec::new();
    while !(rules_seen.contains(&"5xx-ratio".to_string())
        && rules_seen.contains(&"replication-stopped".to_string()))
    {
        let body = received
            .recv_timeout(Duration::from_secs(10))
            .expect("a webhook delivery");
        assert_eq!(
            (
                body["cluster"].as_str(),
                body["node"].as_str(),
                body["state"].as_str()
            ),
            (Some("tandem"), Some("server1"), Some("firing")),
            "{body}"
        );
        rules_seen.push(body["rule"].as_str().unwrap().to_string());
    }

    let text = wait_for("request metrics", Duration::from_secs(10), || {
        metrics::fetch(addr)
            .ok()
            .filter(|t| t.contains("tandem_http_requests_total{class=\"5xx\"} 10\n"))
    });
    for expected in [
        "tandem_http_requests_total{class=\"2xx\"} 30\n",
        "tandem_http_unparsed_lines_total 1\n",
        "tandem_http_request_duration_seconds_count 40\n",
        "tandem_http_response_bytes_total 4000\n",
        "tandem_service_up{service=\"nginx\"} 1\n",
        "tandem_alerts_firing{rule=\"5xx-ratio\"} 1\n",
        "tandem_db_replication_running 0\n",
        "tandem_webhook_sends_total{result=\"failed_attempt\"} 1\n",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in\n{text}");
    }
    assert!(text.contains("tandem_data_size_bytes "), "{text}");
    promtool_check(&text);

    // The history is in alerts.db, for the status page.
    let stored = alerts::recent(&alerts::db_path(state), 10).unwrap();
    assert!(
        stored
            .iter()
            .any(|a| a.rule == "5xx-ratio" && a.state == AlertState::Firing),
        "{stored:?}"
    );

    // A crash loop from supervisor events: three restarts, one alert.
    for _ in 0..4 {
        event(&db, "app", "restarting");
    }
    let body = received
        .recv_timeout(Duration::from_secs(10))
        .expect("a webhook delivery");
    let mut bodies = vec![body];
    bodies.extend(std::iter::from_fn(|| {
        received.recv_timeout(Duration::from_millis(500)).ok()
    }));
    let rules: Vec<&str> = bodies.iter().map(|b| b["rule"].as_str().unwrap()).collect();
    assert_eq!(
        rules.iter().filter(|r| **r == "crash-loop").count(),
        1,
        "{rules:?}"
    );

    shutdown.store(true, Ordering::SeqCst);
    monitor.join().unwrap().unwrap();
}

#[test]
fn cert_expiry_watches_the_certificate_the_balancer_serves() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let _db = state_db(state);
    let ca = TestCa::generate();
    // The balancer's persisted self-signed fallback (its state directory is `balancer/`
    // below the node's) expires in 3 days; a certificate elsewhere in the state directory
    // (where the monitor used to look) is fine for years.
    let served = state.join("balancer/tls/self-signed.crt");
    let elsewhere = state.join("tls/self-signed.crt");
    for (path, days) in [(&served, Some(3)), (&elsewhere, None)] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, ca.leaf(&["tandem.test"], days).0).unwrap();
    }
    let cluster = cluster_config::Cluster::default_cluster();
    let mut config = Config::new(&cluster, cluster.node("server1").unwrap(), state);
    let addr = free_port();
    config.metrics_addr = Some(addr);
    config.poll = Duration::from_millis(100);

    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = shutdown.clone();
    let monitor = std::thread::spawn(move || logmon::run(config, &flag));
    let db = alerts::db_path(state);
    let firing = wait_for("a cert-expiry alert", Duration::from_secs(10), || {
        let firing = alerts::firing(&db).ok()?;
        firing
            .iter()
            .any(|a| a.rule == "cert-expiry")
            .then_some(firing)
    });
    let certs: Vec<(&str, &str)> = firing
        .iter()
        .filter(|a| a.rule == "cert-expiry")
        .map(|a| (a.subject.as_str(), a.message.as_str()))
        .collect();
    let subject = served.display().to_string();
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(certs[0].0, subject);
    assert!(certs[0].1.contains("expires in 2 days"), "{certs:?}");
    let text = metrics::fetch(addr).unwrap();
    let gauge = format!("tandem_tls_cert_not_after_seconds{{path=\"{subject}\"}} ");
    assert!(text.contains(&gauge), "{gauge:?} missing in\n{text}");
    promtool_check(&text);
    shutdown.store(true, Ordering::SeqCst);
    monitor.join().unwrap().unwrap();
}
