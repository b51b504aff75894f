//! The admin server (`appliance admin`). Owns the node's HTTPS admin port (status page and
//! JSON, aggregated metrics, the peer API) and the client of the peers' ports ([`peer`]).
//! Must not depend on `appliance` or another service: it asks the control socket and reads files.
//!
//! What it shows comes from the supervisor's control socket ([`api::control`]), files in the
//! run directory, the local metrics endpoints and the alert reader its caller passes in.
//!
//! After setup the port needs a login ([`auth`], [`account`]): the password is checked by the
//! settings service ([`api::settings`]), sessions live in this server's memory, every
//! state-changing request carries its session's CSRF token, and `/metrics` takes the settings'
//! bearer token. Before setup, [`run_setup`] serves only the first-boot wizard ([`wizard`]).
//!
//! The peer API is for other nodes only: mutual TLS with a client certificate signed by the
//! cluster CA whose subject alternative names name a node of the cluster (its name or its
//! address). Any other certificate the CA signed (an operator's tool, or one made for another
//! purpose) is no peer. It runs as its own supervised child, so a bug here never touches PID 1.

mod account;
mod auth;
mod forms;
#[cfg(test)]
mod http_tests;
mod install;
#[cfg(test)]
mod login_tests;
mod page;
pub mod peer;
pub mod upgrade;
mod wizard;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::control::{self as ctl, ServiceStatus};
use api::files::{ADMIN_STATE_DIR, CA_CERT, NODE_CERT, NODE_KEY};
use api::update::UpdateStatus;
use bytes::Bytes;
use cluster_config::{Cluster, Node};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use page::{AlertRow, NodeRow, StatusView};
pub use wizard::{run_setup, SetupConfig};

/// A scrape that takes longer is skipped (and counted as down) for this request.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);
/// Largest metrics text accepted from one local endpoint.
const MAX_SCRAPE_BYTES: u64 = 4 << 20;
/// Alerts shown on the page.
const PAGE_ALERTS: usize = 15;
/// How long requests in flight may finish after SIGTERM (within the supervisor's stop
/// timeout).
const STOP_GRACE: Duration = Duration::from_secs(3);

/// What the admin server runs with; the caller resolved every default.
pub struct Config {
    pub cluster: Cluster,
    /// This node.
    pub node: Node,
    /// Where to listen: the node's address and admin port, unless told otherwise.
    pub listen: SocketAddr,
    /// The node's state directory: the self-signed certificate of a machine without the
    /// seed's goes below it ([`ADMIN_STATE_DIR`]).
    pub state_dir: PathBuf,
    /// The supervisor's control socket.
    pub socket: PathBuf,
    /// The node's runtime directory: the database agent's status, the floating IP's status,
    /// the degraded records.
    pub run_dir: PathBuf,
    /// A TLS directory ([`CA_CERT`], [`NODE_CERT`], [`NODE_KEY`]): peers may call in. `None`:
    /// a self-signed certificate, and no peer API.
    pub tls_dir: Option<PathBuf>,
    /// Local Prometheus endpoints (`host:port`, path `/metrics`) aggregated into `/metrics`
    /// (usually [`default_scrape`]).
    pub scrape: Vec<String>,
    /// The newest alerts, for the page.
    pub alerts: AlertSource,
    /// The trusted update-signing keyring a cluster upgrade's bundle is verified against
    /// ([`api::files::IMAGE_UPDATE_KEYRING`] on an image).
    pub update_keyring: PathBuf,
    /// The settings service's socket ([`api::settings::SOCKET_FILE`] in the run directory):
    /// logins, the settings page and the metrics token.
    pub settings_socket: PathBuf,
}

/// Reads the newest `limit` alerts, newest first (the log monitor's history, which the caller
/// knows how to read: services never depend on each other). `Err` says why there are none.
pub type AlertSource = Box<dyn Fn(usize) -> Result<Vec<Alert>, String> + Send + Sync>;

/// An alert as the admin server shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub rule: String,
    pub subject: String,
    /// `firing` or `resolved`.
    pub state: String,
    pub message: String,
    /// Unix time in milliseconds.
    pub fired_ms: i64,
    pub resolved_ms: Option<i64>,
}

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A TLS file holds something else than it should.
    #[error("{}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
    /// rustls refused the certificates or the protocol versions.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The self-signed certificate could not be made.
    #[error("generating the admin certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The listening socket or the runtime could not be set up.
    #[error("{what}: {source}")]
    Server {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    }
}

/// Why a GET of a peer or of a local metrics endpoint gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The endpoint is not `host:port`.
    #[error("`{0}` is not host:port")]
    Endpoint(String),
    /// No answer (refused, timed out, TLS failed) or an unreadable one.
    #[error("GET {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: ureq::Error,
    },
    /// An answer other than 200.
    #[error("GET {url}: {status} {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    /// A POST (a bundle to a peer) got no answer.
    #[error("POST {url}: {source}")]
    Post {
        url: String,
        #[source]
        source: ureq::Error,
    },
    /// A POST was answered with another status than 200: `message` is the peer's reason.
    #[error("POST {url}: {status} {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    /// A 200 whose body is not what the path serves.
    #[error("{from}: {detail}")]
    Format { from: String, detail: String },
}

struct Ctx {
    cluster: Cluster,
    node: Node,
    socket: PathBuf,
    scrape: Vec<String>,
    /// The client of the local metrics endpoints.
    scraper: ureq::Agent,
    run_dir: PathBuf,
    alerts: AlertSource,
    /// Asks the other nodes (their floating-IP view); `None` without the seed's certificates.
    peers: Option<peer::PeerClient>,
    state_dir: PathBuf,
    update_keyring: PathBuf,
    /// A cluster upgrade is being spooled or runs.
    upgrading: AtomicBool,
    /// An upload's idle timeout and size cap.
    limits: install::Limits,
    settings_socket: PathBuf,
    /// Open sessions and failed logins, in memory.
    auth: Mutex<account::AuthState>,
    /// `/metrics`'s bearer token as the settings service last said (`None`: not known yet;
    /// `/metrics` then stays closed).
    metrics_token: Mutex<Option<api::settings::Secret>>,
}

