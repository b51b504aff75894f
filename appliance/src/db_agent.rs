//! The database agent and the `appliance db` commands.
//!
//! `appliance db-agent --config run/etc/db-agent.json` is a supervised service started after
//! `mariadb` is ready (the supervisor itself never runs SQL: nobody waits for children inside
//! it). It applies the node's role once per start — on the primary the accounts, the
//! application database and the bookkeeping table; on a replica `read_only` and `CHANGE MASTER`
//! to the primary — and then watches: every [`TICK`] it reads the server's state and
//! `SHOW SLAVE STATUS`, decides health ([`db::repl::assess`]), writes `run/db-status.json` and
//! logs every change of role, health or error as an event (target `db`).
//!
//! The primary is the one `cluster.toml` names until a switchover. `appliance db switchover`
//! records the new primary in the replicated table `tandem.cluster_state`; every agent sees it
//! arrive through replication, persists it in `state/db-primary` (which the node plan and the
//! agent honour over the config from then on) and repoints its replica if needed.
//!
//! SQL goes through the `mariadb` client: as `root` over the local socket (`unix_socket`
//! authentication, no password) for the agent, as `tandem_admin` over TCP (password in a 0600
//! option file, never on a command line) for the cross-node commands.
//!
//! Every TCP connection is TLS with the cluster CA: the accounts `REQUIRE SSL`, replicas and
//! the cross-node commands verify the server's certificate (node certificates name the node's
//! address). The node plan gives the server its files (`crate::node`); on a developer machine
//! `crate::secrets::issue_dev_tls` makes them from a CA of its own first.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cluster_config::DbRole;
use api::db::{AgentStatus, PrimaryRef, Role};
use db::agent::{self as dba, AgentConfig, Snapshot};
use db::repl::{self, GtidPos, Health, Observation, SlaveStatus};

use crate::secrets::load_or_create_secret;

/// How often the agent looks at its server.
pub const TICK: Duration = Duration::from_secs(1);
/// Longest a single client invocation may take before it is killed.
const SQL_TIMEOUT: Duration = Duration::from_secs(15);
/// Least time between two restarts of a replica's stopped IO thread.
const REVIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a switchover waits for the target to apply the primary's last transaction.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a switchover waits, once done, for every node's agent to publish the new primary
/// (an agent sees it within a tick or two of it replicating).
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a switchover looks for the agents' acknowledgements.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// How soon an agent tries again to acknowledge its primary after a failure.
const ACK_RETRY: Duration = Duration::from_millis(500);
/// The agent's option file (admin account) in its private directory: acknowledgements go to
/// the primary over TCP.
const AGENT_ADMIN_OPTION_FILE: &str = "agent-admin.cnf";

// ---------------------------------------------------------------------------------------------
// Talking SQL

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{server}: {message}")]
    Server { server: String, message: String },
    #[error("{server}: no answer within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    #[error("running {}: {source}", db::CLIENT)]
    Spawn {
        #[source]
        source: std::io::Error,
    },
}

/// One server, reachable through the `mariadb` client.
#[derive(Debug, Clone)]
pub struct Conn {
    label: String,
    args: Vec<String>,
}

impl Conn {
    /// The local server as root over its Unix socket.
    pub fn local(socket: &Path) -> Conn {
        Conn {
            label: format!("local MariaDB ({})", socket.display()),
            args: vec![
                "--no-defaults".into(),
                "--protocol=SOCKET".into(),
                format!("--socket={}", socket.display()),
                "--user=root".into(),
            ],
        }
    }

    /// A node's server over TCP with the account in `option_file`, over TLS, its certificate
    /// verified against `ssl_ca` and its address.
    pub fn remote(
        option_file: &Path,
        name: &str,
        addr: std::net::Ipv4Addr,
        port: u16,
        ssl_ca: &Path,
    ) -> Conn {
        Conn {
            label: format!("{name} ({addr}:{port})"),
            args: vec![
                format!("--defaults-file={}", option_file.display()),
                "--protocol=TCP".into(),
                format!("--host={addr}"),
                format!("--port={port}"),
                "--connect-timeout=3".into(),
                "--ssl".into(),
                format!("--ssl-ca={}", ssl_ca.display()),
                "--ssl-verify-server-cert".into(),
            ],
        }
    }

