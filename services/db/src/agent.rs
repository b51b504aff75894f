//! What the database agent (`appliance db-agent`) and the `appliance db` commands share: the
//! agent's configuration (rendered by the node plan), the status it publishes, the passwords
//! derived from the cluster secret, and the switchover's preconditions. Pure.
//!
//! # Secrets
//!
//! Every node of a cluster holds the same 32-byte cluster secret (a file of 64 hex digits).
//! Each database password is `hex(HMAC-SHA256(secret, purpose))` with the purposes
//! `replication`, `app` and `admin`, so replicas know the replication password without asking
//! anyone, and nothing but the secret file needs provisioning.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use api::secret::{derive_password, SECRET_LEN};
use cluster_config::{Cluster, DbRole};
use serde::{Deserialize, Serialize};

use crate::repl::{GtidPos, Passwords, SlaveStatus};

/// File name of the agent's configuration below the run directory's `etc/`.
pub const AGENT_CONFIG_FILE: &str = "db-agent.json";
/// File name, in the state directory, of the primary chosen by the last switchover.
pub const PRIMARY_FILE: &str = "db-primary";

/// One node as the agent needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentNode {
    pub name: String,
    pub address: Ipv4Addr,
}

/// The agent's whole configuration, written by the node plan to `run/etc/db-agent.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This node.
    pub node: String,
    pub nodes: Vec<AgentNode>,
    /// The primary named by `cluster.toml`.
    pub config_primary: String,
    /// MariaDB's TCP port on every node.
    pub port: u16,
    /// Account host pattern for the cluster LAN (`10.88.0.0/255.255.255.0`).
    pub account_host: String,
    pub max_lag_ms: u64,
    /// The local server's Unix socket (root logs in there by `unix_socket` authentication).
    pub socket: PathBuf,
    pub secret_file: PathBuf,
    /// Persistent: the primary after a switchover (honoured over `config_primary`).
    pub primary_file: PathBuf,
    /// Runtime: the status the agent publishes.
    pub status_file: PathBuf,
    /// Runtime, private (0700): client option files holding passwords.
    pub private_dir: PathBuf,
    /// The cluster CA (the local server's `ssl_ca`): TCP connections to any node's server use
    /// TLS and verify its certificate against it.
    pub ssl_ca: PathBuf,
}

impl AgentConfig {
    /// The configuration of the agent of `node`, with its files at `paths`.
    pub fn for_node(cluster: &Cluster, node: &str, paths: AgentPaths) -> AgentConfig {
        AgentConfig {
            node: node.to_string(),
            nodes: cluster
                .nodes
                .iter()
                .map(|n| AgentNode {
                    name: n.name.clone(),
                    address: n.address,
                })
                .collect(),
            config_primary: cluster.primary().name.clone(),
            port: cluster.ports.db,
            account_host: crate::repl::host_pattern(&cluster.subnet),
            max_lag_ms: u64::try_from(cluster.db.max_lag.as_millis()).unwrap_or(u64::MAX),
            socket: paths.socket,
            secret_file: paths.secret_file,
            primary_file: paths.primary_file,
            status_file: paths.status_file,
            private_dir: paths.private_dir,
            ssl_ca: paths.ssl_ca,
        }
    }

    /// The address of the node named `node`, if the cluster has it.
    pub fn address_of(&self, node: &str) -> Option<Ipv4Addr> {
        self.nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.address)
    }

    /// The role of `node` when `primary` is the primary.
    pub fn role(&self, node: &str, primary: &str) -> DbRole {
        if node == primary {
            DbRole::Primary
        } else {
            DbRole::Replica
        }
    }
}

/// Where the agent's files are; see [`AgentConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct AgentPaths {
    pub socket: PathBuf,
    pub secret_file: PathBuf,
    pub primary_file: PathBuf,
    pub status_file: PathBuf,
    pub private_dir: PathBuf,
    pub ssl_ca: PathBuf,
}

/// The effective primary: the one persisted by a switchover when it names a node of the
/// cluster, else the config's.
pub fn effective_primary<'a>(
    config_primary: &'a str,
    persisted: Option<&'a str>,
    nodes: &[&str],
) -> &'a str {
    match persisted.map(str::trim) {
        Some(p) if nodes.contains(&p) => p,
        _ => config_primary,
    }
}

/// The database passwords of a cluster, derived from its secret (see [`api::secret`]).
pub fn passwords(secret: &[u8; SECRET_LEN]) -> Passwords {
    Passwords {
        replication: derive_password(secret, "replication"),
        app: derive_password(secret, "app"),
        admin: derive_password(secret, "admin"),
    }
}