impl Ctx {
    fn update_socket(&self) -> PathBuf {
        self.run_dir.join(api::update::SOCKET_FILE)
    }

    fn update_status(&self) -> Result<UpdateStatus, String> {
        UpdateStatus::read(&self.run_dir.join(api::update::STATUS_FILE))
    }

    /// The cluster upgrade's record, finished first if this node came back from its reboot.
    fn cluster_upgrade(&self) -> Option<upgrade::UpgradeState> {
        let path = upgrade::state_file(&self.state_dir);
        let state = match upgrade::UpgradeState::read(&path) {
            Ok(state) => state?,
            Err(e) => {
                tracing::warn!("{e}");
                return None;
            }
        };
        if self.upgrading.load(Ordering::SeqCst) {
            return Some(state);
        }
        let Ok(own) = self.update_status() else {
            return Some(state);
        };
        match upgrade::reconcile(&state, &self.node.name, &own, unix_ms()) {
            Some(next) => {
                if let Err(e) = next.write(&path) {
                    tracing::warn!("writing the cluster upgrade's record: {e}");
                }
                tracing::info!("cluster upgrade: {}", next.message);
                Some(next)
            }
            None => Some(state),
        }
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The node's local metrics endpoints: the balancer's and the log monitor's.
pub fn default_scrape(node_address: std::net::Ipv4Addr) -> Vec<String> {
    [api::ports::BALANCER_METRICS, api::ports::LOGMON_METRICS]
        .map(|port| api::ports::local_addr(node_address, port).to_string())
        .to_vec()
}

/// The server's shared state from its configuration.
fn context(config: Config, peers: Option<peer::PeerClient>) -> Arc<Ctx> {
    Arc::new(Ctx {
        cluster: config.cluster,
        node: config.node,
        socket: config.socket,
        scrape: config.scrape,
        scraper: scraper(),
        run_dir: config.run_dir,
        alerts: config.alerts,
        peers,
        state_dir: config.state_dir,
        update_keyring: config.update_keyring,
        upgrading: AtomicBool::new(false),
        limits: install::Limits::default(),
        settings_socket: config.settings_socket,
        auth: Mutex::new(account::AuthState::default()),
        metrics_token: Mutex::new(None),
    })
}

/// A lock that a panicked holder did not leave unusable (the tables stay consistent between
/// statements).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves the admin port until SIGTERM.
pub fn run(config: Config) -> Result<(), Error> {
    let tls = server_config(&config)?;
    let peers = match &config.tls_dir {
        Some(dir) => peer::PeerClient::from_dir(dir)?,
        None => None,
    };
    let listen = config.listen;
    let ctx = context(config, peers);
    listen_and(listen, "admin server", move |listener| async move {
        // Known before the first scrape when the settings service is up already.
        tokio::spawn(account::refresh_metrics_token(ctx.clone()));
        serve_full(listener, tls, ctx).await
    })
}

/// Runs `serve` on a single-thread runtime with a listener bound to `listen`, until it
/// returns. `what` names the server in errors and the log.
pub(crate) fn listen_and<F, Fut>(
    listen: std::net::SocketAddr,
    what: &str,
    serve: F,
) -> Result<(), Error>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Server {
            what: format!("starting the {what}'s runtime"),
            source,
        })?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Server {
                what: format!("binding {listen}"),
                source,
            })?;
        tracing::info!(%listen, "{what} listening");
        serve(listener).await
    })
}

/// Serves the full admin port (after setup) on `listener`.
async fn serve_full(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<Ctx>,
) -> Result<(), Error> {
    let cluster = ctx.cluster.clone();
    let identify =
        move |leaf: &CertificateDer<'_>| peer_node(&cluster, leaf).map(|n| n.name.clone());
    let handler = move |req, client, peer: Option<String>| {
        let ctx = ctx.clone();
        async move { route(&ctx, req, client, peer.as_deref()).await }
    };
    serve(listener, tls, identify, handler).await
}

/// TLS for the admin port: the node certificate from the seed with optional client
/// certificates verified against the cluster CA, or a self-signed one on a developer machine.
fn server_config(config: &Config) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let tls = match &config.tls_dir {
        Some(dir) => {
            let certs = load_certs(&dir.join(NODE_CERT))?;
            let key = load_key(&dir.join(NODE_KEY))?;
            let mut roots = rustls::RootCertStore::empty();
            for ca in load_certs(&dir.join(CA_CERT))? {
                roots.add(ca)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
        None => {
            let dir = config.state_dir.join(ADMIN_STATE_DIR).join("tls");
            let (cert, key) = self_signed(&dir, &config.cluster, &config.node)?;
            builder
                .with_no_client_auth()
                .with_single_cert(load_certs(&cert)?, load_key(&key)?)?
        }
    };
    Ok(http1_only(tls))
}

/// TLS with a certificate and key and no client certificates (the wizard's port).
fn plain_server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    Ok(http1_only(tls))
}

