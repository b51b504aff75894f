//! The supervisor's decisions: a state machine that owns every service's state.
//!
//! [`Runner::handle`] takes one [`Event`] and the time, updates the services and returns the
//! [`Effect`]s to carry out. It makes no system call and reads no clock: the executor
//! (`executor.rs`) spawns, signals, probes and writes, and feeds what happened back as events.
//! Deadlines (restart timers, readiness timeouts and retries, SIGKILL after the stop timeout,
//! the orphan sweep) are kept here; [`Runner::next_deadline`] says when the executor must call
//! again, with [`Event::Tick`] if nothing else happened by then.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::backoff::{self, Decision};
use super::process::ExitKind;
use super::spec::{Kind, Readiness, ServiceSpec};
use super::StopReason;
use api::control::{Request, Response, ServiceStatus};
use api::events::EventKind;

/// How long after a failed readiness probe the next one runs.
pub(crate) const READINESS_POLL: Duration = Duration::from_millis(50);
/// At shutdown, how long leftover descendants get to disappear after SIGKILL.
pub(crate) const ORPHAN_SWEEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A process still there this long after SIGKILL (stuck in the kernel) is given up on, so
/// that shutdown cannot hang.
pub(crate) const ABANDON_AFTER_KILL: Duration = Duration::from_secs(5);
/// Pause between two scans for leftover descendants.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_millis(20);

/// What happened; services are named by their index in the spec list.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// The supervisor begins: start what has no dependency.
    Start,
    /// Only time passed (a deadline from [`Runner::next_deadline`] is due).
    Tick,
    /// A child was reaped (a service's process, or any other descendant).
    Exited { pid: Pid, exit: ExitKind },
    /// [`Effect::Spawn`] started the process.
    Spawned { service: usize, pid: Pid },
    /// [`Effect::Spawn`] could not start it.
    SpawnFailed { service: usize, message: String },
    /// The answer to [`Effect::Probe`].
    Probed {
        service: usize,
        generation: u64,
        ready: bool,
    },
    /// A control request; answered by [`Effect::Reply`] or [`Effect::SendLogs`] with its id.
    Control { id: u64, request: Request },
    /// SIGTERM, SIGINT or SIGHUP to the supervisor.
    Signal(Signal),
    /// The answer to [`Effect::ListChildren`]: every process whose parent is the supervisor.
    Children(Vec<Pid>),
}

/// What the executor must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Remove the service's stale files and start its process; answer with
    /// [`Event::Spawned`] or [`Event::SpawnFailed`] before any other event.
    Spawn(usize),
    /// Run the service's `before_shutdown` commands, in order, each to its end or its timeout,
    /// before the effects that follow.
    BeforeShutdown(usize),
    /// Send `signal` to the process group `pgid` (gone already is fine).
    Signal { pgid: Pid, signal: Signal },
    /// Check the service's readiness once, without blocking the loop; answer with
    /// [`Event::Probed`].
    Probe { service: usize, generation: u64 },
    /// Write the service's track file (it has one).
    Track { service: usize, ready: bool },
    /// Write a service event to the state DB and the event sink (already logged).
    Record {
        service: usize,
        kind: EventKind,
        pid: Option<Pid>,
        detail: String,
    },
    /// Answer control request `id`.
    Reply { id: u64, response: Response },
    /// Answer control request `id` with the last `lines` output lines of the service.
    SendLogs {
        id: u64,
        service: usize,
        lines: usize,
    },
    /// List the supervisor's children; answer with [`Event::Children`].
    ListChildren,
    /// SIGKILL a leftover descendant (and the group it leads).
    KillLeftover(Pid),
    /// Everything is stopped and swept: the supervisor returns `reason`.
    Exit(StopReason),
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
    /// [`Effect::Spawn`] was emitted and its answer has not come yet.
    spawning: bool,
    /// Bumped at every start; readiness reports of an older process are ignored.
    generation: u64,
    started_at: Option<Instant>,
    ready_at: Option<Instant>,
    ready: bool,
    restarts: u32,
    quick_failures: u32,
    last_exit: Option<String>,
    deadline: Option<(Instant, Timer)>,
    /// When to probe readiness again (none while a probe runs).
    probe_at: Option<Instant>,
    stopping: Option<StopCause>,
}

