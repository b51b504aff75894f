//! The notes, in MariaDB: reads from the node's own server, writes to the primary. SQL goes
//! through the `mariadb` command-line client (one short process per query, password in a 0600
//! option file, never on a command line); a real application would use a driver and a pool.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

pub const CLIENT: &str = "/usr/bin/mariadb";
/// Notes listed per page (and per JSON answer), newest first; older ones are on further pages.
pub const PAGE_SIZE: usize = 50;
/// Longest note accepted, in bytes of UTF-8 (after trimming).
pub const MAX_NOTE_BYTES: usize = 2000;
/// Notes the application stores at most; beyond it, writes are refused (nothing is deleted).
/// Concurrent writers may each pass the check once, so the table can exceed it by the number of
/// writes in flight.
pub const MAX_NOTES: u64 = 10_000;
/// No query may run longer (seconds), so a stuck server cannot pile up request threads.
const STATEMENT_TIMEOUT_S: u32 = 5;
const CONNECT_TIMEOUT_S: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    pub id: u64,
    /// The node whose application took the write.
    pub node: String,
    pub body: String,
    pub created: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {server}: {message}")]
    Sql {
        server: String,
        code: Option<u32>,
        message: String,
    },
    #[error("running {CLIENT}: {0}")]
    Client(#[source] std::io::Error),
    #[error("database {server}: unexpected answer: {detail}")]
    Answer { server: String, detail: String },
    #[error("the notes are full: {max} are stored, the most this application keeps")]
    Full { max: u64 },
    #[error("writing the client option file {}: {source}", .path.display())]
    OptionFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    pub fn code(&self) -> Option<u32> {
        match self {
            StoreError::Sql { code, .. } => *code,
            _ => None,
        }
    }

    /// Whether the server certainly did not apply the statement, so trying it again can never
    /// write a note twice: see [`NOT_APPLIED`].
    pub fn not_applied(&self) -> bool {
        self.code().is_some_and(|c| NOT_APPLIED.contains(&c))
    }
}

/// Errors after which nothing was written: the server is read-only (1290, 1836: a switchover
/// froze the old primary), could not be reached (2002, 2003: no statement was sent), or rolled
/// the statement back (1213 deadlock, 1205 lock wait timeout). A connection lost during a
/// statement (2013) is not among them: it may have committed.
pub const NOT_APPLIED: &[u32] = &[1290, 1836, 2002, 2003, 1213, 1205];

/// Error codes that mean "the table is not there yet" (a fresh cluster, nothing written).
pub const ER_NO_SUCH_TABLE: u32 = 1146;
pub const ER_BAD_DB: u32 = 1049;

pub const SCHEMA_SQL: &str = "CREATE TABLE IF NOT EXISTS notes (\
id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
node VARCHAR(64) NOT NULL, \
body TEXT NOT NULL, \
created TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;\n";

const NOTE_JSON: &str = "JSON_OBJECT('id', id, 'node', node, 'body', body, 'created', DATE_FORMAT(created, '%Y-%m-%d %H:%i:%s.%f'))";

/// One page of notes, newest first: those older than `before` (a note id) when given. One JSON
/// object per row and line, never one aggregate (which `group_concat_max_len` truncates). One
/// row more than a page is asked for, to know whether an older page exists.
pub fn list_sql(before: Option<u64>) -> String {
    let filter = before.map_or(String::new(), |id| format!(" WHERE id < {id}"));
    format!(
        "SET STATEMENT max_statement_time = {STATEMENT_TIMEOUT_S} FOR SELECT {NOTE_JSON} FROM notes{filter} ORDER BY id DESC LIMIT {};\n",
        PAGE_SIZE + 1
    )
}

/// A page of notes, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub notes: Vec<Note>,
    /// The `before` of the next (older) page, when there is one.
    pub older: Option<u64>,
}

/// The client's answer to [`list_sql`]: one JSON note per line.
pub fn parse_page(out: &str) -> Result<Page, String> {
    let mut notes = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| serde_json::from_str::<Note>(line).map_err(|e| format!("{e} in a row")))
        .collect::<Result<Vec<Note>, String>>()?;
    let older = match notes.len() > PAGE_SIZE {
        true => {
            notes.truncate(PAGE_SIZE);
            notes.last().map(|n| n.id)
        }
        false => None,
    };
    Ok(Page { notes, older })
}

/// Inserts a note unless [`MAX_NOTES`] are stored, and answers it as JSON (no row when the
/// table was full). Text goes in as hex literals: no quoting to get wrong. READ COMMITTED so
/// that counting takes no shared locks: concurrent writers never deadlock on the check.
pub fn insert_sql(node: &str, body: &str) -> String {
    format!(
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED;\n\
         INSERT INTO notes (node, body) SELECT CONVERT(X'{}' USING utf8mb4), CONVERT(X'{}' USING utf8mb4) FROM DUAL WHERE (SELECT COUNT(*) FROM notes) < {MAX_NOTES};\n\
         SET @inserted = ROW_COUNT();\n\
         SELECT {NOTE_JSON} FROM notes WHERE @inserted = 1 AND id = LAST_INSERT_ID();\n",
        hex(node.as_bytes()),
        hex(body.as_bytes())
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// `ERROR 1290 (HY000) at line 1: The MariaDB server is running with the --read-only option`
/// → (1290, the message).
pub fn parse_client_error(stderr: &str) -> (Option<u32>, String) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("ERROR "))
        .unwrap_or(stderr.trim());
    let code = line
        .strip_prefix("ERROR ")
        .and_then(|r| r.split([' ', '(']).next())
        .and_then(|c| c.parse().ok());
    (code, line.trim().to_string())
}

