//! The event loop: the one thread that owns every service's state.

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::backoff::{self, Decision};
use super::logs::{self, LogBuffers};
use super::process::{self, ExitKind, SignalEvent};
use super::spec::{Kind, Readiness, ServiceSpec};
use super::{now_ms, StopReason, SupervisorOptions};
use crate::state::StateDb;
use api::events::{EventKind, EventRecord};
use api::control::{LogLine, Request, Response, ServiceStatus, Stream};

/// How often a readiness probe is retried.
pub const READINESS_POLL: Duration = Duration::from_millis(50);
/// How long one TCP readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// At shutdown, how long leftover descendants get to disappear after SIGKILL.
pub const ORPHAN_SWEEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A process still there this long after SIGKILL (stuck in the kernel) is given up on, so
/// that shutdown cannot hang.
pub const ABANDON_AFTER_KILL: Duration = Duration::from_secs(5);
/// Pause between two scans for leftover descendants.
const SWEEP_INTERVAL: Duration = Duration::from_millis(20);

pub(crate) enum Event {
    Signal(SignalEvent),
    Ready { idx: usize, generation: u64 },
    Control(Request, Sender<Response>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not started yet: waiting for its dependencies to be ready.
    Waiting,
    /// Started, not ready yet.
    Starting,
    /// Ready (a daemon).
    Running,
    /// A oneshot that exited 0.
    Done,
    /// Waiting for its restart timer.
    Backoff,
    /// Stop signal sent.
    Stopping,
    Stopped,
    /// Ended and the restart policy keeps it down.
    Exited,
    /// In a crash loop: waiting the maximum backoff for its next try.
    Failed,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Starting => "starting",
            State::Running => "running",
            State::Done => "done",
            State::Backoff => "backoff",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Exited => "exited",
            State::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Restart,
    ReadyTimeout,
    Kill,
    Abandon,
}

/// Why a stop signal was sent; decides what happens when the process has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopCause {
    Shutdown,
    Restart,
    ReadyTimeout,
}

struct Service {
    spec: ServiceSpec,
    deps: Vec<usize>,
    dependents: Vec<usize>,
    state: State,
    pid: Option<Pid>,
    /// Bumped at every start; readiness reports of an older process are ignored.
    generation: u64,
    started_at: Option<Instant>,
    ready_at: Option<Instant>,
    ready: bool,
    restarts: u32,
    quick_failures: u32,
    last_exit: Option<String>,
    checker: Option<Arc<AtomicBool>>,
    deadline: Option<(Instant, Timer)>,
    stopping: Option<StopCause>,
}

pub(crate) struct Runner {
    services: Vec<Service>,
    order: Vec<usize>,
    db: StateDb,
    event_sink: Option<logmon::store::QueueSender<EventRecord>>,
    log_sink: Option<logmon::store::QueueSender<LogLine>>,
    buffers: Arc<LogBuffers>,
    tx: Sender<Event>,
    shutdown: Option<StopReason>,
}

impl Runner {
    pub(crate) fn new(
        specs: Vec<ServiceSpec>,
        order: Vec<usize>,
        db: StateDb,
        opts: &SupervisorOptions,
        tx: Sender<Event>,
    ) -> Runner {
        let index = |name: &str| specs.iter().position(|s| s.name == name);
        let deps: Vec<Vec<usize>> = specs
            .iter()
            .map(|s| s.deps.iter().filter_map(|d| index(d)).collect())
            .collect();
        let mut services: Vec<Service> = specs
            .into_iter()
            .zip(deps)
            .map(|(spec, deps)| Service {
                spec,
                deps,
                dependents: Vec::new(),
                state: State::Waiting,
                pid: None,
                generation: 0,
                started_at: None,
                ready_at: None,
                ready: false,
                restarts: 0,
                quick_failures: 0,
                last_exit: None,
                checker: None,
                deadline: None,
                stopping: None,
            })
            .collect();
        for i in 0..services.len() {
            for d in services[i].deps.clone() {
                services[d].dependents.push(i);
            }
        }
        Runner {
            services,
            order,
            db,
            event_sink: opts.event_sink.clone(),
            log_sink: opts.log_sink.clone(),
            buffers: Arc::default(),
            tx,
            shutdown: None,
        }
    }

