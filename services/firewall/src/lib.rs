//! The node's firewall. [`ruleset`] is a pure function of the cluster config: default-deny
//! inbound, the balancer's ports (HTTP, HTTPS) open to everyone, the admin port to the admin
//! networks, MariaDB, VRRP and nginx's backend port to cluster peers (and loopback) only.
//! [`apply`] loads it with `nft -f` as one transaction, so a ruleset that `nft` rejects leaves
//! the previous one in force. At a node's shutdown [`drain_argv`] stops new connections to the
//! floating IP while those established finish.
//!
//! Only the `inet tandem` table is ours: it is deleted and recreated inside the same
//! transaction, and no other table is touched.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cluster_config::{Cluster, Node};

pub const TABLE: &str = "tandem";
pub const NFT: &str = "/usr/sbin/nft";
/// Echo requests answered per second before the rest are dropped (and counted).
pub const ICMP_ECHO_RATE: &str = "10/second burst 20 packets";
/// IP protocol number of VRRP (keepalived).
pub const IPPROTO_VRRP: u8 = 112;
/// The set of addresses this node is handing over: new connections to them are dropped (the
/// client's SYN is sent again, by then to the new holder), while the connections already
/// established finish. Empty until [`drain_argv`] adds the floating IP at a node's shutdown.
pub const DRAINING_SET: &str = "draining";

/// The command that puts `address` in [`DRAINING_SET`] of the live table.
pub fn drain_argv(address: Ipv4Addr) -> Vec<String> {
    [NFT, "add", "element", "inet", TABLE, DRAINING_SET]
        .map(String::from)
        .into_iter()
        .chain([format!("{{ {address} }}")])
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("running {NFT}: {0} (is the nftables package installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("nft rejected the ruleset, the previous rules stay in force:\n{0}")]
    Rejected(String),
    #[error("nft {args}: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("writing the ruleset to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The complete nft script for `node` of `cluster`.
pub fn ruleset(cluster: &Cluster, node: &Node) -> String {
    let ports = cluster.ports;
    let peers: Vec<Ipv4Addr> = cluster.peers(&node.name).map(|p| p.address).collect();
    let mut s = head(
        &format!("node {} of cluster {}", node.name, cluster.name),
        cluster,
    );
    s.push_str("    set peers {\n        type ipv4_addr\n");
    if !peers.is_empty() {
        let peers: Vec<String> = peers.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "        elements = {{ {} }}", peers.join(", "));
    }
    s.push_str("    }\n\n");
    let _ = writeln!(
        s,
        "    set {DRAINING_SET} {{\n        type ipv4_addr\n    }}\n"
    );
    input_head(&mut s);
    // After `established`: what is handed over finishes, only new connections are dropped.
    let _ = writeln!(
        s,
        "        ip daddr @{DRAINING_SET} counter drop comment \"draining\""
    );
    let _ = writeln!(
        s,
        "        ip daddr {{ {}, {} }} tcp dport {{ {}, {} }} accept",
        node.address, cluster.floating_ip, ports.http, ports.https
    );
    let _ = writeln!(
        s,
        "        ip saddr @admin_nets tcp dport {} accept",
        ports.admin
    );
    // nginx is a backend of the balancers only (this node's reaches it over `lo`): a client
    // holding idle sockets open on it could take a backend down.
    let _ = writeln!(
        s,
        "        ip saddr @peers tcp dport {{ {}, {}, {} }} accept",
        ports.db, ports.web, ports.admin
    );
    let _ = writeln!(
        s,
        "        ip saddr @peers ip protocol {IPPROTO_VRRP} accept"
    );
    tail(&mut s);
    s
}

/// The first-boot wizard's ruleset (a node whose settings are incomplete): only the admin
/// port, from the admin networks, where the wizard is served; nothing else is open.
pub fn setup_ruleset(cluster: &Cluster) -> String {
    let mut s = head(
        &format!("the first-boot wizard of cluster {}", cluster.name),
        cluster,
    );
    input_head(&mut s);
    let _ = writeln!(
        s,
        "        ip saddr @admin_nets tcp dport {} accept",
        cluster.ports.admin
    );
    tail(&mut s);
    s
}

fn head(what: &str, cluster: &Cluster) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Tandem firewall for {what}; generated, do not edit.");
    // Create-then-delete makes the delete valid on a first load; all of it is one transaction.
    let _ = writeln!(s, "table inet {TABLE}\ndelete table inet {TABLE}\n");
    let _ = writeln!(s, "table inet {TABLE} {{");
    s.push_str("    set admin_nets {\n        type ipv4_addr\n        flags interval\n");
    let admin: Vec<String> = cluster
        .firewall
        .admin_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    let _ = writeln!(s, "        elements = {{ {} }}\n    }}\n", admin.join(", "));
    s
}

