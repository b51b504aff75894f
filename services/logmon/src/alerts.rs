//! The alert history: SQLite at `<state>/alerts.db` (WAL, schema versioned with
//! `PRAGMA user_version`), written only by the log monitor, read by the status page and CLI.
//!
//! A separate file from the supervisor's `state.db` on purpose: SQLite allows one writer at a
//! time, and PID 1's event writes must never wait for the monitor's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::engine::{Alert, AlertState};
use crate::Error;

/// File name of the alert database inside the state directory.
pub const ALERTS_DB_FILE: &str = "alerts.db";
/// The log monitor's own directory below the state directory (it runs as its own user and
/// may write nowhere else there).
pub const ALERTS_SUBDIR: &str = "logmon";
/// Rows of history kept: after every insert, resolved alerts older than the newest this many
/// are deleted, so a flood of alerts cannot fill the data partition. Firing alerts are kept
/// (the engine holds at most `engine::MAX_ALERT_KEYS` of them).
pub const MAX_ALERTS_KEPT: i64 = 10_000;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Forward migrations; migration `i` takes the schema from version `i` to `i + 1`. Never edit
/// one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &["CREATE TABLE alerts (
        id INTEGER PRIMARY KEY,
        rule TEXT NOT NULL,
        subject TEXT NOT NULL,
        severity TEXT NOT NULL,
        state TEXT NOT NULL,
        message TEXT NOT NULL,
        fired_ms INTEGER NOT NULL,
        resolved_ms INTEGER NULL
    );
    CREATE INDEX alerts_by_state ON alerts (state, id);
    CREATE TABLE cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `<state_dir>/logmon/alerts.db`.
pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join(ALERTS_SUBDIR).join(ALERTS_DB_FILE)
}

/// The newest `limit` alerts (firing or resolved), newest first. For the status page and CLI.
pub fn recent(db_path: &Path, limit: usize) -> Result<Vec<Alert>, Error> {
    AlertDb::open_read_only(db_path)?.recent(limit)
}

/// Every alert firing now, oldest first.
pub fn firing(db_path: &Path) -> Result<Vec<Alert>, Error> {
    AlertDb::open_read_only(db_path)?.firing()
}

pub struct AlertDb {
    conn: Connection,
    path: PathBuf,
    /// [`MAX_ALERTS_KEPT`]; smaller in tests.
    max_kept: i64,
}

const COLUMNS: &str = "id, rule, subject, severity, state, message, fired_ms, resolved_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Alert> {
    let state: String = r.get(4)?;
    Ok(Alert {
        id: r.get(0)?,
        rule: r.get(1)?,
        subject: r.get(2)?,
        severity: r.get(3)?,
        state: if state == "firing" {
            AlertState::Firing
        } else {
            AlertState::Resolved
        },
        message: r.get(5)?,
        fired_ms: r.get(6)?,
        resolved_ms: r.get(7)?,
    })
}

impl AlertDb {
    /// Opens (creating and migrating) the database for writing.
    pub fn open(path: &Path) -> Result<AlertDb, Error> {
        let err = |source| Error::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        match api::sqlite::migrate(&mut conn, MIGRATIONS) {
            Ok(_) => {}
            Err(api::sqlite::MigrateError::TooNew { found, known }) => {
                return Err(Error::SchemaTooNew {
                    path: path.to_path_buf(),
                    found,
                    supported: known,
                })
            }
            Err(api::sqlite::MigrateError::Sqlite(source)) => return Err(err(source)),
        }
        let db = AlertDb {
            conn,
            path: path.to_path_buf(),
            max_kept: MAX_ALERTS_KEPT,
        };
        db.prune()?;
        Ok(db)
    }

    /// Opens an existing database read-only.
    pub fn open_read_only(path: &Path) -> Result<AlertDb, Error> {
        let err = |source| Error::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        Ok(AlertDb {
            conn,
            path: path.to_path_buf(),
            max_kept: MAX_ALERTS_KEPT,
        })
    }

