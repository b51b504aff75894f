//! `appliance settings`: the settings service (root, one per node). The only writer of the
//! settings store; serves `api::settings`'s socket to the web wizard and admin page (the admin
//! server, in the control group) and the serial-console wizard (root). A setup is validated
//! with `cluster_config::settings::setup`, stored in one transaction, and then the supervisor
//! is asked to plan the node again (`Reconfigure`); a change is stored the same way and applied
//! to the running services: a new certificate by a reload of the balancer (SIGHUP, no
//! connection dropped), a new webhook by a restart of the log monitor.

use std::io::{BufRead as _, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::settings::{Field, FieldError, Request, Response, Secret, Status};
use cluster_config::settings::{SeedSettings, Settings};
use cluster_config::Cluster;

use super::store::{Origin, Store};

/// How long a client may take to send its request line.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Between answering a setup and asking the supervisor to re-plan: the wizard's done page
/// goes out first.
const RECONFIGURE_DELAY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, clap::Args)]
pub struct SettingsArgs {
    /// The cluster description [default: the seed's].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The node's state directory (the store is in its `settings/`).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The node's runtime directory (the socket, the setup code, the files derived from the
    /// settings).
    #[arg(long)]
    pub run_dir: PathBuf,
    /// The seed directory whose `settings.toml` says what is already known [default: none:
    /// everything not stored is asked].
    #[arg(long)]
    pub seed_dir: Option<PathBuf>,
    /// The supervisor's control socket (reconfigure, reload, restart).
    #[arg(long)]
    pub control_socket: PathBuf,
    /// Give the socket to this group (the admin server's).
    #[arg(long)]
    pub socket_group: Option<String>,
}

struct Service {
    cluster: Cluster,
    seed: SeedSettings,
    store: Store,
    run_dir: PathBuf,
    control_socket: PathBuf,
    root: bool,
}

