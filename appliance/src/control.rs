//! The control socket: newline-delimited JSON requests and responses over a Unix socket,
//! served by the supervisor and used by the CLI and the admin server.
//!
//! Who may connect is the socket's mode: 0600 (its owner only), or on a node 0660 with the
//! control group (`tandem-control`: root and the admin server). Stopping the supervisor is
//! reserved to its own user (and root), whatever the group: the peer's uid is checked.
//!
//! One request per line, one response line each; a connection may send several requests.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use api::control::{ClientError, Request, Response, ServiceStatus, DEFAULT_SOCKET, SOCKET_FILE};
use serde::Serialize;

/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// A connection idle this long is closed; so is a client that does not read its response.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The socket's mode: its owner only, or owner and group.
const PRIVATE_MODE: u32 = 0o600;
const SHARED_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another supervisor is already listening on {}", .path.display())]
    InUse { path: PathBuf },
    #[error("control socket {}: {context}: {source}", .path.display())]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// Server

/// A listening control socket. Dropping it stops accepting and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    /// The listening socket, kept to wake the accept loop even when the socket file is gone.
    wake: Option<UnixListener>,
}

impl ControlServer {
    /// Binds `path` atomically with mode 0600: the socket is bound in a private (0700)
    /// directory beside it, restricted, then renamed into place, replacing a stale socket.
    /// A socket that still answers is not replaced.
    pub fn bind<H>(path: &Path, handler: H) -> Result<ControlServer, ControlError>
    where
        H: Fn(Request) -> Response + Send + Sync + 'static,
    {
        Self::bind_for(path, None, handler)
    }

    /// [`ControlServer::bind`], with mode 0660 and group `group` when given: its members may
    /// connect (all requests but `stop`).
    pub fn bind_for<H>(
        path: &Path,
        group: Option<nix::unistd::Gid>,
        handler: H,
    ) -> Result<ControlServer, ControlError>
    where
        H: Fn(Request) -> Response + Send + Sync + 'static,
    {
        let io = |context, source| ControlError::Io {
            path: path.to_path_buf(),
            context,
            source,
        };
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_path_buf(),
            });
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(|e| io("creating its directory", e))?;
        let private = parent.join(format!(".control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&private); // left by an earlier process with our pid
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(|e| io("creating a private directory beside it", e))?;
        let staged = private.join("sock");
        let placed = UnixListener::bind(&staged)
            .map_err(|e| io("binding", e))
            .and_then(|listener| {
                let mode = match group {
                    Some(gid) => {
                        nix::unistd::chown(&staged, None, Some(gid))
                            .map_err(|e| io("setting its group", e.into()))?;
                        SHARED_MODE
                    }
                    None => PRIVATE_MODE,
                };
                std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| io("setting its mode", e))?;
                std::fs::rename(&staged, path).map_err(|e| io("moving into place", e))?;
                Ok(listener)
            });
        let _ = std::fs::remove_dir_all(&private);
        let listener = placed?;
        let wake = listener.try_clone().ok();

        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let accept = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        if conn
                            .as_ref()
                            .is_err_and(|e| e.kind() == std::io::ErrorKind::InvalidInput)
                        {
                            // shutdown(2) by Drop; the flag is set just before.
                            return;
                        }
                        match conn {
                            Ok(conn) => {
                                let handler = handler.clone();
                                let spawned = thread::Builder::new()
                                    .name("control-conn".into())
                                    .spawn(move || serve_connection(conn, &*handler));
                                if let Err(e) = spawned {
                                    tracing::warn!("control connection thread: {e}");
                                }
                            }
                            Err(e) => {
                                tracing::warn!("control socket accept: {e}");
                                thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                })
                .map_err(|e| io("starting its thread", e))?
        };
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            accept: Some(accept),
            wake,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag: shutdown(2) of a listening socket makes a
        // blocked accept(2) fail at once, even if someone removed the socket file meanwhile.
        if let Some(listener) = &self.wake {
            use std::os::fd::AsRawFd as _;
            let _ =
                nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        let _ = UnixStream::connect(&self.path);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a peer with `peer_uid` may make `request` of a supervisor running as `own_uid`
/// (pure). Everyone who can connect may ask anything but `stop`, which powers a node off.
pub fn permitted(request: &Request, peer_uid: u32, own_uid: u32) -> Result<(), String> {
    match request {
        Request::Stop | Request::Reconfigure if peer_uid != own_uid && peer_uid != 0 => {
            Err("only root may stop or reconfigure the supervisor".into())
        }
        _ => Ok(()),
    }
}

fn serve_connection(conn: UnixStream, handler: &dyn Fn(Request) -> Response) {
    // Unknown (cannot happen on a Unix socket): treated as nobody.
    let peer_uid = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_or(u32::MAX, |c| c.uid());
    let own_uid = nix::unistd::geteuid().as_raw();
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.by_ref().take(MAX_REQUEST_BYTES).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST_BYTES {
            let _ = write_json(
                &mut writer,
                &Response::Error {
                    message: "request too long".into(),
                },
            );
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => match permitted(&request, peer_uid, own_uid) {
                Ok(()) => handler(request),
                Err(message) => Response::Error { message },
            },
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        if write_json(&mut writer, &response).is_err() {
            return;
        }
    }
}

fn write_json(w: &mut impl Write, value: &impl Serialize) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes)
}

