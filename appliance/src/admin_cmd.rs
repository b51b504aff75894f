//! `appliance admin`: the `admin` crate's server as a supervised child, with the node found
//! like every other child finds it, and the log monitor's alert history read here (the binary
//! links both; services never depend on each other). `appliance admin --setup` is the
//! first-boot wizard instead, which needs only the cluster (a generic image does not know its
//! node yet). Also the floating-IP line of `appliance status`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::args::NodeArgs;
use crate::layout::Layout;

#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// The node's state directory (the supervisor's socket and state DB are there); not used
    /// by `--setup`.
    #[arg(long, required_unless_present = "setup")]
    pub state_dir: Option<PathBuf>,
    /// The supervisor's control socket [default: STATE_DIR/control.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Directory with `node.crt`, `node.key` and `ca.crt` (the seed's on an image); without
    /// it a self-signed certificate is made once in STATE_DIR/admin/tls and peers cannot call
    /// in. With `--setup` (required): `node.crt` and `node.key`, the wizard's certificate.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Listen here instead of the node's address and admin port (required with `--setup`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The node's runtime directory (the database agent's status file is there)
    /// [default: STATE_DIR/run, or /run/tandem on an image].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// A local Prometheus endpoint to aggregate (host:port, path /metrics); repeat for several
    /// [default: the balancer's and the log monitor's].
    #[arg(long = "scrape")]
    pub scrape: Vec<String>,
    /// The settings service's socket [default: RUN_DIR/settings.sock].
    #[arg(long)]
    pub settings_socket: Option<PathBuf>,
    /// Serve only the first-boot wizard (the node's settings are incomplete): needs the
    /// cluster (`--config` or the seed's), `--listen` and `--tls-dir`, not the node.
    #[arg(long, requires_all = ["listen", "tls_dir"])]
    pub setup: bool,
}

/// `appliance admin`: serves until SIGTERM.
pub fn main(args: AdminArgs) -> anyhow::Result<ExitCode> {
    if args.setup {
        return setup(args);
    }
    let (cluster, node) = args.node.load()?;
    let image = Layout::image();
    let state_dir = args
        .state_dir
        .context("--state-dir is required (unless --setup)")?;
    let listen = args
        .listen
        .unwrap_or(SocketAddr::from((node.address, cluster.ports.admin)));
    let socket = args
        .socket
        .unwrap_or_else(|| state_dir.join(api::control::SOCKET_FILE));
    let run_dir = args.run_dir.unwrap_or_else(|| {
        if state_dir == image.state {
            image.run.clone()
        } else {
            Layout::dev(&state_dir).run
        }
    });
    let settings_socket = args
        .settings_socket
        .unwrap_or_else(|| run_dir.join(api::settings::SOCKET_FILE));
    // `--tls-dir`, else the seed's when it has a node certificate.
    let tls_dir = args
        .tls_dir
        .or_else(|| Some(image.tls).filter(|d| d.join(api::files::NODE_CERT).exists()));
    let scrape = match args.scrape.is_empty() {
        true => admin::default_scrape(node.address),
        false => args.scrape,
    };
    let alerts_db = logmon::alerts::db_path(&state_dir);
    let alerts: admin::AlertSource = Box::new(move |limit| {
        let alerts = logmon::alerts::recent(&alerts_db, limit).map_err(|e| e.to_string())?;
        Ok(alerts
            .into_iter()
            .map(|a| admin::Alert {
                rule: a.rule,
                subject: a.subject,
                state: a.state.as_str().to_string(),
                message: a.message,
                fired_ms: a.fired_ms,
                resolved_ms: a.resolved_ms,
            })
            .collect())
    });
    admin::run(admin::Config {
        cluster,
        node,
        listen,
        state_dir,
        socket,
        run_dir,
        tls_dir,
        scrape,
        alerts,
        update_keyring: api::files::IMAGE_UPDATE_KEYRING.into(),
        settings_socket,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `appliance admin --setup`: the first-boot wizard, until SIGTERM.
fn setup(args: AdminArgs) -> anyhow::Result<ExitCode> {
    // The cluster only (what `NodeArgs::load` reads, without the node).
    let cluster = crate::args::load_cluster_or_seed(args.node.config.as_deref())?;
    let listen = args.listen.context("--setup needs --listen")?;
    let tls_dir = args.tls_dir.context("--setup needs --tls-dir")?;
    let run_dir = args.run_dir.unwrap_or_else(|| match &args.state_dir {
        Some(state) if *state != Layout::image().state => Layout::dev(state).run,
        _ => Layout::image().run,
    });
    let settings_socket = args
        .settings_socket
        .unwrap_or_else(|| run_dir.join(api::settings::SOCKET_FILE));
    admin::run_setup(admin::SetupConfig {
        cluster,
        listen,
        tls_dir,
        settings_socket,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The floating-IP line of `appliance status` (see [`admin::peer::status_line`]): every node's
/// view on an image (its seed names the node and holds its certificates), this node's own
/// under `appliance run --state-dir`.
pub fn status_line(state_dir: Option<&Path>) -> Option<String> {
    let layout = match state_dir {
        Some(dir) => Layout::dev(dir),
        None => Layout::image(),
    };
    let identity = state_dir
        .is_none()
        .then(|| {
            NodeArgs {
                config: None,
                node: None,
            }
            .load()
            .ok()
        })
        .flatten();
    admin::peer::status_line(&layout.vip_dir(), identity, &Layout::image().tls)
}
