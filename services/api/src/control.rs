//! The supervisor's control protocol: newline-delimited JSON over its Unix socket, one
//! [`Request`] per line and one [`Response`] line each. Served by the supervisor, spoken by the
//! `appliance` CLI, the admin server and PID 1's shutdown path. The field names are a stable
//! interface (`appliance status --json` prints [`ServiceStatus`]).

use serde::{Deserialize, Serialize};

/// Where `appliance init` listens, and where the CLI looks by default.
pub const DEFAULT_SOCKET: &str = "/run/tandem/control.sock";
/// File name of the socket inside a state directory.
pub const SOCKET_FILE: &str = "control.sock";
/// `logs` returns this many lines when the request does not say.
pub const DEFAULT_LOG_LINES: usize = 100;

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
