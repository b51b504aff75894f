//! The event loop: carries out the [`Runner`]'s effects and feeds what happened back to it.
//!
//! One thread owns the runner. It takes [`Input`]s (reaped children and signals from the
//! signal thread, readiness answers from probe threads, control requests from the control
//! server) from one channel, turns each into an [`Event`] for [`Runner::handle`], and performs
//! the returned [`Effect`]s: spawning (with the log readers of the new process), signalling,
//! probing on a short-lived thread, writing track files, the state DB and the event sink, and
//! answering control requests. Effects whose outcome is immediate (spawning, listing the
//! children) are answered at once, before anything else, so the runner sees them in order.
//! When no input comes before [`Runner::next_deadline`] the runner gets an [`Event::Tick`].

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::logs::{self, LogBuffers};
use super::now_ms;
use super::process::{self, SignalEvent};
use super::runner::{Effect, Event, Runner};
use super::spec::Readiness;
use super::{StopReason, SupervisorOptions};
use crate::state::StateDb;
use api::control::{LogLine, Request, Response, Stream};
use api::events::EventRecord;

/// How long one TCP readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// What other threads send the event loop.
pub(crate) enum Input {
    /// From the signal thread.
    Signal(SignalEvent),
    /// From a probe thread.
    Probed {
        service: usize,
        generation: u64,
        ready: bool,
    },
    /// From the control server: the request and where its answer goes.
    Control(Request, Sender<Response>),
}

pub(crate) struct Executor {
    runner: Runner,
    db: StateDb,
    event_sink: Option<logmon::store::QueueSender<EventRecord>>,
    log_sink: Option<logmon::store::QueueSender<LogLine>>,
    buffers: Arc<LogBuffers>,
    /// For probe threads; also keeps the channel open.
    tx: Sender<Input>,
    /// Control requests waiting for their answer, by id.
    replies: HashMap<u64, Sender<Response>>,
    next_request: u64,
    exit: Option<StopReason>,
}

impl Executor {
    pub(crate) fn new(
        runner: Runner,
        db: StateDb,
        opts: &SupervisorOptions,
        tx: Sender<Input>,
    ) -> Executor {
        Executor {
            runner,
            db,
            event_sink: opts.event_sink.clone(),
            log_sink: opts.log_sink.clone(),
            buffers: Arc::default(),
            tx,
            replies: HashMap::new(),
            next_request: 0,
            exit: None,
        }
    }