// ---------------------------------------------------------------------------------------------
// Client

/// Which supervisor to talk to.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Target {
    /// The supervisor's control socket [default: /run/tandem/control.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "state_dir")]
    pub socket: Option<PathBuf>,
    /// The supervisor's state directory (its socket is DIR/control.sock).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl Target {
    pub fn socket_path(&self) -> PathBuf {
        match (&self.socket, &self.state_dir) {
            (Some(socket), _) => socket.clone(),
            (None, Some(dir)) => dir.join(SOCKET_FILE),
            (None, None) => PathBuf::from(DEFAULT_SOCKET),
        }
    }
}

/// Sends one request and returns the response (a `Response::Error` becomes `Remote`).
pub fn request(target: &Target, request: &Request) -> Result<Response, ClientError> {
    api::control::request(&target.socket_path(), request)
}

fn unexpected(target: &Target, response: &Response) -> ClientError {
    ClientError::Protocol {
        path: target.socket_path(),
        detail: format!("unexpected {response:?}"),
    }
}

/// `appliance status`: a table, or with `json` a JSON array of [`ServiceStatus`].
pub fn status(target: &Target, json: bool) -> anyhow::Result<ExitCode> {
    let response = request(target, &Request::Status)?;
    let Response::Status { services } = response else {
        return Err(unexpected(target, &response).into());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&services)?);
    } else {
        print!("{}", status_table(&services));
    }
    Ok(ExitCode::SUCCESS)
}