fn http1_only(mut tls: rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(tls)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let invalid = |detail: String| Error::Invalid {
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(format!("reading: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("parsing: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no certificate in it".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        detail: format!("no private key: {e}"),
    })
}

/// Made once and kept: the key never changes under a browser that accepted it.
fn self_signed(dir: &Path, cluster: &Cluster, node: &Node) -> Result<(PathBuf, PathBuf), Error> {
    let (cert, key) = (dir.join("admin.crt"), dir.join("admin.key"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    let names = vec![
        node.name.clone(),
        node.address.to_string(),
        format!("{}.{}", node.name, cluster.domain),
    ];
    let generated = rcgen::generate_simple_self_signed(names)?;
    api::fsio::write_atomic(
        &key,
        generated.key_pair.serialize_pem().as_bytes(),
        0o600,
        None,
    )
    .map_err(Error::io("writing", &key))?;
    api::fsio::write_atomic(&cert, generated.cert.pem().as_bytes(), 0o644, None)
        .map_err(Error::io("writing", &cert))?;
    Ok((cert, key))
}

/// Accepts TLS connections until SIGTERM and hands each request to `route` with the client's
/// address and the peer node its certificate names (`identify`).
async fn serve<I, R, F>(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    identify: I,
    route: R,
) -> Result<(), Error>
where
    I: Fn(&CertificateDer<'_>) -> Option<String> + Send + Sync + 'static,
    R: Fn(Request<Incoming>, SocketAddr, Option<String>) -> F + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    let (identify, route) = (Arc::new(identify), Arc::new(route));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| Error::Server {
            what: "watching SIGTERM".into(),
            source,
        })?;
    // On SIGTERM the connections finish the request they serve (the wizard's last answer is
    // the done page, and PID 1 stops the wizard as soon as the settings are stored).
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = term.recv() => break,
        };
        let acceptor = acceptor.clone();
        let (identify, route) = (identify.clone(), route.clone());
        let mut stop = stop.clone();
        connections.spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            // rustls verified the chain up to the cluster CA; the leaf must also name a node.
            let peer_name = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| identify(leaf));
            let service = hyper::service::service_fn(move |req| {
                let answer = route(req, peer, peer_name.clone());
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service);
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                () = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, "admin connection: {e}");
            }
        });
    }
    tracing::info!("admin server stopping");
    let _ = stopping.send(true);
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            open = connections.len(),
            "connections still open at the end of the grace period: closed"
        );
    }
    Ok(())
}

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    for (name, value) in [
        (hyper::header::CONTENT_TYPE, content_type),
        (hyper::header::CACHE_CONTROL, "no-store"),
        (hyper::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (hyper::header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
        // No page of this port is ever framed (clickjacking of the forms) or leaks its URL.
        (hyper::header::X_FRAME_OPTIONS, "DENY"),
        (hyper::header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, hyper::header::HeaderValue::from_static(value));
    }
    resp
}

/// A page.
fn html(status: StatusCode, body: String) -> Resp {
    reply(status, "text/html; charset=utf-8", body)
}

/// `303 See Other` to `location` (a path of this port).
fn see_other(location: &'static str) -> Resp {
    let mut resp = reply(
        StatusCode::SEE_OTHER,
        "text/plain",
        format!("see {location}\n"),
    );
    resp.headers_mut().insert(
        hyper::header::LOCATION,
        hyper::header::HeaderValue::from_static(location),
    );
    resp
}

/// Adds a header whose value this server made (a cookie, a number); one that is not a valid
/// header value is left out rather than sent broken.
fn with_header(mut resp: Resp, name: hyper::header::HeaderName, value: &str) -> Resp {
    match hyper::header::HeaderValue::from_str(value) {
        Ok(value) => {
            resp.headers_mut().append(name, value);
        }
        Err(_) => tracing::warn!(%name, "not a header value; left out"),
    }
    resp
}

/// The node of `cluster` that a client certificate (already verified against the cluster CA)
/// names in its subject alternative names: a DNS name equal to the node's name, or an IP
/// address equal to its address. The common name is not looked at, nor are wildcards matched
/// (a node's name is one label).
fn peer_node<'c>(cluster: &'c Cluster, leaf: &CertificateDer<'_>) -> Option<&'c Node> {
    use rustls::pki_types::ServerName;
    let cert = rustls::server::ParsedCertificate::try_from(leaf).ok()?;
    let names = |name: ServerName<'_>| rustls::client::verify_server_name(&cert, &name).is_ok();
    cluster.nodes.iter().find(|node| {
        let by_name = ServerName::try_from(node.name.as_str()).is_ok_and(&names);
        let by_address = names(ServerName::IpAddress(
            std::net::IpAddr::V4(node.address).into(),
        ));
        by_name || by_address
    })
}

async fn route(
    ctx: &Arc<Ctx>,
    req: Request<Incoming>,
    client: SocketAddr,
    peer: Option<&str>,
) -> Resp {
    let path = req.uri().path().to_string();
    let path = path.as_str();
    let access = auth::access(req.method(), path);
    if access == auth::Access::Peer && peer.is_none() {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "peer API: a client certificate from the cluster CA naming a node of the cluster is required\n",
        );
    }
    let session = account::session_of(ctx, req.headers());
    let csrf = auth::Csrf::check(
        req.headers()
            .get(auth::CSRF_HEADER)
            .and_then(|v| v.to_str().ok()),
        session.as_ref().map(|s| s.csrf.as_str()),
    );
    let form_csrf = match auth::gate(access, session.is_some(), csrf) {
        auth::Gate::Serve => false,
        auth::Gate::ServeIfFormCsrf => true,
        auth::Gate::Login => return see_other("/login"),
        auth::Gate::Unauthorized => {
            return reply(StatusCode::UNAUTHORIZED, "text/plain", "log in first\n")
        }
        auth::Gate::Forbidden => {
            tracing::info!(%client, method = %req.method(), path, "refused: no session or no CSRF token");
            return reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                "refused: this needs a logged-in session and its CSRF token (X-CSRF-Token)\n",
            );
        }
    };
    match (req.method(), path) {
        (&Method::GET, "/login") => {
            return account::login_page(ctx, req.headers(), session.is_some())
        }
        (&Method::POST, "/login") => return account::login(ctx, req, client).await,
        (&Method::POST, "/logout") => return account::logout(ctx, req, session, form_csrf).await,
        (&Method::GET, "/settings") => return account::settings_page(ctx, session).await,
        (&Method::POST, "/settings") => {
            return account::settings_post(ctx, req, session, form_csrf).await
        }
        (&Method::GET, "/api/session") => return account::session_json(session.as_ref()),
        (&Method::GET, "/setup") => return see_other("/login"),
        (&Method::GET, "/api/setup/status") => {
            return account::setup_status(&ctx.settings_socket).await
        }
        (_, "/metrics") => {
            if let Err(refused) = account::metrics_allowed(ctx, req.headers()).await {
                return refused;
            }
        }
        _ => {}
    }
    if path == SIGNAL_PATH {
        if req.method() != Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only POST\n");
        }
        let query = req.uri().query().unwrap_or("").to_string();
        let ctx = ctx.clone();
        let peer = peer.unwrap_or_default().to_string();
        return blocking(move || peer_signal(&ctx, &query, &peer)).await;
    }
    if path == BOOT_ONCE_PATH {
        if req.method() != Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only POST\n");
        }
        let query = req.uri().query().unwrap_or("").to_string();
        let socket = ctx.update_socket();
        tracing::info!(%client, %query, "boot-once request");
        return blocking(move || {
            let answer = match install::parse_boot_once(&query) {
                Ok(request) => match install::request_once(&socket, &request) {
                    Ok(event) => install::answer_for(&event),
                    Err(e) => install::Answer::error(StatusCode::SERVICE_UNAVAILABLE, e),
                },
                Err(e) => install::Answer::error(StatusCode::BAD_REQUEST, e),
            };
            reply(answer.status, "application/json", answer.json)
        })
        .await;
    }
    if let INSTALL_PATH | peer::UPDATE_PATH | CLUSTER_UPGRADE_PATH = path {
        if req.method() != Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only POST\n");
        }
        let path = path.to_string();
        let (head, mut body) = req.into_parts();
        let answer = match path.as_str() {
            CLUSTER_UPGRADE_PATH => start_cluster_upgrade(ctx, &head, &mut body).await,
            INSTALL_PATH => upload(ctx, &head, &mut body, format!("upload from {client}")).await,
            _ => {
                let origin = format!("peer {}", peer.unwrap_or_default());
                upload(ctx, &head, &mut body, origin).await
            }
        };
        if !matches!(
            answer.status,
            StatusCode::OK
                | StatusCode::ACCEPTED
                | StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::REQUEST_TIMEOUT
        ) {
            // Refused while the client may still be sending: read the rest (within the
            // limits), since a client reads no answer before it has sent its body.
            install::drain(&mut body, ctx.limits).await;
        }
        return reply(answer.status, "application/json", answer.json);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    let ctx = ctx.clone();
    let csrf = session.map(|s| s.csrf).unwrap_or_default();
    match req.uri().path() {
        "/" => {
            blocking(move || {
                let view = gather(&ctx);
                html(StatusCode::OK, page::render(&view, &csrf))
            })
            .await
        }
        "/api/status" => {
            blocking(move || {
                let view = gather(&ctx);
                let json =
                    serde_json::to_string_pretty(&StatusJson::from(&view)).unwrap_or_default();
                reply(StatusCode::OK, "application/json", json)
            })
            .await
        }
        "/metrics" => {
            blocking(move || {
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics(&ctx),
                )
            })
            .await
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/api/peer/ping" => reply(
            StatusCode::OK,
            "text/plain",
            format!("pong from {}\n", ctx.node.name),
        ),
        peer::UPDATE_STATUS_PATH => match ctx.update_status() {
            Ok(status) => reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&status).unwrap_or_default(),
            ),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        peer::HEALTH_PATH => {
            blocking(move || {
                let health = node_health(&ctx);
                reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string(&health).unwrap_or_default(),
                )
            })
            .await
        }
        peer::VIP_PATH => match peer::own_vip(&ctx.run_dir.join(api::vip::RUN_SUBDIR)) {
            Ok(status) => reply(StatusCode::OK, "application/json", status.to_json()),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// `POST /api/update/install?force=0|1&reboot=0|1&trial_timeout=SECS`: the request body is a
/// bundle, streamed into this node's update service as it arrives.
const INSTALL_PATH: &str = "/api/update/install";
/// `POST /api/update/boot-once?slot=a|b&reboot=0|1`: boot the slot once at the next boot (to
/// try the other slot by hand); the default stays.
const BOOT_ONCE_PATH: &str = "/api/update/boot-once";
/// `POST /api/cluster/upgrade?trial_timeout=SECS`: the request body is a bundle, spooled
/// (verified as it streams) and rolled out to the cluster in the background.
const CLUSTER_UPGRADE_PATH: &str = "/api/cluster/upgrade";

/// An install of the request's body through the update socket; `origin` names the client.
async fn upload(
    ctx: &Ctx,
    head: &hyper::http::request::Parts,
    body: &mut Incoming,
    origin: String,
) -> install::Answer {
    let query = match install::parse_query(head.uri.query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return install::Answer::error(StatusCode::BAD_REQUEST, e),
    };
    let size = match install::declared_size(&head.headers, ctx.limits) {
        Ok(size) => size,
        Err(answer) => return answer,
    };
    tracing::info!(%origin, ?size, force = query.force, reboot = query.reboot, "bundle upload");
    let request = api::update::Request::Install {
        force: query.force,
        reboot: query.reboot,
        trial_timeout_secs: query.trial_timeout_secs,
        size,
        origin: origin.clone(),
    };
    let answer = install::stream_install(&ctx.update_socket(), &request, body, ctx.limits).await;
    tracing::info!(%origin, status = %answer.status, "bundle upload: {}", answer.json);
    answer
}

/// Spools the request's bundle and starts the cluster upgrade on a thread (one at a time).
async fn start_cluster_upgrade(
    ctx: &Arc<Ctx>,
    head: &hyper::http::request::Parts,
    body: &mut Incoming,
) -> install::Answer {
    if ctx.upgrading.swap(true, Ordering::SeqCst) {
        return install::Answer::error(
            StatusCode::CONFLICT,
            "a cluster upgrade is already running",
        );
    }
    let answer = spool_and_start(ctx, head, body).await;
    if answer.status != StatusCode::ACCEPTED {
        ctx.upgrading.store(false, Ordering::SeqCst);
    }
    answer
}

async fn spool_and_start(
    ctx: &Arc<Ctx>,
    head: &hyper::http::request::Parts,
    body: &mut Incoming,
) -> install::Answer {
    use install::Answer;
    let query = match install::parse_query(head.uri.query().unwrap_or("")) {
        Ok(q) if !q.force && !q.reboot => q,
        Ok(_) => {
            return Answer::error(
                StatusCode::BAD_REQUEST,
                "a cluster upgrade takes only trial_timeout (every node reboots; no force)",
            )
        }
        Err(e) => return Answer::error(StatusCode::BAD_REQUEST, e),
    };
    if let Err(answer) = install::declared_size(&head.headers, ctx.limits) {
        return answer;
    }
    let trial = query
        .trial_timeout_secs
        .unwrap_or(api::update::DEFAULT_TRIAL_TIMEOUT_SECS);
    let dir = upgrade::upgrade_dir(&ctx.state_dir);
    if let Err(e) = private_dir(&dir) {
        return Answer::error(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    let keys = match update::keys::read_keyring(&ctx.update_keyring) {
        Ok(keys) => keys,
        Err(e) => return Answer::error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let running = ctx.update_status().ok().map(|s| s.version);
    let dest = dir.join(upgrade::SPOOL_FILE);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let spool_dest = dest.clone();
    // A thread of its own, at a low priority: the verification must not starve the node's
    // services (nor this server's runtime).
    let (done_tx, verifier) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("spool".into())
        .spawn(move || {
            update::lower_thread_priority();
            let running = match running.as_deref().map(update::Version::parse) {
                Some(Ok(v)) => Some(v),
                _ => None,
            };
            let policy = update::Policy {
                trusted: &keys,
                product: update::PRODUCT,
                compatible: update::COMPATIBLE,
                running: running.as_ref(),
                force: false,
                known_bad: &[],
            };
            let _ = done_tx.send(install::spool_verified(
                install::ChannelReader::new(rx),
                &spool_dest,
                &policy,
            ));
        });
    if let Err(e) = spawned {
        return Answer::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("starting the spool thread: {e}"),
        );
    }
    let mut sent = 0u64;
    let cut = loop {
        match install::next_chunk(body, ctx.limits, &mut sent).await {
            Ok(Some(data)) => {
                if tx.send(data).await.is_err() {
                    // The verifier stopped reading: it refused the bundle.
                    break None;
                }
            }
            Ok(None) => break None,
            Err(end) => break Some(end),
        }
    };
    drop(tx);
    let verified = verifier.await;
    if let Some(end) = cut {
        // The verifier saw a truncated bundle and removed its temporary file.
        return install::body_end_answer(end, ctx.limits);
    }
    let version = match verified {
        Ok(Ok(version)) => version,
        Ok(Err(e)) => return Answer::error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(e) => return Answer::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    tracing::info!(%version, bytes = sent, "cluster upgrade: bundle spooled and verified");
    let state_file = upgrade::state_file(&ctx.state_dir);
    let thread_ctx = ctx.clone();
    let thread_version = version.clone();
    let started = std::thread::Builder::new()
        .name("cluster-upgrade".into())
        .spawn(move || {
            let ctx = thread_ctx;
            let socket = ctx.update_socket();
            let mut fleet = upgrade::Live {
                cluster: &ctx.cluster,
                peers: ctx.peers.as_ref(),
                bundle: &dest,
                update_socket: &socket,
                trial_timeout_secs: trial,
            };
            let end = upgrade::run_recorded(
                &mut fleet,
                &ctx.cluster,
                &ctx.node,
                &thread_version,
                trial,
                Some(&state_file),
                &mut |state| tracing::info!("cluster upgrade: {}", state.message),
            );
            tracing::info!("cluster upgrade ended: {}", end.message);
            ctx.upgrading.store(false, Ordering::SeqCst);
        });
    match started {
        Ok(_) => Answer {
            status: StatusCode::ACCEPTED,
            json: serde_json::json!({
                "version": version,
                "bytes": sent,
                "message": format!("upgrading the cluster to {version}; progress in /api/status"),
            })
            .to_string(),
        },
        Err(e) => Answer::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Makes `dir` (and its parents) and narrows it to 0700.
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| format!("making {}: {e}", dir.display()))
}

/// This node's health for the peer API: every supervised service ready.
fn node_health(ctx: &Ctx) -> peer::NodeHealth {
    match services(ctx) {
        Ok(services) => peer::NodeHealth {
            node: ctx.node.name.clone(),
            not_ready: services
                .into_iter()
                .filter(|s| !s.ready)
                .map(|s| s.name)
                .collect(),
            error: None,
        },
        Err(e) => peer::NodeHealth {
            node: ctx.node.name.clone(),
            not_ready: Vec::new(),
            error: Some(e),
        },
    }
}

/// `POST /api/peer/signal?service=NAME&signal=SIG`: a peer (the cluster's own tooling: rolling
/// upgrades, fault drills) signals one of this node's services through the supervisor.
const SIGNAL_PATH: &str = "/api/peer/signal";

fn peer_signal(ctx: &Ctx, query: &str, peer: &str) -> Resp {
    let param = |key: &str| {
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then(|| v.to_string())
        })
    };
    let (Some(service), Some(signal)) = (param("service"), param("signal")) else {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "expected ?service=NAME&signal=SIG\n",
        );
    };
    tracing::warn!(%service, %signal, %peer, "signal requested by a peer");
    match ctl::request(
        &ctx.socket,
        &ctl::Request::Signal {
            service: service.clone(),
            signal: signal.clone(),
        },
    ) {
        Ok(_) => reply(
            StatusCode::OK,
            "text/plain",
            format!("sent {signal} to {service}\n"),
        ),
        Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
    }
}

/// Runs `f` off the runtime's thread (it waits on sockets and files). A panic in it is a bug;
/// the request then gets a 500 and the server goes on.
async fn blocking(f: impl FnOnce() -> Resp + Send + 'static) -> Resp {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        tracing::error!("admin worker failed: {e}");
        reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "internal error\n",
        )
    })
}

