//! `appliance logmon`: the monitor loop. Every poll it reads new log lines and supervisor
//! events, measures the data partition and the certificate now and then, asks the engine
//! what fired or resolved, and stores, logs and sends that; then it renders the metrics.
//!
//! It runs as a supervised child of the supervisor, so a bug here never touches PID 1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::alerts::{self, AlertDb};
use crate::engine::{Alert, AlertState, Engine, Observation, Rule, Rules};
use crate::metrics::{self, DiskMetrics, Metrics, MetricsServer, ServiceMetrics};
use crate::parse::{self, DbStatus, StatusClass};
use crate::store::{self, SUPERVISOR_LOG};
use crate::tail::Tailer;
use crate::webhook::Webhook;
use crate::{cert, time, Error};
use api::events::EventReader;
use cluster_config::WebhookUrl;

/// How often the monitor looks for new lines and events.
pub const POLL: Duration = Duration::from_secs(1);
/// How often the data partition is measured.
pub const DISK_EVERY: Duration = Duration::from_secs(10);
/// How often the certificates are read.
pub const CERT_EVERY: Duration = Duration::from_secs(60);
/// The database agent's status file, in the node's runtime directory: [`api::db::STATUS_FILE`],
/// kept under this name until `appliance logmon` uses the api's.
pub use api::db::STATUS_FILE as DB_STATUS_FILE;
/// The name of the monitor's own service (its log is not read back).
pub const SERVICE_NAME: &str = "logmon";
/// The service whose stdout carries nginx access lines.
pub const NGINX_SERVICE: &str = "nginx";
/// The services whose `health:`/`vip:` status lines count: Tandem's own `appliance`
/// children. Not nginx, MariaDB or the application, whose lines can carry a client's words.
pub const STATUS_SOURCES: [&str; 3] = ["balancer", "db-agent", "admin"];

/// A status line, if `log` is one of [`STATUS_SOURCES`] and the line is one (pure).
pub fn status_from(log: &str, text: &str) -> Option<parse::Status> {
    STATUS_SOURCES
        .contains(&log)
        .then(|| parse::parse_status(text))
        .flatten()
}
/// Dropped alerts (too many subjects) are logged at most this often: the flood that causes
/// them must not become a flood of log lines.
pub const DROPPED_LOG_EVERY: Duration = Duration::from_secs(60);
/// The cursor in `alerts.db` that remembers the last supervisor event read.
const EVENTS_CURSOR: &str = "events";

/// What the monitor watches and where it reports.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: String,
    pub node: String,
    pub state_dir: PathBuf,
    pub rules: Rules,
    pub webhook: Option<WebhookUrl>,
    /// PEM certificates an https webhook's certificate must chain to, instead of Mozilla's
    /// roots (a private CA; tests).
    pub webhook_ca: Option<PathBuf>,
    /// `None`: no metrics server.
    pub metrics_addr: Option<SocketAddr>,
    /// The certificate chains whose leaf's expiry is watched: those the balancer serves.
    pub cert_files: Vec<PathBuf>,
    /// The database agent's status (`appliance db-agent`), read at every poll when present.
    pub db_status_file: PathBuf,
    pub poll: Duration,
}

impl Config {
    /// The defaults for `node` of `cluster`, with state in `state_dir` (the balancer's in
    /// [`cert::BALANCER_STATE_DIR`] below it, as the node plan lays it out).
    pub fn new(
        cluster: &cluster_config::Cluster,
        node: &cluster_config::Node,
        state_dir: &Path,
    ) -> Config {
        Config {
            cluster: cluster.name.clone(),
            node: node.name.clone(),
            state_dir: state_dir.to_path_buf(),
            rules: Rules::from_cluster(cluster),
            webhook: cluster.alerts.webhook.clone(),
            webhook_ca: None,
            metrics_addr: Some(metrics::default_addr(node.address)),
            cert_files: cert::served_by_balancer(
                cluster.tls.certificate.as_deref(),
                &state_dir.join(cert::BALANCER_STATE_DIR),
            ),
            db_status_file: state_dir.join("run").join(api::db::STATUS_FILE),
            poll: POLL,
        }
    }
}

/// The JSON body of a webhook POST: the alert plus where it comes from.
#[derive(Debug, Serialize)]
pub struct Notification<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    #[serde(flatten)]
    pub alert: &'a Alert,
}