/// `appliance logs SERVICE`: prints the last lines a service wrote.
pub fn logs(target: &Target, service: &str, lines: usize) -> anyhow::Result<ExitCode> {
    let response = request(
        target,
        &Request::Logs {
            service: service.into(),
            lines,
        },
    )?;
    let Response::Logs { lines } = response else {
        return Err(unexpected(target, &response).into());
    };
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{} {}", line.stream.as_str(), line.line)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the supervisor to send `signal` to one service.
pub fn signal(target: &Target, service: &str, signal: &str) -> anyhow::Result<ExitCode> {
    request(
        target,
        &Request::Signal {
            service: service.into(),
            signal: signal.trim_start_matches("SIG").to_ascii_uppercase(),
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Asks the supervisor to restart one service.
pub fn restart(target: &Target, service: &str) -> anyhow::Result<ExitCode> {
    request(
        target,
        &Request::Restart {
            service: service.into(),
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Asks the supervisor to stop every service and exit.
pub fn stop(target: &Target) -> anyhow::Result<ExitCode> {
    request(target, &Request::Stop)?;
    Ok(ExitCode::SUCCESS)
}

/// The human table of `appliance status`.
pub fn status_table(services: &[ServiceStatus]) -> String {
    let header = ["SERVICE", "STATE", "PID", "RESTARTS", "LAST-EXIT", "UPTIME"].map(String::from);
    let rows: Vec<[String; 6]> = services
        .iter()
        .map(|s| {
            [
                s.name.clone(),
                s.state.clone(),
                s.pid.map_or("-".into(), |p| p.to_string()),
                s.restarts.to_string(),
                s.last_exit.clone().unwrap_or_else(|| "-".into()),
                s.uptime_s.map_or("-".into(), format_uptime),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn format_uptime(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::control::DEFAULT_LOG_LINES;

    #[test]
    fn wire_format() {
        let check = |json: &str, expected: Request| {
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), expected);
        };
        check(r#"{"request":"status"}"#, Request::Status);
        check(
            r#"{"request":"logs","service":"db"}"#,
            Request::Logs {
                service: "db".into(),
                lines: DEFAULT_LOG_LINES,
            },
        );
        check(
            r#"{"request":"restart","service":"db"}"#,
            Request::Restart {
                service: "db".into(),
            },
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"request":"logs","service":"db","x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Response::Ok).unwrap(),
            r#"{"response":"ok"}"#
        );
    }

    #[test]
    fn table() {
        let services = [
            ServiceStatus {
                name: "db".into(),
                state: "running".into(),
                pid: Some(42),
                restarts: 1,
                last_exit: Some("signal 9 (SIGKILL)".into()),
                uptime_s: Some(3725),
                ready: true,
            },
            ServiceStatus {
                name: "migrations".into(),
                state: "done".into(),
                pid: None,
                restarts: 0,
                last_exit: Some("code 0".into()),
                uptime_s: None,
                ready: true,
            },
        ];
        let expected = "\
SERVICE     STATE    PID  RESTARTS  LAST-EXIT           UPTIME
db          running  42   1         signal 9 (SIGKILL)  1h02m
migrations  done     -    0         code 0              -
";
        assert_eq!(status_table(&services), expected);
    }

    #[test]
    fn only_root_and_the_supervisors_user_may_stop_it() {
        let check = |request: Request, peer: u32, own: u32, ok: bool| {
            assert_eq!(
                permitted(&request, peer, own).is_ok(),
                ok,
                "{request:?} from {peer} to {own}"
            );
        };
        check(Request::Stop, 0, 0, true);
        check(Request::Stop, 963, 0, false);
        check(Request::Stop, 1000, 1000, true);
        check(Request::Stop, 0, 1000, true);
        check(Request::Status, 963, 0, true);
        let signal = Request::Signal {
            service: "balancer".into(),
            signal: "KILL".into(),
        };
        check(signal, 963, 0, true);
        check(
            Request::Restart {
                service: "app".into(),
            },
            963,
            0,
            true,
        );
        assert_eq!(
            permitted(&Request::Stop, 963, 0).unwrap_err(),
            "only root may stop or reconfigure the supervisor"
        );
    }

    #[test]
    fn a_group_socket_is_the_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_FILE);
        let group = nix::unistd::getegid();
        let _server = ControlServer::bind_for(&path, Some(group), |_| Response::Ok).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), group.as_raw());
    }

    #[test]
    fn absent_socket_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target {
            socket: None,
            state_dir: Some(dir.path().into()),
        };
        let err = request(&target, &Request::Status).unwrap_err().to_string();
        assert!(err.starts_with("no supervisor listening on"), "{err}");
        assert!(err.ends_with("is `appliance run` running?"), "{err}");
    }

    #[test]
    fn serves_and_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_FILE);
        drop(UnixListener::bind(&path).unwrap()); // stale: the file stays, nobody listens
        let server = ControlServer::bind(&path, |req| match req {
            Request::Status => Response::Status {
                services: Vec::new(),
            },
            _ => Response::Error {
                message: "no".into(),
            },
        })
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let target = Target {
            socket: Some(path.clone()),
            state_dir: None,
        };
        assert_eq!(
            request(&target, &Request::Status).unwrap(),
            Response::Status {
                services: Vec::new()
            }
        );
        assert_eq!(
            request(&target, &Request::Stop).unwrap_err().to_string(),
            "supervisor: no"
        );
        assert!(matches!(
            ControlServer::bind(&path, |_| Response::Ok),
            Err(ControlError::InUse { .. })
        ));
        drop(server);
        assert!(!path.exists());
    }
}