fn input_head(s: &mut String) {
    s.push_str("    chain input {\n        type filter hook input priority filter; policy drop;\n");
    s.push_str("        ct state established,related accept\n");
    s.push_str("        ct state invalid counter drop comment \"invalid\"\n");
    s.push_str("        iif \"lo\" accept\n");
    let _ = writeln!(
        s,
        "        icmp type echo-request limit rate {ICMP_ECHO_RATE} accept"
    );
    s.push_str("        icmp type echo-request counter drop comment \"icmp flood\"\n");
    s.push_str(
        "        icmp type { destination-unreachable, time-exceeded, parameter-problem } accept\n",
    );
    // IPv6 neighbour discovery keeps link-local IPv6 working; nothing else is served on v6.
    s.push_str("        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert, echo-request } limit rate 10/second accept\n");
}

fn tail(s: &mut String) {
    s.push_str("        counter drop comment \"default drop\"\n    }\n\n");
    s.push_str(
        "    chain forward {\n        type filter hook forward priority filter; policy drop;\n",
    );
    s.push_str("        counter drop comment \"no routing\"\n    }\n\n");
    s.push_str("    chain output {\n        type filter hook output priority filter; policy accept;\n    }\n}\n");
}

/// Loads `rules` as one transaction. On rejection nothing changes and the error carries nft's
/// message (with line numbers into the script).
pub fn apply(rules: &str) -> Result<(), FirewallError> {
    nft_stdin(&["-f", "-"], rules).map_err(|e| match e {
        FirewallError::Failed { stderr, .. } => FirewallError::Rejected(stderr),
        other => other,
    })
}

/// Checks `rules` without loading them (`nft -c`).
pub fn check(rules: &str) -> Result<(), FirewallError> {
    nft_stdin(&["-c", "-f", "-"], rules).map_err(|e| match e {
        FirewallError::Failed { stderr, .. } => FirewallError::Rejected(stderr),
        other => other,
    })
}

/// The live table with its counters.
pub fn show() -> Result<String, FirewallError> {
    let args = ["list", "table", "inet", TABLE];
    let out = Command::new(NFT)
        .args(args)
        .output()
        .map_err(FirewallError::Spawn)?;
    if !out.status.success() {
        return Err(FirewallError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes the ruleset where an operator can read what was applied (atomic replace).
pub fn save(rules: &str, path: &Path) -> Result<(), FirewallError> {
    let err = |source| FirewallError::Write {
        path: path.to_path_buf(),
        source,
    };
    api::fsio::write_atomic(path, rules.as_bytes(), 0o644, None).map_err(err)
}

fn nft_stdin(args: &[&str], input: &str) -> Result<(), FirewallError> {
    let mut child = Command::new(NFT)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FirewallError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as nft's own failure below.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(FirewallError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FirewallError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_rule_counts() {
        let cluster = Cluster::default_cluster();
        let rules = ruleset(&cluster, cluster.node("server1").unwrap());
        for line in rules
            .lines()
            .filter(|l| l.contains(" drop") && !l.contains("policy drop"))
        {
            assert!(
                line.contains("counter"),
                "drop rule without a counter: {line}"
            );
        }
        assert!(rules.contains("policy drop;"));
        assert_eq!(rules.matches('{').count(), rules.matches('}').count());
    }

    #[test]
    fn peers_exclude_the_node_itself() {
        let cluster = Cluster::default_cluster();
        let rules = ruleset(&cluster, cluster.node("server2").unwrap());
        assert!(rules.contains("elements = { 10.88.0.11 }"), "{rules}");
        assert!(rules.contains("ip daddr { 10.88.0.12, 10.88.0.10 } tcp dport { 80, 443 } accept"));
        assert!(rules.contains("ip saddr @peers tcp dport { 3306, 8080, 9443 } accept"));
        assert!(rules.contains("ip saddr @admin_nets tcp dport 9443 accept"));
    }

    /// The accept rules of the input chain that name `port`.
    fn rules_for_port(rules: &str, port: u16) -> Vec<String> {
        let port = port.to_string();
        rules
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("tcp dport") && l.ends_with("accept"))
            .filter(|l| {
                let ports = l.split("tcp dport").nth(1).unwrap_or("");
                ports
                    .split(|c: char| !c.is_ascii_digit())
                    .any(|p| p == port)
            })
            .map(String::from)
            .collect()
    }

    #[test]
    fn nginx_backend_port_is_open_to_cluster_peers_only() {
        let cluster = Cluster::default_cluster();
        for node in &cluster.nodes {
            let rules = ruleset(&cluster, node);
            let web = rules_for_port(&rules, cluster.ports.web);
            assert_eq!(
                web,
                [format!(
                    "ip saddr @peers tcp dport {{ {}, {}, {} }} accept",
                    cluster.ports.db, cluster.ports.web, cluster.ports.admin
                )],
                "{rules}"
            );
            // Loopback (the node's own balancer) is accepted before any port rule.
            assert!(rules.contains("iif \"lo\" accept"));
            // The balancer's public ports stay open to every client of the addresses it serves.
            for port in [cluster.ports.http, cluster.ports.https] {
                let public = rules_for_port(&rules, port);
                assert_eq!(public.len(), 1, "{public:?}");
                assert!(public[0].starts_with("ip daddr {"), "{public:?}");
            }
        }
    }
}
