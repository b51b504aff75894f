//! Starting, reloading and stopping the balancer: the async [`Balancer::start`] / [`Handle`]
//! and the blocking [`run_blocking`] that the supervisor's `appliance balancer` calls.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use cluster_config::Cluster;
use http::{header, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::backend::{Backend, Routes};
use crate::body::RespBody;
use crate::conn::{self, Listener};
use crate::core::health::State;
use crate::metrics::{self, Global};
use crate::plan::Plan;
use crate::proxy::{Role, Settings, Shared};
use crate::tls::{self, CertificateFiles, SniResolver};
use crate::vip::{TrackFile, VipMode, VipState};
use crate::{health_check, BalancerError, Options};

/// Namespace for [`Balancer::start`].
pub struct Balancer;

/// A running balancer. Dropping it leaves the balancer running until its runtime ends; call
/// [`Handle::shutdown`] for an orderly stop.
pub struct Handle {
    shared: Arc<Shared>,
    resolver: Option<Arc<SniResolver>>,
    node: String,
    state_dir: PathBuf,
    certificates: Vec<CertificateFiles>,
    http: Vec<SocketAddr>,
    https: Vec<SocketAddr>,
    http_proxy: Vec<SocketAddr>,
    metrics: Option<SocketAddr>,
    shutdown_tx: watch::Sender<bool>,
    tasks_tx: mpsc::Sender<()>,
    tasks_rx: mpsc::Receiver<()>,
    runtime: tokio::runtime::Handle,
    /// The worker threads beyond the caller's runtime ([`crate::Options::workers`]).
    workers: Vec<std::thread::JoinHandle<()>>,
    /// Tells the worker threads to drop what still runs after the shutdown grace.
    abort_tx: watch::Sender<bool>,
}

/// One backend as the balancer sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub name: String,
    pub addr: SocketAddr,
    pub up: bool,
    /// Requests in flight.
    pub active: u64,
}

