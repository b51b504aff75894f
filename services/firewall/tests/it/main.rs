//! The firewall with the real `nft`, inside network namespaces made by the test: a node, a
//! cluster peer and an outside host on one bridge (10.88.0.0/24, private to the test).

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsFd as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_config::Cluster;

const NODE: &str = "10.88.0.11";
const PEER: &str = "10.88.0.12";
/// In the subnet, but neither a peer nor inside the admin networks (10.88.0.0/28).
const OUTSIDE: &str = "10.88.0.200";
/// An operator's machine: inside the admin networks, not a cluster node.
const ADMIN: &str = "10.88.0.5";

const CONFIG: &str = r#"
[cluster]
name = "fwtest"
domain = "fw.test"
subnet = "10.88.0.0/24"
floating_ip = "10.88.0.10"

[[node]]
name = "server1"
address = "10.88.0.11"
db_role = "replica"

[[node]]
name = "server2"
address = "10.88.0.12"
db_role = "primary"

[firewall]
admin_cidrs = ["10.88.0.0/28"]
"#;

fn cluster() -> Cluster {
    Cluster::from_toml(CONFIG, "fwtest.toml").unwrap()
}

#[test]
fn ruleset_matches_snapshot() {
    let cluster = Cluster::default_cluster();
    let rulesets = cluster
        .nodes
        .iter()
        .map(|node| (node.name.clone(), firewall::ruleset(&cluster, node)))
        .chain([("setup".to_string(), firewall::setup_ruleset(&cluster))]);
    for (name, actual) in rulesets {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/snapshots/{name}.nft"));
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, &actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with UPDATE_SNAPSHOTS=1 to create it)",
                path.display()
            )
        });
        assert_eq!(
            actual, expected,
            "ruleset for {name} changed; review and rerun with UPDATE_SNAPSHOTS=1"
        );
        firewall::check(&actual).unwrap();
    }
}

/// Namespaces `<prefix>-{lan,node,peer,out,admin}`, removed on drop.
struct Lab {
    prefix: String,
    listener: Option<Child>,
}

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

impl Lab {
    fn new() -> Lab {
        for tool in ["ip", firewall::NFT, "python3"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap();
            assert!(
                found.status.success(),
                "this test needs `{tool}` (apt-get install iproute2 nftables python3)"
            );
        }
        let prefix = format!("fw{}", std::process::id());
        let lab = Lab {
            prefix,
            listener: None,
        };
        let lan = lab.ns("lan");
        ip(&["netns", "add", &lan]);
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan, "link", "set", "br0", "up"]);
        for (i, (role, addr)) in [
            ("node", NODE),
            ("peer", PEER),
            ("out", OUTSIDE),
            ("admin", ADMIN),
        ]
        .into_iter()
        .enumerate()
        {
            let ns = lab.ns(role);
            let port = format!("v{i}");
            ip(&["netns", "add", &ns]);
            ip(&[
                "-n", &lan, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &lan, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// TCP listeners on every port of interest inside the node namespace.
    fn listen(&mut self, ports: &[u16]) {
        let script = format!(
            "import socket, threading\n\
             def serve(p):\n    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n    s.bind(('0.0.0.0', p)); s.listen(64)\n    while True:\n        c, _ = s.accept(); c.close()\n\
             for p in {ports:?}:\n    threading.Thread(target=serve, args=(p,), daemon=True).start()\n\
             print('listening', flush=True)\n\
             threading.Event().wait()\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns("node"), "python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "listening");
        self.listener = Some(child);
    }

    /// Whether a TCP connection from `role`'s namespace to the node's `port` succeeds within 1 s.
    fn reaches(&self, role: &str, port: u16) -> bool {
        let started = Instant::now();
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.ns(role), "python3", "-c"])
            .arg(format!(
                "import socket; socket.create_connection(('{NODE}', {port}), timeout=1).close()"
            ))
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        // A refused connection would also fail fast; a firewall drop is a timeout.
        if !ok {
            assert!(
                started.elapsed() >= Duration::from_millis(900),
                "{role} -> {port} refused, not dropped"
            );
        }
        ok
    }

    /// Runs `f` in a thread that entered the node namespace: processes it starts (nft) are there.
    fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns("node"));
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap();
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.listener.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for role in ["node", "peer", "out", "admin", "lan"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(role)])
                .status();
        }
    }
}

#[test]
fn default_deny_with_peers_and_admin_nets_and_atomic_replacement() {
    let cluster = cluster();
    let node = cluster.node("server1").unwrap();
    let ports = cluster.ports;
    let mut lab = Lab::new();
    lab.listen(&[ports.http, ports.https, ports.db, ports.admin, ports.web]);

    // Without the firewall everything answers: the probes can see a difference.
    assert!(
        lab.reaches("out", ports.db),
        "baseline: outside should reach 3306 before the firewall"
    );

    let rules = firewall::ruleset(&cluster, node);
    lab.in_node(|| firewall::apply(&rules)).unwrap();

    for port in [ports.db, ports.web, ports.admin, ports.http, ports.https] {
        assert!(lab.reaches("peer", port), "peer should reach {port}");
    }
    for port in [ports.http, ports.https] {
        assert!(lab.reaches("out", port), "outside should reach {port}");
    }
    for port in [ports.db, ports.admin, ports.web] {
        assert!(!lab.reaches("out", port), "outside must not reach {port}");
    }
    // The admin network reaches the admin port and the balancer, but not nginx behind it.
    for port in [ports.admin, ports.http, ports.https] {
        assert!(
            lab.reaches("admin", port),
            "admin network should reach {port}"
        );
    }
    for port in [ports.web, ports.db] {
        assert!(
            !lab.reaches("admin", port),
            "admin network must not reach {port}"
        );
    }

    // A ruleset nft rejects leaves the previous one working.
    let broken = rules.replace(
        "ct state invalid counter drop",
        "ct state invalid counter dorp",
    );
    let err = lab.in_node(|| firewall::apply(&broken)).unwrap_err();
    assert!(matches!(err, firewall::FirewallError::Rejected(_)), "{err}");
    assert!(
        err.to_string().contains("dorp"),
        "nft's message names the problem: {err}"
    );
    assert!(
        !lab.reaches("out", ports.db),
        "after a rejected load, 3306 must stay closed"
    );
    assert!(
        lab.reaches("out", ports.http),
        "after a rejected load, 80 must stay open"
    );

    // The live table shows the drops it counted.
    let live = lab.in_node(firewall::show).unwrap();
    let default_drop = live
        .lines()
        .find(|l| l.contains("default drop"))
        .expect("default drop rule listed");
    let packets: u64 = default_drop
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        packets > 0,
        "the default drop rule counted nothing: {default_drop}"
    );
}
