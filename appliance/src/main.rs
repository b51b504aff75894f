//! `appliance`: one multi-call binary. `init` is PID 1 on the image, `run` supervises a node's
//! stack on a developer machine, the rest talk to a running supervisor or check configs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "appliance", version, about = "Tandem supervisor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a cluster.toml (the built-in default when no file is given).
    CheckConfig { file: Option<PathBuf> },
    /// Print the built-in default cluster.toml.
    DefaultConfig,
    /// Run one node's stack (nginx, MariaDB, the app) under the supervisor on this machine.
    Run {
        /// cluster.toml; the built-in default when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Which node of the cluster this machine is.
        #[arg(long)]
        node: String,
        /// Where state lives: MariaDB datadir, state DB, logs, control socket.
        #[arg(long)]
        state_dir: PathBuf,
        /// The cluster secret [default: <config dir>/<cluster name>.secret, created if absent].
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
    /// The database: replication status of every node, planned switchover.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// The node's database agent (a supervised service: sets up and watches replication).
    #[command(hide = true)]
    DbAgent {
        #[arg(long)]
        config: PathBuf,
    },
    /// A fresh MariaDB datadir from the image's template, whole or not at all (a supervised
    /// one-shot).
    #[command(hide = true)]
    DbInit {
        #[arg(long)]
        datadir: PathBuf,
        /// The files become this user's (and its group's).
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        template: PathBuf,
    },
    /// The built-in demo application (a supervised service; configured by TANDEM_* variables).
    #[command(hide = true)]
    App,
    /// PID 1 on a Tandem image.
    Init,
    /// The log monitor (a supervised service): metrics from logs and events, alerts.
    Logmon(appliance::logmon_cmd::Args),
    /// The load balancer and TLS terminator in front of every node's nginx.
    Balancer(appliance::balancer_cmd::BalancerArgs),
    /// The HTTPS admin port: status page, status JSON, metrics, peer API.
    Admin(appliance::admin_cmd::AdminArgs),
    /// The first-boot wizard on the serial console (started by init while setup is pending).
    SetupConsole(appliance::setup_console::Args),
    /// The node's nftables firewall.
    Firewall {
        #[command(subcommand)]
        action: appliance::firewall_cmd::Action,
    },
    /// Show the services of a running supervisor.
    Status {
        #[command(flatten)]
        target: appliance::control::Target,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to one service's processes (HUP, INT, KILL, TERM, USR1, USR2).
    Signal {
        #[command(flatten)]
        target: appliance::control::Target,
        service: String,
        signal: String,
    },
    /// Signed update bundles: install into the inactive slot, show the slots, boot one once.
    Update {
        #[command(subcommand)]
        command: appliance::update_cmd::UpdateCommand,
    },
    /// The whole cluster: a rolling upgrade to a signed bundle.
    Cluster {
        #[command(subcommand)]
        command: appliance::update_cmd::ClusterCommand,
    },
    /// The update service (a supervised service on an image: installs, blessing, rollback).
    #[command(hide = true)]
    Updater(appliance::updater::UpdaterArgs),
    /// The settings service (a supervised service: the first-boot setup, logins, changes).
    #[command(hide = true)]
    Settings(appliance::settings::SettingsArgs),
    /// Run services described in a JSON file under the supervisor (for tests and debugging).
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Roles, GTID positions, replication threads and lag of every node.
    Status {
        /// The node's state directory (`appliance run`); the image's paths when absent.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make NODE the primary; the old primary becomes its read-only replica.
    Switchover {
        #[arg(long, value_name = "NODE")]
        to: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    // The kernel starts /sbin/init (a link to this binary) with arguments of its own.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == "init")
    {
        appliance::logging::init_daemon(appliance::logging::CONSOLE_FILTER);
        return appliance::init::main();
    }
    let cli = parse_cli();
    // The supervisor's processes must never block on a console nobody reads.
    let daemon = matches!(cli.command, Command::Run { .. } | Command::Supervise { .. });
    if daemon {
        appliance::logging::init_daemon(appliance::logging::DEFAULT_FILTER);
    } else {
        appliance::logging::init();
    }
    let result = run_command(cli.command);
    appliance::logging::flush_console();
    result
}

/// The command line, with `--version` naming the image's version when this binary runs on one
/// (the image-builder stamps it; a developer build says only the crate's).
fn parse_cli() -> Cli {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let version = match appliance::updater::image_version() {
        Some(image) => format!("{} (image {image})", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_string(),
    };
    // Once per process: clap keeps a `&'static str`.
    let version: &'static str = Box::leak(version.into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    }
}

fn run_command(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::CheckConfig { file } => appliance::args::check_config(file.as_deref()),
        Command::DefaultConfig => {
            print!("{}", cluster_config::DEFAULT_CLUSTER_TOML);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            node,
            state_dir,
            secret_file,
        } => appliance::run_cmd::main(config.as_deref(), &node, &state_dir, secret_file.as_deref()),
        Command::Db {
            command: DbCommand::Status { state_dir, json },
        } => Ok(db::cli::status(&db_run_dir(state_dir.as_deref()), json)?),
        Command::Db {
            command: DbCommand::Switchover { to, state_dir },
        } => Ok(db::cli::switchover(&db_run_dir(state_dir.as_deref()), &to)?),
        Command::DbAgent { config } => {
            db::agent_run::run(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DbInit {
            datadir,
            owner,
            template,
        } => {
            appliance::db_init_cmd::main(&datadir, owner.as_deref(), &template)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::App => {
            app::run(app::Config::from_env()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Init => appliance::init::main(),
        Command::Logmon(args) => appliance::logmon_cmd::main(args),
        Command::Admin(args) => appliance::admin_cmd::main(args),
        Command::Balancer(args) => appliance::balancer_cmd::main(args),
        Command::SetupConsole(args) => appliance::setup_console::main(args),
        Command::Firewall { action } => appliance::firewall_cmd::main(action),
        Command::Status { target, json } => {
            let code = appliance::control::status(&target, json)?;
            if !json {
                if let Some(line) = appliance::admin_cmd::status_line(target.state_dir.as_deref()) {
                    println!("{line}");
                }
            }
            Ok(code)
        }
        Command::Signal {
            target,
            service,
            signal,
        } => appliance::control::signal(&target, &service, &signal),
        Command::Update { command } => appliance::update_cmd::main(command),
        Command::Updater(args) => appliance::updater::main(args),
        Command::Settings(args) => appliance::settings::main(args),
        Command::Cluster { command } => appliance::update_cmd::cluster_main(command),
        Command::Supervise { spec, state_dir } => {
            appliance::logmon_cmd::supervise(&spec, &state_dir)
        }
    }
}

/// The run directory of the node `appliance db` is about: below `--state-dir` for
/// `appliance run`, else the image's.
fn db_run_dir(state_dir: Option<&std::path::Path>) -> PathBuf {
    match state_dir {
        Some(dir) => appliance::layout::Layout::dev(dir).run,
        None => appliance::layout::Layout::image().run,
    }
}
