//! SQLite schema versions: every Tandem database (the supervisor's `state.db`, the log
//! monitor's `alerts.db`) is migrated forward by this one helper.
//!
//! The schema version is `PRAGMA user_version`; migration `i` takes the schema from version
//! `i` to `i + 1`, in its own transaction with the version bump, so a crash leaves the file at
//! one version or the next. A file from a newer binary (after a rollback) is refused untouched.
//!
//! A database file moved (aside when corrupt, into a new directory) takes its WAL along
//! ([`move_wal_files`]).

use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// Why a database could not be brought to this binary's schema.
#[derive(Debug)]
pub enum MigrateError {
    Sqlite(rusqlite::Error),
    /// The file's schema version is newer than the newest migration this binary knows.
    TooNew {
        found: i64,
        known: i64,
    },
}

impl std::fmt::Display for MigrateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrateError::Sqlite(e) => write!(f, "{e}"),
            MigrateError::TooNew { found, known } => write!(
                f,
                "schema version {found} is newer than this binary's {known} (written by a newer release?)"
            ),
        }
    }
}

impl std::error::Error for MigrateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MigrateError::Sqlite(e) => Some(e),
            MigrateError::TooNew { .. } => None,
        }
    }
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sqlite(e)
    }
}

/// Opens (creating when absent) a database file in WAL mode with `synchronous` (`NORMAL` or
/// `FULL`) and a busy timeout of `busy`, and looks at it once with `quick_check`: a torn or
/// bit-flipped file often opens fine and fails later, so a damaged one is an
/// `SQLITE_CORRUPT` error here, up front.
pub fn open_checked(
    path: &Path,
    synchronous: &str,
    busy: std::time::Duration,
) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    let check: String = conn.pragma_query_value(None, "quick_check", |r| r.get(0))?;
    if check != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(format!("quick_check: {check}")),
        ));
    }
    Ok(conn)
}

/// The version a database is at after `migrations`.
pub fn version_of(migrations: &[&str]) -> i64 {
    i64::try_from(migrations.len()).unwrap_or(i64::MAX)
}

/// Applies the migrations `conn` has not had yet; returns the version it was found at.
/// Never edit a migration that has shipped: append a new one.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<i64, MigrateError> {
    let known = version_of(migrations);
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > known {
        return Err(MigrateError::TooNew { found, known });
    }
    for (from, sql) in migrations
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version_of(&migrations[..=from]))?;
        tx.commit()?;
    }
    Ok(found)
}

/// Moves the `-wal` and `-shm` files of the database `from` to the names they take beside `to`,
/// once the caller has moved `from` to `to` itself: they belong to that database (a WAL left
/// behind would be read as the next database's at that name). One that does not exist is
/// skipped; every one is tried, and the first failure returned (naming the file).
pub fn move_wal_files(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut first = Ok(());
    for suffix in ["-wal", "-shm"] {
        let (src, dst) = (with_suffix(from, suffix), with_suffix(to, suffix));
        match std::fs::rename(&src, &dst) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound && first.is_ok() => {
                first = Err(std::io::Error::new(
                    e.kind(),
                    format!("moving {} to {}: {e}", src.display(), dst.display()),
                ));
            }
            _ => {}
        }
    }
    first
}

/// `path` with `suffix` appended to its file name (`state.db` → `state.db-wal`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &[&str] = &["CREATE TABLE a (x INTEGER);"];
    const V2: &[&str] = &[
        "CREATE TABLE a (x INTEGER);",
        "ALTER TABLE a ADD COLUMN y TEXT;",
    ];

    fn version(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn migrations_apply_once_in_order_and_a_newer_file_is_refused_untouched() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn, V1).unwrap(), 0);
        conn.execute("INSERT INTO a (x) VALUES (1)", []).unwrap();
        assert_eq!(migrate(&mut conn, V2).unwrap(), 1);
        assert_eq!(version(&conn), 2);
        // Idempotent; the row survived the migration.
        assert_eq!(migrate(&mut conn, V2).unwrap(), 2);
        let y: Option<String> = conn.query_row("SELECT y FROM a", [], |r| r.get(0)).unwrap();
        assert_eq!(y, None);
        // An older binary refuses the newer file and leaves it at its version.
        let err = migrate(&mut conn, V1).unwrap_err();
        assert!(
            matches!(err, MigrateError::TooNew { found: 2, known: 1 }),
            "{err}"
        );
        assert!(
            err.to_string().contains("newer than this binary's 1"),
            "{err}"
        );
        assert_eq!(version(&conn), 2);
    }

    #[test]
    fn a_failing_migration_leaves_the_previous_version() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, V1).unwrap();
        let bad: &[&str] = &[V1[0], "ALTER TABLE a ADD COLUMN y TEXT; SYNTAX ERROR;"];
        assert!(migrate(&mut conn, bad).is_err());
        assert_eq!(version(&conn), 1);
        // The failed transaction added no column.
        assert!(conn.query_row("SELECT y FROM a", [], |_| Ok(())).is_err());
    }

    #[test]
    fn a_database_moved_takes_its_wal_and_shm_files_along() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a.db"), dir.path().join("sub/a.db.old"));
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(&from, "db").unwrap();
        std::fs::write(dir.path().join("a.db-wal"), "wal").unwrap();
        std::fs::rename(&from, &to).unwrap();
        // No -shm: skipped.
        move_wal_files(&from, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("sub/a.db.old-wal")).unwrap(),
            "wal"
        );
        assert!(!dir.path().join("a.db-wal").exists());
        assert!(!dir.path().join("sub/a.db.old-shm").exists());
        // A -wal that cannot move (a directory holds its new name) is reported; the -shm still
        // goes.
        std::fs::write(dir.path().join("a.db-wal"), "wal 2").unwrap();
        std::fs::write(dir.path().join("a.db-shm"), "shm").unwrap();
        std::fs::remove_file(dir.path().join("sub/a.db.old-wal")).unwrap();
        std::fs::create_dir(dir.path().join("sub/a.db.old-wal")).unwrap();
        std::fs::write(dir.path().join("sub/a.db.old-wal/x"), "").unwrap();
        let e = move_wal_files(&from, &to).unwrap_err();
        assert!(e.to_string().contains("a.db-wal"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("sub/a.db.old-shm")).unwrap(),
            "shm"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.db-wal")).unwrap(),
            "wal 2"
        );
    }
}