pub fn main(args: SettingsArgs) -> anyhow::Result<ExitCode> {
    let cluster = crate::args::load_cluster_or_seed(args.config.as_deref())?;
    let seed = match &args.seed_dir {
        Some(dir) => super::read_seed(dir, &cluster)?,
        None => SeedSettings::default(),
    };
    let store = Store::open(&args.state_dir)?;
    let service = Service {
        cluster,
        seed,
        store,
        run_dir: args.run_dir.clone(),
        control_socket: args.control_socket.clone(),
        root: nix::unistd::geteuid().is_root(),
    };
    let configured = service.store.current()?.is_some();
    tracing::info!(configured, "settings service starting");
    let service = Arc::new(Mutex::new(service));
    crate::files::serve_unix_socket(
        &args.run_dir.join(api::settings::SOCKET_FILE),
        args.socket_group.as_deref(),
        "settings service",
        move |conn| {
            if let Err(e) = serve(&service, conn) {
                tracing::warn!("settings client: {e:#}");
            }
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

fn serve(service: &Mutex<Service>, conn: UnixStream) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    std::io::BufReader::new(&conn)
        .take(api::settings::MAX_LINE)
        .read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let mut service = service
                .lock()
                .map_err(|_| anyhow::anyhow!("settings service state poisoned"))?;
            service.handle(request)
        }
        Err(e) => Response::Error {
            message: format!("unreadable request: {e}"),
        },
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    (&conn).write_all(text.as_bytes())?;
    Ok(())
}

impl Service {
    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => self.status().map(Response::Status),
            Request::Setup {
                setup_code,
                answers,
            } => self.setup(&setup_code, &answers),
            Request::Change { change } => self.change(&change),
            Request::Login { password } => self.login(&password),
        };
        result.unwrap_or_else(|e| {
            tracing::error!("settings: {e:#}");
            Response::Error {
                message: format!("{e:#}"),
            }
        })
    }

    fn status(&self) -> anyhow::Result<Status> {
        let current = self.store.current()?;
        let (revision, settings) = match &current {
            Some((r, s)) => (*r, Some(s)),
            None => (0, None),
        };
        Ok(Status {
            configured: settings.is_some(),
            revision,
            cluster: self.cluster.name.clone(),
            node: settings
                .map(|s| s.node.clone())
                .or_else(|| self.seed.node.clone()),
            nodes: self.cluster.nodes.iter().map(|n| n.name.clone()).collect(),
            asked: match settings {
                Some(_) => Vec::new(),
                None => cluster_config::settings::asked(&self.seed),
            },
            certificate: settings
                .and_then(|s| s.uploaded_tls())
                .and_then(|(cert, _)| cluster_config::settings::certificate_info(cert)),
            webhook: settings.and_then(|s| s.webhook.clone()),
            metrics_token: settings.map(|s| s.metrics_token.clone()),
        })
    }

    fn setup(
        &mut self,
        code: &Secret,
        answers: &api::settings::Answers,
    ) -> anyhow::Result<Response> {
        if self.store.current()?.is_some() {
            return Ok(Response::Error {
                message: "this node is already configured: change its settings on the admin page"
                    .into(),
            });
        }
        if !self.code_matches(code) {
            tracing::warn!("first-boot setup refused: wrong setup code");
            return Ok(Response::Invalid {
                errors: vec![FieldError {
                    field: Field::SetupCode,
                    message: "wrong setup code: it is printed on the node's serial console".into(),
                }],
            });
        }
        let now = super::now_unix();
        let (settings, generated) = match cluster_config::settings::setup(
            &self.cluster,
            &self.seed,
            answers,
            now,
            &super::fresh()?,
        ) {
            Ok(done) => done,
            Err(errors) => {
                let fields: Vec<&str> = errors.iter().map(|e| e.field.key()).collect();
                tracing::info!(?fields, "first-boot setup refused: invalid answers");
                return Ok(Response::Invalid { errors });
            }
        };
        let revision = self.store.save(&settings, Origin::Wizard, now)?;
        tracing::info!(node = %settings.node, revision, "first-boot setup stored; re-planning the node");
        let control = self.control_socket.clone();
        let _ = std::thread::Builder::new()
            .name("reconfigure".into())
            .spawn(move || {
                std::thread::sleep(RECONFIGURE_DELAY);
                if let Err(e) = api::control::request(&control, &api::control::Request::Reconfigure)
                {
                    tracing::error!("asking the supervisor to re-plan: {e}");
                }
            });
        Ok(Response::Applied {
            cluster_secret: generated,
        })
    }

    fn change(&mut self, change: &api::settings::Change) -> anyhow::Result<Response> {
        let Some((_, current)) = self.store.current()? else {
            return Ok(Response::Error {
                message: "this node is not configured yet: finish the first-boot setup".into(),
            });
        };
        let now = super::now_unix();
        let next = match cluster_config::settings::change(
            &self.cluster,
            &current,
            change,
            now,
            &super::fresh()?,
        ) {
            Ok(next) => next,
            Err(errors) => return Ok(Response::Invalid { errors }),
        };
        let revision = self.store.save(&next, Origin::Admin, now)?;
        let changed: Vec<&str> = [
            (
                "admin password",
                next.admin_password_hash != current.admin_password_hash,
            ),
            ("certificate", next.tls != current.tls),
            ("webhook", next.webhook != current.webhook),
        ]
        .into_iter()
        .filter(|(_, c)| *c)
        .map(|(what, _)| what)
        .collect();
        tracing::info!(revision, ?changed, "settings changed");
        self.apply_running(&current, &next)?;
        Ok(Response::Applied {
            cluster_secret: None,
        })
    }

    /// Brings the running services to `next`: the derived files rewritten, the balancer
    /// reloaded for a new certificate, the log monitor restarted for a new webhook.
    fn apply_running(&self, current: &Settings, next: &Settings) -> anyhow::Result<()> {
        let files = crate::node::settings_files(next, &self.run_dir, self.root);
        crate::node::write_files(&files)?;
        let control = |request: api::control::Request| match api::control::request(
            &self.control_socket,
            &request,
        ) {
            Ok(api::control::Response::Ok) => {}
            Ok(other) => tracing::warn!(?request, ?other, "the supervisor refused"),
            Err(e) => tracing::warn!(?request, "asking the supervisor: {e}"),
        };
        if next.tls != current.tls {
            control(api::control::Request::Signal {
                service: "balancer".into(),
                signal: "HUP".into(),
            });
        }
        // The log monitor watches the served certificate's expiry and sends to the webhook.
        if next.webhook != current.webhook || next.tls != current.tls {
            control(api::control::Request::Restart {
                service: logmon::monitor::SERVICE_NAME.into(),
            });
        }
        Ok(())
    }

    fn login(&self, password: &Secret) -> anyhow::Result<Response> {
        Ok(match self.store.current()? {
            Some((_, settings))
                if cluster_config::settings::verify_password(
                    &settings.admin_password_hash,
                    password.expose(),
                ) =>
            {
                Response::Ok
            }
            _ => Response::Denied,
        })
    }

    /// The code printed on the console for this boot's wizard (digits compared, dashes and
    /// spaces ignored; constant time).
    fn code_matches(&self, code: &Secret) -> bool {
        let Ok(expected) =
            std::fs::read_to_string(self.run_dir.join(api::settings::SETUP_CODE_FILE))
        else {
            return false;
        };
        let digits = |s: &str| -> Vec<u8> { s.bytes().filter(u8::is_ascii_alphanumeric).collect() };
        let (a, b) = (digits(&expected), digits(code.expose()));
        if a.is_empty() || a.len() != b.len() {
            return false;
        }
        a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}