/// Why a note from a client is refused before reaching the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteRefused {
    #[error("a note needs a non-empty `body`")]
    Empty,
    #[error("a note has at most {MAX_NOTE_BYTES} bytes; this one has {bytes}")]
    TooLarge { bytes: usize },
}

impl NoteRefused {
    pub fn status(&self) -> u16 {
        match self {
            NoteRefused::Empty => 400,
            NoteRefused::TooLarge { .. } => 413,
        }
    }
}

/// Validates a note from a client: trimmed, not empty, at most [`MAX_NOTE_BYTES`].
pub fn check_note(body: &str) -> Result<&str, NoteRefused> {
    let body = body.trim();
    if body.is_empty() {
        return Err(NoteRefused::Empty);
    }
    if body.len() > MAX_NOTE_BYTES {
        return Err(NoteRefused::TooLarge { bytes: body.len() });
    }
    Ok(body)
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Client {
    pub database: String,
    /// 0600 option file with user and password.
    pub option_file: PathBuf,
    /// The cluster CA the servers' certificates are checked against.
    pub ssl_ca: PathBuf,
}

impl Client {
    /// Writes the option file (mode 0600 from creation) into `dir`.
    pub fn new(
        dir: &Path,
        user: &str,
        password: &str,
        database: &str,
        ssl_ca: &Path,
    ) -> Result<Client, StoreError> {
        let path = dir.join("client.cnf");
        let err = |source| StoreError::OptionFile {
            path: path.clone(),
            source,
        };
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        // Option values may be quoted; backslash and quote escaped inside.
        let quoted = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        write!(
            f,
            "[client]\nuser = \"{}\"\npassword = \"{}\"\n",
            quoted(user),
            quoted(password)
        )
        .map_err(err)?;
        Ok(Client {
            database: database.to_string(),
            option_file: path,
            ssl_ca: ssl_ca.to_path_buf(),
        })
    }

    /// Runs `sql` on `host:port` over TLS (the server's certificate must come from the cluster
    /// CA and name `host`); returns the output (batch, raw, no column names).
    pub fn query(&self, host: &str, port: u16, sql: &str) -> Result<String, StoreError> {
        let server = format!("{host}:{port}");
        let mut child = Command::new(CLIENT)
            .arg(format!(
                "--defaults-extra-file={}",
                self.option_file.display()
            ))
            .args(["--protocol=TCP", "--batch", "--raw", "--skip-column-names"])
            .args(["--ssl", "--ssl-verify-server-cert"])
            .arg(format!("--ssl-ca={}", self.ssl_ca.display()))
            .arg(format!("--connect-timeout={CONNECT_TIMEOUT_S}"))
            .arg(format!("--host={host}"))
            .arg(format!("--port={port}"))
            .arg(&self.database)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(StoreError::Client)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(StoreError::Client)?;
        }
        let out = child.wait_with_output().map_err(StoreError::Client)?;
        if !out.status.success() {
            let (code, message) = parse_client_error(&String::from_utf8_lossy(&out.stderr));
            return Err(StoreError::Sql {
                server,
                code,
                message,
            });
        }
        String::from_utf8(out.stdout).map_err(|_| StoreError::Answer {
            server,
            detail: "not UTF-8".into(),
        })
    }

    /// The page of notes older than `before` (the newest when `None`).
    pub fn list(&self, host: &str, port: u16, before: Option<u64>) -> Result<Page, StoreError> {
        let out = match self.query(host, port, &list_sql(before)) {
            Err(e) if matches!(e.code(), Some(ER_NO_SUCH_TABLE | ER_BAD_DB)) => {
                return Ok(Page::default())
            }
            other => other?,
        };
        parse_page(&out).map_err(|detail| StoreError::Answer {
            server: format!("{host}:{port}"),
            detail,
        })
    }

    pub fn ensure_schema(&self, host: &str, port: u16) -> Result<(), StoreError> {
        self.query(host, port, SCHEMA_SQL).map(drop)
    }

    pub fn insert(
        &self,
        host: &str,
        port: u16,
        node: &str,
        body: &str,
    ) -> Result<Note, StoreError> {
        let out = self.query(host, port, &insert_sql(node, body))?;
        if out.trim().is_empty() {
            return Err(StoreError::Full { max: MAX_NOTES });
        }
        serde_json::from_str(out.trim()).map_err(|e| StoreError::Answer {
            server: format!("{host}:{port}"),
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_carries_text_as_hex() {
        let sql = insert_sql("s1", "it's\n'; DROP TABLE notes; --");
        assert!(sql.contains("INSERT INTO notes (node, body) SELECT CONVERT(X'7331' USING utf8mb4), CONVERT(X'6974"), "{sql}");
        assert!(
            sql.contains("WHERE (SELECT COUNT(*) FROM notes) < 10000;"),
            "{sql}"
        );
        assert!(!sql.contains("DROP"));
        assert!(!list_sql(None).contains("ARRAYAGG"));
        assert!(list_sql(None).ends_with(" FROM notes ORDER BY id DESC LIMIT 51;\n"));
        assert!(
            list_sql(Some(7)).ends_with(" FROM notes WHERE id < 7 ORDER BY id DESC LIMIT 51;\n")
        );
    }

    #[test]
    fn client_errors_parse() {
        let (code, msg) = parse_client_error(
            "ERROR 1290 (HY000) at line 1: The MariaDB server is running with the --read-only option so it cannot execute this statement\n",
        );
        assert_eq!(code, Some(1290));
        assert!(msg.contains("--read-only"));
        let (code, msg) = parse_client_error(
            "ERROR 2002 (HY000): Can't connect to server on '127.0.0.12' (115)\n",
        );
        assert_eq!(
            (code, msg.as_str()),
            (
                Some(2002),
                "ERROR 2002 (HY000): Can't connect to server on '127.0.0.12' (115)"
            )
        );
        assert_eq!(parse_client_error("odd\n"), (None, "odd".to_string()));
    }

    #[test]
    fn only_errors_that_wrote_nothing_are_retried() {
        let check = |stderr: &str, retry: bool| {
            let (code, message) = parse_client_error(stderr);
            let e = StoreError::Sql {
                server: "s".into(),
                code,
                message,
            };
            assert_eq!(e.not_applied(), retry, "{stderr}");
        };
        check("ERROR 1290 (HY000) at line 2: The MariaDB server is running with the --read-only option so it cannot execute this statement", true);
        check(
            "ERROR 2002 (HY000): Can't connect to server on '127.0.0.12' (115)",
            true,
        );
        check(
            "ERROR 2003 (HY000): Can't connect to MySQL server on '10.88.0.12' (113)",
            true,
        );
        check("ERROR 1213 (40001) at line 2: Deadlock found when trying to get lock; try restarting transaction", true);
        check(
            "ERROR 2013 (HY000) at line 2: Lost connection to server during query",
            false,
        );
        check("ERROR 1045 (28000): Access denied for user 'tandem_app'@'10.88.0.11' (using password: YES)", false);
        check(
            "ERROR 1146 (42S02) at line 1: Table 'app.notes' doesn't exist",
            false,
        );
        check("garbage", false);
        assert!(!StoreError::Full { max: 1 }.not_applied());
    }

    #[test]
    fn notes_are_checked() {
        let max = "x".repeat(MAX_NOTE_BYTES);
        let check = |body: &str, want: Result<&str, NoteRefused>| {
            assert_eq!(check_note(body), want, "{:?}", &body[..body.len().min(20)]);
        };
        check("  hi ", Ok("hi"));
        check(" \n", Err(NoteRefused::Empty));
        check(&format!(" {max}\n"), Ok(&max));
        check(
            &format!("{max}x"),
            Err(NoteRefused::TooLarge {
                bytes: MAX_NOTE_BYTES + 1,
            }),
        );
        // Bytes, not characters: 1000 two-byte characters fit, 1001 do not.
        check(
            &"é".repeat(MAX_NOTE_BYTES / 2),
            Ok(&"é".repeat(MAX_NOTE_BYTES / 2)),
        );
        assert_eq!(
            check_note(&"é".repeat(MAX_NOTE_BYTES / 2 + 1))
                .unwrap_err()
                .status(),
            413
        );
        assert_eq!(NoteRefused::Empty.status(), 400);
        assert_eq!(
            NoteRefused::TooLarge { bytes: 2001 }.to_string(),
            "a note has at most 2000 bytes; this one has 2001"
        );
    }

    fn row(id: u64) -> String {
        format!(
            r#"{{"id": {id}, "node": "server1", "body": "a\nb\t\"c\"", "created": "2025-01-01 00:00:00.000000"}}"#
        )
    }

    #[test]
    fn pages_parse_from_one_json_row_per_line() {
        let rows = |ids: std::ops::RangeInclusive<u64>| -> String {
            ids.rev().map(|i| row(i) + "\n").collect()
        };
        let check = |out: &str, len: usize, first: Option<u64>, older: Option<u64>| {
            let page = parse_page(out).unwrap();
            assert_eq!(page.notes.len(), len);
            assert_eq!(page.notes.first().map(|n| n.id), first);
            assert_eq!(page.older, older);
        };
        check("", 0, None, None);
        check(&rows(1..=3), 3, Some(3), None);
        check(&rows(1..=50), 50, Some(50), None);
        // 51 rows: a full page and an older one starting below the page's last id.
        check(&rows(10..=60), 50, Some(60), Some(11));
        let page = parse_page(&row(1)).unwrap();
        assert_eq!(page.notes[0].body, "a\nb\t\"c\"");
        assert!(parse_page("{\"id\": 1, \"body\": \"trunc").is_err());
    }
}
