//! The node plan: from the cluster, the node, its [`Layout`] and what was read before planning
//! ([`Inputs`]) to the node's directories, files and services. Pure: no filesystem, no clock,
//! no randomness; `apply` makes a plan real.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use api::files::{ADMIN_STATE_DIR, BALANCER_STATE_DIR, CA_CERT, NODE_CERT, NODE_KEY, NODE_PAGE};
use api::secret::SECRET_LEN;
use cluster_config::settings::Settings;
use cluster_config::{Cluster, DbRole, Node};

use crate::layout::{self as layout_files, Layout};
use crate::secrets::NodeTls;
use crate::supervisor::{Capability, Readiness, ServiceSpec};
use crate::users;

/// OS users the services run as when the supervisor is root (Debian's own).
pub const NGINX_USER: &str = "www-data";
/// MariaDB's (Debian's).
pub const MARIADB_USER: &str = "mysql";
/// MariaDB takes longer than the default to stop when it flushes InnoDB.
const DB_STOP_TIMEOUT: Duration = Duration::from_secs(8);
/// `mariadb-install-db` on a fresh datadir: about 17 s under TCG, over 30 s on a loaded host.
const DB_INIT_TIMEOUT: Duration = Duration::from_secs(600);
/// MariaDB's first start (InnoDB files created) is slow under emulation.
const DB_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Ports below this need CAP_NET_BIND_SERVICE.
const LOW_PORTS_END: u16 = 1024;
/// The admin server's copy of the node's TLS files, in the run directory.
const ADMIN_TLS_DIR: &str = "admin-tls";

/// What the plan needs from the world, read before planning.
#[derive(Clone)]
pub struct Inputs {
    /// The supervisor runs as root: services switch to their users, and directories and files
    /// are given to them.
    pub root: bool,
    /// This start's boot count (0: not counted, the data partition failing).
    pub boot: u64,
    /// The cluster secret (database passwords derive from it).
    pub secret: [u8; SECRET_LEN],
    /// The node's TLS files.
    pub tls: NodeTls,
    /// The primary recorded after a switchover (`api::files::DB_PRIMARY`), if any.
    pub persisted_primary: Option<String>,
    /// MariaDB's datadir is initialised (no `mariadb-init` needed).
    pub db_initialised: bool,
    /// The image's datadir template ([`db::datadir::TEMPLATE`]), when there is one: a fresh
    /// datadir is unpacked from it instead of made by `mariadb-install-db`.
    pub db_template: Option<PathBuf>,
    /// The network interface carrying the node's address (keepalived's); `None` on loopback.
    pub interface: Option<String>,
    /// The appliance binary, absolute: the node's helpers are `appliance <sub>` children.
    pub exe: PathBuf,
    /// The cluster.toml the helpers read, absolute; `None` on an image (they read the seed).
    pub config: Option<PathBuf>,
    /// The machine booted from one of an image's A/B root slots: run the update service.
    pub updates: bool,
    /// The node's settings (from the store): the served certificate and the webhook become
    /// files of the plan ([`settings_files`]).
    pub settings: Settings,
    /// The seed directory the settings service reads (an image's); `None` on a developer
    /// machine, whose settings are stored before anything starts.
    pub seed_dir: Option<PathBuf>,
}

/// What the first-boot wizard's plan needs ([`plan_wizard`]), read or made beforehand.
#[derive(Clone)]
pub struct WizardInputs {
    /// The supervisor runs as root.
    pub root: bool,
    /// The appliance binary, absolute.
    pub exe: PathBuf,
    /// The cluster.toml the children read; `None` on an image (the seed's).
    pub config: Option<PathBuf>,
    /// The seed whose settings.toml says what is already known; `None`: everything is asked.
    pub seed_dir: Option<PathBuf>,
    /// Where the web wizard listens (the node's address, or a generic image's setup address).
    pub listen: std::net::SocketAddr,
    /// The wizard's self-signed certificate and key (PEM), made for this boot.
    pub certificate: (String, String),
    /// This boot's one-time setup code.
    pub setup_code: String,
    /// The serial console the text wizard runs on; `None`: no console wizard.
    pub console: Option<PathBuf>,
}

/// A node's directories, files and services, in the order they are made and started.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePlan {
    /// Made in order (parents first), each with its mode and owner.
    pub dirs: Vec<Dir>,
    /// Written after the directories, each atomically with its final mode and owner.
    pub files: Vec<File>,
    /// What the supervisor runs, in this order where dependencies allow.
    pub services: Vec<ServiceSpec>,
}

/// One directory of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    pub path: PathBuf,
    pub mode: u32,
    /// `None`: it stays the supervisor's.
    pub owner: Option<Owner>,
    /// Removed with everything in it first: runtime state of an earlier run is stale.
    pub fresh: bool,
}

/// One file of the plan.
#[derive(Clone, PartialEq, Eq)]
pub struct File {
    pub path: PathBuf,
    pub mode: u32,
    /// `None`: it stays the supervisor's.
    pub owner: Option<Owner>,
    pub contents: Contents,
}

/// What a file of the plan holds.
#[derive(Clone, PartialEq, Eq)]
pub enum Contents {
    Text(String),
    /// A named pipe (keepalived's notify FIFO).
    Fifo,
    /// No file: removed if there is one (a setting switched off).
    Absent,
}

