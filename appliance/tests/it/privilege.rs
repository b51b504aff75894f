//! Who runs as whom: one node under `appliance run` as root, its services inspected through
//! /proc, its files through their owners and modes, and as the application's user.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");
/// A one-node cluster on its own loopback address `127.0.0.<octet>` with ports
/// `<base>080`, `<base>443`, … : each test here has its own, and no other test uses them.
fn config(octet: u8, base: u8) -> String {
    format!(
        r#"
[cluster]
name = "privtest"
domain = "priv.test"
subnet = "127.0.0.0/8"
floating_ip = "127.0.0.{floating}"

[[node]]
name = "solo"
address = "127.0.0.{octet}"
db_role = "primary"

[ports]
http = {base}080
https = {base}443
web = {base}081
app = {base}000
db = {base}306
admin = {base}943
"#,
        floating = octet - 1
    )
}
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
    fn start(dir: &Path, octet: u8, base: u8) -> Run {
        let config = dir.join("cluster.toml");
        std::fs::write(&config, self::config(octet, base)).unwrap();
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

/// One request on the control socket as `user` (with its groups): the answer line, or why
/// there is none.
fn control_as(user: &str, socket: &Path, request: &str) -> String {
    let script = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  try:\n    s.connect(sys.argv[1])\n\
                  except OSError as e:\n    print('refused', e.errno); sys.exit()\n\
                  s.sendall(sys.argv[2].encode() + b'\\n')\n\
                  print(s.makefile().readline().strip())";
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(socket)
        .arg(request)
        .output()
        .expect("setpriv (util-linux), python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// Whether `program path`, run as `user` (with only its own groups), succeeds.
fn succeeds_as(user: &str, program: &str, path: &Path) -> bool {
    Command::new("setpriv")
        .args([
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "--",
            program,
        ])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("setpriv (util-linux)")
        .success()
}

/// Whether `user` (with only its own groups) can read `path`.
fn readable_as(user: &str, path: &Path) -> bool {
    succeeds_as(user, "cat", path)
}

/// Whether `user` can create a file in `dir` (then removes it).
fn writable_dir_as(user: &str, dir: &Path) -> bool {
    let probe = dir.join(format!(".probe-{user}"));
    let ok = succeeds_as(user, "touch", &probe);
    let _ = std::fs::remove_file(&probe);
    ok
}

/// A temporary root for a node run as root: fails clearly without root, and is 0755 so that
/// the services' users reach their directories below it.
fn root_run_dir() -> tempfile::TempDir {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (the node switches users)"
    );
    crate::support::tmp_root()
}

/// A self-signed key pair in the balancer's files, as an earlier version (running the balancer
/// as www-data) left it.
fn leave_old_balancer_key(state: &Path) -> PathBuf {
    let balancer = state.join(api::files::BALANCER_STATE_DIR);
    let (cert, key) = api::files::balancer_self_signed(&balancer);
    let tls = balancer.join(api::files::BALANCER_TLS_DIR);
    std::fs::create_dir_all(&tls).unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["priv.test".to_string()]).unwrap();
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    let www = uid_of("www-data");
    for p in [balancer, tls, key.clone(), cert] {
        std::os::unix::fs::chown(&p, Some(www), Some(www)).unwrap();
    }
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    key
}

#[test]
fn the_balancer_and_the_application_run_as_their_own_users() {
    let tmp = root_run_dir();
    let key = leave_old_balancer_key(&tmp.path().join("solo"));
    let run = Run::start(tmp.path(), 71, 28);
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

#[test]
fn every_service_runs_with_no_new_privs_and_only_its_capabilities() {
    let tmp = root_run_dir();
    let run = Run::start(tmp.path(), 73, 27);
    let pids = run.wait_all_ready();
    // (service, user, bounding set): CHOWN 0, SETGID 6, SETUID 7, NET_BIND_SERVICE 10.
    let expected = [
        ("mariadb", "mysql", "0000000000000000"),
        ("db-agent", "root", "0000000000000000"),
        ("app", "tandem-app", "0000000000000000"),
        ("nginx", "root", "00000000000000c0"),
        ("logmon", "tandem-logmon", "0000000000000000"),
        ("balancer", "tandem-balancer", "0000000000000400"),
        ("settings", "root", "0000000000000001"),
        ("admin", "tandem-admin", "0000000000000000"),
    ];
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        expected.iter().map(|e| e.0).collect::<Vec<_>>(),
        "the node's services changed: review this table"
    );
    for ((service, pid), (_, user, bounding)) in pids.iter().zip(expected) {
        let what = format!("{service} (pid {pid})");
        assert_eq!(proc_status(*pid, "NoNewPrivs"), "1", "{what}");
        assert_eq!(proc_status(*pid, "CapBnd"), bounding, "{what}");
        assert!(
            proc_status(*pid, "CapEff") == bounding || user != "root",
            "{what}: a root service's capabilities are its bounding set"
        );
        assert_eq!(process_uid(*pid), uid_of(user), "{what} runs as {user}");
    }

    // The admin server is not root, and reaches the supervisor through the socket's group.
    let socket = run.state.join(api::control::SOCKET_FILE);
    let meta = std::fs::metadata(&socket).unwrap();
    let control_gid = nix::unistd::Group::from_name("tandem-control")
        .unwrap()
        .expect("group tandem-control")
        .gid
        .as_raw();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, control_gid));
    let base = "https://127.0.0.73:27943";
    let (cookie, _) = crate::support::admin_login(base, &run.state);
    let status = Command::new("curl")
        .args([
            "-sfk",
            "--max-time",
            "10",
            "-H",
            &format!("Cookie: {cookie}"),
        ])
        .arg(format!("{base}/api/status"))
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap_or_else(|e| {
        panic!(
            "admin /api/status: {e}: {}\n{}",
            String::from_utf8_lossy(&status.stdout),
            run.log()
        )
    });
    // The daemons, and mariadb-init (done).
    let listed = status["services"].as_array().map_or(0, Vec::len);
    assert!(
        listed == expected.len() + 1 && status["error"].is_null(),
        "the admin server cannot read the supervisor's status: {status}"
    );
    // The log monitor (tandem-logmon) reads the certificate the balancer serves, for its
    // expiry check, and cannot read the balancer's key.
    let (served, balancer_key) =
        api::files::balancer_self_signed(&run.state.join(api::files::BALANCER_STATE_DIR));
    assert!(
        served.exists() && balancer_key.exists(),
        "{}",
        served.display()
    );
    assert!(
        readable_as("tandem-logmon", &served),
        "{}",
        served.display()
    );
    assert!(!readable_as("tandem-logmon", &balancer_key));
    // The settings store (admin password hash, cluster secret, served key) is root's alone:
    // not even the admin server, which asks the settings service to check a login, reads it.
    let store = run.state.join("settings/settings.db");
    assert!(store.exists(), "{}", store.display());
    for user in ["tandem-admin", "tandem-logmon", "tandem-balancer"] {
        assert!(
            !readable_as(user, &store),
            "{user} reads {}",
            store.display()
        );
    }
    // Nor write anywhere in the state directory but its own.
    assert!(!writable_dir_as("tandem-logmon", &run.state));
    assert!(writable_dir_as("tandem-logmon", &run.state.join("logmon")));

    // Members of the group may ask, not stop; others may not even connect.
    let asked = control_as("tandem-admin", &socket, r#"{"request":"status"}"#);
    assert!(asked.starts_with(r#"{"response":"status""#), "{asked}");
    let stopped = control_as("tandem-admin", &socket, r#"{"request":"stop"}"#);
    assert_eq!(
        stopped,
        r#"{"response":"error","message":"only root may stop or reconfigure the supervisor"}"#
    );
    // Its copy of the node's TLS files: the key is its own, and no one else's.
    let key = run.state.join("run/admin-tls/node.key");
    let meta = std::fs::metadata(&key).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (uid_of("tandem-admin"), 0o600),
        "{}",
        key.display()
    );
    assert!(!readable_as("tandem-app", &key));
    let outsider = control_as("tandem-app", &socket, r#"{"request":"status"}"#);
    assert_eq!(
        outsider, "refused 13",
        "the application reached the control socket"
    );
    assert_eq!(run.status().len(), listed, "the node stopped");
}