impl Balancer {
    /// Bind every listener, start health checks and serve until [`Handle::shutdown`]. Must be
    /// called inside a tokio runtime, which serves the first worker's listeners and runs health
    /// checks, the metrics endpoint and the floating IP's side. With
    /// [`crate::Options::workers`] = n > 1, n − 1 more threads each run a current-thread
    /// runtime of their own with listeners of their own on the same addresses (`SO_REUSEPORT`:
    /// the kernel spreads connections among the workers); routes, certificates, health,
    /// metrics and the connection caps are shared, backend keep-alive pools are per worker.
    pub async fn start(
        cluster: Cluster,
        node: &str,
        opts: Options,
    ) -> Result<Handle, BalancerError> {
        let plan = Plan::new(&cluster, node)?;
        let (http, https, http_proxy) = match &opts.listen {
            Some(l) => (l.http.clone(), l.https.clone(), l.http_proxy.clone()),
            None => (
                plan.http_listen.clone(),
                plan.https_listen.clone(),
                Vec::new(),
            ),
        };
        let resolver = if https.is_empty() {
            None
        } else {
            Some(Arc::new(SniResolver::load(
                &plan,
                &opts.state_dir,
                &opts.certificates,
            )?))
        };
        let acceptor = match &resolver {
            Some(r) => Some(TlsAcceptor::from(Arc::new(tls::server_config(r.clone())?))),
            None => None,
        };

        let workers = opts.workers.unwrap_or(1).max(1);
        let reuse_port = workers > 1;
        let mut listeners = Vec::new();
        let mut bind_all =
            |addrs: &[SocketAddr], what: Listener| -> Result<Vec<SocketAddr>, BalancerError> {
                let mut bound = Vec::new();
                for &a in addrs {
                    let l = conn::bind_std(a, reuse_port)?;
                    let local = l
                        .local_addr()
                        .map_err(|source| BalancerError::Bind { addr: a, source })?;
                    bound.push(local);
                    listeners.push((local, l, what.clone()));
                }
                Ok(bound)
            };
        let http = bind_all(
            &http,
            Listener {
                role: Role::Redirect,
                tls: None,
            },
        )?;
        let https = bind_all(
            &https,
            Listener {
                role: Role::Proxy { tls: true },
                tls: acceptor,
            },
        )?;
        let http_proxy = bind_all(
            &http_proxy,
            Listener {
                role: Role::Proxy { tls: false },
                tls: None,
            },
        )?;
        let metrics_listener = match opts.metrics {
            Some(a) => Some(conn::bind(a)?),
            None => None,
        };
        let metrics = match &metrics_listener {
            Some(l) => Some(l.local_addr().map_err(|source| BalancerError::Bind {
                addr: opts.metrics.unwrap_or(([0, 0, 0, 0], 0).into()),
                source,
            })?),
            None => None,
        };

        let https_port = https
            .first()
            .or(plan.https_listen.first())
            .map_or(443, SocketAddr::port);
        // Every worker's listeners, bound now so that a failure to bind is the caller's error.
        // The other workers bind the addresses the first one got (port 0 picked a port).
        let mut others = Vec::new();
        for _ in 1..workers {
            let mut mine = Vec::new();
            for (local, _, what) in &listeners {
                mine.push((conn::bind_std(*local, true)?, what.clone()));
            }
            others.push(mine);
        }
        crate::pool::reserve_workers(workers);
        let routes = Routes::new(&plan, None, Instant::now());
        let vip = opts
            .vip_dir
            .as_ref()
            .map(|dir| Arc::new(VipState::new(&plan.vip, node, dir, crate::vip::now_ms())));
        let shared = Arc::new(Shared {
            routes: ArcSwap::from_pointee(routes),
            settings: ArcSwap::from_pointee(Settings::new(plan.clone(), https_port)),
            global: Global::default(),
            limits: opts.limits.clone(),
            recheck: tokio::sync::Notify::new(),
            track: opts
                .vip_dir
                .as_ref()
                .filter(|_| plan.vip.mode == VipMode::Vrrp)
                .map(|dir| TrackFile::new(dir.join(api::vip::TRACK_BACKENDS))),
            vip: vip.clone(),
            admission: Default::default(),
        });
        // Backends start up (unconfirmed), so the node may serve from the first moment.
        shared.update_track();

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (tasks_tx, tasks_rx) = mpsc::channel(1);
        let (abort_tx, abort_rx) = watch::channel(false);
        tokio::spawn(crate::clock::run(shutdown_rx.clone()));
        tokio::spawn(crate::housekeeping::run(
            shared.clone(),
            shutdown_rx.clone(),
        ));
        let mut threads = Vec::new();
        for (i, mine) in others.into_iter().enumerate() {
            threads.push(spawn_worker(
                i + 1,
                mine,
                shared.clone(),
                shutdown_rx.clone(),
                tasks_tx.clone(),
                abort_rx.clone(),
            )?);
        }
        for (local, l, what) in listeners {
            let l = TcpListener::from_std(l).map_err(|source| BalancerError::Bind {
                addr: local,
                source,
            })?;
            tokio::spawn(conn::accept_loop(
                l,
                what,
                shared.clone(),
                shutdown_rx.clone(),
                tasks_tx.clone(),
            ));
        }
        if let Some(l) = metrics_listener {
            tokio::spawn(metrics_loop(
                l,
                shared.clone(),
                shutdown_rx.clone(),
                tasks_tx.clone(),
            ));
        }
        if let (Some(vip), Some(dir)) = (&vip, &opts.vip_dir) {
            crate::vip::publish_initial(vip);
            if plan.vip.mode == VipMode::Vrrp {
                tokio::spawn(crate::vip::settle(
                    TrackFile::new(dir.join(api::vip::TRACK_SETTLING)),
                    shutdown_rx.clone(),
                ));
                tokio::spawn(crate::vip::watch(
                    shared.clone(),
                    vip.clone(),
                    dir.join(api::vip::NOTIFY_FIFO),
                    shutdown_rx.clone(),
                ));
            }
        }
        for e in &shared.routes.load().entries {
            tokio::spawn(health_check::run(
                shared.clone(),
                e.backend.clone(),
                shutdown_rx.clone(),
                tasks_tx.clone(),
            ));
        }
        tracing::info!(
            node, http = ?http, https = ?https, metrics = ?metrics, workers,
            backends = ?plan.backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
            algorithm = plan.algorithm.as_str(), mode = plan.mode.as_str(),
            "balancer started"
        );
        Ok(Handle {
            shared,
            resolver,
            node: node.to_string(),
            state_dir: opts.state_dir,
            certificates: opts.certificates,
            http,
            https,
            http_proxy,
            metrics,
            shutdown_tx,
            tasks_tx,
            tasks_rx,
            runtime: tokio::runtime::Handle::current(),
            workers: threads,
            abort_tx,
        })
    }
}

