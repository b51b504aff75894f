//! The floating IP with the real keepalived, inside network namespaces made by the test: the
//! nodes of a cluster on one bridge (10.88.0.0/24, private to the test), each running the config
//! `render_conf` makes for it. The address is watched with `ip addr` every 10 ms.
//!
//! Run with `--nocapture` to see the measured takeover times.

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cluster_config::Cluster;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use vip::{Paths, Transition, VrrpState};

const POLL: Duration = Duration::from_millis(10);
/// Interface of every node inside its namespace.
const IFACE: &str = "eth0";

/// Runs `ip ARGS`; its stdout, or a failed test naming the command.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails (never skips) when the test cannot run here.
fn require_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and runs keepalived: run it as root"
    );
    let found = Command::new("sh")
        .args(["-c", "command -v ip"])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "this test needs `ip` (apt-get install iproute2)"
    );
    let version = Command::new(vip::KEEPALIVED).arg("--version").output();
    assert!(
        version.is_ok_and(|o| o.status.success()),
        "this test needs {} (apt-get install keepalived)",
        vip::KEEPALIVED
    );
}

/// One cluster node: its namespace, keepalived's run directory and its process.
struct NodeNs {
    name: String,
    ns: String,
    /// The node's veth end inside the LAN namespace (on the bridge).
    lan_port: String,
    /// Removed on drop.
    _dir: tempfile::TempDir,
    paths: Paths,
    argv: Vec<String>,
    log: std::path::PathBuf,
    child: Option<Child>,
    /// Opened read-write like the supervisor should: no end-of-file when keepalived restarts.
    fifo: File,
    fifo_buf: Vec<u8>,
    /// Every line keepalived wrote to the FIFO so far.
    lines: Vec<String>,
}

impl NodeNs {
    fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        // As the supervisor must: stale pid files can stop keepalived from starting.
        for pid_file in self.paths.pid_files() {
            match std::fs::remove_file(&pid_file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("{}: {e}", pid_file.display()),
            }
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(&self.argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // keepalived and its VRRP child share this group: one signal reaches both.
            .process_group(0)
            .spawn()
            .expect("spawn keepalived");
        self.child = Some(child);
    }

    /// Both keepalived processes die at once, as on a crash: nothing gets cleaned up.
    fn kill9(&mut self) {
        self.stop(Signal::SIGKILL);
    }

    /// Signals keepalived's process group and reaps both processes; the main one's status.
    fn stop(&mut self, signal: Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("keepalived running");
        // Read first: a clean stop removes it.
        let vrrp_pid = std::fs::read_to_string(&self.paths.pid_files()[1]).ok();
        killpg(Pid::from_raw(child.id() as i32), signal).unwrap();
        let status = child.wait().unwrap();
        // The orphaned VRRP child is ours (a subreaper, like PID 1 on an image): reap it.
        if let Some(pid) = vrrp_pid.and_then(|p| p.trim().parse().ok()) {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        }
        status
    }

    fn set_track(&self, name: &str, ok: bool, by_rename: bool) {
        let path = self.paths.track_file(name);
        if by_rename {
            let tmp = self.paths.dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, vip::track_value(ok)).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        } else {
            std::fs::write(&path, vip::track_value(ok)).unwrap();
        }
    }

    /// Reads what keepalived wrote to the FIFO since the last call; returns the new lines.
    fn read_fifo(&mut self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        loop {
            match self.fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.fifo_buf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading {}: {e}", self.paths.notify_fifo().display()),
            }
        }
        let mut new = Vec::new();
        while let Some(end) = self.fifo_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.fifo_buf.drain(..=end).collect();
            new.push(String::from_utf8_lossy(&line).into_owned());
        }
        self.lines.extend(new.iter().cloned());
        new
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

/// Namespaces `<prefix>-lan` (a bridge) and one per node, removed on drop.
struct Lab {
    prefix: String,
    floating_ip: String,
    /// Every namespace made so far, deleted on drop.
    namespaces: Vec<String>,
    nodes: Vec<NodeNs>,
}

