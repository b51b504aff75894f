//! MariaDB primary–replica set up and watched by Tandem itself: two `appliance run` nodes of the
//! local example cluster (moved to their own loopback addresses so that these tests and
//! `run.rs` can run at once), the demo application behind each node's nginx, replica restarts
//! and SIGKILLs, a wrong secret, an unreachable primary, and a switchover and back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");

/// The example cluster with its node addresses replaced by `127.0.0.<a>` and `127.0.0.<b>`, and
/// its floating IP by `127.0.0.<a - 1>` (tests run at once must not share one).
fn cluster_config(dir: &Path, a: u8, b: u8) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/local-cluster.toml");
    let text = std::fs::read_to_string(example).unwrap();
    assert!(
        text.contains("\"127.0.0.11\"") && text.contains("\"127.0.0.12\""),
        "the example cluster changed:\n{text}"
    );
    assert!(
        text.contains("\"127.0.0.10\""),
        "the example cluster changed:\n{text}"
    );
    let text = text
        .replace("\"127.0.0.10\"", &format!("\"127.0.0.{}\"", a - 1))
        .replace("\"127.0.0.11\"", &format!("\"127.0.0.{a}\""))
        .replace("\"127.0.0.12\"", &format!("\"127.0.0.{b}\""));
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

struct Node {
    name: &'static str,
    addr: String,
    config: PathBuf,
    secret: Option<PathBuf>,
    child: Option<Child>,
    state: PathBuf,
    stderr: PathBuf,
}

