//! The database agent: `appliance db-agent --config run/etc/db-agent.json` is a supervised
//! service started after `mariadb` is ready (the supervisor itself never runs SQL: nobody waits
//! for children inside it). It applies the node's role once per start — on the primary the
//! accounts, the application database and the bookkeeping table; on a replica `read_only` and
//! `CHANGE MASTER` to the primary — and then watches: every [`TICK`] it reads the server's
//! state and `SHOW SLAVE STATUS`, decides health ([`crate::repl::assess`]), writes
//! `run/db-status.json` and logs every change of role, health or error as an event (target
//! `db`).
//!
//! The primary is the one `cluster.toml` names until a switchover. `appliance db switchover`
//! ([`crate::cli::switchover`]) records the new primary in the replicated table
//! `tandem.cluster_state`; every agent sees it arrive through replication, persists it in
//! `state/db-primary` (which the node plan and the agent honour over the config from then on)
//! and repoints its replica if needed.
//!
//! SQL goes through the `mariadb` client ([`crate::client`] says which statements and why).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::db::{AgentStatus, PrimaryRef, Role};
use cluster_config::DbRole;

use crate::agent::{self as dba, AgentConfig, Snapshot};
use crate::client::{Conn, SqlError};
use crate::files::{create_dir, read_secret, write_file, write_private};
use crate::repl::{self, GtidPos, Health, Observation, SlaveStatus};
use crate::Error;

/// How often the agent looks at its server.
pub const TICK: Duration = Duration::from_secs(1);
/// Least time between two restarts of a replica's stopped IO thread.
const REVIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How soon an agent tries again to acknowledge its primary after a failure.
const ACK_RETRY: Duration = Duration::from_millis(500);
/// Longest a poll waits for the local replica to apply what it fetched before acting on a
/// switchover recorded in the bookkeeping table ([`Agent::caught_up`]).
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);
/// The agent's option file (admin account) in its private directory: acknowledgements go to
/// the primary over TCP.
const AGENT_ADMIN_OPTION_FILE: &str = "agent-admin.cnf";

/// `appliance db-agent --config FILE`: runs until killed; returns only when it cannot start.
pub fn run(config_file: &Path) -> Result<(), Error> {
    let cfg = AgentConfig::read(config_file)?;
    let secret = read_secret(&cfg.secret_file)?;
    let passwords = dba::passwords(&secret);
    create_dir(&cfg.private_dir)?;
    let admin_file = cfg.private_dir.join(AGENT_ADMIN_OPTION_FILE);
    write_option_file(&admin_file, repl::ADMIN_USER, &passwords.admin)?;
    let acknowledge = spawn_acknowledger(&cfg, admin_file);
    let mut agent = Agent::new(cfg, passwords);
    tracing::info!(target: "db", node = %agent.cfg.node, primary = %agent.primary, "database agent started");
    loop {
        let status = agent.tick(now_ms());
        match write_status(&agent.cfg.status_file, &status) {
            // Published: the application follows it from its next write on.
            Ok(()) => {
                let _ = acknowledge.send(status.primary.clone());
            }
            Err(e) => {
                tracing::warn!(target: "db", error = %e, "cannot write the status file")
            }
        }
        std::thread::sleep(TICK);
    }
}

/// Milliseconds since the Unix epoch (a clock before 1970 reads 0).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl AgentConfig {
    /// Reads the configuration the node plan wrote ([`dba::AGENT_CONFIG_FILE`]).
    pub fn read(path: &Path) -> Result<AgentConfig, Error> {
        let text = fs::read_to_string(path).map_err(Error::io(
            "reading the database agent's configuration (is the node running?)",
            path,
        ))?;
        serde_json::from_str(&text).map_err(|e| Error::Invalid {
            path: path.to_path_buf(),
            detail: format!("not a database agent configuration: {e}"),
        })
    }
}

