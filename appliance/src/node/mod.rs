//! A node's stack, built from the cluster config: which services run, with which rendered
//! configuration, in which directories. Shared by `appliance run` (a developer machine) and
//! `appliance init` (PID 1 on the image); only the [`Layout`] differs.
//!
//! Three steps: [`inputs`] reads what the plan needs (boot count, cluster secret, TLS files,
//! the persisted primary, ...), [`plan()`] (pure) turns the cluster, the node, the layout and
//! those inputs into directories, files and services, and [`apply()`] makes them.

mod apply;
mod plan;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use cluster_config::settings::Settings;
use cluster_config::{Cluster, Node};

use crate::layout::Layout;
use crate::secrets::{self, NodeTls};
use crate::supervisor::{self, ServiceSpec, SupervisorOptions};

pub use apply::{apply, write_files};
pub use plan::{
    plan, plan_stack, plan_wizard, settings_files, Contents, Dir, File, Inputs, NodePlan, Owner,
    PlanError, WizardInputs, MARIADB_USER, NGINX_USER, SETTINGS_SERVICE,
};

/// Every service of the node, its directories and files made: its own stack plus the
/// appliance's helpers (settings service, log monitor, balancer, keepalived, admin server),
/// which are `appliance` subcommands run as children. `config` is the cluster.toml they read;
/// `None` on an image, where they read the seed (`seed_dir`).
pub fn services(
    cluster: &Cluster,
    node: &Node,
    layout: &Layout,
    config: Option<&Path>,
    settings: &Settings,
    seed_dir: Option<&Path>,
) -> anyhow::Result<Vec<ServiceSpec>> {
    let layout = layout
        .absolute()
        .context("resolving the node's directories")?;
    let mut inputs = inputs(cluster, node, &layout, config, settings)?;
    inputs.seed_dir = seed_dir.map(Path::to_path_buf);
    if !node.address.is_loopback() {
        inputs.interface = Some(crate::netif::interface_with(node.address)?);
    }
    if inputs.root {
        move_old_alerts_db(&layout.state)?;
    }
    inputs.updates = inputs.root && crate::disk::kernel_param(api::update::SLOT_PARAM).is_some();
    apply(&plan(cluster, node, &layout, &inputs)?)
}

/// Reads (and where absent creates) what the plan needs: checks the service users when root,
/// counts the boot, takes the cluster secret from the settings, issues a developer machine's
/// TLS files and reads them, and looks at MariaDB's datadir and the persisted primary.
/// `interface` and `seed_dir` are left unset.
pub fn inputs(
    cluster: &Cluster,
    node: &Node,
    layout: &Layout,
    config: Option<&Path>,
    settings: &Settings,
) -> anyhow::Result<Inputs> {
    let root = nix::unistd::geteuid().is_root();
    if root {
        crate::users::require()?;
    }
    crate::files::make_dir(&layout.state, 0o755)?;
    // A full or failing data partition must not stop the node (PID 1 would reboot into the
    // same fault): the count is skipped, the state DB's own fallback says what is wrong.
    let boot = crate::files::count_boot(&layout.state).unwrap_or_else(|e| {
        tracing::error!("counting the boot: {e:#}; skipped");
        0
    });
    tracing::info!(node = %node.name, boot, state = %layout.state.display(), "preparing node");
    let secret = settings
        .secret()
        .map_err(|e| anyhow::anyhow!("the settings' cluster secret: {e}"))?;
    let tls_dir = match &layout.dev_ca {
        Some(ca) => {
            secrets::issue_dev_tls(ca, cluster, node, &layout.tls)?;
            layout.tls.clone()
        }
        None => layout.seed_tls_for(&node.name),
    };
    let exe = std::env::current_exe().context("locating the appliance binary")?;
    let config = match config {
        Some(c) => {
            Some(std::path::absolute(c).with_context(|| format!("resolving {}", c.display()))?)
        }
        None => None,
    };
    Ok(Inputs {
        root,
        boot,
        secret,
        tls: NodeTls::read(&tls_dir)?,
        persisted_primary: std::fs::read_to_string(layout.state.join(api::files::DB_PRIMARY)).ok(),
        db_initialised: db::is_initialised(&layout.db_paths().datadir),
        db_template: Some(PathBuf::from(db::datadir::TEMPLATE)).filter(|t| t.is_file()),
        interface: None,
        exe,
        config,
        updates: false,
        settings: settings.clone(),
        seed_dir: None,
    })
}

/// Runs `specs` under the supervisor with the node's log store attached, until it stops.
/// `faults` are what keeps the node degraded before anything started (see `init`).
pub fn supervise(
    specs: Vec<ServiceSpec>,
    layout: &Layout,
    faults: Vec<api::storage::Degraded>,
) -> anyhow::Result<supervisor::StopReason> {
    let mut options = SupervisorOptions::new(&layout.state);
    options.control_socket = layout.socket.clone();
    if nix::unistd::geteuid().is_root() {
        // The admin server (not root) is in this group.
        options.control_group = Some(crate::users::gid(crate::users::CONTROL_GROUP)?);
    }
    options.run_dir = Some(layout.run.clone());
    options.faults = faults;
    let logs = crate::logmon_cmd::attach_log_store(&mut options);
    let reason = supervisor::run(specs, options)?;
    logs.finish();
    Ok(reason)
}

/// `alerts.db` (and its WAL) lived in the state directory itself before the log monitor had a
/// user of its own: moved into its directory once, so no alert history is lost.
fn move_old_alerts_db(state: &Path) -> anyhow::Result<()> {
    let file = logmon::alerts::ALERTS_DB_FILE;
    let logmon_state = state.join(logmon::alerts::ALERTS_SUBDIR);
    if !state.join(file).exists() || logmon_state.join(file).exists() {
        return Ok(());
    }
    crate::files::make_dir(&logmon_state, 0o755)?;
    let (from, to) = (state.join(file), logmon_state.join(file));
    let moving = || format!("moving {} into {}", from.display(), logmon_state.display());
    std::fs::rename(&from, &to).with_context(moving)?;
    api::sqlite::move_wal_files(&from, &to).with_context(moving)
}
