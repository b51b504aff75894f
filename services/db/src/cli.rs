//! `appliance db status` and `appliance db switchover`: every node's server seen over the
//! network as `tandem_admin` (TLS, the server's certificate verified against the cluster CA),
//! by the agent's configuration of this node.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::db::AgentStatus;
use cluster_config::DbRole;

use crate::agent::{self as dba, AgentConfig, Snapshot};
use crate::agent_run::{snapshot, write_option_file};
use crate::client::{Conn, SqlError};
use crate::repl::{self, Observation};
use crate::Error;

/// How long a switchover waits for the target to apply the primary's last transaction.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a switchover waits, once done, for every node's agent to publish the new primary
/// (an agent sees it within a tick or two of it replicating).
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a switchover looks for the agents' acknowledgements.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The agent's configuration in a node's run directory, as the node plan wrote it.
fn agent_config(run_dir: &Path) -> Result<AgentConfig, Error> {
    AgentConfig::read(&run_dir.join("etc").join(dba::AGENT_CONFIG_FILE))
}

/// The admin option file of this command, removed when it ends.
struct OptionFile(PathBuf);

impl OptionFile {
    fn new(cfg: &AgentConfig) -> OptionFile {
        OptionFile(
            cfg.private_dir
                .join(format!("admin-{}.cnf", std::process::id())),
        )
    }
}

impl Drop for OptionFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Admin connections to every node, through the option file `file`.
fn admin_conns(
    cfg: &AgentConfig,
    file: &OptionFile,
) -> Result<Vec<(String, Ipv4Addr, Conn)>, Error> {
    let secret = crate::files::read_secret(&cfg.secret_file)?;
    let password = dba::passwords(&secret).admin;
    crate::files::create_dir(&cfg.private_dir)?;
    write_option_file(&file.0, repl::ADMIN_USER, &password)?;
    Ok(cfg
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.address,
                Conn::remote(&file.0, &n.name, n.address, cfg.port, &cfg.ssl_ca),
            )
        })
        .collect())
}

/// The CA file `conn`'s server was started with.
fn server_ssl_ca(conn: &Conn) -> Result<String, SqlError> {
    match conn.value(repl::SSL_CA_SQL)? {
        Some(ca) if !ca.is_empty() && ca != "NULL" => Ok(ca),
        _ => Err(SqlError::Server {
            server: conn.label().to_string(),
            message: "the server has no ssl_ca: it was started without TLS".into(),
        }),
    }
}

/// `appliance db status [--state-dir DIR] [--json]` for the node whose run directory is
/// `run_dir`: this node's agent view and every node's server seen over the network. Exit 1
/// when anything is unhealthy or unreachable.
pub fn status(run_dir: &Path, json: bool) -> Result<ExitCode, Error> {
    let cfg = agent_config(run_dir)?;
    let agent: Option<AgentStatus> = fs::read_to_string(&cfg.status_file)
        .ok()
        .and_then(|t| AgentStatus::parse(&t).ok());
    let option_file = OptionFile::new(&cfg);
    let conns = admin_conns(&cfg, &option_file)?;
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

/// `appliance db switchover --to NODE [--state-dir DIR]` for the node whose run directory is
/// `run_dir`. At no moment are two servers writable: the old primary turns read-only first,
/// the target becomes writable only after it applied the old primary's last transaction, and
/// the old primary then replicates from it.
pub fn switchover(run_dir: &Path, to: &str) -> Result<ExitCode, Error> {
    let cfg = agent_config(run_dir)?;
    let option_file = OptionFile::new(&cfg);
    let conns = admin_conns(&cfg, &option_file)?;
    let conn = |name: &str| {
        conns
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, a, c)| (*a, c))
            .ok_or_else(|| {
                Error::Cluster(format!(
                    "switchover: no node `{name}` in the agent's configuration"
                ))
            })
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
    let passwords = dba::passwords(&crate::files::read_secret(&cfg.secret_file)?);
    let (old_addr, old) = conn(&plan.old_primary)?;
    let (target_addr, target) = conn(&plan.target)?;
    println!("switchover: {} -> {}", plan.old_primary, plan.target);

    // 1. No more writes anywhere.
    old.run(repl::FREEZE_SQL).map_err(|source| Error::Sql {
        step: "making the old primary read-only",
        source,
    })?;
    let last = snapshot(old, &plan.old_primary, old_addr);
    let unfreeze = |why: String| -> Result<ExitCode, Error> {
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
    target.run(repl::PROMOTE_SQL).map_err(|source| Error::Sql {
        step: "promoting the target",
        source,
    })?;
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
    follow(old).map_err(|source| Error::Sql {
        step: "making the old primary a replica of the new one",
        source,
    })?;
    for other in &plan.others {
        let repointed = match conn(other) {
            Ok((_, c)) => follow(c).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = repointed {
            eprintln!("switchover: warning: repointing {other}: {e} (its agent repoints it when it sees the new primary)");
        }
    }
    // 5. Record it; replication carries it to every agent, which persists it.
    target
        .run(&repl::record_primary_sql(&plan.target))
        .map_err(|source| Error::Sql {
            step: "recording the new primary",
            source,
        })?;
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
