//! The log monitor's two halves in the supervisor binary:
//!
//! - the log store: writer threads, fed by the supervisor's log and event sinks, that append
//!   every service line and event to `<state>/logs/` with a size cap ([`attach_log_store`]);
//! - `appliance logmon`: the monitor as a supervised child ([`main`]; the node plan starts it), so
//!   that parsing, alert rules and the webhook can never hurt PID 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use logmon::store::{self, Entry, Limits, LogStore};

use crate::args::NodeArgs;
use crate::layout::Layout;
use api::control::LogLine;
use api::events::EventRecord;

use crate::supervisor::{self, SupervisorOptions};

/// At shutdown, how long the log store gets to write what is still queued.
const STORE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// `appliance logmon`. The tuning flags exist for tests and for tuning a deployment; their
/// defaults are the named constants of the `logmon` crate.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub node: NodeArgs,
    /// The node's state directory [default: the image's data partition].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The node's runtime directory, where the database agent writes its status
    /// [default: STATE_DIR/run, or the image's].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Serve metrics here [default: 127.0.0.1:9101, or the node's address when loopback].
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The balancer's state directory, where it keeps its self-signed certificate
    /// [default: STATE_DIR/balancer].
    #[arg(long)]
    pub balancer_state_dir: Option<PathBuf>,
    /// A certificate chain whose leaf's expiry is watched; repeat for several (SNI). Replaces
    /// the default: what the balancer serves, tls.certificate or else
    /// BALANCER_STATE_DIR/tls/self-signed.crt.
    #[arg(long)]
    pub cert: Vec<PathBuf>,
    /// The node's uploaded certificate (from its settings): watched instead of the
    /// self-signed one when it holds one and cluster.toml names none.
    #[arg(long)]
    pub served_tls: Option<PathBuf>,
    /// The alert webhook from the node's settings (one line; no file: no webhook). Replaces
    /// cluster.toml's `alerts.webhook`.
    #[arg(long)]
    pub webhook_file: Option<PathBuf>,
    /// Tuning: how often logs and events are read.
    #[arg(long, value_name = "MS")]
    pub poll_ms: Option<u64>,
    /// Tuning: this many restarts within the crash window are a crash loop.
    #[arg(long)]
    pub crash_restarts: Option<usize>,
    /// Tuning: the crash window.
    #[arg(long, value_name = "MS")]
    pub crash_window_ms: Option<u64>,
    /// Tuning: a crash loop resolves after this long ready without a restart.
    #[arg(long, value_name = "MS")]
    pub stable_after_ms: Option<u64>,
}

/// `appliance logmon`: monitors until killed (SIGTERM's default action; the alert database
/// is transactional and the cursor is saved after every batch).
pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let (cluster, node) = args.node.load()?;
    let image = Layout::image();
    let on_image = args.state_dir.is_none();
    let state_dir = args.state_dir.unwrap_or(image.state);
    let mut config = logmon::Config::new(&cluster, &node, &state_dir);
    let run_dir = args.run_dir.or_else(|| on_image.then_some(image.run));
    if let Some(run_dir) = run_dir {
        config.db_status_file = run_dir.join(api::db::STATUS_FILE);
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = Some(addr);
    }
    if let Some(dir) = &args.balancer_state_dir {
        config.cert_files =
            logmon::cert::served_by_balancer(cluster.tls.certificate.as_deref(), dir);
    }
    if let Some(dir) = &args.served_tls {
        let cert = dir.join(crate::layout::SERVED_CERT);
        if cluster.tls.certificate.is_none() && cert.exists() {
            config.cert_files = vec![cert];
        }
    }
    if !args.cert.is_empty() {
        config.cert_files = args.cert;
    }
    if let Some(file) = &args.webhook_file {
        config.webhook = match std::fs::read_to_string(file) {
            Ok(url) => Some(
                cluster_config::WebhookUrl::parse(url.trim())
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", file.display())),
        };
    }
    if let Some(ms) = args.poll_ms {
        config.poll = Duration::from_millis(ms.max(10));
    }
    if let Some(n) = args.crash_restarts {
        config.rules.crash_restarts = n.max(1);
    }
    if let Some(ms) = args.crash_window_ms {
        config.rules.crash_window = Duration::from_millis(ms);
    }
    if let Some(ms) = args.stable_after_ms {
        config.rules.stable_after = Duration::from_millis(ms);
    }
    tracing::info!(node = %node.name, state = %state_dir.display(), "log monitor started");
    logmon::run(config, &AtomicBool::new(false))?;
    Ok(ExitCode::SUCCESS)
}