    /// Deletes resolved alerts older than the newest `max_kept` rows. Row ids only grow, so
    /// at most `max_kept` rows (plus the firing ones) remain.
    fn prune(&self) -> Result<(), Error> {
        self.conn
            .execute(
                "DELETE FROM alerts WHERE state = 'resolved' AND id <= (SELECT MAX(id) FROM alerts) - ?1",
                params![self.max_kept],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    fn err(&self, source: rusqlite::Error) -> Error {
        Error::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Stores a transition from the engine: a firing alert is inserted, a resolved one
    /// updates its row. Returns the alert with its row id.
    pub fn record(&self, alert: &Alert) -> Result<Alert, Error> {
        let mut stored = alert.clone();
        match alert.state {
            AlertState::Firing => {
                self.conn
                    .execute(
                        "INSERT INTO alerts (rule, subject, severity, state, message, fired_ms, resolved_ms)
                         VALUES (?1, ?2, ?3, 'firing', ?4, ?5, NULL)",
                        params![alert.rule, alert.subject, alert.severity, alert.message, alert.fired_ms],
                    )
                    .map_err(|e| self.err(e))?;
                stored.id = self.conn.last_insert_rowid();
                // A range delete on the primary key: cheap enough for every insert.
                self.prune()?;
            }
            AlertState::Resolved => {
                let id: Option<i64> = self
                    .conn
                    .query_row(
                        "SELECT id FROM alerts WHERE (id = ?1) OR (?1 = 0 AND rule = ?2 AND subject = ?3 AND state = 'firing')
                         ORDER BY id DESC LIMIT 1",
                        params![alert.id, alert.rule, alert.subject],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(|e| self.err(e))?;
                if let Some(id) = id {
                    self.conn
                        .execute(
                            "UPDATE alerts SET state = 'resolved', resolved_ms = ?2 WHERE id = ?1",
                            params![id, alert.resolved_ms],
                        )
                        .map_err(|e| self.err(e))?;
                    stored.id = id;
                }
            }
        }
        Ok(stored)
    }

    /// The newest `limit` alerts, newest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<Alert>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.query(
            &format!("SELECT {COLUMNS} FROM alerts ORDER BY id DESC LIMIT ?1"),
            params![limit],
        )
    }

    /// Alerts firing now, oldest first.
    pub fn firing(&self) -> Result<Vec<Alert>, Error> {
        self.query(
            &format!("SELECT {COLUMNS} FROM alerts WHERE state = 'firing' ORDER BY id"),
            params![],
        )
    }

    /// What the engine must know after a restart: alerts firing, and any fired since
    /// `since_ms` (for the cool-down). Oldest first.
    pub fn restorable(&self, since_ms: i64) -> Result<Vec<Alert>, Error> {
        self.query(
            &format!(
                "SELECT {COLUMNS} FROM alerts WHERE state = 'firing' OR fired_ms >= ?1 ORDER BY id"
            ),
            params![since_ms],
        )
    }

    fn query(&self, sql: &str, args: impl rusqlite::Params) -> Result<Vec<Alert>, Error> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map(args, row).map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// A named position (e.g. the last supervisor event read).
    pub fn cursor(&self, name: &str) -> Result<Option<i64>, Error> {
        self.conn
            .query_row(
                "SELECT value FROM cursors WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn set_cursor(&self, name: &str, value: i64) -> Result<(), Error> {
        self.conn
            .execute(
                "INSERT INTO cursors (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![name, value],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(rule: &str, state: AlertState, fired_ms: i64) -> Alert {
        Alert {
            id: 0,
            rule: rule.into(),
            subject: "web".into(),
            severity: "critical".into(),
            state,
            message: format!("{rule} of web"),
            fired_ms,
            resolved_ms: None,
        }
    }

    #[test]
    fn stores_transitions_and_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(dir.path());
        let db = AlertDb::open(&path).unwrap();
        let a = db
            .record(&alert("crash-loop", AlertState::Firing, 1000))
            .unwrap();
        let b = db
            .record(&alert("service-restarted", AlertState::Firing, 1100))
            .unwrap();
        assert!(a.id > 0 && b.id > a.id);
        let mut resolved = a.clone();
        resolved.state = AlertState::Resolved;
        resolved.resolved_ms = Some(5000);
        db.record(&resolved).unwrap();
        // Without an id, the firing row of the same rule and subject is resolved.
        let mut resolved_b = alert("service-restarted", AlertState::Resolved, 1100);
        resolved_b.resolved_ms = Some(6000);
        assert_eq!(db.record(&resolved_b).unwrap().id, b.id);

        let recent = recent(&path, 10).unwrap();
        assert_eq!(recent.len(), 2);
        assert_eq!(
            (
                recent[1].rule.as_str(),
                recent[1].state,
                recent[1].resolved_ms
            ),
            ("crash-loop", AlertState::Resolved, Some(5000))
        );
        assert!(firing(&path).unwrap().is_empty());
        assert_eq!(db.restorable(1050).unwrap().len(), 1);

        assert_eq!(db.cursor("events").unwrap(), None);
        db.set_cursor("events", 5).unwrap();
        db.set_cursor("events", 9).unwrap();
        drop(db);
        let db = AlertDb::open(&path).unwrap();
        assert_eq!(db.cursor("events").unwrap(), Some(9));
    }

    #[test]
    fn history_is_capped_oldest_resolved_first_firing_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = AlertDb::open(&db_path(dir.path())).unwrap();
        db.max_kept = 50;
        let kept = db
            .record(&alert("disk-usage", AlertState::Firing, 0))
            .unwrap();
        for n in 1..=500 {
            let fired = db
                .record(&alert("service-restarted", AlertState::Firing, n))
                .unwrap();
            let mut resolved = fired;
            resolved.state = AlertState::Resolved;
            resolved.resolved_ms = Some(n + 1);
            db.record(&resolved).unwrap();
        }
        let all = db.recent(usize::MAX).unwrap();
        // The newest 50 (the oldest resolved went first) and the firing one from the start.
        assert_eq!(all.len(), 51, "{} rows", all.len());
        assert_eq!(all.first().map(|a| a.fired_ms), Some(500));
        assert_eq!(all[all.len() - 2].fired_ms, 451);
        assert_eq!(
            all.last().map(|a| (a.id, a.state)),
            Some((kept.id, AlertState::Firing))
        );
    }
}
