//! `appliance admin`: the node's HTTPS admin port — status page, status JSON, the aggregated
//! Prometheus endpoint, and the peer API that only other nodes may call: mutual TLS with a
//! client certificate signed by the cluster CA whose subject alternative names name a node of
//! the cluster (its name or its address). Any other certificate the CA signed (an operator's
//! tool, or one made for another purpose) is no peer.
//!
//! It runs as its own supervised child and learns everything over the supervisor's control
//! socket and the other services' local metrics endpoints, so a bug here never touches PID 1.

pub mod page;

use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use cluster_config::{Cluster, Node};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use crate::control::{self, Target};
use api::control::{self as ctl, ServiceStatus, SOCKET_FILE};
use crate::args::NodeArgs;
use crate::peer::{CA_CERT, NODE_CERT, NODE_KEY};
use page::{AlertRow, NodeRow, StatusView};

/// The admin server's own directory in the node's state directory (its self-signed certificate
/// on a machine without a seed), owned by the admin server's user.
pub const STATE_SUBDIR: &str = "admin";
/// Local metrics endpoints scraped into `/metrics` (balancer, log monitor) by default.
pub const DEFAULT_SCRAPE: [&str; 2] = ["127.0.0.1:9100", "127.0.0.1:9101"];
/// A scrape that takes longer is skipped (and counted as down) for this request.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);
/// Largest metrics text accepted from one local endpoint.
const MAX_SCRAPE_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// The node's state directory (the supervisor's socket and state DB are there).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The supervisor's control socket [default: STATE_DIR/control.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Directory with `node.crt`, `node.key` and `ca.crt` (the seed's on an image); without
    /// it a self-signed certificate is made once in STATE_DIR/admin/tls and peers cannot call
    /// in.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Listen here instead of the node's address and admin port.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The node's runtime directory (the database agent's status file is there)
    /// [default: STATE_DIR/run, or /run/tandem on an image].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Local Prometheus endpoints to aggregate (host:port, path /metrics).
    #[arg(long = "scrape", default_values_t = DEFAULT_SCRAPE.map(String::from))]
    pub scrape: Vec<String>,
}

struct Ctx {
    cluster: Cluster,
    node: Node,
    target: Target,
    scrape: Vec<String>,
    state_dir: PathBuf,
    run_dir: PathBuf,
    /// Asks the other nodes (their floating-IP view); `None` without the seed's certificates.
    peers: Option<crate::peer::PeerClient>,
}

/// Alerts shown on the page.
const PAGE_ALERTS: usize = 15;

pub fn main(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let (cluster, node) = args.node.load()?;
    let listen = args
        .listen
        .unwrap_or(SocketAddr::from((node.address, cluster.ports.admin)));
    let tls = server_config(&args, &cluster, &node)?;
    let target = Target {
        socket: Some(
            args.socket
                .clone()
                .unwrap_or_else(|| args.state_dir.join(SOCKET_FILE)),
        ),
        state_dir: None,
    };
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        if args.state_dir == crate::layout::Layout::image().state {
            crate::layout::Layout::image().run
        } else {
            crate::layout::Layout::dev(&args.state_dir).run
        }
    });
    let peers = match tls_dir(&args) {
        Some(dir) => crate::peer::PeerClient::from_dir(&dir)?,
        None => None,
    };
    let ctx = Arc::new(Ctx {
        cluster,
        node,
        target,
        scrape: args.scrape.clone(),
        state_dir: args.state_dir.clone(),
        run_dir,
        peers,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(listen, tls, ctx))?;
    Ok(ExitCode::SUCCESS)
}

