//! The log monitor end to end: the real `appliance supervise` with the log store, a victim
//! service killed in a loop, a fake nginx printing access lines, and `appliance logmon` as a
//! supervised service reporting to a webhook receiver in the test.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");

/// A tiny HTTP receiver on 127.0.0.1: answers the first `fail_first` requests with 503, the
/// rest with 200; every body answered 200 arrives on the channel.
fn webhook_receiver(fail_first: usize) -> (SocketAddr, Receiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let status = if n < fail_first {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            if n >= fail_first {
                let _ = tx.send(serde_json::from_slice(&body).unwrap());
            }
        }
    });
    (addr, rx)
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `appliance supervise`, stopped on drop; on failure its stderr and log files are printed.
struct Node {
    dir: tempfile::TempDir,
    child: Child,
}

impl Node {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn evidence(&self) -> String {
        let mut out = String::new();
        let mut add = |name: &str, path: &Path| {
            let text = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            out.push_str(&format!("---- {name} (last 40 lines) ----\n{tail}\n"));
        };
        add("supervisor stderr", &self.dir.path().join("stderr.log"));
        add("logs/logmon.log", &self.state().join("logs/logmon.log"));
        add(
            "logs/supervisor.log",
            &self.state().join("logs/supervisor.log"),
        );
        out
    }

    fn service(&self, name: &str) -> Option<Value> {
        let out = Command::new(APPLIANCE)
            .args(["status", "--json", "--state-dir"])
            .arg(self.state())
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let services = v.get("services").unwrap_or(&v).as_array()?.clone();
        services.into_iter().find(|s| s["name"] == name)
    }

    fn wait_for<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.evidence()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.evidence());
        }
        crate::support::stop(&mut self.child);
    }
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e} (install it: apt-get install prometheus)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics:\n{complaints}\n---- text ----\n{text}"
    );
}

#[test]
fn killing_a_service_three_times_fires_one_crash_loop_alert_that_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (hook, received) = webhook_receiver(1);
    let config = dir.path().join("cluster.toml");
    let toml = cluster_config::DEFAULT_CLUSTER_TOML.replace(
        "[alerts]\n",
        &format!("[alerts]\nwebhook = \"http://{hook}/alerts\"\n"),
    );
    fs::write(&config, toml).unwrap();
    let metrics_addr = free_addr();
    let access = r#"echo '127.0.0.1 [2025-01-02T03:04:05+00:00] "GET / HTTP/1.1" 200 5 0.002'; echo '127.0.0.1 [2025-01-02T03:04:05+00:00] "GET /nope HTTP/1.1" 404 9 0.001'"#;
    let specs = json!([
        { "name": "victim", "argv": ["sleep", "1000"] },
        { "name": "nginx", "argv": ["sh", "-c", format!("while :; do {access}; sleep 0.1; done")] },
        {
            "name": "logmon",
            "argv": [
                APPLIANCE, "logmon", "--config", config, "--node", "server1", "--state-dir", state,
                "--metrics-addr", metrics_addr.to_string(), "--poll-ms", "100", "--stable-after-ms", "3000",
            ],
            "env": { "RUST_LOG": "info" },
        },
    ]);
    let spec = dir.path().join("spec.json");
    fs::write(&spec, serde_json::to_vec_pretty(&specs).unwrap()).unwrap();
    let child = Command::new(APPLIANCE)
        .args(["supervise", "--spec"])
        .arg(&spec)
        .arg("--state-dir")
        .arg(&state)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let node = Node { dir, child };
    node.wait_for("the metrics endpoint", Duration::from_secs(20), || {
        logmon::metrics::fetch(metrics_addr).ok()
    });

    // kill -9 four times within seconds: the rule's threshold is three restarts in 60 s.
    let mut last_pid = 0;
    for _ in 0..4 {
        let pid = node.wait_for("victim running again", Duration::from_secs(10), || {
            let s = node.service("victim")?;
            let pid = s["pid"].as_i64()?;
            (pid != last_pid && s["ready"] == true).then_some(pid)
        });
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        last_pid = pid;
    }

    // Deliveries until the crash loop resolved (3 s after the last restart, by the flag).
    let mut bodies: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !bodies
        .iter()
        .any(|b| b["rule"] == "crash-loop" && b["state"] == "resolved")
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(body) => bodies.push(body),
            Err(_) => panic!(
                "no resolved crash-loop alert; webhook got {bodies:#?}\n{}",
                node.evidence()
            ),
        }
    }
    // Anything else still on its way.
    bodies.extend(std::iter::from_fn(|| {
        received.recv_timeout(Duration::from_millis(1500)).ok()
    }));
    let summary: Vec<String> = bodies
        .iter()
        .map(|b| format!("{}:{}:{}", b["rule"], b["subject"], b["state"]).replace('"', ""))
        .collect();
    eprintln!("webhook deliveries: {summary:?}");
    let count = |s: &str| summary.iter().filter(|x| *x == s).count();
    assert_eq!(count("crash-loop:victim:firing"), 1, "{summary:?}");
    assert_eq!(count("crash-loop:victim:resolved"), 1, "{summary:?}");
    assert_eq!(count("service-restarted:victim:firing"), 1, "{summary:?}");
    let pos = |s: &str| summary.iter().position(|x| x == s).unwrap();
    assert!(pos("crash-loop:victim:firing") < pos("crash-loop:victim:resolved"));
    let firing = bodies.iter().find(|b| b["rule"] == "crash-loop").unwrap();
    assert_eq!(
        (firing["node"].as_str(), firing["severity"].as_str()),
        (Some("server1"), Some("critical")),
        "{firing}"
    );

    // The history, as the status page reads it.
    let stored = logmon::alerts::recent(&logmon::alerts::db_path(&state), 50).unwrap();
    let crash: Vec<_> = stored.iter().filter(|a| a.rule == "crash-loop").collect();
    assert_eq!(crash.len(), 1, "{stored:#?}");
    assert_eq!(crash[0].state, logmon::AlertState::Resolved);
    assert!(
        crash[0].resolved_ms.unwrap() >= crash[0].fired_ms + 3000,
        "{:?}",
        crash[0]
    );

    // Metrics: restarts from events, requests from the access lines, valid text format.
    let text = node.wait_for("request metrics", Duration::from_secs(10), || {
        let text = logmon::metrics::fetch(metrics_addr).ok()?;
        text.contains("tandem_service_restarts_total{service=\"victim\"} 4\n")
            .then_some(text)
    });
    for expected in [
        "tandem_service_up{service=\"victim\"} 1\n",
        "tandem_alerts_firing{rule=\"crash-loop\"} 0\n",
        "tandem_alerts_fired_total{rule=\"crash-loop\"} 1\n",
    ] {
        assert!(text.contains(expected), "{expected:?} not in\n{text}");
    }
    let requests = |class: &str| -> u64 {
        let prefix = format!("tandem_http_requests_total{{class=\"{class}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(requests("2xx") > 0 && requests("4xx") > 0, "{text}");
    promtool_check(&text);

    // The log store: service output, events, and the alert in the monitor's own log.
    let read = |name: &str| fs::read_to_string(state.join("logs").join(name)).unwrap_or_default();
    assert!(
        read("nginx.log").contains(" stdout ")
            && read("nginx.log").contains("\"GET / HTTP/1.1\" 200"),
        "{}",
        node.evidence()
    );
    assert!(
        read("supervisor.log").contains(" event ")
            && read("supervisor.log").contains("victim exited signal 9"),
        "{}",
        node.evidence()
    );
    assert!(
        read("logmon.log").contains("crash-loop"),
        "{}",
        node.evidence()
    );
}