/// The writer threads of the log store; [`LogStoreGuard::finish`] waits for them after the
/// supervisor stopped.
pub struct LogStoreGuard {
    writers: Vec<JoinHandle<()>>,
}

impl LogStoreGuard {
    /// Waits (bounded) until every queued line is written. The supervisor must have returned,
    /// so that the sinks are gone.
    pub fn finish(self) {
        let deadline = Instant::now() + STORE_DRAIN_TIMEOUT;
        while self.writers.iter().any(|w| !w.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// At most this share of the data partition holds logs, so that on a small disk they leave
/// room for MariaDB (and root's reserved blocks for the state DB).
const LOG_SHARE_DIVISOR: u64 = 10;

/// The log store's caps on the filesystem of `state_dir`: the defaults, or a tenth of the
/// filesystem when that is less (never below one file per log).
fn log_limits(state_dir: &std::path::Path) -> Limits {
    let mut limits = Limits::default();
    if let Ok(fs) = nix::sys::statvfs::statvfs(state_dir) {
        let size = fs.blocks().saturating_mul(fs.fragment_size());
        limits.total_bytes = limits
            .total_bytes
            .min(size / LOG_SHARE_DIVISOR)
            .max(limits.file_bytes);
    }
    limits
}

/// Opens `<state>/logs` and connects the supervisor's log and event sinks to it. A store
/// that cannot be opened is logged and left out: the node runs on without logs on disk.
pub fn attach_log_store(options: &mut SupervisorOptions) -> LogStoreGuard {
    let dir = options.state_dir.join(store::LOG_DIR);
    let attached = (|| -> std::io::Result<LogStoreGuard> {
        let shared = Arc::new(Mutex::new(LogStore::open(
            &dir,
            log_limits(&options.state_dir),
        )?));
        let (lines, lines_writer) =
            store::spawn_writer(shared.clone(), "log-store", |line: LogLine| Entry {
                ts_ms: line.ts_ms,
                log: line.service,
                tag: line.stream.as_str().to_string(),
                pid: Some(line.pid),
                text: line.line,
            })?;
        let (events, events_writer) =
            store::spawn_writer(shared, "event-store", |e: EventRecord| Entry {
                ts_ms: e.ts_ms,
                log: store::SUPERVISOR_LOG.to_string(),
                tag: "event".to_string(),
                pid: e.pid,
                text: format!("{} {} {}", e.service, e.kind, e.detail)
                    .trim_end()
                    .to_string(),
            })?;
        options.log_sink = Some(lines);
        options.event_sink = Some(events);
        Ok(LogStoreGuard {
            writers: vec![lines_writer, events_writer],
        })
    })();
    attached.unwrap_or_else(|e| {
        tracing::error!(dir = %dir.display(), "log store: {e}; service output is not kept on disk");
        LogStoreGuard {
            writers: Vec::new(),
        }
    })
}

/// `appliance supervise --spec FILE --state-dir DIR`, with the log store.
pub fn supervise(spec: &Path, state_dir: &Path) -> anyhow::Result<ExitCode> {
    let specs = supervisor::load_specs(spec)?;
    let mut options = SupervisorOptions::new(state_dir);
    let logs = attach_log_store(&mut options);
    supervisor::run(specs, options)?;
    logs.finish();
    Ok(ExitCode::SUCCESS)
}