/// Worker `index` (≥ 1): a thread with a current-thread runtime of its own that accepts on
/// `listeners` and serves those connections until shutdown. It ends once its last connection
/// did, or when told to abort (after the shutdown grace). Its backend connections and
/// upgraded tunnels end with its runtime, as the caller's do when its runtime ends.
fn spawn_worker(
    index: usize,
    listeners: Vec<(std::net::TcpListener, Listener)>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    tasks: mpsc::Sender<()>,
    mut abort: watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>, BalancerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BalancerError::Runtime)?;
    std::thread::Builder::new()
        .name(format!("balancer-{index}"))
        .spawn(move || {
            crate::pool::set_worker(index);
            rt.block_on(async move {
                // Every connection task of this worker holds `mine`: the runtime stays until
                // the last one ended (its own tasks end with it).
                let (mine, mut done) = mpsc::channel::<()>(1);
                for (l, what) in listeners {
                    match TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(conn::accept_loop(
                                l,
                                what,
                                shared.clone(),
                                shutdown.clone(),
                                (tasks.clone(), mine.clone()),
                            ));
                        }
                        Err(e) => tracing::error!(worker = index, error = %e, "cannot listen"),
                    }
                }
                drop((mine, tasks));
                tokio::select! {
                    _ = done.recv() => {}
                    r = abort.wait_for(|a| *a) => {
                        if r.is_err() {
                            // The handle is gone without a shutdown: serve what is open.
                            let _ = done.recv().await;
                        }
                    }
                }
            });
        })
        .map_err(BalancerError::Runtime)
}

impl Handle {
    /// Bound plain-HTTP (redirect) addresses.
    pub fn http_addrs(&self) -> &[SocketAddr] {
        &self.http
    }

    /// Bound HTTPS addresses.
    pub fn https_addrs(&self) -> &[SocketAddr] {
        &self.https
    }

    /// Bound plain-HTTP proxy addresses ([`crate::Listen::http_proxy`]).
    pub fn http_proxy_addrs(&self) -> &[SocketAddr] {
        &self.http_proxy
    }

    /// Bound metrics address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    pub fn backends(&self) -> Vec<BackendStatus> {
        self.shared
            .routes
            .load()
            .entries
            .iter()
            .map(|e| BackendStatus {
                name: e.backend.name.clone(),
                addr: e.backend.addr,
                up: e.backend.state() == State::Up,
                active: e.backend.active.load(Relaxed),
            })
            .collect()
    }

    /// The Prometheus text the metrics endpoint serves.
    pub fn metrics_text(&self) -> String {
        metrics_text(&self.shared)
    }

    /// The node's view of the floating IP (with [`crate::Options::vip_dir`]).
    pub fn vip_status(&self) -> Option<api::vip::VipStatus> {
        self.shared.vip.as_ref().map(|v| v.status())
    }

    /// Wakes every health check now.
    pub fn recheck(&self) {
        self.shared.recheck.notify_waiters();
    }

    /// Apply a new cluster description: backends, weights, algorithm, mode, health checks, HSTS
    /// and certificates. Requests in flight finish on the table they started with; backends
    /// that stay keep their health and counters. Listen addresses change on restart only.
    pub fn reload(&self, cluster: &Cluster) -> Result<(), BalancerError> {
        let plan = Plan::new(cluster, &self.node)?;
        let old_settings = self.shared.settings.load_full();
        if let Some(r) = &self.resolver {
            r.reload(&plan, &self.state_dir, &self.certificates)?;
        }
        if plan.http_listen != old_settings.plan.http_listen
            || plan.https_listen != old_settings.plan.https_listen
        {
            tracing::warn!("listen addresses or ports changed: they take effect on restart");
        }
        let old = self.shared.routes.load_full();
        let new = Routes::new(&plan, Some(&old), Instant::now());
        let is_in = |routes: &Routes, b: &Arc<Backend>| {
            routes.entries.iter().any(|e| Arc::ptr_eq(&e.backend, b))
        };
        for e in &old.entries {
            if !is_in(&new, &e.backend) {
                e.backend.retired.store(true, Relaxed);
            }
        }
        let fresh: Vec<Arc<Backend>> = new
            .entries
            .iter()
            .filter(|e| !is_in(&old, &e.backend))
            .map(|e| e.backend.clone())
            .collect();
        self.shared.settings.store(Arc::new(Settings::new(
            plan.clone(),
            old_settings.https_port,
        )));
        self.shared.routes.store(Arc::new(new));
        self.shared.update_track();
        for b in fresh {
            self.runtime.spawn(health_check::run(
                self.shared.clone(),
                b,
                self.shutdown_tx.subscribe(),
                self.tasks_tx.clone(),
            ));
        }
        tracing::info!(
            backends = ?plan.backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
            algorithm = plan.algorithm.as_str(), mode = plan.mode.as_str(),
            "configuration reloaded"
        );
        Ok(())
    }

    /// Re-read the certificate files (the configured ones, or the self-signed one). Open
    /// connections keep their session; new handshakes get the new certificates.
    pub fn reload_certificates(&self) -> Result<(), BalancerError> {
        if let Some(r) = &self.resolver {
            r.reload(
                &self.shared.settings.load().plan,
                &self.state_dir,
                &self.certificates,
            )?;
            tracing::info!("certificates reloaded");
        }
        Ok(())
    }

    /// Stop accepting, let requests in flight finish (up to `limits.shutdown_grace`), then
    /// return. Idle keep-alive connections are closed at once.
    pub async fn shutdown(self) {
        let Handle {
            shutdown_tx,
            tasks_tx,
            mut tasks_rx,
            shared,
            workers,
            abort_tx,
            ..
        } = self;
        let _ = shutdown_tx.send(true);
        drop(tasks_tx);
        let grace = shared.limits.shutdown_grace;
        if tokio::time::timeout(grace, tasks_rx.recv()).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "requests still in flight after the grace period; closing"
            );
        }
        let _ = abort_tx.send(true);
        if !workers.is_empty() {
            let joined = tokio::task::spawn_blocking(move || {
                for w in workers {
                    let _ = w.join();
                }
            });
            let _ = joined.await;
        }
        tracing::info!("balancer stopped");
    }
}

