//! Replication, the pure part: GTID positions and their comparison, the client's batch output
//! and `SHOW SLAVE STATUS`, the health decision, and the SQL that sets roles up.
//!
//! Everything here is plain data in, plain data out; the agent and the CLI run the statements
//! (through the `mariadb` client) and feed the answers back in.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use cluster_config::{DbRole, Ipv4Net};

/// Replicas connect with this user (REPLICATION SLAVE only).
pub const REPL_USER: &str = "tandem_repl";
/// The application's user: its own database only.
pub const APP_USER: &str = "tandem_app";
/// Cluster administration across nodes (`db status`, `db switchover`).
pub const ADMIN_USER: &str = "tandem_admin";
/// The application's database.
pub const APP_DATABASE: &str = "app";
/// Tandem's own bookkeeping: `tandem.cluster_state` holds the current primary, written on the
/// primary and replicated, so every node learns a switchover through replication itself.
pub const META_DATABASE: &str = "tandem";
/// `tandem.node_primary`: per node, the primary its agent publishes (and so the application on
/// the node writes to), written by that agent on the primary and replicated. A switchover
/// empties it and waits until every node is back in it naming the new primary.
pub const FOLLOWS_TABLE: &str = "node_primary";
/// Seconds between a replica's connection attempts to an unreachable primary.
pub const CONNECT_RETRY_S: u32 = 1;
/// Heartbeat from primary to replica, so a silent primary is noticed.
pub const HEARTBEAT_S: u32 = 1;

// ---------------------------------------------------------------------------------------------
// GTID positions

/// A GTID position as MariaDB prints it (`0-2-15,1-3-7`): per replication domain, the last
/// transaction's server id and sequence number. In `gtid_strict_mode` sequence numbers only grow
/// within a domain, so "has applied" is a per-domain comparison of sequence numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GtidPos(pub BTreeMap<u32, (u32, u64)>);

impl GtidPos {
    /// Parses MariaDB's `domain-server-sequence[,…]` form (empty: no transaction yet).
    pub fn parse(text: &str) -> Result<GtidPos, String> {
        let mut map = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let nums: Vec<&str> = part.split('-').collect();
            let bad = || format!("`{part}` is not a GTID (domain-server-sequence)");
            let [d, s, n] = nums.as_slice() else {
                return Err(bad());
            };
            let domain: u32 = d.parse().map_err(|_| bad())?;
            let server: u32 = s.parse().map_err(|_| bad())?;
            let seq: u64 = n.parse().map_err(|_| bad())?;
            if map.insert(domain, (server, seq)).is_some() {
                return Err(format!("domain {domain} appears twice in `{text}`"));
            }
        }
        Ok(GtidPos(map))
    }

    /// Whether a server at `self` has applied every transaction up to `other`.
    pub fn includes(&self, other: &GtidPos) -> bool {
        other
            .0
            .iter()
            .all(|(domain, (_, seq))| self.0.get(domain).is_some_and(|(_, mine)| mine >= seq))
    }

    /// Transactions of `other` not yet in `self`, summed over domains (0 when included).
    pub fn behind(&self, other: &GtidPos) -> u64 {
        other
            .0
            .iter()
            .map(|(domain, (_, seq))| seq.saturating_sub(self.0.get(domain).map_or(0, |(_, s)| *s)))
            .sum()
    }
}

