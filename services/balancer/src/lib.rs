//! Tandem's load balancer: an HTTP/1.1 + HTTP/2 reverse proxy in front of the nginx of every
//! node, with TLS termination (rustls), active and passive health checks, retries, limits
//! against malformed and slow clients, live reload and Prometheus metrics.
//!
//! - [`core`] is pure: backend selection, the health state machine, the retry policy, the
//!   HTTP/1 framing tracker, connection timeouts and caps. Everything else is IO around it.
//! - [`run_blocking`] is what `appliance balancer` calls: it builds its own tokio runtime and
//!   runs until SIGTERM/SIGINT (graceful), reloading on SIGHUP through [`Options::reload`].
//! - [`Balancer::start`] is the async API (tests, benchmarks): it returns a [`Handle`] with the
//!   bound addresses, `reload`, `reload_certificates` and `shutdown`.

pub mod core;

mod backend;
mod body;
mod clock;
mod conn;
mod error;
mod health_check;
mod housekeeping;
mod metrics;
mod plan;
mod pool;
mod proxy;
mod runtime;
mod tls;
pub mod vip;

pub use error::BalancerError;
pub use plan::{BackendSpec, Plan};
pub use runtime::{run_blocking, BackendStatus, Balancer, Handle};
pub use tls::CertificateFiles;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cluster_config::Cluster;

/// Re-reads the cluster description (the lead's wiring passes `Cluster::load(path)`); called
/// on SIGHUP by [`run_blocking`]. The error is logged and the running config kept.
pub type ReloadFn = Arc<dyn Fn() -> Result<Cluster, String> + Send + Sync>;

/// How the balancer runs, beyond what `cluster.toml` says.
#[derive(Clone)]
pub struct Options {
    /// Where the self-signed certificate is generated once and kept
    /// ([`api::files::balancer_self_signed`], where the log monitor watches its expiry).
    pub state_dir: PathBuf,
    /// Prometheus endpoint (`GET /metrics`), on a node the local
    /// [`api::ports::BALANCER_METRICS`]. `None`: not served.
    pub metrics: Option<SocketAddr>,
    /// Listen addresses instead of the node's address and the floating IP on `ports.http` /
    /// `ports.https` (tests, benchmarks). Port 0 picks a free port; see [`Handle`].
    pub listen: Option<Listen>,
    /// More certificates, chosen by SNI, beside the cluster's own (which is the default).
    pub certificates: Vec<CertificateFiles>,
    pub limits: Limits,
    /// Worker threads, each with a current-thread runtime and listeners of its own
    /// (`SO_REUSEPORT`). [`run_blocking`]: `None` = the number of available cores.
    /// [`Balancer::start`]: `None` = 1, the caller's runtime only.
    pub workers: Option<usize>,
    /// Called on SIGHUP by [`run_blocking`] to get the new cluster description.
    pub reload: Option<ReloadFn>,
    /// The VIP run directory ([`api::vip`]): follow keepalived's notify FIFO there, keep the
    /// status file and the backends track file. `None`: the balancer ignores the floating IP.
    pub vip_dir: Option<PathBuf>,
}

impl Options {
    pub fn new(state_dir: impl Into<PathBuf>) -> Options {
        Options {
            state_dir: state_dir.into(),
            metrics: None,
            listen: None,
            certificates: Vec::new(),
            limits: Limits::default(),
            workers: None,
            reload: None,
            vip_dir: None,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("state_dir", &self.state_dir)
            .field("metrics", &self.metrics)
            .field("listen", &self.listen)
            .field("certificates", &self.certificates)
            .field("limits", &self.limits)
            .field("workers", &self.workers)
            .field("reload", &self.reload.as_ref().map(|_| "<fn>"))
            .field("vip_dir", &self.vip_dir)
            .finish()
    }
}

/// Explicit listen addresses (tests and benchmarks).
#[derive(Debug, Clone, Default)]
pub struct Listen {
    /// Plain HTTP: redirects to HTTPS, answers the health path.
    pub http: Vec<SocketAddr>,
    /// HTTPS: the proxy.
    pub https: Vec<SocketAddr>,
    /// Plain HTTP that proxies like the HTTPS port instead of redirecting (benchmarks only:
    /// measures the proxy without TLS against an equivalent HAProxy frontend).
    pub http_proxy: Vec<SocketAddr>,
}

/// Limits against slow, large and malformed clients. Defaults follow HAProxy's and nginx's.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest request head (request line + headers); more gets 431.
    pub max_header_bytes: usize,
    /// Most header fields in a request; more gets 431.
    pub max_headers: usize,
    /// Largest request body; more gets 413.
    pub max_body_bytes: u64,
    /// Time for a whole request head once its first byte arrived (slowloris gets 408), and for
    /// the first request of a new connection and a TLS handshake.
    pub header_timeout: Duration,
    /// A keep-alive connection with nothing in flight is closed after this long idle.
    pub idle_timeout: Duration,
    /// Connecting to a backend.
    pub connect_timeout: Duration,
    /// From the request sent to the backend until its response head (504 after).
    pub response_timeout: Duration,
    /// On shutdown: how long in-flight requests may take before connections are dropped.
    pub shutdown_grace: Duration,
    /// HTTP/2 streams per connection.
    pub max_h2_streams: u32,
    /// Client connections held at once (HAProxy's `maxconn`); one more is refused: a 503 and a
    /// close on plain HTTP, a bare close on TLS. Counted from accept until the socket closes,
    /// upgraded tunnels included.
    pub max_connections: usize,
    /// Client connections held at once from one address (nginx's `limit_conn`), refused the
    /// same way.
    pub max_connections_per_client: usize,
}

pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Backends sit on the cluster LAN, where a connect takes well under a millisecond: a dead peer
/// costs a request this long before its retry on another backend (and is marked down at once).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_H2_STREAMS: u32 = 128;
/// Each client connection may hold a backend connection too: 10 000 clients stay well inside
/// the 65 536 open files a node's services get (HAProxy likewise derives `maxconn` from the
/// file limit, about half of it, so that a flood of connections fails cleanly instead of
/// `accept` failing for want of descriptors).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// A browser opens 6 connections per host (more with HTTP/1 and several tabs); 256 leaves room
/// for a NAT of many users while one address cannot take the whole node.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_h2_streams: DEFAULT_MAX_H2_STREAMS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        }
    }
}
