//! The supervisor's service events: the `events` table of `<state>/state.db`. The supervisor
//! (`appliance::state`) writes it; the log monitor and the status page read it with
//! [`EventReader`]. The schema ([`MIGRATIONS`]) and the row ([`EventRecord`]) are the contract.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};
use serde::{Deserialize, Serialize};

/// The supervisor's database file inside the state directory.
pub const STATE_DB_FILE: &str = "state.db";
/// At most this many events are read per poll.
pub const BATCH: i64 = 1000;

/// Forward migrations of `state.db` (applied by [`crate::sqlite::migrate`]); migration `i`
/// takes the schema from version `i` to `i + 1`. Never edit one that has shipped: append.
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        service TEXT NOT NULL,
        kind TEXT NOT NULL,
        pid INTEGER NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX events_by_service ON events (service, id);",
    // 2: the update service's record of every version a slot was given, and how it went
    // (`installed`, `good` once blessed, `bad` after a failed trial).
    "CREATE TABLE update_versions (
        version TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('installed', 'good', 'bad')),
        slot TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        detail TEXT NOT NULL
    );",
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// What happened to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A process was started (pid set; detail: the program).
    Started,
    /// The service became ready (dependents may start).
    Ready,
    /// The process ended (detail: `code 1`, `signal 9 (SIGKILL)`).
    Exited,
    /// Not ready within its ready timeout; it is being killed (detail: the timeout).
    Timeout,
    /// A restart is scheduled (detail: `in 200ms, restart 3`).
    Restarting,
    /// Given up: crash loop or could not be started (detail: why).
    Failed,
    /// Stopped on request or at shutdown.
    Stopped,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Started,
        EventKind::Ready,
        EventKind::Exited,
        EventKind::Timeout,
        EventKind::Restarting,
        EventKind::Failed,
        EventKind::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Ready => "ready",
            EventKind::Exited => "exited",
            EventKind::Timeout => "timeout",
            EventKind::Restarting => "restarting",
            EventKind::Failed => "failed",
            EventKind::Stopped => "stopped",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `events`. `kind` is text so rows written by a newer binary still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: i64,
    pub ts_ms: i64,
    pub service: String,
    pub kind: String,
    pub pid: Option<i32>,
    pub detail: String,
}

impl EventRecord {
    /// A row selected as `id, ts_ms, service, kind, pid, detail` (every reader's order).
    pub fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRecord> {
        Ok(EventRecord {
            id: r.get(0)?,
            ts_ms: r.get(1)?,
            service: r.get(2)?,
            kind: r.get(3)?,
            pid: r.get(4)?,
            detail: r.get(5)?,
        })
    }
}

/// A read of the events table failed.
#[derive(Debug)]
pub struct ReadError {
    pub path: PathBuf,
    pub source: rusqlite::Error,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Reads `<state>/state.db` read-only, polling by id; the file may not exist yet.
pub struct EventReader {
    path: PathBuf,
    conn: Option<Connection>,
}

impl EventReader {
    pub fn new(state_dir: &Path) -> EventReader {
        EventReader {
            path: state_dir.join(STATE_DB_FILE),
            conn: None,
        }
    }

    fn err(&self, source: rusqlite::Error) -> ReadError {
        ReadError {
            path: self.path.clone(),
            source,
        }
    }

    /// The connection, opened on first use; `None` while the supervisor has not created the
    /// database yet.
    fn conn(&mut self) -> Result<Option<&Connection>, ReadError> {
        if self.conn.is_none() {
            if !self.path.exists() {
                return Ok(None);
            }
            let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| self.err(e))?;
            conn.busy_timeout(Duration::from_secs(5))
                .map_err(|e| self.err(e))?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_ref())
    }

    /// Events with an id above `after_id`, oldest first, at most [`BATCH`].
    pub fn after(&mut self, after_id: i64) -> Result<Vec<EventRecord>, ReadError> {
        let Some(conn) = self.conn()? else {
            return Ok(Vec::new());
        };
        let rows = (|| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, ts_ms, service, kind, pid, detail FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after_id, BATCH], EventRecord::from_row)?;
            rows.collect::<Result<Vec<_>, _>>()
        })();
        rows.map_err(|e| self.err(e))
    }

    /// The highest event id, and the id just before the first event at or after `since_ms`.
    /// `None` while there is no database.
    pub fn positions(&mut self, since_ms: i64) -> Result<Option<(i64, i64)>, ReadError> {
        let Some(conn) = self.conn()? else {
            return Ok(None);
        };
        let found = conn.query_row(
            "SELECT COALESCE(MAX(id), 0),
                    COALESCE((SELECT MIN(id) FROM events WHERE ts_ms >= ?1), MAX(id) + 1, 1) - 1
             FROM events",
            params![since_ms],
            |r| Ok((r.get(0)?, r.get(1)?)),
        );
        found.map(Some).map_err(|e| self.err(e))
    }

    /// Per service: the kind of its last event with id up to `up_to`, and how many
    /// `restarting` events it has.
    pub fn summary(&mut self, up_to: i64) -> Result<BTreeMap<String, (String, u64)>, ReadError> {
        let Some(conn) = self.conn()? else {
            return Ok(BTreeMap::new());
        };
        let rows = (|| {
            let mut stmt = conn.prepare(
                "SELECT service,
                        (SELECT kind FROM events l WHERE l.service = e.service AND l.id <= ?1 ORDER BY l.id DESC LIMIT 1),
                        SUM(kind = 'restarting')
                 FROM events e WHERE id <= ?1 GROUP BY service",
            )?;
            let rows = stmt.query_map(params![up_to], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (r.get::<_, String>(1)?, r.get::<_, i64>(2)?.max(0) as u64),
                ))
            })?;
            rows.collect::<Result<BTreeMap<_, _>, _>>()
        })();
        rows.map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_follows_rows_written_under_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let mut reader = EventReader::new(dir.path());
        // No database yet: nothing, no error.
        assert!(reader.after(0).unwrap().is_empty());
        assert_eq!(reader.positions(0).unwrap(), None);

        let mut conn = Connection::open(dir.path().join(STATE_DB_FILE)).unwrap();
        crate::sqlite::migrate(&mut conn, MIGRATIONS).unwrap();
        for (ts, service, kind) in [
            (10, "app", "started"),
            (20, "app", "restarting"),
            (30, "db", "ready"),
        ] {
            conn.execute(
                "INSERT INTO events (ts_ms, service, kind, pid, detail) VALUES (?1, ?2, ?3, 7, '')",
                params![ts, service, kind],
            )
            .unwrap();
        }
        let rows = reader.after(0).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].id, rows[0].pid, rows[0].kind.as_str()),
            (1, Some(7), "started")
        );
        assert_eq!(reader.after(2).unwrap().len(), 1);
        assert_eq!(reader.positions(20).unwrap(), Some((3, 1)));
        let summary = reader.summary(3).unwrap();
        assert_eq!(summary["app"], ("restarting".to_string(), 1));
        assert_eq!(summary["db"], ("ready".to_string(), 0));
        // Every kind's text is what the supervisor writes.
        assert_eq!(EventKind::ALL.map(EventKind::as_str).len(), 7);
    }
}