impl std::fmt::Display for GtidPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(d, (s, n))| format!("{d}-{s}-{n}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

// ---------------------------------------------------------------------------------------------
// Client output

/// Rows of `mariadb --batch` output (with the header line): tab-separated, `\t`, `\n`, `\\`
/// and `\0` escaped, `NULL` for SQL NULL (kept as the text `NULL`).
pub fn parse_batch(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let names: Vec<String> = header.split('\t').map(unescape).collect();
    lines
        .filter(|l| !l.is_empty())
        .map(|line| {
            names
                .iter()
                .cloned()
                .zip(line.split('\t').map(unescape))
                .collect()
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('0') => out.push('\0'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// The part of `SHOW SLAVE STATUS` that health and switchover decisions need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlaveStatus {
    pub master_host: String,
    pub master_port: u16,
    /// `Yes`, `No` or `Connecting`.
    pub io_running: String,
    pub sql_running: bool,
    /// `None` when the server does not know (`NULL`: a thread is not running).
    pub seconds_behind: Option<u64>,
    pub last_io_error: String,
    pub last_sql_error: String,
    pub gtid_io_pos: String,
}

impl SlaveStatus {
    /// From the rows of `SHOW SLAVE STATUS` in batch form; `None` when no primary is configured.
    pub fn from_rows(rows: &[BTreeMap<String, String>]) -> Option<SlaveStatus> {
        let row = rows.first()?;
        let get = |k: &str| row.get(k).cloned().unwrap_or_default();
        Some(SlaveStatus {
            master_host: get("Master_Host"),
            master_port: get("Master_Port").parse().unwrap_or(0),
            io_running: get("Slave_IO_Running"),
            sql_running: get("Slave_SQL_Running") == "Yes",
            seconds_behind: get("Seconds_Behind_Master").parse().ok(),
            last_io_error: get("Last_IO_Error"),
            last_sql_error: get("Last_SQL_Error"),
            gtid_io_pos: get("Gtid_IO_Pos"),
        })
    }

    /// Whether the IO thread is connected to the primary (`Slave_IO_Running: Yes`).
    pub fn io_running(&self) -> bool {
        self.io_running == "Yes"
    }
}

/// Whether a replica has applied everything its IO thread fetched (trivially so for a server
/// that replicates from nobody). A replica catching up replays old rows of the bookkeeping
/// table too; it acts on the recorded primary only once caught up.
pub fn caught_up(applied: &GtidPos, slave: Option<&SlaveStatus>) -> bool {
    slave.is_none_or(|s| {
        GtidPos::parse(&s.gtid_io_pos).is_ok_and(|fetched| applied.includes(&fetched))
    })
}

/// Whether the IO thread stopped on an error by itself (some connection errors end it instead
/// of being retried) while the SQL thread runs, as opposed to a deliberate `STOP SLAVE`, which
/// stops both. The agent restarts such a thread.
pub fn io_thread_gave_up(slave: Option<&SlaveStatus>) -> bool {
    slave.is_some_and(|s| s.io_running == "No" && s.sql_running && !s.last_io_error.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Health

/// What one look at the local server found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub read_only: bool,
    pub slave: Option<SlaveStatus>,
}

/// The verdict on a node's database, as reported in events and `db status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    pub lag_s: Option<u64>,
    /// Why it is unhealthy; `None` when healthy.
    pub error: Option<String>,
}

impl Health {
    /// Unhealthy for `error`, nothing else known.
    pub fn unhealthy(error: impl Into<String>) -> Health {
        Health {
            healthy: false,
            lag_s: None,
            error: Some(error.into()),
        }
    }
}

/// A primary is healthy when writable and replicating from nobody; a replica when read-only,
/// both threads run, no error is recorded and it lags at most `max_lag` behind `primary`.
pub fn assess(
    role: DbRole,
    primary: (Ipv4Addr, u16),
    seen: &Observation,
    max_lag: Duration,
) -> Health {
    match role {
        DbRole::Primary => {
            if seen.read_only {
                return Health::unhealthy("primary is read-only");
            }
            if let Some(s) = seen
                .slave
                .as_ref()
                .filter(|s| s.io_running != "No" || s.sql_running)
            {
                return Health::unhealthy(format!(
                    "primary still replicates from {}:{}",
                    s.master_host, s.master_port
                ));
            }
            Health {
                healthy: true,
                lag_s: None,
                error: None,
            }
        }
        DbRole::Replica => {
            let Some(s) = &seen.slave else {
                return Health::unhealthy("replication is not configured");
            };
            let lag_s = s.seconds_behind;
            let mut problems = Vec::new();
            if !seen.read_only {
                problems.push("replica is writable".to_string());
            }
            if (s.master_host.as_str(), s.master_port)
                != (primary.0.to_string().as_str(), primary.1)
            {
                problems.push(format!(
                    "replicates from {}:{}, not the primary {}:{}",
                    s.master_host, s.master_port, primary.0, primary.1
                ));
            }
            if !s.io_running() {
                let state = if s.io_running == "Connecting" {
                    "connecting to the primary"
                } else {
                    "IO thread stopped"
                };
                problems.push(match s.last_io_error.as_str() {
                    "" => state.to_string(),
                    e => format!("{state}: {e}"),
                });
            }
            if !s.sql_running {
                problems.push(match s.last_sql_error.as_str() {
                    "" => "SQL thread stopped".to_string(),
                    e => format!("SQL thread stopped: {e}"),
                });
            } else if !s.last_sql_error.is_empty() {
                problems.push(format!("SQL error: {}", s.last_sql_error));
            }
            if let Some(lag) = lag_s.filter(|l| Duration::from_secs(*l) > max_lag) {
                problems.push(format!(
                    "lags {lag} s behind the primary (limit {} s)",
                    max_lag.as_secs_f64()
                ));
            }
            match problems.is_empty() {
                true => Health {
                    healthy: true,
                    lag_s,
                    error: None,
                },
                false => Health {
                    healthy: false,
                    lag_s,
                    error: Some(problems.join("; ")),
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQL

/// A single-quoted SQL string literal (backslash and quote escaped; NUL as `\0`).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The account host for the cluster LAN: `'10.88.0.0/255.255.255.0'`.
pub fn host_pattern(subnet: &Ipv4Net) -> String {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(subnet.prefix.min(32)))
        .unwrap_or(0);
    format!("{}/{}", subnet.network(), Ipv4Addr::from(mask))
}

/// The passwords of the accounts the primary creates.
#[derive(Clone, PartialEq, Eq)]
pub struct Passwords {
    pub replication: String,
    pub app: String,
    pub admin: String,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passwords(..)")
    }
}

/// Run on the primary at every agent start: accounts (created, or their password reset to the
/// one derived from the cluster secret; all of them TCP-only and `REQUIRE SSL`), the
/// application database, and the primary's name in `tandem.cluster_state` unless a switchover
/// already recorded one. Idempotent; on an older cluster it adds `REQUIRE SSL`.
pub fn primary_setup_sql(host: &str, pw: &Passwords, node: &str) -> String {
    let host = quote(host);
    let mut s = String::new();
    for (user, password) in [
        (REPL_USER, &pw.replication),
        (APP_USER, &pw.app),
        (ADMIN_USER, &pw.admin),
    ] {
        let account = format!("{}@{host}", quote(user));
        let password = quote(password);
        let _ = writeln!(
            s,
            "CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {password} REQUIRE SSL;"
        );
        let _ = writeln!(
            s,
            "ALTER USER {account} IDENTIFIED BY {password} REQUIRE SSL;"
        );
    }
    let _ = writeln!(
        s,
        "GRANT REPLICATION SLAVE ON *.* TO {}@{host};",
        quote(REPL_USER)
    );
    let _ = writeln!(
        s,
        "GRANT ALL PRIVILEGES ON *.* TO {}@{host} WITH GRANT OPTION;",
        quote(ADMIN_USER)
    );
    let _ = writeln!(
        s,
        "CREATE DATABASE IF NOT EXISTS `{APP_DATABASE}` CHARACTER SET utf8mb4;"
    );
    let _ = writeln!(s, "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP ON `{APP_DATABASE}`.* TO {}@{host};", quote(APP_USER));
    let _ = writeln!(s, "CREATE DATABASE IF NOT EXISTS `{META_DATABASE}`;");
    let _ = writeln!(
        s,
        "CREATE TABLE IF NOT EXISTS `{META_DATABASE}`.cluster_state (name VARCHAR(64) PRIMARY KEY, value VARCHAR(255) NOT NULL, changed TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)) ENGINE=InnoDB;"
    );
    let _ = writeln!(
        s,
        "INSERT IGNORE INTO `{META_DATABASE}`.cluster_state (name, value) VALUES ('primary', {});",
        quote(node)
    );
    s.push_str(&follows_table_sql());
    s
}

fn follows_table_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS `{META_DATABASE}`.{FOLLOWS_TABLE} (node VARCHAR(255) PRIMARY KEY, primary_node VARCHAR(255) NOT NULL, changed TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)) ENGINE=InnoDB;\n"
    )
}

/// Run on the primary by `node`'s agent once its published status names `primary`.
pub fn record_follow_sql(node: &str, primary: &str) -> String {
    format!(
        "INSERT INTO `{META_DATABASE}`.{FOLLOWS_TABLE} (node, primary_node) VALUES ({0}, {1}) ON DUPLICATE KEY UPDATE primary_node = {1}, changed = CURRENT_TIMESTAMP(3);\n",
        quote(node),
        quote(primary)
    )
}

/// Every node's acknowledged primary (batch form: `node`, `primary_node`).
pub fn followers_sql() -> String {
    format!("SELECT node, primary_node FROM `{META_DATABASE}`.{FOLLOWS_TABLE}")
}

/// Reads the primary recorded in the replicated bookkeeping table (no row, or an error when
/// the table does not exist yet).
pub fn recorded_primary_sql() -> String {
    format!("SELECT value FROM `{META_DATABASE}`.cluster_state WHERE name = 'primary'")
}

/// Run on the new primary at the end of a switchover; replicated to every node. Forgets every
/// node's acknowledgement first: from then on, an acknowledgement of `node` means the agent
/// has seen this switchover.
pub fn record_primary_sql(node: &str) -> String {
    format!(
        "{table}DELETE FROM `{META_DATABASE}`.{FOLLOWS_TABLE};\nINSERT INTO `{META_DATABASE}`.cluster_state (name, value) VALUES ('primary', {node}) ON DUPLICATE KEY UPDATE value = {node}, changed = CURRENT_TIMESTAMP(3);\n",
        table = follows_table_sql(),
        node = quote(node)
    )
}

/// The CA file a server was started with (`ssl_ca` in its `my.cnf`): what it trusts when it
/// replicates. Asked of a remote server before repointing it, since paths differ by machine.
pub const SSL_CA_SQL: &str = "SELECT @@ssl_ca AS ssl_ca";

/// The state queries the agent and the CLI read every node with (one row, batch form).
pub const STATE_SQL: &str =
    "SELECT @@read_only AS read_only, @@gtid_current_pos AS current_pos, @@gtid_slave_pos AS slave_pos, @@gtid_binlog_pos AS binlog_pos, @@server_id AS server_id";

/// Makes this server a read-only replica of `primary`. `current_pos` (rather than `slave_pos`)
/// so that a former primary continues after its own last transaction and a plain replica after
/// the last one it applied; a diverged former primary fails loudly instead of silently skipping.
/// Over TLS, the primary's certificate checked against `ssl_ca` (a path on the replica's
/// machine) and its address: node certificates carry the node's address as a SAN.
pub fn replica_setup_sql(primary: (Ipv4Addr, u16), repl_password: &str, ssl_ca: &str) -> String {
    let mut s = String::from("SET GLOBAL read_only = ON;\nSTOP SLAVE;\n");
    let _ = writeln!(
        s,
        "CHANGE MASTER TO MASTER_HOST = {}, MASTER_PORT = {}, MASTER_USER = {}, MASTER_PASSWORD = {}, MASTER_USE_GTID = current_pos, MASTER_CONNECT_RETRY = {CONNECT_RETRY_S}, MASTER_HEARTBEAT_PERIOD = {HEARTBEAT_S}, MASTER_SSL = 1, MASTER_SSL_CA = {}, MASTER_SSL_VERIFY_SERVER_CERT = 1;",
        quote(&primary.0.to_string()),
        primary.1,
        quote(REPL_USER),
        quote(repl_password),
        quote(ssl_ca),
    );
    s.push_str("START SLAVE;\n");
    s
}

/// Ends replication on a caught-up replica and makes it writable: the promotion step.
pub const PROMOTE_SQL: &str = "STOP SLAVE;\nRESET SLAVE ALL;\nSET GLOBAL read_only = OFF;\n";
/// The first step of a switchover on the old primary: no more writes.
pub const FREEZE_SQL: &str = "SET GLOBAL read_only = ON;\n";
/// Undoes [`FREEZE_SQL`] when a switchover is abandoned before anything else changed.
pub const UNFREEZE_SQL: &str = "SET GLOBAL read_only = OFF;\n";

/// Blocks until the server has applied `pos`; the result is 0 when it has, -1 on timeout.
pub fn wait_for_gtid_sql(pos: &GtidPos, timeout: Duration) -> String {
    format!(
        "SELECT MASTER_GTID_WAIT({}, {}) AS waited",
        quote(&pos.to_string()),
        timeout.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(s: &str) -> GtidPos {
        GtidPos::parse(s).unwrap()
    }

    #[test]
    fn gtid_positions_parse_and_compare_per_domain() {
        assert_eq!(pos(""), GtidPos::default());
        assert_eq!(pos("0-2-15,1-3-7").to_string(), "0-2-15,1-3-7");
        for bad in ["0-2", "a-b-c", "0-2-15,0-3-16", "0-2-15-1"] {
            assert!(GtidPos::parse(bad).is_err(), "{bad}");
        }
        let check = |have: &str, want: &str, includes: bool, behind: u64| {
            assert_eq!(
                pos(have).includes(&pos(want)),
                includes,
                "{have} includes {want}"
            );
            assert_eq!(pos(have).behind(&pos(want)), behind, "{have} behind {want}");
        };
        check("0-2-15", "0-2-15", true, 0);
        check("0-1-16", "0-2-15", true, 0); // a later transaction from another server
        check("0-2-14", "0-2-15", false, 1);
        check("", "0-2-15", false, 15);
        check("0-2-15", "", true, 0);
        check("0-2-15", "0-2-15,1-3-2", false, 2);
        check("0-2-20,1-3-2", "0-2-15,1-3-2", true, 0);
    }

    #[test]
    fn batch_output_parses_with_escapes_and_empty_results() {
        assert!(parse_batch("").is_empty());
        let rows = parse_batch("a\tb\nx\\ty\tNULL\nline\\nbreak\tback\\\\slash\n");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["a"], "x\ty");
        assert_eq!(rows[0]["b"], "NULL");
        assert_eq!(rows[1]["a"], "line\nbreak");
        assert_eq!(rows[1]["b"], "back\\slash");
    }

    fn slave_rows(io: &str, sql: &str, behind: &str, io_error: &str) -> String {
        format!(
            "Slave_IO_State\tMaster_Host\tMaster_User\tMaster_Port\tSlave_IO_Running\tSlave_SQL_Running\tLast_SQL_Error\tSeconds_Behind_Master\tLast_IO_Error\tGtid_IO_Pos\n\
             Waiting for master to send event\t127.0.0.12\ttandem_repl\t3306\t{io}\t{sql}\t\t{behind}\t{io_error}\t0-2-9\n"
        )
    }

    fn seen(read_only: bool, rows: Option<String>) -> Observation {
        Observation {
            read_only,
            slave: rows.and_then(|r| SlaveStatus::from_rows(&parse_batch(&r))),
        }
    }

    #[test]
    fn show_slave_status_parses() {
        let s = SlaveStatus::from_rows(&parse_batch(&slave_rows("Yes", "Yes", "0", ""))).unwrap();
        assert_eq!(
            (
                s.master_host.as_str(),
                s.master_port,
                s.io_running(),
                s.sql_running
            ),
            ("127.0.0.12", 3306, true, true)
        );
        assert_eq!(
            (s.seconds_behind, s.gtid_io_pos.as_str()),
            (Some(0), "0-2-9")
        );
        let s = SlaveStatus::from_rows(&parse_batch(&slave_rows("Connecting", "Yes", "NULL", "x")))
            .unwrap();
        assert_eq!(
            (s.io_running(), s.seconds_behind, s.last_io_error.as_str()),
            (false, None, "x")
        );
        assert_eq!(SlaveStatus::from_rows(&parse_batch("")), None);
    }

    #[test]
    fn caught_up_when_everything_fetched_is_applied() {
        let s = SlaveStatus::from_rows(&parse_batch(&slave_rows("Yes", "Yes", "0", ""))).unwrap();
        assert!(caught_up(&pos("0-2-9"), Some(&s)));
        assert!(caught_up(&pos("0-1-12"), Some(&s)));
        assert!(!caught_up(&pos("0-2-8"), Some(&s)));
        assert!(caught_up(&pos(""), None));
    }

    #[test]
    fn an_io_thread_that_gave_up_is_told_from_a_deliberate_stop() {
        let s =
            |io, sql, err| SlaveStatus::from_rows(&parse_batch(&slave_rows(io, sql, "NULL", err)));
        assert!(io_thread_gave_up(
            s("No", "Yes", "error connecting to master").as_ref()
        ));
        assert!(!io_thread_gave_up(
            s("No", "No", "error connecting to master").as_ref()
        ));
        assert!(!io_thread_gave_up(s("No", "Yes", "").as_ref()));
        assert!(!io_thread_gave_up(s("Connecting", "Yes", "x").as_ref()));
        assert!(!io_thread_gave_up(None));
    }

    #[test]
    fn health_decisions() {
        let primary = (Ipv4Addr::new(127, 0, 0, 12), 3306);
        let lag = Duration::from_secs(5);
        let check = |role: DbRole, o: Observation, healthy: bool, error: &str| {
            let h = assess(role, primary, &o, lag);
            assert_eq!(h.healthy, healthy, "{h:?}");
            assert!(
                h.error.as_deref().unwrap_or("").contains(error),
                "{h:?} should mention {error:?}"
            );
        };
        check(DbRole::Primary, seen(false, None), true, "");
        check(DbRole::Primary, seen(true, None), false, "read-only");
        check(
            DbRole::Primary,
            seen(false, Some(slave_rows("Yes", "Yes", "0", ""))),
            false,
            "still replicates",
        );
        check(
            DbRole::Primary,
            seen(false, Some(slave_rows("No", "No", "NULL", ""))),
            true,
            "",
        );
        check(
            DbRole::Replica,
            seen(true, Some(slave_rows("Yes", "Yes", "0", ""))),
            true,
            "",
        );
        check(
            DbRole::Replica,
            seen(true, Some(slave_rows("Yes", "Yes", "5", ""))),
            true,
            "",
        );
        check(
            DbRole::Replica,
            seen(true, Some(slave_rows("Yes", "Yes", "6", ""))),
            false,
            "lags 6 s",
        );
        check(DbRole::Replica, seen(true, None), false, "not configured");
        check(
            DbRole::Replica,
            seen(false, Some(slave_rows("Yes", "Yes", "0", ""))),
            false,
            "writable",
        );
        check(
            DbRole::Replica,
            seen(
                true,
                Some(slave_rows(
                    "Connecting",
                    "Yes",
                    "NULL",
                    "error connecting to master: Access denied",
                )),
            ),
            false,
            "connecting to the primary: error connecting to master: Access denied",
        );
        check(
            DbRole::Replica,
            seen(true, Some(slave_rows("No", "No", "NULL", ""))),
            false,
            "SQL thread stopped",
        );
        let other = (Ipv4Addr::new(127, 0, 0, 11), 3306);
        let h = assess(
            DbRole::Replica,
            other,
            &seen(true, Some(slave_rows("Yes", "Yes", "0", ""))),
            lag,
        );
        assert!(h.error.unwrap().contains("not the primary 127.0.0.11:3306"));
    }

    #[test]
    fn sql_quotes_and_builds_role_statements() {
        assert_eq!(quote("it's a \\ test"), "'it\\'s a \\\\ test'");
        assert_eq!(
            host_pattern(&"10.88.0.0/24".parse().unwrap()),
            "10.88.0.0/255.255.255.0"
        );
        assert_eq!(
            host_pattern(&"127.0.0.0/8".parse().unwrap()),
            "127.0.0.0/255.0.0.0"
        );
        let pw = Passwords {
            replication: "r'1".into(),
            app: "a2".into(),
            admin: "x3".into(),
        };
        assert_eq!(format!("{pw:?}"), "Passwords(..)");
        let sql = primary_setup_sql("10.88.0.0/255.255.255.0", &pw, "server2");
        for user in ["tandem_repl", "tandem_app", "tandem_admin"] {
            for verb in ["CREATE USER IF NOT EXISTS", "ALTER USER"] {
                let line = sql
                    .lines()
                    .find(|l| l.starts_with(verb) && l.contains(&format!("'{user}'@")))
                    .unwrap_or_else(|| panic!("{verb} {user}:\n{sql}"));
                assert!(line.ends_with(" REQUIRE SSL;"), "{line}");
            }
        }
        assert!(sql.contains("CREATE USER IF NOT EXISTS 'tandem_repl'@'10.88.0.0/255.255.255.0' IDENTIFIED BY 'r\\'1' REQUIRE SSL;"), "{sql}");
        assert!(sql.contains("GRANT REPLICATION SLAVE ON *.* TO 'tandem_repl'@"));
        assert!(sql.contains("INSERT IGNORE INTO `tandem`.cluster_state (name, value) VALUES ('primary', 'server2');"));
        let sql = replica_setup_sql(
            (Ipv4Addr::new(10, 88, 0, 12), 3306),
            "pw",
            "/run/tandem/mysqld/tls-ca.pem",
        );
        assert_eq!(
            sql,
            "SET GLOBAL read_only = ON;\nSTOP SLAVE;\nCHANGE MASTER TO MASTER_HOST = '10.88.0.12', MASTER_PORT = 3306, MASTER_USER = 'tandem_repl', MASTER_PASSWORD = 'pw', MASTER_USE_GTID = current_pos, MASTER_CONNECT_RETRY = 1, MASTER_HEARTBEAT_PERIOD = 1, MASTER_SSL = 1, MASTER_SSL_CA = '/run/tandem/mysqld/tls-ca.pem', MASTER_SSL_VERIFY_SERVER_CERT = 1;\nSTART SLAVE;\n"
        );
        assert_eq!(
            wait_for_gtid_sql(&pos("0-2-15"), Duration::from_secs(10)),
            "SELECT MASTER_GTID_WAIT('0-2-15', 10) AS waited"
        );
        let record = record_primary_sql("server1");
        assert!(record.contains("ON DUPLICATE KEY UPDATE value = 'server1'"));
        assert!(
            record.find("DELETE FROM `tandem`.node_primary;").unwrap()
                < record.find("INSERT INTO `tandem`.cluster_state").unwrap(),
            "{record}"
        );
        assert!(primary_setup_sql("h", &pw, "server2")
            .contains("CREATE TABLE IF NOT EXISTS `tandem`.node_primary"));
        assert_eq!(
            record_follow_sql("server1", "server2"),
            "INSERT INTO `tandem`.node_primary (node, primary_node) VALUES ('server1', 'server2') ON DUPLICATE KEY UPDATE primary_node = 'server2', changed = CURRENT_TIMESTAMP(3);\n"
        );
    }
}
