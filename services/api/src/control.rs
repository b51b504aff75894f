//! The supervisor's control protocol: newline-delimited JSON over its Unix socket, one
//! [`Request`] per line and one [`Response`] line each. Served by the supervisor, spoken by the
//! `appliance` CLI, the admin server and PID 1's shutdown path. The field names are a stable
//! interface (`appliance status --json` prints [`ServiceStatus`]). [`request`] is the client.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where `appliance init` listens, and where the CLI looks by default.
pub const DEFAULT_SOCKET: &str = "/run/tandem/control.sock";
/// File name of the socket inside a state directory.
pub const SOCKET_FILE: &str = "control.sock";
/// `logs` returns this many lines when the request does not say.
pub const DEFAULT_LOG_LINES: usize = 100;
/// How long [`request`] waits for the supervisor's answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every service's state.
    Status,
    /// The last `lines` lines a service wrote (stdout and stderr interleaved).
    Logs {
        service: String,
        #[serde(default = "default_log_lines")]
        lines: usize,
    },
    /// Stop all services and the supervisor.
    Stop,
    /// Stop all services, then plan the node again and start what the new plan says (the
    /// settings service asks for it once first-boot setup is stored). Root only.
    Reconfigure,
    /// Stop a service and start it again (also revives a failed one).
    Restart { service: String },
    /// Send a signal to a service's process group (`HUP`, `TERM`, `KILL`, `USR1`, `USR2`,
    /// `INT`): reloads, and fault drills such as killing the balancer on the address holder.
    Signal { service: String, signal: String },
}

/// The signals `Request::Signal` may send, by their names without `SIG`.
pub const SIGNALS: [&str; 6] = ["HUP", "INT", "KILL", "TERM", "USR1", "USR2"];

fn default_log_lines() -> usize {
    DEFAULT_LOG_LINES
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Status { services: Vec<ServiceStatus> },
    Logs { lines: Vec<LogLine> },
    Ok,
    Error { message: String },
}

/// One service in `status`. The field names are a stable interface (`status --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    /// `waiting`, `starting`, `running`, `done`, `backoff`, `stopping`, `stopped`, `exited`
    /// or `failed` (a crash loop, retried every maximum backoff).
    pub state: String,
    pub pid: Option<i32>,
    pub restarts: u32,
    /// How the last process ended: `code 1`, `signal 9 (SIGKILL)`.
    pub last_exit: Option<String>,
    /// Seconds since the current process started.
    pub uptime_s: Option<u64>,
    pub ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One line a service wrote, without its line terminator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch, when the supervisor read the line.
    pub ts_ms: i64,
    pub service: String,
    pub stream: Stream,
    pub pid: i32,
    pub line: String,
}

/// Why [`request`] got no answer, or an error for one.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens on the socket (absent, or a stale file).
    NotListening { path: PathBuf },
    /// Connecting, sending or receiving failed.
    Io {
        path: PathBuf,
        context: &'static str,
        source: std::io::Error,
    },
    /// The answer is not a [`Response`].
    Protocol { path: PathBuf, detail: String },
    /// The supervisor answered [`Response::Error`].
    Remote(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotListening { path } => write!(
                f,
                "no supervisor listening on {}: is `appliance run` running?",
                path.display()
            ),
            ClientError::Io {
                path,
                context,
                source,
            } => write!(f, "control socket {}: {context}: {source}", path.display()),
            ClientError::Protocol { path, detail } => {
                write!(
                    f,
                    "control socket {}: bad response: {detail}",
                    path.display()
                )
            }
            ClientError::Remote(message) => write!(f, "supervisor: {message}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Sends one request to the supervisor listening on `socket` and returns its response (a
/// [`Response::Error`] becomes [`ClientError::Remote`]). One JSON line each way; waits at most
/// [`CLIENT_TIMEOUT`] for the answer.
pub fn request(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let io = |context, source| ClientError::Io {
        path: socket.to_path_buf(),
        context,
        source,
    };
    let mut conn = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotListening {
                path: socket.to_path_buf(),
            }
        }
        _ => io("connecting", e),
    })?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| io("setting a timeout", e))?;
    let mut line = serde_json::to_vec(request).map_err(|e| io("encoding", e.into()))?;
    line.push(b'\n');
    conn.write_all(&line).map_err(|e| io("sending", e))?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(|e| io("receiving", e))?;
    let response: Response = serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
        path: socket.to_path_buf(),
        detail: format!("{e}: {answer:?}"),
    })?;
    match response {
        Response::Error { message } => Err(ClientError::Remote(message)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-connection server that reads a line and answers `answer`; returns what it read.
    fn serve_once(path: &Path, answer: &'static str) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(conn.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            (&conn).write_all(answer.as_bytes()).unwrap();
            line
        })
    }

    #[test]
    fn the_client_sends_one_json_line_and_reads_one() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET_FILE);

        let server = serve_once(&socket, "{\"response\":\"ok\"}\n");
        assert_eq!(request(&socket, &Request::Stop).unwrap(), Response::Ok);
        assert_eq!(server.join().unwrap(), "{\"request\":\"stop\"}\n");
        std::fs::remove_file(&socket).unwrap();

        let server = serve_once(&socket, "{\"response\":\"error\",\"message\":\"no\"}\n");
        let err = request(&socket, &Request::Status).unwrap_err();
        assert!(matches!(&err, ClientError::Remote(m) if m == "no"), "{err}");
        server.join().unwrap();
        std::fs::remove_file(&socket).unwrap();

        let server = serve_once(&socket, "HTTP/1.1 400 Bad Request\r\n");
        let err = request(&socket, &Request::Status).unwrap_err();
        assert!(
            matches!(err, ClientError::Protocol { .. }) && err.to_string().contains("HTTP/1.1"),
            "{err}"
        );
        server.join().unwrap();
        std::fs::remove_file(&socket).unwrap();

        let err = request(&socket, &Request::Status).unwrap_err();
        assert!(matches!(err, ClientError::NotListening { .. }), "{err}");
        assert!(err.to_string().contains("control.sock"), "{err}");
    }
}