/// TLS for the admin port: the node certificate from the seed with optional client
/// certificates verified against the cluster CA, or a self-signed one on a developer machine.
fn server_config(
    args: &AdminArgs,
    cluster: &Cluster,
    node: &Node,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match tls_dir(args) {
        Some(dir) => {
            let certs = load_certs(&dir.join(NODE_CERT))?;
            let key = PrivateKeyDer::from_pem_file(dir.join(NODE_KEY))
                .with_context(|| format!("reading {}", dir.join(NODE_KEY).display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for ca in load_certs(&dir.join(CA_CERT))? {
                roots.add(ca).context("adding the cluster CA")?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .context("client certificate verifier")?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
        None => {
            let dir = args.state_dir.join(STATE_SUBDIR).join("tls");
            let (cert, key) = self_signed(&dir, cluster, node)?;
            let certs = load_certs(&cert)?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .with_context(|| format!("reading {}", key.display()))?;
            builder.with_no_client_auth().with_single_cert(certs, key)?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `--tls-dir`, else the seed's TLS directory when it has a node certificate.
fn tls_dir(args: &AdminArgs) -> Option<PathBuf> {
    args.tls_dir
        .clone()
        .or_else(|| Some(crate::peer::seed_tls_dir()).filter(|d| d.join(NODE_CERT).exists()))
}

/// Copies a TLS directory (the seed's: root's alone) into `dir` for the admin server's user
/// `owner` (`None`: the current user). Each file is created with its final mode and owner
/// before a byte is written: the key 0600, the certificates 0644, the directory 0700.
pub fn provide_tls(from: &Path, dir: &Path, owner: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let owner = match owner {
        Some(name) => Some(
            nix::unistd::User::from_name(name)?
                .with_context(|| format!("user {name} does not exist"))?,
        ),
        None => None,
    };
    let chown = |fd: &dyn std::os::fd::AsFd, path: &Path| -> anyhow::Result<()> {
        if let Some(u) = &owner {
            nix::unistd::fchown(fd, Some(u.uid), Some(u.gid))
                .with_context(|| format!("chown {} {}", u.name, path.display()))?;
        }
        Ok(())
    };
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    chown(&std::fs::File::open(dir)?, dir)?;
    for (name, mode) in [(CA_CERT, 0o644), (NODE_CERT, 0o644), (NODE_KEY, 0o600)] {
        let source = from.join(name);
        let bytes =
            std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
        let target = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        chown(&f, &target)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(())
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it",
        path.display()
    );
    Ok(certs)
}

/// Made once and kept: the key never changes under a browser that accepted it.
fn self_signed(dir: &Path, cluster: &Cluster, node: &Node) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("admin.crt"), dir.join("admin.key"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let names = vec![
        node.name.clone(),
        node.address.to_string(),
        format!("{}.{}", node.name, cluster.domain),
    ];
    let generated =
        rcgen::generate_simple_self_signed(names).context("generating the admin certificate")?;
    crate::files::write_file(&key, &generated.key_pair.serialize_pem(), 0o600)?;
    crate::files::write_file(&cert, &generated.cert.pem(), 0o644)?;
    Ok((cert, key))
}

async fn serve(
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<Ctx>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(%listen, "admin server listening");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = term.recv() => {
                tracing::info!("admin server stopping");
                return Ok(());
            }
        };
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
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
                .and_then(|leaf| peer_node(&ctx.cluster, leaf))
                .map(|n| n.name.clone());
            let service = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                let peer_name = peer_name.clone();
                async move { Ok::<_, Infallible>(route(&ctx, req, peer_name.as_deref()).await) }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "admin connection: {e}");
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .header("strict-transport-security", "max-age=31536000")
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

/// The node of `cluster` that a client certificate (already verified against the cluster CA)
/// names in its subject alternative names: a DNS name equal to the node's name, or an IP
/// address equal to its address. The common name is not looked at, nor are wildcards matched
/// (a node's name is one label).
pub fn peer_node<'c>(cluster: &'c Cluster, leaf: &CertificateDer<'_>) -> Option<&'c Node> {
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

async fn route(ctx: &Arc<Ctx>, req: Request<Incoming>, peer: Option<&str>) -> Resp {
    let path = req.uri().path();
    if path.starts_with("/api/peer/") && peer.is_none() {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "peer API: a client certificate from the cluster CA naming a node of the cluster is required\n",
        );
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
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    let ctx = ctx.clone();
    match req.uri().path() {
        "/" => {
            let view = blocking(move || gather(&ctx)).await;
            reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page::render(&view),
            )
        }
        "/api/status" => {
            let view = blocking(move || gather(&ctx)).await;
            let json = serde_json::to_string_pretty(&StatusJson::from(&view)).unwrap_or_default();
            reply(StatusCode::OK, "application/json", json)
        }
        "/metrics" => {
            let text = blocking(move || metrics(&ctx)).await;
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/api/peer/ping" => reply(
            StatusCode::OK,
            "text/plain",
            format!("pong from {}\n", ctx.node.name),
        ),
        crate::peer::VIP_PATH => {
            match crate::peer::own_vip(&ctx.run_dir.join(api::vip::RUN_SUBDIR)) {
                Ok(status) => reply(StatusCode::OK, "application/json", status.to_json()),
                Err(e) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{e}\n"),
                ),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
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
    match control::request(
        &ctx.target,
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

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("admin worker does not panic")
}

fn services(ctx: &Ctx) -> Result<Vec<ServiceStatus>, String> {
    match control::request(&ctx.target, &ctl::Request::Status) {
        Ok(ctl::Response::Status { services }) => Ok(services),
        Ok(ctl::Response::Error { message }) => Err(message),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn gather(ctx: &Ctx) -> StatusView {
    let own = crate::peer::own_vip(&ctx.run_dir.join(api::vip::RUN_SUBDIR));
    let views = crate::peer::vip_views(&ctx.cluster, &ctx.node, own, ctx.peers.as_ref());
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
        crate::peer::holder_line(&ctx.cluster.floating_ip.to_string(), &views),
    )];
    facts.extend(db_facts(&ctx.run_dir.join(api::db::STATUS_FILE)));
    for endpoint in &ctx.scrape {
        if let Ok(text) = scrape(endpoint) {
            facts.extend(backend_facts(&text));
        }
    }
    let alerts = match logmon::alerts::recent(&logmon::alerts::db_path(&ctx.state_dir), PAGE_ALERTS)
    {
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
    }
}

fn alert_row(a: logmon::engine::Alert) -> AlertRow {
    AlertRow {
        rule: a.rule,
        subject: a.subject,
        state: a.state.as_str().to_string(),
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
pub fn backend_facts(metrics: &str) -> Vec<(String, String)> {
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
        ("database role".to_string(), status.role.as_str().to_string()),
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
}

impl<'a> From<&'a StatusView> for StatusJson<'a> {
    fn from(v: &'a StatusView) -> Self {
        StatusJson {
            cluster: &v.cluster,
            node: &v.node,
            vip: &v.vip,
            degraded: &v.degraded,
            services: v.services.as_ref().ok().map(Vec::as_slice),
            error: v.services.as_ref().err().map(String::as_str),
        }
    }
}

/// The supervisor's own metrics, then each local endpoint's text, with a `tandem_scrape_up`
/// gauge per endpoint so a missing one is visible rather than silently absent.
fn metrics(ctx: &Ctx) -> String {
    let mut out = supervisor_metrics(&ctx.node.name, services(ctx).as_deref().ok());
    let mut up = String::from("# HELP tandem_scrape_up Whether a local metrics endpoint answered.\n# TYPE tandem_scrape_up gauge\n");
    for endpoint in &ctx.scrape {
        match scrape(endpoint) {
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
    out
}

/// Prometheus text for the supervised services (pure).
pub fn supervisor_metrics(node: &str, services: Option<&[ServiceStatus]>) -> String {
    let mut s = String::new();
    s.push_str(
        "# HELP tandem_supervisor_up Whether the supervisor answered on its control socket.\n",
    );
    s.push_str("# TYPE tandem_supervisor_up gauge\n");
    s.push_str(&format!(
        "tandem_supervisor_up{{node=\"{node}\"}} {}\n",
        u8::from(services.is_some())
    ));
    let Some(services) = services else { return s };
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

/// A minimal HTTP/1.0 GET of `/metrics` on a loopback endpoint.
fn scrape(endpoint: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = endpoint
        .parse()
        .with_context(|| format!("`{endpoint}` is not host:port"))?;
    let mut conn = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)?;
    conn.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    conn.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    conn.take(MAX_SCRAPE_BYTES).read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("metrics are not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.split(' ').nth(1) == Some("200"),
        "answered {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_tls_is_copied_for_the_admin_user_with_final_modes() {
        use std::os::unix::fs::MetadataExt as _;
        // SAFETY: plain geteuid(2).
        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test needs root (it chowns)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let seed = tmp.path().join("seed-tls");
        std::fs::create_dir(&seed).unwrap();
        for name in [CA_CERT, NODE_CERT, NODE_KEY] {
            std::fs::write(seed.join(name), format!("{name}\n")).unwrap();
        }
        let dir = tmp.path().join("admin-tls");
        provide_tls(&seed, &dir, Some("nobody")).unwrap();
        // Again (the next boot): replaced, not refused.
        provide_tls(&seed, &dir, Some("nobody")).unwrap();
        let meta = |p: &Path| std::fs::metadata(p).unwrap();
        assert_eq!(
            (meta(&dir).uid(), meta(&dir).mode() & 0o777),
            (65534, 0o700)
        );
        for (name, mode) in [(CA_CERT, 0o644), (NODE_CERT, 0o644), (NODE_KEY, 0o600)] {
            let p = dir.join(name);
            assert_eq!(
                (meta(&p).uid(), meta(&p).mode() & 0o777),
                (65534, mode),
                "{name}"
            );
            assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{name}\n"));
        }
    }

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
        let text = supervisor_metrics("server1", Some(&services));
        assert!(text.contains(
            "tandem_supervisor_service_restarts_total{node=\"server1\",service=\"nginx\"} 2\n"
        ));
        assert!(text
            .contains("tandem_supervisor_service_running{node=\"server1\",service=\"nginx\"} 1\n"));
        assert!(supervisor_metrics("server1", None)
            .contains("tandem_supervisor_up{node=\"server1\"} 0"));
    }
}
