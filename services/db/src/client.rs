//! SQL through the `mysql_async` driver: one connection per server, opened on first use and
//! kept across calls (opened again after any error), driven by a current-thread tokio runtime
//! that the connection owns, so the synchronous agent and commands simply block on it. Every
//! call (connecting included) is bounded by [`SQL_TIMEOUT`]. Statements go over the text
//! protocol, several per call when separated by `;`, and answers come back as the `mariadb`
//! client's batch output (tab-separated, a header line per result set, `NULL` for NULL),
//! parsed by [`crate::repl::parse_batch`].
//!
//! Which operations use what:
//!
//! - As `root` over the local server's Unix socket ([`Conn::local`]), by the agent: reading the
//!   server's state and `SHOW SLAVE STATUS` (every poll), the recorded primary, applying the
//!   role (accounts, databases, the bookkeeping tables on a primary; `read_only` and
//!   `CHANGE MASTER` on a replica), restarting a stopped IO thread, and acknowledging its
//!   primary when that is itself. Root has no password on purpose
//!   (`mariadb-install-db --auth-root-authentication-method=socket`): the server's
//!   `unix_socket` plugin takes the peer's uid from the socket, so a driver that connects
//!   through the socket as user `root`, as the OS root user, is let in without presenting any
//!   secret; no other account or transport can log in as root.
//! - As `tandem_admin` over TCP with TLS ([`Conn::remote`]), its password read from a 0600
//!   option file, the server's certificate verified against the cluster CA and the server's
//!   address: `db status` and `db switchover` on every node, and the agent's acknowledgement
//!   to a remote primary.
//!
//! Why a driver rather than the `mariadb` client: the agent polls its server every second or
//! so, and a client process per statement cost 13–15 % of a core on an idle node (far more
//! under emulation); one session also lets related reads run back to back on one connection.
//! The demo application, which queries on every request, uses the same driver with a pool.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use mysql_async::prelude::Queryable as _;
use mysql_async::{OptsBuilder, Row, SslOpts, Value};

use crate::repl;

