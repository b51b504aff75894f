//! `appliance run` with the real Debian nginx and MariaDB: the local two-node example cluster on
//! loopback addresses, crash recovery, and a clean stop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");

fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/local-cluster.toml")
}

/// One `appliance run`, killed (with its whole tree) if the test fails.
struct Node {
    name: &'static str,
    child: Option<Child>,
    state: PathBuf,
    stderr: PathBuf,
}

impl Node {
    fn start(name: &'static str, root: &Path) -> Node {
        let state = root.join(name);
        let stderr = root.join(format!("{name}.stderr"));
        let child = Command::new(APPLIANCE)
            .args(["run", "--config"])
            .arg(example_config())
            .args(["--node", name, "--state-dir"])
            .arg(&state)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start appliance run");
        Node {
            name,
            child: Some(child),
            state,
            stderr,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Evidence for a failure message: the supervisor's log.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        format!(
            "--- {} supervisor log (last 60 lines) ---\n{tail}",
            self.name
        )
    }

    fn status(&self) -> Option<Vec<Value>> {
        let out = Command::new(APPLIANCE)
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let services = v.get("services").unwrap_or(&v);
        services.as_array().cloned()
    }

    fn service(&self, name: &str) -> Option<Value> {
        self.status()?.into_iter().find(|s| s["name"] == name)
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok() {
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}\nstatus: {:?}\n{}",
                    self.name,
                    self.status(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&self, service: &str, timeout: Duration) -> Value {
        self.wait_for(&format!("{service} ready"), timeout, || {
            self.service(service).is_some_and(|s| s["ready"] == true)
        });
        self.service(service).unwrap()
    }

    fn events(&self, service: &str) -> Vec<String> {
        let db = rusqlite::Connection::open(self.state.join(api::events::STATE_DB_FILE)).unwrap();
        let mut stmt = db
            .prepare("SELECT kind FROM events WHERE service = ?1 ORDER BY id")
            .unwrap();
        stmt.query_map([service], |r| r.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::support::stop(&mut child);
        }
    }
}

fn http_get(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every process whose ancestry leads to `root` (from /proc).
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may contain spaces: fields resume after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid: i32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        parent_of.push((pid, ppid));
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purpose; it only waits for its parent.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
fn local_cluster_runs_real_nginx_and_mariadb_and_recovers_from_kill9() {
    let tmp = crate::support::tmp_root();
    let server1 = Node::start("server1", tmp.path());
    let server2 = Node::start("server2", tmp.path());

    for node in [&server1, &server2] {
        node.wait_ready("mariadb", Duration::from_secs(120));
        node.wait_ready("nginx", Duration::from_secs(30));
    }
    for (node, addr) in [(&server1, "127.0.0.11"), (&server2, "127.0.0.12")] {
        // The node's own page: static, served by nginx itself (`/` is the application, which
        // answers only once replication is set up).
        let page = http_get(&format!("http://{addr}:8081/{}", api::files::NODE_PAGE))
            .unwrap_or_else(|| panic!("no page\n{}", node.log()));
        assert!(page.contains(&format!("node: {}", node.name)), "{page}");
        let health = http_get(&format!("http://{addr}:8081/healthz"));
        assert_eq!(health.as_deref(), Some("ok\n"));
    }

    // kill -9 of nginx and of mariadbd: a new process within 1 s, counted as a restart.
    for service in ["nginx", "mariadb"] {
        let before = server2.service(service).unwrap();
        let old_pid = before["pid"].as_i64().unwrap() as i32;
        let restarts = before["restarts"].as_u64().unwrap();
        kill9(old_pid);
        let killed_at = Instant::now();
        server2.wait_for(
            &format!("{service} restarted"),
            Duration::from_secs(1),
            || {
                server2.service(service).is_some_and(|s| {
                    s["pid"].as_i64().is_some_and(|p| p as i32 != old_pid)
                        && s["restarts"].as_u64() == Some(restarts + 1)
                })
            },
        );
        eprintln!(
            "{service}: restarted {:?} after kill -9",
            killed_at.elapsed()
        );
        let after = server2.wait_ready(service, Duration::from_secs(60));
        assert!(
            after["last_exit"]
                .as_str()
                .unwrap_or("")
                .contains("SIGKILL"),
            "{after}"
        );
        let events = server2.events(service);
        let tail: Vec<&str> = events
            .iter()
            .rev()
            .take(4)
            .rev()
            .map(String::as_str)
            .collect();
        assert!(
            events
                .windows(2)
                .any(|w| w[0] == "exited" && w[1] == "restarting"),
            "{service} events in the state DB: {events:?}"
        );
        assert_eq!(tail.last().copied(), Some("ready"), "{service}: {events:?}");
    }
    let page = http_get(&format!("http://127.0.0.12:8081/{}", api::files::NODE_PAGE))
        .unwrap_or_else(|| panic!("no page after restart\n{}", server2.log()));
    assert!(page.contains("node: server2"));

    // SIGTERM: every child gone within 10 s, none left behind re-parented elsewhere.
    for node in [server1, server2] {
        let mut node = node;
        let tree = descendants(node.pid());
        assert!(
            tree.len() >= 3,
            "{}: expected nginx (2) + mariadbd, found {tree:?}",
            node.name
        );
        let mut child = node.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still running 10 s after SIGTERM\n{}",
                node.name,
                node.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "{}: exit {status}\n{}",
            node.name,
            node.log()
        );
        let survivors: Vec<i32> = tree.iter().copied().filter(|p| alive(*p)).collect();
        assert!(
            survivors.is_empty(),
            "{}: processes left after SIGTERM: {survivors:?}\n{}",
            node.name,
            node.log()
        );
        let events = node.events("mariadb");
        assert_eq!(
            events.last().map(String::as_str),
            Some("stopped"),
            "{events:?}"
        );
    }
}

#[test]
fn a_state_dir_service_users_cannot_reach_is_refused_before_anything_starts() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: services drop to their own users only when started as root"
    );
    // A parent directory that is 0700 (like a home directory): mysql cannot search it, so
    // MariaDB would crash-loop on EACCES.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let state = tmp.path().join("server1");
    let started = Instant::now();
    let out = Command::new(APPLIANCE)
        .args(["run", "--config"])
        .arg(example_config())
        .args(["--node", "server1", "--state-dir"])
        .arg(&state)
        .stdin(Stdio::null())
        .output()
        .expect("run appliance");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let dir = tmp.path().display().to_string();
    assert!(
        stderr.contains(&format!("{dir} is mode 0700")) && stderr.contains("(user mysql)"),
        "{stderr}"
    );
    // Nothing was started: no MariaDB datadir was initialised.
    assert!(!state.join("mysql/mysql").exists());
}
