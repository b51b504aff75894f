//! Setup mode (`appliance admin --setup`): while the node's settings are incomplete, the admin
//! port serves only the first-boot wizard. It needs no node identity (a generic image does not
//! know which node it is yet): the cluster, the certificate init made, and the settings
//! service, which validates and stores the answers. Wrong setup codes are rate-limited per
//! client address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::files::{NODE_CERT, NODE_KEY};
use api::settings::{Field, Request as SettingsRequest, Response as SettingsResponse};
use cluster_config::Cluster;
use hyper::body::Incoming;
use hyper::header::RETRY_AFTER;
use hyper::{Method, Request, StatusCode};

use crate::account::{self, WORK_TIMEOUT};
use crate::auth::{self, Limiter};
use crate::forms::{self, DoneView, Form, SetupView};
use crate::{html, lock, reply, see_other, with_header, Error, Resp};

/// What the wizard runs with.
pub struct SetupConfig {
    pub cluster: Cluster,
    /// Where to listen (the node's address, or a generic image's setup address).
    pub listen: SocketAddr,
    /// The directory holding the wizard's certificate and key ([`NODE_CERT`], [`NODE_KEY`]):
    /// the self-signed pair whose fingerprint init printed on the serial console.
    pub tls_dir: PathBuf,
    /// The settings service's socket.
    pub settings_socket: PathBuf,
}

pub(crate) struct Wizard {
    cluster: Cluster,
    settings_socket: PathBuf,
    /// Wrong setup codes per client address.
    codes: Mutex<Limiter>,
}

impl Wizard {
    pub(crate) fn new(cluster: Cluster, settings_socket: PathBuf) -> Arc<Wizard> {
        Arc::new(Wizard {
            cluster,
            settings_socket,
            codes: Mutex::new(Limiter::default()),
        })
    }
}

/// Serves the wizard until SIGTERM (PID 1 stops it once the settings are stored).
pub fn run_setup(config: SetupConfig) -> Result<(), Error> {
    let tls = crate::plain_server_config(
        &config.tls_dir.join(NODE_CERT),
        &config.tls_dir.join(NODE_KEY),
    )?;
    let listen = config.listen;
    let wizard = Wizard::new(config.cluster, config.settings_socket);
    crate::listen_and(listen, "first-boot wizard", move |listener| {
        serve_setup(listener, tls, wizard)
    })
}

pub(crate) async fn serve_setup(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    wizard: Arc<Wizard>,
) -> Result<(), Error> {
    let handler = move |req, client, _peer: Option<String>| {
        let wizard = wizard.clone();
        async move { route(&wizard, req, client).await }
    };
    crate::serve(listener, tls, |_: &_| None, handler).await
}

async fn route(w: &Wizard, req: Request<Incoming>, client: SocketAddr) -> Resp {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/" | "/login") => see_other("/setup"),
        (&Method::GET | &Method::HEAD, "/setup") => form_page(w).await,
        (&Method::POST, "/setup") => submit(w, req, client).await,
        (&Method::GET, "/api/setup/status") => account::setup_status(&w.settings_socket).await,
        (&Method::GET | &Method::HEAD, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (_, "/" | "/setup") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET or POST\n",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: this node is not set up yet (see /setup)\n",
        ),
    }
}

/// `GET /setup`: the form, or the done page when the node is configured already.
async fn form_page(w: &Wizard) -> Resp {
    match account::status(&w.settings_socket).await {
        Ok(status) if status.configured => done(w, status.node.as_deref(), None, true),
        Ok(status) => html(
            StatusCode::OK,
            forms::render_setup(&SetupView {
                cluster: &status.cluster,
                nodes: &status.nodes,
                asked: &status.asked,
                form: &Form::default(),
                errors: &[],
                general: None,
            }),
        ),
        Err(e) => html(
            StatusCode::SERVICE_UNAVAILABLE,
            forms::render_waiting(&w.cluster.name, &e),
        ),
    }
}

fn done(
    w: &Wizard,
    node: Option<&str>,
    generated: Option<&api::settings::Secret>,
    already: bool,
) -> Resp {
    let node = node.map(|name| {
        let url = match w.cluster.node(name) {
            Some(n) => format!("https://{}:{}/login", n.address, w.cluster.ports.admin),
            None => "/login".to_string(),
        };
        (name, url)
    });
    html(
        StatusCode::OK,
        forms::render_done(&DoneView {
            cluster: &w.cluster.name,
            node,
            generated,
            already,
        }),
    )
}

/// `POST /setup`: the answers to the settings service; its verdict on the page.
async fn submit(w: &Wizard, req: Request<Incoming>, client: SocketAddr) -> Resp {
    let address = client.ip().to_canonical();
    let form = match account::read_form(req.into_body()).await {
        Ok(form) => form,
        Err(resp) => return resp,
    };
    let status = match account::status(&w.settings_socket).await {
        Ok(status) if status.configured => {
            return done(w, status.node.as_deref(), None, true);
        }
        Ok(status) => status,
        Err(e) => {
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                forms::render_waiting(&w.cluster.name, &e),
            )
        }
    };
    let page = |code: StatusCode, errors: &[api::settings::FieldError], general: Option<&str>| {
        html(
            code,
            forms::render_setup(&SetupView {
                cluster: &status.cluster,
                nodes: &status.nodes,
                asked: &status.asked,
                form: &form,
                errors,
                general,
            }),
        )
    };
    if let Err(wait) = lock(&w.codes).begin(address, Instant::now()) {
        let secs = auth::retry_after_secs(wait);
        let error = api::settings::FieldError {
            field: Field::SetupCode,
            message: format!(
                "too many wrong setup codes from {address}: try again in {} minute(s)",
                secs.div_ceil(60)
            ),
        };
        let resp = page(StatusCode::TOO_MANY_REQUESTS, &[error], None);
        return with_header(resp, RETRY_AFTER, &secs.to_string());
    }
    let (setup_code, answers) = forms::setup_answers(&form, &status.asked);
    let chosen = answers.node.clone();
    let answer = account::ask(
        &w.settings_socket,
        SettingsRequest::Setup {
            setup_code,
            answers,
        },
        WORK_TIMEOUT,
    )
    .await;
    match answer {
        Ok(SettingsResponse::Applied { cluster_secret }) => {
            lock(&w.codes).clear(address);
            tracing::info!(%address, "first-boot setup applied");
            // The node as stored (the seed may have named it), else as answered.
            let node = match account::status(&w.settings_socket).await {
                Ok(after) => after.node.or(chosen),
                Err(_) => chosen,
            };
            done(w, node.as_deref(), cluster_secret.as_ref(), false)
        }
        Ok(SettingsResponse::Invalid { errors }) => {
            if errors.iter().any(|e| e.field == Field::SetupCode) {
                tracing::warn!(%address, "first-boot setup: wrong setup code");
            } else {
                lock(&w.codes).forgive(address);
            }
            page(StatusCode::UNPROCESSABLE_ENTITY, &errors, None)
        }
        other => {
            lock(&w.codes).forgive(address);
            let message = match other {
                Err(e) => e,
                Ok(SettingsResponse::Error { message }) => message,
                Ok(_) => "the settings service answered the setup with something else".into(),
            };
            tracing::warn!("first-boot setup not applied: {message}");
            page(StatusCode::SERVICE_UNAVAILABLE, &[], Some(&message))
        }
    }
}
