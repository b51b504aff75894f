//! Reads the supervisor's events from its state DB (`<state>/state.db`, table `events`,
//! written by `appliance::state`), read-only, polling by id. The table's columns are the
//! contract: `id, ts_ms, service, kind, pid, detail`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

use crate::Error;

/// The supervisor's database file inside the state directory.
pub const STATE_DB_FILE: &str = "state.db";
/// At most this many events are read per poll.
pub const BATCH: i64 = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    pub ts_ms: i64,
    pub service: String,
    pub kind: String,
    pub detail: String,
}

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

    fn err(&self, source: rusqlite::Error) -> Error {
        Error::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The connection, opened on first use; `None` while the supervisor has not created the
    /// database yet.
    fn conn(&mut self) -> Result<Option<&Connection>, Error> {
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
    pub fn after(&mut self, after_id: i64) -> Result<Vec<Event>, Error> {
        let Some(conn) = self.conn()? else {
            return Ok(Vec::new());
        };
        let rows = (|| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, ts_ms, service, kind, detail FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after_id, BATCH], |r| {
                Ok(Event {
                    id: r.get(0)?,
                    ts_ms: r.get(1)?,
                    service: r.get(2)?,
                    kind: r.get(3)?,
                    detail: r.get(4)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        })();
        rows.map_err(|e| self.err(e))
    }

    /// The highest event id, and the id just before the first event at or after `since_ms`.
    /// `None` while there is no database.
    pub fn positions(&mut self, since_ms: i64) -> Result<Option<(i64, i64)>, Error> {
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
    pub fn summary(&mut self, up_to: i64) -> Result<BTreeMap<String, (String, u64)>, Error> {
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
