//! The notes, in MariaDB through `mysql_async`: reads from the node's own server, writes to the
//! primary. One connection pool per server: the local one, and the current primary's when that is
//! another node (a switchover gets a new pool; the old primary's is closed). Every connection is
//! TLS, the server's certificate checked against the cluster CA and the server's address; every
//! statement is prepared, its text and numbers sent as parameters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use mysql_async::prelude::Queryable as _;
use mysql_async::{Conn, IoError, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, SslOpts};
use serde::{Deserialize, Serialize};

/// Notes listed per page (and per JSON answer), newest first; older ones are on further pages.
pub const PAGE_SIZE: usize = 50;
/// Longest note accepted, in bytes of UTF-8 (after trimming).
pub const MAX_NOTE_BYTES: usize = 2000;
/// Notes the application stores at most; beyond it, writes are refused (nothing is deleted).
/// Concurrent writers may each pass the check once, so the table can exceed it by the number of
/// writes in flight.
pub const MAX_NOTES: u64 = 10_000;
/// No statement may run longer on the server (seconds), so a stuck server cannot pile up
/// requests; the client gives up a second later.
const STATEMENT_TIMEOUT_S: u64 = 5;
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(STATEMENT_TIMEOUT_S + 1);
/// Taking a connection from a pool (connecting, TLS, login when none is idle).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections per pool: as many as requests at once need (the rest wait for one), few enough
/// that every node's application fits in the primary's `max_connections` (151).
const POOL_MAX: usize = 16;
/// An idle connection beyond the first is closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// Error codes of the MariaDB client library, kept for errors that are not the server's (the
/// driver's own errors carry none), so one table says which errors wrote nothing.
pub const CR_CONN_HOST_ERROR: u32 = 2003;
/// The connection was lost while a statement ran: it may have been applied.
pub const CR_SERVER_LOST: u32 = 2013;
/// TLS failed (the server's certificate not from the cluster CA or not for its address).
pub const CR_SSL_CONNECTION_ERROR: u32 = 2026;

/// Errors after which nothing was written: the server is read-only (1290, 1836: a switchover
/// froze the old primary), could not be reached (2002, 2003: no statement was sent), or rolled
/// the statement back (1213 deadlock, 1205 lock wait timeout). A connection lost during a
/// statement (2013) is not among them: it may have committed.
pub const NOT_APPLIED: &[u32] = &[1290, 1836, 2002, CR_CONN_HOST_ERROR, 1213, 1205];

/// Error codes that mean "the table is not there yet" (a fresh cluster, nothing written).
pub const ER_NO_SUCH_TABLE: u32 = 1146;
/// The database itself is not there yet.
pub const ER_BAD_DB: u32 = 1049;

/// The table, created on the primary before its first write (it replicates to every node).
pub const SCHEMA_SQL: &str = "CREATE TABLE IF NOT EXISTS notes (\
id BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY, \
node VARCHAR(64) NOT NULL, \
body TEXT NOT NULL, \
created TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

/// Run once on every new connection. READ COMMITTED so that counting before an insert takes no
/// shared locks: concurrent writers never deadlock on the check.
const SESSION_SQL: [&str; 2] = [
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "SET SESSION max_statement_time = 5",
];
const _: () = assert!(
    STATEMENT_TIMEOUT_S == 5,
    "SESSION_SQL names the same timeout"
);

/// A page: the notes older than the first parameter (a note id), newest first, at most the
/// second parameter of them. [`Store::list`] asks for one more than a page, to know whether an
/// older page exists.
pub const LIST_SQL: &str = "SELECT id, node, body, DATE_FORMAT(created, '%Y-%m-%d %H:%i:%s.%f') \
FROM notes WHERE id < ? ORDER BY id DESC LIMIT ?";

/// Inserts a note (node, body) unless the third parameter ([`MAX_NOTES`]) are stored: no row
/// is affected when the table is full.
pub const INSERT_SQL: &str = "INSERT INTO notes (node, body) SELECT ?, ? FROM DUAL \
WHERE (SELECT COUNT(*) FROM notes) < ?";

/// The note just inserted, by id, as the server stored it.
pub const NOTE_SQL: &str = "SELECT id, node, body, DATE_FORMAT(created, '%Y-%m-%d %H:%i:%s.%f') \
FROM notes WHERE id = ?";