/// Server state plus `SHOW SLAVE STATUS` of one server. The slave status is read first, so the
/// applied position read after it is compared with a fetched position no newer than itself
/// ([`repl::caught_up`]).
pub(crate) fn snapshot(
    conn: &Conn,
    name: &str,
    address: std::net::Ipv4Addr,
) -> Result<Snapshot, String> {
    let slave = SlaveStatus::from_rows(&conn.rows("SHOW SLAVE STATUS").map_err(|e| e.to_string())?);
    let rows = conn.rows(repl::STATE_SQL).map_err(|e| e.to_string())?;
    let row = rows
        .first()
        .ok_or_else(|| format!("{name}: empty answer"))?;
    let pos = |k: &str| {
        GtidPos::parse(row.get(k).map_or("", String::as_str))
            .map_err(|e| format!("{name}: {k}: {e}"))
    };
    Ok(Snapshot {
        name: name.to_string(),
        address,
        read_only: row.get("read_only").is_some_and(|v| v == "1"),
        current_pos: pos("current_pos")?,
        slave_pos: pos("slave_pos")?,
        binlog_pos: pos("binlog_pos")?,
        slave,
    })
}

/// A thread that records, on the primary, which primary this node's status file names
/// ([`repl::record_follow_sql`]): how a switchover knows every node's application follows.
/// Fed the published primary after every status write; tries again every [`ACK_RETRY`] until
/// it succeeds, off the agent's loop so an unreachable primary never delays a status.
fn spawn_acknowledger(
    cfg: &AgentConfig,
    admin_file: PathBuf,
) -> std::sync::mpsc::Sender<PrimaryRef> {
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::channel::<PrimaryRef>();
    let node = cfg.node.clone();
    let local = Conn::local(&cfg.socket);
    let ssl_ca = cfg.ssl_ca.clone();
    let spawned = std::thread::Builder::new()
        .name("acknowledge".into())
        .spawn(move || {
            let mut acked: Option<PrimaryRef> = None;
            let mut want: Option<PrimaryRef> = None;
            // The current remote primary's connection, kept while it stays the primary.
            let mut remote: Option<(PrimaryRef, Conn)> = None;
            loop {
                let next = match want != acked {
                    true => rx.recv_timeout(ACK_RETRY),
                    false => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                };
                match next {
                    Ok(p) => want = Some(rx.try_iter().last().unwrap_or(p)),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                let Some(primary) = want.as_ref().filter(|w| acked.as_ref() != Some(*w)) else {
                    continue;
                };
                let conn = match primary.name == node {
                    true => &local,
                    false => {
                        if remote.as_ref().is_none_or(|(p, _)| p != primary) {
                            remote = Some((
                                primary.clone(),
                                Conn::remote(
                                    &admin_file,
                                    &primary.name,
                                    primary.address,
                                    primary.port,
                                    &ssl_ca,
                                ),
                            ));
                        }
                        match &remote {
                            Some((_, c)) => c,
                            None => continue,
                        }
                    }
                };
                match conn.run(&repl::record_follow_sql(&node, &primary.name)) {
                    Ok(_) => {
                        tracing::info!(target: "db", node = %node, primary = %primary.name, "acknowledged the primary");
                        acked = want.clone();
                    }
                    Err(e) => {
                        tracing::debug!(target: "db", node = %node, primary = %primary.name, error = %e, "acknowledging the primary failed; trying again")
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(target: "db", error = %e, "cannot start the acknowledging thread; switchovers will wait for this node in vain");
    }
    tx
}

/// A client option file with an account's password: 0600 from its creation.
pub(crate) fn write_option_file(path: &Path, user: &str, password: &str) -> Result<(), Error> {
    write_private(
        path,
        format!("[client]\nuser = {user}\npassword = {password}\n").as_bytes(),
    )
}

struct Agent {
    cfg: AgentConfig,
    passwords: repl::Passwords,
    local: Conn,
    primary: String,
    /// The role was applied since this agent started.
    set_up: bool,
    /// When the agent last restarted a stopped IO thread.
    revived: Option<Instant>,
    /// Role, health and error of the last event, to log changes only.
    reported: Option<(String, bool, Option<String>)>,
}

impl Agent {
    fn new(cfg: AgentConfig, passwords: repl::Passwords) -> Agent {
        let persisted = fs::read_to_string(&cfg.primary_file).ok();
        let names: Vec<&str> = cfg.nodes.iter().map(|n| n.name.as_str()).collect();
        let primary =
            dba::effective_primary(&cfg.config_primary, persisted.as_deref(), &names).to_string();
        let local = Conn::local(&cfg.socket);
        Agent {
            cfg,
            passwords,
            local,
            primary,
            set_up: false,
            revived: None,
            reported: None,
        }
    }

    fn primary_ref(&self) -> PrimaryRef {
        let address = self
            .cfg
            .address_of(&self.primary)
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        PrimaryRef {
            name: self.primary.clone(),
            address,
            port: self.cfg.port,
        }
    }

    fn tick(&mut self, now_ms: i64) -> AgentStatus {
        let mut seen = None;
        let health = match self.observe_and_converge() {
            Ok((snap, health)) => {
                seen = Some(snap);
                health
            }
            Err(e) => Health::unhealthy(e),
        };
        let role = match self.cfg.role(&self.cfg.node, &self.primary) {
            DbRole::Primary => Role::Primary,
            DbRole::Replica => Role::Replica,
        };
        self.report(role.as_str(), &health);
        let slave = seen.as_ref().and_then(|s| s.slave.clone());
        AgentStatus {
            node: self.cfg.node.clone(),
            role,
            primary: self.primary_ref(),
            healthy: health.healthy,
            error: health.error,
            lag_s: health.lag_s,
            read_only: seen.as_ref().map(|s| s.read_only),
            io_running: slave.as_ref().map(|s| s.io_running.clone()),
            sql_running: slave.as_ref().map(|s| s.sql_running),
            gtid_current_pos: seen.as_ref().map(|s| s.current_pos.to_string()),
            gtid_slave_pos: seen.as_ref().map(|s| s.slave_pos.to_string()),
            gtid_binlog_pos: seen.as_ref().map(|s| s.binlog_pos.to_string()),
            updated_ms: now_ms,
        }
    }

    /// Whether the local server has applied everything its IO thread had fetched when `snap`
    /// was taken: at once when `snap` says so, else once the SQL thread gets there within
    /// [`CATCH_UP_WAIT`] (`MASTER_GTID_WAIT`). Under a stream of writes the fetched position
    /// is usually ahead of the applied one by a few transactions at any instant, so comparing
    /// the two alone could defer noticing a switchover for many polls.
    fn caught_up(&self, snap: &Snapshot) -> bool {
        if repl::caught_up(&snap.slave_pos, snap.slave.as_ref()) {
            return true;
        }
        let Some(fetched) = snap
            .slave
            .as_ref()
            .and_then(|s| GtidPos::parse(&s.gtid_io_pos).ok())
        else {
            return false;
        };
        self.local
            .value(&repl::wait_for_gtid_sql(&fetched, CATCH_UP_WAIT))
            .is_ok_and(|v| v.as_deref() == Some("0"))
    }

    fn observe_and_converge(&mut self) -> Result<(Snapshot, Health), String> {
        let me = self
            .cfg
            .address_of(&self.cfg.node)
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        let mut snap = snapshot(&self.local, &self.cfg.node, me)?;
        // A switchover elsewhere arrives as a row in the replicated bookkeeping table.
        let recorded = self
            .local
            .value(&repl::recorded_primary_sql())
            .ok()
            .flatten();
        let mut repoint = false;
        if let Some(recorded) = recorded
            .filter(|r| *r != self.primary && self.cfg.address_of(r).is_some())
            .filter(|_| self.caught_up(&snap))
        {
            tracing::info!(target: "db", node = %self.cfg.node, from = %self.primary, to = %recorded, "primary changed by a switchover");
            write_file(&self.cfg.primary_file, &format!("{recorded}\n"), 0o644)
                .map_err(|e| format!("persisting the new primary: {e}"))?;
            self.primary = recorded;
            repoint = true;
        }
        let role = self.cfg.role(&self.cfg.node, &self.primary);
        let primary = self.primary_ref();
        let misdirected = role == DbRole::Replica
            && snap.slave.as_ref().is_none_or(|s| {
                s.master_host != primary.address.to_string() || s.master_port != primary.port
            });
        if !self.set_up || (repoint && misdirected) {
            let sql = match role {
                DbRole::Primary => {
                    repl::primary_setup_sql(&self.cfg.account_host, &self.passwords, &self.cfg.node)
                }
                DbRole::Replica => repl::replica_setup_sql(
                    (primary.address, primary.port),
                    &self.passwords.replication,
                    &self.cfg.ssl_ca.display().to_string(),
                ),
            };
            self.local
                .run(&sql)
                .map_err(|e: SqlError| format!("setting up the {}: {e}", role.as_str()))?;
            tracing::info!(target: "db", node = %self.cfg.node, role = role.as_str(), primary = %primary.name, "role applied");
            self.set_up = true;
            snap = snapshot(&self.local, &self.cfg.node, me)?;
        } else if role == DbRole::Replica
            && repl::io_thread_gave_up(snap.slave.as_ref())
            && self.revived.is_none_or(|t| t.elapsed() >= REVIVE_INTERVAL)
        {
            tracing::warn!(target: "db", node = %self.cfg.node, error = snap.slave.as_ref().map_or("", |s| s.last_io_error.as_str()), "replication IO thread stopped; starting it again");
            self.revived = Some(Instant::now());
            self.local
                .run("START SLAVE IO_THREAD;\n")
                .map_err(|e| format!("restarting the IO thread: {e}"))?;
        }
        let observation = Observation {
            read_only: snap.read_only,
            slave: snap.slave.clone(),
        };
        let health = repl::assess(
            role,
            (primary.address, primary.port),
            &observation,
            Duration::from_millis(self.cfg.max_lag_ms),
        );
        Ok((snap, health))
    }

    fn report(&mut self, role: &str, health: &Health) {
        let key = (role.to_string(), health.healthy, health.error.clone());
        if self.reported.as_ref() == Some(&key) {
            return;
        }
        let node = &self.cfg.node;
        let error = health.error.as_deref().unwrap_or("");
        if health.healthy {
            tracing::info!(target: "db", node = %node, role, healthy = true, lag_s = health.lag_s, error, "database healthy");
        } else {
            tracing::warn!(target: "db", node = %node, role, healthy = false, lag_s = health.lag_s, error, "database unhealthy");
        }
        self.reported = Some(key);
    }
}

/// Publishes `status` whole (temporary file, then rename): readers never see half of one.
fn write_status(path: &Path, status: &AgentStatus) -> Result<(), Error> {
    let mut text = serde_json::to_string_pretty(status).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        detail: format!("encoding the status: {e}"),
    })?;
    text.push('\n');
    api::fsio::write_atomic(path, text.as_bytes(), 0o644, None).map_err(Error::io("writing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_configuration_is_read_back_or_named_when_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = cluster_config::Cluster::default_cluster();
        let cfg = AgentConfig::for_node(
            &cluster,
            "server1",
            dba::AgentPaths {
                socket: dir.path().join("mysqld.sock"),
                secret_file: dir.path().join("cluster.secret"),
                primary_file: dir.path().join(dba::PRIMARY_FILE),
                status_file: dir.path().join(api::db::STATUS_FILE),
                private_dir: dir.path().join("db-agent"),
                ssl_ca: dir.path().join("tls-ca.pem"),
            },
        );
        let path = dir.path().join(dba::AGENT_CONFIG_FILE);
        fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        assert_eq!(AgentConfig::read(&path).unwrap(), cfg);
        fs::write(&path, "{}").unwrap();
        let e = AgentConfig::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("db-agent.json: not a database agent configuration"),
            "{e}"
        );
        let e = AgentConfig::read(&dir.path().join("absent.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("absent.json") && e.contains("is the node running?"),
            "{e}"
        );
    }

    #[test]
    fn the_status_is_published_whole_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(api::db::STATUS_FILE);
        let status = AgentStatus {
            node: "server1".into(),
            role: Role::Replica,
            primary: PrimaryRef {
                name: "server2".into(),
                address: "10.88.0.12".parse().unwrap(),
                port: 3306,
            },
            healthy: true,
            error: None,
            lag_s: Some(0),
            read_only: Some(true),
            io_running: Some("Yes".into()),
            sql_running: Some(true),
            gtid_current_pos: Some("0-2-7".into()),
            gtid_slave_pos: Some("0-2-7".into()),
            gtid_binlog_pos: Some(String::new()),
            updated_ms: 1,
        };
        write_status(&path, &status).unwrap();
        let back = AgentStatus::parse(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, status);
        assert!(!path.with_extension("json.tmp").exists());
    }
}
