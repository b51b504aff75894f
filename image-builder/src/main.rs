//! `image-builder`: cluster.toml -> one bootable disk image per node.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build DIR/<node>.img and DIR/<node>.qcow2 for every node, DIR/root.ext4 and
    /// DIR/manifest.json.
    Build {
        /// The cluster description (default: the built-in two-node cluster).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Output directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The appliance binary installed as /usr/sbin/appliance and /sbin/init
        /// (default: `appliance` next to this executable).
        #[arg(long, value_name = "PATH")]
        appliance_bin: Option<PathBuf>,
        /// Cache for the base root filesystem (default: $TANDEM_CACHE, $XDG_CACHE_HOME/tandem
        /// or ~/.cache/tandem).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Package list, strip rules, hooks and overlay (default: this checkout's rootfs/).
        #[arg(long, value_name = "DIR", hide = true)]
        rootfs_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Build {
            config,
            out,
            appliance_bin,
            cache_dir,
            rootfs_dir,
        } => {
            let opts = image_builder::BuildOptions {
                config,
                out_dir: out,
                appliance_bin: appliance_bin.unwrap_or_else(image_builder::default_appliance_bin),
                cache_dir: cache_dir.unwrap_or_else(image_builder::default_cache_dir),
                rootfs_dir: rootfs_dir
                    .unwrap_or_else(|| PathBuf::from(image_builder::DEFAULT_ROOTFS_DIR)),
                source_date_epoch: image_builder::source_date_epoch(),
            };
            let report = image_builder::build(&opts)
                .with_context(|| format!("building images into {}", opts.out_dir.display()))?;
            eprint!("\n{}", image_builder::summary_table(&report));
            Ok(ExitCode::SUCCESS)
        }
    }
}