    /// Runs `sql` (from stdin, so nothing shows in `ps`); returns batch output with headers.
    pub fn run(&self, sql: &str) -> Result<String, SqlError> {
        let mut child = Command::new(db::CLIENT)
            .args(&self.args)
            .arg("--batch")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SqlError::Spawn { source })?;
        let mut stdin = child.stdin.take();
        let sql = sql.to_string();
        let writer = std::thread::spawn(move || {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(sql.as_bytes());
            }
        });
        let readers = [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|e| Box::new(e) as _),
        ]
        .map(|pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_string(&mut text);
                }
                text
            })
        });
        let deadline = Instant::now() + SQL_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let _ = writer.join();
        let [out, err] = readers.map(|r| r.join().unwrap_or_default());
        match status {
            None => Err(SqlError::Timeout {
                server: self.label.clone(),
                timeout: SQL_TIMEOUT,
            }),
            Some(s) if s.success() => Ok(out),
            Some(_) => {
                let message = err
                    .lines()
                    .find(|l| l.starts_with("ERROR"))
                    .unwrap_or(err.trim())
                    .trim()
                    .to_string();
                Err(SqlError::Server {
                    server: self.label.clone(),
                    message,
                })
            }
        }
    }

    pub fn rows(&self, sql: &str) -> Result<Vec<BTreeMap<String, String>>, SqlError> {
        self.run(sql).map(|out| repl::parse_batch(&out))
    }

    /// The first column of the first row, if any.
    pub fn value(&self, sql: &str) -> Result<Option<String>, SqlError> {
        Ok(self
            .rows(sql)?
            .into_iter()
            .next()
            .and_then(|r| r.into_values().next()))
    }
}

/// The CA file `conn`'s server was started with.
fn server_ssl_ca(conn: &Conn) -> Result<String, SqlError> {
    match conn.value(repl::SSL_CA_SQL)? {
        Some(ca) if !ca.is_empty() && ca != "NULL" => Ok(ca),
        _ => Err(SqlError::Server {
            server: conn.label.clone(),
            message: "the server has no ssl_ca: it was started without TLS".into(),
        }),
    }
}