/// A note as stored and answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    pub id: u64,
    /// The node whose application took the write.
    pub node: String,
    pub body: String,
    pub created: String,
}

type NoteRow = (u64, String, String, String);

impl From<NoteRow> for Note {
    fn from((id, node, body, created): NoteRow) -> Note {
        Note {
            id,
            node,
            body,
            created,
        }
    }
}

/// A page of notes, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub notes: Vec<Note>,
    /// The `before` of the next (older) page, when there is one.
    pub older: Option<u64>,
}

impl Page {
    /// A page from up to `PAGE_SIZE + 1` notes, newest first: the one beyond a page only says
    /// that an older page exists.
    pub fn from_notes(mut notes: Vec<Note>) -> Page {
        let older = match notes.len() > PAGE_SIZE {
            true => {
                notes.truncate(PAGE_SIZE);
                notes.last().map(|n| n.id)
            }
            false => None,
        };
        Page { notes, older }
    }
}

/// Why the database did not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The server's error, or the driver's (with the client library's code for it, see
    /// [`CR_CONN_HOST_ERROR`]).
    #[error("database {server}: {message}")]
    Sql {
        server: String,
        code: Option<u32>,
        message: String,
    },
    #[error("database {server}: unexpected answer: {detail}")]
    Answer { server: String, detail: String },
    #[error("the notes are full: {max} are stored, the most this application keeps")]
    Full { max: u64 },
}

impl StoreError {
    /// The MariaDB error code, when there is one.
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

/// Where a driver error happened: before any statement was sent, or while one ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Taking a connection: connecting, TLS, login, the session setup. No note was sent.
    Connect,
    /// A statement was sent: it may have been applied unless the server said otherwise.
    Statement,
}

/// The error code a driver error stands for. The server's errors keep theirs. Before a
/// statement, a failed or refused connection is 2003 (nothing sent, worth retrying) and a TLS
/// failure 2026 (not: the certificate will not change); a connection lost during a statement
/// is 2013 (it may have been applied).
pub(crate) fn error_code(phase: Phase, e: &mysql_async::Error) -> Option<u32> {
    use std::io::ErrorKind::*;
    match (e, phase) {
        (mysql_async::Error::Server(s), _) => Some(u32::from(s.code)),
        (_, Phase::Statement) => Some(CR_SERVER_LOST),
        (mysql_async::Error::Io(IoError::Io(io)), Phase::Connect) => match io.kind() {
            ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | TimedOut
            | HostUnreachable | NetworkUnreachable | AddrNotAvailable | UnexpectedEof
            | BrokenPipe => Some(CR_CONN_HOST_ERROR),
            // rustls reports a certificate it refuses as invalid data.
            _ => Some(CR_SSL_CONNECTION_ERROR),
        },
        (mysql_async::Error::Io(IoError::Tls(_)), Phase::Connect) => Some(CR_SSL_CONNECTION_ERROR),
        (_, Phase::Connect) => None,
    }
}

/// A database server: address and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Server {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The pools held: the local server's, and the primary's when that is another server. Generic
/// over the pool so that following the primary is tested without a database.
#[derive(Debug)]
pub(crate) struct Pools<P> {
    local: (Server, P),
    primary: Option<(Server, P)>,
}

impl<P: Clone> Pools<P> {
    pub(crate) fn new(local: Server, pool: P) -> Pools<P> {
        Pools {
            local: (local, pool),
            primary: None,
        }
    }

    pub(crate) fn local(&self) -> &P {
        &self.local.1
    }

    /// The pool for writes to `primary`: the local one when the primary is this node's server,
    /// the one held when the primary has not moved, else a new one from `open`. The pool it
    /// replaces (the previous primary's) is returned, to be closed.
    pub(crate) fn for_primary(
        &mut self,
        primary: &Server,
        open: impl FnOnce(&Server) -> P,
    ) -> (P, Option<P>) {
        if *primary == self.local.0 {
            let retired = self.primary.take().map(|(_, p)| p);
            return (self.local.1.clone(), retired);
        }
        match &self.primary {
            Some((server, pool)) if server == primary => (pool.clone(), None),
            _ => {
                let pool = open(primary);
                let retired = self
                    .primary
                    .replace((primary.clone(), pool.clone()))
                    .map(|(_, p)| p);
                (pool, retired)
            }
        }
    }