fn services(ctx: &Ctx) -> Result<Vec<ServiceStatus>, String> {
    match ctl::request(&ctx.socket, &ctl::Request::Status) {
        Ok(ctl::Response::Status { services }) => Ok(services),
        Ok(ctl::Response::Error { message }) => Err(message),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn gather(ctx: &Ctx) -> StatusView {
    let own = peer::own_vip(&ctx.run_dir.join(api::vip::RUN_SUBDIR));
    let views = peer::vip_views(&ctx.cluster, &ctx.node, own, ctx.peers.as_ref());
    let nodes = ctx
        .cluster
        .nodes
        .iter()
        .map(|n| NodeRow {
            name: n.name.clone(),
            address: n.address.to_string(),
            db_role: n.db_role.as_str().to_string(),
            this_node: n.name == ctx.node.name,
            vip: views.iter().find(|(name, _)| *name == n.name).map_or(
                "?".into(),
                |(_, v)| match v {
                    Ok(s) => s.state.map_or("unknown", |st| st.as_str()).to_string(),
                    Err(_) => "no answer".to_string(),
                },
            ),
        })
        .collect();
    let mut facts = vec![(
        "floating IP".to_string(),
        peer::holder_line(&ctx.cluster.floating_ip.to_string(), &views),
    )];
    facts.extend(db_facts(&ctx.run_dir.join(api::db::STATUS_FILE)));
    for endpoint in &ctx.scrape {
        if let Ok(text) = scrape(&ctx.scraper, endpoint) {
            facts.extend(backend_facts(&text));
        }
    }
    let alerts = match (ctx.alerts)(PAGE_ALERTS) {
        Ok(alerts) => alerts.into_iter().map(alert_row).collect(),
        Err(e) => {
            tracing::debug!("reading alerts: {e}");
            Vec::new()
        }
    };
    StatusView {
        cluster: ctx.cluster.name.clone(),
        node: ctx.node.name.clone(),
        vip: views.into_iter().map(|(n, v)| (n, v.ok())).collect(),
        nodes,
        services: services(ctx),
        alerts,
        facts,
        degraded: api::storage::Degraded::read_all(&ctx.run_dir),
        update: ctx.update_status(),
        cluster_upgrade: ctx.cluster_upgrade(),
        now_unix_ms: unix_ms(),
    }
}

fn alert_row(a: Alert) -> AlertRow {
    AlertRow {
        rule: a.rule,
        subject: a.subject,
        state: a.state,
        since: utc_time(a.resolved_ms.unwrap_or(a.fired_ms)),
        message: a.message,
    }
}

/// `HH:MM:SS` UTC of a Unix time in milliseconds (the page says UTC).
fn utc_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// The balancer's view of each backend, from its `tandem_balancer_backend_up` series (pure).
fn backend_facts(metrics: &str) -> Vec<(String, String)> {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("tandem_balancer_backend_up{")?;
            let (labels, value) = rest.split_once("} ")?;
            let backend = labels
                .split(',')
                .find_map(|l| l.strip_prefix("backend=\""))?
                .trim_end_matches('"');
            let state = if value.trim() == "1" { "up" } else { "DOWN" };
            Some((format!("balancer → {backend}"), state.to_string()))
        })
        .collect()
}

