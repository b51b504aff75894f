//! A node's stack, built from the cluster config: which services run, with which rendered
//! configuration, in which directories. Shared by `appliance run` (a developer machine) and
//! `appliance init` (PID 1 on the image); only the [`Layout`] differs.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use cluster_config::{Cluster, Node};

use crate::supervisor::{self, Readiness, ServiceSpec, SupervisorOptions};

/// OS users the services run as when the supervisor is root (Debian's own).
pub const NGINX_USER: &str = "www-data";
pub const MARIADB_USER: &str = "mysql";
/// The balancer has a user of its own: it alone reads the TLS key it serves.
pub const BALANCER_USER: &str = crate::users::BALANCER;
/// The web server needs longer than the default to stop when it drains keep-alive clients.
const DB_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(8);
/// MariaDB's first start (InnoDB files created) is slow under emulation.
const DB_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Ports below this need CAP_NET_BIND_SERVICE.
const LOW_PORTS_END: u16 = 1024;
/// The admin server's copy of the seed's TLS files, in the run directory.
const ADMIN_TLS_DIR: &str = "admin-tls";
/// The node's own page (name, address, DB role, boot count) under the web root.
pub const NODE_PAGE: &str = "node.html";
/// File name of the cluster secret in a state directory.
pub const SECRET_FILE: &str = "cluster.secret";
/// File name of a developer machine's cluster CA key in a state directory (see `tls`).
pub const DEV_CA_FILE: &str = "cluster-ca.secret";

/// Where a node keeps things.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Persistent: MariaDB datadir, state DB, boot counter. The data partition on an image.
    pub state: PathBuf,
    /// Runtime, recreated at every start: rendered configs, sockets, pid files.
    pub run: PathBuf,
    /// The supervisor's control socket.
    pub socket: PathBuf,
    /// The cluster secret every node shares (database passwords derive from it; see
    /// `db::agent`). Created when absent, which suits one node; a cluster provisions it.
    pub secret: PathBuf,
    /// The node's TLS files (`ca.crt`, `node.crt`, `node.key`): the seed's on an image.
    pub tls: PathBuf,
    /// A developer machine's own cluster CA key: the node's TLS files are issued from it at
    /// every start. `None` on an image, whose seed holds them.
    pub dev_ca: Option<PathBuf>,
}

impl Layout {
    /// `appliance run --state-dir DIR`: everything below DIR.
    pub fn dev(state_dir: &Path) -> Layout {
        Layout {
            state: state_dir.to_path_buf(),
            run: state_dir.join("run"),
            socket: state_dir.join("control.sock"),
            secret: state_dir.join(SECRET_FILE),
            tls: state_dir.join("tls"),
            dev_ca: Some(state_dir.join(DEV_CA_FILE)),
        }
    }

    /// On the image: persistent state on the data partition, runtime files on /run.
    pub fn image() -> Layout {
        Layout {
            state: PathBuf::from("/data/tandem"),
            run: PathBuf::from("/run/tandem"),
            socket: PathBuf::from(api::control::DEFAULT_SOCKET),
            // The image-builder puts the cluster's shared secret in every node's seed.
            secret: Path::new(crate::init::SEED_MOUNT).join(SECRET_FILE),
            tls: Path::new(crate::init::SEED_MOUNT).join(api::tls::SEED_SUBDIR),
            dev_ca: None,
        }
    }

    /// keepalived's notify FIFO and track files, the balancer's view of the floating IP.
    pub fn vip_dir(&self) -> PathBuf {
        self.run.join(api::vip::RUN_SUBDIR)
    }