    /// Runs until shutdown is complete, including the sweep of leftover descendants.
    pub(crate) fn run(mut self, rx: &Receiver<Input>) -> StopReason {
        self.dispatch(Event::Start);
        loop {
            if let Some(reason) = self.exit {
                return reason;
            }
            let input = match self.runner.next_deadline() {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(input) => Some(input),
                    Err(RecvTimeoutError::Timeout) => None,
                    // Unreachable: `self.tx` keeps the channel open.
                    Err(RecvTimeoutError::Disconnected) => return StopReason::Terminate,
                },
                None => match rx.recv() {
                    Ok(input) => Some(input),
                    Err(_) => return StopReason::Terminate,
                },
            };
            let event = match input {
                None => Event::Tick,
                Some(Input::Signal(SignalEvent::Exited { pid, exit })) => {
                    Event::Exited { pid, exit }
                }
                Some(Input::Signal(SignalEvent::Shutdown(sig))) => Event::Signal(sig),
                Some(Input::Probed {
                    service,
                    generation,
                    ready,
                }) => Event::Probed {
                    service,
                    generation,
                    ready,
                },
                Some(Input::Control(request, reply)) => {
                    let id = self.next_request;
                    self.next_request += 1;
                    self.replies.insert(id, reply);
                    Event::Control { id, request }
                }
            };
            self.dispatch(event);
        }
    }

    /// Hands `event` to the runner and performs its effects.
    fn dispatch(&mut self, event: Event) {
        let effects = self.runner.handle(event, Instant::now());
        for effect in effects {
            self.perform(effect);
        }
    }

    fn perform(&mut self, effect: Effect) {
        match effect {
            Effect::Spawn(service) => {
                let answer = self.spawn(service);
                self.dispatch(answer);
            }
            Effect::BeforeShutdown(service) => {
                let spec = self.runner.spec(service);
                for argv in &spec.before_shutdown {
                    let t0 = Instant::now();
                    match process::run_to_end(argv, super::spec::BEFORE_SHUTDOWN_TIMEOUT) {
                        Ok(()) => tracing::info!(
                            service = %spec.name,
                            command = %argv.join(" "),
                            elapsed_ms = t0.elapsed().as_millis() as u64,
                            "before shutdown: ran"
                        ),
                        Err(e) => tracing::warn!(
                            service = %spec.name,
                            command = %argv.join(" "),
                            "before shutdown: {e}"
                        ),
                    }
                }
            }
            Effect::Signal { pgid, signal } => process::signal_group(pgid, signal),
            Effect::Probe {
                service,
                generation,
            } => self.probe(service, generation),
            Effect::Track { service, ready } => {
                let spec = self.runner.spec(service);
                if let Some(path) = &spec.track_file {
                    if let Err(e) = api::vip::write_track(path, ready) {
                        tracing::error!(service = %spec.name, file = %path.display(), "writing the track file: {e}");
                    }
                }
            }
            Effect::Record {
                service,
                kind,
                pid,
                detail,
            } => {
                let name = &self.runner.spec(service).name;
                match self
                    .db
                    .record(now_ms(), name, kind, pid.map(Pid::as_raw), &detail)
                {
                    Ok(event) => {
                        if let Some(sink) = &self.event_sink {
                            let _ = sink.send(event);
                        }
                    }
                    // PID 1 keeps going when the data partition is full or broken.
                    Err(e) => tracing::error!("{e}"),
                }
            }
            Effect::Reply { id, response } => self.reply(id, response),
            Effect::SendLogs { id, service, lines } => {
                let lines = self.buffers.tail(&self.runner.spec(service).name, lines);
                self.reply(id, Response::Logs { lines });
            }
            Effect::ListChildren => {
                let children = process::children_from_proc();
                self.dispatch(Event::Children(children));
            }
            Effect::KillLeftover(pid) => process::kill_hard(pid),
            Effect::Exit(reason) => self.exit = Some(reason),
        }
    }

    fn reply(&mut self, id: u64, response: Response) {
        if let Some(reply) = self.replies.remove(&id) {
            // The requester may have given up waiting.
            let _ = reply.send(response);
        }
    }

    /// Removes the service's stale files, starts it and its log readers.
    fn spawn(&self, service: usize) -> Event {
        let spec = self.runner.spec(service);
        for path in &spec.stale_files {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!(service = %spec.name, file = %path.display(), "removed a stale file")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(service = %spec.name, file = %path.display(), "cannot remove: {e}")
                }
            }
        }
        let spawned = match process::spawn(spec) {
            Ok(spawned) => spawned,
            Err(message) => return Event::SpawnFailed { service, message },
        };
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
                spec.name.clone(),
                stream,
                raw_pid,
                self.buffers.clone(),
                self.log_sink.clone(),
            );
            if let Err(e) = captured {
                tracing::warn!(service = %spec.name, "cannot start a log reader thread: {e}");
            }
        }
        Event::Spawned {
            service,
            pid: spawned.pid,
        }
    }

    /// Probes readiness once on a thread of its own (a TCP connect may take
    /// [`PROBE_TIMEOUT`]); the answer comes back through the channel.
    fn probe(&self, service: usize, generation: u64) {
        let spec = self.runner.spec(service);
        let readiness = spec.readiness.clone();
        let tx = self.tx.clone();
        let spawned = thread::Builder::new()
            .name(format!("ready-{}", spec.name))
            .spawn(move || {
                let ready = probe_ready(&readiness);
                let _ = tx.send(Input::Probed {
                    service,
                    generation,
                    ready,
                });
            });
        if let Err(e) = spawned {
            tracing::warn!(service = %spec.name, "cannot start a readiness probe thread: {e}");
            // Counted as not ready: the runner tries again after its poll interval.
            let _ = self.tx.send(Input::Probed {
                service,
                generation,
                ready: false,
            });
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