/// What the database agent last published about this node's MariaDB.
fn db_facts(status_file: &Path) -> Vec<(String, String)> {
    let status = match std::fs::read_to_string(status_file)
        .map_err(|e| e.to_string())
        .and_then(|t| api::db::AgentStatus::parse(&t))
    {
        Ok(status) => status,
        Err(e) => return vec![("database".into(), format!("no status from the agent ({e})"))],
    };
    let mut facts = vec![
        (
            "database role".to_string(),
            status.role.as_str().to_string(),
        ),
        (
            "database primary".to_string(),
            format!("{} ({})", status.primary.name, status.primary.address),
        ),
        (
            "database health".to_string(),
            if status.healthy {
                "healthy".into()
            } else {
                "UNHEALTHY".into()
            },
        ),
    ];
    if let Some(lag) = status.lag_s {
        facts.push(("replication lag".into(), format!("{lag}s")));
    }
    if let Some(error) = status.error {
        facts.push(("database error".into(), error));
    }
    facts
}

#[derive(Serialize)]
struct StatusJson<'a> {
    cluster: &'a str,
    node: &'a str,
    services: Option<&'a [ServiceStatus]>,
    error: Option<&'a str>,
    /// Every node's view of the floating IP (`null`: no answer).
    vip: &'a [(String, Option<api::vip::VipStatus>)],
    /// Why the node runs degraded; empty when it does not.
    degraded: &'a [api::storage::Degraded],
    /// The update service's status, or why it could not be read.
    update: UpdateJson<'a>,
    /// The last cluster upgrade's record (`null`: none ever ran here).
    cluster_upgrade: Option<&'a upgrade::UpgradeState>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum UpdateJson<'a> {
    Status(&'a UpdateStatus),
    Error(&'a str),
}

impl<'a> From<&'a StatusView> for StatusJson<'a> {
    fn from(v: &'a StatusView) -> Self {
        StatusJson {
            cluster: &v.cluster,
            node: &v.node,
            vip: &v.vip,
            degraded: &v.degraded,
            update: match &v.update {
                Ok(status) => UpdateJson::Status(status),
                Err(e) => UpdateJson::Error(e),
            },
            cluster_upgrade: v.cluster_upgrade.as_ref(),
            services: v.services.as_ref().ok().map(Vec::as_slice),
            error: v.services.as_ref().err().map(String::as_str),
        }
    }
}

/// The supervisor's own metrics, then each local endpoint's text, with a `tandem_scrape_up`
/// gauge per endpoint so a missing one is visible rather than silently absent.
fn metrics(ctx: &Ctx) -> String {
    let services = services(ctx).ok();
    let memory = Memory::read(services.as_deref());
    let mut out = supervisor_metrics(&ctx.node.name, services.as_deref(), &memory);
    let mut up = String::from("# HELP tandem_scrape_up Whether a local metrics endpoint answered.\n# TYPE tandem_scrape_up gauge\n");
    for endpoint in &ctx.scrape {
        match scrape(&ctx.scraper, endpoint) {
            Ok(text) => {
                up.push_str(&format!("tandem_scrape_up{{endpoint=\"{endpoint}\"}} 1\n"));
                out.push_str(&text);
                if !text.ends_with('\n') {
                    out.push('\n');
                }
            }
            Err(e) => {
                tracing::debug!(%endpoint, "scrape: {e}");
                up.push_str(&format!("tandem_scrape_up{{endpoint=\"{endpoint}\"}} 0\n"));
            }
        }
    }
    out.push_str(&up);
    out.push_str(&update_metrics(&ctx.update_status()));
    out
}

/// Prometheus text for the update state (pure); nothing when there is no status.
fn update_metrics(status: &Result<UpdateStatus, String>) -> String {
    let Ok(status) = status else {
        return String::new();
    };
    let label = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let (done, total) = status
        .install
        .as_ref()
        .map_or((0, 0), |i| (i.done, i.total));
    format!(
        "# HELP tandem_version_info The running image's version and booted slot.\n\
         # TYPE tandem_version_info gauge\n\
         tandem_version_info{{version=\"{}\",slot=\"{}\"}} 1\n\
         # HELP tandem_update_boot_blessed Whether the booted slot is blessed (not on trial).\n\
         # TYPE tandem_update_boot_blessed gauge\n\
         tandem_update_boot_blessed {}\n\
         # HELP tandem_update_install_bytes The current or last install's verified bytes.\n\
         # TYPE tandem_update_install_bytes gauge\n\
         tandem_update_install_bytes{{kind=\"done\"}} {done}\n\
         tandem_update_install_bytes{{kind=\"total\"}} {total}\n\
         # HELP tandem_update_bad_versions Versions that failed their trial on this node.\n\
         # TYPE tandem_update_bad_versions gauge\n\
         tandem_update_bad_versions {}\n",
        label(&status.version),
        label(&status.booted_slot),
        u8::from(status.boot == api::update::Boot::Blessed),
        status.bad_versions.len()
    )
}

/// Resident memory of the supervisor and of each service's main process, from
/// `/proc/<pid>/status` (world-readable; a process that ended in between is left out).
#[derive(Debug, Default)]
struct Memory {
    supervisor: Option<Resident>,
    services: std::collections::BTreeMap<String, Resident>,
}

/// Bytes: all resident pages (`VmRSS`), and the process's own anonymous ones (`RssAnon`; the
/// rest are mostly program pages shared with every process of the same binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resident {
    total: u64,
    anon: u64,
}

