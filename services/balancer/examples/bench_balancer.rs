//! Tandem's balancer as a standalone process for `bench/balancer.sh`: two (or more) backends
//! on one port, a plain-HTTP proxy listener, an HTTPS listener, a fixed worker count.
//!
//! ```text
//! bench_balancer --backend 127.0.0.11:8081 --backend 127.0.0.12:8081 \
//!     --http 127.0.0.1:18080 --https 127.0.0.1:18443 --cert c.pem --key k.pem --workers 1
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use balancer::{Listen, Options};
use cluster_config::{Cluster, DbRole, Node};

/// The `appliance` binary, which runs the balancer in production, uses glibc's allocator;
/// `--features mimalloc` swaps in mimalloc, for bench/alloc.sh.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_balancer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut backends: Vec<SocketAddr> = Vec::new();
    let (mut http, mut https, mut cert, mut key, mut workers, mut state) =
        (None, None, None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let addr = |v: String| v.parse::<SocketAddr>().map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--backend" => backends.push(addr(value()?)?),
            "--http" => http = Some(addr(value()?)?),
            "--https" => https = Some(addr(value()?)?),
            "--cert" => cert = Some(PathBuf::from(value()?)),
            "--key" => key = Some(PathBuf::from(value()?)),
            "--state" => state = Some(PathBuf::from(value()?)),
            "--workers" => workers = Some(value()?.parse::<usize>().map_err(|e| e.to_string())?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let port = backends.first().ok_or("at least one --backend")?.port();
    if backends.iter().any(|b| b.port() != port) {
        return Err("all backends must use the same port (ports.web)".into());
    }
    let mut cluster = Cluster::default_cluster();
    cluster.ports.web = port;
    cluster.nodes.clear();
    for (i, b) in backends.iter().enumerate() {
        let std::net::IpAddr::V4(address) = b.ip() else {
            return Err(format!("{b}: the cluster model is IPv4 only"));
        };
        cluster.nodes.push(Node {
            name: format!("server{}", i + 1),
            address,
            db_role: if i == 0 {
                DbRole::Primary
            } else {
                DbRole::Replica
            },
            server_id: i as u32 + 1,
            weight: 1,
            backup: false,
            vrrp_priority: 100,
        });
    }
    cluster.tls.certificate = cert;
    cluster.tls.key = key;
    let state = state.unwrap_or_else(|| std::env::temp_dir().join("tandem-bench-balancer"));
    let mut opts = Options::new(state);
    opts.workers = workers;
    // All the load comes from one address, and HAProxy's bench frontend has no per-client
    // limit: only the global cap applies, as there.
    opts.limits.max_connections_per_client = opts.limits.max_connections;
    opts.listen = Some(Listen {
        http: Vec::new(),
        https: https.into_iter().collect(),
        http_proxy: http.into_iter().collect(),
    });
    balancer::run_blocking(cluster, "server1", opts).map_err(|e| e.to_string())
}
