//! The state database: SQLite at `<state_dir>/state.db`, WAL mode, schema versioned with
//! `PRAGMA user_version` and migrated forward on open.
//!
//! The supervisor's event loop is the only writer; each write is its own transaction. Readers
//! (`status`, tests) may open the same file concurrently.

use std::path::{Path, PathBuf};
use std::time::Duration;

use api::events::MIGRATIONS;
use api::events::{EventKind, EventRecord, SCHEMA_VERSION, STATE_DB_FILE};
use api::sqlite::MigrateError;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

/// Oldest events beyond this many are deleted when the database is opened for writing.
pub const MAX_EVENTS_KEPT: i64 = 100_000;
/// How long a statement waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state DB {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state DB {path} has schema version {found}, newer than this binary's {SCHEMA_VERSION}"
    )]
    TooNew { path: PathBuf, found: i64 },
}

impl StateError {
    /// Whether the file is damaged (as opposed to unreachable, full or from a newer binary).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            StateError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
            )
        )
    }
}

/// How [`StateDb::open_or_recover`] came by its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The file opened as it was.
    None,
    /// The file was damaged: moved to `to`, and a new one created.
    MovedAside { to: PathBuf, error: String },
    /// The file could not be used (full disk, I/O error, newer schema): events of this run are
    /// kept in memory only.
    InMemory { error: String },
}

pub struct StateDb {
    conn: Connection,
    path: PathBuf,
}

impl StateDb {
    /// Opens (creating and migrating as needed) `<state_dir>/state.db` for writing.
    pub fn open(state_dir: &Path) -> Result<StateDb, StateError> {
        let path = state_dir.join(STATE_DB_FILE);
        let err = |source| StateError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = api::sqlite::open_checked(&path, "NORMAL", BUSY_TIMEOUT).map_err(err)?;
        Self::migrate(conn, path)
    }

