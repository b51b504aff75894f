//! `appliance run`: a node's stack on a developer machine. Wiring only: the node plan
//! (`node`) and the node's settings (`settings`, made from what `run` was started with: a
//! developer machine has no wizard).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::args::NodeArgs;
use crate::layout::Layout;
use crate::node::{services, supervise};
use crate::secrets;

/// `appliance run`: this node's stack on a developer machine, until SIGTERM/SIGINT.
///
/// The cluster secret is `secret_file`, else `<cluster.toml's directory>/<cluster name>.secret`
/// (so the nodes of one config on one machine share it), else `<state_dir>/cluster.secret`.
pub fn main(
    config: Option<&Path>,
    node: &str,
    state_dir: &Path,
    secret_file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let (cluster, node) = NodeArgs {
        config: config.map(Path::to_path_buf),
        node: Some(node.to_string()),
    }
    .load()?;
    let node = &node;
    crate::preflight::require_programs(&[db::MARIADBD, db::INSTALL_DB, web::NGINX])?;
    if !node.address.is_loopback() {
        crate::preflight::require_programs(&[vip::KEEPALIVED])?;
    }
    let mut layout = Layout::dev(state_dir);
    match (secret_file, config.and_then(Path::parent)) {
        (Some(file), _) => layout.secret = file.to_path_buf(),
        (None, Some(dir)) => layout.secret = dir.join(format!("{}.secret", cluster.name)),
        (None, None) => {}
    }
    // Like the secret, whatever --secret-file says: the nodes of one config share a CA.
    if let Some(dir) = config.and_then(Path::parent) {
        layout.dev_ca = Some(dir.join(format!("{}-ca.secret", cluster.name)));
    }
    let layout = layout.absolute().context("resolving the state directory")?;
    // A developer machine has no wizard: its settings are made from what it was started with
    // (and a login kept in the state directory), stored like an image's.
    crate::files::make_dir(&layout.state, 0o755)?;
    let secret = secrets::load_or_create_secret(&layout.secret)?;
    let mut store = crate::settings::Store::open(&layout.state)?;
    let seed = crate::settings::dev_seed(&cluster, &node.name, &layout.state, &secret)?;
    let (_, settings) = crate::settings::resolve(&mut store, &cluster, &seed)?
        .context("a developer machine's settings are always complete")?;
    drop(store);
    let specs = services(&cluster, node, &layout, config, &settings, None)?;
    crate::preflight::require_reachable_state_dir(&layout.state, &specs)?;
    let reason = supervise(specs, &layout, Vec::new())?;
    tracing::info!(?reason, "supervisor stopped");
    Ok(ExitCode::SUCCESS)
}