impl Node {
    fn new(
        name: &'static str,
        addr: &str,
        root: &Path,
        config: &Path,
        secret: Option<PathBuf>,
    ) -> Node {
        let mut node = Node {
            name,
            addr: addr.to_string(),
            config: config.to_path_buf(),
            secret,
            child: None,
            state: root.join(name),
            stderr: root.join(format!("{name}.stderr")),
        };
        node.start();
        node
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .unwrap();
        let mut cmd = Command::new(APPLIANCE);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .args(["--node", self.name, "--state-dir"])
            .arg(&self.state);
        if let Some(secret) = &self.secret {
            cmd.arg("--secret-file").arg(secret);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start appliance run");
        self.child = Some(child);
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        signal(child.id() as i32, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{}: still running 20 s after SIGTERM\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} supervisor log (last 80 lines) ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(80)..].join("\n")
        )
    }

    fn service(&self, name: &str) -> Option<Value> {
        let out = Command::new(APPLIANCE)
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.get("services")
            .unwrap_or(&v)
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    /// `appliance db status --json`: (exit code, output).
    fn db_status(&self) -> (i32, Value) {
        let out = Command::new(APPLIANCE)
            .args(["db", "status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        )
    }

    fn agent(&self) -> Value {
        let path = self.state.join("run/db-status.json");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok() {
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}\nagent: {}\n{}",
                    self.name,
                    self.agent(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&self, service: &str, timeout: Duration) {
        self.wait_for(&format!("{service} ready"), timeout, || {
            self.service(service).is_some_and(|s| s["ready"] == true)
        });
    }

    fn wait_healthy(&self, role: &str, timeout: Duration) {
        self.wait_for(&format!("a healthy {role}"), timeout, || {
            let a = self.agent();
            a["healthy"] == true && a["role"] == role
        });
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:8081{path}", self.addr)
    }

    /// POST /notes as JSON through this node's nginx: (status, answer).
    fn post(&self, body: &str) -> (u16, Value) {
        let payload = serde_json::json!({ "body": body }).to_string();
        let out = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "10",
                "-H",
                "Content-Type: application/json",
                "-d",
                &payload,
                "-w",
                "\n%{http_code}",
            ])
            .arg(self.url("/notes"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (answer, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(answer).unwrap_or(Value::String(answer.to_string())),
        )
    }

    /// POST until it is accepted (a switchover makes writes fail for a moment, never half-done).
    fn post_ok(&self, body: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (code, answer) = self.post(body);
            if code == 201 {
                assert_eq!(answer["note"]["body"], body);
                return;
            }
            assert_eq!(code, 503, "{}: unexpected answer {answer}", self.name);
            assert!(
                Instant::now() < deadline,
                "{}: writing {body:?} kept failing: {answer}\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The bodies of all notes, read through this node's application (its local database).
    fn notes(&self) -> Vec<String> {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "5"])
            .arg(self.url("/notes.json"))
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["notes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|n| n["body"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs `sql` as MariaDB's root over the node's Unix socket (the test runs as root); the
    /// client's batch output.
    fn sql_root(&self, database: &str, sql: &str) -> String {
        let socket = self.state.join("run/mysqld/mysqld.sock");
        let mut cmd = Command::new("mariadb");
        cmd.args([
            "--no-defaults",
            "--protocol=SOCKET",
            "--user=root",
            "--batch",
        ])
        .arg(format!("--socket={}", socket.display()))
        .arg(database);
        let out = mariadb_stdin(&mut cmd, sql);
        assert!(
            out.status.success(),
            "{}: {sql}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn switchover(&self, to: &str) -> (bool, String) {
        let out = Command::new(APPLIANCE)
            .args(["db", "switchover", "--to", to, "--state-dir"])
            .arg(&self.state)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::support::stop(&mut child);
        }
    }
}

/// An HTTP answer as `curl` saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::String(self.body.clone()))
    }
}

/// `curl` from the local address `from` (a client of its own, as the rate limit sees it).
fn curl(from: &str, args: &[&str], url: &str) -> Answer {
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "--max-time", "20", "--interface", from])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// POST a JSON note from `from` through `node`'s nginx.
fn post_from(node: &Node, from: &str, body: &str) -> Answer {
    let payload = serde_json::json!({ "body": body }).to_string();
    curl(
        from,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &payload,
        ],
        &node.url("/notes"),
    )
}

/// `sql` through the `mariadb` client over TCP to `host:3306` with the account in
/// `option_file`, over TLS with the server's certificate checked when `ssl_ca` is given, else
/// in plain text.
fn mariadb_tcp(
    option_file: &Path,
    host: &str,
    ssl_ca: Option<&Path>,
    database: &str,
    sql: &str,
) -> std::process::Output {
    let mut cmd = Command::new("mariadb");
    cmd.arg(format!("--defaults-file={}", option_file.display()))
        .args(["--protocol=TCP", "--host", host, "--port", "3306"]);
    match ssl_ca {
        Some(ca) => cmd
            .args(["--ssl", "--ssl-verify-server-cert"])
            .arg(format!("--ssl-ca={}", ca.display())),
        None => cmd.arg("--skip-ssl"),
    };
    if !database.is_empty() {
        cmd.arg(database);
    }
    mariadb_stdin(&mut cmd, sql)
}

/// Runs a `mariadb` client command with `sql` on its standard input (never in its argv).
fn mariadb_stdin(cmd: &mut Command, sql: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mariadb");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// Every expected body exactly once, nothing else.
fn assert_exactly(node: &Node, expected: &[String]) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for body in node.notes() {
        *counts.entry(body).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = expected.iter().map(|b| (b.clone(), 1)).collect();
    assert_eq!(
        counts,
        want,
        "{}: notes differ from what was written\n{}",
        node.name,
        node.log()
    );
}

#[test]
fn replication_through_the_app_survives_restarts_kills_and_switchovers() {
    let tmp = crate::support::tmp_root();
    let config = cluster_config(tmp.path(), 21, 22);
    let mut s1 = Node::new("server1", "127.0.0.21", tmp.path(), &config, None);
    s1.wait_ready("mariadb", Duration::from_secs(120));
    s1.wait_ready("nginx", Duration::from_secs(30));

    // The primary is not there yet: a clear error and a failing health check, not a crash.
    s1.wait_for(
        "the agent reporting an unreachable primary",
        Duration::from_secs(30),
        || {
            let a = s1.agent();
            a["healthy"] == false
                && a["error"].as_str().is_some_and(|e| {
                    e.contains("connecting to the primary") && e.contains("127.0.0.22")
                })
        },
    );
    let (code, status) = s1.db_status();
    assert_eq!(code, 1, "{status}");
    assert_eq!(status["agent"]["role"], "replica");
    assert!(s1.log().contains("database unhealthy"), "{}", s1.log());
    let (code, answer) = s1.post("nowhere to go");
    assert_eq!(code, 503, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("writing to the primary"),
        "{answer}"
    );
    assert_eq!(s1.service("db-agent").unwrap()["restarts"], 0);

    let s2 = Node::new("server2", "127.0.0.22", tmp.path(), &config, None);
    s2.wait_ready("nginx", Duration::from_secs(120));
    s2.wait_healthy("primary", Duration::from_secs(30));
    s1.wait_healthy("replica", Duration::from_secs(30));

    // Written through the primary's node, read back through the replica's within 1 s.
    let mut written = Vec::new();
    for i in 0..3 {
        let body = format!("first-{i}");
        let (code, answer) = s2.post(&body);
        assert_eq!(code, 201, "{answer}");
        assert_eq!(
            (answer["node"].as_str(), answer["role"].as_str()),
            (Some("server2"), Some("primary"))
        );
        let at = Instant::now();
        s1.wait_for("the row on the replica", Duration::from_secs(1), || {
            s1.notes().contains(&body)
        });
        eprintln!("{body}: on the replica after {:?}", at.elapsed());
        written.push(body);
    }
    // Written through the replica's node: goes to the primary.
    let (code, answer) = s1.post("via-replica");
    assert_eq!(code, 201, "{answer}");
    assert_eq!(
        (answer["node"].as_str(), answer["role"].as_str()),
        (Some("server1"), Some("replica"))
    );
    written.push("via-replica".into());
    s2.wait_for(
        "the replica's write on the primary",
        Duration::from_secs(1),
        || s2.notes().contains(&"via-replica".to_string()),
    );
    let page = Command::new("curl")
        .args(["-sf"])
        .arg(s1.url("/"))
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(
        page.contains("node: server1")
            && page.contains("db_role: replica")
            && page.contains("via-replica"),
        "{page}"
    );
    let css = Command::new("curl")
        .args(["-sf"])
        .arg(s1.url("/style.css"))
        .output()
        .unwrap();
    assert!(
        css.status.success() && !css.stdout.is_empty(),
        "nginx serves the application's static files"
    );

    // Replication runs over TLS, the primary's certificate verified against the cluster CA.
    let slave = db::repl::parse_batch(&s1.sql_root("mysql", "SHOW SLAVE STATUS;\n"));
    assert_eq!(
        (
            slave[0]["Master_SSL_Allowed"].as_str(),
            slave[0]["Master_SSL_Verify_Server_Cert"].as_str()
        ),
        ("Yes", "Yes"),
        "{slave:?}"
    );
    // Every account logs in over TLS only: without it, access is denied.
    let secret = api::secret::parse_secret(
        &std::fs::read_to_string(tmp.path().join("local.secret")).unwrap(),
    )
    .unwrap();
    let passwords = db::agent::passwords(&secret);
    let ca = s1.state.join("run/mysqld/tls-ca.pem");
    for (user, password) in [
        (db::repl::APP_USER, &passwords.app),
        (db::repl::REPL_USER, &passwords.replication),
        (db::repl::ADMIN_USER, &passwords.admin),
    ] {
        let option_file = tmp.path().join(format!("{user}.cnf"));
        std::fs::write(
            &option_file,
            format!("[client]\nuser = {user}\npassword = {password}\n"),
        )
        .unwrap();
        let plain = mariadb_tcp(&option_file, "127.0.0.22", None, "", "SELECT 1;\n");
        let err = String::from_utf8_lossy(&plain.stderr);
        assert!(
            !plain.status.success() && err.contains("Access denied"),
            "{user} without TLS: {err}"
        );
        let tls = mariadb_tcp(&option_file, "127.0.0.22", Some(&ca), "", "SELECT 1;\n");
        assert!(
            tls.status.success(),
            "{user} over TLS: {}",
            String::from_utf8_lossy(&tls.stderr)
        );
    }
    // The replica refuses a direct write by the application's account.
    let option_file = tmp.path().join(format!("{}.cnf", db::repl::APP_USER));
    let direct = |host: &str| {
        mariadb_tcp(
            &option_file,
            host,
            Some(&ca),
            "app",
            "INSERT INTO notes (node, body) VALUES ('direct', 'direct-write');\n",
        )
    };
    let out = direct("127.0.0.21");
    assert!(
        !out.status.success(),
        "a direct write on the replica succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1290") && err.contains("read-only"), "{err}");

    // A replica restarted: rows written meanwhile arrive, no error.
    s1.stop();
    for i in 0..3 {
        let body = format!("while-down-{i}");
        s2.post_ok(&body);
        written.push(body);
    }
    s1.start();
    s1.wait_ready("nginx", Duration::from_secs(60));
    s1.wait_healthy("replica", Duration::from_secs(30));
    s1.wait_for(
        "the rows written while it was down",
        Duration::from_secs(30),
        || s1.notes().len() == written.len(),
    );
    assert_exactly(&s1, &written);

    // A replica's mariadbd SIGKILLed while rows are written: it resumes, nothing lost or doubled.
    let pid = s1.service("mariadb").unwrap()["pid"].as_i64().unwrap() as i32;
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    for i in 0..5 {
        let body = format!("after-kill-{i}");
        s2.post_ok(&body);
        written.push(body);
    }
    s1.wait_for("mariadb restarted", Duration::from_secs(30), || {
        s1.service("mariadb")
            .is_some_and(|s| s["ready"] == true && s["pid"].as_i64() != Some(i64::from(pid)))
    });
    s1.wait_healthy("replica", Duration::from_secs(30));
    s1.wait_for(
        "the rows written around the kill",
        Duration::from_secs(30),
        || s1.notes().len() == written.len(),
    );
    assert_exactly(&s1, &written);
    let agent = s1.agent();
    assert!(
        agent["error"].is_null() && agent["sql_running"] == true && agent["io_running"] == "Yes",
        "{agent}"
    );

    // Switchover and back, with rows before, between and after.
    let (ok, text) = s2.switchover("server2");
    assert!(!ok && text.contains("already the primary"), "{text}");
    s2.post_ok("before-switchover");
    written.push("before-switchover".into());
    let (ok, text) = s2.switchover("server1");
    assert!(ok, "switchover failed:\n{text}\n{}\n{}", s1.log(), s2.log());
    s1.wait_healthy("primary", Duration::from_secs(30));
    s2.wait_healthy("replica", Duration::from_secs(30));
    for node in [&s1, &s2] {
        let body = format!("between-via-{}", node.name);
        node.post_ok(&body);
        written.push(body);
    }
    let (_, status) = s1.db_status();
    let roles: Vec<(String, String)> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or("").to_string(),
                n["role"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("server1".to_string(), "primary".to_string()),
            ("server2".to_string(), "replica".to_string())
        ],
        "{status}"
    );
    assert_eq!(
        std::fs::read_to_string(s2.state.join(api::files::DB_PRIMARY))
            .unwrap()
            .trim(),
        "server1"
    );
    let (ok, text) = s1.switchover("server2");
    assert!(
        ok,
        "switchover back failed:\n{text}\n{}\n{}",
        s1.log(),
        s2.log()
    );
    s2.wait_healthy("primary", Duration::from_secs(30));
    s1.wait_healthy("replica", Duration::from_secs(30));
    for node in [&s1, &s2] {
        let body = format!("after-via-{}", node.name);
        node.post_ok(&body);
        written.push(body);
    }
    s1.wait_for("every row on the replica", Duration::from_secs(30), || {
        s1.notes().len() == written.len()
    });
    assert_exactly(&s1, &written);
    assert_exactly(&s2, &written);
    let (code, status) = s1.db_status();
    assert_eq!(code, 0, "{status}");

    // A local cluster shares one machine: only server1 (the higher VRRP priority) binds the
    // floating IP, the other balancer runs without it, and no service of either node failed.
    for node in [&s1, &s2] {
        let out = Command::new(APPLIANCE)
            .args(["status", "--json", "--state-dir"])
            .arg(&node.state)
            .output()
            .unwrap();
        let services: Value = serde_json::from_slice(&out.stdout).unwrap();
        for svc in services.as_array().unwrap() {
            assert_ne!(
                svc["state"],
                "failed",
                "{}: {svc}\n{}",
                node.name,
                node.log()
            );
        }
        assert_eq!(
            node.service("balancer").unwrap()["restarts"],
            0,
            "{}",
            node.log()
        );
    }
    let status = |node: &Node| {
        let out = Command::new(APPLIANCE)
            .args(["status", "--state-dir"])
            .arg(&node.state)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(
        status(&s1).contains("floating IP 127.0.0.20: held by this node (server1;"),
        "{}",
        status(&s1)
    );
    assert!(
        status(&s2).contains("floating IP 127.0.0.20: held by another node"),
        "{}",
        status(&s2)
    );
    let vip = std::net::SocketAddr::from(([127, 0, 0, 20], 8443));
    assert!(
        std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(2)).is_ok(),
        "nothing listens on the floating IP {vip}\n{}",
        s1.log()
    );
}

