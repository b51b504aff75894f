//! keepalived for the floating IP. [`render_conf`] is a pure function of the cluster config:
//! VRRPv3, unicast between the nodes only, every node starting as BACKUP, and the node giving
//! the address away (FAULT) while either of its track files holds a non-zero value. The
//! supervisor writes the file, creates the track files and runs [`argv`]; keepalived reports
//! every state change, in order, as one line on its notify FIFO ([`parse_notify`]). At a
//! node's shutdown the supervisor runs [`handover_argvs`] before keepalived stops, so that the
//! requests the node has taken are still answered once the address has moved.
//!
//! What keepalived 2.2.7 does that the supervisor has to know:
//! - A missing or deleted track file reads as `0`, i.e. healthy. `init_file 1` makes keepalived
//!   create a missing one as `1` (fail closed), but the supervisor creates both before the start
//!   anyway, owned by their writers. They are re-read on close after writing and on rename into
//!   place, so a plain write and a write-then-rename both work.
//! - keepalived opens the FIFO read-write and non-blocking: nothing blocks without a reader, and
//!   lines written while nobody reads wait in the pipe (and are dropped once it is full). It
//!   creates the FIFO if missing and unlinks it on exit only if it created it, so the reader
//!   should create it first and keep it open read-write (no end-of-file across restarts).
//! - On SIGKILL the address stays on the interface (two holders until the next start);
//!   keepalived removes it when it starts again, before it joins as BACKUP.
//! - With `--dont-respawn` the main process exits (status 0) when its VRRP child dies, so the
//!   supervisor sees every crash; the child gets SIGTERM when the main process dies. keepalived
//!   also exits 0 when it refuses to start over stale pid files ([`Paths::pid_files`]): its
//!   exit status says nothing.
//! - Its stderr lines read `Sun Nov 29 08:41:35 2026: (tandem) Entering MASTER STATE` (local
//!   time, C locale `%c`); the FIFO is the interface to rely on.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_config::{Cluster, Node};

pub const KEEPALIVED: &str = "/usr/sbin/keepalived";

// The formats keepalived shares with the balancer and the supervisor live in `api`.
pub use api::vip::{
    parse_notify, track_value, Transition, VrrpState, INSTANCE, NOTIFY_FIFO, TRACK_BACKENDS,
    TRACK_BALANCER, TRACK_SETTLING,
};

const PID_FILE: &str = "keepalived.pid";
const VRRP_PID_FILE: &str = "vrrp.pid";

/// Where keepalived reads and writes on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    /// Run directory: track files, the notify FIFO and the pid files.
    pub dir: PathBuf,
    /// Where the rendered config is written.
    pub config_file: PathBuf,
}

impl Paths {
    pub fn track_file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn notify_fifo(&self) -> PathBuf {
        self.dir.join(NOTIFY_FIFO)
    }

    /// keepalived's pid files (main process, VRRP child). Remove them before every start:
    /// keepalived refuses to start ("daemon is already running") while a pid in them answers
    /// `kill(pid, 0)` (a killed child not yet reaped, or the pid reused by any other process)
    /// or when one is empty.
    pub fn pid_files(&self) -> [PathBuf; 2] {
        [self.dir.join(PID_FILE), self.dir.join(VRRP_PID_FILE)]
    }
}

/// The ARP behaviour a node needs to hold the floating IP on `lo` while it hands the address
/// over ([`handover_argvs`]), as `(path, value)` under `/proc/sys`: answer ARP only for
/// addresses of the interface asked on (`arp_ignore` 1), and never name an address of another
/// interface as the sender of its own ARP requests (`arp_announce` 2). Without them the old
/// holder would answer, or announce, the address it no longer holds and pull clients back.
/// The node's own address is on the LAN interface, where both settings change nothing. The
/// `all` values apply to every interface (the kernel takes the larger of `all` and the
/// interface's).
pub const ARP_SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv4/conf/all/arp_ignore", "1"),
    ("net/ipv4/conf/all/arp_announce", "2"),
];

