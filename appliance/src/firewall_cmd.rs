//! `appliance firewall print|apply|show`: the node's ruleset from the cluster config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::args::NodeArgs;

#[derive(Subcommand)]
pub enum Action {
    /// Print the ruleset this node's config produces, without loading it.
    Print(NodeArgs),
    /// Load the ruleset as one transaction (a rejected one leaves the old rules in force).
    Apply(NodeArgs),
    /// The live ruleset with its counters.
    Show,
    /// Check a ruleset file with `nft -c` without loading it.
    Check { file: PathBuf },
}

pub fn main(action: Action) -> anyhow::Result<ExitCode> {
    match action {
        Action::Print(args) => {
            let (cluster, node) = args.load()?;
            print!("{}", firewall::ruleset(&cluster, &node));
        }
        Action::Apply(args) => {
            let (cluster, node) = args.load()?;
            firewall::apply(&firewall::ruleset(&cluster, &node))?;
            tracing::info!(node = %node.name, "firewall applied");
        }
        Action::Show => print!("{}", firewall::show()?),
        Action::Check { file } => {
            let rules = std::fs::read_to_string(&file)?;
            firewall::check(&rules)?;
            println!("{}: ok", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
