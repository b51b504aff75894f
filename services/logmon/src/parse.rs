//! Parsers for what services print and publish: the structured status lines of Tandem's own
//! services and the database agent's status, and the classes nginx's access lines are counted
//! in (the access lines themselves are read with [`api::access_log::parse`], beside the format
//! `web` gives nginx).

use api::db::{AgentStatus, Role};

/// The first digit of an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatusClass {
    Info,
    Success,
    Redirect,
    ClientError,
    ServerError,
    /// nginx logs 000 or 499-like oddities; anything outside 100..=599.
    Other,
}

impl StatusClass {
    pub const ALL: [StatusClass; 6] = [
        StatusClass::Info,
        StatusClass::Success,
        StatusClass::Redirect,
        StatusClass::ClientError,
        StatusClass::ServerError,
        StatusClass::Other,
    ];

    pub fn of(status: u16) -> StatusClass {
        match status {
            100..=199 => StatusClass::Info,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirect,
            400..=499 => StatusClass::ClientError,
            500..=599 => StatusClass::ServerError,
            _ => StatusClass::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::Info => "1xx",
            StatusClass::Success => "2xx",
            StatusClass::Redirect => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
            StatusClass::Other => "other",
        }
    }
}

/// What a structured status line says (see [`parse_status`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// target `health`: `check=<name> up=<bool>` (or `backend=<name> state=up|down`).
    Health { check: String, up: bool },
    /// target `vip`: `holder=<node>` (who holds the floating IP now).
    Vip { holder: String },
}

/// Levels `tracing`'s default format prints before the target.
const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];

/// Parses a line of `tracing`'s default text format (`<time> <LEVEL> <target>: <message>
/// key=value …`) from targets `health` or `vip` into what the monitor watches. This is the
/// contract other Tandem services follow to feed alerts; anything else is `None`. (The
/// database agent is read from its status file instead: see [`db_status`].)
pub fn parse_status(line: &str) -> Option<Status> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    // Anchored: the line starts with tracing's timestamp and level, so a level word quoted
    // further on (a client's Referer in a web server's error line) is never taken for one.
    let stamp = tokens.first()?;
    if !(stamp.len() >= 20
        && stamp.starts_with(|c: char| c.is_ascii_digit())
        && stamp.contains('T')
        && stamp.ends_with('Z'))
    {
        return None;
    }
    let at = 1;
    if !LEVELS.contains(tokens.get(at)?) {
        return None;
    }
    let target = tokens.get(at + 1)?.strip_suffix(':')?;
    let field = |key: &str| {
        tokens[at + 2..].iter().find_map(|t| {
            let (k, v) = t.split_once('=')?;
            (k == key).then(|| v.trim_matches('"'))
        })
    };
    let boolean = |key: &str| match field(key)? {
        "true" | "yes" | "Yes" | "1" => Some(true),
        "false" | "no" | "No" | "0" => Some(false),
        _ => None,
    };
    match target {
        // `check=<name> up=<bool>`, or the balancer's `backend=<name> state=up|down`.
        "health" => Some(Status::Health {
            check: field("check").or_else(|| field("backend"))?.to_string(),
            up: boolean("up").or_else(|| match field("state")? {
                "up" => Some(true),
                "down" => Some(false),
                _ => None,
            })?,
        }),
        "vip" => Some(Status::Vip {
            holder: field("holder")?.to_string(),
        }),
        _ => None,
    }
}

/// What the database agent's status file (`db-status.json`, written by `appliance db-agent`)
/// says about this node's database.
#[derive(Debug, Clone, PartialEq)]
pub enum DbStatus {
    /// The primary: healthy or not (not reachable, not writable).
    Primary { healthy: bool },
    /// A replica: whether both replication threads run, and its lag.
    Replica { running: bool, lag_ms: Option<u64> },
}