/// What a node runs, in order, just before keepalived stops for good (the node shuts down):
///
/// 1. The floating IP goes into the firewall's draining set ([`firewall::drain_argv`]): new
///    connections to it are dropped, so a client's SYN sent before the new holder's
///    gratuitous ARPs arrive is sent again a second later, to the new holder, instead of
///    being taken here and reset later.
/// 2. The address is added to `lo` as a /32. keepalived then removes it from the LAN
///    interface and gives it away (a priority-0 advert), but it stays a local address here:
///    the balancer can still answer the requests it has taken (the kernel sends nothing from
///    an address that is not local), and does so while it drains. With [`ARP_SYSCTLS`] the
///    node never answers ARP for it there.
///
/// This is the LVS direct-routing trick (real servers hold the service address on `lo` with
/// `arp_ignore`/`arp_announce`). A client's later packets on such a connection (its ACKs)
/// go to the new holder, which resets them: the answer has arrived by then. A request not yet
/// wholly received when the address moves is lost as before.
pub fn handover_argvs(cluster: &Cluster) -> Vec<Vec<String>> {
    vec![
        firewall::drain_argv(cluster.floating_ip),
        vec![
            "ip".into(),
            "addr".into(),
            "replace".into(),
            format!("{}/32", cluster.floating_ip),
            "dev".into(),
            "lo".into(),
        ],
    ]
}

/// Everything keepalived needs to know about this node.
#[derive(Debug, Clone)]
pub struct Params<'a> {
    pub cluster: &'a Cluster,
    pub node: &'a Node,
    /// The LAN interface carrying the node's address; the floating IP is added there.
    pub interface: String,
    pub paths: Paths,
}

/// The keepalived command line: foreground, VRRP only, logging to stderr only (no syslog),
/// pid files in the run directory, and no respawning of its VRRP child (the supervisor owns
/// restarts).
pub fn argv(p: &Params) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let [pid, vrrp_pid] = p.paths.pid_files();
    vec![
        KEEPALIVED.to_string(),
        "--dont-fork".to_string(),
        "--log-console".to_string(),
        "--log-detail".to_string(),
        "--no-syslog".to_string(),
        "--dont-respawn".to_string(),
        "--vrrp".to_string(),
        "--pid".to_string(),
        path(&pid),
        "--vrrp_pid".to_string(),
        path(&vrrp_pid),
        "-f".to_string(),
        path(&p.paths.config_file),
    ]
}