/// Server state plus `SHOW SLAVE STATUS` of one server.
fn snapshot(conn: &Conn, name: &str, address: std::net::Ipv4Addr) -> Result<Snapshot, String> {
    let rows = conn.rows(repl::STATE_SQL).map_err(|e| e.to_string())?;
    let row = rows
        .first()
        .ok_or_else(|| format!("{name}: empty answer"))?;
    let pos = |k: &str| {
        GtidPos::parse(row.get(k).map_or("", String::as_str))
            .map_err(|e| format!("{name}: {k}: {e}"))
    };
    let slave = SlaveStatus::from_rows(&conn.rows("SHOW SLAVE STATUS").map_err(|e| e.to_string())?);
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

// ---------------------------------------------------------------------------------------------
// Files

/// A new file holding a secret: mode 0600 from its creation (never readable by anyone else,
/// not even for a moment), then handed to `owner`.
fn write_private(
    path: &Path,
    bytes: &[u8],
    owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(&f, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The agent

/// `appliance db-agent --config FILE`: runs until killed.
pub fn agent_main(config_file: &Path) -> anyhow::Result<ExitCode> {
    let cfg = read_agent_config(config_file)?;
    let secret = load_or_create_secret(&cfg.secret_file)?;
    let passwords = dba::passwords(&secret);
    fs::create_dir_all(&cfg.private_dir)
        .with_context(|| format!("creating {}", cfg.private_dir.display()))?;
    let admin_file = cfg.private_dir.join(AGENT_ADMIN_OPTION_FILE);
    write_option_file(&admin_file, repl::ADMIN_USER, &passwords.admin)?;
    let acknowledge = spawn_acknowledger(&cfg, admin_file);
    let mut agent = Agent::new(cfg, passwords);
    tracing::info!(target: "db", node = %agent.cfg.node, primary = %agent.primary, "database agent started");
    loop {
        let status = agent.tick(crate::supervisor::now_ms());
        match write_status(&agent.cfg.status_file, &status) {
            // Published: the application follows it from its next write on.
            Ok(()) => {
                let _ = acknowledge.send(status.primary.clone());
            }
            Err(e) => {
                tracing::warn!(target: "db", error = %format!("{e:#}"), "cannot write the status file")
            }
        }
        std::thread::sleep(TICK);
    }
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
                    true => local.clone(),
                    false => Conn::remote(
                        &admin_file,
                        &primary.name,
                        primary.address,
                        primary.port,
                        &ssl_ca,
                    ),
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
fn write_option_file(path: &Path, user: &str, password: &str) -> anyhow::Result<()> {
    write_private(
        path,
        format!("[client]\nuser = {user}\npassword = {password}\n").as_bytes(),
        None,
    )
}

pub fn read_agent_config(path: &Path) -> anyhow::Result<AgentConfig> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading {} (is the node running?)", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a database agent configuration", path.display()))
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
            cluster_config::DbRole::Primary => Role::Primary,
            cluster_config::DbRole::Replica => Role::Replica,
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
        let caught_up = repl::caught_up(&snap.slave_pos, snap.slave.as_ref());
        let mut repoint = false;
        if let Some(recorded) =
            recorded.filter(|r| caught_up && *r != self.primary && self.cfg.address_of(r).is_some())
        {
            tracing::info!(target: "db", node = %self.cfg.node, from = %self.primary, to = %recorded, "primary changed by a switchover");
            crate::files::write_file(&self.cfg.primary_file, &format!("{recorded}\n"), 0o644)
                .map_err(|e| format!("persisting the new primary: {e:#}"))?;
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
                .map_err(|e| format!("setting up the {}: {e}", role.as_str()))?;
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

fn write_status(path: &Path, status: &AgentStatus) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut text = serde_json::to_string_pretty(status)?;
    text.push('\n');
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// `appliance db status` and `appliance db switchover`

/// The run directory of a node: below `--state-dir` for `appliance run`, else the image's.
fn run_dir(state_dir: Option<&Path>) -> PathBuf {
    match state_dir {
        Some(dir) => crate::layout::Layout::dev(dir).run,
        None => crate::layout::Layout::image().run,
    }
}

/// Admin connections to every node, by the agent's configuration of this node.
fn admin_conns(cfg: &AgentConfig) -> anyhow::Result<Vec<(String, std::net::Ipv4Addr, Conn)>> {
    let secret = load_or_create_secret(&cfg.secret_file)?;
    let password = dba::passwords(&secret).admin;
    fs::create_dir_all(&cfg.private_dir)
        .with_context(|| format!("creating {}", cfg.private_dir.display()))?;
    let option_file = cfg
        .private_dir
        .join(format!("admin-{}.cnf", std::process::id()));
    write_option_file(&option_file, repl::ADMIN_USER, &password)?;
    Ok(cfg
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.address,
                Conn::remote(&option_file, &n.name, n.address, cfg.port, &cfg.ssl_ca),
            )
        })
        .collect())
}

/// Removes the admin option file when the command ends.
struct OptionFileGuard(PathBuf);

impl Drop for OptionFileGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn option_guard(cfg: &AgentConfig) -> OptionFileGuard {
    OptionFileGuard(
        cfg.private_dir
            .join(format!("admin-{}.cnf", std::process::id())),
    )
}