    /// The servers pools are held for: the local one, then the primary's when it is another.
    #[cfg(test)]
    fn servers(&self) -> Vec<&Server> {
        std::iter::once(&self.local.0)
            .chain(self.primary.as_ref().map(|(s, _)| s))
            .collect()
    }
}

/// As whom and how to connect: the same for every server.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub database: String,
    /// The cluster CA (PEM) the servers' certificates are checked against.
    pub ca_pem: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// The notes: reads on the local server, writes on the primary the caller names.
pub struct Store {
    credentials: Credentials,
    pools: Mutex<Pools<Pool>>,
    /// Set once the schema exists on the primary (it replicates to every node).
    schema_ready: AtomicBool,
}

impl Store {
    /// No connection is made until one is needed.
    pub fn new(local: Server, credentials: Credentials) -> Store {
        let pool = Pool::new(opts(&credentials, &local));
        Store {
            credentials,
            pools: Mutex::new(Pools::new(local, pool)),
            schema_ready: AtomicBool::new(false),
        }
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, Pools<Pool>> {
        self.pools
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pool for writes to `primary`; a pool it replaces is closed in the background once
    /// its connections in use come back.
    fn primary_pool(&self, primary: &Server) -> Pool {
        let (pool, retired) = self
            .pools()
            .for_primary(primary, |s| Pool::new(opts(&self.credentials, s)));
        if let Some(old) = retired {
            tracing::info!(%primary, "the primary moved: writes use a new connection pool, the old one is closed");
            tokio::spawn(async move {
                if let Err(e) = old.disconnect().await {
                    tracing::debug!(error = %e, "closing the previous primary's connection pool");
                }
            });
        }
        pool
    }

    /// The page of notes older than `before` (the newest when `None`), from the local server.
    pub async fn list(&self, before: Option<u64>) -> Result<Page, StoreError> {
        let (server, pool) = {
            let pools = self.pools();
            (pools.local.0.clone(), pools.local().clone())
        };
        let fetched = async {
            let mut conn = connect(&pool, &server).await?;
            let limit = u64::try_from(PAGE_SIZE + 1).unwrap_or(u64::MAX);
            statement(
                &server,
                conn.exec::<NoteRow, _, _>(LIST_SQL, (before.unwrap_or(u64::MAX), limit)),
            )
            .await
        };
        match fetched.await {
            Err(e) if matches!(e.code(), Some(ER_NO_SUCH_TABLE | ER_BAD_DB)) => Ok(Page::default()),
            rows => Ok(Page::from_notes(
                rows?.into_iter().map(Note::from).collect(),
            )),
        }
    }

    /// One attempt to store a note on `primary` (the schema first, once): the note as stored,
    /// [`StoreError::Full`] when [`MAX_NOTES`] are stored.
    pub async fn insert(
        &self,
        primary: &Server,
        node: &str,
        body: &str,
    ) -> Result<Note, StoreError> {
        let pool = self.primary_pool(primary);
        let mut conn = connect(&pool, primary).await?;
        if !self.schema_ready.load(Ordering::SeqCst) {
            statement(primary, conn.query_drop(SCHEMA_SQL)).await?;
            self.schema_ready.store(true, Ordering::SeqCst);
        }
        statement(primary, conn.exec_drop(INSERT_SQL, (node, body, MAX_NOTES))).await?;
        if conn.affected_rows() == 0 {
            return Err(StoreError::Full { max: MAX_NOTES });
        }
        let answer = |detail: &str| StoreError::Answer {
            server: primary.to_string(),
            detail: detail.to_string(),
        };
        let id = conn
            .last_insert_id()
            .ok_or_else(|| answer("no id for the inserted note"))?;
        let row = statement(primary, conn.exec_first::<NoteRow, _, _>(NOTE_SQL, (id,))).await?;
        row.map(Note::from)
            .ok_or_else(|| answer("the inserted note is not there"))
    }
}

/// Connection options for `server`: TLS against the cluster CA only (no built-in roots), the
/// certificate checked for the server's address; TCP even on loopback (the driver would switch
/// to the Unix socket, without TLS).
fn opts(credentials: &Credentials, server: &Server) -> Opts {
    let tls = SslOpts::default()
        .with_root_certs(vec![credentials.ca_pem.clone().into()])
        .with_disable_built_in_roots(true);
    let pool = PoolOpts::default()
        .with_constraints(PoolConstraints::new(1, POOL_MAX).unwrap_or_default())
        .with_inactive_connection_ttl(POOL_IDLE)
        // The session is ours alone: no reset (an extra round trip that also drops the
        // prepared statements) each time a connection goes back to its pool.
        .with_reset_connection(false);
    OptsBuilder::default()
        .ip_or_hostname(server.host.clone())
        .tcp_port(server.port)
        .prefer_socket(false)
        .user(Some(credentials.user.clone()))
        .pass(Some(credentials.password.clone()))
        .db_name(Some(credentials.database.clone()))
        .ssl_opts(tls)
        .init(SESSION_SQL.to_vec())
        .pool_opts(pool)
        .into()
}

fn sql_error(server: &Server, phase: Phase, e: &mysql_async::Error) -> StoreError {
    StoreError::Sql {
        server: server.to_string(),
        code: error_code(phase, e),
        message: e.to_string(),
    }
}

/// A connection from `pool`, within [`CONNECT_TIMEOUT`]; an idle one is checked alive first.
async fn connect(pool: &Pool, server: &Server) -> Result<Conn, StoreError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, pool.get_conn()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(sql_error(server, Phase::Connect, &e)),
        Err(_) => Err(StoreError::Sql {
            server: server.to_string(),
            code: Some(CR_CONN_HOST_ERROR),
            message: format!(
                "no connection within {} s (nothing was sent)",
                CONNECT_TIMEOUT.as_secs()
            ),
        }),
    }
}

