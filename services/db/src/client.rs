//! SQL through the `mariadb` command-line client ([`crate::CLIENT`]): the SQL on stdin (nothing
//! in `ps`), passwords only in 0600 option files, batch output parsed by
//! [`crate::repl::parse_batch`], every call bounded by [`SQL_TIMEOUT`].
//!
//! Which operations use it, and why the client rather than a driver:
//!
//! - As `root` over the local server's Unix socket ([`Conn::local`]), by the agent: reading the
//!   server's state and `SHOW SLAVE STATUS`, the recorded primary, applying the role (accounts,
//!   databases, the bookkeeping tables on a primary; `read_only` and `CHANGE MASTER` on a
//!   replica), restarting a stopped IO thread, and acknowledging its primary when that is
//!   itself. Root has no password on purpose (`mariadb-install-db
//!   --auth-root-authentication-method=socket`): only the OS root user may log in, through
//!   the socket, by `unix_socket` authentication. The client that ships with the server speaks
//!   that plugin natively; no secret exists that a driver could present instead.
//! - As `tandem_admin` over TCP with TLS ([`Conn::remote`]): `db status` and `db switchover`
//!   on every node, and the agent's acknowledgement to a remote primary. These could use a
//!   driver; they stay on the client so that one code path (and one set of TLS options,
//!   `--ssl-verify-server-cert` against the cluster CA) serves the agent and the commands,
//!   which run a handful of statements a second at most.
//!
//! The demo application, which queries on every request, uses a driver with a pool instead.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::repl;

/// Longest a single client invocation may take before it is killed.
pub const SQL_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a statement did not run.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The server (or the client on its behalf) refused: the client's `ERROR` line.
    #[error("{server}: {message}")]
    Server { server: String, message: String },
    /// No answer within [`SQL_TIMEOUT`]: the client was killed.
    #[error("{server}: no answer within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    /// The client could not be started.
    #[error("running {}: {source}", crate::CLIENT)]
    Spawn {
        #[source]
        source: std::io::Error,
    },
}

/// One server, reachable through the `mariadb` client.
#[derive(Debug, Clone)]
pub struct Conn {
    label: String,
    args: Vec<String>,
}

impl Conn {
    /// The local server as root over its Unix socket.
    pub fn local(socket: &Path) -> Conn {
        Conn {
            label: format!("local MariaDB ({})", socket.display()),
            args: vec![
                "--no-defaults".into(),
                "--protocol=SOCKET".into(),
                format!("--socket={}", socket.display()),
                "--user=root".into(),
            ],
        }
    }

    /// A node's server over TCP with the account in `option_file`, over TLS, its certificate
    /// verified against `ssl_ca` and its address.
    pub fn remote(
        option_file: &Path,
        name: &str,
        addr: std::net::Ipv4Addr,
        port: u16,
        ssl_ca: &Path,
    ) -> Conn {
        Conn {
            label: format!("{name} ({addr}:{port})"),
            args: vec![
                format!("--defaults-file={}", option_file.display()),
                "--protocol=TCP".into(),
                format!("--host={addr}"),
                format!("--port={port}"),
                "--connect-timeout=3".into(),
                "--ssl".into(),
                format!("--ssl-ca={}", ssl_ca.display()),
                "--ssl-verify-server-cert".into(),
            ],
        }
    }

    /// What error messages call this server.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs `sql` (from stdin, so nothing shows in `ps`); returns batch output with headers.
    pub fn run(&self, sql: &str) -> Result<String, SqlError> {
        let mut child = Command::new(crate::CLIENT)
            .args(&self.args)
            .arg("--batch")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SqlError::Spawn { source })?;
        let mut stdin = child.stdin.take();
        let sql = sql.to_string();
        let writer = std::thread::spawn(move || {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(sql.as_bytes());
            }
        });
        let readers = [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|e| Box::new(e) as _),
        ]
        .map(|pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_string(&mut text);
                }
                text
            })
        });
        let deadline = Instant::now() + SQL_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let _ = writer.join();
        let [out, err] = readers.map(|r| r.join().unwrap_or_default());
        match status {
            None => Err(SqlError::Timeout {
                server: self.label.clone(),
                timeout: SQL_TIMEOUT,
            }),
            Some(s) if s.success() => Ok(out),
            Some(_) => {
                let message = err
                    .lines()
                    .find(|l| l.starts_with("ERROR"))
                    .unwrap_or(err.trim())
                    .trim()
                    .to_string();
                Err(SqlError::Server {
                    server: self.label.clone(),
                    message,
                })
            }
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
}