/// Who a directory or file is given to (only when the supervisor is root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The user and its primary group.
    User(&'static str),
    /// The user and its primary group, for the directory and everything already below it: a
    /// service's persistent directory, which an earlier version may have filled as another user.
    Tree(&'static str),
    /// The user's primary group; the owner stays root.
    Group(&'static str),
}

/// What makes a plan impossible (never a panic).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{what} {}: the node plan needs an absolute path (services get it as an argument)", .path.display())]
    RelativePath { what: &'static str, path: PathBuf },
    #[error("no network interface given for the node's address {0}: keepalived needs one")]
    NoInterface(Ipv4Addr),
    #[error("rendering {}: {source}", .path.display())]
    Render {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl fmt::Debug for File {
    /// Shows the contents of world-readable files only: keys and the like stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("File");
        d.field("path", &self.path)
            .field("mode", &format_args!("{:04o}", self.mode))
            .field("owner", &self.owner);
        match &self.contents {
            Contents::Fifo => d.field("contents", &"FIFO"),
            Contents::Absent => d.field("contents", &"absent"),
            Contents::Text(text) if self.mode & 0o004 != 0 => d.field("contents", text),
            Contents::Text(text) => d.field("contents", &format_args!("<{} bytes>", text.len())),
        };
        d.finish()
    }
}

impl NodePlan {
    /// The file at `path`, if the plan writes one.
    pub fn file(&self, path: &Path) -> Option<&File> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// The whole node: its own stack ([`plan_stack`]) plus the appliance's helpers (log monitor,
/// balancer, keepalived on a real network, admin server).
pub fn plan(
    cluster: &Cluster,
    node: &Node,
    layout: &Layout,
    inputs: &Inputs,
) -> Result<NodePlan, PlanError> {
    let mut p = Planner::new(layout, inputs)?;
    p.stack(cluster, node)?;
    p.helpers(cluster, node)?;
    Ok(p.plan)
}

/// The first-boot wizard (a node whose settings are incomplete): only what setup needs. The
/// settings service (root), the admin server in setup mode on `listen` with this boot's
/// self-signed certificate, and the text wizard on the serial console. The setup code is a
/// root-only file the settings service checks.
pub fn plan_wizard(
    cluster: &Cluster,
    layout: &Layout,
    inputs: &WizardInputs,
) -> Result<NodePlan, PlanError> {
    absolute("state directory", &layout.state)?;
    absolute("run directory", &layout.run)?;
    absolute("appliance binary", &inputs.exe)?;
    let mut plan = NodePlan {
        dirs: Vec::new(),
        files: Vec::new(),
        services: Vec::new(),
    };
    let own = |owner| inputs.root.then_some(owner);
    let dir = |path: PathBuf, mode, owner, fresh| Dir {
        path,
        mode,
        owner,
        fresh,
    };
    plan.dirs
        .push(dir(layout.state.clone(), 0o755, None, false));
    plan.dirs.push(dir(layout.run.clone(), 0o755, None, true));
    let text = |path: PathBuf, mode, owner, text: &str| File {
        path,
        mode,
        owner,
        contents: Contents::Text(text.to_string()),
    };
    plan.files.push(text(
        layout.run.join(api::settings::SETUP_CODE_FILE),
        0o600,
        None,
        &format!("{}\n", inputs.setup_code),
    ));
    let exe = inputs.exe.display().to_string();
    let config: Vec<String> = match &inputs.config {
        Some(c) => vec!["--config".into(), c.display().to_string()],
        None => Vec::new(),
    };
    plan.services.push(settings_service(
        cluster,
        layout,
        &inputs.exe,
        &inputs.config,
        &inputs.seed_dir,
        inputs.root,
    ));
    let socket = layout
        .run
        .join(api::settings::SOCKET_FILE)
        .display()
        .to_string();

    let admin_tls = layout.run.join(ADMIN_TLS_DIR);
    let admin_owner = own(Owner::User(users::ADMIN));
    plan.dirs
        .push(dir(admin_tls.clone(), 0o700, admin_owner, false));
    plan.files.push(text(
        admin_tls.join(NODE_CERT),
        0o644,
        admin_owner,
        &inputs.certificate.0,
    ));
    plan.files.push(text(
        admin_tls.join(NODE_KEY),
        0o600,
        admin_owner,
        &inputs.certificate.1,
    ));
    let mut argv = vec![exe.clone(), "admin".into(), "--setup".into()];
    argv.extend(config.iter().cloned());
    argv.extend([
        "--state-dir".into(),
        layout.state.display().to_string(),
        "--run-dir".into(),
        layout.run.display().to_string(),
        "--socket".into(),
        layout.socket.display().to_string(),
        "--listen".into(),
        inputs.listen.to_string(),
        "--tls-dir".into(),
        admin_tls.display().to_string(),
        "--settings-socket".into(),
        socket.clone(),
    ]);
    let mut admin = ServiceSpec::daemon("admin", argv);
    admin.user = inputs.root.then(|| users::ADMIN.to_string());
    if inputs.listen.port() < LOW_PORTS_END {
        admin.capabilities = vec![Capability::NET_BIND_SERVICE];
    }
    admin.deps = vec![SETTINGS_SERVICE.into()];
    admin.readiness = Readiness::Tcp {
        addr: inputs.listen,
    };
    plan.services.push(admin);

    if let Some(tty) = &inputs.console {
        let argv = vec![
            exe,
            "setup-console".into(),
            "--settings-socket".into(),
            socket,
            "--setup-code-file".into(),
            layout
                .run
                .join(api::settings::SETUP_CODE_FILE)
                .display()
                .to_string(),
            "--tty".into(),
            tty.display().to_string(),
        ];
        let mut console = ServiceSpec::daemon("setup-console", argv);
        console.deps = vec![SETTINGS_SERVICE.into()];
        plan.services.push(console);
    }
    Ok(plan)
}

/// The settings service's name under the supervisor.
pub const SETTINGS_SERVICE: &str = "settings";

/// `appliance settings`: root (the store holds the cluster secret); CHOWN to give its socket
/// and the served key to their groups.
fn settings_service(
    _cluster: &Cluster,
    layout: &Layout,
    exe: &Path,
    config: &Option<PathBuf>,
    seed_dir: &Option<PathBuf>,
    root: bool,
) -> ServiceSpec {
    let mut argv = vec![exe.display().to_string(), "settings".into()];
    if let Some(c) = config {
        argv.extend(["--config".into(), c.display().to_string()]);
    }
    argv.extend([
        "--state-dir".into(),
        layout.state.display().to_string(),
        "--run-dir".into(),
        layout.run.display().to_string(),
        "--control-socket".into(),
        layout.socket.display().to_string(),
    ]);
    if let Some(seed) = seed_dir {
        argv.extend(["--seed-dir".into(), seed.display().to_string()]);
    }
    if root {
        argv.extend(["--socket-group".into(), users::CONTROL_GROUP.into()]);
    }
    let mut spec = ServiceSpec::daemon(SETTINGS_SERVICE, argv);
    spec.readiness = Readiness::UnixSocket {
        path: layout.run.join(api::settings::SOCKET_FILE),
    };
    if root {
        spec.capabilities = vec![Capability::CHOWN];
    }
    spec
}

/// The files a node's settings imply, in its run directory (pure): the uploaded certificate
/// the balancer serves (the chain 0644; the key 0640, group of the balancer; both absent while
/// self-signed) and the log monitor's webhook (0640, its group; absent: none). The node plan
/// writes them at every start; the settings service rewrites them on a change.
pub fn settings_files(settings: &Settings, run: &Path, root: bool) -> Vec<File> {
    let (cert, key) = layout_files::served_tls_files(run);
    let own = |user| root.then_some(Owner::Group(user));
    let file = |path, mode, owner, contents| File {
        path,
        mode,
        owner,
        contents,
    };
    let mut files = Vec::new();
    match settings.uploaded_tls() {
        Some((chain, private)) => {
            files.push(file(cert, 0o644, None, Contents::Text(chain.to_string())));
            files.push(file(
                key,
                0o640,
                own(users::BALANCER),
                Contents::Text(private.to_string()),
            ));
        }
        None => {
            files.push(file(key, 0o640, None, Contents::Absent));
            files.push(file(cert, 0o644, None, Contents::Absent));
        }
    }
    files.push(file(
        layout_files::webhook_file(run),
        0o640,
        own(users::LOGMON),
        match &settings.webhook {
            Some(url) => Contents::Text(format!("{url}\n")),
            None => Contents::Absent,
        },
    ));
    files
}

/// The node's own stack: MariaDB (with `mariadb-init` on a fresh datadir), the db-agent, the
/// application and nginx, with the VIP run directory the balancer and keepalived share.
pub fn plan_stack(
    cluster: &Cluster,
    node: &Node,
    layout: &Layout,
    inputs: &Inputs,
) -> Result<NodePlan, PlanError> {
    let mut p = Planner::new(layout, inputs)?;
    p.stack(cluster, node)?;
    Ok(p.plan)
}

struct Planner<'a> {
    layout: &'a Layout,
    inputs: &'a Inputs,
    plan: NodePlan,
}

fn absolute(what: &'static str, path: &Path) -> Result<(), PlanError> {
    match path.is_absolute() {
        true => Ok(()),
        false => Err(PlanError::RelativePath {
            what,
            path: path.to_path_buf(),
        }),
    }
}

impl<'a> Planner<'a> {
    fn new(layout: &'a Layout, inputs: &'a Inputs) -> Result<Self, PlanError> {
        absolute("state directory", &layout.state)?;
        absolute("run directory", &layout.run)?;
        absolute("control socket", &layout.socket)?;
        absolute("cluster secret", &layout.secret)?;
        absolute("appliance binary", &inputs.exe)?;
        if let Some(config) = &inputs.config {
            absolute("cluster config", config)?;
        }
        Ok(Planner {
            layout,
            inputs,
            plan: NodePlan {
                dirs: Vec::new(),
                files: Vec::new(),
                services: Vec::new(),
            },
        })
    }

    /// `owner` when the supervisor is root, else nothing.
    fn own(&self, owner: Owner) -> Option<Owner> {
        self.inputs.root.then_some(owner)
    }

    /// The user a service switches to when the supervisor is root.
    fn user(&self, user: &str) -> Option<String> {
        self.inputs.root.then(|| user.to_string())
    }

    fn dir(&mut self, path: PathBuf, mode: u32, owner: Option<Owner>) {
        self.plan.dirs.push(Dir {
            path,
            mode,
            owner,
            fresh: false,
        });
    }

    fn file(&mut self, path: PathBuf, mode: u32, owner: Option<Owner>, text: impl Into<String>) {
        self.plan.files.push(File {
            path,
            mode,
            owner,
            contents: Contents::Text(text.into()),
        });
    }

    /// `[appliance, sub, --config C --node N]`: a child that finds its node like its parent
    /// (on an image the cluster is the seed's, and the node the settings').
    fn appliance_argv(&self, sub: &str, node: &Node) -> Vec<String> {
        let mut argv = vec![self.inputs.exe.display().to_string(), sub.to_string()];
        if let Some(config) = &self.inputs.config {
            argv.extend(["--config".into(), config.display().to_string()]);
        }
        argv.extend(["--node".into(), node.name.clone()]);
        argv
    }

    fn stack(&mut self, cluster: &Cluster, node: &Node) -> Result<(), PlanError> {
        let layout = self.layout;
        let inputs = self.inputs;
        self.dir(layout.state.clone(), 0o755, None);
        self.plan.dirs.push(Dir {
            path: layout.run.clone(),
            mode: 0o755,
            owner: None,
            fresh: true,
        });
        let etc = layout.run.join("etc");
        self.dir(etc.clone(), 0o755, None);
        self.vip_dir();
        self.file(
            layout.run.join(api::files::RUN_NODE_NAME),
            0o644,
            None,
            format!("{}\n", node.name),
        );
        if inputs.config.is_none() {
            // An image: the secret lives in the settings store; the db-agent reads this copy.
            self.file(
                layout.secret.clone(),
                0o600,
                None,
                api::secret::format_secret(&inputs.secret),
            );
        }
        self.dir(layout_files::served_tls_dir(&layout.run), 0o755, None);
        let settings_files = settings_files(&inputs.settings, &layout.run, inputs.root);
        self.plan.files.extend(settings_files);

        // MariaDB.
        let db_paths = layout.db_paths();
        let mut db_params = db::Params::for_node(cluster, node, None, db_paths.clone());
        // After a switchover the persisted primary overrides cluster.toml (see `db::agent_run`).
        let names: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
        let primary_name = db::agent::effective_primary(
            &cluster.primary().name,
            inputs.persisted_primary.as_deref(),
            &names,
        );
        let primary = cluster.node(primary_name).unwrap_or(cluster.primary());
        db_params.role = if primary.name == node.name {
            DbRole::Primary
        } else {
            DbRole::Replica
        };
        let mysql = self.own(Owner::User(MARIADB_USER));
        self.dir(db_paths.datadir.clone(), 0o750, mysql);
        self.dir(db_paths.run_dir.clone(), 0o755, mysql);
        // MariaDB's TLS files: the CA and certificate world-readable (its clients read the
        // CA), the key a copy of its own (the seed's stays root's), remade at every start.
        let (db_cert, db_key) = inputs.tls.for_db();
        self.file(db_paths.ssl_ca(), 0o644, None, inputs.tls.ca.as_str());
        self.file(db_paths.ssl_cert(), 0o644, None, db_cert);
        self.file(db_paths.ssl_key(), 0o600, mysql, db_key);
        self.file(
            db_paths.config_file.clone(),
            0o644,
            None,
            db::render_conf(&db_params),
        );

        // The db-agent.
        let agent_private = layout.run.join("db-agent");
        self.dir(agent_private.clone(), 0o700, None);
        let agent_conf = db::agent::AgentConfig::for_node(
            cluster,
            &node.name,
            db::agent::AgentPaths {
                socket: db_paths.socket(),
                secret_file: layout.secret.clone(),
                primary_file: layout.state.join(api::files::DB_PRIMARY),
                status_file: layout.run.join(api::db::STATUS_FILE),
                private_dir: agent_private,
                ssl_ca: db_paths.ssl_ca(),
            },
        );
        let agent_conf_file = etc.join(db::agent::AGENT_CONFIG_FILE);
        let json =
            serde_json::to_string_pretty(&agent_conf).map_err(|source| PlanError::Render {
                path: agent_conf_file.clone(),
                source,
            })?;
        self.file(agent_conf_file.clone(), 0o644, None, json);

        // nginx: the application files, or the node's own page.
        let web_root = match &cluster.app.files {
            Some(files) => files.clone(),
            None => {
                let www = layout.run.join("www");
                self.dir(www.clone(), 0o755, None);
                let page = web::render_node_page(&web::NodePage {
                    cluster,
                    node,
                    boot: inputs.boot,
                });
                // Which node answered and how often it booted (the application owns `/`).
                self.file(www.join(NODE_PAGE), 0o644, None, page);
                for (name, text) in app::STATIC_FILES {
                    self.file(www.join(name), 0o644, None, *text);
                }
                www
            }
        };
        let nginx_run = layout.run.join("nginx");
        self.dir(nginx_run.clone(), 0o755, None);
        // The workers' temporary directories, made theirs here: nginx's master then needs no
        // right to chown.
        for temp in web::TEMP_DIRS {
            self.dir(
                nginx_run.join(temp),
                0o700,
                self.own(Owner::User(NGINX_USER)),
            );
        }
        let mut web_params = web::Params::for_node(
            cluster,
            node,
            self.user(NGINX_USER),
            web::Paths {
                run_dir: nginx_run,
                root: web_root,
            },
        );
        // The application (the user's, or the built-in demo) always sits behind nginx. Nodes
        // that share a machine (loopback addresses) cannot share 127.0.0.1:port, so there it
        // listens on the node's own address.
        let app_addr = api::ports::local_ip(node.address);
        web_params.app_upstream = Some((app_addr, cluster.ports.app));
        let nginx_conf = etc.join("nginx.conf");
        self.file(
            nginx_conf.clone(),
            0o644,
            None,
            web::render_conf(&web_params),
        );

        // The services.
        if !inputs.db_initialised {
            let mut init = match inputs.db_template.as_deref() {
                // An image: the template is unpacked beside the datadir and renamed into it
                // once complete, so a kill at any moment leaves none (made again next time)
                // or a whole one. Root, to rename in the state directory.
                Some(template) => {
                    let exe = inputs.exe.display().to_string();
                    let owner = self.user(MARIADB_USER);
                    let mut init = ServiceSpec::oneshot(
                        "mariadb-init",
                        db::init_argv(&exe, &db_params, template, owner.as_deref()),
                    );
                    if inputs.root {
                        // To give the files to MariaDB's user, and to look inside its
                        // (empty, or half-made) datadir: never mistaking a datadir it cannot
                        // read for an empty one.
                        init.capabilities = vec![Capability::CHOWN, Capability::DAC_READ_SEARCH];
                    }
                    init
                }
                // A developer machine: `mariadb-install-db` in place, as MariaDB's user.
                None => {
                    let mut init =
                        ServiceSpec::oneshot("mariadb-init", db::install_argv(&db_params));
                    init.user = self.user(MARIADB_USER);
                    init
                }
            };
            // `mariadb-install-db` takes 17 s under emulation, more on a loaded host.
            init.ready_timeout = DB_INIT_TIMEOUT;
            self.plan.services.push(init);
        }
        let mut mariadb = ServiceSpec::daemon("mariadb", db::server_argv(&db_params));
        mariadb.user = self.user(MARIADB_USER);
        if !inputs.db_initialised {
            mariadb.deps = vec!["mariadb-init".into()];
        }
        mariadb.readiness = Readiness::Tcp {
            addr: db_params.tcp_addr(),
        };
        mariadb.ready_timeout = DB_READY_TIMEOUT;
        mariadb.stop_timeout = DB_STOP_TIMEOUT;
        self.plan.services.push(mariadb);

        let exe = inputs.exe.display().to_string();
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
        self.plan.services.push(agent);

        let argv = cluster
            .app
            .command
            .clone()
            .unwrap_or_else(|| vec![exe, "app".into()]);
        let mut app = ServiceSpec::daemon("app", argv);
        // The application needs no privilege: its database password is in its environment.
        app.user = self.user(users::APP);
        // The built-in one starts without the database (its pools connect when a request
        // needs them, and answer 503 until then), so nginx, which waits for it, serves the
        // static files early. A user's application may need the database to start.
        if cluster.app.command.is_some() {
            app.deps = vec!["mariadb".into()];
        }
        app.readiness = Readiness::Tcp {
            addr: (app_addr, cluster.ports.app).into(),
        };
        let app_run = layout.run.join("app");
        self.dir(app_run.clone(), 0o700, self.own(Owner::User(users::APP)));
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
                api::secret::derive_password(&inputs.secret, "app"),
            ),
        ];
        app.env
            .extend(app_env.into_iter().map(|(k, v)| (k.to_string(), v)));
        self.plan.services.push(app);

        let mut nginx = ServiceSpec::daemon("nginx", web::argv(&nginx_conf));
        nginx.readiness = Readiness::Tcp {
            addr: (node.address, cluster.ports.web).into(),
        };
        // nginx waits for the application, not for the database: the balancers' health
        // check is nginx's, so a node whose nginx answers must also have its application
        // listening, or the peers would send it requests that fail with 502.
        nginx.deps = vec!["app".into()];
        // The master stays root only to switch its workers to their user (and to bind a low
        // port).
        nginx.capabilities = vec![Capability::SETUID, Capability::SETGID];
        if cluster.ports.web < LOW_PORTS_END {
            nginx.capabilities.push(Capability::NET_BIND_SERVICE);
        }
        self.plan.services.push(nginx);
        Ok(())
    }

    /// The VIP run directory: root's, writable by the balancer's group too (the balancer writes
    /// its status and track file there, keepalived — root without DAC_OVERRIDE — its pid
    /// files). In it keepalived's notify FIFO (root writes, the balancer's group reads: the
    /// balancer opens it read-write, so that it never sees end-of-file when keepalived
    /// restarts) and both track files saying "cannot serve" until the balancer and the
    /// supervisor say otherwise: a booting node never takes the address early.
    fn vip_dir(&mut self) {
        let dir = self.layout.vip_dir();
        let group = self.own(Owner::Group(users::BALANCER));
        self.dir(dir.clone(), 0o775, group);
        self.plan.files.push(File {
            path: dir.join(api::vip::NOTIFY_FIFO),
            mode: 0o660,
            owner: group,
            contents: Contents::Fifo,
        });
        let cannot_serve = api::vip::track_value(false);
        self.file(
            dir.join(api::vip::TRACK_BALANCER),
            0o644,
            None,
            cannot_serve,
        );
        self.file(
            dir.join(api::vip::TRACK_BACKENDS),
            0o644,
            self.own(Owner::User(users::BALANCER)),
            cannot_serve,
        );
    }

    fn helpers(&mut self, cluster: &Cluster, node: &Node) -> Result<(), PlanError> {
        let layout = self.layout;
        let state = layout.state.display().to_string();

        // The log monitor: its own user, which reads the log store, the state DB (read-only)
        // and the certificate the balancer serves, and writes only its own directory.
        let logmon_state = layout.state.join(logmon::alerts::ALERTS_SUBDIR);
        self.dir(logmon_state, 0o755, self.own(Owner::Tree(users::LOGMON)));
        let mut argv = self.appliance_argv("logmon", node);
        argv.extend([
            "--state-dir".into(),
            state.clone(),
            "--served-tls".into(),
            layout_files::served_tls_dir(&layout.run)
                .display()
                .to_string(),
            "--webhook-file".into(),
            layout_files::webhook_file(&layout.run)
                .display()
                .to_string(),
        ]);
        let mut logmon = ServiceSpec::daemon(logmon::monitor::SERVICE_NAME, argv);
        logmon.user = self.user(users::LOGMON);
        self.plan.services.push(logmon);

        // The balancer: unprivileged, allowed only to bind 80/443; its certificate lives in a
        // directory of its own on the data partition. It follows the floating IP in the VIP
        // run directory, and the supervisor tells keepalived whether it runs.
        let balancer_state = layout.state.join(BALANCER_STATE_DIR);
        // Others may pass through (the log monitor reads the certificate served, 0644) but not
        // list; the key is 0600, the balancer's. All of it is the balancer's: a key an earlier
        // version wrote as another user becomes its own.
        self.dir(
            balancer_state.clone(),
            0o711,
            self.own(Owner::Tree(users::BALANCER)),
        );
        let vip_dir = layout.vip_dir();
        let mut argv = self.appliance_argv("balancer", node);
        argv.extend([
            "--state-dir".into(),
            balancer_state.display().to_string(),
            "--vip-dir".into(),
            vip_dir.display().to_string(),
            "--served-tls".into(),
            layout_files::served_tls_dir(&layout.run)
                .display()
                .to_string(),
        ]);
        let mut balancer = ServiceSpec::daemon("balancer", argv);
        balancer.track_file = Some(vip_dir.join(api::vip::TRACK_BALANCER));
        balancer.user = self.user(users::BALANCER);
        balancer.capabilities = vec![Capability::NET_BIND_SERVICE];
        balancer.stop_timeout = crate::balancer_cmd::STOP_TIMEOUT;
        balancer.deps = vec!["nginx".into()];
        balancer.readiness = Readiness::Tcp {
            addr: (node.address, cluster.ports.https).into(),
        };
        self.plan.services.push(balancer);
        self.keepalived(cluster, node)?;

        // The settings service: the store's only writer, the admin server's login check.
        self.plan.services.push(settings_service(
            cluster,
            layout,
            &self.inputs.exe,
            &self.inputs.config,
            &self.inputs.seed_dir,
            self.inputs.root,
        ));

        // The admin server runs as its own user: it reaches the supervisor through the control
        // socket's group, and the node's TLS files (root's alone) through a copy made its own.
        let mut argv = self.appliance_argv("admin", node);
        argv.extend([
            "--state-dir".into(),
            state,
            "--socket".into(),
            layout.socket.display().to_string(),
            // Said, not guessed from the state directory: a degraded node keeps its state on
            // tmpfs.
            "--run-dir".into(),
            layout.run.display().to_string(),
        ]);
        for port in [api::ports::LOGMON_METRICS, api::ports::BALANCER_METRICS] {
            argv.extend([
                "--scrape".into(),
                api::ports::local_addr(node.address, port).to_string(),
            ]);
        }
        let admin_state = layout.state.join(ADMIN_STATE_DIR);
        self.dir(admin_state, 0o700, self.own(Owner::Tree(users::ADMIN)));
        let admin_tls = layout.run.join(ADMIN_TLS_DIR);
        let admin = self.own(Owner::User(users::ADMIN));
        self.dir(admin_tls.clone(), 0o700, admin);
        let tls = &self.inputs.tls;
        for (name, mode, text) in [
            (CA_CERT, 0o644, &tls.ca),
            (NODE_CERT, 0o644, &tls.cert),
            (NODE_KEY, 0o600, &tls.key),
        ] {
            self.file(admin_tls.join(name), mode, admin, text.as_str());
        }
        argv.extend([
            "--tls-dir".into(),
            admin_tls.display().to_string(),
            "--settings-socket".into(),
            layout
                .run
                .join(api::settings::SOCKET_FILE)
                .display()
                .to_string(),
        ]);
        let mut admin = ServiceSpec::daemon("admin", argv);
        admin.deps = vec![SETTINGS_SERVICE.into()];
        admin.user = self.user(users::ADMIN);
        if cluster.ports.admin < LOW_PORTS_END {
            admin.capabilities = vec![Capability::NET_BIND_SERVICE];
        }
        admin.readiness = Readiness::Tcp {
            addr: (node.address, cluster.ports.admin).into(),
        };
        self.plan.services.push(admin);
        self.updater();
        Ok(())
    }

    /// The update service, on a machine booted from an image's A/B slots: installs bundles
    /// into the inactive slot, blesses a new slot once the node is healthy, rolls back.
    fn updater(&mut self) {
        if !self.inputs.updates {
            return;
        }
        let layout = self.layout;
        let mut argv = vec![
            self.inputs.exe.display().to_string(),
            "updater".into(),
            "--run-dir".into(),
            layout.run.display().to_string(),
            "--state-dir".into(),
            layout.state.display().to_string(),
            "--control-socket".into(),
            layout.socket.display().to_string(),
        ];
        if self.inputs.root {
            // The admin server (uploads, peers' bundles) is in the control group.
            argv.extend(["--socket-group".into(), users::CONTROL_GROUP.into()]);
        }
        let mut spec = ServiceSpec::daemon("updater", argv);
        spec.readiness = Readiness::UnixSocket {
            path: layout.run.join(api::update::SOCKET_FILE),
        };
        // Root, for the inactive slot's block device and the state DB; beyond that: mounting
        // the ESP (SYS_ADMIN), clearing efivarfs' immutable flag (LINUX_IMMUTABLE) and giving
        // its socket to the control group (CHOWN).
        spec.capabilities = vec![
            Capability::CHOWN,
            Capability::LINUX_IMMUTABLE,
            Capability::SYS_ADMIN,
        ];
        self.plan.services.push(spec);
    }

    /// keepalived for the floating IP, on nodes with real addresses (on loopback the nodes
    /// share a machine, and the balancer of the highest-priority node holds the address).
    fn keepalived(&mut self, cluster: &Cluster, node: &Node) -> Result<(), PlanError> {
        if node.address.is_loopback() {
            return Ok(());
        }
        let interface = self
            .inputs
            .interface
            .clone()
            .ok_or(PlanError::NoInterface(node.address))?;
        let params = vip::Params {
            cluster,
            node,
            interface,
            paths: vip::Paths {
                dir: self.layout.vip_dir(),
                config_file: self.layout.run.join("etc/keepalived.conf"),
            },
        };
        self.file(
            params.paths.config_file.clone(),
            0o600,
            None,
            vip::render_conf(&params),
        );
        let mut spec = ServiceSpec::daemon("keepalived", vip::argv(&params));
        // keepalived will not start over a pid file whose pid exists (a killed run leaves them).
        spec.stale_files = params.paths.pid_files().to_vec();
        // Started once the balancer could serve, stopped before it: on a node's shutdown the
        // address moves first (keepalived leaves with a priority-0 advert), then requests drain.
        spec.deps = vec!["balancer".into()];
        // Root for its raw VRRP socket and the address it moves, and for nothing else.
        spec.capabilities = vec![Capability::NET_ADMIN, Capability::NET_RAW];
        // At the node's shutdown the address is handed over, not dropped: new connections to
        // it stop here and it stays local (on `lo`) while the balancer answers what it took.
        // A single node has nobody to hand it to.
        if cluster.peers(&node.name).next().is_some() {
            spec.before_shutdown = vip::handover_argvs(cluster);
        }
        self.plan.services.push(spec);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::supervisor::Kind;

    const KEY: &str = "-----BEGIN PRIVATE KEY----- node";

    fn inputs(root: bool) -> Inputs {
        Inputs {
            root,
            boot: 7,
            secret: [7; SECRET_LEN],
            tls: NodeTls {
                ca: "CA".into(),
                cert: "CERT".into(),
                key: KEY.into(),
                db: None,
            },
            persisted_primary: None,
            db_initialised: false,
            db_template: None,
            interface: Some("eth0".into()),
            exe: "/usr/bin/appliance".into(),
            config: None,
            updates: false,
            settings: Settings {
                version: cluster_config::settings::SETTINGS_VERSION,
                node: "server1".into(),
                admin_password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
                metrics_token: api::settings::Secret::new("cd".repeat(32)),
                cluster_secret: api::settings::Secret::new("07".repeat(32)),
                tls: api::settings::TlsChoice::SelfSigned,
                webhook: None,
            },
            seed_dir: Some("/seed".into()),
        }
    }

    /// The default cluster with every address moved to loopback: a whole cluster on one
    /// developer machine (`appliance run`).
    fn loopback_cluster() -> Cluster {
        let toml = cluster_config::DEFAULT_CLUSTER_TOML.replace("10.88.0.", "127.0.0.");
        Cluster::from_toml(&toml, "loopback.toml").unwrap()
    }

    fn dirs(plan: &NodePlan) -> Vec<(&str, u32, Option<Owner>, bool)> {
        plan.dirs
            .iter()
            .map(|d| (d.path.to_str().unwrap(), d.mode, d.owner, d.fresh))
            .collect()
    }

    fn files(plan: &NodePlan) -> Vec<(&str, u32, Option<Owner>)> {
        plan.files
            .iter()
            .map(|f| (f.path.to_str().unwrap(), f.mode, f.owner))
            .collect()
    }

    fn text<'p>(plan: &'p NodePlan, path: &str) -> &'p str {
        match plan.file(Path::new(path)).map(|f| &f.contents) {
            Some(Contents::Text(text)) => text,
            other => panic!("{path}: {:?}", other.is_some()),
        }
    }

    /// (name, user, deps, readiness, capabilities) of every service, in order.
    type ServiceRow<'a> = (
        &'a str,
        Option<&'a str>,
        Vec<&'a str>,
        Option<SocketAddr>,
        Vec<Capability>,
    );

    fn services(plan: &NodePlan) -> Vec<ServiceRow<'_>> {
        plan.services
            .iter()
            .map(|s| {
                let ready = match &s.readiness {
                    Readiness::Tcp { addr } => Some(*addr),
                    _ => None,
                };
                (
                    s.name.as_str(),
                    s.user.as_deref(),
                    s.deps.iter().map(String::as_str).collect(),
                    ready,
                    s.capabilities.clone(),
                )
            })
            .collect()
    }

    fn service<'p>(plan: &'p NodePlan, name: &str) -> &'p ServiceSpec {
        plan.services.iter().find(|s| s.name == name).unwrap()
    }

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn an_image_node_as_root_owns_every_directory_and_file_by_service() {
        use Owner::{Group, Tree, User};
        let cluster = Cluster::default_cluster();
        let server1 = cluster.node("server1").unwrap();
        let mut image_inputs = inputs(true);
        image_inputs.db_template = Some(db::datadir::TEMPLATE.into());
        let plan = plan(&cluster, server1, &Layout::image(), &image_inputs).unwrap();
        let mysql = Some(User("mysql"));
        let www = Some(User("www-data"));
        assert_eq!(
            dirs(&plan),
            [
                ("/data/tandem", 0o755, None, false),
                ("/run/tandem", 0o755, None, true),
                ("/run/tandem/etc", 0o755, None, false),
                (
                    "/run/tandem/vip",
                    0o775,
                    Some(Group("tandem-balancer")),
                    false
                ),
                ("/run/tandem/served-tls", 0o755, None, false),
                ("/data/tandem/mysql", 0o750, mysql, false),
                ("/run/tandem/mysqld", 0o755, mysql, false),
                ("/run/tandem/db-agent", 0o700, None, false),
                ("/run/tandem/www", 0o755, None, false),
                ("/run/tandem/nginx", 0o755, None, false),
                ("/run/tandem/nginx/client_body", 0o700, www, false),
                ("/run/tandem/nginx/proxy", 0o700, www, false),
                ("/run/tandem/nginx/fastcgi", 0o700, www, false),
                ("/run/tandem/nginx/uwsgi", 0o700, www, false),
                ("/run/tandem/nginx/scgi", 0o700, www, false),
                ("/run/tandem/app", 0o700, Some(User("tandem-app")), false),
                (
                    "/data/tandem/logmon",
                    0o755,
                    Some(Tree("tandem-logmon")),
                    false
                ),
                (
                    "/data/tandem/balancer",
                    0o711,
                    Some(Tree("tandem-balancer")),
                    false
                ),
                (
                    "/data/tandem/admin",
                    0o700,
                    Some(Tree("tandem-admin")),
                    false
                ),
                (
                    "/run/tandem/admin-tls",
                    0o700,
                    Some(User("tandem-admin")),
                    false
                ),
            ]
        );
        let admin = Some(User("tandem-admin"));
        assert_eq!(
            files(&plan),
            [
                (
                    "/run/tandem/vip/notify.fifo",
                    0o660,
                    Some(Group("tandem-balancer"))
                ),
                ("/run/tandem/vip/balancer-down", 0o644, None),
                (
                    "/run/tandem/vip/backends-down",
                    0o644,
                    Some(User("tandem-balancer"))
                ),
                ("/run/tandem/node", 0o644, None),
                ("/run/tandem/cluster.secret", 0o600, None),
                ("/run/tandem/served-tls/key.pem", 0o640, None),
                ("/run/tandem/served-tls/certificate.pem", 0o644, None),
                ("/run/tandem/webhook", 0o640, Some(Group("tandem-logmon"))),
                ("/run/tandem/mysqld/tls-ca.pem", 0o644, None),
                ("/run/tandem/mysqld/tls-cert.pem", 0o644, None),
                ("/run/tandem/mysqld/tls-key.pem", 0o600, mysql),
                ("/run/tandem/etc/my.cnf", 0o644, None),
                ("/run/tandem/etc/db-agent.json", 0o644, None),
                ("/run/tandem/www/node.html", 0o644, None),
                ("/run/tandem/www/style.css", 0o644, None),
                ("/run/tandem/etc/nginx.conf", 0o644, None),
                ("/run/tandem/etc/keepalived.conf", 0o600, None),
                ("/run/tandem/admin-tls/ca.crt", 0o644, admin),
                ("/run/tandem/admin-tls/node.crt", 0o644, admin),
                ("/run/tandem/admin-tls/node.key", 0o600, admin),
            ]
        );
        let node = "10.88.0.11";
        use Capability as C;
        assert_eq!(
            services(&plan),
            [
                // Root, to rename the finished datadir into place; CHOWN to give it away,
                // DAC_READ_SEARCH to look inside MariaDB's datadir.
                (
                    "mariadb-init",
                    None,
                    vec![],
                    None,
                    vec![C::CHOWN, C::DAC_READ_SEARCH]
                ),
                (
                    "mariadb",
                    Some("mysql"),
                    vec!["mariadb-init"],
                    addr(&format!("{node}:3306")),
                    vec![]
                ),
                ("db-agent", None, vec!["mariadb"], None, vec![]),
                // Neither the built-in application nor nginx waits for the database.
                (
                    "app",
                    Some("tandem-app"),
                    vec![],
                    addr("127.0.0.1:8000"),
                    vec![]
                ),
                (
                    "nginx",
                    None,
                    vec!["app"],
                    addr(&format!("{node}:8080")),
                    vec![C::SETUID, C::SETGID]
                ),
                ("logmon", Some("tandem-logmon"), vec![], None, vec![]),
                (
                    "balancer",
                    Some("tandem-balancer"),
                    vec!["nginx"],
                    addr(&format!("{node}:443")),
                    vec![C::NET_BIND_SERVICE]
                ),
                (
                    "keepalived",
                    None,
                    vec!["balancer"],
                    None,
                    vec![C::NET_ADMIN, C::NET_RAW]
                ),
                ("settings", None, vec![], None, vec![C::CHOWN]),
                (
                    "admin",
                    Some("tandem-admin"),
                    vec!["settings"],
                    addr(&format!("{node}:9443")),
                    vec![]
                ),
            ]
        );
        assert_eq!(service(&plan, "mariadb-init").kind, Kind::Oneshot);
        assert_eq!(
            service(&plan, "mariadb-init").argv[1..],
            [
                "db-init",
                "--datadir",
                "/data/tandem/mysql",
                "--owner",
                "mysql",
                "--template",
                db::datadir::TEMPLATE
            ]
        );
        // Without a template (a developer machine) `mariadb-install-db` runs in place as
        // MariaDB's user.
        let install = super::plan(&cluster, server1, &Layout::image(), &inputs(true)).unwrap();
        let init = service(&install, "mariadb-init");
        assert_eq!(init.argv[0], db::INSTALL_DB);
        assert_eq!(init.user.as_deref(), Some("mysql"));
        assert!(init.capabilities.is_empty());
        assert_eq!(
            service(&plan, "balancer").track_file.as_deref(),
            Some(Path::new("/run/tandem/vip/balancer-down"))
        );
        // keepalived hands the address over at the node's shutdown; nothing else does anything
        // before its stop.
        assert_eq!(
            service(&plan, "keepalived").before_shutdown,
            [
                vec![
                    "/usr/sbin/nft",
                    "add",
                    "element",
                    "inet",
                    "tandem",
                    "draining",
                    "{ 10.88.0.10 }"
                ],
                vec!["ip", "addr", "replace", "10.88.0.10/32", "dev", "lo"],
            ]
        );
        assert!(plan
            .services
            .iter()
            .all(|s| s.name == "keepalived" || s.before_shutdown.is_empty()));
        // On an image the helpers read the seed's cluster.toml and are told the node (a
        // generic image's comes from its settings).
        assert_eq!(
            service(&plan, "logmon").argv,
            [
                "/usr/bin/appliance",
                "logmon",
                "--node",
                "server1",
                "--state-dir",
                "/data/tandem",
                "--served-tls",
                "/run/tandem/served-tls",
                "--webhook-file",
                "/run/tandem/webhook",
            ]
        );
        assert_eq!(
            service(&plan, "settings").argv[2..],
            [
                "--state-dir",
                "/data/tandem",
                "--run-dir",
                "/run/tandem",
                "--control-socket",
                api::control::DEFAULT_SOCKET,
                "--seed-dir",
                "/seed",
                "--socket-group",
                "tandem-control",
            ]
        );
        assert_eq!(
            service(&plan, "admin").argv[2..],
            [
                "--node",
                "server1",
                "--state-dir",
                "/data/tandem",
                "--socket",
                api::control::DEFAULT_SOCKET,
                "--run-dir",
                "/run/tandem",
                "--scrape",
                "127.0.0.1:9101",
                "--scrape",
                "127.0.0.1:9100",
                "--tls-dir",
                "/run/tandem/admin-tls",
                "--settings-socket",
                "/run/tandem/settings.sock",
            ]
        );

        // What the files hold: the replica's role, this boot, the node's TLS files, and the
        // application's password derived from the secret.
        assert!(text(&plan, "/run/tandem/etc/my.cnf").contains("read_only = ON"));
        let page = text(&plan, "/run/tandem/www/node.html");
        assert!(
            page.contains("node: server1") && page.contains("boot: 7"),
            "{page}"
        );
        assert_eq!(text(&plan, "/run/tandem/mysqld/tls-key.pem"), KEY);
        assert_eq!(text(&plan, "/run/tandem/mysqld/tls-cert.pem"), "CERT");
        assert_eq!(text(&plan, "/run/tandem/admin-tls/node.key"), KEY);
        assert!(text(&plan, "/run/tandem/etc/keepalived.conf").contains("eth0"));
        let env = &service(&plan, "app").env;
        assert_eq!(
            env["TANDEM_DB_PASSWORD"],
            api::secret::derive_password(&[7; SECRET_LEN], "app")
        );
        assert_eq!(env["TANDEM_DB_PRIMARY_HOST"], "10.88.0.12");
        assert_eq!(
            env["TANDEM_APP_TRUSTED_PROXIES"],
            "10.88.0.11,10.88.0.12,10.88.0.10"
        );
        assert_eq!(text(&plan, "/run/tandem/node"), "server1\n");
        assert_eq!(
            text(&plan, "/run/tandem/cluster.secret").trim(),
            "07".repeat(32)
        );
        // Keys and passwords never show in a plan's Debug (it may end up in a log).
        let shown = format!("{plan:?}");
        assert!(!shown.contains(KEY) && !shown.contains(&env["TANDEM_DB_PASSWORD"]));
        assert!(!shown.contains(&"07".repeat(32)), "{shown}");
    }

    /// An uploaded certificate and a webhook become files of the plan: the key readable by
    /// the balancer's group only, the webhook by the log monitor's.
    #[test]
    fn settings_become_files_the_balancer_and_log_monitor_read() {
        use Owner::Group;
        let mut settings = inputs(true).settings;
        settings.tls = api::settings::TlsChoice::Upload {
            certificate: "CHAIN".into(),
            key: api::settings::Secret::new(KEY),
        };
        settings.webhook = Some("https://hooks.example/x".into());
        let files = settings_files(&settings, Path::new("/run/tandem"), true);
        let rows: Vec<(&str, u32, Option<Owner>, &str)> = files
            .iter()
            .map(|f| {
                let contents = match &f.contents {
                    Contents::Text(t) => t.as_str(),
                    Contents::Fifo => "FIFO",
                    Contents::Absent => "ABSENT",
                };
                (f.path.to_str().unwrap(), f.mode, f.owner, contents)
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "/run/tandem/served-tls/certificate.pem",
                    0o644,
                    None,
                    "CHAIN"
                ),
                (
                    "/run/tandem/served-tls/key.pem",
                    0o640,
                    Some(Group("tandem-balancer")),
                    KEY
                ),
                (
                    "/run/tandem/webhook",
                    0o640,
                    Some(Group("tandem-logmon")),
                    "https://hooks.example/x\n"
                ),
            ]
        );
        assert!(!format!("{files:?}").contains(KEY));
    }

    #[test]
    fn the_wizard_runs_only_what_setup_needs() {
        let cluster = Cluster::default_cluster();
        let wizard = WizardInputs {
            root: true,
            exe: "/usr/bin/appliance".into(),
            config: None,
            seed_dir: Some("/seed".into()),
            listen: "10.88.0.254:9443".parse().unwrap(),
            certificate: ("CERT".into(), KEY.into()),
            setup_code: "1234-5678-9012".into(),
            console: Some("/dev/ttyS0".into()),
        };
        let plan = plan_wizard(&cluster, &Layout::image(), &wizard).unwrap();
        let names: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["settings", "admin", "setup-console"]);
        assert_eq!(text(&plan, "/run/tandem/setup-code"), "1234-5678-9012\n");
        assert_eq!(
            plan.file(Path::new("/run/tandem/setup-code")).unwrap().mode,
            0o600
        );
        let admin = service(&plan, "admin");
        assert_eq!(admin.user.as_deref(), Some("tandem-admin"));
        assert!(admin.argv.contains(&"--setup".to_string()));
        assert!(admin.argv.contains(&"10.88.0.254:9443".to_string()));
        assert_eq!(text(&plan, "/run/tandem/admin-tls/node.key"), KEY);
        // Nothing of the node's stack: no database, no balancer, no secret.
        assert!(plan.file(Path::new("/run/tandem/cluster.secret")).is_none());
        assert!(!format!("{plan:?}").contains("1234-5678-9012"));
    }

    #[test]
    fn a_developer_run_owns_nothing_and_names_its_config() {
        let cluster = loopback_cluster();
        let server1 = cluster.node("server1").unwrap();
        let mut inputs = inputs(false);
        inputs.interface = None;
        inputs.config = Some("/work/c/cluster.toml".into());
        let layout = Layout::dev(Path::new("/s"));
        let plan = plan(&cluster, server1, &layout, &inputs).unwrap();
        assert!(plan.dirs.iter().all(|d| d.owner.is_none()), "{plan:?}");
        assert!(plan.files.iter().all(|f| f.owner.is_none()), "{plan:?}");
        assert!(plan.services.iter().all(|s| s.user.is_none()));
        let names: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
        // No keepalived on loopback: the nodes share a machine.
        assert_eq!(
            names,
            [
                "mariadb-init",
                "mariadb",
                "db-agent",
                "app",
                "nginx",
                "logmon",
                "balancer",
                "settings",
                "admin"
            ]
        );
        assert_eq!(
            (
                plan.dirs[0].path.as_path(),
                plan.dirs[1].path.as_path(),
                plan.dirs[1].fresh
            ),
            (Path::new("/s"), Path::new("/s/run"), true)
        );
        // Nodes on one machine cannot share 127.0.0.1: the app and the scraped endpoints are
        // on the node's own address.
        assert_eq!(
            service(&plan, "app").readiness,
            Readiness::Tcp {
                addr: "127.0.0.11:8000".parse().unwrap()
            }
        );
        assert_eq!(
            service(&plan, "balancer").argv,
            [
                "/usr/bin/appliance",
                "balancer",
                "--config",
                "/work/c/cluster.toml",
                "--node",
                "server1",
                "--state-dir",
                "/s/balancer",
                "--vip-dir",
                "/s/run/vip",
                "--served-tls",
                "/s/run/served-tls",
            ]
        );
        let admin = &service(&plan, "admin").argv;
        assert!(
            admin
                .windows(2)
                .any(|w| w == ["--scrape", "127.0.0.11:9100"]),
            "{admin:?}"
        );
        assert!(text(&plan, "/s/run/etc/nginx.conf").contains("127.0.0.11:8000"));
    }

    #[test]
    fn the_primary_follows_a_switchover_and_an_initialised_datadir_needs_no_init() {
        let cluster = Cluster::default_cluster();
        let layout = Layout::image();
        let mut inputs = inputs(true);
        let plan_for = |node: &str, inputs: &Inputs| {
            plan_stack(&cluster, cluster.node(node).unwrap(), &layout, inputs).unwrap()
        };
        let my_cnf = "/run/tandem/etc/my.cnf";
        let server2 = plan_for("server2", &inputs);
        assert!(text(&server2, my_cnf).contains("read_only = OFF"));
        let names: Vec<&str> = server2.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["mariadb-init", "mariadb", "db-agent", "app", "nginx"]
        );

        inputs.persisted_primary = Some("server1\n".into());
        inputs.db_initialised = true;
        inputs.tls.db = Some(("DB CERT".into(), "DB KEY".into()));
        let server1 = plan_for("server1", &inputs);
        assert!(text(&server1, my_cnf).contains("read_only = OFF"));
        assert_eq!(
            service(&server1, "app").env["TANDEM_DB_PRIMARY_HOST"],
            "10.88.0.11"
        );
        assert!(text(&plan_for("server2", &inputs), my_cnf).contains("read_only = ON"));
        assert_eq!(server1.services[0].name, "mariadb");
        assert!(server1.services[0].deps.is_empty());
        // MariaDB's own pair, when the seed has one, instead of the node's identity.
        assert_eq!(text(&server1, "/run/tandem/mysqld/tls-cert.pem"), "DB CERT");
        assert_eq!(text(&server1, "/run/tandem/mysqld/tls-key.pem"), "DB KEY");
        // The agent reads its configuration from the file the plan writes.
        let agent: db::agent::AgentConfig =
            serde_json::from_str(text(&server1, "/run/tandem/etc/db-agent.json")).unwrap();
        assert_eq!(
            agent.primary_file,
            Path::new("/data/tandem").join(api::files::DB_PRIMARY)
        );
        assert_eq!(
            service(&server1, "db-agent").argv[1..],
            ["db-agent", "--config", "/run/tandem/etc/db-agent.json"]
        );
    }

    #[test]
    fn what_cannot_be_planned_is_an_error_naming_it() {
        let cluster = Cluster::default_cluster();
        let server1 = cluster.node("server1").unwrap();
        let mut no_interface = inputs(true);
        no_interface.interface = None;
        let e = plan(&cluster, server1, &Layout::image(), &no_interface).unwrap_err();
        assert!(e.to_string().contains("10.88.0.11"), "{e}");
        let relative = Layout::dev(Path::new("state"));
        let e = plan(&cluster, server1, &relative, &inputs(true)).unwrap_err();
        assert!(e.to_string().starts_with("state directory state:"), "{e}");
    }

    #[test]
    fn a_node_booted_from_a_slot_runs_the_update_service_as_root_with_three_capabilities() {
        let cluster = Cluster::default_cluster();
        let server1 = cluster.node("server1").unwrap();
        let layout = Layout::image();
        let without = plan(&cluster, server1, &layout, &inputs(true)).unwrap();
        assert!(without.services.iter().all(|s| s.name != "updater"));

        let mut slots = inputs(true);
        slots.updates = true;
        let plan = plan(&cluster, server1, &layout, &slots).unwrap();
        let updater = service(&plan, "updater");
        let socket = layout.socket.display().to_string();
        assert_eq!(
            updater.argv[1..],
            [
                "updater",
                "--run-dir",
                "/run/tandem",
                "--state-dir",
                "/data/tandem",
                "--control-socket",
                socket.as_str(),
                "--socket-group",
                "tandem-control"
            ]
        );
        assert_eq!(updater.user, None);
        let caps: Vec<&str> = updater.capabilities.iter().map(|c| c.name()).collect();
        assert_eq!(caps, ["CHOWN", "LINUX_IMMUTABLE", "SYS_ADMIN"]);
        assert_eq!(
            updater.readiness,
            Readiness::UnixSocket {
                path: "/run/tandem/update.sock".into()
            }
        );
    }
}