/// Monitors until `shutdown` is set. Errors only when the alert database cannot be opened;
/// everything later is logged and retried at the next poll.
pub fn run(config: Config, shutdown: &AtomicBool) -> Result<(), Error> {
    let mut monitor = Monitor::start(config)?;
    while !shutdown.load(Ordering::SeqCst) {
        monitor.poll(time::now_ms());
        std::thread::sleep(monitor.config.poll);
    }
    Ok(())
}

struct Monitor {
    config: Config,
    engine: Engine,
    db: AlertDb,
    events: EventReader,
    cursor: Option<i64>,
    tailer: Tailer,
    webhook: Option<Webhook>,
    metrics: Metrics,
    snapshot: Arc<Mutex<String>>,
    /// Serves `snapshot` until the monitor is dropped.
    _metrics_server: Option<MetricsServer>,
    next_disk: Instant,
    next_cert: Instant,
    last_error: String,
    /// Dropped alerts already logged, and when.
    dropped_logged: (u64, Option<Instant>),
}

impl Monitor {
    fn start(config: Config) -> Result<Monitor, Error> {
        let now = time::now_ms();
        let db = AlertDb::open(&alerts::db_path(&config.state_dir))?;
        let mut engine = Engine::new(config.rules.clone());
        let cooldown_ms = i64::try_from(config.rules.cooldown.as_millis()).unwrap_or(i64::MAX);
        engine.restore(&db.restorable(now.saturating_sub(cooldown_ms))?);

        let webhook = match &config.webhook {
            Some(url) => match Webhook::spawn(url, config.webhook_ca.as_deref()) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!("{e}; alerts are stored and logged only");
                    None
                }
            },
            None => None,
        };
        let snapshot = Arc::new(Mutex::new(String::new()));
        let metrics_server = match config.metrics_addr {
            Some(addr) => match metrics::serve(addr, snapshot.clone()) {
                Ok(server) => {
                    tracing::info!(bound = %server.addr(), "serving metrics");
                    Some(server)
                }
                // Alerts matter more than metrics: keep monitoring.
                Err(e) => {
                    tracing::error!(%addr, "cannot serve metrics: {e}");
                    None
                }
            },
            None => None,
        };
        let tailer = Tailer::new(
            &config.state_dir.join(store::LOG_DIR),
            &[SUPERVISOR_LOG, SERVICE_NAME],
            true,
        );
        let mut monitor = Monitor {
            events: EventReader::new(&config.state_dir),
            cursor: None,
            tailer,
            webhook,
            metrics: Metrics::default(),
            snapshot,
            _metrics_server: metrics_server,
            next_disk: Instant::now(),
            next_cert: Instant::now(),
            last_error: String::new(),
            dropped_logged: (0, None),
            engine,
            db,
            config,
        };
        monitor.render();
        Ok(monitor)
    }

    /// Picks where to start reading events: where the last run stopped, or (first run, or a
    /// new state DB) at the events of the last crash window, so a crash loop that began
    /// before the monitor is still seen.
    fn init_cursor(&mut self, now: i64) -> Result<Option<i64>, Error> {
        let window = i64::try_from(self.config.rules.crash_window.as_millis()).unwrap_or(i64::MAX);
        let Some((max_id, window_start)) = self.events.positions(now.saturating_sub(window))?
        else {
            return Ok(None);
        };
        let cursor = match self.db.cursor(EVENTS_CURSOR)? {
            Some(c) if c <= max_id => c,
            _ => window_start,
        };
        for (service, (last_kind, restarts)) in self.events.summary(cursor)? {
            let up = matches!(last_kind.as_str(), "started" | "ready");
            self.engine.assume_service(&service, last_kind == "ready");
            self.metrics
                .services
                .insert(service, ServiceMetrics { up, restarts });
        }
        Ok(Some(cursor))
    }

    fn poll(&mut self, now: i64) {
        let result = self.poll_inner(now);
        self.report(result);
        self.render();
    }

    fn report(&mut self, result: Result<(), Error>) {
        match result {
            Ok(()) => self.last_error.clear(),
            Err(e) => {
                let text = e.to_string();
                if text != self.last_error {
                    tracing::warn!("{text}");
                    self.last_error = text;
                }
            }
        }
    }

    fn poll_inner(&mut self, now: i64) -> Result<(), Error> {
        let mut transitions = Vec::new();

        // Supervisor events.
        if self.cursor.is_none() {
            self.cursor = self.init_cursor(now)?;
        }
        if let Some(mut cursor) = self.cursor {
            let start = cursor;
            loop {
                let batch = self.events.after(cursor)?;
                for event in &batch {
                    let svc = self
                        .metrics
                        .services
                        .entry(event.service.clone())
                        .or_default();
                    match event.kind.as_str() {
                        "started" | "ready" => svc.up = true,
                        "exited" | "stopped" | "failed" => svc.up = false,
                        "restarting" => svc.restarts += 1,
                        _ => {}
                    }
                    let obs = Observation::Event {
                        service: event.service.clone(),
                        kind: event.kind.clone(),
                        detail: event.detail.clone(),
                    };
                    transitions.extend(self.engine.observe(obs, event.ts_ms));
                    cursor = event.id;
                }
                if batch.len() < api::events::BATCH as usize {
                    break;
                }
            }
            if cursor != start {
                self.db.set_cursor(EVENTS_CURSOR, cursor)?;
            }
            self.cursor = Some(cursor);
        }

        // Log lines.
        let lines = self.tailer.poll().map_err(|source| Error::Io {
            path: self.config.state_dir.join(store::LOG_DIR),
            source,
        })?;
        let (mut total, mut errors) = (0, 0);
        for tail in &lines {
            *self.metrics.log_lines.entry(tail.log.clone()).or_default() += 1;
            let Some(stored) = store::parse_line(&tail.line) else {
                continue;
            };
            if tail.log == NGINX_SERVICE && stored.tag == "stdout" {
                match api::access_log::parse(stored.text) {
                    Some(access) => {
                        self.metrics.observe_access(&access);
                        total += 1;
                        errors +=
                            u64::from(StatusClass::of(access.status) == StatusClass::ServerError);
                    }
                    None => self.metrics.unparsed_access_lines += 1,
                }
                continue;
            }
            let obs = match status_from(&tail.log, stored.text) {
                Some(parse::Status::Health { check, up }) => Observation::Health { check, up },
                Some(parse::Status::Vip { holder }) => Observation::Vip { holder },
                None => continue,
            };
            transitions.extend(self.engine.observe(obs, now));
        }
        if total > 0 {
            transitions.extend(self.engine.observe(
                Observation::Requests {
                    total,
                    server_errors: errors,
                },
                now,
            ));
        }

        // The database agent's view.
        match std::fs::read_to_string(&self.config.db_status_file) {
            Ok(text) => match parse::db_status(&text) {
                Ok(DbStatus::Primary { healthy }) => {
                    let obs = Observation::Health {
                        check: "db".into(),
                        up: healthy,
                    };
                    transitions.extend(self.engine.observe(obs, now));
                }
                Ok(DbStatus::Replica { running, lag_ms }) => {
                    self.metrics.replication_running = Some(running);
                    self.metrics.replication_lag_ms = lag_ms;
                    transitions.extend(
                        self.engine
                            .observe(Observation::Replication { running, lag_ms }, now),
                    );
                }
                // Being rewritten, or a newer format: next poll.
                Err(e) => tracing::debug!("{e}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::debug!(path = %self.config.db_status_file.display(), "{e}"),
        }

        // Data partition and certificate.
        let instant = Instant::now();
        if instant >= self.next_disk {
            self.next_disk = instant + DISK_EVERY;
            match disk_usage(&self.config.state_dir) {
                Ok(disk) => {
                    self.metrics.disk = Some(disk);
                    let used = disk.used_bytes as f64;
                    let percent = if used + disk.avail_bytes as f64 > 0.0 {
                        used * 100.0 / (used + disk.avail_bytes as f64)
                    } else {
                        0.0
                    };
                    transitions.extend(self.engine.observe(
                        Observation::Disk {
                            used_percent: percent,
                        },
                        now,
                    ));
                }
                Err(e) => tracing::warn!(dir = %self.config.state_dir.display(), "statvfs: {e}"),
            }
        }
        if instant >= self.next_cert {
            self.next_cert = instant + CERT_EVERY;
            for path in &self.config.cert_files {
                match std::fs::read(path) {
                    Ok(bytes) => match cert::not_after_ms(&bytes) {
                        Ok(not_after_ms) => {
                            let subject = path.display().to_string();
                            self.metrics
                                .cert_not_after_ms
                                .insert(subject.clone(), not_after_ms);
                            transitions.extend(self.engine.observe(
                                Observation::Cert {
                                    subject,
                                    not_after_ms,
                                },
                                now,
                            ));
                        }
                        Err(e) => tracing::warn!(path = %path.display(), "certificate: {e}"),
                    },
                    // The balancer makes its self-signed certificate when it first starts.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(path = %path.display(), "certificate: {e}"),
                }
            }
        }

        transitions.extend(self.engine.tick(now));
        for alert in transitions {
            self.publish(alert)?;
        }
        Ok(())
    }

    /// Stores, logs and sends one transition.
    fn publish(&mut self, alert: Alert) -> Result<(), Error> {
        let alert = self.db.record(&alert)?;
        match alert.state {
            AlertState::Firing => {
                if let Some(rule) = Rule::from_name(&alert.rule) {
                    *self.metrics.alerts_fired.entry(rule).or_default() += 1;
                }
                tracing::warn!(target: "alert", rule = %alert.rule, subject = %alert.subject, severity = %alert.severity, state = "firing", "{}", alert.message);
            }
            AlertState::Resolved => {
                tracing::info!(target: "alert", rule = %alert.rule, subject = %alert.subject, severity = %alert.severity, state = "resolved", "{}", alert.message);
            }
        }
        if let Some(webhook) = &self.webhook {
            let body = Notification {
                cluster: &self.config.cluster,
                node: &self.config.node,
                alert: &alert,
            };
            match serde_json::to_vec(&body) {
                Ok(body) => webhook.send(body),
                Err(e) => tracing::error!("encoding an alert: {e}"),
            }
        }
        Ok(())
    }

    fn render(&mut self) {
        let mut firing: BTreeMap<Rule, u64> = BTreeMap::new();
        for alert in self.engine.firing() {
            if let Some(rule) = Rule::from_name(&alert.rule) {
                *firing.entry(rule).or_default() += 1;
            }
        }
        self.metrics.alerts_firing = firing;
        self.metrics.alerts_suppressed = self.engine.suppressed();
        let dropped = self.engine.dropped();
        self.metrics.alerts_dropped = dropped;
        let (logged, at) = self.dropped_logged;
        if dropped > logged && at.is_none_or(|t| t.elapsed() >= DROPPED_LOG_EVERY) {
            tracing::warn!(
                dropped,
                "{} alert subjects held, all firing: {} new alerts dropped",
                crate::engine::MAX_ALERT_KEYS,
                dropped - logged
            );
            self.dropped_logged = (dropped, Some(Instant::now()));
        }
        if let Some(webhook) = &self.webhook {
            let s = webhook.stats();
            self.metrics.webhook_delivered = s.delivered.load(Ordering::Relaxed);
            self.metrics.webhook_failed_attempts = s.failed_attempts.load(Ordering::Relaxed);
            self.metrics.webhook_given_up = s.given_up.load(Ordering::Relaxed);
            self.metrics.webhook_dropped = s.dropped.load(Ordering::Relaxed);
        }
        let text = self.metrics.render();
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = text;
    }
}

/// Size, used and available bytes of the filesystem holding `path` (like `df`).
pub fn disk_usage(path: &Path) -> std::io::Result<DiskMetrics> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let unit = st.fragment_size();
    let size = st.blocks().saturating_mul(unit);
    let free = st.blocks_free().saturating_mul(unit);
    Ok(DiskMetrics {
        size_bytes: size,
        used_bytes: size.saturating_sub(free),
        avail_bytes: st.blocks_available().saturating_mul(unit),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_count_only_from_tandems_own_services() {
        let line = "2026-11-29T09:19:13.151488Z  INFO health: backend server2 (10.88.0.12:8080) is up backend=server2 state=\"up\"";
        let up = Some(parse::Status::Health {
            check: "server2".into(),
            up: true,
        });
        assert_eq!(status_from("balancer", line), up);
        // The same words from nginx (a client can make it log them), MariaDB or the
        // application are not a status.
        for log in ["nginx", "mariadb", "app", "keepalived"] {
            assert_eq!(status_from(log, line), None, "{log}");
        }
    }
}