/// Runs one statement, within [`STATEMENT_TIMEOUT`].
async fn statement<T>(
    server: &Server,
    run: impl std::future::Future<Output = mysql_async::Result<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, run).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(sql_error(server, Phase::Statement, &e)),
        Err(_) => Err(StoreError::Sql {
            server: server.to_string(),
            code: Some(CR_SERVER_LOST),
            message: format!("no answer within {} s", STATEMENT_TIMEOUT.as_secs()),
        }),
    }
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
    /// The HTTP status the refusal is answered with.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_carry_values_as_parameters() {
        for sql in [LIST_SQL, INSERT_SQL, NOTE_SQL] {
            assert!(!sql.contains("X'") && !sql.contains('\n'), "{sql}");
        }
        assert_eq!(INSERT_SQL.matches('?').count(), 3);
        assert!(LIST_SQL.ends_with("WHERE id < ? ORDER BY id DESC LIMIT ?"));
    }

    #[test]
    fn only_errors_that_wrote_nothing_are_retried() {
        use std::io::{Error, ErrorKind};
        let server = |code: u16, message: &str| {
            mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: message.into(),
                state: "HY000".into(),
            })
        };
        let io = |kind: ErrorKind| mysql_async::Error::Io(IoError::Io(Error::from(kind)));
        let check = |phase: Phase, e: mysql_async::Error, code: Option<u32>, retry: bool| {
            assert_eq!(error_code(phase, &e), code, "{e:?} in {phase:?}");
            let s = sql_error(
                &Server {
                    host: "10.88.0.12".into(),
                    port: 3306,
                },
                phase,
                &e,
            );
            assert_eq!(s.not_applied(), retry, "{e:?} in {phase:?}");
            assert!(
                s.to_string().starts_with("database 10.88.0.12:3306: "),
                "{s}"
            );
        };
        use Phase::*;
        let read_only = "The MariaDB server is running with the --read-only option";
        check(Statement, server(1290, read_only), Some(1290), true);
        check(Connect, server(1290, read_only), Some(1290), true);
        check(Statement, server(1213, "Deadlock found"), Some(1213), true);
        check(
            Statement,
            server(1205, "Lock wait timeout"),
            Some(1205),
            true,
        );
        check(Connect, io(ErrorKind::ConnectionRefused), Some(2003), true);
        check(Connect, io(ErrorKind::HostUnreachable), Some(2003), true);
        check(Connect, io(ErrorKind::TimedOut), Some(2003), true);
        // A certificate refused: trying again cannot help.
        check(Connect, io(ErrorKind::InvalidData), Some(2026), false);
        // Lost while a statement ran: it may have committed.
        check(Statement, io(ErrorKind::ConnectionReset), Some(2013), false);
        check(Statement, io(ErrorKind::UnexpectedEof), Some(2013), false);
        check(
            Connect,
            server(1045, "Access denied for user"),
            Some(1045),
            false,
        );
        check(
            Statement,
            server(1146, "Table 'app.notes' doesn't exist"),
            Some(1146),
            false,
        );
        assert!(!StoreError::Full { max: 1 }.not_applied());
        assert!(!StoreError::Answer {
            server: "s".into(),
            detail: "d".into()
        }
        .not_applied());
    }

    #[test]
    fn writes_follow_the_primary_with_one_pool_per_server() {
        let server = |host: &str| Server {
            host: host.into(),
            port: 3306,
        };
        let (local, a, b) = (
            server("10.88.0.11"),
            server("10.88.0.12"),
            server("10.88.0.13"),
        );
        let mut opened = Vec::new();
        let mut pools = Pools::new(local.clone(), "pool-local".to_string());
        let mut open = |s: &Server| {
            opened.push(s.host.clone());
            format!("pool-{}", s.host)
        };
        // The primary is another node: a pool of its own, opened once and kept.
        let (p, retired) = pools.for_primary(&a, &mut open);
        assert_eq!((p.as_str(), retired), ("pool-10.88.0.12", None));
        let (p, retired) = pools.for_primary(&a, &mut open);
        assert_eq!((p.as_str(), retired), ("pool-10.88.0.12", None));
        assert_eq!(pools.servers(), [&local, &a]);
        // A switchover to a third node: a new pool, the old primary's handed back to be closed.
        let (p, retired) = pools.for_primary(&b, &mut open);
        assert_eq!(
            (p.as_str(), retired.as_deref()),
            ("pool-10.88.0.13", Some("pool-10.88.0.12"))
        );
        assert_eq!(pools.servers(), [&local, &b]);
        // This node becomes the primary: writes use the local pool, no other is kept.
        let (p, retired) = pools.for_primary(&local, &mut open);
        assert_eq!(
            (p.as_str(), retired.as_deref()),
            ("pool-local", Some("pool-10.88.0.13"))
        );
        assert_eq!(pools.servers(), [&local]);
        let (p, retired) = pools.for_primary(&local, &mut open);
        assert_eq!((p.as_str(), retired), ("pool-local", None));
        // And back to a node seen before: a new pool again.
        let (p, _) = pools.for_primary(&a, &mut open);
        assert_eq!(p, "pool-10.88.0.12");
        assert_eq!(opened, ["10.88.0.12", "10.88.0.13", "10.88.0.12"]);
        // Another port is another server.
        let other_port = Server {
            port: 3307,
            ..local.clone()
        };
        let (p, retired) = pools.for_primary(&other_port, &mut |s: &Server| format!("pool-{s}"));
        assert_eq!(
            (p.as_str(), retired.as_deref()),
            ("pool-10.88.0.11:3307", Some("pool-10.88.0.12"))
        );
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

    #[test]
    fn a_page_holds_at_most_page_size_notes_and_links_older_ones() {
        let notes = |ids: std::ops::RangeInclusive<u64>| -> Vec<Note> {
            ids.rev()
                .map(|id| Note {
                    id,
                    node: "server1".into(),
                    body: "b".into(),
                    created: "2025-01-01 00:00:00.000000".into(),
                })
                .collect()
        };
        let check = |rows: Vec<Note>, len: usize, first: Option<u64>, older: Option<u64>| {
            let page = Page::from_notes(rows);
            assert_eq!(page.notes.len(), len);
            assert_eq!(page.notes.first().map(|n| n.id), first);
            assert_eq!(page.older, older);
        };
        check(Vec::new(), 0, None, None);
        check(notes(1..=3), 3, Some(3), None);
        check(notes(1..=50), 50, Some(50), None);
        // 51 rows: a full page and an older one starting below the page's last id.
        check(notes(10..=60), 50, Some(60), Some(11));
    }
}