fn metrics_text(shared: &Shared) -> String {
    let clients = shared.lock_admission().clients();
    let mut text = metrics::render(&shared.global, &shared.routes.load(), clients);
    if let Some(vip) = &shared.vip {
        vip.metrics(&mut text);
    }
    text
}

async fn metrics_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    _tasks: mpsc::Sender<()>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    let mut r = if req.uri().path() == "/metrics" {
                        let text = metrics_text(&shared);
                        let mut r = Response::new(RespBody::full(text));
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            http::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        r
                    } else {
                        Response::new(RespBody::full("not found: try /metrics\n"))
                    };
                    if req.uri().path() != "/metrics" {
                        *r.status_mut() = StatusCode::NOT_FOUND;
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                http1::Builder::new().serve_connection(TokioIo::new(stream), svc),
            )
            .await;
        });
    }
}

/// Run the balancer of `node` until SIGTERM or SIGINT, on worker threads of its own (one per
/// available core unless `opts.workers` says otherwise; see [`Balancer::start`]). SIGHUP reloads: with
/// `opts.reload`, the cluster description it returns (and the certificates); without, the
/// certificates only. A failed reload is logged and the running configuration kept.
pub fn run_blocking(cluster: Cluster, node: &str, opts: Options) -> Result<(), BalancerError> {
    // No transparent huge pages for this process, whatever the system's setting: a partly used
    // 2 MiB page is resident whole (with mimalloc's arena, which asks for them: 54 MiB at
    // 1,000 idle HTTPS connections against 38 MiB). Faults from here on get 4 KiB pages.
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(error = %e, "cannot disable transparent huge pages");
    }
    let mut opts = opts;
    let workers = opts
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1);
    opts.workers = Some(workers);
    // Thread per core, like HAProxy and nginx: this thread is the first worker (and runs the
    // signals, health checks and metrics), [`Balancer::start`] starts the others. A
    // current-thread runtime each: no work-stealing scheduler's cross-thread bookkeeping, and
    // a connection, its HTTP/2 streams and its backend connections stay on one thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BalancerError::Runtime)?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let reload = opts.reload.clone();
        let mut term = signal(SignalKind::terminate()).map_err(BalancerError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(BalancerError::Runtime)?;
        let mut hup = signal(SignalKind::hangup()).map_err(BalancerError::Runtime)?;
        let handle = Balancer::start(cluster, node, opts).await?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    let result = match &reload {
                        Some(f) => match f() {
                            Ok(c) => handle.reload(&c),
                            Err(e) => Err(BalancerError::Config(e)),
                        },
                        None => handle.reload_certificates(),
                    };
                    if let Err(e) = result {
                        tracing::error!(error = %e, "reload failed; keeping the running configuration");
                    }
                }
            }
        }
        tracing::info!("stopping: no new connections, finishing requests in flight");
        handle.shutdown().await;
        Ok(())
    })
}