impl Lab {
    fn new(cluster: &Cluster) -> Lab {
        require_tools();
        // keepalived's VRRP child outlives a SIGKILLed main process: reparent it to us.
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        static LABS: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "vip{}x{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            prefix,
            floating_ip: cluster.floating_ip.to_string(),
            namespaces: Vec::new(),
            nodes: Vec::new(),
        };
        let lan = lab.lan();
        lab.add_netns(&lan);
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan, "link", "set", "br0", "up"]);
        for (i, node) in cluster.nodes.iter().enumerate() {
            let ns = format!("{}-{i}", lab.prefix);
            let lan_port = format!("v{i}");
            lab.add_netns(&ns);
            let dir = tempfile::tempdir().unwrap();
            let paths = Paths {
                dir: dir.path().to_path_buf(),
                config_file: dir.path().join("keepalived.conf"),
            };
            let fifo_path = paths.notify_fifo();
            nix::unistd::mkfifo(
                &fifo_path,
                nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            )
            .unwrap();
            let fifo = File::options()
                .read(true)
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&fifo_path)
                .unwrap();
            let params = vip::Params {
                cluster,
                node,
                interface: IFACE.to_string(),
                paths: paths.clone(),
            };
            std::fs::write(&paths.config_file, vip::render_conf(&params)).unwrap();
            for track in [
                vip::TRACK_BALANCER,
                vip::TRACK_BACKENDS,
                vip::TRACK_SETTLING,
            ] {
                std::fs::write(paths.track_file(track), vip::track_value(true)).unwrap();
            }
            lab.nodes.push(NodeNs {
                name: node.name.clone(),
                ns: ns.clone(),
                lan_port: lan_port.clone(),
                log: dir.path().join("keepalived.log"),
                argv: vip::argv(&params),
                _dir: dir,
                paths,
                child: None,
                fifo,
                fifo_buf: Vec::new(),
                lines: Vec::new(),
            });
            ip(&[
                "-n", &lan, "link", "add", &lan_port, "type", "veth", "peer", "name", IFACE,
                "netns", &ns,
            ]);
            ip(&["-n", &lan, "link", "set", &lan_port, "master", "br0", "up"]);
            let addr = format!("{}/{}", node.address, cluster.subnet.prefix);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", IFACE]);
            ip(&["-n", &ns, "link", "set", IFACE, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn add_netns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.namespaces.push(name.to_string());
    }

    fn lan(&self) -> String {
        format!("{}-lan", self.prefix)
    }

    fn has_vip(&self, i: usize) -> bool {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.nodes[i].ns,
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                IFACE,
            ])
            .output()
            .expect("run ip");
        assert!(out.status.success(), "ip addr show in {}", self.nodes[i].ns);
        let needle = format!(" {}/", self.floating_ip);
        String::from_utf8_lossy(&out.stdout).contains(&needle)
    }

    /// Indexes of the nodes holding the floating IP.
    fn holders(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.has_vip(i)).collect()
    }

    /// Polls `done` every 10 ms until it holds; the time it took. Fails after `limit`.
    fn wait(&self, limit: Duration, what: &str, mut done: impl FnMut(&Lab) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if done(self) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?} (holders now: {:?})",
                self.names(&self.holders())
            );
            std::thread::sleep(POLL);
        }
    }

    /// Fails if the holders change during `period`.
    fn assert_holders_stay(&self, expected: &[usize], period: Duration, why: &str) {
        let start = Instant::now();
        while start.elapsed() < period {
            let holders = self.holders();
            assert_eq!(
                holders,
                expected,
                "{why}: holders changed to {:?} after {:?}",
                self.names(&holders),
                start.elapsed()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits until node `i` reports `state` on its FIFO; every line must parse as ours.
    fn wait_state(&mut self, i: usize, state: VrrpState, limit: Duration) -> Transition {
        let start = Instant::now();
        loop {
            for line in self.nodes[i].read_fifo() {
                // Events that are not states (`MASTER_RX_LOWER_PRI` when a master hears a
                // lower priority, `*_PRIORITY` changes) are not transitions.
                if line.starts_with("INSTANCE \"") && vip::parse_notify(&line).is_none() {
                    continue;
                }
                let t = vip::parse_notify(&line).unwrap_or_else(|| {
                    panic!("{}: unparsed notify line {line:?}", self.nodes[i].name)
                });
                assert_eq!(t.instance, vip::INSTANCE, "{line:?}");
                if t.state == state {
                    return t;
                }
            }
            assert!(
                start.elapsed() < limit,
                "{} did not report {} within {limit:?}; FIFO so far: {:?}",
                self.nodes[i].name,
                state.as_str(),
                self.nodes[i].lines
            );
            std::thread::sleep(POLL);
        }
    }

    fn names(&self, idx: &[usize]) -> Vec<&str> {
        idx.iter().map(|&i| self.nodes[i].name.as_str()).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if node.child.is_some() {
                node.stop(Signal::SIGKILL);
            }
        }
        if std::thread::panicking() {
            for node in &mut self.nodes {
                node.read_fifo();
                eprintln!(
                    "=== {} keepalived log (tail)\n{}\n=== {} notify FIFO: {:?}",
                    node.name,
                    node.log_tail(),
                    node.name,
                    node.lines
                );
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn floating_ip_moves_between_two_nodes() {
    let cluster = Cluster::default_cluster();
    assert_eq!(cluster.nodes.len(), 2);
    assert!(
        cluster.vrrp.preempt_delay.is_none(),
        "the test expects nopreempt"
    );
    let mut lab = Lab::new(&cluster);
    let (one, two) = (0, 1);
    let second = Duration::from_secs(1);

    // a. Both start at once (server1 first by a few ms): exactly one holds the address, the
    // higher priority (server1, 150), and keeps it.
    lab.nodes[one].start();
    lab.nodes[two].start();
    let took = lab.wait(Duration::from_secs(5), "a first holder", |l| {
        !l.holders().is_empty()
    });
    println!("a. first holder after {took:?}");
    lab.assert_holders_stay(&[one], Duration::from_millis(500), "after the start");
    let t = lab.wait_state(one, VrrpState::Master, second);
    assert_eq!(t.priority, 150);
    lab.wait_state(two, VrrpState::Backup, second);

    // b + e. The holder's balancer goes down: FAULT, a priority-0 advert, the peer takes over
    // at once. The FIFO lines are keepalived's own, read while it happens.
    let start = Instant::now();
    lab.nodes[one].set_track(vip::TRACK_BALANCER, false, false);
    let (mut appeared, mut removed) = (None, None);
    while appeared.is_none() || removed.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "b. no takeover within 3 s (holders: {:?})",
            lab.names(&lab.holders())
        );
        if appeared.is_none() && lab.has_vip(two) {
            appeared = Some(start.elapsed());
        }
        if removed.is_none() && !lab.has_vip(one) {
            removed = Some(start.elapsed());
        }
        std::thread::sleep(POLL);
    }
    let (appeared, removed) = (appeared.unwrap(), removed.unwrap());
    println!(
        "b. track file 1 -> removed from server1 after {removed:?}, on server2 after {appeared:?}"
    );
    assert!(
        appeared < second && removed < second,
        "b. takeover too slow"
    );
    let fault = lab.wait_state(one, VrrpState::Fault, second);
    assert_eq!(fault.priority, 150, "FAULT keeps the configured priority");
    let master = lab.wait_state(two, VrrpState::Master, second);
    assert_eq!(master.priority, 100);
    println!(
        "e. FIFO lines: server1 {:?}, server2 {:?}",
        lab.nodes[one].lines, lab.nodes[two].lines
    );
    let parsed = |lines: &[String]| -> Vec<(VrrpState, u8)> {
        lines
            .iter()
            .map(|l| vip::parse_notify(l).map(|t| (t.state, t.priority)).unwrap())
            .collect()
    };
    use VrrpState::*;
    assert_eq!(
        parsed(&lab.nodes[one].lines),
        [(Backup, 150), (Master, 150), (Fault, 150)]
    );
    assert_eq!(
        parsed(&lab.nodes[two].lines),
        [(Backup, 100), (Master, 100)]
    );

    // c. Healthy again (written by rename this time): server1 rejoins as BACKUP and does not take
    // the address back (nopreempt).
    lab.nodes[one].set_track(vip::TRACK_BALANCER, true, true);
    lab.wait_state(one, Backup, second);
    lab.assert_holders_stay(&[two], Duration::from_secs(2), "c. nopreempt");

    // d. The holder's keepalived dies by SIGKILL: the peer takes over after ~3 missed adverts.
    // The dead node keeps the address on its interface (nobody removed it).
    lab.nodes[two].kill9();
    let took = lab.wait(second, "d. takeover after kill -9", |l| l.has_vip(one));
    println!("d. kill -9 of server2's keepalived -> server1 holds after {took:?}");
    lab.wait_state(one, Master, second);
    assert_eq!(
        lab.holders(),
        [one, two],
        "d. the killed node's address is expected to stay until keepalived starts again"
    );
    // keepalived removes the stale address when it starts, then joins as BACKUP.
    lab.nodes[two].start();
    let took = lab.wait(Duration::from_secs(3), "d. stale address removed", |l| {
        l.holders() == [one]
    });
    println!("d. restarted keepalived removed server2's stale address after {took:?}");
    lab.wait_state(two, Backup, second);
    lab.assert_holders_stay(&[one], second, "d. after the restart");

    // f1. The backup loses carrier: it goes to FAULT (it never claims the address with its link
    // down); the holder is not disturbed.
    let lan = lab.lan();
    let port = lab.nodes[two].lan_port.clone();
    ip(&["-n", &lan, "link", "set", &port, "down"]);
    lab.wait_state(two, Fault, second);
    lab.assert_holders_stay(&[one], Duration::from_millis(500), "f1. carrier lost");
    ip(&["-n", &lan, "link", "set", &port, "up"]);
    lab.wait_state(two, Backup, Duration::from_secs(2));
    lab.assert_holders_stay(&[one], Duration::from_millis(500), "f1. carrier back");

    // f2. The backup is cut off with its link up (its bridge port leaves the bridge): it
    // misses the adverts and becomes MASTER too. Joined again, exactly one holder remains:
    // the higher priority, nopreempt or not.
    ip(&["-n", &lan, "link", "set", &port, "nomaster"]);
    let took = lab.wait(second, "f2. split brain", |l| l.holders() == [one, two]);
    println!("f2. cut off: server2 also holds after {took:?}");
    lab.wait_state(two, Master, second);
    ip(&["-n", &lan, "link", "set", &port, "master", "br0"]);
    let took = lab.wait(
        Duration::from_secs(5),
        "f2. one holder after the link is back",
        |l| l.holders().len() == 1,
    );
    println!("f2. joined again: one holder after {took:?}");
    lab.wait_state(two, Backup, second);
    lab.assert_holders_stay(&[one], second, "f2. after the split brain");

    // g. A returning node is settling (priority 1): even when it misses the holder's adverts
    // (cut off here; a busy boot in real life) and claims the address, the settled holder keeps
    // it once they hear each other, so the address does not bounce back to it.
    lab.nodes[one].set_track(vip::TRACK_BALANCER, false, false);
    lab.wait_state(two, Master, second);
    lab.nodes[one].set_track(vip::TRACK_SETTLING, false, false);
    lab.nodes[one].set_track(vip::TRACK_BALANCER, true, false);
    lab.wait_state(one, Backup, second);
    let port = lab.nodes[one].lan_port.clone();
    ip(&["-n", &lan, "link", "set", &port, "nomaster"]);
    lab.wait_state(one, Master, second);
    ip(&["-n", &lan, "link", "set", &port, "master", "br0"]);
    let took = lab.wait(
        Duration::from_secs(5),
        "g. one holder after the settling node is back",
        |l| l.holders() == [two],
    );
    println!("g. joined again: the settled server2 keeps the address ({took:?})");
    lab.wait_state(one, Backup, second);
    // Settled: full priority, but nopreempt keeps the address where it is.
    lab.nodes[one].set_track(vip::TRACK_SETTLING, true, false);
    lab.assert_holders_stay(&[two], second, "g. settled, no preemption");
}

#[test]
fn missing_track_file_fails_closed() {
    let cluster = Cluster::default_cluster();
    let mut lab = Lab::new(&cluster);
    // Only server2 runs, so nothing but its own track files keeps it from the address.
    let two = 1;
    let backends = lab.nodes[two].paths.track_file(vip::TRACK_BACKENDS);
    std::fs::remove_file(&backends).unwrap();
    lab.nodes[two].start();
    lab.wait_state(two, VrrpState::Fault, Duration::from_secs(2));
    assert_eq!(
        std::fs::read_to_string(&backends).unwrap().trim(),
        "1",
        "init_file creates a missing track file as 1"
    );
    lab.assert_holders_stay(&[], Duration::from_millis(500), "in FAULT");
    lab.nodes[two].set_track(vip::TRACK_BACKENDS, true, false);
    lab.wait_state(two, VrrpState::Backup, Duration::from_secs(1));
    lab.wait(
        Duration::from_secs(2),
        "alone, server2 takes the address",
        |l| l.holders() == [two],
    );
    lab.wait_state(two, VrrpState::Master, Duration::from_secs(1));
}

fn solo() -> Cluster {
    Cluster::from_toml(
        r#"
[cluster]
name = "solo"
domain = "solo.test"
subnet = "10.88.0.0/24"
floating_ip = "10.88.0.10"

[[node]]
name = "only"
address = "10.88.0.11"
db_role = "primary"
"#,
        "solo.toml",
    )
    .unwrap()
}

#[test]
fn single_node_holds_the_address_until_stopped() {
    let cluster = solo();
    let mut lab = Lab::new(&cluster);
    lab.nodes[0].start();
    lab.wait(
        Duration::from_secs(2),
        "the single node holds the address",
        |l| l.holders() == [0],
    );
    // SIGTERM: keepalived removes the address on its way out.
    let status = lab.nodes[0].stop(Signal::SIGTERM);
    assert!(status.success(), "keepalived exited with {status}");
    assert!(lab.holders().is_empty(), "address left after a clean stop");
}

#[test]
fn keepalived_accepts_rendered_configs() {
    require_tools();
    let three = Cluster::from_toml(
        r#"
[cluster]
name = "trio"
domain = "trio.test"
subnet = "10.88.0.0/24"
floating_ip = "10.88.0.10"

[[node]]
name = "a"
address = "10.88.0.21"
db_role = "primary"

[[node]]
name = "b"
address = "10.88.0.22"
db_role = "replica"

[[node]]
name = "c"
address = "10.88.0.23"
db_role = "replica"

[vrrp]
preempt_delay_s = 5
"#,
        "trio.toml",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for cluster in [Cluster::default_cluster(), three, solo()] {
        for node in &cluster.nodes {
            let paths = Paths {
                dir: dir.path().to_path_buf(),
                config_file: dir.path().join(format!("{}.conf", node.name)),
            };
            let conf = vip::render_conf(&vip::Params {
                cluster: &cluster,
                node,
                interface: IFACE.to_string(),
                paths: paths.clone(),
            });
            std::fs::write(&paths.config_file, &conf).unwrap();
            let out = Command::new(vip::KEEPALIVED)
                .arg("--config-test")
                .arg("-f")
                .arg(&paths.config_file)
                .output()
                .unwrap();
            // keepalived -t prints each problem (unknown keyword, bad value) on stderr.
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "keepalived -t on {}'s config: {}\n{stderr}\n{conf}",
                node.name,
                out.status
            );
        }
    }
}

/// A web server on the HTTP port of a node's namespace: answers `GET /slow` after 1.5 s and
/// anything else at once, with the node's name as the body, then closes.
const SERVER: &str = r#"
import socket, sys, threading, time
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(128)
print("listening", flush=True)
def serve(c):
    try:
        c.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            d = c.recv(4096)
            if not d:
                return
            data += d
        if data.startswith(b"GET /slow"):
            time.sleep(1.5)
        body = name.encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A client on the floating IP: one `GET /slow` at 0.1 s (4 s to answer), and a `GET /` on a
/// new connection every 50 ms for 4 s (5 s each), each read up to its Content-Length as a real
/// client does. Prints `started`, then one JSON object per request.
const CLIENT: &str = r#"
import json, socket, sys, threading, time
vip, port = sys.argv[1], int(sys.argv[2])
t0 = time.monotonic()
out, lock = [], threading.Lock()
def get(path, timeout, sent):
    kind, body = "ok", ""
    try:
        c = socket.create_connection((vip, port), timeout=timeout)
        c.settimeout(max(0.1, timeout - (time.monotonic() - t0 - sent)))
        c.sendall(("GET %s HTTP/1.1\r\nHost: vip\r\n\r\n" % path).encode())
        data = b""
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    body = rest[:length[0]].decode()
                    break
            d = c.recv(4096)
            if not d:
                kind = "closed"
                break
            data += d
        c.close()
    except socket.timeout:
        kind = "timeout"
    except ConnectionResetError:
        kind = "reset"
    except ConnectionRefusedError:
        kind = "refused"
    except OSError as e:
        kind = "error: %s" % e
    with lock:
        out.append({"path": path, "sent": round(sent, 3), "done": round(time.monotonic() - t0, 3), "kind": kind, "body": body})
print("started", flush=True)
threads = []
def later(path, timeout, at):
    time.sleep(max(0, at - (time.monotonic() - t0)))
    get(path, timeout, time.monotonic() - t0)
threads.append(threading.Thread(target=later, args=("/slow", 4.0, 0.1)))
for i in range(80):
    threads.append(threading.Thread(target=later, args=("/", 5.0, i * 0.05)))
for t in threads:
    t.start()
for t in threads:
    t.join()
for r in out:
    print(json.dumps(r))
"#;

#[derive(Debug, serde::Deserialize)]
struct Request {
    path: String,
    sent: f64,
    done: f64,
    kind: String,
    body: String,
}

impl Lab {
    /// A client namespace on the bridge, at `address`.
    fn add_client(&mut self, address: &str) -> String {
        let ns = format!("{}-c", self.prefix);
        self.add_netns(&ns);
        let lan = self.lan();
        ip(&[
            "-n", &lan, "link", "add", "vc", "type", "veth", "peer", "name", IFACE, "netns", &ns,
        ]);
        ip(&["-n", &lan, "link", "set", "vc", "master", "br0", "up"]);
        ip(&["-n", &ns, "addr", "add", address, "dev", IFACE]);
        ip(&["-n", &ns, "link", "set", IFACE, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `argv` inside namespace `ns`; its stdout, or a failed test naming the command.
    fn exec(&self, ns: &str, argv: &[String]) -> String {
        let args: Vec<&str> = ["netns", "exec", ns]
            .into_iter()
            .chain(argv.iter().map(String::as_str))
            .collect();
        ip(&args)
    }

    fn mac(&self, ns: &str) -> String {
        let out = self.exec(
            ns,
            &["cat".into(), format!("/sys/class/net/{IFACE}/address")],
        );
        out.trim().to_string()
    }
}

/// A python3 process in `ns`, killed on drop.
struct Python(Child);

impl Python {
    fn start(
        ns: &str,
        script: &str,
        args: &[&str],
    ) -> (Python, std::io::BufReader<std::process::ChildStdout>) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", script])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(
            line.trim() == "listening" || line.trim() == "started",
            "python3 in {ns} said {line:?}"
        );
        (Python(child), out)
    }

    /// The JSON lines printed until the script ends.
    fn requests(mut self, mut out: std::io::BufReader<std::process::ChildStdout>) -> Vec<Request> {
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        assert!(self.0.wait().unwrap().success(), "the client failed");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node's shutdown hands the address over (`vip::handover_argvs`, with `ARP_SYSCTLS` and the
/// firewall's draining set): a request the old holder took is still answered, no client
/// connection is reset or times out, and the old holder neither answers ARP for the address
/// nor announces it. Without the handover the same request is lost: the kernel sends nothing
/// from an address that is not local any more.
#[test]
fn a_shutdown_hands_the_address_over_without_losing_a_taken_request() {
    let cluster = Cluster::default_cluster();
    let mut lab = Lab::new(&cluster);
    for tool in [
        "python3 --version",
        "arping -V",
        &format!("{} --version", firewall::NFT),
    ] {
        let ok = Command::new("sh").args(["-c", tool]).output();
        assert!(
            ok.is_ok_and(|o| o.status.success()),
            "this test needs `{tool}` (apt-get install python3 iputils-arping nftables)"
        );
    }
    let (one, two) = (0, 1);
    let port = cluster.ports.http.to_string();
    let mut servers = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let ns = lab.nodes[i].ns.clone();
        // As the node's init and firewall do.
        for (key, value) in vip::ARP_SYSCTLS {
            lab.exec(
                &ns,
                &[
                    "sh".into(),
                    "-c".into(),
                    format!("echo {value} > /proc/sys/{key}"),
                ],
            );
        }
        let rules = firewall::ruleset(&cluster, node);
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &ns, firewall::NFT, "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(nft.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
        drop(nft.stdin.take());
        assert!(nft.wait().unwrap().success(), "nft -f in {ns}");
        servers.push(Python::start(&ns, SERVER, &[&node.name, &port]).0);
    }
    let client = lab.add_client("10.88.0.99/24");
    let vip = cluster.floating_ip.to_string();
    let second = Duration::from_secs(1);
    lab.nodes[one].start();
    lab.nodes[two].start();
    lab.wait(Duration::from_secs(5), "server1 holds the address", |l| {
        l.holders() == [one]
    });
    lab.wait_state(two, VrrpState::Backup, second);

    // Without the handover: server1's keepalived stops, server2 takes over, and the slow
    // request server1 took is never answered.
    let (run, out) = Python::start(&client, CLIENT, &[&vip, &port]);
    std::thread::sleep(Duration::from_millis(500));
    lab.nodes[one].stop(Signal::SIGTERM);
    let requests = run.requests(out);
    let slow = requests.iter().find(|r| r.path == "/slow").unwrap();
    assert_eq!(
        slow.kind, "timeout",
        "without the handover the taken request is lost: {slow:?}"
    );
    lab.wait(second, "server2 holds the address", |l| {
        l.holders() == [two]
    });
    lab.nodes[one].start();
    lab.wait_state(one, VrrpState::Backup, Duration::from_secs(3));

    // With it, on server2 (the holder now).
    let old = lab.nodes[two].ns.clone();
    let (run, out) = Python::start(&client, CLIENT, &[&vip, &port]);
    std::thread::sleep(Duration::from_millis(500));
    // server2 must look the client up again to answer: its ARP request must not name the
    // address as its sender (clients would follow it back).
    lab.exec(
        &old,
        &["ip".into(), "neigh".into(), "flush".into(), "all".into()],
    );
    let t0 = Instant::now();
    for argv in vip::handover_argvs(&cluster) {
        lab.exec(&old, &argv);
    }
    lab.nodes[two].stop(Signal::SIGTERM);
    println!(
        "handover commands and keepalived's stop took {:?}",
        t0.elapsed()
    );
    let requests = run.requests(out);
    let slow = requests.iter().find(|r| r.path == "/slow").unwrap();
    println!("slow request: {slow:?}");
    assert_eq!(
        (slow.kind.as_str(), slow.body.as_str()),
        ("ok", "server2"),
        "the request server2 took is answered by server2: {slow:?}"
    );
    let lost: Vec<&Request> = requests.iter().filter(|r| r.kind != "ok").collect();
    assert!(lost.is_empty(), "requests lost in the handover: {lost:?}");
    let late: Vec<&Request> = requests
        .iter()
        .filter(|r| r.sent > slow.done && r.body != "server1")
        .collect();
    assert!(
        late.is_empty(),
        "after server2 answered, clients still reach it: {late:?}"
    );
    let slowest = requests.iter().map(|r| r.done - r.sent).fold(0.0, f64::max);
    println!("{} requests, slowest {slowest:.2} s", requests.len());
    lab.wait(second, "server1 holds the address", |l| {
        l.holders() == [one]
    });
    // Only server1 answers ARP for the address; server2 holds it on `lo` without a word.
    let arping = Command::new("ip")
        .args([
            "netns", "exec", &client, "arping", "-c", "3", "-w", "4", "-I", IFACE, &vip,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&arping.stdout).to_lowercase();
    let (mac1, mac2) = (lab.mac(&lab.nodes[one].ns), lab.mac(&old));
    assert!(text.contains(&mac1), "server1 does not answer ARP: {text}");
    assert!(!text.contains(&mac2), "server2 still answers ARP: {text}");
    let lo = lab.exec(
        &old,
        &[
            "ip".into(),
            "-4".into(),
            "-o".into(),
            "addr".into(),
            "show".into(),
            "dev".into(),
            "lo".into(),
        ],
    );
    assert!(lo.contains(&format!(" {vip}/32 ")), "not on lo: {lo}");
    drop(servers);
}