/// Longest a single call (connecting and running its statements) may take.
pub const SQL_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest connecting (and logging in) may take, within [`SQL_TIMEOUT`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a statement did not run.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The server refused (`ERROR <code> (<state>): <message>`, as the `mariadb` client says
    /// it), or it could not be reached or logged in to.
    #[error("{server}: {message}")]
    Server { server: String, message: String },
    /// No answer within [`SQL_TIMEOUT`]: the connection was dropped.
    #[error("{server}: no answer within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    /// The runtime that drives the connection could not be started.
    #[error("starting the SQL client runtime: {source}")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
}

/// Where a server is and how to log in to it.
#[derive(Debug, Clone)]
enum Target {
    /// Root over the Unix socket at this path.
    Local(PathBuf),
    /// The account in `option_file` over TCP with TLS, verified against `ssl_ca`.
    Remote {
        option_file: PathBuf,
        addr: Ipv4Addr,
        port: u16,
        ssl_ca: PathBuf,
    },
}

/// The open connection and the runtime that drives it.
struct Session {
    /// Dropped before the runtime (fields drop in order).
    conn: Option<mysql_async::Conn>,
    runtime: tokio::runtime::Runtime,
}

/// One server, reachable through the driver. A clone shares nothing: it opens its own
/// connection on first use.
pub struct Conn {
    label: String,
    target: Target,
    session: Mutex<Option<Session>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("label", &self.label)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Clone for Conn {
    fn clone(&self) -> Conn {
        Conn::new(self.label.clone(), self.target.clone())
    }
}

impl Conn {
    fn new(label: String, target: Target) -> Conn {
        Conn {
            label,
            target,
            session: Mutex::new(None),
        }
    }

    /// The local server as root over its Unix socket.
    pub fn local(socket: &Path) -> Conn {
        Conn::new(
            format!("local MariaDB ({})", socket.display()),
            Target::Local(socket.to_path_buf()),
        )
    }

    /// A node's server over TCP with the account in `option_file` (`user = ` and
    /// `password = ` lines, as [`crate::agent_run`] writes them), over TLS, its certificate
    /// verified against `ssl_ca` and its address. Nothing is read or opened until the first
    /// call.
    pub fn remote(
        option_file: &Path,
        name: &str,
        addr: Ipv4Addr,
        port: u16,
        ssl_ca: &Path,
    ) -> Conn {
        Conn::new(
            format!("{name} ({addr}:{port})"),
            Target::Remote {
                option_file: option_file.to_path_buf(),
                addr,
                port,
                ssl_ca: ssl_ca.to_path_buf(),
            },
        )
    }

    /// What error messages call this server.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs `sql` (one or more statements separated by `;`); returns every result set that has
    /// rows as the `mariadb` client's batch output: a header line, then a line per row.
    pub fn run(&self, sql: &str) -> Result<String, SqlError> {
        let mut guard = self
            .session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let session = match guard.as_mut() {
            Some(s) => s,
            None => guard.insert(Session {
                conn: None,
                runtime: tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                    .map_err(|source| SqlError::Spawn { source })?,
            }),
        };
        let open = session.conn.take();
        let answer = session.runtime.block_on(async {
            tokio::time::timeout(SQL_TIMEOUT, async {
                let mut conn = match open {
                    Some(c) => c,
                    None => self.connect().await?,
                };
                let text = query(&mut conn, sql).await.map_err(|e| describe(&e, ""))?;
                Ok::<_, String>((conn, text))
            })
            .await
        });
        match answer {
            Ok(Ok((conn, text))) => {
                session.conn = Some(conn);
                Ok(text)
            }
            Ok(Err(message)) => Err(SqlError::Server {
                server: self.label.clone(),
                message,
            }),
            Err(_) => Err(SqlError::Timeout {
                server: self.label.clone(),
                timeout: SQL_TIMEOUT,
            }),
        }
    }

    /// The rows of `sql`'s answer, each by column name.
    pub fn rows(&self, sql: &str) -> Result<Vec<BTreeMap<String, String>>, SqlError> {
        self.run(sql).map(|out| repl::parse_batch(&out))
    }

    /// The first column of the first row, if any.
    pub fn value(&self, sql: &str) -> Result<Option<String>, SqlError> {
        Ok(self
            .rows(sql)?
            .into_iter()
            .next()
            .and_then(|r| r.into_values().next()))
    }

    /// A new connection, logged in.
    async fn connect(&self) -> Result<mysql_async::Conn, String> {
        let opts = match &self.target {
            Target::Local(socket) => OptsBuilder::default()
                .socket(Some(socket.display().to_string()))
                .user(Some("root")),
            Target::Remote {
                option_file,
                addr,
                port,
                ssl_ca,
            } => {
                let (user, password) = read_option_file(option_file)?;
                let ca = std::fs::read(ssl_ca)
                    .map_err(|e| format!("reading the CA {}: {e}", ssl_ca.display()))?;
                OptsBuilder::default()
                    .ip_or_hostname(addr.to_string())
                    .tcp_port(*port)
                    .prefer_socket(false)
                    .user(Some(user))
                    .pass(Some(password))
                    .ssl_opts(
                        SslOpts::default()
                            .with_root_certs(vec![ca.into()])
                            .with_disable_built_in_roots(true),
                    )
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, mysql_async::Conn::new(opts)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(describe(&e, "connecting: ")),
            Err(_) => Err(format!("connecting: no answer within {CONNECT_TIMEOUT:?}")),
        }
    }
}

/// An error as the `mariadb` client words a server's (`ERROR 1045 (28000): Access denied…`),
/// or the driver's own description.
fn describe(e: &mysql_async::Error, context: &str) -> String {
    match e {
        mysql_async::Error::Server(s) => {
            format!("{context}ERROR {} ({}): {}", s.code, s.state, s.message)
        }
        other => format!("{context}{other}"),
    }
}

/// The user and password of a client option file (`[client]`, `user = …`, `password = …`).
fn read_option_file(path: &Path) -> Result<(String, String), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the option file {}: {e}", path.display()))?;
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .ok_or_else(|| format!("the option file {} has no {key}", path.display()))
    };
    Ok((get("user")?, get("password")?))
}

/// Runs `sql` and renders its answer as batch output.
async fn query(conn: &mut mysql_async::Conn, sql: &str) -> Result<String, mysql_async::Error> {
    let mut out = String::new();
    let mut result = conn.query_iter(sql).await?;
    while !result.is_empty() {
        let rows: Vec<Row> = result.collect().await?;
        render_set(&mut out, &rows);
    }
    Ok(out)
}

/// Appends a result set as the `mariadb` client's `--batch` output renders it: nothing when it
/// has no rows, else the column names, then each row; fields separated by tabs, with tab,
/// newline, NUL and backslash escaped in values, NULL as `NULL`.
fn render_set(out: &mut String, rows: &[Row]) {
    let Some(first) = rows.first() else {
        return;
    };
    let names: Vec<String> = first
        .columns_ref()
        .iter()
        .map(|c| c.name_str().into_owned())
        .collect();
    out.push_str(&names.join("\t"));
    out.push('\n');
    for row in rows {
        let fields: Vec<String> = (0..row.len())
            .map(|i| row.as_ref(i).map_or_else(|| "NULL".to_string(), render))
            .collect();
        out.push_str(&fields.join("\t"));
        out.push('\n');
    }
}

/// One value as batch output shows it. Over the text protocol every non-NULL value arrives as
/// bytes; the other variants are rendered for completeness.
fn render(value: &Value) -> String {
    match value {
        Value::NULL => "NULL".to_string(),
        Value::Bytes(b) => escape(&String::from_utf8_lossy(b)),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Double(d) => d.to_string(),
        other => other.as_sql(true).trim_matches('\'').to_string(),
    }
}

fn escape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    for c in field.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\0' => out.push_str("\\0"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    #[test]
    fn escaped_values_parse_back() {
        let raw = "a\tb\nc\\d\0e";
        let mut out = String::from("v\n");
        let _ = writeln!(out, "{}", escape(raw));
        let rows = repl::parse_batch(&out);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["v"], raw);
    }

    #[test]
    fn values_render_as_the_client_did() {
        assert_eq!(render(&Value::NULL), "NULL");
        assert_eq!(render(&Value::Bytes(b"0-1-5".to_vec())), "0-1-5");
        assert_eq!(render(&Value::Int(-3)), "-3");
        assert_eq!(render(&Value::UInt(7)), "7");
    }

    #[test]
    fn option_file_gives_user_and_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.cnf");
        std::fs::write(&path, "[client]\nuser = tandem_admin\npassword = s3=cr3t\n").unwrap();
        assert_eq!(
            read_option_file(&path).unwrap(),
            ("tandem_admin".to_string(), "s3=cr3t".to_string())
        );
        std::fs::write(&path, "[client]\nuser = x\n").unwrap();
        assert!(read_option_file(&path).unwrap_err().contains("no password"));
    }

    #[test]
    fn unreachable_server_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Conn::local(&dir.path().join("no.sock"));
        let err = conn.value("SELECT 1").unwrap_err().to_string();
        assert!(
            err.contains("no.sock") && err.contains("connecting"),
            "{err}"
        );
    }
}