/// What the monitor needs from the agent's status file ([`api::db::AgentStatus`]): the
/// primary's health, or whether a replica replicates and its lag. The error says what is wrong
/// with the text (a file being rewritten, or from another version).
pub fn db_status(json: &str) -> Result<DbStatus, String> {
    let status = AgentStatus::parse(json)?;
    Ok(match status.role {
        Role::Primary => DbStatus::Primary {
            healthy: status.healthy,
        },
        Role::Replica => DbStatus::Replica {
            running: status.replicating(),
            lag_ms: status.lag_s.map(|s| s.saturating_mul(1000)),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        for (status, class) in [
            (100, "1xx"),
            (200, "2xx"),
            (304, "3xx"),
            (499, "4xx"),
            (503, "5xx"),
            (0, "other"),
            (600, "other"),
        ] {
            assert_eq!(StatusClass::of(status).as_str(), class, "{status}");
        }
    }

    #[test]
    fn status_lines() {
        let table: &[(&str, Option<Status>)] = &[
            (
                "2025-01-02T03:04:05Z  WARN db: database unhealthy healthy=false",
                None,
            ),
            (
                r#"2025-01-02T03:04:05Z  WARN health: check failed check="nginx" up=false"#,
                Some(Status::Health {
                    check: "nginx".into(),
                    up: false,
                }),
            ),
            (
                "2025-01-02T03:04:05Z  INFO vip: became master holder=server1",
                Some(Status::Vip {
                    holder: "server1".into(),
                }),
            ),
            (
                r#"2026-11-26T07:00:00Z  WARN health: backend server2 (10.88.0.12:8080) is down backend=server2 addr=10.88.0.12:8080 state="down" reason="connection refused""#,
                Some(Status::Health {
                    check: "server2".into(),
                    up: false,
                }),
            ),
            (
                r#"2026-11-26T07:00:09Z  INFO health: backend server2 (10.88.0.12:8080) is up backend=server2 addr=10.88.0.12:8080 state="up" reason="2 checks passed""#,
                Some(Status::Health {
                    check: "server2".into(),
                    up: true,
                }),
            ),
            ("2025-01-02T03:04:05Z  INFO health: hello", None),
            // A level and target quoted inside another line (nginx's error log echoes the
            // client's Referer) is not a status line.
            (
                r#"2025/01/02 03:04:05 [error] 7#7: *1 open() failed, referrer: "x 2025-01-02T03:04:05Z INFO health: check=server1 up=true""#,
                None,
            ),
            ("x 2025-01-02T03:04:05Z  INFO health: check=x up=true", None),
            ("2025-01-02  INFO health: check=x up=true", None),
            ("2025-01-02T03:04:05Z  INFO svc: check=x up=false", None),
            ("check=x up=false", None),
        ];
        for (line, expected) in table {
            assert_eq!(parse_status(line), *expected, "{line}");
        }
    }

    #[test]
    fn db_status_files() {
        // The agent's record with `fields` replaced (JSON, without braces).
        let record = |fields: &str| {
            let base = r#""node":"server2","primary":{"name":"server1","address":"10.88.0.11","port":3306},"error":null,"read_only":null,"gtid_current_pos":null,"gtid_slave_pos":null,"gtid_binlog_pos":null,"updated_ms":1"#;
            format!("{{{base},{fields}}}")
        };
        let table: &[(String, Result<DbStatus, &str>)] = &[
            (
                record(
                    r#""role":"primary","healthy":true,"lag_s":null,"io_running":null,"sql_running":null"#,
                ),
                Ok(DbStatus::Primary { healthy: true }),
            ),
            (
                record(
                    r#""role":"primary","healthy":false,"lag_s":null,"io_running":null,"sql_running":null"#,
                ),
                Ok(DbStatus::Primary { healthy: false }),
            ),
            (
                record(
                    r#""role":"replica","healthy":true,"io_running":"Yes","sql_running":true,"lag_s":3"#,
                ),
                Ok(DbStatus::Replica {
                    running: true,
                    lag_ms: Some(3000),
                }),
            ),
            (
                record(
                    r#""role":"replica","healthy":false,"io_running":"Connecting","sql_running":true,"lag_s":null"#,
                ),
                Ok(DbStatus::Replica {
                    running: false,
                    lag_ms: None,
                }),
            ),
            // A field added by a later agent is ignored.
            (
                record(
                    r#""role":"replica","healthy":true,"io_running":"Yes","sql_running":false,"lag_s":0,"new":1"#,
                ),
                Ok(DbStatus::Replica {
                    running: false,
                    lag_ms: Some(0),
                }),
            ),
            (
                record(
                    r#""role":"arbiter","healthy":true,"io_running":null,"sql_running":null,"lag_s":null"#,
                ),
                Err("db-status.json: unknown variant `arbiter`"),
            ),
            (
                r#"{"role":"replica"}"#.into(),
                Err("db-status.json: missing field"),
            ),
            ("not json".into(), Err("db-status.json: expected")),
        ];
        for (json, expected) in table {
            match (db_status(json), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want, "{json}"),
                (Err(got), Err(want)) => assert!(got.starts_with(want), "{got} for {json}"),
                (got, _) => panic!("{got:?} for {json}, expected {expected:?}"),
            }
        }
    }
}