/// `appliance db status [--state-dir DIR] [--json]`: this node's agent view and every node's
/// server seen over the network. Exit 1 when anything is unhealthy or unreachable.
pub fn status(state_dir: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    let run = run_dir(state_dir);
    let cfg = read_agent_config(&run.join("etc").join(dba::AGENT_CONFIG_FILE))?;
    let agent: Option<AgentStatus> = fs::read_to_string(&cfg.status_file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let _guard = option_guard(&cfg);
    let conns = admin_conns(&cfg)?;
    let nodes: Vec<Result<Snapshot, String>> = conns
        .iter()
        .map(|(name, addr, conn)| snapshot(conn, name, *addr))
        .collect();
    let max_lag = Duration::from_millis(cfg.max_lag_ms);
    let primary = agent.as_ref().map(|a| a.primary.clone());
    let mut ok = agent.as_ref().is_some_and(|a| a.healthy);
    let mut rows = Vec::new();
    for (node, (name, addr, _)) in nodes.iter().zip(&conns) {
        let row = match node {
            Ok(s) => {
                let role = if s.read_only {
                    DbRole::Replica
                } else {
                    DbRole::Primary
                };
                let p = primary
                    .as_ref()
                    .map_or((*addr, cfg.port), |p| (p.address, p.port));
                let h = repl::assess(
                    role,
                    p,
                    &Observation {
                        read_only: s.read_only,
                        slave: s.slave.clone(),
                    },
                    max_lag,
                );
                ok &= h.healthy;
                serde_json::json!({
                    "name": name, "address": addr.to_string(), "reachable": true, "role": role.as_str(),
                    "read_only": s.read_only, "healthy": h.healthy, "lag_s": h.lag_s, "error": h.error,
                    "io_running": s.slave.as_ref().map(|x| x.io_running.clone()),
                    "sql_running": s.slave.as_ref().map(|x| x.sql_running),
                    "master": s.slave.as_ref().map(|x| format!("{}:{}", x.master_host, x.master_port)),
                    "gtid_current_pos": s.current_pos.to_string(), "gtid_slave_pos": s.slave_pos.to_string(),
                    "gtid_binlog_pos": s.binlog_pos.to_string(),
                })
            }
            Err(e) => {
                ok = false;
                serde_json::json!({"name": name, "address": addr.to_string(), "reachable": false, "healthy": false, "error": e})
            }
        };
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::json!({"agent": agent, "nodes": rows}));
    } else {
        match &agent {
            Some(a) => println!(
                "this node: {} ({}), {}, primary {} ({}:{}){}",
                a.node,
                a.role.as_str(),
                if a.healthy { "healthy" } else { "UNHEALTHY" },
                a.primary.name,
                a.primary.address,
                a.primary.port,
                a.error
                    .as_ref()
                    .map(|e| format!("\n  error: {e}"))
                    .unwrap_or_default()
            ),
            None => println!("this node: no status from the database agent (is it running?)"),
        }
        println!(
            "{:<12} {:<16} {:<8} {:<9} {:<10} {:<5} {:<5} {:<18} {:<18}",
            "NODE", "ADDRESS", "ROLE", "HEALTHY", "IO", "SQL", "LAG", "GTID_CURRENT", "GTID_SLAVE"
        );
        for r in &rows {
            let s = |k: &str| match &r[k] {
                serde_json::Value::Null => "-".to_string(),
                serde_json::Value::String(s) if s.is_empty() => "-".to_string(),
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            println!(
                "{:<12} {:<16} {:<8} {:<9} {:<10} {:<5} {:<5} {:<18} {:<18}",
                s("name"),
                s("address"),
                s("role"),
                s("healthy"),
                s("io_running"),
                s("sql_running"),
                s("lag_s"),
                s("gtid_current_pos"),
                s("gtid_slave_pos")
            );
            if r["error"].is_string() {
                println!("  {}: {}", s("name"), s("error"));
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `appliance db switchover --to NODE [--state-dir DIR]`. At no moment are two servers
/// writable: the old primary turns read-only first, the target becomes writable only after it
/// applied the old primary's last transaction, and the old primary then replicates from it.
pub fn switchover(state_dir: Option<&Path>, to: &str) -> anyhow::Result<ExitCode> {
    let run = run_dir(state_dir);
    let cfg = read_agent_config(&run.join("etc").join(dba::AGENT_CONFIG_FILE))?;
    let _guard = option_guard(&cfg);
    let conns = admin_conns(&cfg)?;
    let conn = |name: &str| {
        conns
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, a, c)| (*a, c))
            .expect("planned nodes exist")
    };
    let nodes: Vec<Result<Snapshot, String>> = conns
        .iter()
        .map(|(name, addr, c)| snapshot(c, name, *addr))
        .collect();
    let plan = match dba::plan_switchover(&nodes, to, cfg.port) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("switchover: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let passwords = dba::passwords(&load_or_create_secret(&cfg.secret_file)?);
    let (old_addr, old) = conn(&plan.old_primary);
    let (target_addr, target) = conn(&plan.target);
    println!("switchover: {} -> {}", plan.old_primary, plan.target);

    // 1. No more writes anywhere.
    old.run(repl::FREEZE_SQL)
        .context("making the old primary read-only")?;
    let last = snapshot(old, &plan.old_primary, old_addr).map_err(anyhow::Error::msg);
    let unfreeze = |why: String| -> anyhow::Result<ExitCode> {
        let undo = old.run(repl::UNFREEZE_SQL);
        eprintln!(
            "switchover: refusing: {why}; {} stays the primary{}",
            plan.old_primary,
            undo.err()
                .map(|e| format!(" (but making it writable again failed: {e})"))
                .unwrap_or_default()
        );
        Ok(ExitCode::from(1))
    };
    let last = match last {
        Ok(s) => s.binlog_pos,
        Err(e) => return unfreeze(format!("reading the old primary's position: {e}")),
    };
    // 2. The target must apply everything the old primary wrote.
    match target.value(&repl::wait_for_gtid_sql(&last, CATCH_UP_TIMEOUT)) {
        Ok(Some(v)) if v == "0" => {}
        Ok(v) => {
            return unfreeze(format!(
                "{} did not apply {last} within {CATCH_UP_TIMEOUT:?} (got {v:?})",
                plan.target
            ))
        }
        Err(e) => return unfreeze(format!("waiting for {}: {e}", plan.target)),
    }
    match snapshot(target, &plan.target, target_addr) {
        Ok(s) if s.current_pos.includes(&last) => {}
        Ok(s) => {
            return unfreeze(format!(
                "{} is at {} and lacks {last}",
                plan.target, s.current_pos
            ))
        }
        Err(e) => return unfreeze(e),
    }
    println!(
        "switchover: {} applied everything up to {last}",
        plan.target
    );
    // 3. Promote the target; 4. the old primary and every other replica follow it.
    target
        .run(repl::PROMOTE_SQL)
        .context("promoting the target")?;
    // Each server checks the new primary's certificate against its own CA file.
    let follow = |c: &Conn| -> Result<(), SqlError> {
        let ca = server_ssl_ca(c)?;
        c.run(&repl::replica_setup_sql(
            (target_addr, cfg.port),
            &passwords.replication,
            &ca,
        ))
        .map(drop)
    };
    follow(old).context("making the old primary a replica of the new one")?;
    for other in &plan.others {
        if let Err(e) = follow(conn(other).1) {
            eprintln!("switchover: warning: repointing {other}: {e} (its agent repoints it when it sees the new primary)");
        }
    }
    // 5. Record it; replication carries it to every agent, which persists it.
    target
        .run(&repl::record_primary_sql(&plan.target))
        .context("recording the new primary")?;
    println!(
        "switchover: {} is the primary; {} replicates from it",
        plan.target, plan.old_primary
    );
    // 6. Return once every node's agent published it: each application reads the published
    // primary at every write (and holds writes that meet a read-only server until then).
    let names: Vec<&str> = cfg.nodes.iter().map(|n| n.name.as_str()).collect();
    println!(
        "switchover: waiting up to {FOLLOW_TIMEOUT:?} for every node's application to follow {}",
        plan.target
    );
    let started = Instant::now();
    let mut waiting = names.clone();
    let mut last_error = None;
    loop {
        match target.rows(&repl::followers_sql()) {
            Ok(rows) => {
                let still = dba::not_following(&rows, &plan.target, &names);
                for done in waiting.iter().filter(|n| !still.contains(n)) {
                    println!(
                        "switchover: {done} follows {} ({:.1} s)",
                        plan.target,
                        started.elapsed().as_secs_f64()
                    );
                }
                waiting = still;
            }
            Err(e) => last_error = Some(e.to_string()),
        }
        if waiting.is_empty() {
            break;
        }
        if started.elapsed() >= FOLLOW_TIMEOUT {
            eprintln!(
                "switchover: {} is the primary, but {} did not follow it within {FOLLOW_TIMEOUT:?} (is its db-agent running?{}); writes through {} fail until {}",
                plan.target,
                waiting.join(", "),
                last_error.map(|e| format!(" last error: {e}")).unwrap_or_default(),
                if waiting.len() == 1 { "its application" } else { "their applications" },
                if waiting.len() == 1 { "it does" } else { "they do" },
            );
            return Ok(ExitCode::from(1));
        }
        std::thread::sleep(FOLLOW_POLL);
    }
    println!(
        "switchover: done, {} is the primary and every node's application follows it",
        plan.target
    );
    Ok(ExitCode::SUCCESS)
}