    /// The database of a run that cannot keep one on disk: same schema, gone at exit.
    pub fn in_memory() -> Result<StateDb, StateError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| StateError::Sqlite {
            path: path.clone(),
            source,
        })?;
        Self::migrate(conn, path)
    }

    /// Opens `<state_dir>/state.db`, and when that fails still returns a database, so that a
    /// corrupt file or a full disk never stops the node from starting (PID 1 would reboot into
    /// the same fault every few seconds). A corrupt file is moved aside (kept for whoever looks)
    /// and a new one created; anything else (full disk, I/O error, a newer schema after a
    /// rollback, which must not be destroyed) gives an in-memory database for this run.
    pub fn open_or_recover(state_dir: &Path, now_ms: i64) -> (StateDb, Recovery) {
        let first = match StateDb::open(state_dir) {
            Ok(db) => return (db, Recovery::None),
            Err(e) => e,
        };
        if first.is_corruption() {
            let path = state_dir.join(STATE_DB_FILE);
            let aside = state_dir.join(format!("{STATE_DB_FILE}.corrupt-{now_ms}"));
            let moved = std::fs::rename(&path, &aside).map(|()| {
                // Best effort: the new database is wanted even if they stay.
                let _ = api::sqlite::move_wal_files(&path, &aside);
            });
            if moved.is_ok() {
                if let Ok(db) = StateDb::open(state_dir) {
                    return (
                        db,
                        Recovery::MovedAside {
                            to: aside,
                            error: first.to_string(),
                        },
                    );
                }
            }
        }
        match StateDb::in_memory() {
            Ok(db) => (
                db,
                Recovery::InMemory {
                    error: first.to_string(),
                },
            ),
            // SQLite in memory fails only without memory; nothing sensible is left to do.
            Err(e) => panic!("no state DB on disk ({first}) nor in memory ({e})"),
        }
    }

    fn migrate(mut conn: Connection, path: PathBuf) -> Result<StateDb, StateError> {
        let err = |source| StateError::Sqlite {
            path: path.clone(),
            source,
        };
        match api::sqlite::migrate(&mut conn, MIGRATIONS) {
            Ok(_) => {}
            Err(MigrateError::TooNew { found, .. }) => {
                return Err(StateError::TooNew { path, found })
            }
            Err(MigrateError::Sqlite(source)) => return Err(err(source)),
        }
        conn.execute(
            "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?1",
            params![MAX_EVENTS_KEPT],
        )
        .map_err(err)?;
        Ok(StateDb { conn, path })
    }

    /// Opens an existing database read-only (for `status` and tests).
    pub fn open_read_only(state_dir: &Path) -> Result<StateDb, StateError> {
        let path = state_dir.join(STATE_DB_FILE);
        let err = |source| StateError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        Ok(StateDb { conn, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> StateError {
        StateError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends an event (its own transaction) and returns it as stored.
    pub fn record(
        &self,
        ts_ms: i64,
        service: &str,
        kind: EventKind,
        pid: Option<i32>,
        detail: &str,
    ) -> Result<EventRecord, StateError> {
        self.conn
            .execute(
                "INSERT INTO events (ts_ms, service, kind, pid, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![ts_ms, service, kind.as_str(), pid, detail],
            )
            .map_err(|e| self.err(e))?;
        let id = self.conn.last_insert_rowid();
        Ok(EventRecord {
            id,
            ts_ms,
            service: service.into(),
            kind: kind.as_str().into(),
            pid,
            detail: detail.into(),
        })
    }

    /// The last `limit` events, oldest first; only `service`'s when given.
    pub fn recent(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StateError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, ts_ms, service, kind, pid, detail FROM events
                 WHERE ?1 IS NULL OR service = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![service, limit], EventRecord::from_row)
            .map_err(|e| self.err(e))?;
        let mut events = rows
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        events.reverse();
        Ok(events)
    }

    /// The schema version stored in the file.
    pub fn schema_version(&self) -> Result<i64, StateError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// The newest event of `service`, if any.
    pub fn last_event(&self, service: &str) -> Result<Option<EventRecord>, StateError> {
        self.conn
            .query_row(
                "SELECT id, ts_ms, service, kind, pid, detail FROM events WHERE service = ?1
                 ORDER BY id DESC LIMIT 1",
                params![service],
                EventRecord::from_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_queries() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
        db.record(1, "db", EventKind::Started, Some(10), "mariadbd")
            .unwrap();
        db.record(2, "app", EventKind::Started, Some(11), "app")
            .unwrap();
        db.record(3, "db", EventKind::Exited, Some(10), "signal 9 (SIGKILL)")
            .unwrap();
        let kinds =
            |events: Vec<EventRecord>| events.into_iter().map(|e| e.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(db.recent(None, 10).unwrap()),
            ["started", "started", "exited"]
        );
        assert_eq!(kinds(db.recent(Some("db"), 1).unwrap()), ["exited"]);
        assert_eq!(db.last_event("app").unwrap().unwrap().pid, Some(11));
        drop(db);

        // Reopening migrates nothing and keeps the rows; a reader sees them too.
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.recent(None, 10).unwrap().len(), 3);
        let reader = StateDb::open_read_only(dir.path()).unwrap();
        assert_eq!(reader.recent(Some("app"), 10).unwrap().len(), 1);
        assert!(reader.record(4, "x", EventKind::Ready, None, "").is_err());
    }

    #[test]
    fn a_corrupt_state_db_is_moved_aside_and_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        db.record(1, "db", EventKind::Started, Some(10), "mariadbd")
            .unwrap();
        drop(db);
        // A torn write: the header survives, the pages do not.
        let path = dir.path().join(STATE_DB_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        for b in bytes.iter_mut().skip(100) {
            *b = 0xA5;
        }
        std::fs::write(&path, &bytes).unwrap();
        assert!(StateDb::open(dir.path()).err().unwrap().is_corruption());

        let (db, recovery) = StateDb::open_or_recover(dir.path(), 42);
        let Recovery::MovedAside { to, .. } = recovery else {
            panic!("{recovery:?}")
        };
        assert_eq!(to, dir.path().join("state.db.corrupt-42"));
        assert_eq!(
            std::fs::read(&to).unwrap(),
            bytes,
            "the damaged file is kept as it was"
        );
        assert_eq!(db.path(), path);
        db.record(2, "db", EventKind::Ready, None, "").unwrap();
        assert_eq!(db.recent(None, 10).unwrap().len(), 1);

        // Not a database at all (a file of zeros after a crash): the same.
        drop(db);
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let (_, recovery) = StateDb::open_or_recover(dir.path(), 43);
        assert!(
            matches!(recovery, Recovery::MovedAside { .. }),
            "{recovery:?}"
        );
    }

    #[test]
    fn a_newer_schema_is_kept_and_this_run_keeps_events_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(STATE_DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let (db, recovery) = StateDb::open_or_recover(dir.path(), 1);
        assert!(
            matches!(&recovery, Recovery::InMemory { error } if error.contains("newer")),
            "{recovery:?}"
        );
        db.record(1, "db", EventKind::Ready, None, "").unwrap();
        assert_eq!(db.recent(None, 10).unwrap().len(), 1);
        // Left for the newer binary a rollback came from: same schema version, not moved.
        let conn = Connection::open(dir.path().join(STATE_DB_FILE)).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION + 1);
    }

    /// A tmpfs of `size` on a temporary directory, unmounted on drop. Needs root (CI is).
    struct SmallFs(tempfile::TempDir);

    impl SmallFs {
        fn mount(size: &str) -> SmallFs {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .expect("running mount");
            assert!(
                status.success(),
                "mounting a small tmpfs failed ({status}): this test needs root, to fill a filesystem"
            );
            SmallFs(dir)
        }

        fn fill(&self) {
            use std::io::Write as _;
            let mut f = std::fs::File::create(self.0.path().join("filler")).unwrap();
            let block = vec![0u8; 4096];
            while f.write_all(&block).is_ok() {}
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_full_disk_neither_stops_the_state_db_nor_the_boot_count() {
        let fs = SmallFs::mount("256k");
        fs.fill();
        let (db, recovery) = StateDb::open_or_recover(fs.0.path(), 1);
        assert!(
            matches!(recovery, Recovery::InMemory { .. }),
            "{recovery:?}"
        );
        db.record(1, "db", EventKind::Ready, None, "").unwrap();
        assert!(crate::files::count_boot(fs.0.path()).is_err());
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(STATE_DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = StateDb::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("newer than this binary"), "{err}");
    }

    #[test]
    fn a_state_db_of_the_previous_release_is_migrated_forward_with_its_events() {
        // Schema 1 (events only), as the release before update records wrote it.
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(STATE_DB_FILE)).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO events (ts_ms, service, kind, pid, detail) VALUES (5, 'nginx', 'ready', 9, '')",
            [],
        )
        .unwrap();
        drop(conn);

        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.schema_version().unwrap(), 2);
        assert_eq!(db.last_event("nginx").unwrap().unwrap().pid, Some(9));
        drop(db);
        // The new table takes the update service's records and checks their state.
        let conn = Connection::open(dir.path().join(STATE_DB_FILE)).unwrap();
        conn.execute(
            "INSERT INTO update_versions (version, state, slot, ts_ms, detail) VALUES ('0.2.0', 'bad', 'b', 1, 'trial failed')",
            [],
        )
        .unwrap();
        assert!(conn
            .execute(
                "INSERT INTO update_versions (version, state, slot, ts_ms, detail) VALUES ('0.3.0', 'maybe', 'b', 1, '')",
                [],
            )
            .is_err());
    }
}
