//! The settings store: `<state>/settings/settings.db` on the data partition (root's; the
//! directory 0700, as it holds the cluster secret and the served key). Each setup or change is
//! one row written in one transaction (with `synchronous = FULL`), and the rows before it are
//! deleted in the same transaction: a power cut leaves the old settings or the new ones, never
//! a mix, and no old secret lingers.

use std::path::{Path, PathBuf};

use api::settings::{SETTINGS_DB_FILE, SETTINGS_DIR};
use cluster_config::settings::Settings;
use rusqlite::{Connection, OptionalExtension as _};

/// Never edit a shipped migration: append one.
const MIGRATIONS: &[&str] = &["CREATE TABLE settings (
        revision INTEGER PRIMARY KEY AUTOINCREMENT,
        applied_at INTEGER NOT NULL,
        origin TEXT NOT NULL CHECK (origin IN ('seed', 'wizard', 'admin')),
        settings TEXT NOT NULL
    );"];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("settings store {}: {source}", .path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("settings store {}: {source}", .path.display())]
    Migrate {
        path: PathBuf,
        source: api::sqlite::MigrateError,
    },
    #[error("settings store {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("settings store {}, revision {revision}: {message}", .path.display())]
    Unreadable {
        path: PathBuf,
        revision: u64,
        message: String,
    },
}

/// Where a stored revision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A complete seed, stored at the first boot.
    Seed,
    /// The first-boot wizard (web or serial console).
    Wizard,
    /// A change on the admin page.
    Admin,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Seed => "seed",
            Origin::Wizard => "wizard",
            Origin::Admin => "admin",
        }
    }
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating when absent) the store below `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let dir = state_dir.join(SETTINGS_DIR);
        let path = dir.join(SETTINGS_DB_FILE);
        let io = |source| StoreError::Io {
            path: dir.clone(),
            source,
        };
        {
            use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(e)),
                _ => {}
            }
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        // FULL: a committed setup survives a power cut that follows at once.
        let mut conn = api::sqlite::open_checked(&path, "FULL", std::time::Duration::from_secs(5))
            .map_err(err)?;
        api::sqlite::migrate(&mut conn, MIGRATIONS).map_err(|source| StoreError::Migrate {
            path: path.clone(),
            source,
        })?;
        Ok(Store { conn, path })
    }

    /// The newest settings and their revision; `None` before the first setup.
    pub fn current(&self) -> Result<Option<(u64, Settings)>, StoreError> {
        let row: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT revision, settings FROM settings ORDER BY revision DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|source| StoreError::Sqlite {
                path: self.path.clone(),
                source,
            })?;
        match row {
            None => Ok(None),
            Some((revision, json)) => {
                let revision = u64::try_from(revision).unwrap_or(0);
                Settings::from_json(&json)
                    .map(|s| Some((revision, s)))
                    .map_err(|message| StoreError::Unreadable {
                        path: self.path.clone(),
                        revision,
                        message,
                    })
            }
        }
    }

    /// Stores `settings` as the new revision (one transaction), returning it.
    pub fn save(
        &mut self,
        settings: &Settings,
        origin: Origin,
        now_unix: i64,
    ) -> Result<u64, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT INTO settings (applied_at, origin, settings) VALUES (?1, ?2, ?3)",
            rusqlite::params![now_unix, origin.as_str(), settings.to_json()],
        )
        .map_err(err)?;
        let revision = tx.last_insert_rowid();
        tx.execute("DELETE FROM settings WHERE revision < ?1", [revision])
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(u64::try_from(revision).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::settings::{Secret, TlsChoice};
    use std::os::unix::fs::PermissionsExt as _;

    fn settings(node: &str) -> Settings {
        Settings {
            version: cluster_config::settings::SETTINGS_VERSION,
            node: node.into(),
            admin_password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
            metrics_token: Secret::new("cd".repeat(32)),
            cluster_secret: Secret::new("ab".repeat(32)),
            tls: TlsChoice::SelfSigned,
            webhook: None,
        }
    }

    #[test]
    fn one_revision_at_a_time_in_a_private_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.current().unwrap(), None);
        let first = store.save(&settings("server1"), Origin::Wizard, 1).unwrap();
        let second = store.save(&settings("server2"), Origin::Admin, 2).unwrap();
        assert!(second > first);
        assert_eq!(
            store.current().unwrap(),
            Some((second, settings("server2")))
        );
        let mode = std::fs::metadata(dir.path().join("settings"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // Older revisions (and their secrets) are gone.
        let rows: i64 = store
            .conn
            .query_row("SELECT count(*) FROM settings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
        drop(store);
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.current().unwrap().unwrap().0, second);
    }

    #[test]
    fn a_corrupt_store_is_an_error_not_a_wizard() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.save(&settings("server1"), Origin::Seed, 1).unwrap();
        drop(store);
        let db = dir.path().join("settings/settings.db");
        let mut bytes = std::fs::read(&db).unwrap();
        for b in &mut bytes[100..4096] {
            *b = 0xff;
        }
        std::fs::write(&db, bytes).unwrap();
        let _ = std::fs::remove_file(dir.path().join("settings/settings.db-wal"));
        assert!(Store::open(dir.path()).and_then(|s| s.current()).is_err());
    }
}