/// keepalived.conf for the node.
///
/// A cluster of one node has no peer to elect with: keepalived then holds the address as a
/// static address (added at start, removed at stop), sends no VRRP adverts and writes no
/// transitions to the FIFO.
pub fn render_conf(p: &Params) -> String {
    let Params {
        cluster,
        node,
        interface,
        paths,
    } = p;
    let vrrp = cluster.vrrp;
    let vip = format!(
        "{}/{} dev {interface}",
        cluster.floating_ip, cluster.subnet.prefix
    );
    let mut s = String::new();
    let _ = write!(
        s,
        "\
# Generated by Tandem; edits are overwritten at every start.
# The floating IP of cluster {cluster_name} on node {node_name}.
global_defs {{
    router_id {node_name}
    vrrp_version 3
    # No scripts run; any added later must not be writable by others.
    enable_script_security
    # State changes in order, one line each. Naming the owner keeps keepalived from
    # looking for a script user (keepalived_script) and warning that there is none.
    notify_fifo {fifo} root
    # On takeover: 3 gratuitous ARPs at once, 3 more after 1 s, no periodic ones.
    vrrp_garp_master_repeat 3
    vrrp_garp_master_delay 1
    vrrp_garp_master_refresh 0
    # After a split brain the losing master advertises once more, so that the winner
    # answers with its gratuitous ARPs last.
    vrrp_higher_prio_send_advert true
    # No real-time scheduling (max_auto_priority): under load, keepalived's VRRP process
    # then exceeds its RLIMIT_RTTIME and the kernel kills it (seen under QEMU/TCG), which
    # costs a failover; its adverts are cheap enough at normal priority.
}}
",
        cluster_name = cluster.name,
        node_name = node.name,
        fifo = quoted(&paths.notify_fifo()),
    );

    if cluster.peers(&node.name).next().is_none() {
        let _ = write!(
            s,
            "
# A single node: nobody to elect with, the address is simply held.
static_ipaddress {{
    {vip}
}}
"
        );
        return s;
    }

    for name in [TRACK_BALANCER, TRACK_BACKENDS] {
        let _ = write!(
            s,
            "
# Non-zero: this node cannot serve, FAULT gives the address away.
track_file {name} {{
    file {file}
    weight 0
    # A missing file reads as 0: create it as 1 instead (fail closed).
    init_file 1
}}
",
            file = quoted(&paths.track_file(name)),
        );
    }

    // A node that just started is settling: its priority drops to 1 until the balancer has
    // served for a while (api::vip::SETTLE), so that while its boot or a busy peer delays the
    // adverts it loses any election instead of taking the address back from a settled holder.
    let settling = node.vrrp_priority > 1;
    if settling {
        let _ = write!(
            s,
            "
# Non-zero while the node is settling after its start: priority {priority} - {drop} = 1.
track_file {TRACK_SETTLING} {{
    file {file}
    weight -{drop}
    init_file 1
}}
",
            priority = node.vrrp_priority,
            drop = node.vrrp_priority - 1,
            file = quoted(&paths.track_file(TRACK_SETTLING)),
        );
    }

    let preempt = match vrrp.preempt_delay {
        None => [
            "    # A node that comes back never takes the address from a healthy holder.".into(),
            "    nopreempt".into(),
        ],
        Some(delay) => [
            "    # The highest priority takes the address back, this long after it can serve."
                .into(),
            format!("    preempt_delay {}", seconds(delay)),
        ],
    }
    .join("\n");
    let peers: String = cluster
        .peers(&node.name)
        .map(|peer| format!("        {}\n", peer.address))
        .collect();
    let _ = write!(
        s,
        "
vrrp_instance {INSTANCE} {{
    # Every node starts as BACKUP: the address is only ever taken by election.
    state BACKUP
    interface {interface}
    virtual_router_id {router_id}
    priority {priority}
    advert_int {advert}
{preempt}
    # Adverts go to the peers only, and only theirs are accepted.
    unicast_src_ip {address}
    unicast_peer {{
{peers}    }}
    check_unicast_src
    # FAULT if the node's own address disappears.
    track_src_ip
    track_file {{
        {TRACK_BALANCER}
        {TRACK_BACKENDS}
{settling_track}    }}
    virtual_ipaddress {{
        {vip}
    }}
}}
",
        router_id = vrrp.router_id,
        priority = node.vrrp_priority,
        advert = centiseconds(vrrp.advert_interval),
        address = node.address,
        settling_track = if settling {
            format!("        {TRACK_SETTLING}\n")
        } else {
            String::new()
        },
    );
    s
}

/// A quoted string for keepalived's parser (paths from the supervisor hold no quotes).
fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

/// Seconds with two decimals, VRRPv3's resolution: `0.10` for 100 ms.
fn centiseconds(d: Duration) -> String {
    let cs = d.as_millis() / 10;
    format!("{}.{:02}", cs / 100, cs % 100)
}

