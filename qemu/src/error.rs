//! The crate's error type: every variant names what it was doing (node, path, command).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Errors from the harness. Messages are meant to be read by whoever watches a failing test.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{tool}` not found on PATH; install the Debian package `{package}` (apt-get install {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },

    #[error(
        "{path} not found; install the Debian package `{package}` (apt-get install {package})"
    )]
    MissingFile {
        path: PathBuf,
        package: &'static str,
    },

    #[error("the QEMU harness needs root (network namespaces, bridges, taps); run it as root")]
    NotRoot,

    #[error("disk image {path} of node {node} not found")]
    MissingImage { node: String, path: PathBuf },

    #[error("invalid cluster spec: {0}")]
    Spec(String),

    #[error("{what}: {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        source: io::Error,
    },

    #[error("running `{command}`: {source}")]
    Spawn { command: String, source: io::Error },

    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("network namespace {netns}: {what}: {source}")]
    Netns {
        netns: String,
        what: String,
        source: io::Error,
    },

    #[error("QMP of node {node}: {what}")]
    Qmp { node: String, what: String },

    #[error("node {node}: {what}")]
    Vm { node: String, what: String },

    #[error("a cluster is already up from {} (pid {pid}); stop it with `tandem-qemu down --run-dir {}`", .run_dir.display(), .run_dir.display())]
    AlreadyUp { run_dir: PathBuf, pid: i32 },

    #[error("no node named {0} in this cluster")]
    NoSuchNode(String),

    #[error("node {node}: QEMU exited ({status}) while waiting for {what}")]
    VmExited {
        node: String,
        status: String,
        what: String,
    },

    #[error("timed out after {}s waiting for {what}{}", .after.as_secs(), last_seen(.last))]
    Timeout {
        what: String,
        after: Duration,
        last: Option<String>,
    },

    #[error("HTTP client: {0}")]
    Http(String),

    #[error("TLS client: {0}")]
    Tls(String),

    #[error("browser: {0}")]
    Browser(String),

    #[error("interrupted (Ctrl-C or SIGTERM)")]
    Cancelled,
}

fn last_seen(last: &Option<String>) -> String {
    match last {
        Some(l) => format!(" (last: {l})"),
        None => String::new(),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        what: impl Into<String>,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> Error {
        Error::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }
}
