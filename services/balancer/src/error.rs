use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can stop the balancer from starting or reloading. Requests never produce
/// these: a failed request becomes a 4xx/5xx response and a metric.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("node `{0}` is not in the cluster description")]
    UnknownNode(String),
    #[error("cluster description: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Tls { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}
