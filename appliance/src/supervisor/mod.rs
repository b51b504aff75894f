//! The process supervisor: starts services in dependency order, watches their readiness,
//! restarts them with backoff, captures their output, and stops them in reverse order.
//!
//! The same code runs as PID 1 on the image (`appliance init`) and under `appliance run` or
//! `appliance supervise` on a developer machine (there it makes itself a child subreaper, so
//! orphaned descendants are re-parented to it instead of to the machine's init).
//!
//! # Structure
//!
//! - [`spec`]: what to run ([`ServiceSpec`], loadable from JSON).
//! - [`order`] and [`backoff`]: pure decisions (start order; whether and when to restart).
//! - `runner`: the state machine that owns every service's state and makes every decision:
//!   dependency gating, readiness deadlines and retries, restarts, the stop order, SIGKILL
//!   after the stop timeout, the orphan sweep. `Runner::handle(event, now)` returns effects;
//!   it makes no system call and reads no clock, so its tests are tables without processes.
//! - `executor`: the event loop, on the thread that called [`run`]. It owns the runner and
//!   performs its effects through `process`, the state DB, the log buffers and the control
//!   replies. Events come from one channel: the signal thread's reaped children and shutdown
//!   signals, readiness probes (one short-lived thread each), and control requests; when none
//!   comes before `Runner::next_deadline`, the runner gets a tick.
//! - `process`: spawning, the signal thread (the only reaper), the final orphan sweep's
//!   listing and killing.
//! - `logs`: per-service ring buffers of output lines, fed by one reader thread per pipe.
//!
//! ```text
//! signal thread  (Exited, Shutdown) ─┐
//! probe threads  (Probed)            ├─► channel ─► executor ──Event──► Runner::handle(event, now)
//! control server (Request)          ─┘                 ▲                         │
//!                                                      └───── Vec<Effect> ◄──────┘
//! ```
//!
//! The executor performs the effects in order. Spawning and listing the children finish at
//! once: their outcome (`Spawned` or `SpawnFailed`, `Children`) goes back to the runner before
//! the next effect and the next input, so services start in the order the runner decided.
//!
//! # Invariants
//!
//! - **Only the signal thread waits for children.** It reaps every exited child with
//!   `waitid(P_ALL)`, whether a service, a grandchild re-parented to us, or anything else.
//!   While [`run`] is active no code in this process may call
//!   `std::process::Command::status()`, `output()` or `Child::wait()`: the reaper would take
//!   the exit status and the call would fail with ECHILD. Run one-off commands as `oneshot`
//!   services, or before [`run`] starts / after it returns.
//! - [`run`] must be called before the process starts other threads: it blocks SIGCHLD,
//!   SIGTERM, SIGINT and SIGHUP in the calling thread, and only threads started afterwards
//!   inherit that mask.
//! - Every service runs in its own session and process group. When a process-group leader
//!   exits, the rest of its group is SIGKILLed before it is reaped (nginx workers do not
//!   outlive a killed master and keep its port).
//! - Environment variables of services are never logged, nor written to the state DB.
//! - A crash loop never spins, and never ends in a service left down for good: after
//!   [`backoff::MAX_QUICK_FAILURES`] consecutive quick failures a service is `failed` (an event
//!   the log monitor alerts on) and is retried every [`backoff::MAX_BACKOFF`] until it runs
//!   stably; a `restart` request tries at once.
//!
//! - **The runner decides, the executor acts.** Nothing in `runner` makes a system call or
//!   reads the clock; nothing in `executor` decides what a service's state is.
//!
//! Dependencies are checked at start only: a service starts once all its dependencies are
//! ready; if a dependency later restarts, its dependents keep running.

pub mod backoff;
pub mod caps;
mod executor;
mod logs;
pub mod order;
mod process;
mod runner;
pub mod spec;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::unistd;

pub use backoff::{RestartMode, RestartPolicy};
pub use caps::Capability;
pub use logs::LOG_LINES_KEPT;
pub use order::OrderError;
pub(crate) use process::credentials;
pub(crate) use process::handled as handled_signals;
pub use process::ExitKind;
pub use spec::{Kind, Readiness, ServiceSpec, StopSignal};

use crate::control::{ControlError, ControlServer};
use crate::state::{Recovery, StateDb, StateError};
use api::control::{LogLine, Request, Response, SOCKET_FILE};
use api::events::{EventKind, EventRecord};
use api::storage::Degraded;

