//! Which node of which cluster a command is about: `--config` and `--node`, defaulting to the
//! seed's on an image, and `appliance check-config`. A leaf: it imports nothing else of this
//! crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use cluster_config::{Cluster, Node};

use api::files::{FileName, IMAGE_RUN_DIR, RUN_NODE_NAME, SEED_CLUSTER_CONFIG, SEED_MOUNT};

/// Which node of which cluster a command is about. On an image both default to the seed.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// cluster.toml; default: the seed's on an image, else the built-in default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The node's name; default: the running node's on an image (its settings say it).
    #[arg(long)]
    pub node: Option<String>,
}

impl NodeArgs {
    /// The validated cluster and this node in it; the error names what is missing or wrong.
    pub fn load(&self) -> anyhow::Result<(Cluster, Node)> {
        let cluster = load_cluster_or_seed(self.config.as_deref())?;
        let name = match &self.node {
            Some(name) => name.clone(),
            None => std::fs::read_to_string(Path::new(IMAGE_RUN_DIR).join(RUN_NODE_NAME))
                .map(|n| n.trim().to_string())
                .context(
                    "--node is required outside a Tandem image (or on one still in its first-boot setup)",
                )?,
        };
        let node = cluster.node(&name).cloned().with_context(|| {
            let names: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
            format!(
                "no node `{name}` in the cluster config (nodes: {})",
                names.join(", ")
            )
        })?;
        Ok((cluster, node))
    }
}

/// `appliance check-config [FILE]`.
pub fn check_config(file: Option<&Path>) -> anyhow::Result<ExitCode> {
    match load_cluster(file) {
        Ok(cluster) => {
            let origin = file.map_or(cluster_config::DEFAULT_CLUSTER_NAME.to_string(), |f| {
                f.display().to_string()
            });
            println!(
                "{origin}: ok: cluster `{}`, {} nodes, primary {}",
                cluster.name,
                cluster.nodes.len(),
                cluster.primary().name
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            Ok(ExitCode::from(2))
        }
    }
}

/// One of the seed's files on an image.
fn seed_file(name: FileName) -> PathBuf {
    Path::new(SEED_MOUNT).join(name)
}

/// `file`, else the seed's cluster.toml on an image, else the built-in default.
pub fn load_cluster_or_seed(file: Option<&Path>) -> anyhow::Result<Cluster> {
    let config = file
        .map(Path::to_path_buf)
        .or_else(|| Some(seed_file(SEED_CLUSTER_CONFIG)).filter(|p| p.exists()));
    load_cluster(config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `file`, or the built-in default cluster when `None`.
fn load_cluster(file: Option<&Path>) -> Result<Cluster, cluster_config::ConfigErrors> {
    match file {
        Some(path) => Cluster::load(path),
        None => Ok(Cluster::default_cluster()),
    }
}