// ---------------------------------------------------------------------------------------------
// Switchover

/// One node's database as seen over the network by `db status` and `db switchover`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub name: String,
    pub address: Ipv4Addr,
    pub read_only: bool,
    pub current_pos: GtidPos,
    pub slave_pos: GtidPos,
    pub binlog_pos: GtidPos,
    pub slave: Option<SlaveStatus>,
}

/// Who does what in a switchover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchoverPlan {
    pub old_primary: String,
    pub target: String,
    /// Replicas other than the target, repointed at the target.
    pub others: Vec<String>,
}

/// Checks a switchover to `target` can start: exactly one writable node (the current primary),
/// every node reachable, and the target replicating from it with both threads running and no
/// error. Whether the target has applied everything is checked after the primary stopped
/// taking writes (`MASTER_GTID_WAIT`), since before that it can never be certain.
pub fn plan_switchover(
    nodes: &[Result<Snapshot, String>],
    target: &str,
    port: u16,
) -> Result<SwitchoverPlan, String> {
    let mut seen = Vec::new();
    for node in nodes {
        match node {
            Ok(s) => seen.push(s),
            Err(e) => {
                return Err(format!(
                    "refusing: a node is unreachable ({e}); every node must be up for a switchover"
                ))
            }
        }
    }
    let writable: Vec<&str> = seen
        .iter()
        .filter(|s| !s.read_only)
        .map(|s| s.name.as_str())
        .collect();
    let old = match writable.as_slice() {
        [one] => *one,
        [] => {
            return Err(
                "refusing: no node is writable, so there is no primary to switch from".into(),
            )
        }
        many => {
            return Err(format!(
                "refusing: several nodes are writable ({})",
                many.join(", ")
            ))
        }
    };
    let Some(t) = seen.iter().find(|s| s.name == target) else {
        return Err(format!("no node `{target}` in the cluster"));
    };
    if t.name == old {
        return Err(format!("`{target}` is already the primary"));
    }
    let primary_addr = seen
        .iter()
        .find(|s| s.name == old)
        .map(|s| s.address.to_string())
        .unwrap_or_default();
    let Some(slave) = &t.slave else {
        return Err(format!(
            "refusing: `{target}` does not replicate from anyone"
        ));
    };
    if slave.master_host != primary_addr || slave.master_port != port {
        return Err(format!(
            "refusing: `{target}` replicates from {}:{}, not from the primary `{old}`",
            slave.master_host, slave.master_port
        ));
    }
    if !slave.io_running()
        || !slave.sql_running
        || !slave.last_sql_error.is_empty()
        || !slave.last_io_error.is_empty()
    {
        return Err(format!(
            "refusing: `{target}` is not replicating cleanly (IO {}, SQL {}, errors: {:?} {:?})",
            slave.io_running,
            if slave.sql_running { "Yes" } else { "No" },
            slave.last_io_error,
            slave.last_sql_error
        ));
    }
    let others = seen
        .iter()
        .filter(|s| s.name != old && s.name != target)
        .map(|s| s.name.clone())
        .collect();
    Ok(SwitchoverPlan {
        old_primary: old.to_string(),
        target: target.to_string(),
        others,
    })
}