/// Whole seconds when exact, else with two decimals.
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        centiseconds(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Paths {
        Paths {
            dir: "/run/tandem/vip".into(),
            config_file: "/run/tandem/conf/keepalived.conf".into(),
        }
    }

    fn conf(cluster: &Cluster, node: &str) -> String {
        render_conf(&Params {
            cluster,
            node: cluster.node(node).unwrap(),
            interface: "eth0".into(),
            paths: paths(),
        })
    }

    /// `assert_eq!` with the first differing line named: snapshots are long.
    fn check_snapshot(actual: &str, expected: &str) {
        if actual != expected {
            let line = actual
                .lines()
                .zip(expected.lines())
                .position(|(a, e)| a != e)
                .unwrap_or_else(|| actual.lines().count().min(expected.lines().count()));
            panic!(
                "snapshot differs from line {}:\n--- actual\n{actual}\n--- expected\n{expected}",
                line + 1
            );
        }
    }

    #[test]
    fn default_cluster_server1_snapshot() {
        check_snapshot(&conf(&Cluster::default_cluster(), "server1"), SERVER1);
    }

    const SERVER1: &str = r#"# Generated by Tandem; edits are overwritten at every start.
# The floating IP of cluster tandem on node server1.
global_defs {
    router_id server1
    vrrp_version 3
    # No scripts run; any added later must not be writable by others.
    enable_script_security
    # State changes in order, one line each. Naming the owner keeps keepalived from
    # looking for a script user (keepalived_script) and warning that there is none.
    notify_fifo "/run/tandem/vip/notify.fifo" root
    # On takeover: 3 gratuitous ARPs at once, 3 more after 1 s, no periodic ones.
    vrrp_garp_master_repeat 3
    vrrp_garp_master_delay 1
    vrrp_garp_master_refresh 0
    # After a split brain the losing master advertises once more, so that the winner
    # answers with its gratuitous ARPs last.
    vrrp_higher_prio_send_advert true
    # No real-time scheduling (max_auto_priority): under load, keepalived's VRRP process
    # then exceeds its RLIMIT_RTTIME and the kernel kills it (seen under QEMU/TCG), which
    # costs a failover; its adverts are cheap enough at normal priority.
}

# Non-zero: this node cannot serve, FAULT gives the address away.
track_file balancer-down {
    file "/run/tandem/vip/balancer-down"
    weight 0
    # A missing file reads as 0: create it as 1 instead (fail closed).
    init_file 1
}

# Non-zero: this node cannot serve, FAULT gives the address away.
track_file backends-down {
    file "/run/tandem/vip/backends-down"
    weight 0
    # A missing file reads as 0: create it as 1 instead (fail closed).
    init_file 1
}

# Non-zero while the node is settling after its start: priority 150 - 149 = 1.
track_file settling {
    file "/run/tandem/vip/settling"
    weight -149
    init_file 1
}

vrrp_instance tandem {
    # Every node starts as BACKUP: the address is only ever taken by election.
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority 150
    advert_int 0.10
    # A node that comes back never takes the address from a healthy holder.
    nopreempt
    # Adverts go to the peers only, and only theirs are accepted.
    unicast_src_ip 10.88.0.11
    unicast_peer {
        10.88.0.12
    }
    check_unicast_src
    # FAULT if the node's own address disappears.
    track_src_ip
    track_file {
        balancer-down
        backends-down
        settling
    }
    virtual_ipaddress {
        10.88.0.10/24 dev eth0
    }
}
"#;

    fn three_nodes(vrrp: &str) -> Cluster {
        let toml = format!(
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
vrrp_priority = 7

[vrrp]
{vrrp}
"#
        );
        Cluster::from_toml(&toml, "trio.toml").unwrap()
    }

    /// The lines between `<keyword> {` and its closing brace, trimmed.
    fn block<'a>(conf: &'a str, keyword: &str) -> Vec<&'a str> {
        let open = format!("{keyword} {{");
        conf.lines()
            .skip_while(|l| l.trim() != open)
            .skip(1)
            .take_while(|l| l.trim() != "}")
            .map(str::trim)
            .collect()
    }

    #[test]
    fn three_nodes_advertise_to_the_two_others() {
        let cluster = three_nodes("router_id = 7\nadvert_interval_ms = 1230");
        let expected = [
            ("a", "10.88.0.21", 150, ["10.88.0.22", "10.88.0.23"]),
            ("b", "10.88.0.22", 100, ["10.88.0.21", "10.88.0.23"]),
            ("c", "10.88.0.23", 7, ["10.88.0.21", "10.88.0.22"]),
        ];
        for (name, address, priority, peers) in expected {
            let conf = conf(&cluster, name);
            assert_eq!(block(&conf, "unicast_peer"), peers, "{conf}");
            for line in [
                format!("router_id {name}"),
                format!("unicast_src_ip {address}"),
                format!("priority {priority}"),
                "virtual_router_id 7".to_string(),
                "advert_int 1.23".to_string(),
                format!("weight -{}", priority - 1),
                "nopreempt".to_string(),
                "state BACKUP".to_string(),
            ] {
                assert!(conf.lines().any(|l| l.trim() == line), "{line}:\n{conf}");
            }
            assert_eq!(
                block(&conf, "virtual_ipaddress"),
                ["10.88.0.10/24 dev eth0"]
            );
            assert_eq!(conf.matches('{').count(), conf.matches('}').count());
        }
    }

    #[test]
    fn preempt_delay_replaces_nopreempt() {
        for (vrrp, line) in [
            ("preempt_delay_s = 30", "preempt_delay 30"),
            ("preempt_delay_s = 0", "preempt_delay 0"),
        ] {
            let conf = conf(&three_nodes(vrrp), "b");
            let line = format!("    {line}");
            assert!(conf.lines().any(|l| l == line), "{conf}");
            assert!(!conf.contains("nopreempt"), "{conf}");
        }
    }

    #[test]
    fn durations_in_keepalived_units() {
        let check = |ms: u64, centis: &str, secs: &str| {
            let d = Duration::from_millis(ms);
            assert_eq!(
                (centiseconds(d).as_str(), seconds(d).as_str()),
                (centis, secs),
                "{ms} ms"
            );
        };
        check(10, "0.01", "0.01");
        check(100, "0.10", "0.10");
        check(1000, "1.00", "1");
        check(40_950, "40.95", "40.95");
        check(300_000, "300.00", "300");
    }

    #[test]
    fn single_node_holds_the_address_without_vrrp() {
        let cluster = Cluster::from_toml(
            r#"
[cluster]
name = "solo"
domain = "solo.test"
subnet = "10.88.0.0/16"
floating_ip = "10.88.1.10"

[[node]]
name = "only"
address = "10.88.0.11"
db_role = "primary"
"#,
            "solo.toml",
        )
        .unwrap();
        let conf = conf(&cluster, "only");
        assert_eq!(block(&conf, "static_ipaddress"), ["10.88.1.10/16 dev eth0"]);
        for absent in ["vrrp_instance", "unicast", "track_file"] {
            assert!(!conf.contains(absent), "{absent}:\n{conf}");
        }
    }

    #[test]
    fn argv_runs_in_the_foreground_with_our_files() {
        let cluster = Cluster::default_cluster();
        let argv = argv(&Params {
            cluster: &cluster,
            node: &cluster.nodes[0],
            interface: "eth0".into(),
            paths: paths(),
        });
        assert_eq!(
            argv,
            [
                KEEPALIVED,
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--no-syslog",
                "--dont-respawn",
                "--vrrp",
                "--pid",
                "/run/tandem/vip/keepalived.pid",
                "--vrrp_pid",
                "/run/tandem/vip/vrrp.pid",
                "-f",
                "/run/tandem/conf/keepalived.conf",
            ]
        );
    }

    #[test]
    fn paths_and_track_values() {
        let p = paths();
        assert_eq!(
            p.track_file(TRACK_BACKENDS),
            Path::new("/run/tandem/vip/backends-down")
        );
        assert_eq!(p.notify_fifo(), Path::new("/run/tandem/vip/notify.fifo"));
        assert_eq!(
            p.pid_files(),
            [
                Path::new("/run/tandem/vip/keepalived.pid"),
                Path::new("/run/tandem/vip/vrrp.pid")
            ]
        );
        assert_eq!((track_value(true), track_value(false)), ("0\n", "1\n"));
    }
}