impl Memory {
    fn read(services: Option<&[ServiceStatus]>) -> Memory {
        // The admin server is the supervisor's child (PID 1 on an image).
        let supervisor = resident_bytes(nix::unistd::getppid().as_raw());
        let services = services
            .unwrap_or_default()
            .iter()
            .filter_map(|s| Some((s.name.clone(), resident_bytes(s.pid?)?)))
            .collect();
        Memory {
            supervisor,
            services,
        }
    }
}

fn resident_bytes(pid: i32) -> Option<Resident> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Resident {
        total: status_bytes(&text, "VmRSS:")?,
        anon: status_bytes(&text, "RssAnon:")?,
    })
}

/// A `Key:     1234 kB` line of a `/proc/<pid>/status` text, in bytes.
fn status_bytes(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib * 1024)
}

/// Prometheus text for the supervised services (pure).
fn supervisor_metrics(node: &str, services: Option<&[ServiceStatus]>, memory: &Memory) -> String {
    let mut s = String::new();
    s.push_str(
        "# HELP tandem_supervisor_up Whether the supervisor answered on its control socket.\n",
    );
    s.push_str("# TYPE tandem_supervisor_up gauge\n");
    s.push_str(&format!(
        "tandem_supervisor_up{{node=\"{node}\"}} {}\n",
        u8::from(services.is_some())
    ));
    if let Some(r) = memory.supervisor {
        s.push_str("# HELP tandem_supervisor_resident_bytes The supervisor's resident memory.\n# TYPE tandem_supervisor_resident_bytes gauge\n");
        s.push_str(&format!(
            "tandem_supervisor_resident_bytes{{node=\"{node}\"}} {}\n",
            r.total
        ));
        s.push_str("# HELP tandem_supervisor_anon_bytes The supervisor's own resident memory (anonymous: not its program's pages).\n# TYPE tandem_supervisor_anon_bytes gauge\n");
        s.push_str(&format!(
            "tandem_supervisor_anon_bytes{{node=\"{node}\"}} {}\n",
            r.anon
        ));
    }
    let Some(services) = services else { return s };
    if !memory.services.is_empty() {
        s.push_str("# HELP tandem_supervisor_service_resident_bytes Resident memory of the service's main process (its children, e.g. nginx's workers, not counted).\n# TYPE tandem_supervisor_service_resident_bytes gauge\n");
        for (name, r) in &memory.services {
            s.push_str(&format!(
                "tandem_supervisor_service_resident_bytes{{node=\"{node}\",service=\"{name}\"}} {}\n",
                r.total
            ));
        }
        s.push_str("# HELP tandem_supervisor_service_anon_bytes Anonymous resident memory of the service's main process.\n# TYPE tandem_supervisor_service_anon_bytes gauge\n");
        for (name, r) in &memory.services {
            s.push_str(&format!(
                "tandem_supervisor_service_anon_bytes{{node=\"{node}\",service=\"{name}\"}} {}\n",
                r.anon
            ));
        }
    }
    s.push_str("# HELP tandem_supervisor_service_running Whether the service has a running process.\n# TYPE tandem_supervisor_service_running gauge\n");
    for svc in services {
        s.push_str(&format!(
            "tandem_supervisor_service_running{{node=\"{node}\",service=\"{}\"}} {}\n",
            svc.name,
            u8::from(svc.pid.is_some())
        ));
    }
    s.push_str("# HELP tandem_supervisor_service_ready Whether the service passed its readiness check.\n# TYPE tandem_supervisor_service_ready gauge\n");
    for svc in services {
        s.push_str(&format!(
            "tandem_supervisor_service_ready{{node=\"{node}\",service=\"{}\"}} {}\n",
            svc.name,
            u8::from(svc.ready)
        ));
    }
    s.push_str("# HELP tandem_supervisor_service_restarts_total Restarts since the supervisor started.\n# TYPE tandem_supervisor_service_restarts_total counter\n");
    for svc in services {
        s.push_str(&format!(
            "tandem_supervisor_service_restarts_total{{node=\"{node}\",service=\"{}\"}} {}\n",
            svc.name, svc.restarts
        ));
    }
    s
}

