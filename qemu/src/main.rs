//! `tandem-qemu`: a Tandem cluster in QEMU on this machine, reachable from its browser.
//!
//!   tandem-qemu up [--images DIR] [--config FILE]   boot every node, forward ports, wait
//!   tandem-qemu down                                 power the running cluster off
//!   tandem-qemu failover --trials N                  kill the floating IP's holder N times
//!   tandem-qemu soak --minutes M                     probe the floating IP, count holder changes
//!   tandem-qemu boot-time --boots N                  QEMU start to serving, first and later boots

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use qemu::bench::{self, BenchTarget, FailoverOptions, SoakOptions};
use qemu::{ClusterSpec, Forward, ShutdownSignals, UpOptions, VipWatch};

const DEFAULT_IMAGES: &str = "target/images";
const DEFAULT_RUN_DIR: &str = "target/qemu-run";
const FAILOVER_RUN_DIR: &str = "target/qemu-failover";
const SOAK_RUN_DIR: &str = "target/qemu-soak";
const BOOT_TIME_RUN_DIR: &str = "target/qemu-boot-time";
/// `up`: how long the nodes get to serve, then how long one of them gets to take the floating IP.
const UP_BOOT_TIMEOUT_S: u64 = 900;
const UP_HOLD_TIMEOUT_S: u64 = 60;
/// Host ports: floating IP HTTP/HTTPS, then one per node from these bases.
const HOST_HTTP: u16 = 8080;
const HOST_HTTPS: u16 = 8443;
const HOST_NODE_BASE: u16 = 8081;
const HOST_ADMIN_BASE: u16 = 9443;
/// Seconds the guests get to power off on ACPI before they are killed.
const SHUTDOWN_TIMEOUT_S: u64 = 60;