    /// Runs until shutdown is complete, including the sweep of leftover descendants.
    pub(crate) fn run(mut self, rx: &Receiver<Event>) -> StopReason {
        self.start_eligible();
        let reason = loop {
            if let Some(reason) = self.shutdown {
                if self.services.iter().all(|s| s.pid.is_none()) {
                    break reason;
                }
            }
            let next = self
                .services
                .iter()
                .filter_map(|s| s.deadline.map(|(at, _)| at))
                .min();
            let event = match next {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => None,
                    // Unreachable: `self.tx` keeps the channel open.
                    Err(RecvTimeoutError::Disconnected) => break StopReason::Terminate,
                },
                None => match rx.recv() {
                    Ok(event) => Some(event),
                    Err(_) => break StopReason::Terminate,
                },
            };
            if let Some(event) = event {
                self.handle(event);
            }
            self.fire_deadlines();
            if self.shutdown.is_some() {
                self.drive_shutdown();
            }
        };
        self.sweep_orphans(rx);
        reason
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Signal(SignalEvent::Exited { pid, exit }) => {
                match self.services.iter().position(|s| s.pid == Some(pid)) {
                    Some(idx) => self.on_exit(idx, pid, exit),
                    None => tracing::debug!(pid = pid.as_raw(), "reaped orphan ({exit})"),
                }
            }
            Event::Signal(SignalEvent::Shutdown(sig)) => {
                let reason = match sig {
                    Signal::SIGINT => StopReason::Interrupt,
                    Signal::SIGHUP => StopReason::Hangup,
                    _ => StopReason::Terminate,
                };
                if self.shutdown.is_some() {
                    tracing::warn!(
                        "{} during shutdown: killing every service now",
                        sig.as_str()
                    );
                    for svc in &self.services {
                        if let Some(pid) = svc.pid {
                            process::signal_group(pid, Signal::SIGKILL);
                        }
                    }
                } else {
                    tracing::info!("{}: stopping every service", sig.as_str());
                    self.begin_shutdown(reason);
                }
            }
            Event::Ready { idx, generation } => {
                let svc = &self.services[idx];
                if svc.generation == generation && svc.state == State::Starting && svc.pid.is_some()
                {
                    self.mark_ready(idx);
                }
            }
            Event::Control(request, reply) => {
                let response = self.control(request);
                let _ = reply.send(response);
            }
        }
    }

    fn control(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status {
                services: self.status(),
            },
            Request::Logs { service, lines } => {
                if !self.services.iter().any(|s| s.spec.name == service) {
                    return Response::Error {
                        message: format!("no service `{service}`"),
                    };
                }
                Response::Logs {
                    lines: self.buffers.tail(&service, lines),
                }
            }
            Request::Stop => {
                tracing::info!("stop requested: stopping every service");
                self.begin_shutdown(StopReason::Requested);
                Response::Ok
            }
            Request::Signal { service, signal } => {
                let Some(idx) = self.services.iter().position(|s| s.spec.name == service) else {
                    return Response::Error {
                        message: format!("no service `{service}`"),
                    };
                };
                let sig = api::control::SIGNALS
                    .contains(&signal.as_str())
                    .then(|| format!("SIG{signal}").parse::<Signal>().ok())
                    .flatten();
                let Some(sig) = sig else {
                    return Response::Error {
                        message: format!(
                            "signal `{signal}` is not one of {}",
                            api::control::SIGNALS.join(", ")
                        ),
                    };
                };
                match self.services[idx].pid {
                    Some(pid) => {
                        tracing::warn!(%service, pid = pid.as_raw(), "sending {} on request", sig.as_str());
                        process::signal_group(pid, sig);
                        Response::Ok
                    }
                    None => Response::Error {
                        message: format!("`{service}` has no running process"),
                    },
                }
            }
            Request::Restart { service } => {
                match self.services.iter().position(|s| s.spec.name == service) {
                    None => Response::Error {
                        message: format!("no service `{service}`"),
                    },
                    Some(idx) => match self.request_restart(idx) {
                        Ok(()) => Response::Ok,
                        Err(message) => Response::Error { message },
                    },
                }
            }
        }
    }

    fn status(&self) -> Vec<ServiceStatus> {
        let now = Instant::now();
        self.order
            .iter()
            .map(|&idx| {
                let s = &self.services[idx];
                ServiceStatus {
                    name: s.spec.name.clone(),
                    state: s.state.as_str().into(),
                    pid: s.pid.map(Pid::as_raw),
                    restarts: s.restarts,
                    last_exit: s.last_exit.clone(),
                    uptime_s: s
                        .started_at
                        .filter(|_| s.pid.is_some())
                        .map(|t| (now - t).as_secs()),
                    ready: s.ready,
                }
            })
            .collect()
    }

    fn request_restart(&mut self, idx: usize) -> Result<(), String> {
        if self.shutdown.is_some() {
            return Err("the supervisor is shutting down".into());
        }
        let svc = &self.services[idx];
        match svc.state {
            State::Waiting => {
                let waiting: Vec<&str> = svc
                    .deps
                    .iter()
                    .filter(|&&d| !self.services[d].ready)
                    .map(|&d| self.services[d].spec.name.as_str())
                    .collect();
                Err(format!(
                    "`{}` has not started: waiting for {}",
                    self.services[idx].spec.name,
                    waiting.join(", ")
                ))
            }
            State::Stopping => Ok(()),
            State::Starting | State::Running => {
                self.stop(idx, StopCause::Restart);
                Ok(())
            }
            State::Done | State::Backoff | State::Stopped | State::Exited | State::Failed => {
                let svc = &mut self.services[idx];
                svc.quick_failures = 0;
                svc.deadline = None;
                self.schedule_restart(idx, Duration::ZERO);
                Ok(())
            }
        }
    }

    fn on_exit(&mut self, idx: usize, pid: Pid, exit: ExitKind) {
        let now = Instant::now();
        let svc = &mut self.services[idx];
        svc.pid = None;
        svc.deadline = None;
        if let Some(cancel) = svc.checker.take() {
            cancel.store(true, Ordering::SeqCst);
        }
        let ready_for = svc.ready_at.take().map_or(Duration::ZERO, |t| now - t);
        svc.started_at = None;
        svc.ready = false;
        svc.last_exit = Some(exit.to_string());
        self.track(idx, false);
        let svc = &mut self.services[idx];
        let cause = svc.stopping.take();
        let kind = svc.spec.kind;
        self.record(idx, EventKind::Exited, Some(pid), &exit.to_string());
        if self.shutdown.is_some() || cause == Some(StopCause::Shutdown) {
            self.services[idx].state = State::Stopped;
            self.record(idx, EventKind::Stopped, None, "");
            return;
        }
        match cause {
            Some(StopCause::Restart) => {
                self.services[idx].quick_failures = 0;
                self.schedule_restart(idx, Duration::ZERO);
            }
            Some(StopCause::ReadyTimeout) => self.after_failure(idx, false, Duration::ZERO),
            Some(StopCause::Shutdown) | None => {
                if kind == Kind::Oneshot && exit.success() {
                    let svc = &mut self.services[idx];
                    svc.state = State::Done;
                    svc.ready = true;
                    svc.quick_failures = 0;
                    self.record(idx, EventKind::Ready, None, "exited 0");
                    self.start_eligible();
                } else {
                    self.after_failure(idx, exit.success(), ready_for);
                }
            }
        }
    }

    /// Applies the restart policy to a process that ended on its own (or never got ready).
    fn after_failure(&mut self, idx: usize, success: bool, ready_for: Duration) {
        let svc = &mut self.services[idx];
        let outcome = backoff::decide(&svc.spec.restart, svc.quick_failures, success, ready_for);
        svc.quick_failures = outcome.quick_failures;
        match outcome.decision {
            Decision::Restart { delay } => self.schedule_restart(idx, delay),
            Decision::Stay => svc.state = State::Exited,
            Decision::CrashLoop { delay } => {
                let detail = format!(
                    "{} consecutive failures without a stable run; retrying every {}ms",
                    outcome.quick_failures,
                    delay.as_millis()
                );
                self.record(idx, EventKind::Failed, None, &detail);
                self.schedule_restart(idx, delay);
                self.services[idx].state = State::Failed;
            }
        }
    }

    fn schedule_restart(&mut self, idx: usize, delay: Duration) {
        let svc = &mut self.services[idx];
        svc.state = State::Backoff;
        svc.deadline = Some((Instant::now() + delay, Timer::Restart));
        let detail = format!("in {}ms, restart {}", delay.as_millis(), svc.restarts + 1);
        self.record(idx, EventKind::Restarting, None, &detail);
    }

    fn fire_deadlines(&mut self) {
        let now = Instant::now();
        for idx in 0..self.services.len() {
            let Some((at, timer)) = self.services[idx].deadline else {
                continue;
            };
            if at > now {
                continue;
            }
            self.services[idx].deadline = None;
            match timer {
                Timer::Restart => {
                    self.services[idx].restarts += 1;
                    self.services[idx].state = State::Waiting;
                    self.start_eligible();
                }
                Timer::ReadyTimeout => {
                    let detail = format!(
                        "not ready after {}ms",
                        self.services[idx].spec.ready_timeout.as_millis()
                    );
                    self.record(idx, EventKind::Timeout, self.services[idx].pid, &detail);
                    self.stop(idx, StopCause::ReadyTimeout);
                }
                Timer::Kill => {
                    let svc = &self.services[idx];
                    if let Some(pid) = svc.pid {
                        tracing::warn!(
                            service = %svc.spec.name,
                            "still running {}ms after {}: sending SIGKILL",
                            svc.spec.stop_timeout.as_millis(),
                            svc.spec.stop_signal.0.as_str()
                        );
                        process::signal_group(pid, Signal::SIGKILL);
                        self.services[idx].deadline =
                            Some((now + ABANDON_AFTER_KILL, Timer::Abandon));
                    }
                }
                Timer::Abandon => {
                    if let Some(pid) = self.services[idx].pid {
                        tracing::error!(
                            service = %self.services[idx].spec.name,
                            pid = pid.as_raw(),
                            "did not exit {}ms after SIGKILL: giving up on it",
                            ABANDON_AFTER_KILL.as_millis()
                        );
                        self.on_exit(idx, pid, ExitKind::Signal(Signal::SIGKILL as i32));
                    }
                }
            }
        }
    }

    /// Starts every waiting service whose dependencies are all ready, in start order.
    fn start_eligible(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        for i in 0..self.order.len() {
            let idx = self.order[i];
            let svc = &self.services[idx];
            if svc.state == State::Waiting && svc.deps.iter().all(|&d| self.services[d].ready) {
                self.start(idx);
            }
        }
    }

    fn start(&mut self, idx: usize) {
        for path in &self.services[idx].spec.stale_files {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!(service = %self.services[idx].spec.name, file = %path.display(), "removed a stale file")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(service = %self.services[idx].spec.name, file = %path.display(), "cannot remove: {e}")
                }
            }
        }
        let spawned = match process::spawn(&self.services[idx].spec) {
            Ok(spawned) => spawned,
            Err(message) => {
                tracing::error!(service = %self.services[idx].spec.name, "{message}");
                self.services[idx].last_exit = Some("not started".into());
                self.record(
                    idx,
                    EventKind::Exited,
                    None,
                    &format!("not started: {message}"),
                );
                self.after_failure(idx, false, Duration::ZERO);
                return;
            }
        };
        let now = Instant::now();
        let svc = &mut self.services[idx];
        svc.pid = Some(spawned.pid);
        svc.generation += 1;
        svc.started_at = Some(now);
        svc.ready = false;
        svc.state = State::Starting;
        let name = svc.spec.name.clone();
        let program = svc.spec.argv[0].clone();
        let raw_pid = spawned.pid.as_raw();
        for (pipe, stream) in [
            (
                Box::new(spawned.stdout) as Box<dyn std::io::Read + Send>,
                Stream::Stdout,
            ),
            (Box::new(spawned.stderr), Stream::Stderr),
        ] {
            let captured = logs::capture(
                pipe,
                name.clone(),
                stream,
                raw_pid,
                self.buffers.clone(),
                self.log_sink.clone(),
            );
            if let Err(e) = captured {
                tracing::warn!(service = %name, "cannot start a log reader thread: {e}");
            }
        }
        self.record(idx, EventKind::Started, Some(spawned.pid), &program);

        let svc = &mut self.services[idx];
        let probe = match (svc.spec.kind, &svc.spec.readiness) {
            (Kind::Daemon, Readiness::Immediate) => None,
            (Kind::Oneshot, _) => {
                svc.deadline = Some((now + svc.spec.ready_timeout, Timer::ReadyTimeout));
                return;
            }
            (Kind::Daemon, readiness) => Some(readiness.clone()),
        };
        let Some(readiness) = probe else {
            self.mark_ready(idx);
            return;
        };
        svc.deadline = Some((now + svc.spec.ready_timeout, Timer::ReadyTimeout));
        let cancel = Arc::new(AtomicBool::new(false));
        svc.checker = Some(cancel.clone());
        let tx = self.tx.clone();
        let generation = svc.generation;
        let spawned = thread::Builder::new()
            .name(format!("ready-{name}"))
            .spawn(move || {
                while !cancel.load(Ordering::SeqCst) {
                    if probe_ready(&readiness) {
                        let _ = tx.send(Event::Ready { idx, generation });
                        return;
                    }
                    thread::sleep(READINESS_POLL);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(service = %name, "cannot start the readiness checker (the ready timeout will fire): {e}");
        }
    }

    fn mark_ready(&mut self, idx: usize) {
        let svc = &mut self.services[idx];
        svc.state = State::Running;
        svc.ready = true;
        svc.ready_at = Some(Instant::now());
        svc.deadline = None;
        if let Some(cancel) = svc.checker.take() {
            cancel.store(true, Ordering::SeqCst);
        }
        let pid = svc.pid;
        self.track(idx, true);
        self.record(idx, EventKind::Ready, pid, "");
        self.start_eligible();
    }

    /// Writes the service's track file, if it has one (see `ServiceSpec::track_file`).
    fn track(&self, idx: usize, ready: bool) {
        let spec = &self.services[idx].spec;
        if let Some(path) = &spec.track_file {
            if let Err(e) = api::vip::write_track(path, ready) {
                tracing::error!(service = %spec.name, file = %path.display(), "writing the track file: {e}");
            }
        }
    }

    /// Sends the stop signal to the service's process group; SIGKILL follows after its stop
    /// timeout.
    fn stop(&mut self, idx: usize, cause: StopCause) {
        let svc = &mut self.services[idx];
        let Some(pid) = svc.pid else { return };
        if let Some(cancel) = svc.checker.take() {
            cancel.store(true, Ordering::SeqCst);
        }
        if svc.stopping.is_some() {
            // Already signalled; only what happens after the exit changes.
            svc.stopping = Some(cause);
            return;
        }
        tracing::info!(service = %svc.spec.name, pid = pid.as_raw(), "sending {}", svc.spec.stop_signal.0.as_str());
        // Not ready from the moment it is told to stop: keepalived moves the address first.
        svc.ready = false;
        self.track(idx, false);
        let svc = &mut self.services[idx];
        process::signal_group(pid, svc.spec.stop_signal.0);
        svc.state = State::Stopping;
        svc.stopping = Some(cause);
        svc.deadline = Some((Instant::now() + svc.spec.stop_timeout, Timer::Kill));
    }

    fn begin_shutdown(&mut self, reason: StopReason) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(reason);
        for svc in &mut self.services {
            if svc.pid.is_none() {
                svc.deadline = None;
                svc.state = State::Stopped;
            }
        }
        self.drive_shutdown();
    }

    /// Stops, in reverse start order, each running service none of whose dependents still
    /// runs.
    fn drive_shutdown(&mut self) {
        for i in (0..self.order.len()).rev() {
            let idx = self.order[i];
            let svc = &self.services[idx];
            let dependents_gone = svc
                .dependents
                .iter()
                .all(|&d| self.services[d].pid.is_none());
            if svc.pid.is_some() && svc.stopping != Some(StopCause::Shutdown) && dependents_gone {
                self.stop(idx, StopCause::Shutdown);
            }
        }
    }

    /// Kills and reaps every process still re-parented to us, until none is left.
    fn sweep_orphans(&mut self, rx: &Receiver<Event>) {
        let deadline = Instant::now() + ORPHAN_SWEEP_TIMEOUT;
        loop {
            let left = process::children_from_proc();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(pids = ?left, "processes left after shutdown");
                return;
            }
            for &pid in &left {
                tracing::info!(pid = pid.as_raw(), "killing leftover descendant");
                process::kill_hard(pid);
            }
            match rx.recv_timeout(SWEEP_INTERVAL) {
                Ok(Event::Signal(SignalEvent::Exited { pid, exit })) => {
                    tracing::debug!(pid = pid.as_raw(), "reaped leftover ({exit})");
                }
                Ok(Event::Control(_, reply)) => {
                    let _ = reply.send(Response::Error {
                        message: "the supervisor is shutting down".into(),
                    });
                }
                Ok(_) | Err(_) => {}
            }
        }
    }

    fn record(&self, idx: usize, kind: EventKind, pid: Option<Pid>, detail: &str) {
        let service = &self.services[idx].spec.name;
        let raw_pid = pid.map(Pid::as_raw);
        match kind {
            EventKind::Failed => {
                tracing::error!(service = %service, pid = raw_pid, "{kind}: {detail}")
            }
            EventKind::Timeout | EventKind::Restarting => {
                tracing::warn!(service = %service, pid = raw_pid, "{kind}: {detail}")
            }
            // A oneshot finishing with 0 is its normal end, not a warning.
            EventKind::Exited if self.shutdown.is_none() && detail != "code 0" => {
                tracing::warn!(service = %service, pid = raw_pid, "{kind}: {detail}")
            }
            _ => tracing::info!(service = %service, pid = raw_pid, "{kind} {detail}"),
        }
        match self.db.record(now_ms(), service, kind, raw_pid, detail) {
            Ok(event) => {
                if let Some(sink) = &self.event_sink {
                    let _ = sink.send(event);
                }
            }
            // PID 1 keeps going when the data partition is full or broken.
            Err(e) => tracing::error!("{e}"),
        }
    }
}

fn probe_ready(readiness: &Readiness) -> bool {
    match readiness {
        Readiness::Immediate | Readiness::Exit => true,
        Readiness::Tcp { addr } => TcpStream::connect_timeout(addr, PROBE_TIMEOUT).is_ok(),
        Readiness::UnixSocket { path } => UnixStream::connect(path).is_ok(),
    }
}
