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
    /// DIR/manifest.json (and DIR/generic.img, DIR/generic.qcow2 with --generic). The node
    /// images boot straight into service: their admin password is kept beside the cluster CA.
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
        /// The image's release, written to /usr/lib/tandem/version and recorded in
        /// manifest.json (dotted numbers; default: this builder's version).
        #[arg(long = "version", value_name = "V")]
        image_version: Option<String>,
        /// The update signing key pair the image trusts, made there on the first build
        /// (default: CACHE/tandem-update-key).
        #[arg(long, value_name = "DIR")]
        update_key_dir: Option<PathBuf>,
        /// Also trust the public keys in this keyring file (one per line; for key rotation).
        /// Repeatable.
        #[arg(long = "trust-key", value_name = "FILE")]
        trust_keys: Vec<PathBuf>,
        /// Copy this directory's contents over the root filesystem after the overlay (modes
        /// kept, owned by root). Repeatable; applied in order.
        #[arg(long = "extra-tree", value_name = "DIR")]
        extra_trees: Vec<PathBuf>,
        /// Build only root.ext4 and manifest.json (no CA, seeds or node disks): enough for
        /// `bundle`.
        #[arg(long, conflicts_with_all = ["generic", "tls_cert"])]
        root_only: bool,
        /// The certificate chain (PEM) the nodes serve, with --tls-key (default: each node
        /// makes a self-signed one).
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Also build DIR/generic.img and DIR/generic.qcow2: one image for every node, whose
        /// first boot asks which node it is, the admin password, the cluster secret, the
        /// certificate and the webhook (on the serial console and on the web).
        #[arg(long)]
        generic: bool,
        /// Where the generic image's setup wizard listens: an unused address of the cluster's
        /// subnet (default: its last host address, 10.88.0.254 for the default cluster).
        #[arg(long, value_name = "ADDR", requires = "generic")]
        setup_address: Option<std::net::Ipv4Addr>,
    },
    /// Make an ed25519 key pair for signing update bundles: DIR/bundle-signing.key (0600, 64 hex
    /// digits) and DIR/bundle-signing.pub (one line of 64 hex digits, a keyring of one).
    Keygen {
        /// Directory for the key pair (created if missing; an existing key is never replaced).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Pack the root filesystem image, kernel and initrd of an earlier `build` into one signed
    /// update bundle (nothing is rebuilt).
    Bundle {
        /// The private key file (default: the one of the key pair the build's images trust,
        /// recorded in its manifest.json).
        #[arg(long, value_name = "KEY")]
        key: Option<PathBuf>,
        /// The cluster description the images were built from; checked against the build.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The build's output directory (with its manifest.json).
        #[arg(long, value_name = "DIR", default_value = "target/images")]
        images: PathBuf,
        /// The cache the build used (default: as for `build`).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// The bundle file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The version the bundle installs (dotted numbers; default: the build's version).
        #[arg(long = "version", value_name = "V")]
        bundle_version: Option<String>,
    },
    /// Check a bundle as an installer would (signature, product, version, every chunk),
    /// writing nothing.
    VerifyBundle {
        /// Trusted public keys, one per line (as `keygen` writes them).
        #[arg(long, value_name = "FILE")]
        keyring: PathBuf,
        /// Refuse a bundle not newer than this version (as the running system would).
        #[arg(long, value_name = "V")]
        running: Option<String>,
        /// Accept an older or equal version.
        #[arg(long)]
        force: bool,
        /// The bundle.
        bundle: PathBuf,
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
            image_version,
            update_key_dir,
            trust_keys,
            extra_trees,
            root_only,
            tls_cert,
            tls_key,
            generic,
            setup_address,
        } => {
            let cache_dir = cache_dir.unwrap_or_else(image_builder::default_cache_dir);
            let opts = image_builder::BuildOptions {
                config,
                out_dir: out,
                appliance_bin: appliance_bin.unwrap_or_else(image_builder::default_appliance_bin),
                update_key_dir: update_key_dir
                    .unwrap_or_else(|| image_builder::signing::default_key_dir(&cache_dir)),
                cache_dir,
                rootfs_dir: rootfs_dir
                    .unwrap_or_else(|| PathBuf::from(image_builder::DEFAULT_ROOTFS_DIR)),
                source_date_epoch: image_builder::source_date_epoch(),
                version: image_version.unwrap_or_else(|| image_builder::VERSION.to_string()),
                trust_keys,
                extra_trees,
                root_only,
                tls: tls_cert
                    .zip(tls_key)
                    .map(|(certificate, key)| image_builder::TlsFiles { certificate, key }),
                generic: generic.then_some(image_builder::GenericImage { setup_address }),
            };
            let report = image_builder::build(&opts)
                .with_context(|| format!("building images into {}", opts.out_dir.display()))?;
            eprint!("\n{}", image_builder::summary_table(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { out } => {
            let (private, public) = image_builder::bundle::keygen(&out)
                .with_context(|| format!("making a key pair in {}", out.display()))?;
            eprintln!(
                "private key {} (keep it off the appliances), public key {}",
                private.display(),
                public.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundle {
            key,
            config,
            images,
            cache_dir,
            out,
            bundle_version,
        } => {
            let cache_dir = cache_dir.unwrap_or_else(image_builder::default_cache_dir);
            let inputs = image_builder::bundle::locate(&images, &cache_dir)
                .with_context(|| format!("finding the build in {}", images.display()))?;
            if let Some(path) = config {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let cluster =
                    cluster_config::Cluster::from_toml(&text, &path.display().to_string())?;
                anyhow::ensure!(
                    cluster.name == inputs.cluster,
                    "{} describes cluster {:?}, but the images in {} were built for {:?}",
                    path.display(),
                    cluster.name,
                    images.display(),
                    inputs.cluster
                );
            }
            let version = bundle_version
                .or_else(|| inputs.version.clone())
                .unwrap_or_else(|| image_builder::VERSION.to_string());
            let key = key.unwrap_or_else(|| {
                image_builder::signing::private_key_path(
                    &inputs
                        .update_key_dir
                        .clone()
                        .unwrap_or_else(|| image_builder::signing::default_key_dir(&cache_dir)),
                )
            });
            let start = std::time::Instant::now();
            let manifest = image_builder::bundle::write(&inputs, &key, &version, &out)
                .with_context(|| format!("writing the bundle {}", out.display()))?;
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "{}: {} {} for {}, {} ({} payloads) in {:.1} s",
                out.display(),
                manifest.product,
                manifest.version,
                manifest.compatible,
                image_builder::human(size),
                manifest.payloads.len(),
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::VerifyBundle {
            keyring,
            running,
            force,
            bundle,
        } => {
            let start = std::time::Instant::now();
            let v = image_builder::bundle::verify(&bundle, &keyring, running.as_deref(), force)
                .with_context(|| format!("bundle {}", bundle.display()))?;
            eprintln!(
                "{}: good: {} {} for {}, {} payload bytes verified in {:.1} s",
                bundle.display(),
                v.manifest.product,
                v.manifest.version,
                v.manifest.compatible,
                image_builder::human(v.bytes),
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