impl Service {
    /// Whether a process of this service exists or is being started.
    fn alive(&self) -> bool {
        self.pid.is_some() || self.spawning
    }
}

/// The final sweep of leftover descendants, once every service has stopped.
struct Sweep {
    /// Leftovers still there then are given up on.
    deadline: Instant,
    /// When to list the children again (none while a listing is asked for).
    next: Option<Instant>,
}

pub(crate) struct Runner {
    services: Vec<Service>,
    order: Vec<usize>,
    shutdown: Option<StopReason>,
    sweep: Option<Sweep>,
    /// [`Effect::Exit`] was emitted.
    finished: bool,
    /// The effects of the event being handled.
    effects: Vec<Effect>,
}

impl Runner {
    /// `order` is the start order from [`super::validate`].
    pub(crate) fn new(specs: Vec<ServiceSpec>, order: Vec<usize>) -> Runner {
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
                spawning: false,
                generation: 0,
                started_at: None,
                ready_at: None,
                ready: false,
                restarts: 0,
                quick_failures: 0,
                last_exit: None,
                deadline: None,
                probe_at: None,
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
            shutdown: None,
            sweep: None,
            finished: false,
            effects: Vec::new(),
        }
    }

    /// The spec of service `idx` (as named in events and effects).
    pub(crate) fn spec(&self, idx: usize) -> &ServiceSpec {
        &self.services[idx].spec
    }

    /// When the executor must call [`Runner::handle`] again if no event came by then.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        let services = self
            .services
            .iter()
            .flat_map(|s| [s.deadline.map(|(at, _)| at), s.probe_at]);
        let sweep = self.sweep.as_ref().and_then(|s| s.next);
        services.chain([sweep]).flatten().min()
    }

    /// Takes one event at `now`; returns what to do.
    pub(crate) fn handle(&mut self, event: Event, now: Instant) -> Vec<Effect> {
        if self.finished {
            // The executor stops at `Exit`; a late request still gets an answer.
            if let Event::Control { id, .. } = event {
                self.reply_shutting_down(id);
            }
            return std::mem::take(&mut self.effects);
        }
        match event {
            Event::Start => self.start_eligible(),
            Event::Tick => {}
            Event::Exited { pid, exit } => {
                match self.services.iter().position(|s| s.pid == Some(pid)) {
                    Some(idx) => self.on_exit(idx, pid, exit, now),
                    None => {
                        tracing::debug!(pid = pid.as_raw(), "reaped orphan ({exit})");
                        if let Some(sweep) = &mut self.sweep {
                            // Look again at once rather than after the interval.
                            sweep.next = Some(now);
                        }
                    }
                }
            }
            Event::Spawned { service, pid } => self.on_spawned(service, pid, now),
            Event::SpawnFailed { service, message } => self.on_spawn_failed(service, &message, now),
            Event::Probed {
                service,
                generation,
                ready,
            } => {
                let svc = &mut self.services[service];
                let current = svc.generation == generation
                    && svc.state == State::Starting
                    && svc.pid.is_some();
                if current {
                    if ready {
                        self.mark_ready(service, now);
                    } else {
                        svc.probe_at = Some(now + READINESS_POLL);
                    }
                }
            }
            Event::Signal(sig) => self.on_signal(sig, now),
            Event::Control { id, request } => {
                if self.sweep.is_some() {
                    self.reply_shutting_down(id);
                } else {
                    self.control(id, request, now);
                }
            }
            Event::Children(left) => self.on_children(&left, now),
        }
        self.fire_deadlines(now);
        if self.shutdown.is_some() {
            self.drive_shutdown(now);
        }
        std::mem::take(&mut self.effects)
    }

    fn on_signal(&mut self, sig: Signal, now: Instant) {
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
                    self.effects.push(Effect::Signal {
                        pgid: pid,
                        signal: Signal::SIGKILL,
                    });
                }
            }
        } else {
            tracing::info!("{}: stopping every service", sig.as_str());
            self.begin_shutdown(reason, now);
        }
    }

    fn reply_shutting_down(&mut self, id: u64) {
        self.effects.push(Effect::Reply {
            id,
            response: Response::Error {
                message: "the supervisor is shutting down".into(),
            },
        });
    }

    fn control(&mut self, id: u64, request: Request, now: Instant) {
        let response = match request {
            Request::Status => Response::Status {
                services: self.status(now),
            },
            Request::Logs { service, lines } => {
                match self.services.iter().position(|s| s.spec.name == service) {
                    Some(idx) => {
                        self.effects.push(Effect::SendLogs {
                            id,
                            service: idx,
                            lines,
                        });
                        return;
                    }
                    None => Response::Error {
                        message: format!("no service `{service}`"),
                    },
                }
            }
            Request::Stop => {
                tracing::info!("stop requested: stopping every service");
                self.begin_shutdown(StopReason::Requested, now);
                Response::Ok
            }
            Request::Reconfigure => {
                tracing::info!(
                    "reconfigure requested: stopping every service to plan the node again"
                );
                self.begin_shutdown(StopReason::Reconfigure, now);
                Response::Ok
            }
            Request::Signal { service, signal } => self.signal_request(&service, &signal),
            Request::Restart { service } => {
                match self.services.iter().position(|s| s.spec.name == service) {
                    None => Response::Error {
                        message: format!("no service `{service}`"),
                    },
                    Some(idx) => match self.request_restart(idx, now) {
                        Ok(()) => Response::Ok,
                        Err(message) => Response::Error { message },
                    },
                }
            }
        };
        self.effects.push(Effect::Reply { id, response });
    }

    fn signal_request(&mut self, service: &str, signal: &str) -> Response {
        let Some(idx) = self.services.iter().position(|s| s.spec.name == service) else {
            return Response::Error {
                message: format!("no service `{service}`"),
            };
        };
        let sig = api::control::SIGNALS
            .contains(&signal)
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
                self.effects.push(Effect::Signal {
                    pgid: pid,
                    signal: sig,
                });
                Response::Ok
            }
            None => Response::Error {
                message: format!("`{service}` has no running process"),
            },
        }
    }

    fn status(&self, now: Instant) -> Vec<ServiceStatus> {
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
                        .map(|t| now.saturating_duration_since(t).as_secs()),
                    ready: s.ready,
                }
            })
            .collect()
    }

    fn request_restart(&mut self, idx: usize, now: Instant) -> Result<(), String> {
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
                self.stop(idx, StopCause::Restart, now);
                Ok(())
            }
            State::Done | State::Backoff | State::Stopped | State::Exited | State::Failed => {
                let svc = &mut self.services[idx];
                svc.quick_failures = 0;
                svc.deadline = None;
                self.schedule_restart(idx, Duration::ZERO, now);
                Ok(())
            }
        }
    }

    fn on_spawned(&mut self, idx: usize, pid: Pid, now: Instant) {
        let svc = &mut self.services[idx];
        svc.spawning = false;
        svc.pid = Some(pid);
        svc.generation += 1;
        svc.started_at = Some(now);
        svc.ready = false;
        svc.state = State::Starting;
        let program = svc.spec.argv[0].clone();
        self.record(idx, EventKind::Started, Some(pid), &program);
        let svc = &mut self.services[idx];
        match (svc.spec.kind, &svc.spec.readiness) {
            (Kind::Daemon, Readiness::Immediate) => self.mark_ready(idx, now),
            (Kind::Oneshot, _) => {
                svc.deadline = Some((now + svc.spec.ready_timeout, Timer::ReadyTimeout));
            }
            (Kind::Daemon, _) => {
                svc.deadline = Some((now + svc.spec.ready_timeout, Timer::ReadyTimeout));
                let generation = svc.generation;
                self.effects.push(Effect::Probe {
                    service: idx,
                    generation,
                });
            }
        }
    }

    fn on_spawn_failed(&mut self, idx: usize, message: &str, now: Instant) {
        let svc = &mut self.services[idx];
        svc.spawning = false;
        svc.last_exit = Some("not started".into());
        tracing::error!(service = %svc.spec.name, "{message}");
        self.record(
            idx,
            EventKind::Exited,
            None,
            &format!("not started: {message}"),
        );
        if self.shutdown.is_some() {
            self.services[idx].state = State::Stopped;
        } else {
            self.after_failure(idx, false, Duration::ZERO, now);
        }
    }

    fn on_exit(&mut self, idx: usize, pid: Pid, exit: ExitKind, now: Instant) {
        let svc = &mut self.services[idx];
        svc.pid = None;
        svc.deadline = None;
        svc.probe_at = None;
        let ready_for = svc
            .ready_at
            .take()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
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
                self.schedule_restart(idx, Duration::ZERO, now);
            }
            Some(StopCause::ReadyTimeout) => self.after_failure(idx, false, Duration::ZERO, now),
            Some(StopCause::Shutdown) | None => {
                if kind == Kind::Oneshot && exit.success() {
                    let svc = &mut self.services[idx];
                    svc.state = State::Done;
                    svc.ready = true;
                    svc.quick_failures = 0;
                    self.record(idx, EventKind::Ready, None, "exited 0");
                    self.start_eligible();
                } else {
                    self.after_failure(idx, exit.success(), ready_for, now);
                }
            }
        }
    }

    /// Applies the restart policy to a process that ended on its own (or never got ready).
    fn after_failure(&mut self, idx: usize, success: bool, ready_for: Duration, now: Instant) {
        let svc = &mut self.services[idx];
        let outcome = backoff::decide(&svc.spec.restart, svc.quick_failures, success, ready_for);
        svc.quick_failures = outcome.quick_failures;
        match outcome.decision {
            Decision::Restart { delay } => self.schedule_restart(idx, delay, now),
            Decision::Stay => svc.state = State::Exited,
            Decision::CrashLoop { delay } => {
                let detail = format!(
                    "{} consecutive failures without a stable run; retrying every {}ms",
                    outcome.quick_failures,
                    delay.as_millis()
                );
                self.record(idx, EventKind::Failed, None, &detail);
                self.schedule_restart(idx, delay, now);
                self.services[idx].state = State::Failed;
            }
        }
    }

    fn schedule_restart(&mut self, idx: usize, delay: Duration, now: Instant) {
        let svc = &mut self.services[idx];
        svc.state = State::Backoff;
        svc.deadline = Some((now + delay, Timer::Restart));
        let detail = format!("in {}ms, restart {}", delay.as_millis(), svc.restarts + 1);
        self.record(idx, EventKind::Restarting, None, &detail);
    }

    fn fire_deadlines(&mut self, now: Instant) {
        for idx in 0..self.services.len() {
            self.fire_timer(idx, now);
            // After the timer: a readiness timeout cancels the probe.
            let svc = &mut self.services[idx];
            if svc.probe_at.is_some_and(|at| at <= now) {
                svc.probe_at = None;
                self.effects.push(Effect::Probe {
                    service: idx,
                    generation: svc.generation,
                });
            }
        }
        if let Some(sweep) = &mut self.sweep {
            if sweep.next.is_some_and(|at| at <= now) {
                sweep.next = None;
                self.effects.push(Effect::ListChildren);
            }
        }
    }

    fn fire_timer(&mut self, idx: usize, now: Instant) {
        let Some((at, timer)) = self.services[idx].deadline else {
            return;
        };
        if at > now {
            return;
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
                self.stop(idx, StopCause::ReadyTimeout, now);
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
                    self.effects.push(Effect::Signal {
                        pgid: pid,
                        signal: Signal::SIGKILL,
                    });
                    self.services[idx].deadline = Some((now + ABANDON_AFTER_KILL, Timer::Abandon));
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
                    self.on_exit(idx, pid, ExitKind::Signal(Signal::SIGKILL as i32), now);
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
            if svc.state == State::Waiting
                && !svc.spawning
                && svc.deps.iter().all(|&d| self.services[d].ready)
            {
                let svc = &mut self.services[idx];
                svc.spawning = true;
                svc.state = State::Starting;
                self.effects.push(Effect::Spawn(idx));
            }
        }
    }

    fn mark_ready(&mut self, idx: usize, now: Instant) {
        let svc = &mut self.services[idx];
        svc.state = State::Running;
        svc.ready = true;
        svc.ready_at = Some(now);
        svc.deadline = None;
        svc.probe_at = None;
        let pid = svc.pid;
        self.track(idx, true);
        self.record(idx, EventKind::Ready, pid, "");
        self.start_eligible();
    }

    /// Has the service's track file written, if it has one (see `ServiceSpec::track_file`).
    fn track(&mut self, idx: usize, ready: bool) {
        if self.services[idx].spec.track_file.is_some() {
            self.effects.push(Effect::Track {
                service: idx,
                ready,
            });
        }
    }

    /// Sends the stop signal to the service's process group; SIGKILL follows after its stop
    /// timeout.
    fn stop(&mut self, idx: usize, cause: StopCause, now: Instant) {
        let svc = &mut self.services[idx];
        let Some(pid) = svc.pid else { return };
        svc.probe_at = None;
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
        if cause == StopCause::Shutdown && !svc.spec.before_shutdown.is_empty() {
            self.effects.push(Effect::BeforeShutdown(idx));
        }
        self.effects.push(Effect::Signal {
            pgid: pid,
            signal: svc.spec.stop_signal.0,
        });
        svc.state = State::Stopping;
        svc.stopping = Some(cause);
        svc.deadline = Some((now + svc.spec.stop_timeout, Timer::Kill));
    }

    fn begin_shutdown(&mut self, reason: StopReason, now: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(reason);
        for svc in &mut self.services {
            if !svc.alive() {
                svc.deadline = None;
                svc.state = State::Stopped;
            }
        }
        self.drive_shutdown(now);
    }

    /// Stops, in reverse start order, each running service none of whose dependents still
    /// runs; once none runs, sweeps leftover descendants, then exits.
    fn drive_shutdown(&mut self, now: Instant) {
        for i in (0..self.order.len()).rev() {
            let idx = self.order[i];
            let svc = &self.services[idx];
            let dependents_gone = svc.dependents.iter().all(|&d| !self.services[d].alive());
            if svc.pid.is_some() && svc.stopping != Some(StopCause::Shutdown) && dependents_gone {
                self.stop(idx, StopCause::Shutdown, now);
            }
        }
        if self.sweep.is_none() && self.services.iter().all(|s| !s.alive()) {
            self.sweep = Some(Sweep {
                deadline: now + ORPHAN_SWEEP_TIMEOUT,
                next: None,
            });
            self.effects.push(Effect::ListChildren);
        }
    }

    /// Kills every process still re-parented to us, until none is left or the sweep's time is
    /// up.
    fn on_children(&mut self, left: &[Pid], now: Instant) {
        let Some(sweep) = &mut self.sweep else {
            return;
        };
        if !left.is_empty() && now < sweep.deadline {
            for &pid in left {
                tracing::info!(pid = pid.as_raw(), "killing leftover descendant");
                self.effects.push(Effect::KillLeftover(pid));
            }
            sweep.next = Some(now + SWEEP_INTERVAL);
            return;
        }
        if !left.is_empty() {
            tracing::warn!(pids = ?left, "processes left after shutdown");
        }
        self.finished = true;
        let reason = self.shutdown.unwrap_or(StopReason::Terminate);
        self.effects.push(Effect::Exit(reason));
    }

    fn record(&mut self, idx: usize, kind: EventKind, pid: Option<Pid>, detail: &str) {
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
        self.effects.push(Effect::Record {
            service: idx,
            kind,
            pid,
            detail: detail.to_string(),
        });
    }
}

#[cfg(test)]
mod tests;