/// The subject of the state DB's [`Degraded`] record and alert.
pub const STATE_DB_SUBJECT: &str = "state-db";

/// How long a control request waits for the event loop.
const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how [`run`] keeps its state and talks to the outside.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// Holds `state.db`; created if missing.
    pub state_dir: PathBuf,
    /// The control socket (`<state_dir>/control.sock` by [`SupervisorOptions::new`]).
    pub control_socket: PathBuf,
    /// The control socket's group (mode 0660), or `None`: the supervisor's user only (0600).
    pub control_group: Option<nix::unistd::Gid>,
    /// Receives every output line of every service (for the log monitor).
    pub log_sink: Option<logmon::store::QueueSender<LogLine>>,
    /// Receives every service event as it is written to the state DB.
    pub event_sink: Option<logmon::store::QueueSender<EventRecord>>,
    /// Where the node's [`Degraded`] records are written (`None`: nowhere, e.g. `supervise`).
    pub run_dir: Option<PathBuf>,
    /// Faults found before the supervisor started (a damaged data partition): written with
    /// the supervisor's own to `run_dir` and recorded as `failed` events, which the log
    /// monitor alerts on.
    pub faults: Vec<Degraded>,
}

impl SupervisorOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        SupervisorOptions {
            control_socket: state_dir.join(SOCKET_FILE),
            control_group: None,
            state_dir,
            log_sink: None,
            event_sink: None,
            run_dir: None,
            faults: Vec::new(),
        }
    }
}

/// Why [`run`] returned (PID 1 maps this to poweroff or reboot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM.
    Terminate,
    /// SIGINT (Ctrl-C; on PID 1, Ctrl-Alt-Del).
    Interrupt,
    /// SIGHUP (the terminal of `appliance run` went away).
    Hangup,
    /// A `stop` request on the control socket.
    Requested,
    /// A `reconfigure` request: PID 1 plans the node again and supervises the new plan.
    Reconfigure,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("service `{service}`: {reason}")]
    InvalidSpec { service: String, reason: String },
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error("service spec file {}: {detail}", .path.display())]
    SpecFile { path: PathBuf, detail: String },
    #[error("state directory {}: {source}", .path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("setting up signal handling: {0}")]
    Signals(#[source] nix::Error),
}

/// Checks every service and their dependencies; returns the start order (indices).
pub fn validate(specs: &[ServiceSpec]) -> Result<Vec<usize>, SupervisorError> {
    for spec in specs {
        spec.check()
            .map_err(|reason| SupervisorError::InvalidSpec {
                service: spec.name.clone(),
                reason,
            })?;
    }
    let graph: Vec<(&str, Vec<&str>)> = specs
        .iter()
        .map(|s| (s.name.as_str(), s.deps.iter().map(String::as_str).collect()))
        .collect();
    Ok(order::start_order(&graph)?)
}