/// The client of the local metrics endpoints: plain HTTP on loopback (or the node's own
/// address), never through a proxy, each GET bounded by [`SCRAPE_TIMEOUT`].
fn scraper() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(SCRAPE_TIMEOUT))
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .new_agent()
}

/// `GET http://ENDPOINT/metrics`: the body of a 200, at most [`MAX_SCRAPE_BYTES`].
fn scrape(agent: &ureq::Agent, endpoint: &str) -> Result<String, FetchError> {
    let addr: SocketAddr = endpoint
        .parse()
        .map_err(|_| FetchError::Endpoint(endpoint.to_string()))?;
    get_text(agent, format!("http://{addr}/metrics"), MAX_SCRAPE_BYTES)
}

/// `GET url` with `agent` (its `http_status_as_error` off): the body of a 200, at most `limit`
/// bytes; another status is an error carrying the start of its body. The one HTTP GET of the
/// admin crate: the metrics scrape and the peer client both use it.
fn get_text(agent: &ureq::Agent, url: String, limit: u64) -> Result<String, FetchError> {
    let request = |source| FetchError::Request {
        url: url.clone(),
        source,
    };
    let mut resp = agent.get(&url).call().map_err(request)?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_string()
        .map_err(request)?;
    match status {
        200 => Ok(body),
        _ => Err(FetchError::Status {
            url,
            status,
            body: body.trim().chars().take(200).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_health_comes_from_the_balancer_metrics() {
        let text = "# TYPE tandem_balancer_backend_up gauge\n\
                    tandem_balancer_backend_up{backend=\"server1\",addr=\"10.88.0.11:8080\"} 1\n\
                    tandem_balancer_backend_up{backend=\"server2\",addr=\"10.88.0.12:8080\"} 0\n\
                    tandem_balancer_backend_requests_total{backend=\"server1\",addr=\"10.88.0.11:8080\"} 5\n";
        assert_eq!(
            backend_facts(text),
            vec![
                ("balancer → server1".to_string(), "up".to_string()),
                ("balancer → server2".to_string(), "DOWN".to_string())
            ]
        );
    }

    #[test]
    fn supervisor_metrics_are_labelled_per_service() {
        let services = vec![ServiceStatus {
            name: "nginx".into(),
            state: "running".into(),
            pid: Some(7),
            restarts: 2,
            last_exit: None,
            uptime_s: Some(1),
            ready: true,
        }];
        let memory = Memory {
            supervisor: Some(Resident {
                total: 9 << 20,
                anon: 4 << 20,
            }),
            services: [(
                "nginx".to_string(),
                Resident {
                    total: 3 << 20,
                    anon: 1 << 20,
                },
            )]
            .into(),
        };
        let text = supervisor_metrics("server1", Some(&services), &memory);
        assert!(text.contains(
            "tandem_supervisor_service_restarts_total{node=\"server1\",service=\"nginx\"} 2\n"
        ));
        assert!(text
            .contains("tandem_supervisor_service_running{node=\"server1\",service=\"nginx\"} 1\n"));
        assert!(text.contains("tandem_supervisor_resident_bytes{node=\"server1\"} 9437184\n"));
        assert!(text.contains("tandem_supervisor_anon_bytes{node=\"server1\"} 4194304\n"));
        assert!(text.contains(
            "tandem_supervisor_service_anon_bytes{node=\"server1\",service=\"nginx\"} 1048576\n"
        ));
        assert!(text.contains(
            "tandem_supervisor_service_resident_bytes{node=\"server1\",service=\"nginx\"} 3145728\n"
        ));
        assert!(supervisor_metrics("server1", None, &Memory::default())
            .contains("tandem_supervisor_up{node=\"server1\"} 0"));
        // This process's own, as the admin server reads the supervisor's and the services'.
        assert!(resident_bytes(std::process::id() as i32)
            .is_some_and(|r| r.total > 1 << 20 && r.anon > 0 && r.anon < r.total));
        assert_eq!(
            status_bytes("Name:\tx\nVmRSS:\t    1234 kB\n", "VmRSS:"),
            Some(1234 * 1024)
        );
        assert_eq!(status_bytes("Name:\tkthreadd\n", "VmRSS:"), None);
    }

    /// A local HTTP server answering `/metrics` with `status` and `body` (404 elsewhere).
    fn metrics_endpoint(status: u16, body: Vec<u8>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let body = body.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let (status, body) = match req.uri().path() {
                                "/metrics" => (status, body.clone()),
                                _ => (404, b"not found\n".to_vec()),
                            };
                            async move {
                                let mut resp = Response::new(Full::new(Bytes::from(body)));
                                *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                                Ok::<_, Infallible>(resp)
                            }
                        });
                        let io = hyper_util::rt::TokioIo::new(tcp);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
        });
        addr
    }

    #[test]
    fn a_scrape_takes_the_body_of_a_200_and_names_what_failed() {
        let agent = scraper();
        let text = "# TYPE tandem_x gauge\ntandem_x 1\n";
        let ok = metrics_endpoint(200, text.as_bytes().to_vec());
        assert_eq!(scrape(&agent, &ok.to_string()).unwrap(), text);

        let failing = metrics_endpoint(503, b"draining\n".to_vec());
        let e = scrape(&agent, &failing.to_string()).unwrap_err();
        assert!(
            matches!(&e, FetchError::Status { status: 503, body, .. } if body == "draining"),
            "{e}"
        );
        assert!(
            e.to_string().contains(&format!("http://{failing}/metrics")),
            "{e}"
        );

        let huge = metrics_endpoint(200, vec![b'#'; MAX_SCRAPE_BYTES as usize + 1]);
        let e = scrape(&agent, &huge.to_string()).unwrap_err();
        assert!(matches!(e, FetchError::Request { .. }), "{e}");

        // Nothing listens there any more once the listener is dropped.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = scrape(&agent, &closed.to_string()).unwrap_err();
        assert!(matches!(e, FetchError::Request { .. }), "{e}");

        let e = scrape(&agent, "localhost").unwrap_err();
        assert_eq!(e.to_string(), "`localhost` is not host:port");
    }
}