#[derive(Parser)]
#[command(name = "tandem-qemu", version, about = "Run a Tandem cluster in QEMU")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot every node of the cluster and forward its ports to 127.0.0.1; stop with Ctrl-C.
    Up {
        /// Directory with one image per node (`<node>.qcow2`); built with `image-builder` if missing.
        #[arg(long, default_value = DEFAULT_IMAGES)]
        images: PathBuf,
        /// cluster.toml; the built-in default when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serial logs, disk overlays and the pid file.
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Memory per VM in MiB.
        #[arg(long, default_value_t = qemu::DEFAULT_MEMORY_MIB)]
        memory: u32,
        /// Seconds the guests get to power off cleanly (ACPI) before they are killed.
        #[arg(long, default_value_t = SHUTDOWN_TIMEOUT_S)]
        shutdown_timeout: u64,
    },
    /// Failover bench: kill the floating IP's holder N times while a client probes the address
    /// every 20 ms; print each trial's longest gap between answers and who took over.
    Failover {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Kills of the holder, one after the other (each node restarted in between).
        #[arg(long, default_value_t = 5)]
        trials: u32,
        /// Seconds to watch, after a restarted node serves again, whether the address moves back.
        #[arg(long, default_value_t = bench::DEFAULT_SETTLE.as_secs())]
        settle: u64,
        /// Serial logs, disk overlays and the pid file (`down --run-dir` stops the bench).
        #[arg(long, default_value = FAILOVER_RUN_DIR)]
        run_dir: PathBuf,
        /// Kill only the holder's balancer (through the peer API) instead of its machine; needs
        /// a client certificate from the cluster CA (`--peer-cert`, `--peer-key`).
        #[arg(long, requires_all = ["peer_cert", "peer_key"])]
        balancer_only: bool,
        #[arg(long)]
        peer_cert: Option<PathBuf>,
        #[arg(long)]
        peer_key: Option<PathBuf>,
        /// Reboot the holder on purpose (Ctrl-Alt-Del: its services stop in order and it hands
        /// the address over) instead of cutting its power; each request is given 5 s.
        #[arg(long, conflicts_with = "balancer_only")]
        reboot: bool,
    },
    /// Soak bench: probe the floating IP every 20 ms for M minutes and count holder changes
    /// (looked at every 5 s); nothing is killed.
    Soak {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Serial logs, disk overlays and the pid file (`down --run-dir` stops the bench).
        #[arg(long, default_value = SOAK_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Boot bench: boot each node alone (`--node`, default the first), `--boots` times (the
    /// first boot, then after clean power-offs); print when each stage was reached.
    BootTime {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Nodes to boot, one after the other (each alone).
        #[arg(long = "node")]
        nodes: Vec<String>,
        #[arg(long, default_value_t = 3)]
        boots: u32,
        #[arg(long, default_value = BOOT_TIME_RUN_DIR)]
        run_dir: PathBuf,
        /// The metrics token of the images (for the memory figures) [default: the one kept
        /// beside the CA the images' manifest.json names].
        #[arg(long)]
        metrics_token: Option<PathBuf>,
    },
    /// Kill one node's VM as a power cut would (QEMU quits at once), e.g. to watch the
    /// floating IP move; Ctrl-C and `up` again bring it back.
    Kill {
        node: String,
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Stop the cluster that `up` runs from this run dir.
    Down {
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Seconds to wait for `up` to finish (it powers the guests off first).
        #[arg(long, default_value_t = SHUTDOWN_TIMEOUT_S + 30)]
        timeout: u64,
    },
}

/// The cluster a bench boots (`up` has the same options).
#[derive(clap::Args)]
struct ClusterArgs {
    /// Directory with one image per node (`<node>.qcow2`); built with `image-builder` if missing.
    #[arg(long, default_value = DEFAULT_IMAGES)]
    images: PathBuf,
    /// cluster.toml; the built-in default when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Memory per VM in MiB.
    #[arg(long, default_value_t = qemu::DEFAULT_MEMORY_MIB)]
    memory: u32,
}

impl ClusterArgs {
    fn target(&self, run_dir: &Path) -> anyhow::Result<BenchTarget> {
        let cluster = load_cluster(self.config.as_deref())?;
        ensure_images(&cluster, &self.images, self.config.as_deref())?;
        let opts = up_options(&cluster, &self.images, run_dir, self.memory)?;
        Ok(BenchTarget {
            spec: opts.spec,
            floating_ip: cluster.floating_ip,
            https_port: cluster.ports.https,
            page_port: cluster.ports.https,
        })
    }
}

fn load_cluster(config: Option<&Path>) -> anyhow::Result<cluster_config::Cluster> {
    match config {
        Some(path) => cluster_config::Cluster::load(path).map_err(|e| anyhow::anyhow!("{e}")),
        None => Ok(cluster_config::Cluster::default_cluster()),
    }
}

fn main() -> anyhow::Result<ExitCode> {
    // Before any thread exists, so every thread inherits the blocked mask.
    let signals = ShutdownSignals::block()?;
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Cmd::Up {
            images,
            config,
            run_dir,
            memory,
            shutdown_timeout,
        } => {
            let cluster = load_cluster(config.as_deref())?;
            ensure_images(&cluster, &images, config.as_deref())?;
            let mut opts = up_options(&cluster, &images, &run_dir, memory)?;
            opts.shutdown_timeout = Duration::from_secs(shutdown_timeout);
            qemu::up(&opts, &signals, |c| {
                print!("{}", qemu::describe(c, &opts.forwards))
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Failover {
            cluster,
            trials,
            settle,
            run_dir,
            balancer_only,
            peer_cert,
            peer_key,
            reboot,
        } => {
            let kill = match (balancer_only, peer_cert, peer_key) {
                (true, Some(cert), Some(key)) => bench::Kill::Balancer {
                    cert: std::path::absolute(cert)?,
                    key: std::path::absolute(key)?,
                    admin_port: load_cluster(cluster.config.as_deref())?.ports.admin,
                },
                _ if reboot => bench::Kill::Reboot,
                _ => bench::Kill::Machine,
            };
            let opts = FailoverOptions {
                target: cluster.target(&run_dir)?,
                trials,
                settle: Duration::from_secs(settle),
                kill,
            };
            let cancel = signals.watch();
            let run = match bench::failover(&opts, &cancel, &mut |line| println!("{line}")) {
                Err(qemu::Error::Cancelled) => return Ok(interrupted()),
                other => other?,
            };
            print!("\n{}", bench::failover_table(&run.trials));
            Ok(if run.interrupted {
                interrupted()
            } else if run.all_failed_over(trials) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Soak {
            cluster,
            minutes,
            run_dir,
        } => {
            let opts = SoakOptions {
                target: cluster.target(&run_dir)?,
                duration: Duration::from_secs(minutes * 60),
            };
            let cancel = signals.watch();
            let report = match bench::soak(&opts, &cancel, &mut |line| println!("{line}")) {
                Err(qemu::Error::Cancelled) => return Ok(interrupted()),
                other => other?,
            };
            print!("\n{}", report.summary());
            Ok(if report.interrupted {
                interrupted()
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::BootTime {
            cluster,
            nodes,
            boots,
            run_dir,
            metrics_token,
        } => {
            let target = cluster.target(&run_dir)?;
            let mut spec = target.spec.clone();
            let wanted = if nodes.is_empty() {
                spec.nodes.iter().take(1).map(|n| n.name.clone()).collect()
            } else {
                nodes
            };
            for n in &wanted {
                if !spec.nodes.iter().any(|s| &s.name == n) {
                    bail!("no node {n} in the cluster");
                }
            }
            spec.nodes.retain(|n| wanted.contains(&n.name));
            // A fresh disk per run: the first boot must be a first boot.
            if run_dir.exists() {
                std::fs::remove_dir_all(&run_dir)
                    .with_context(|| format!("removing {}", run_dir.display()))?;
            }
            let config = load_cluster(cluster.config.as_deref())?;
            let metrics_token = metrics_token.or_else(|| built_metrics_token(&cluster.images));
            let opts = qemu::boottime::BootTimeOptions {
                spec,
                https_port: target.https_port,
                boots,
                admin_port: config.ports.admin,
                metrics_token,
            };
            let cancel = signals.watch();
            let report =
                match qemu::boottime::boot_time(&opts, &cancel, &mut |line| eprintln!("{line}")) {
                    Err(qemu::Error::Cancelled) => return Ok(interrupted()),
                    other => other?,
                };
            print!("\n{}", qemu::boottime::table(&report.records));
            if !report.memory.is_empty() {
                print!("\n{}", qemu::boottime::memory_table(&report.memory));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kill { node, run_dir } => {
            let socket = run_dir.join(format!("{node}.qmp"));
            let mut qmp =
                qemu::qmp::Qmp::connect(&socket, Duration::from_secs(5)).map_err(|e| {
                    anyhow::anyhow!("{}: {e} (is `up` running there?)", socket.display())
                })?;
            // QEMU exits before it answers `quit`; a closed connection is success.
            let _ = qmp.execute("quit", None);
            println!("{node}: QEMU killed");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down { run_dir, timeout } => {
            if qemu::down(&run_dir, Duration::from_secs(timeout))? {
                println!("cluster in {} stopped", run_dir.display());
            } else {
                println!("no cluster is up in {}", run_dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The metrics token the images in `images` were built with: the file `metrics-token`
/// (image-builder's `pki::METRICS_TOKEN_FILE`) beside the CA their `manifest.json` names, as
/// the end-to-end tests find it.
fn built_metrics_token(images: &Path) -> Option<PathBuf> {
    let manifest = std::fs::read_to_string(images.join("manifest.json")).ok()?;
    let manifest: serde_json::Value = serde_json::from_str(&manifest).ok()?;
    let token = PathBuf::from(manifest["ca_dir"].as_str()?).join("metrics-token");
    token.is_file().then_some(token)
}

/// Stopped by Ctrl-C or `down`: the shell's convention for "killed by SIGINT".
fn interrupted() -> ExitCode {
    eprintln!("tandem-qemu: interrupted; cluster stopped");
    ExitCode::from(130)
}

/// A node's image in `dir`: `<node>.qcow2`, else `<node>.img` (raw).
fn image_path(dir: &Path, node: &str) -> Option<PathBuf> {
    ["qcow2", "img"]
        .iter()
        .map(|ext| dir.join(format!("{node}.{ext}")))
        .find(|p| p.is_file())
}

/// Build the images with the sibling `image-builder` executable when any is missing.
fn ensure_images(
    cluster: &cluster_config::Cluster,
    dir: &Path,
    config: Option<&Path>,
) -> anyhow::Result<()> {
    if cluster
        .nodes
        .iter()
        .all(|n| image_path(dir, &n.name).is_some())
    {
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let builder = exe.with_file_name("image-builder");
    if !builder.is_file() {
        bail!(
            "images missing in {} and no image-builder next to {} (build it: cargo build -p image-builder, or run scripts/build-images)",
            dir.display(),
            exe.display()
        );
    }
    let mut cmd = Command::new(&builder);
    cmd.arg("build").arg("--out").arg(dir);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    eprintln!(
        "images missing in {}; building them: {cmd:?}",
        dir.display()
    );
    let status = cmd
        .status()
        .with_context(|| format!("running {}", builder.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", builder.display());
    }
    Ok(())
}

fn up_options(
    cluster: &cluster_config::Cluster,
    images: &Path,
    run_dir: &Path,
    memory: u32,
) -> anyhow::Result<UpOptions> {
    let mut spec = ClusterSpec::new(run_dir);
    spec.memory_mib = memory;
    spec.client = Ipv4Addr::from(u32::from(cluster.subnet.addr) + 1);
    spec.prefix = cluster.subnet.prefix;
    let local = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let vip = cluster.floating_ip;
    let mut forwards = vec![
        Forward {
            label: "floating IP, HTTP".into(),
            listen: local(HOST_HTTP),
            target: (vip, cluster.ports.http).into(),
        },
        Forward {
            label: "floating IP, HTTPS".into(),
            listen: local(HOST_HTTPS),
            target: (vip, cluster.ports.https).into(),
        },
    ];
    for (i, node) in cluster.nodes.iter().enumerate() {
        let image = image_path(images, &node.name)
            .with_context(|| format!("no image for node {} in {}", node.name, images.display()))?;
        spec = spec.node(&node.name, node.address, image);
        let i = u16::try_from(i).context("too many nodes")?;
        // The node's own balancer: nginx's web port is open to cluster peers only.
        forwards.push(Forward {
            label: format!("{} balancer (HTTPS)", node.name),
            listen: local(HOST_NODE_BASE + i),
            target: (node.address, cluster.ports.https).into(),
        });
        forwards.push(Forward {
            label: format!("{} admin (HTTPS)", node.name),
            listen: local(HOST_ADMIN_BASE + i),
            target: (node.address, cluster.ports.admin).into(),
        });
    }
    Ok(UpOptions {
        spec,
        forwards,
        shutdown_timeout: Duration::from_secs(SHUTDOWN_TIMEOUT_S),
        vip: Some(VipWatch {
            ip: vip,
            page_port: cluster.ports.https,
            boot_timeout: Duration::from_secs(UP_BOOT_TIMEOUT_S),
            hold_timeout: Duration::from_secs(UP_HOLD_TIMEOUT_S),
            host_url: format!("https://127.0.0.1:{HOST_HTTPS}/"),
        }),
    })
}
