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

fn ip(args: &[&str]) {
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
