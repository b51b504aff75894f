//! The supervisor end to end: the real `appliance supervise` binary with small services made
//! of `sleep`, `sh` and `python3`, observed through `appliance status`, the control socket,
//! the state DB and /proc.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::control::{Request, Response, ServiceStatus};
use api::events::EventRecord;
use appliance::control::{self, Target};
use appliance::state::StateDb;
use serde_json::{json, Value};

const STARTUP: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// A running `appliance supervise`; killed (and its stderr printed if the test failed) on drop.
struct Supervisor {
    dir: tempfile::TempDir,
    child: Child,
}

impl Supervisor {
    fn start(specs: Value) -> Supervisor {
        let dir = tempfile::tempdir().unwrap();
        let spec_path = dir.path().join("spec.json");
        fs::write(&spec_path, serde_json::to_vec_pretty(&specs).unwrap()).unwrap();
        let stderr = fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_appliance"))
            .arg("supervise")
            .arg("--spec")
            .arg(&spec_path)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let sup = Supervisor { dir, child };
        sup.wait_for("the control socket", STARTUP, || {
            sup.socket().exists().then_some(())
        });
        sup
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn socket(&self) -> PathBuf {
        self.state_dir().join("control.sock")
    }

    fn target(&self) -> Target {
        Target {
            socket: None,
            state_dir: Some(self.state_dir()),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// `appliance status --json`, through the CLI.
    fn status(&self) -> BTreeMap<String, ServiceStatus> {
        let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
            .arg("status")
            .arg("--json")
            .arg("--state-dir")
            .arg(self.state_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let services: Vec<ServiceStatus> = serde_json::from_slice(&out.stdout).unwrap();
        services.into_iter().map(|s| (s.name.clone(), s)).collect()
    }

    fn service(&self, name: &str) -> ServiceStatus {
        self.status()
            .remove(name)
            .unwrap_or_else(|| panic!("no service {name} in status"))
    }

    fn events(&self) -> Vec<EventRecord> {
        StateDb::open_read_only(&self.state_dir())
            .unwrap()
            .recent(None, 10_000)
            .unwrap()
    }

    /// `service:kind` of every event, in order.
    fn event_names(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .map(|e| format!("{}:{}", e.service, e.kind))
            .collect()
    }

    /// Polls `f` until it returns `Some`, or fails the test after `timeout`.
    fn wait_for<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = f() {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the supervisor process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "supervisor still running after {timeout:?}"
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- supervisor stderr ----\n{}---- end ----",
                self.stderr()
            );
        }
        if let Ok(None) = self.child.try_wait() {
            signal(self.pid(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(POLL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    let signal = nix::sys::signal::Signal::try_from(sig).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

fn daemon(name: &str, argv: &[&str]) -> Value {
    json!({ "name": name, "argv": argv })
}

fn position(events: &[String], event: &str) -> usize {
    events
        .iter()
        .position(|e| e == event)
        .unwrap_or_else(|| panic!("no event {event} in {events:?}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `(pid, ppid, cmdline)` of every process.
fn processes() -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let Some(ppid) = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .trim()
            .to_string();
        out.push((pid, ppid, cmdline));
    }
    out
}

/// Every descendant of `root`.
fn descendants(root: i32) -> Vec<(i32, i32, String)> {
    let all = processes();
    let mut found: Vec<(i32, i32, String)> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for p in all.iter().filter(|p| p.1 == parent) {
            frontier.push(p.0);
            found.push(p.clone());
        }
    }
    found
}

/// Listens on 127.0.0.1:`port` (after a pause, so that the first probes fail) and stays.
fn listener(port: u16) -> Vec<String> {
    let script = format!(
        "import socket, time\ntime.sleep(0.1)\ns = socket.socket()\n\
         s.bind(('127.0.0.1', {port}))\ns.listen()\ntime.sleep(1000)"
    );
    vec!["python3".into(), "-c".into(), script]
}

/// The decisions (order, gating, reverse stop) are `runner`'s unit tests; this is the real
/// probe, the real stop request, and the socket removed at the end.
#[test]
fn a_dependent_starts_once_its_dependency_answers_and_stop_ends_everything() {
    let port = free_port();
    let mut sup = Supervisor::start(json!([
        { "name": "top", "argv": ["sleep", "1000"], "deps": ["web"] },
        { "name": "web", "argv": listener(port),
          "readiness": { "type": "tcp", "addr": format!("127.0.0.1:{port}") } },
    ]));
    sup.wait_for("all running", STARTUP, || {
        let status = sup.status();
        status.values().all(|s| s.ready).then_some(())
    });
    // The TCP readiness really was the port answering.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("web is ready but not listening");
    let events = sup.event_names();
    assert!(
        position(&events, "web:ready") < position(&events, "top:started"),
        "{events:?}"
    );

    assert_eq!(
        control::request(&sup.target(), &Request::Stop).unwrap(),
        Response::Ok
    );
    assert!(sup.wait_exit(Duration::from_secs(10)).success());
    let events = sup.event_names();
    assert!(
        position(&events, "top:stopped") < position(&events, "web:exited"),
        "{events:?}"
    );
    assert!(!sup.socket().exists(), "control socket left behind");
}

/// At shutdown a service's `before_shutdown` commands have run, in order, when it gets its stop
/// signal; a command that fails or hangs does not hold the stop up past its timeout. A restart
/// on request runs none of them.
#[test]
fn before_shutdown_commands_run_before_the_stop_signal() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let log_s = log.display().to_string();
    // The service writes what the log held when its SIGTERM came.
    let service = format!(
        "trap 'cat {log_s} > {log_s}.at-term 2>/dev/null; echo none >> {log_s}.at-term; exit 0' TERM; \
         while :; do sleep 0.05; done"
    );
    let mut sup = Supervisor::start(json!([{
        "name": "vrrp", "argv": ["sh", "-c", service],
        "before_shutdown": [
            ["sh", "-c", format!("echo first >> {log_s}")],
            ["sh", "-c", "echo failing >&2; exit 2"],
            ["sleep", "30"],
            ["sh", "-c", format!("echo last >> {log_s}")],
        ],
    }]));
    let first = sup.wait_for("running", STARTUP, || sup.service("vrrp").pid);
    assert_eq!(
        control::request(
            &sup.target(),
            &Request::Restart {
                service: "vrrp".into()
            }
        )
        .unwrap(),
        Response::Ok
    );
    sup.wait_for("restarted", STARTUP, || {
        let s = sup.service("vrrp");
        (s.pid.is_some() && s.pid != Some(first) && s.ready).then_some(())
    });
    assert!(!log.exists(), "a restart ran the shutdown commands");

    let t0 = Instant::now();
    assert_eq!(
        control::request(&sup.target(), &Request::Stop).unwrap(),
        Response::Ok
    );
    assert!(sup.wait_exit(Duration::from_secs(15)).success());
    let took = t0.elapsed();
    let at_term = fs::read_to_string(dir.path().join("log.at-term")).unwrap();
    assert_eq!(at_term, "first\nlast\nnone\n", "the log when SIGTERM came");
    // The hanging `sleep` is killed at the timeout (2 s), not waited out.
    assert!(took < Duration::from_secs(6), "shutdown took {took:?}");
    let stderr = sup.stderr();
    for said in [
        "before shutdown: `sh` exited, code 2: failing",
        "before shutdown: `sleep` killed after 2000 ms",
    ] {
        assert!(stderr.contains(said), "no `{said}` in the log:\n{stderr}");
    }
}

/// A real process killed from outside is reaped and started again; the other service is not
/// touched.
#[test]
fn a_killed_service_is_restarted() {
    let sup = Supervisor::start(json!([
        daemon("victim", &["sleep", "1000"]),
        daemon("bystander", &["sleep", "1000"])
    ]));
    let first = sup.wait_for("victim running", STARTUP, || sup.service("victim").pid);
    let bystander = sup.service("bystander").pid;
    let killed_at = Instant::now();
    signal(first, libc::SIGKILL);
    let victim = sup.wait_for("victim restarted", Duration::from_secs(5), || {
        let s = sup.service("victim");
        (s.pid.is_some() && s.pid != Some(first)).then_some(s)
    });
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(1), "restart took {took:?}");
    assert_eq!(victim.restarts, 1);
    assert_eq!(victim.state, "running");
    assert_eq!(victim.last_exit.as_deref(), Some("signal 9 (SIGKILL)"));
    assert_eq!(
        sup.service("bystander").pid,
        bystander,
        "another service was disturbed"
    );

    let events: Vec<EventRecord> = sup
        .events()
        .into_iter()
        .filter(|e| e.service == "victim")
        .collect();
    let exited = events
        .iter()
        .position(|e| e.kind == "exited")
        .expect("no exited event");
    assert_eq!(events[exited].pid, Some(first));
    assert_eq!(events[exited].detail, "signal 9 (SIGKILL)");
    assert_eq!(events[exited + 1].kind, "restarting");
    assert_eq!(events[exited + 1].detail, "in 100ms, restart 1");
    assert_eq!(events[exited + 2].kind, "started");
    assert_eq!(events[exited + 2].pid, victim.pid);
}

#[test]
fn sigterm_leaves_no_descendant_behind() {
    let mark = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::start(json!([
        daemon("plain", &["sleep", "1001"]),
        daemon("group", &["sh", "-c", "sleep 1002 & sleep 1003 & wait"]),
        // Leaves its service's session and group; its parent exits once it has (so the
        // group kill at the parent's exit cannot catch it).
        { "name": "escapee", "kind": "oneshot", "env": { "MARK": mark.path().join("detached") },
          "argv": ["sh", "-c", "setsid sh -c 'touch \"$MARK\"; exec sleep 1004' & \
                                while [ ! -e \"$MARK\" ]; do sleep 0.01; done; echo forked"] },
        // Ignores SIGTERM: needs the SIGKILL after its stop timeout.
        { "name": "stubborn", "argv": ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"],
          "stop_timeout_ms": 100 },
    ]));
    let me = sup.pid();
    // Once the escapee's service is done, its sleep is our child: we are a subreaper.
    let tree = sup.wait_for(
        "every sleep running, sleep 1004 re-parented to us",
        STARTUP,
        || {
            let done = sup.service("escapee").state == "done";
            let tree = descendants(me);
            let running = |cmd: &str, ppid: Option<i32>| {
                tree.iter()
                    .any(|p| p.2 == cmd && ppid.is_none_or(|pp| p.1 == pp))
            };
            let all = running("sleep 1001", None)
                && running("sleep 1002", None)
                && running("sleep 1003", None)
                && running("sleep 1004", Some(me));
            (done && all).then_some(tree)
        },
    );

    signal(me, libc::SIGTERM);
    let status = sup.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "supervisor exited with {status}");
    let gone =
        |pid: i32, cmdline: &str| processes().iter().all(|p| !(p.0 == pid && p.2 == cmdline));
    sup.wait_for("descendants gone", Duration::from_secs(10), || {
        tree.iter().all(|p| gone(p.0, &p.2)).then_some(())
    });
    let adopted_by_init: Vec<_> = processes()
        .into_iter()
        .filter(|p| p.1 == 1 && p.2.starts_with("sleep 100"))
        .collect();
    assert!(
        adopted_by_init.is_empty(),
        "re-parented to PID 1: {adopted_by_init:?}"
    );
    let events = sup.event_names();
    assert!(
        events.contains(&"stubborn:stopped".to_string()),
        "{events:?}"
    );
    assert!(
        sup.stderr().contains("sending SIGKILL"),
        "stubborn was not SIGKILLed"
    );
}

#[test]
fn logs_are_captured_and_served() {
    let sup = Supervisor::start(json!([
        daemon("talker", &["sh", "-c", "echo hello-out; echo hello-err >&2; exec sleep 1000"]),
        { "name": "quiet", "argv": ["sleep", "1000"], "env": { "SECRET_TOKEN": "hunter2-do-not-log" } },
    ]));
    let request = Request::Logs {
        service: "talker".into(),
        lines: 10,
    };
    let lines = sup.wait_for("both lines", STARTUP, || {
        let Response::Logs { lines } = control::request(&sup.target(), &request).unwrap() else {
            panic!()
        };
        (lines.len() >= 2).then_some(lines)
    });
    let mut got: Vec<(String, String)> = lines
        .iter()
        .map(|l| (l.stream.as_str().to_string(), l.line.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("stderr".into(), "hello-err".into()),
            ("stdout".into(), "hello-out".into())
        ]
    );
    assert!(lines
        .iter()
        .all(|l| l.service == "talker" && Some(l.pid) == sup.service("talker").pid));
    // Also through tracing, tagged with the service and stream.
    let stderr = sup.stderr();
    assert!(
        stderr.contains("hello-out") && stderr.contains("service=talker"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "an environment value was logged"
    );

    let err = control::request(
        &sup.target(),
        &Request::Logs {
            service: "nope".into(),
            lines: 1,
        },
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "supervisor: no service `nope`");

    // The human table.
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["status", "--state-dir"])
        .arg(sup.state_dir())
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("SERVICE  STATE    PID"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("talker   running")),
        "{table}"
    );
}

#[test]
fn control_socket_is_private() {
    let sup = Supervisor::start(json!([daemon("idle", &["sleep", "1000"])]));
    let mode = fs::metadata(sup.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    assert!(is_socket(&sup.socket()));
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Each kind of bad spec is `load_specs`'s unit test; here the CLI shows the reason.
#[test]
fn a_bad_spec_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spec.json");
    let specs = json!([{ "name": "a", "argv": ["x"], "deps": ["b"] }, { "name": "b", "argv": ["x"], "deps": ["a"] }]);
    fs::write(&path, specs.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .arg("supervise")
        .arg("--spec")
        .arg(&path)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("dependency cycle: a -> b -> a"), "{stderr}");
    assert!(
        !dir.path().join("state").exists(),
        "a refused spec started something"
    );
}

#[test]
fn runs_as_the_given_user_when_root() {
    let root = nix::unistd::geteuid().is_root();
    let sup = Supervisor::start(json!([
        { "name": "who", "user": "nobody", "argv": ["sh", "-c", "id -u; id -G; exec sleep 1000"] },
    ]));
    let request = Request::Logs {
        service: "who".into(),
        lines: 10,
    };
    let lines = sup.wait_for("id output", STARTUP, || {
        let Response::Logs { lines } = control::request(&sup.target(), &request).unwrap() else {
            panic!()
        };
        (lines.len() >= 2).then_some(lines)
    });
    // Not root: the user is ignored and the service runs as us.
    // SAFETY: plain geteuid(2).
    let expected_uid = if root {
        "65534".to_string()
    } else {
        nix::unistd::geteuid().to_string()
    };
    assert_eq!(lines[0].line, expected_uid);
    if root {
        assert!(
            !lines[1].line.split(' ').any(|g| g == "0"),
            "still in group root: {}",
            lines[1].line
        );
    }
}

#[test]
fn an_unprivileged_service_may_keep_only_the_right_to_bind_low_ports() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it switches users)"
    );
    let bind = "import socket, sys\n\
                s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                try:\n    s.bind(('127.0.0.1', int(sys.argv[1]))); print('bound')\n\
                except OSError as e:\n    print('refused', e.errno)\n\
                print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n\
                import time; time.sleep(1000)";
    let sup = Supervisor::start(json!([
        { "name": "low", "user": "nobody", "capabilities": ["NET_BIND_SERVICE"], "argv": ["python3", "-c", bind, "981"] },
        { "name": "plain", "user": "nobody", "argv": ["python3", "-c", bind, "982"] },
    ]));
    for (service, expected) in [("low", "bound"), ("plain", "refused 13")] {
        let request = Request::Logs {
            service: service.into(),
            lines: 10,
        };
        let lines = sup.wait_for(&format!("{service} output"), STARTUP, || {
            let Response::Logs { lines } = control::request(&sup.target(), &request).unwrap()
            else {
                panic!()
            };
            (lines.len() >= 2).then_some(lines)
        });
        assert_eq!(lines[0].line, expected, "{service}");
        // Effective capabilities: only CAP_NET_BIND_SERVICE (bit 10), or none.
        let caps = if service == "low" {
            "0000000000000400"
        } else {
            "0000000000000000"
        };
        assert_eq!(lines[1].line, caps, "{service}: effective capabilities");
    }
}

/// `CapBnd`, `CapEff`, `CapAmb`, `NoNewPrivs` and the real uid of a process, from /proc.
fn privileges(pid: i32) -> BTreeMap<String, String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| ["CapBnd", "CapEff", "CapPrm", "CapAmb", "NoNewPrivs", "Uid"].contains(k))
        .map(|(k, v)| {
            let v = v.split_whitespace().next().unwrap_or("");
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn every_service_has_no_new_privs_and_only_the_capabilities_of_its_spec() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it bounds capabilities and switches users)"
    );
    let sup = Supervisor::start(json!([
        // Like nginx's master: root, able to hand its port to workers of another user.
        { "name": "root-some", "argv": ["sleep", "1000"], "capabilities": ["CHOWN", "SETUID", "SETGID"] },
        // Like the log monitor: root's files, no root powers.
        { "name": "root-none", "argv": ["sleep", "1000"] },
        // Like the balancer.
        { "name": "user-bind", "user": "nobody", "argv": ["sleep", "1000"], "capabilities": ["NET_BIND_SERVICE"] },
        { "name": "user-none", "user": "nobody", "argv": ["sleep", "1000"] },
    ]));
    let expected = [
        (
            "root-some",
            "0",
            "00000000000000c1",
            "00000000000000c1",
            "0000000000000000",
        ),
        (
            "root-none",
            "0",
            "0000000000000000",
            "0000000000000000",
            "0000000000000000",
        ),
        (
            "user-bind",
            "65534",
            "0000000000000400",
            "0000000000000400",
            "0000000000000400",
        ),
        (
            "user-none",
            "65534",
            "0000000000000000",
            "0000000000000000",
            "0000000000000000",
        ),
    ];
    for (service, uid, bounding, effective, ambient) in expected {
        let pid = sup.wait_for(&format!("{service} running"), STARTUP, || {
            sup.service(service).pid
        });
        let got = privileges(pid);
        let want: BTreeMap<String, String> = [
            ("NoNewPrivs", "1"),
            ("Uid", uid),
            ("CapBnd", bounding),
            ("CapEff", effective),
            ("CapPrm", effective),
            ("CapAmb", ambient),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want, "{service}");
    }

    // With no_new_privs a setuid-root program runs with the caller's privileges.
    drop(sup);
    let bin = tempfile::tempdir().unwrap();
    let setuid = bin.path().join("setuid-id");
    fs::copy("/usr/bin/id", &setuid).unwrap();
    fs::set_permissions(&setuid, fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(bin.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let sup = Supervisor::start(json!([
        { "name": "escalate", "user": "nobody", "argv": ["sh", "-c", format!("{} -u; exec sleep 1000", setuid.display())] },
    ]));
    let request = Request::Logs {
        service: "escalate".into(),
        lines: 10,
    };
    let lines = sup.wait_for("id output", STARTUP, || {
        let Response::Logs { lines } = control::request(&sup.target(), &request).unwrap() else {
            panic!()
        };
        (!lines.is_empty()).then_some(lines)
    });
    assert_eq!(lines[0].line, "65534", "a setuid-root binary gained root");
}
