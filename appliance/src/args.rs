//! Which node of which cluster a command is about: `--config` and `--node`, defaulting to the
//! seed's on an image, and `appliance check-config`. A leaf: it imports nothing else of this
//! crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use cluster_config::{Cluster, Node};

use api::files::{FileName, SEED_CLUSTER_CONFIG, SEED_MOUNT, SEED_NODE_NAME};

/// Which node of which cluster a command is about. On an image both default to the seed.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// cluster.toml; default: the seed's on an image, else the built-in default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The node's name; default: the seed's on an image.
    #[arg(long)]
    pub node: Option<String>,
}

impl NodeArgs {
    /// The validated cluster and this node in it; the error names what is missing or wrong.
    pub fn load(&self) -> anyhow::Result<(Cluster, Node)> {
        let config = self
            .config
            .clone()
            .or_else(|| Some(seed_file(SEED_CLUSTER_CONFIG)).filter(|p| p.exists()));
        let cluster = load_cluster(config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let name = match &self.node {
            Some(name) => name.clone(),
            None => std::fs::read_to_string(seed_file(SEED_NODE_NAME))
                .map(|n| n.trim().to_string())
                .context("--node is required outside a Tandem image")?,
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

/// `file`, or the built-in default cluster when `None`.
fn load_cluster(file: Option<&Path>) -> Result<Cluster, cluster_config::ConfigErrors> {
    match file {
        Some(path) => Cluster::load(path),
        None => Ok(Cluster::default_cluster()),
    }
}
