//! The notes, in MariaDB: reads from the node's own server, writes to the primary. SQL goes
//! through the `mariadb` command-line client (one short process per query, password in a 0600
//! option file, never on a command line); a real application would use a driver and a pool.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

pub const CLIENT: &str = "/usr/bin/mariadb";
/// Notes listed per page (and per JSON answer).
pub const LIST_LIMIT: usize = 1000;
/// Longest note accepted, in characters.
pub const MAX_NOTE_CHARS: usize = 4000;
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
}

/// Error codes that mean "the table is not there yet" (a fresh cluster, nothing written).
pub const ER_NO_SUCH_TABLE: u32 = 1146;
pub const ER_BAD_DB: u32 = 1049;

pub const SCHEMA_SQL: &str = "CREATE TABLE IF NOT EXISTS notes (\
id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
node VARCHAR(64) NOT NULL, \
body TEXT NOT NULL, \
created TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;\n";

const NOTE_JSON: &str = "JSON_OBJECT('id', id, 'node', node, 'body', body, 'created', DATE_FORMAT(created, '%Y-%m-%d %H:%i:%s.%f'))";

/// All notes (newest last) as one JSON array in one cell; NULL when there are none.
pub fn list_sql() -> String {
    format!(
        "SET STATEMENT max_statement_time = {STATEMENT_TIMEOUT_S} FOR SELECT JSON_ARRAYAGG({NOTE_JSON} ORDER BY id) FROM (SELECT * FROM notes ORDER BY id DESC LIMIT {LIST_LIMIT}) AS t;\n"
    )
}

/// Inserts a note and answers it as JSON. Text goes in as hex literals: no quoting to get wrong.
pub fn insert_sql(node: &str, body: &str) -> String {
    format!(
        "INSERT INTO notes (node, body) VALUES (CONVERT(X'{}' USING utf8mb4), CONVERT(X'{}' USING utf8mb4));\nSELECT {NOTE_JSON} FROM notes WHERE id = LAST_INSERT_ID();\n",
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

/// Validates a note from a client.
pub fn check_note(body: &str) -> Result<&str, String> {
    let body = body.trim();
    if body.is_empty() {
        return Err("a note needs a non-empty `body`".into());
    }
    if body.chars().count() > MAX_NOTE_CHARS {
        return Err(format!("a note has at most {MAX_NOTE_CHARS} characters"));
    }
    Ok(body)
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Client {
    pub database: String,
    /// 0600 option file with user and password.
    pub option_file: PathBuf,
}

impl Client {
    /// Writes the option file (mode 0600 from creation) into `dir`.
    pub fn new(
        dir: &Path,
        user: &str,
        password: &str,
        database: &str,
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
        })
    }

    /// Runs `sql` on `host:port`; returns the output (batch, raw, no column names).
    pub fn query(&self, host: &str, port: u16, sql: &str) -> Result<String, StoreError> {
        let server = format!("{host}:{port}");
        let mut child = Command::new(CLIENT)
            .arg(format!(
                "--defaults-extra-file={}",
                self.option_file.display()
            ))
            .args(["--protocol=TCP", "--batch", "--raw", "--skip-column-names"])
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

    pub fn list(&self, host: &str, port: u16) -> Result<Vec<Note>, StoreError> {
        let out = match self.query(host, port, &list_sql()) {
            Err(e) if matches!(e.code(), Some(ER_NO_SUCH_TABLE | ER_BAD_DB)) => {
                return Ok(Vec::new())
            }
            other => other?,
        };
        let cell = out.trim();
        if cell.is_empty() || cell == "NULL" {
            return Ok(Vec::new());
        }
        serde_json::from_str(cell).map_err(|e| StoreError::Answer {
            server: format!("{host}:{port}"),
            detail: e.to_string(),
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
        assert!(sql.starts_with("INSERT INTO notes (node, body) VALUES (CONVERT(X'7331' USING utf8mb4), CONVERT(X'6974"), "{sql}");
        assert!(!sql.contains("DROP"));
        assert!(list_sql()
            .contains("ORDER BY id) FROM (SELECT * FROM notes ORDER BY id DESC LIMIT 1000)"));
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
    fn notes_are_checked() {
        assert_eq!(check_note("  hi "), Ok("hi"));
        assert!(check_note(" ").is_err());
        assert!(check_note(&"x".repeat(MAX_NOTE_CHARS + 1)).is_err());
    }

    #[test]
    fn notes_parse_from_the_servers_json() {
        let notes: Vec<Note> = serde_json::from_str(r#"[{"id": 1, "node": "server1", "body": "a\nb", "created": "2025-01-01 00:00:00.000000"}]"#).unwrap();
        assert_eq!(notes[0].body, "a\nb");
    }
}