/// Reads a JSON array of [`ServiceSpec`] and validates it.
pub fn load_specs(path: &Path) -> Result<Vec<ServiceSpec>, SupervisorError> {
    let err = |detail: String| SupervisorError::SpecFile {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let specs: Vec<ServiceSpec> = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    validate(&specs)?;
    Ok(specs)
}

/// Supervises `specs` until SIGTERM, SIGINT, SIGHUP or a `stop` request; then stops every
/// service in reverse dependency order, kills whatever descendants are left, and returns why.
///
/// See the module documentation for what the caller must (not) do while it runs.
pub fn run(
    specs: Vec<ServiceSpec>,
    opts: SupervisorOptions,
) -> Result<StopReason, SupervisorError> {
    let order = validate(&specs)?;
    let (tx, rx) = mpsc::channel();
    // First, before any thread exists: block the signals we take with sigwait.
    let signal_tx = tx.clone();
    let _signals = process::SignalThread::start(move |event| {
        let _ = signal_tx.send(executor::Input::Signal(event));
    })
    .map_err(SupervisorError::Signals)?;
    if unistd::getpid().as_raw() != 1 {
        nix::sys::prctl::set_child_subreaper(true).map_err(SupervisorError::Signals)?;
    }
    std::fs::create_dir_all(&opts.state_dir).map_err(|source| SupervisorError::StateDir {
        path: opts.state_dir.clone(),
        source,
    })?;
    let (db, recovery) = StateDb::open_or_recover(&opts.state_dir, now_ms());
    let mut faults = opts.faults.clone();
    faults.extend(state_db_fault(&recovery));
    for fault in &faults {
        tracing::error!(subject = %fault.subject, hint = %fault.hint, "{}", fault.reason);
        if let Some(run_dir) = &opts.run_dir {
            if let Err(e) = fault.append(run_dir) {
                tracing::error!(dir = %run_dir.display(), "writing the degraded record: {e}");
            }
        }
        // A `failed` event: the log monitor alerts on it like on a service that failed.
        let event = db
            .record(
                now_ms(),
                &fault.subject,
                EventKind::Failed,
                None,
                &fault.reason,
            )
            .unwrap_or_else(|_| EventRecord {
                id: 0,
                ts_ms: now_ms(),
                service: fault.subject.clone(),
                kind: EventKind::Failed.as_str().into(),
                pid: None,
                detail: fault.reason.clone(),
            });
        if let Some(sink) = &opts.event_sink {
            let _ = sink.send(event);
        }
    }

    let control_tx = tx.clone();
    let _control = ControlServer::bind_for(
        &opts.control_socket,
        opts.control_group,
        move |request: Request| {
            let (reply_tx, reply_rx) = mpsc::channel();
            if control_tx
                .send(executor::Input::Control(request, reply_tx))
                .is_err()
            {
                return Response::Error {
                    message: "the supervisor is shutting down".into(),
                };
            }
            reply_rx
                .recv_timeout(CONTROL_REPLY_TIMEOUT)
                .unwrap_or_else(|_| Response::Error {
                    message: "the supervisor did not answer".into(),
                })
        },
    )?;
    tracing::info!(
        services = specs.len(),
        state_dir = %opts.state_dir.display(),
        socket = %opts.control_socket.display(),
        "supervisor started"
    );
    let runner = runner::Runner::new(specs, order);
    let reason = executor::Executor::new(runner, db, &opts, tx).run(&rx);
    tracing::info!(?reason, "supervisor stopped");
    Ok(reason)
}

/// The degraded record of a state DB that could not be opened as it was.
fn state_db_fault(recovery: &Recovery) -> Option<Degraded> {
    let (reason, hint) = match recovery {
        Recovery::None => return None,
        Recovery::MovedAside { to, error } => (
            format!("state DB was unreadable ({error}); moved to {} and recreated: earlier service events are not shown", to.display()),
            "nothing to do; the old file is kept for inspection".to_string(),
        ),
        Recovery::InMemory { error } => (
            format!("state DB cannot be used ({error}); service events of this boot are kept in memory only"),
            "free space on the data partition (or check the disk), then restart the node".to_string(),
        ),
    };
    Some(Degraded {
        subject: STATE_DB_SUBJECT.into(),
        reason,
        hint,
        stopped: Vec::new(),
        since_ms: u64::try_from(now_ms()).unwrap_or(0),
    })
}

/// `appliance supervise --spec FILE --state-dir DIR`.
pub fn supervise_file(spec: &Path, state_dir: &Path) -> anyhow::Result<ExitCode> {
    let specs = load_specs(spec)?;
    run(specs, SupervisorOptions::new(state_dir))?;
    Ok(ExitCode::SUCCESS)
}

/// Wall-clock milliseconds since the Unix epoch, for event and log timestamps.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_spec_files_are_refused_with_the_reason() {
        let check = |text: &str, expected: &str| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("spec.json");
            std::fs::write(&path, text).unwrap();
            let err = load_specs(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err}");
        };
        check(
            r#"[{ "name": "a", "argv": ["x"], "deps": ["b"] }]"#,
            "service `a` depends on `b`, which is not a service",
        );
        check(
            r#"[{ "name": "a", "argv": ["x"], "deps": ["b"] }, { "name": "b", "argv": ["x"], "deps": ["a"] }]"#,
            "dependency cycle: a -> b -> a",
        );
        check(
            r#"[{ "name": "a", "argv": ["x"], "color": "red" }]"#,
            "unknown field `color`",
        );
        check(
            r#"[{ "name": "a b", "argv": ["x"] }]"#,
            "service `a b`: name must be 1 to 64 characters",
        );
        check("[", "spec.json: EOF while parsing");
        let missing = Path::new("/nonexistent/spec.json");
        let err = load_specs(missing).unwrap_err().to_string();
        assert!(
            err.starts_with("service spec file /nonexistent/spec.json: "),
            "{err}"
        );
    }
}