#[test]
fn wrong_credentials_fail_the_health_check_without_crashing() {
    let tmp = crate::support::tmp_root();
    let config = cluster_config(tmp.path(), 31, 32);
    let s2 = Node::new("server2", "127.0.0.32", tmp.path(), &config, None);
    // server1 holds another cluster's secret: its replication password is wrong.
    let s1 = Node::new(
        "server1",
        "127.0.0.31",
        tmp.path(),
        &config,
        Some(tmp.path().join("other.secret")),
    );
    s2.wait_healthy("primary", Duration::from_secs(120));
    s1.wait_ready("nginx", Duration::from_secs(120));
    s1.wait_for(
        "the agent reporting the refused login",
        Duration::from_secs(30),
        || {
            let a = s1.agent();
            a["healthy"] == false
                && a["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("Access denied") && e.contains("tandem_repl"))
        },
    );
    let (code, status) = s1.db_status();
    assert_eq!(code, 1);
    assert!(
        status["agent"]["error"]
            .as_str()
            .unwrap()
            .contains("Access denied"),
        "{status}"
    );
    assert!(
        s1.log().contains("database unhealthy") && s1.log().contains("Access denied"),
        "{}",
        s1.log()
    );
    // Still up, never restarted; the application answers with the error instead of dying.
    std::thread::sleep(Duration::from_secs(2));
    for service in ["db-agent", "app", "mariadb"] {
        let s = s1.service(service).unwrap();
        assert!(s["restarts"] == 0 && s["ready"] == true, "{service}: {s}");
    }
    let (code, answer) = s1.post("refused");
    assert_eq!(code, 503, "{answer}");
    assert!(s2.notes().is_empty());
}

#[test]
fn the_note_list_is_paged_and_writes_are_capped_and_rate_limited() {
    use app::{limit, store};
    let tmp = crate::support::tmp_root();
    let config = cluster_config(tmp.path(), 41, 42);
    let s2 = Node::new("server2", "127.0.0.42", tmp.path(), &config, None);
    s2.wait_ready("nginx", Duration::from_secs(120));
    s2.wait_healthy("primary", Duration::from_secs(30));
    // Each part of the test is a client of its own (the rate limit is per client address).
    let (sizes, burst, other) = ("127.0.0.201", "127.0.0.202", "127.0.0.203");
    let first = post_from(&s2, sizes, "first");
    assert_eq!(first.status, 201, "{first:?}\n{}", s2.log());

    // 300 notes of 4000 bytes (twice today's limit: what the old limit let a cluster store).
    s2.sql_root(
        "app",
        "INSERT INTO notes (node, body) SELECT 'seed', CONCAT('seed-', LPAD(seq, 3, '0'), '-', REPEAT('n', 3991)) FROM seq_1_to_300;\n",
    );
    let at = Instant::now();
    let page = curl(sizes, &[], &s2.url("/notes.json"));
    eprintln!("JSON page of 301 notes answered in {:?}", at.elapsed());
    assert_eq!(page.status, 200, "{}\n{}", page.body, s2.log());
    let v = page.json();
    let notes = v["notes"].as_array().unwrap();
    assert_eq!(notes.len(), store::PAGE_SIZE);
    assert_eq!(notes[0]["body"].as_str().unwrap().len(), 4000);
    assert!(notes[0]["body"].as_str().unwrap().starts_with("seed-300-"));
    let older = v["older"].as_str().expect("a link to older notes");
    let next = curl(sizes, &[], &s2.url(older)).json();
    let next_notes = next["notes"].as_array().unwrap();
    assert_eq!(next_notes.len(), store::PAGE_SIZE);
    assert!(next_notes[0]["body"]
        .as_str()
        .unwrap()
        .starts_with("seed-250-"));
    let at = Instant::now();
    let html = curl(sizes, &[], &s2.url("/"));
    eprintln!("HTML page of 301 notes answered in {:?}", at.elapsed());
    assert_eq!(html.status, 200, "{}", html.body);
    assert_eq!(html.body.matches("<li>").count(), store::PAGE_SIZE);
    assert!(html.body.contains("Older notes"), "{}", html.body);
    let last = curl(sizes, &[], &s2.url("/?before=2"));
    assert!(
        last.status == 200 && last.body.contains(">first<") && !last.body.contains("Older notes"),
        "{}",
        last.body
    );
    assert_eq!(curl(sizes, &[], &s2.url("/?before=x")).status, 400);

    // A note of the largest size is taken; one byte more is refused with the limit named.
    let largest = post_from(&s2, sizes, &"l".repeat(store::MAX_NOTE_BYTES));
    assert_eq!(largest.status, 201, "{}", largest.body);
    let oversize = post_from(&s2, sizes, &"o".repeat(store::MAX_NOTE_BYTES + 1));
    assert_eq!(oversize.status, 413, "{}", oversize.body);
    assert!(
        oversize.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 2000 bytes")),
        "{}",
        oversize.body
    );

    // A burst from one client: refused with 429 and Retry-After once its bucket is empty;
    // another client still writes.
    let mut codes = Vec::new();
    let mut refused = None;
    for i in 0..limit::WRITE_BURST + 10 {
        let a = post_from(&s2, burst, &format!("burst-{i}"));
        codes.push(a.status);
        if a.status == 429 && refused.is_none() {
            refused = Some(a);
        }
    }
    let accepted = codes.iter().filter(|c| **c == 201).count();
    assert!(
        codes.iter().all(|c| *c == 201 || *c == 429)
            && accepted >= limit::WRITE_BURST as usize
            && accepted < codes.len(),
        "{codes:?}"
    );
    let refused = refused.unwrap();
    let retry: u64 = refused
        .header("retry-after")
        .and_then(|r| r.parse().ok())
        .expect("Retry-After");
    assert!(retry >= 1, "{refused:?}");
    assert!(
        refused.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("too many writes from 127.0.0.202")),
        "{}",
        refused.body
    );
    let a = post_from(&s2, other, "another client");
    assert_eq!(a.status, 201, "{}", a.body);

    // The table full: a clear refusal, nothing deleted to make room.
    let count = |node: &Node| -> u64 {
        node.sql_root("app", "SELECT COUNT(*) AS n FROM notes;\n")
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    };
    let missing = store::MAX_NOTES - count(&s2);
    s2.sql_root(
        "app",
        &format!(
            "INSERT INTO notes (node, body) SELECT 'seed', 'filler' FROM seq_1_to_{missing};\n"
        ),
    );
    let full = post_from(&s2, other, "one too many");
    assert_eq!(full.status, 507, "{}", full.body);
    assert!(
        full.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("the notes are full")),
        "{}",
        full.body
    );
    assert_eq!(count(&s2), store::MAX_NOTES);
    let page = curl(other, &[], &s2.url("/notes.json"));
    assert_eq!(page.status, 200, "{}", page.body);
}

