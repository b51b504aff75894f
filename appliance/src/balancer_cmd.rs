//! `appliance balancer`: the node's load balancer and TLS terminator as a supervised child,
//! unprivileged but for binding ports 80 and 443. SIGHUP re-reads cluster.toml.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::args::NodeArgs;

/// How long in-flight requests may finish when the node stops (a node stop is bounded: the
/// supervisor's SIGKILL comes at [`STOP_TIMEOUT`]).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
pub const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(7);

#[derive(Debug, Clone, clap::Args)]
pub struct BalancerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Where the balancer keeps its generated certificate (STATE_DIR/tls).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Serve Prometheus metrics here [default: 127.0.0.1:9100, the node's address on loopback].
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// The VIP run directory: keepalived's notify FIFO, the status and track files.
    #[arg(long)]
    pub vip_dir: Option<PathBuf>,
    /// The node's uploaded certificate (from its settings), served when cluster.toml names
    /// none; re-read on SIGHUP, so a replaced certificate is served without a restart.
    #[arg(long)]
    pub served_tls: Option<PathBuf>,
}

/// cluster.toml's certificate, else the settings' uploaded one in `served_tls` when it holds
/// one (else the balancer makes its own).
fn with_served_tls(
    mut cluster: cluster_config::Cluster,
    served_tls: Option<&std::path::Path>,
) -> cluster_config::Cluster {
    if cluster.tls.certificate.is_none() {
        if let Some(dir) = served_tls {
            let (cert, key) = (
                dir.join(crate::layout::SERVED_CERT),
                dir.join(crate::layout::SERVED_KEY),
            );
            if cert.exists() && key.exists() {
                cluster.tls.certificate = Some(cert);
                cluster.tls.key = Some(key);
            }
        }
    }
    cluster
}

pub fn main(args: BalancerArgs) -> anyhow::Result<ExitCode> {
    let (cluster, node) = args.node.load()?;
    let cluster = with_served_tls(cluster, args.served_tls.as_deref());
    let mut opts = balancer::Options::new(&args.state_dir);
    opts.metrics = Some(
        args.metrics
            .unwrap_or_else(|| api::ports::local_addr(node.address, api::ports::BALANCER_METRICS)),
    );
    // In-flight requests get this long on SIGTERM; the supervisor's stop timeout is longer.
    opts.limits.shutdown_grace = SHUTDOWN_GRACE;
    opts.vip_dir = args.vip_dir.clone();
    let reload_args = args.node.clone();
    let served_tls = args.served_tls.clone();
    opts.reload = Some(Arc::new(move || {
        reload_args
            .load()
            .map(|(cluster, _)| with_served_tls(cluster, served_tls.as_deref()))
            .map_err(|e| format!("{e:#}"))
    }));
    balancer::run_blocking(cluster, &node.name, opts)?;
    Ok(ExitCode::SUCCESS)
}
