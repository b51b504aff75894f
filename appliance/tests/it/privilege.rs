//! Who runs as whom: one node under `appliance run` as root, its services inspected through
//! /proc, its files through their owners and modes, and as the application's user.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");
/// A loopback address and ports no other test uses.
const CONFIG: &str = r#"
[cluster]
name = "privtest"
domain = "priv.test"
subnet = "127.0.0.0/8"
floating_ip = "127.0.0.70"

[[node]]
name = "solo"
address = "127.0.0.71"
db_role = "primary"

[ports]
http = 28080
https = 28443
web = 28081
app = 28000
db = 23306
admin = 29443
"#;
/// Everything, MariaDB's first start included, is up within this.
const STARTUP: Duration = Duration::from_secs(120);

struct Run {
    child: std::process::Child,
    log: PathBuf,
    state: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        crate::support::stop(&mut self.child);
    }
}

impl Run {
    fn start(dir: &Path) -> Run {
        let config = dir.join("cluster.toml");
        std::fs::write(&config, CONFIG).unwrap();
        let state = dir.join("solo");
        let log = dir.join("run.log");
        let child = Command::new(APPLIANCE)
            .args(["run", "--config"])
            .arg(&config)
            .args(["--node", "solo", "--state-dir"])
            .arg(&state)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Run { child, log, state }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- supervisor log (last 60 lines) ---\n{}",
            lines[lines.len().saturating_sub(60)..].join("\n")
        )
    }

    fn status(&self) -> Vec<Value> {
        let out = Command::new(APPLIANCE)
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits until every service is ready; returns each one's pid.
    fn wait_all_ready(&self) -> Vec<(String, i32)> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let status = self.status();
            let daemons: Vec<&Value> = status.iter().filter(|s| s["state"] != "done").collect();
            if !daemons.is_empty() && status.iter().all(|s| s["ready"] == true) {
                return daemons
                    .iter()
                    .map(|s| {
                        (
                            s["name"].as_str().unwrap().to_string(),
                            s["pid"].as_i64().unwrap() as i32,
                        )
                    })
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "not every service ready after {STARTUP:?}: {status:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A field of /proc/PID/status, e.g. `Uid` or `CapBnd`.
fn proc_status(pid: i32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user)
        .unwrap()
        .unwrap_or_else(|| panic!("no user {user}: see appliance::users::require"))
        .uid
        .as_raw()
}

/// The real uid of a process.
fn process_uid(pid: i32) -> u32 {
    proc_status(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Whether `user` (with only its own groups) can read `path`.
fn readable_as(user: &str, path: &Path) -> bool {
    Command::new("setpriv")
        .args([
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "--",
            "cat",
        ])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("setpriv (util-linux)")
        .success()
}

/// A self-signed key pair in the balancer's files, as an earlier version (running the balancer
/// as www-data) left it.
fn leave_old_balancer_key(state: &Path) -> PathBuf {
    let tls = state.join("balancer/tls");
    std::fs::create_dir_all(&tls).unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["priv.test".to_string()]).unwrap();
    let key = tls.join("self-signed.key");
    std::fs::write(tls.join("self-signed.crt"), generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    let www = uid_of("www-data");
    for p in [
        state.join("balancer"),
        tls.clone(),
        key.clone(),
        tls.join("self-signed.crt"),
    ] {
        std::os::unix::fs::chown(&p, Some(www), Some(www)).unwrap();
    }
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    key
}

#[test]
fn the_balancer_and_the_application_run_as_their_own_users() {
    // SAFETY: plain geteuid(2).
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root (the node switches users)"
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let key = leave_old_balancer_key(&tmp.path().join("solo"));
    let run = Run::start(tmp.path());
    let pids = run.wait_all_ready();
    let pid = |name: &str| {
        pids.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} in {pids:?}"))
            .1
    };

    for (service, user) in [
        ("balancer", "tandem-balancer"),
        ("app", "tandem-app"),
        ("mariadb", "mysql"),
    ] {
        assert_eq!(
            process_uid(pid(service)),
            uid_of(user),
            "{service} should run as {user}\n{}",
            run.log()
        );
    }

    // The key the balancer serves is its own, private, and out of the application's reach.
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(
        meta.uid(),
        uid_of("tandem-balancer"),
        "owner of {}",
        key.display()
    );
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(readable_as("tandem-balancer", &key));
    for user in ["tandem-app", "www-data"] {
        assert!(!readable_as(user, &key), "{user} can read the TLS key");
    }
    // And it is the key the balancer serves.
    let served = Command::new("sh")
        .args([
            "-c",
            "openssl s_client -connect 127.0.0.71:28443 -servername priv.test </dev/null 2>/dev/null | openssl x509 -noout -pubkey",
        ])
        .output()
        .unwrap();
    let expected = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        !served.stdout.is_empty() && served.stdout == expected.stdout,
        "the balancer does not serve the kept key\n{}",
        run.log()
    );
}