/// Which of `nodes` do not acknowledge `primary` yet, from the rows of
/// [`crate::repl::followers_sql`] read on the primary.
pub fn not_following<'a>(
    rows: &[std::collections::BTreeMap<String, String>],
    primary: &str,
    nodes: &[&'a str],
) -> Vec<&'a str> {
    nodes
        .iter()
        .filter(|n| {
            !rows.iter().any(|r| {
                r.get("node").map(String::as_str) == Some(**n)
                    && r.get("primary_node").map(String::as_str) == Some(primary)
            })
        })
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::{parse_batch, SlaveStatus};

    #[test]
    fn passwords_differ_by_purpose_and_by_secret() {
        let secret = [7u8; SECRET_LEN];
        let pw = passwords(&secret);
        assert_eq!(pw.replication.len(), 64);
        assert!(pw.replication != pw.app && pw.app != pw.admin);
        assert_eq!(pw, passwords(&secret));
        assert_ne!(pw, passwords(&[8u8; SECRET_LEN]));
    }

    #[test]
    fn persisted_primary_wins_when_it_names_a_node() {
        let nodes = ["server1", "server2"];
        assert_eq!(effective_primary("server2", None, &nodes), "server2");
        assert_eq!(
            effective_primary("server2", Some("server1\n"), &nodes),
            "server1"
        );
        assert_eq!(
            effective_primary("server2", Some("gone"), &nodes),
            "server2"
        );
    }

    #[test]
    fn agent_config_from_the_default_cluster() {
        let cluster = Cluster::default_cluster();
        let paths = AgentPaths {
            socket: "/run/tandem/mysqld/mysqld.sock".into(),
            secret_file: "/data/tandem/cluster.secret".into(),
            primary_file: "/data/tandem/db-primary".into(),
            status_file: "/run/tandem/db-status.json".into(),
            private_dir: "/run/tandem/db-agent".into(),
            ssl_ca: "/run/tandem/mysqld/tls-ca.pem".into(),
        };
        let c = AgentConfig::for_node(&cluster, "server1", paths);
        assert_eq!(
            (c.config_primary.as_str(), c.port, c.max_lag_ms),
            ("server2", 3306, 5000)
        );
        assert_eq!(c.account_host, "10.88.0.0/255.255.255.0");
        assert_eq!(c.address_of("server2"), Some(Ipv4Addr::new(10, 88, 0, 12)));
        assert_eq!(c.role("server1", "server2"), DbRole::Replica);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<AgentConfig>(&json).unwrap(), c);
    }

    fn snap(
        name: &str,
        last: u8,
        read_only: bool,
        master: Option<(&str, &str, &str)>,
    ) -> Result<Snapshot, String> {
        let slave = master.and_then(|(host, io, sql)| {
            SlaveStatus::from_rows(&parse_batch(&format!(
                "Master_Host\tMaster_Port\tSlave_IO_Running\tSlave_SQL_Running\tLast_IO_Error\tLast_SQL_Error\n{host}\t3306\t{io}\t{sql}\t\t\n"
            )))
        });
        Ok(Snapshot {
            name: name.into(),
            address: Ipv4Addr::new(10, 88, 0, last),
            read_only,
            current_pos: GtidPos::default(),
            slave_pos: GtidPos::default(),
            binlog_pos: GtidPos::default(),
            slave,
        })
    }

    #[test]
    fn a_switchover_waits_for_every_node_to_acknowledge_the_new_primary() {
        let nodes = ["s1", "s2", "s3"];
        let check = |rows: &str, want: &[&str]| {
            let rows = parse_batch(rows);
            assert_eq!(not_following(&rows, "s1", &nodes), want, "{rows:?}");
        };
        check("", &["s1", "s2", "s3"]);
        check("node\tprimary_node\ns1\ts1\n", &["s2", "s3"]);
        check("node\tprimary_node\ns1\ts1\ns2\ts2\ns3\ts1\n", &["s2"]);
        check("node\tprimary_node\ns1\ts1\ns2\ts1\ns3\ts1\n", &[]);
        check("node\tprimary_node\ns9\ts1\n", &["s1", "s2", "s3"]);
    }

    #[test]
    fn switchover_preconditions() {
        let ok = [
            snap("s1", 11, true, Some(("10.88.0.12", "Yes", "Yes"))),
            snap("s2", 12, false, None),
            snap("s3", 13, true, Some(("10.88.0.12", "Yes", "Yes"))),
        ];
        let plan = plan_switchover(&ok, "s1", 3306).unwrap();
        assert_eq!(
            plan,
            SwitchoverPlan {
                old_primary: "s2".into(),
                target: "s1".into(),
                others: vec!["s3".into()]
            }
        );
        let check = |nodes: &[Result<Snapshot, String>], target: &str, error: &str| {
            let e = plan_switchover(nodes, target, 3306).unwrap_err();
            assert!(e.contains(error), "{e} should contain {error}");
        };
        check(&ok, "s2", "already the primary");
        check(&ok, "s9", "no node `s9`");
        check(
            &[snap("s1", 11, false, None), snap("s2", 12, false, None)],
            "s1",
            "several nodes are writable (s1, s2)",
        );
        check(
            &[snap("s1", 11, true, None), snap("s2", 12, true, None)],
            "s1",
            "no node is writable",
        );
        check(
            &[
                snap("s1", 11, true, Some(("10.88.0.12", "Connecting", "Yes"))),
                snap("s2", 12, false, None),
            ],
            "s1",
            "not replicating cleanly",
        );
        check(
            &[
                snap("s1", 11, true, Some(("10.88.0.13", "Yes", "Yes"))),
                snap("s2", 12, false, None),
            ],
            "s1",
            "not from the primary",
        );
        check(
            &[snap("s1", 11, true, None), snap("s2", 12, false, None)],
            "s1",
            "does not replicate",
        );
        check(
            &[
                snap("s1", 11, true, None),
                Err("s2: connection refused".into()),
            ],
            "s1",
            "unreachable (s2: connection refused)",
        );
    }
}