    fn db_paths(&self) -> db::Paths {
        db::Paths {
            datadir: self.state.join("mysql"),
            run_dir: self.run.join("mysqld"),
            config_file: self.run.join("etc/my.cnf"),
        }
    }
}

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
    pub fn load(&self) -> anyhow::Result<(Cluster, Node)> {
        let seed = Path::new(crate::init::SEED_MOUNT);
        let config = self
            .config
            .clone()
            .or_else(|| Some(seed.join("cluster.toml")).filter(|p| p.exists()));
        let cluster = load(config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let name = match &self.node {
            Some(name) => name.clone(),
            None => std::fs::read_to_string(seed.join("node"))
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
    match load(file) {
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

fn load(file: Option<&Path>) -> Result<Cluster, cluster_config::ConfigErrors> {
    match file {
        Some(path) => Cluster::load(path),
        None => Ok(Cluster::default_cluster()),
    }
}

/// `appliance run`: this node's stack on a developer machine, until SIGTERM/SIGINT.
///
/// The cluster secret is `secret_file`, else `<cluster.toml's directory>/<cluster name>.secret`
/// (so the nodes of one config on one machine share it), else `<state_dir>/cluster.secret`.
pub fn run(
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
    crate::preflight::require_programs(&[db::MARIADBD, db::INSTALL_DB, db::CLIENT, web::NGINX])?;
    if !node.address.is_loopback() {
        crate::preflight::require_programs(&[vip::KEEPALIVED])?;
    }
    let mut layout = Layout::dev(state_dir);
    match (secret_file, config.and_then(Path::parent)) {
        (Some(file), _) => layout.secret = file.to_path_buf(),
        (None, Some(dir)) => {
            layout.secret = std::path::absolute(dir.join(format!("{}.secret", cluster.name)))?
        }
        (None, None) => {}
    }
    // Like the secret, whatever --secret-file says: the nodes of one config share a CA.
    if let Some(dir) = config.and_then(Path::parent) {
        let ca = dir.join(format!("{}-ca.secret", cluster.name));
        layout.dev_ca = Some(std::path::absolute(ca)?);
    }
    let specs = services(&cluster, node, &layout, config)?;
    crate::preflight::require_reachable_state_dir(&layout.state, &specs)?;
    let reason = supervise(specs, &layout, Vec::new())?;
    tracing::info!(?reason, "supervisor stopped");
    Ok(ExitCode::SUCCESS)
}

/// Every service of the node: its own stack ([`prepare`]) plus the appliance's helpers (log
/// monitor, admin server), which are `appliance` subcommands run as children. `config` is the
/// cluster.toml they read; `None` on an image, where they read the seed.
pub fn services(
    cluster: &Cluster,
    node: &Node,
    layout: &Layout,
    config: Option<&Path>,
) -> anyhow::Result<Vec<ServiceSpec>> {
    let mut specs = prepare(cluster, node, layout)?;
    let identity = config.map(|c| (c, node.name.as_str()));
    let root = nix::unistd::geteuid().is_root();

    // The log monitor: its own user, which reads the log store, the state DB (read-only) and
    // the certificate the balancer serves, and writes only its own directory (alerts.db).
    let logmon_state = layout.state.join(logmon::alerts::ALERTS_SUBDIR);
    make_dir(&logmon_state, 0o755)?;
    if root {
        move_old_alerts_db(&layout.state, &logmon_state)?;
        crate::users::chown_tree(&logmon_state, crate::users::LOGMON)?;
    }
    let mut logmon =
        crate::logmon_cmd::service_spec(config, identity.map(|(_, n)| n), &layout.state)?;
    logmon.user = root.then(|| crate::users::LOGMON.to_string());
    specs.push(logmon);

    // The balancer: unprivileged, allowed only to bind 80/443; its certificate lives in a
    // directory of its own on the data partition. It follows the floating IP in the VIP run
    // directory (see `prepare`), and the supervisor tells keepalived whether it runs.
    let balancer_state = layout.state.join("balancer");
    // Others may pass through (the log monitor reads the certificate served, 0644) but not
    // list; the key is 0600, the balancer's.
    make_dir(&balancer_state, 0o711)?;
    if root {
        // All of it: a key an earlier version wrote as another user becomes the balancer's.
        crate::users::chown_tree(&balancer_state, BALANCER_USER)?;
    }
    let mut balancer = appliance_argv("balancer", identity)?;
    let vip_dir = layout.vip_dir();
    balancer.extend([
        "--state-dir".into(),
        absolute(&balancer_state)?,
        "--vip-dir".into(),
        absolute(&vip_dir)?,
    ]);
    let mut balancer = ServiceSpec::daemon("balancer", balancer);
    balancer.track_file = Some(vip_dir.join(api::vip::TRACK_BALANCER));
    balancer.user = root.then(|| BALANCER_USER.to_string());
    balancer.capabilities = vec![supervisor::Capability::NET_BIND_SERVICE];
    balancer.stop_timeout = crate::balancer_cmd::STOP_TIMEOUT;
    balancer.deps = vec!["nginx".into()];
    balancer.readiness = Readiness::Tcp {
        addr: (node.address, cluster.ports.https).into(),
    };
    specs.push(balancer);
    if let Some(keepalived) = keepalived(cluster, node, layout)? {
        specs.push(keepalived);
    }

    let mut admin = appliance_argv("admin", identity)?;
    admin.extend([
        "--state-dir".into(),
        absolute(&layout.state)?,
        "--socket".into(),
        absolute(&layout.socket)?,
        // Said, not guessed from the state directory: a degraded node keeps its state on tmpfs.
        "--run-dir".into(),
        absolute(&layout.run)?,
    ]);
    for scrape in [
        logmon::metrics::default_addr(node.address),
        crate::balancer_cmd::metrics_addr(node.address),
    ] {
        admin.extend(["--scrape".into(), scrape.to_string()]);
    }
    // The admin server runs as its own user: it reaches the supervisor through the control
    // socket's group, and the node's TLS files (root's alone) through a copy made its own.
    let admin_state = layout.state.join(admin::STATE_SUBDIR);
    make_dir(&admin_state, 0o700)?;
    if root {
        crate::users::chown_tree(&admin_state, crate::users::ADMIN)?;
    }
    if layout.tls.join(api::tls::NODE_CERT).exists() {
        let tls = layout.run.join(ADMIN_TLS_DIR);
        admin::provide_tls(&layout.tls, &tls, root.then_some(crate::users::ADMIN))?;
        admin.extend(["--tls-dir".into(), absolute(&tls)?]);
    }
    let mut admin = ServiceSpec::daemon("admin", admin);
    admin.user = root.then(|| crate::users::ADMIN.to_string());
    if cluster.ports.admin < LOW_PORTS_END {
        admin.capabilities = vec![supervisor::Capability::NET_BIND_SERVICE];
    }
    admin.readiness = Readiness::Tcp {
        addr: (node.address, cluster.ports.admin).into(),
    };
    specs.push(admin);
    Ok(specs)
}

/// keepalived for the floating IP, on nodes with real addresses (on loopback the nodes share a
/// machine, and the balancer of the highest-priority node holds the address for good).
fn keepalived(
    cluster: &Cluster,
    node: &Node,
    layout: &Layout,
) -> anyhow::Result<Option<ServiceSpec>> {
    if node.address.is_loopback() {
        return Ok(None);
    }
    let interface = crate::netif::interface_with(node.address)?;
    let params = vip::Params {
        cluster,
        node,
        interface,
        paths: vip::Paths {
            dir: layout.vip_dir(),
            config_file: layout.run.join("etc/keepalived.conf"),
        },
    };
    write_file(&params.paths.config_file, &vip::render_conf(&params), 0o600)?;
    let mut spec = ServiceSpec::daemon("keepalived", vip::argv(&params));
    // keepalived will not start over a pid file whose pid exists (a killed run leaves them).
    spec.stale_files = params.paths.pid_files().to_vec();
    // Started once the balancer could serve, stopped before it: on a node's shutdown the
    // address moves first (keepalived leaves with a priority-0 advert), then requests drain.
    spec.deps = vec!["balancer".into()];
    // Root for its raw VRRP socket and the address it moves, and for nothing else.
    spec.capabilities = vec![
        supervisor::Capability::NET_ADMIN,
        supervisor::Capability::NET_RAW,
    ];
    Ok(Some(spec))
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

/// `[appliance, sub, --config C --node N]`: a child that finds its node like its parent did.
fn appliance_argv(sub: &str, identity: Option<(&Path, &str)>) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("locating the appliance binary")?;
    let mut argv = vec![exe.display().to_string(), sub.to_string()];
    if let Some((config, node)) = identity {
        argv.extend([
            "--config".into(),
            absolute(config)?,
            "--node".into(),
            node.to_string(),
        ]);
    }
    Ok(argv)
}

fn absolute(path: &Path) -> anyhow::Result<String> {
    Ok(std::path::absolute(path)
        .with_context(|| format!("resolving {}", path.display()))?
        .display()
        .to_string())
}

/// Creates the node's directories, counts the boot, renders every config file and returns the
/// services to supervise. Runs before any service starts.
pub fn prepare(
    cluster: &Cluster,
    node: &Node,
    layout: &Layout,
) -> anyhow::Result<Vec<ServiceSpec>> {
    let root = nix::unistd::geteuid().is_root();
    let as_user = |user: &str| root.then(|| user.to_string());
    if root {
        crate::users::require()?;
    }

    make_dir(&layout.state, 0o755)?;
    // Runtime state from a previous run is stale by definition.
    if layout.run.exists() {
        fs::remove_dir_all(&layout.run)
            .with_context(|| format!("clearing {}", layout.run.display()))?;
    }
    make_dir(&layout.run, 0o755)?;
    make_dir(&layout.run.join("etc"), 0o755)?;

    // A full or failing data partition must not stop the node (PID 1 would reboot into the
    // same fault): the count is skipped, the state DB's own fallback says what is wrong.
    let boot = count_boot(&layout.state).unwrap_or_else(|e| {
        tracing::error!("counting the boot: {e:#}; skipped");
        0
    });
    prepare_vip_dir(layout, root)?;
    tracing::info!(node = %node.name, boot, state = %layout.state.display(), "preparing node");

    // MariaDB.
    let db_paths = layout.db_paths();
    let mut db_params = db::Params::for_node(cluster, node, None, db_paths.clone());
    // After a switchover the persisted primary overrides cluster.toml (see `db::agent_run`).
    let persisted = fs::read_to_string(layout.state.join(db::agent::PRIMARY_FILE)).ok();
    let names: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
    let primary_name =
        db::agent::effective_primary(&cluster.primary().name, persisted.as_deref(), &names)
            .to_string();
    let primary = cluster.node(&primary_name).unwrap_or(cluster.primary());
    db_params.role = if primary.name == node.name {
        cluster_config::DbRole::Primary
    } else {
        cluster_config::DbRole::Replica
    };
    let secret = db::secret_file::load_or_create(&layout.secret)?;
    make_dir(&db_paths.datadir, 0o750)?;
    make_dir(&db_paths.run_dir, 0o755)?;
    if root {
        chown_to(&db_paths.datadir, MARIADB_USER)?;
        chown_to(&db_paths.run_dir, MARIADB_USER)?;
    }
    if let Some(ca) = &layout.dev_ca {
        db::tls::issue_dev(ca, cluster, node, &layout.tls)?;
    }
    db::tls::install(&layout.tls, &db_paths, as_user(MARIADB_USER).as_deref())?;
    write_file(&db_paths.config_file, &db::render_conf(&db_params), 0o644)?;
    let agent_private = layout.run.join("db-agent");
    make_dir(&agent_private, 0o700)?;
    let agent_conf = db::agent::AgentConfig::for_node(
        cluster,
        &node.name,
        db::agent::AgentPaths {
            socket: db_paths.socket(),
            secret_file: layout.secret.clone(),
            primary_file: layout.state.join(db::agent::PRIMARY_FILE),
            status_file: layout.run.join(api::db::STATUS_FILE),
            private_dir: agent_private,
            ssl_ca: db_paths.ssl_ca(),
        },
    );
    let agent_conf_file = layout.run.join("etc").join(db::agent::AGENT_CONFIG_FILE);
    write_file(
        &agent_conf_file,
        &serde_json::to_string_pretty(&agent_conf)?,
        0o644,
    )?;

    // nginx: the application files, or the node's own page.
    let www = layout.run.join("www");
    let web_root = match &cluster.app.files {
        Some(files) => files.clone(),
        None => {
            make_dir(&www, 0o755)?;
            let page = web::render_node_page(&web::NodePage {
                cluster,
                node,
                boot,
            });
            // The node page: which node answered and how often it booted (the application owns `/`).
            write_file(&www.join(NODE_PAGE), &page, 0o644)?;
            for (name, text) in app::STATIC_FILES {
                write_file(&www.join(name), text, 0o644)?;
            }
            www
        }
    };
    let nginx_run = layout.run.join("nginx");
    make_dir(&nginx_run, 0o755)?;
    // The workers' temporary directories, made theirs here: nginx's master then needs no
    // right to chown.
    for temp in web::TEMP_DIRS {
        make_dir(&nginx_run.join(temp), 0o700)?;
        if root {
            chown_to(&nginx_run.join(temp), NGINX_USER)?;
        }
    }
    let mut web_params = web::Params::for_node(
        cluster,
        node,
        as_user(NGINX_USER),
        web::Paths {
            run_dir: nginx_run,
            root: web_root,
        },
    );
    // The application (the user's, or the built-in demo) always sits behind nginx. Nodes that
    // share a machine (loopback addresses) cannot share 127.0.0.1:port, so there it listens
    // on the node's own address.
    let app_addr = if node.address.is_loopback() {
        node.address
    } else {
        std::net::Ipv4Addr::LOCALHOST
    };
    web_params.app_upstream = Some((app_addr, cluster.ports.app));
    let nginx_conf = layout.run.join("etc/nginx.conf");
    write_file(&nginx_conf, &web::render_conf(&web_params), 0o644)?;

    let mut specs = Vec::new();
    let mut db_deps = Vec::new();
    if !db::is_initialised(&db_paths.datadir) {
        let mut init = ServiceSpec::oneshot("mariadb-init", db::install_argv(&db_params));
        init.user = as_user(MARIADB_USER);
        db_deps.push(init.name.clone());
        specs.push(init);
    }
    let mut mariadb = ServiceSpec::daemon("mariadb", db::server_argv(&db_params));
    mariadb.user = as_user(MARIADB_USER);
    mariadb.deps = db_deps;
    mariadb.readiness = Readiness::Tcp {
        addr: db_params.tcp_addr(),
    };
    mariadb.ready_timeout = DB_READY_TIMEOUT;
    mariadb.stop_timeout = DB_STOP_TIMEOUT;
    specs.push(mariadb);

    let exe = std::env::current_exe()
        .context("locating the appliance binary")?
        .display()
        .to_string();
    let mut agent = ServiceSpec::daemon(
        "db-agent",
        [
            exe.clone(),
            "db-agent".into(),
            "--config".into(),
            agent_conf_file.display().to_string(),
        ],
    );
    agent.deps = vec!["mariadb".into()];
    specs.push(agent);

    let argv = cluster
        .app
        .command
        .clone()
        .unwrap_or_else(|| vec![exe, "app".into()]);
    let mut app = ServiceSpec::daemon("app", argv);
    // The application needs no privilege: its database password is in its environment.
    app.user = as_user(crate::users::APP);
    app.deps = vec!["mariadb".into()];
    app.readiness = Readiness::Tcp {
        addr: (app_addr, cluster.ports.app).into(),
    };
    let app_run = layout.run.join("app");
    make_dir(&app_run, 0o700)?;
    if root {
        chown_to(&app_run, crate::users::APP)?;
    }
    let app_env = [
        ("TANDEM_NODE", node.name.clone()),
        ("TANDEM_APP_ADDR", app_addr.to_string()),
        ("TANDEM_APP_PORT", cluster.ports.app.to_string()),
        ("TANDEM_APP_RUN_DIR", app_run.display().to_string()),
        // Balancers run on every node and may hold the floating IP: their forwarded-for
        // entries are believed when the application finds a client's address.
        (
            "TANDEM_APP_TRUSTED_PROXIES",
            cluster
                .nodes
                .iter()
                .map(|n| n.address)
                .chain([cluster.floating_ip])
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("TANDEM_DB_SOCKET", db_paths.socket().display().to_string()),
        ("TANDEM_DB_HOST", node.address.to_string()),
        ("TANDEM_DB_PORT", cluster.ports.db.to_string()),
        ("TANDEM_DB_PRIMARY_HOST", primary.address.to_string()),
        ("TANDEM_DB_PRIMARY_PORT", cluster.ports.db.to_string()),
        (
            "TANDEM_DB_STATUS_FILE",
            agent_conf.status_file.display().to_string(),
        ),
        ("TANDEM_DB_SSL_CA", db_paths.ssl_ca().display().to_string()),
        ("TANDEM_DB_NAME", db::repl::APP_DATABASE.to_string()),
        ("TANDEM_DB_USER", db::repl::APP_USER.to_string()),
        (
            "TANDEM_DB_PASSWORD",
            api::secret::derive_password(&secret, "app"),
        ),
    ];
    app.env
        .extend(app_env.into_iter().map(|(k, v)| (k.to_string(), v)));
    specs.push(app);

    // nginx runs as root only to bind and drop to www-data for its workers.
    let mut nginx = ServiceSpec::daemon("nginx", web::argv(&nginx_conf));
    nginx.readiness = Readiness::Tcp {
        addr: (node.address, cluster.ports.web).into(),
    };
    nginx.deps = vec!["app".into()];
    // The master stays root only to switch its workers to their user (and to bind a low port).
    nginx.capabilities = vec![
        supervisor::Capability::SETUID,
        supervisor::Capability::SETGID,
    ];
    if cluster.ports.web < LOW_PORTS_END {
        nginx
            .capabilities
            .push(supervisor::Capability::NET_BIND_SERVICE);
    }
    specs.push(nginx);
    Ok(specs)
}

/// The VIP run directory: root's, writable by the balancer's group too (the balancer writes its
/// status and track file there, keepalived — root without DAC_OVERRIDE — its pid files). In it
/// keepalived's notify FIFO (root writes, the balancer's group reads) and both track files
/// saying "cannot serve" until the balancer and the supervisor say otherwise: a booting node
/// never takes the address early.
fn prepare_vip_dir(layout: &Layout, root: bool) -> anyhow::Result<()> {
    let dir = layout.vip_dir();
    make_dir(&dir, 0o775)?;
    let fifo = dir.join(api::vip::NOTIFY_FIFO);
    // Root's (keepalived, without CAP_DAC_OVERRIDE, uses only a FIFO it owns) and the
    // balancer's group's: the balancer opens it read-write, so that it never sees end-of-file
    // when keepalived restarts.
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o660))
        .with_context(|| format!("creating the FIFO {}", fifo.display()))?;
    fs::set_permissions(&fifo, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", fifo.display()))?;
    for name in [api::vip::TRACK_BALANCER, api::vip::TRACK_BACKENDS] {
        write_file(&dir.join(name), api::vip::track_value(false), 0o644)?;
    }
    if root {
        let balancer = nix::unistd::User::from_name(BALANCER_USER)?
            .with_context(|| format!("user {BALANCER_USER} does not exist"))?;
        for path in [&dir, &fifo] {
            nix::unistd::chown(path.as_path(), None, Some(balancer.gid))
                .with_context(|| format!("chgrp {BALANCER_USER} {}", path.display()))?;
        }
        chown_to(&dir.join(api::vip::TRACK_BACKENDS), BALANCER_USER)?;
    }
    Ok(())
}

/// `alerts.db` (and its WAL) lived in the state directory itself before the log monitor had a
/// user of its own: moved into its directory once, so no alert history is lost.
fn move_old_alerts_db(state: &Path, logmon_state: &Path) -> anyhow::Result<()> {
    let file = logmon::alerts::ALERTS_DB_FILE;
    if !state.join(file).exists() || logmon_state.join(file).exists() {
        return Ok(());
    }
    for suffix in ["", "-wal", "-shm"] {
        let from = state.join(format!("{file}{suffix}"));
        if from.exists() {
            fs::rename(&from, logmon_state.join(format!("{file}{suffix}"))).with_context(|| {
                format!("moving {} into {}", from.display(), logmon_state.display())
            })?;
        }
    }
    Ok(())
}

/// Increments and returns the boot counter kept in the state directory. Written to a temporary
/// file, synced and renamed, so a power cut leaves the old or the new count, never a torn one.
pub fn count_boot(state: &Path) -> anyhow::Result<u64> {
    let path = state.join("boot-count");
    let previous = match fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{}: not a number", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let boot = previous + 1;
    write_file(&path, &format!("{boot}\n"), 0o644)?;
    Ok(boot)
}

/// Atomic replace: temp file in the same directory, fsync, rename, fsync the directory.
///
/// The temporary file is created anew with its final mode (`create_new`: one a crash left
/// behind, or a link planted there, is removed, never written through): a secret is never
/// readable by others, not even before the rename, and is never chmodded. The umask may narrow
/// a public mode; such a file gets its bits back before its first byte.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().context("file path without a directory")?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    if mode & 0o077 != 0 {
        f.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

fn make_dir(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn chown_to(path: &Path, user: &str) -> anyhow::Result<()> {
    let u = nix::unistd::User::from_name(user)
        .with_context(|| format!("looking up user {user}"))?
        .with_context(|| {
            format!("user {user} does not exist (is its Debian package installed?)")
        })?;
    nix::unistd::chown(path, Some(u.uid), Some(u.gid))
        .with_context(|| format!("chown {user} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_counter_counts_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(count_boot(dir.path()).unwrap(), 1);
        assert_eq!(count_boot(dir.path()).unwrap(), 2);
        fs::write(dir.path().join("boot-count"), "garbage").unwrap();
        let err = count_boot(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("not a number"));
    }

    #[test]
    fn secrets_are_written_into_new_files_of_their_final_mode() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("admin.key");
        let tmp = dir.path().join(".admin.key.tmp");
        // A temporary left by a crash, held open by someone who could read it then.
        fs::write(&tmp, "").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        let mut held = fs::File::open(&tmp).unwrap();
        write_file(&key, "secret", 0o600).unwrap();
        let mut seen = String::new();
        std::io::Read::read_to_string(&mut held, &mut seen).unwrap();
        assert_eq!(seen, "", "the secret went into a file others could read");
        assert_eq!(fs::metadata(&key).unwrap().mode() & 0o7777, 0o600);
        // A link planted as the temporary: replaced, not written through.
        let outside = dir.path().join("outside");
        fs::write(&outside, "").unwrap();
        std::os::unix::fs::symlink(&outside, &tmp).unwrap();
        write_file(&key, "secret 2", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "");
        assert_eq!(fs::read_to_string(&key).unwrap(), "secret 2");
        assert!(fs::symlink_metadata(&key).unwrap().is_file());
    }

    #[test]
    fn default_node_plan_orders_services() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::default_cluster();
        let specs = prepare(
            &cluster,
            cluster.node("server2").unwrap(),
            &Layout::dev(dir.path()),
        )
        .unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["mariadb-init", "mariadb", "db-agent", "app", "nginx"]
        );
        let page = fs::read_to_string(dir.path().join("run/www").join(NODE_PAGE)).unwrap();
        assert!(
            page.contains("node: server2") && page.contains("boot: 1"),
            "{page}"
        );
        let conf = fs::read_to_string(dir.path().join("run/etc/my.cnf")).unwrap();
        assert!(conf.contains("read_only = OFF"));
    }
}
