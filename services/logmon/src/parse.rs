//! Parsers for what services print: nginx access lines (`log_format tandem`) and the
//! structured status lines of Tandem's own services.

/// One nginx access line of `log_format tandem`:
/// `$remote_addr [$time_iso8601] "$request" $status $body_bytes_sent $request_time`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLine<'a> {
    pub remote: &'a str,
    pub time: &'a str,
    /// `GET / HTTP/1.1` (nginx escapes quotes inside it as `\x22`).
    pub request: &'a str,
    pub status: u16,
    pub bytes: u64,
    /// Seconds.
    pub request_time: f64,
}

impl AccessLine<'_> {
    /// `2xx`, `5xx`, …
    pub fn class(&self) -> StatusClass {
        StatusClass::of(self.status)
    }
}

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

/// Parses one access line; `None` for anything else (nginx also prints notices on stdout
/// only when misconfigured, and those are not requests).
pub fn parse_access(line: &str) -> Option<AccessLine<'_>> {
    let (rest, request_time) = line.rsplit_once(' ')?;
    let (rest, bytes) = rest.rsplit_once(' ')?;
    let (rest, status) = rest.rsplit_once(' ')?;
    let request_time: f64 = request_time
        .parse()
        .ok()
        .filter(|t: &f64| t.is_finite() && *t >= 0.0)?;
    let bytes: u64 = bytes.parse().ok()?;
    if status.len() != 3 || !status.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let status: u16 = status.parse().ok()?;
    let (remote, rest) = rest.split_once(" [")?;
    let (time, rest) = rest.split_once("] ")?;
    let request = rest.strip_prefix('"')?.strip_suffix('"')?;
    if remote.is_empty() || remote.contains(' ') || time.is_empty() {
        return None;
    }
    Some(AccessLine {
        remote,
        time,
        request,
        status,
        bytes,
        request_time,
    })
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

/// Reads the fields the monitor needs from the agent's status JSON: `role`, `healthy`,
/// `io_running` (`"Yes"` when running), `sql_running`, `lag_s`.
pub fn db_status(json: &str) -> Option<DbStatus> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    match v.get("role")?.as_str()? {
        "primary" => Some(DbStatus::Primary {
            healthy: v.get("healthy")?.as_bool()?,
        }),
        "replica" => {
            let io = v.get("io_running").and_then(|x| x.as_str()) == Some("Yes");
            let sql = v.get("sql_running").and_then(|x| x.as_bool()) == Some(true);
            let lag_ms = v
                .get("lag_s")
                .and_then(|x| x.as_u64())
                .map(|s| s.saturating_mul(1000));
            Some(DbStatus::Replica {
                running: io && sql,
                lag_ms,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines() {
        // line -> (remote, request, status, bytes, request_time) or None
        type Row = (
            &'static str,
            Option<(&'static str, &'static str, u16, u64, f64)>,
        );
        let table: &[Row] = &[
            (
                r#"10.88.0.1 [2025-01-02T03:04:05+00:00] "GET / HTTP/1.1" 200 612 0.000"#,
                Some(("10.88.0.1", "GET / HTTP/1.1", 200, 612, 0.0)),
            ),
            (
                r#"::1 [2025-01-02T03:04:05+00:00] "POST /api?x=1 HTTP/2.0" 502 157 1.234"#,
                Some(("::1", "POST /api?x=1 HTTP/2.0", 502, 157, 1.234)),
            ),
            // Quotes in the request are escaped by nginx; spaces in it are fine.
            (
                r#"1.2.3.4 [t] "GET /a\x22b c HTTP/1.1" 404 0 0.010"#,
                Some(("1.2.3.4", r"GET /a\x22b c HTTP/1.1", 404, 0, 0.01)),
            ),
            // A bad request line is logged as "-" or garbage, still a request.
            (
                r#"1.2.3.4 [t] "-" 400 0 0.000"#,
                Some(("1.2.3.4", "-", 400, 0, 0.0)),
            ),
            (
                r#"1.2.3.4 [t] "" 499 0 0.001"#,
                Some(("1.2.3.4", "", 499, 0, 0.001)),
            ),
            (r#"1.2.3.4 [t] "GET /" 2000 0 0.0"#, None),
            (r#"1.2.3.4 [t] "GET /" 200 -5 0.0"#, None),
            (r#"1.2.3.4 [t] "GET /" 200 5 -1"#, None),
            (r#"1.2.3.4 [t] "GET /" 200 5 NaN"#, None),
            (r#"1.2.3.4 "GET /" 200 5 0.1"#, None),
            (r#"1.2.3.4 [t] GET / 200 5 0.1"#, None),
            (
                "2025/01/02 03:04:05 [notice] 1#1: start worker processes",
                None,
            ),
            ("", None),
        ];
        for (line, expected) in table {
            let got = parse_access(line)
                .map(|a| (a.remote, a.request, a.status, a.bytes, a.request_time));
            assert_eq!(got, *expected, "{line}");
        }
        assert_eq!(StatusClass::of(503).as_str(), "5xx");
        assert_eq!(StatusClass::of(0).as_str(), "other");
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
        let table: &[(&str, Option<DbStatus>)] = &[
            (
                r#"{"role":"primary","healthy":true,"lag_s":null}"#,
                Some(DbStatus::Primary { healthy: true }),
            ),
            (
                r#"{"role":"primary","healthy":false}"#,
                Some(DbStatus::Primary { healthy: false }),
            ),
            (
                r#"{"role":"replica","healthy":true,"io_running":"Yes","sql_running":true,"lag_s":3}"#,
                Some(DbStatus::Replica {
                    running: true,
                    lag_ms: Some(3000),
                }),
            ),
            (
                r#"{"role":"replica","healthy":false,"io_running":"Connecting","sql_running":true,"lag_s":null}"#,
                Some(DbStatus::Replica {
                    running: false,
                    lag_ms: None,
                }),
            ),
            (
                r#"{"role":"replica"}"#,
                Some(DbStatus::Replica {
                    running: false,
                    lag_ms: None,
                }),
            ),
            (r#"{"role":"arbiter","healthy":true}"#, None),
            ("not json", None),
        ];
        for (json, expected) in table {
            assert_eq!(db_status(json), *expected, "{json}");
        }
    }
}