#[test]
fn a_switchover_loses_no_write_and_returns_once_every_application_follows() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let tmp = crate::support::tmp_root();
    let config = cluster_config(tmp.path(), 51, 52);
    let s2 = Node::new("server2", "127.0.0.52", tmp.path(), &config, None);
    let s1 = Node::new("server1", "127.0.0.51", tmp.path(), &config, None);
    for node in [&s1, &s2] {
        node.wait_ready("nginx", Duration::from_secs(120));
    }
    s2.wait_healthy("primary", Duration::from_secs(30));
    s1.wait_healthy("replica", Duration::from_secs(30));
    let first = post_from(&s2, "127.0.0.100", "first");
    assert_eq!(first.status, 201, "{first:?}");

    // A writer through each node's application, as new users would (a new connection and a
    // client address of its own each time, so no rate limit applies), all along.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = [
        (s2.addr.clone(), "old-primary"),
        (s1.addr.clone(), "replica"),
    ]
    .into_iter()
    .enumerate()
    .map(|(w, (addr, label))| {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let url = format!("http://{addr}:8081/notes");
            let mut results = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let from = format!("127.0.0.{}", 101 + w * 50 + i % 50);
                let body = format!("{label}-{i}");
                let payload = serde_json::json!({ "body": body }).to_string();
                let at = Instant::now();
                let a = curl(
                    &from,
                    &[
                        "-H",
                        "Content-Type: application/json",
                        "--data-binary",
                        &payload,
                    ],
                    &url,
                );
                results.push((body, a.status, at.elapsed(), a.body));
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            results
        })
    })
    .collect();
    std::thread::sleep(Duration::from_secs(1));
    let at = Instant::now();
    let (ok, text) = s2.switchover("server1");
    let took = at.elapsed();
    // When the command returns, every node's agent publishes the new primary: the application
    // reads it at its next write.
    let published: Vec<Value> = [&s1, &s2]
        .iter()
        .map(|n| n.agent()["primary"]["name"].clone())
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let results: Vec<_> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(ok, "switchover failed:\n{text}\n{}\n{}", s1.log(), s2.log());
    eprintln!("switchover took {took:?}:\n{text}");
    assert_eq!(published, ["server1", "server1"], "{text}");
    assert!(text.contains("every node's application follows"), "{text}");
    let failed: Vec<_> = results.iter().filter(|r| r.1 != 201).collect();
    let slowest = results.iter().map(|r| r.2).max().unwrap();
    eprintln!(
        "{} writes during the switchover, {} failed, slowest {slowest:?}",
        results.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} writes failed: {failed:?}\n{text}",
        failed.len(),
        results.len()
    );
    assert!(results.len() >= 10, "too few writes: {results:?}");
    // Every write is there exactly once, on both nodes.
    let mut written: Vec<String> = results.iter().map(|r| r.0.clone()).collect();
    written.push("first".into());
    let count = |node: &Node| -> usize {
        node.sql_root("app", "SELECT COUNT(*) AS n FROM notes;\n")
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    };
    for node in [&s1, &s2] {
        node.wait_for("every write replicated", Duration::from_secs(30), || {
            count(node) == written.len()
        });
        let bodies = node.sql_root("app", "SELECT body FROM notes ORDER BY id;\n");
        let mut have: Vec<&str> = bodies.lines().skip(1).collect();
        have.sort_unstable();
        let mut want: Vec<&str> = written.iter().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(have, want, "{}", node.name);
    }
}
