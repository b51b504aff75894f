//! The supervisor never blocks on its console: with stderr a pipe nobody reads (a paused
//! serial console, a terminal gone to sleep) and a service that writes thousands of lines, it
//! still answers `status` and restarts a killed service.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::control::ServiceStatus;
use serde_json::json;

fn status(state: &std::path::Path) -> Option<Vec<ServiceStatus>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["status", "--json", "--state-dir"])
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A blocked supervisor would make `status` wait for its reply timeout; give it less.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            let mut out = Vec::new();
            child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
            return code
                .success()
                .then(|| serde_json::from_slice(&out).ok())
                .flatten();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_console_nobody_reads_never_stalls_the_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.json");
    let state = dir.path().join("state");
    let specs = json!([
        // ~2 MB of output: 30 times what a pipe holds.
        { "name": "chatty", "argv": ["sh", "-c",
            "i=0; while [ $i -lt 20000 ]; do echo \"chatty line $i padded to look like an access log entry\"; i=$((i+1)); done; exec sleep 1000"] },
        { "name": "victim", "argv": ["sleep", "1000"] },
    ]);
    std::fs::write(&spec, specs.to_string()).unwrap();
    let mut sup = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["supervise", "--spec"])
        .arg(&spec)
        .arg("--state-dir")
        .arg(&state)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Held open and never read until the end: the pipe fills after ~64 KiB.
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = scopeguard(&mut sup);

    let victim = |s: &[ServiceStatus]| s.iter().find(|s| s.name == "victim").cloned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(v) = status(&state).as_deref().and_then(victim) {
            if let Some(pid) = v.pid.filter(|_| v.ready) {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "victim never became ready");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let chatty fill the console pipe many times over.
    std::thread::sleep(Duration::from_secs(3));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    loop {
        let now = status(&state)
            .expect("the supervisor did not answer `status` within 5 s while its console was full");
        let v = victim(&now).unwrap();
        if v.ready && v.pid.is_some_and(|p| p != first) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "victim not restarted 20 s after kill -9: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every line of chatty still reached the log store.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = std::fs::read_to_string(state.join("logs/chatty.log")).unwrap_or_default();
        if stored.contains("chatty line 19999 ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log store lacks chatty's last line"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(guard);

    // What did reach the console says what it left out.
    let mut console = String::new();
    sup.stderr
        .take()
        .unwrap()
        .read_to_string(&mut console)
        .unwrap();
    assert!(console.contains("were not shown"), "{console}");
}

/// Stops the supervisor (SIGTERM, then waits) when the test ends, even on a failure.
struct Stop<'a>(&'a mut std::process::Child);

fn scopeguard(child: &mut std::process::Child) -> Stop<'_> {
    Stop(child)
}

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
