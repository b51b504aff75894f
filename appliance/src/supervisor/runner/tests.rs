//! The supervisor's decisions as tables: each step is an event at a time (milliseconds from
//! the start) and the effects it must give, as text. No process, no clock, no sleep.
//!
//! Events: `start`, `tick`, `spawned SVC PID`, `spawn-failed SVC MESSAGE`,
//! `probed SVC GENERATION yes|no`, `exited PID code N|signal N`, `signal TERM|INT|HUP`,
//! `children PID...`, and the control requests `status`, `stop`, `restart SVC`,
//! `send SVC SIGNAL`, `logs SVC LINES`.
//!
//! Effects: `spawn SVC`, `before shutdown SVC`, `signal PGID SIGX`, `probe SVC #GENERATION`, `track SVC ready|down`,
//! `SVC:KIND [PID] [DETAIL]` (a recorded event), `ok`, `error: MESSAGE`, `status: SVC=STATE...`,
//! `send N lines of SVC's output`, `list children`, `kill leftover PID`, `exit REASON`, and
//! last `wake @MS` when the runner wants to be called again by then.

use serde_json::{json, Value};

use super::*;

struct Sim {
    runner: Runner,
    t0: Instant,
    next_id: u64,
}

impl Sim {
    fn new(specs: Value) -> Sim {
        let specs: Vec<ServiceSpec> = serde_json::from_value(specs).unwrap();
        let order = crate::supervisor::validate(&specs).unwrap();
        Sim {
            runner: Runner::new(specs, order),
            t0: Instant::now(),
            next_id: 0,
        }
    }

    fn service(&self, name: &str) -> usize {
        self.runner
            .services
            .iter()
            .position(|s| s.spec.name == name)
            .unwrap_or_else(|| panic!("no service {name} in the test's specs"))
    }

    fn name(&self, idx: usize) -> &str {
        &self.runner.services[idx].spec.name
    }

    fn step(&mut self, step: &str) -> Vec<String> {
        let (at, event) = step.split_once(' ').unwrap();
        let ms: u64 = at.strip_prefix('@').unwrap().parse().unwrap();
        let words: Vec<&str> = event.split(' ').collect();
        let event = self.event(&words);
        let effects = self
            .runner
            .handle(event, self.t0 + Duration::from_millis(ms));
        let mut out: Vec<String> = effects.iter().map(|e| self.render(e)).collect();
        if let Some(at) = self.runner.next_deadline() {
            out.push(format!("wake @{}", (at - self.t0).as_millis()));
        }
        out
    }

    fn event(&mut self, words: &[&str]) -> Event {
        let pid = |s: &str| Pid::from_raw(s.parse().unwrap());
        let mut control = |request| {
            self.next_id += 1;
            Event::Control {
                id: self.next_id,
                request,
            }
        };
        match words {
            ["start"] => Event::Start,
            ["tick"] => Event::Tick,
            ["spawned", name, p] => Event::Spawned {
                service: self.service(name),
                pid: pid(p),
            },
            ["spawn-failed", name, message @ ..] => Event::SpawnFailed {
                service: self.service(name),
                message: message.join(" "),
            },
            ["probed", name, generation, ready] => Event::Probed {
                service: self.service(name),
                generation: generation.parse().unwrap(),
                ready: *ready == "yes",
            },
            ["exited", p, how, n] => Event::Exited {
                pid: pid(p),
                exit: match *how {
                    "code" => ExitKind::Code(n.parse().unwrap()),
                    _ => ExitKind::Signal(n.parse().unwrap()),
                },
            },
            ["signal", sig] => Event::Signal(format!("SIG{sig}").parse().unwrap()),
            ["children", pids @ ..] => Event::Children(pids.iter().map(|p| pid(p)).collect()),
            ["status"] => control(Request::Status),
            ["stop"] => control(Request::Stop),
            ["restart", name] => control(Request::Restart {
                service: name.to_string(),
            }),
            ["send", name, signal] => control(Request::Signal {
                service: name.to_string(),
                signal: signal.to_string(),
            }),
            ["logs", name, lines] => control(Request::Logs {
                service: name.to_string(),
                lines: lines.parse().unwrap(),
            }),
            _ => panic!("unknown test event {words:?}"),
        }
    }

    fn render(&self, effect: &Effect) -> String {
        match effect {
            Effect::Spawn(idx) => format!("spawn {}", self.name(*idx)),
            Effect::BeforeShutdown(idx) => format!("before shutdown {}", self.name(*idx)),
            Effect::Signal { pgid, signal } => format!("signal {pgid} {}", signal.as_str()),
            Effect::Probe {
                service,
                generation,
            } => format!("probe {} #{generation}", self.name(*service)),
            Effect::Track { service, ready } => {
                let state = if *ready { "ready" } else { "down" };
                format!("track {} {state}", self.name(*service))
            }
            Effect::Record {
                service,
                kind,
                pid,
                detail,
            } => {
                let mut line = format!("{}:{kind}", self.name(*service));
                if let Some(pid) = pid {
                    line += &format!(" {pid}");
                }
                if !detail.is_empty() {
                    line += &format!(" {detail}");
                }
                line
            }
            Effect::Reply { response, .. } => match response {
                Response::Ok => "ok".into(),
                Response::Error { message } => format!("error: {message}"),
                Response::Status { services } => {
                    let services: Vec<String> = services.iter().map(status).collect();
                    format!("status: {}", services.join(" "))
                }
                Response::Logs { .. } => panic!("the runner never reads logs"),
            },
            Effect::SendLogs { service, lines, .. } => {
                format!("send {lines} lines of {}'s output", self.name(*service))
            }
            Effect::ListChildren => "list children".into(),
            Effect::KillLeftover(pid) => format!("kill leftover {pid}"),
            Effect::Exit(reason) => format!("exit {reason:?}"),
        }
    }
}

/// `name=state[/pid][,restarts=N][,last=EXIT]`.
fn status(s: &ServiceStatus) -> String {
    let mut out = format!("{}={}", s.name, s.state);
    if let Some(pid) = s.pid {
        out += &format!("/{pid}");
    }
    if s.restarts > 0 {
        out += &format!(",restarts={}", s.restarts);
    }
    if let Some(last) = &s.last_exit {
        out += &format!(",last={last}");
    }
    out
}

fn check(specs: Value, steps: &[(&str, &[&str])]) {
    let mut sim = Sim::new(specs);
    for (i, (step, expected)) in steps.iter().enumerate() {
        let got = sim.step(step);
        assert_eq!(got, *expected, "step {i}: `{step}`");
    }
}

#[test]
fn starts_in_dependency_order_and_stops_in_reverse() {
    // Listed dependents first, so file order is not start order.
    let specs = json!([
        { "name": "top", "argv": ["sleep"], "deps": ["middle"] },
        { "name": "middle", "argv": ["sleep"], "deps": ["web", "setup"] },
        { "name": "web", "argv": ["server"], "readiness": { "type": "tcp", "addr": "127.0.0.1:1" } },
        { "name": "setup", "argv": ["init"], "kind": "oneshot" },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn web", "spawn setup"]),
            (
                "@0 spawned web 11",
                &["web:started 11 server", "probe web #1", "wake @30000"],
            ),
            (
                "@0 spawned setup 12",
                &["setup:started 12 init", "wake @30000"],
            ),
            // Not listening yet: probed again after the poll interval.
            ("@5 probed web 1 no", &["wake @55"]),
            ("@55 tick", &["probe web #1", "wake @30000"]),
            // Ready, but `middle` also waits for `setup`.
            ("@60 probed web 1 yes", &["web:ready 11", "wake @30000"]),
            (
                "@60 status",
                &[
                    "status: web=running/11 setup=starting/12 middle=waiting top=waiting",
                    "wake @30000",
                ],
            ),
            (
                "@60 restart middle",
                &[
                    "error: `middle` has not started: waiting for setup",
                    "wake @30000",
                ],
            ),
            (
                "@200 exited 12 code 0",
                &["setup:exited 12 code 0", "setup:ready exited 0", "spawn middle"],
            ),
            (
                "@200 spawned middle 13",
                &["middle:started 13 sleep", "middle:ready 13", "spawn top"],
            ),
            ("@200 spawned top 14", &["top:started 14 sleep", "top:ready 14"]),
            (
                "@300 status",
                &["status: web=running/11 setup=done,last=code 0 middle=running/13 top=running/14"],
            ),
            // Reverse order: each service once its dependents are gone; the finished oneshot
            // is not stopped again.
            ("@1000 stop", &["signal 14 SIGTERM", "ok", "wake @6000"]),
            (
                "@1010 exited 14 signal 15",
                &[
                    "top:exited 14 signal 15 (SIGTERM)",
                    "top:stopped",
                    "signal 13 SIGTERM",
                    "wake @6010",
                ],
            ),
            (
                "@1020 exited 13 signal 15",
                &[
                    "middle:exited 13 signal 15 (SIGTERM)",
                    "middle:stopped",
                    "signal 11 SIGTERM",
                    "wake @6020",
                ],
            ),
            (
                "@1030 exited 11 code 0",
                &["web:exited 11 code 0", "web:stopped", "list children"],
            ),
            ("@1030 children", &["exit Requested"]),
        ],
    );
}

#[test]
fn a_service_not_ready_in_time_is_killed_and_restarted() {
    let specs = json!([
        { "name": "db", "argv": ["db"], "readiness": { "type": "unix_socket", "path": "/run/db.sock" },
          "ready_timeout_ms": 1000, "stop_timeout_ms": 500 },
        { "name": "app", "argv": ["app"], "deps": ["db"] },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn db"]),
            (
                "@0 spawned db 11",
                &["db:started 11 db", "probe db #1", "wake @1000"],
            ),
            ("@10 probed db 1 no", &["wake @60"]),
            ("@60 tick", &["probe db #1", "wake @1000"]),
            ("@70 probed db 1 no", &["wake @120"]),
            ("@120 tick", &["probe db #1", "wake @1000"]),
            ("@130 probed db 1 no", &["wake @180"]),
            // The timeout wins over the next probe.
            (
                "@1000 tick",
                &[
                    "db:timeout 11 not ready after 1000ms",
                    "signal 11 SIGTERM",
                    "wake @1500",
                ],
            ),
            // A late answer for a process being stopped changes nothing.
            ("@1010 probed db 1 yes", &["wake @1500"]),
            ("@1500 tick", &["signal 11 SIGKILL", "wake @6500"]),
            (
                "@1510 exited 11 signal 9",
                &[
                    "db:exited 11 signal 9 (SIGKILL)",
                    "db:restarting in 100ms, restart 1",
                    "wake @1610",
                ],
            ),
            ("@1610 tick", &["spawn db"]),
            (
                "@1610 spawned db 12",
                &["db:started 12 db", "probe db #2", "wake @2610"],
            ),
            // An answer about the previous process is ignored.
            ("@1620 probed db 1 yes", &["wake @2610"]),
            ("@1630 probed db 2 yes", &["db:ready 12", "spawn app"]),
            (
                "@1630 spawned app 13",
                &["app:started 13 app", "app:ready 13"],
            ),
            (
                "@1630 status",
                &["status: db=running/12,restarts=1,last=signal 9 (SIGKILL) app=running/13"],
            ),
        ],
    );
}

#[test]
fn a_crash_is_restarted_after_a_growing_delay_reset_by_a_stable_run() {
    let specs = json!([
        { "name": "svc", "argv": ["svc"] },
        { "name": "other", "argv": ["other"] },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn svc", "spawn other"]),
            ("@0 spawned svc 11", &["svc:started 11 svc", "svc:ready 11"]),
            (
                "@0 spawned other 12",
                &["other:started 12 other", "other:ready 12"],
            ),
            (
                "@1000 exited 11 signal 9",
                &[
                    "svc:exited 11 signal 9 (SIGKILL)",
                    "svc:restarting in 100ms, restart 1",
                    "wake @1100",
                ],
            ),
            ("@1099 tick", &["wake @1100"]),
            ("@1100 tick", &["spawn svc"]),
            (
                "@1100 spawned svc 13",
                &["svc:started 13 svc", "svc:ready 13"],
            ),
            (
                "@1200 exited 13 code 1",
                &[
                    "svc:exited 13 code 1",
                    "svc:restarting in 200ms, restart 2",
                    "wake @1400",
                ],
            ),
            ("@1400 tick", &["spawn svc"]),
            (
                "@1400 spawned svc 14",
                &["svc:started 14 svc", "svc:ready 14"],
            ),
            // `always`: a clean exit of a daemon is restarted too.
            (
                "@1500 exited 14 code 0",
                &[
                    "svc:exited 14 code 0",
                    "svc:restarting in 400ms, restart 3",
                    "wake @1900",
                ],
            ),
            ("@1900 tick", &["spawn svc"]),
            (
                "@1900 spawned svc 15",
                &["svc:started 15 svc", "svc:ready 15"],
            ),
            // Ready for 10 s: stable, the delay starts again from the first.
            (
                "@11900 exited 15 code 1",
                &[
                    "svc:exited 15 code 1",
                    "svc:restarting in 100ms, restart 4",
                    "wake @12000",
                ],
            ),
            (
                "@11900 status",
                &[
                    "status: svc=backoff,restarts=3,last=code 1 other=running/12",
                    "wake @12000",
                ],
            ),
        ],
    );
}

#[test]
fn a_crash_loop_is_reported_failed_and_retried_at_the_maximum_backoff() {
    let specs = json!([
        // Never ready, so its dependent never starts.
        { "name": "crasher", "argv": ["sh"], "readiness": { "type": "tcp", "addr": "127.0.0.1:1" },
          "restart": { "initial_backoff_ms": 20, "max_backoff_ms": 300, "max_quick_failures": 3 } },
        { "name": "after", "argv": ["sleep"], "deps": ["crasher"] },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn crasher"]),
            (
                "@0 spawned crasher 11",
                &["crasher:started 11 sh", "probe crasher #1", "wake @30000"],
            ),
            (
                "@10 exited 11 code 3",
                &[
                    "crasher:exited 11 code 3",
                    "crasher:restarting in 20ms, restart 1",
                    "wake @30",
                ],
            ),
            // The answer to the dead process's probe is ignored.
            ("@15 probed crasher 1 no", &["wake @30"]),
            ("@30 tick", &["spawn crasher"]),
            (
                "@30 spawned crasher 12",
                &["crasher:started 12 sh", "probe crasher #2", "wake @30030"],
            ),
            (
                "@40 exited 12 code 3",
                &[
                    "crasher:exited 12 code 3",
                    "crasher:restarting in 40ms, restart 2",
                    "wake @80",
                ],
            ),
            ("@80 tick", &["spawn crasher"]),
            (
                "@80 spawned crasher 13",
                &["crasher:started 13 sh", "probe crasher #3", "wake @30080"],
            ),
            (
                "@90 exited 13 code 3",
                &[
                    "crasher:exited 13 code 3",
                    "crasher:failed 3 consecutive failures without a stable run; retrying every 300ms",
                    "crasher:restarting in 300ms, restart 3",
                    "wake @390",
                ],
            ),
            (
                "@90 status",
                &[
                    "status: crasher=failed,restarts=2,last=code 3 after=waiting",
                    "wake @390",
                ],
            ),
            // Never given up on: retried every maximum backoff, `failed` each time.
            ("@390 tick", &["spawn crasher"]),
            (
                "@390 spawned crasher 14",
                &["crasher:started 14 sh", "probe crasher #4", "wake @30390"],
            ),
            (
                "@400 exited 14 code 3",
                &[
                    "crasher:exited 14 code 3",
                    "crasher:failed 4 consecutive failures without a stable run; retrying every 300ms",
                    "crasher:restarting in 300ms, restart 4",
                    "wake @700",
                ],
            ),
            // A restart request tries at once, with a fresh budget.
            (
                "@500 restart crasher",
                &["crasher:restarting in 0ms, restart 4", "ok", "spawn crasher"],
            ),
            (
                "@500 spawned crasher 15",
                &["crasher:started 15 sh", "probe crasher #5", "wake @30500"],
            ),
            (
                "@510 exited 15 code 3",
                &[
                    "crasher:exited 15 code 3",
                    "crasher:restarting in 20ms, restart 5",
                    "wake @530",
                ],
            ),
        ],
    );
}

#[test]
fn a_oneshot_is_done_when_it_exits_0_and_restarted_when_it_fails() {
    let specs = json!([
        { "name": "migrate", "argv": ["migrate"], "kind": "oneshot", "ready_timeout_ms": 1000 },
        { "name": "app", "argv": ["app"], "deps": ["migrate"] },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn migrate"]),
            (
                "@0 spawned migrate 11",
                &["migrate:started 11 migrate", "wake @1000"],
            ),
            (
                "@100 exited 11 code 2",
                &[
                    "migrate:exited 11 code 2",
                    "migrate:restarting in 100ms, restart 1",
                    "wake @200",
                ],
            ),
            ("@200 tick", &["spawn migrate"]),
            (
                "@200 spawned migrate 12",
                &["migrate:started 12 migrate", "wake @1200"],
            ),
            // Not finished within its ready timeout: stopped, then restarted.
            (
                "@1200 tick",
                &[
                    "migrate:timeout 12 not ready after 1000ms",
                    "signal 12 SIGTERM",
                    "wake @6200",
                ],
            ),
            (
                "@1210 exited 12 signal 15",
                &[
                    "migrate:exited 12 signal 15 (SIGTERM)",
                    "migrate:restarting in 200ms, restart 2",
                    "wake @1410",
                ],
            ),
            ("@1410 tick", &["spawn migrate"]),
            (
                "@1410 spawned migrate 13",
                &["migrate:started 13 migrate", "wake @2410"],
            ),
            (
                "@1500 exited 13 code 0",
                &[
                    "migrate:exited 13 code 0",
                    "migrate:ready exited 0",
                    "spawn app",
                ],
            ),
            (
                "@1500 spawned app 14",
                &["app:started 14 app", "app:ready 14"],
            ),
            (
                "@1500 status",
                &["status: migrate=done,restarts=2,last=code 0 app=running/14"],
            ),
            // Done is final, unless asked: then it runs again.
            (
                "@2000 restart migrate",
                &[
                    "migrate:restarting in 0ms, restart 3",
                    "ok",
                    "spawn migrate",
                ],
            ),
        ],
    );
}

#[test]
fn a_restart_request_stops_with_the_services_signal_and_starts_at_once() {
    let specs = json!([{ "name": "web", "argv": ["web"], "stop_signal": "SIGQUIT" }]);
    check(
        specs,
        &[
            ("@0 start", &["spawn web"]),
            ("@0 spawned web 11", &["web:started 11 web", "web:ready 11"]),
            (
                "@100 restart web",
                &["signal 11 SIGQUIT", "ok", "wake @5100"],
            ),
            ("@100 status", &["status: web=stopping/11", "wake @5100"]),
            // Asked again while it stops: nothing more to do.
            ("@150 restart web", &["ok", "wake @5100"]),
            (
                "@200 exited 11 signal 3",
                &[
                    "web:exited 11 signal 3 (SIGQUIT)",
                    "web:restarting in 0ms, restart 1",
                    "spawn web",
                ],
            ),
            (
                "@200 spawned web 12",
                &["web:started 12 web", "web:ready 12"],
            ),
        ],
    );
}

#[test]
fn shutdown_kills_after_the_stop_timeout_and_gives_up_on_a_process_that_stays() {
    let specs = json!([
        { "name": "base", "argv": ["base"] },
        { "name": "stubborn", "argv": ["stubborn"], "deps": ["base"], "stop_timeout_ms": 300 },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn base"]),
            (
                "@0 spawned base 11",
                &["base:started 11 base", "base:ready 11", "spawn stubborn"],
            ),
            (
                "@0 spawned stubborn 12",
                &["stubborn:started 12 stubborn", "stubborn:ready 12"],
            ),
            // `base` waits until its dependent is gone.
            ("@1000 signal TERM", &["signal 12 SIGTERM", "wake @1300"]),
            // Requests are still answered while stopping; restarts are refused.
            (
                "@1100 status",
                &["status: base=running/11 stubborn=stopping/12", "wake @1300"],
            ),
            (
                "@1100 restart base",
                &["error: the supervisor is shutting down", "wake @1300"],
            ),
            ("@1300 tick", &["signal 12 SIGKILL", "wake @6300"]),
            // Stuck in the kernel: counted as gone so that shutdown goes on.
            (
                "@6300 tick",
                &[
                    "stubborn:exited 12 signal 9 (SIGKILL)",
                    "stubborn:stopped",
                    "signal 11 SIGTERM",
                    "wake @11300",
                ],
            ),
            (
                "@6310 exited 11 signal 15",
                &[
                    "base:exited 11 signal 15 (SIGTERM)",
                    "base:stopped",
                    "list children",
                ],
            ),
            // The sweep: leftovers are killed until none is left or its time is up.
            (
                "@6310 children 12 40",
                &["kill leftover 12", "kill leftover 40", "wake @6330"],
            ),
            ("@6320 exited 40 signal 9", &["list children"]),
            ("@6320 children 12", &["kill leftover 12", "wake @6340"]),
            (
                "@6330 status",
                &["error: the supervisor is shutting down", "wake @6340"],
            ),
            ("@6340 tick", &["list children"]),
            ("@11310 children 12", &["exit Terminate"]),
        ],
    );
}

#[test]
fn a_second_signal_during_shutdown_kills_every_service() {
    let specs = json!([
        { "name": "a", "argv": ["a"] },
        { "name": "b", "argv": ["b"], "deps": ["a"] },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn a"]),
            (
                "@0 spawned a 11",
                &["a:started 11 a", "a:ready 11", "spawn b"],
            ),
            ("@0 spawned b 12", &["b:started 12 b", "b:ready 12"]),
            ("@100 signal INT", &["signal 12 SIGTERM", "wake @5100"]),
            (
                "@200 signal INT",
                &["signal 11 SIGKILL", "signal 12 SIGKILL", "wake @5100"],
            ),
            (
                "@210 exited 11 signal 9",
                &["a:exited 11 signal 9 (SIGKILL)", "a:stopped", "wake @5100"],
            ),
            (
                "@210 exited 12 signal 9",
                &[
                    "b:exited 12 signal 9 (SIGKILL)",
                    "b:stopped",
                    "list children",
                ],
            ),
            ("@210 children", &["exit Interrupt"]),
        ],
    );
}

#[test]
fn requests_name_a_service_and_signals_are_forwarded_to_its_group() {
    let specs = json!([
        { "name": "web", "argv": ["web"] },
        { "name": "job", "argv": ["job"], "kind": "oneshot" },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn web", "spawn job"]),
            ("@0 spawned web 11", &["web:started 11 web", "web:ready 11"]),
            ("@0 spawned job 12", &["job:started 12 job", "wake @30000"]),
            (
                "@5 exited 12 code 0",
                &["job:exited 12 code 0", "job:ready exited 0"],
            ),
            ("@10 send web HUP", &["signal 11 SIGHUP", "ok"]),
            (
                "@10 send web STOP",
                &["error: signal `STOP` is not one of HUP, INT, KILL, TERM, USR1, USR2"],
            ),
            (
                "@10 send job TERM",
                &["error: `job` has no running process"],
            ),
            ("@10 send nope TERM", &["error: no service `nope`"]),
            ("@10 restart nope", &["error: no service `nope`"]),
            ("@10 logs nope 5", &["error: no service `nope`"]),
            ("@10 logs web 5", &["send 5 lines of web's output"]),
        ],
    );
}

#[test]
fn before_shutdown_commands_run_before_the_stop_signal_at_shutdown_only() {
    let specs = json!([
        { "name": "balancer", "argv": ["balancer"] },
        {
            "name": "keepalived", "argv": ["keepalived"], "deps": ["balancer"],
            "before_shutdown": [["nft", "add", "element"], ["ip", "addr", "replace"]],
        },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn balancer"]),
            (
                "@0 spawned balancer 11",
                &[
                    "balancer:started 11 balancer",
                    "balancer:ready 11",
                    "spawn keepalived",
                ],
            ),
            (
                "@0 spawned keepalived 12",
                &["keepalived:started 12 keepalived", "keepalived:ready 12"],
            ),
            // A restart is not a shutdown: the address is not handed over.
            (
                "@100 restart keepalived",
                &["signal 12 SIGTERM", "ok", "wake @5100"],
            ),
            (
                "@150 exited 12 code 0",
                &[
                    "keepalived:exited 12 code 0",
                    "keepalived:restarting in 0ms, restart 1",
                    "spawn keepalived",
                ],
            ),
            (
                "@150 spawned keepalived 13",
                &["keepalived:started 13 keepalived", "keepalived:ready 13"],
            ),
            // At shutdown the commands come first; the balancer is stopped only after
            // keepalived has gone, so it answers what it took while the address moves.
            (
                "@300 stop",
                &[
                    "before shutdown keepalived",
                    "signal 13 SIGTERM",
                    "ok",
                    "wake @5300",
                ],
            ),
            (
                "@350 exited 13 code 0",
                &[
                    "keepalived:exited 13 code 0",
                    "keepalived:stopped",
                    "signal 11 SIGTERM",
                    "wake @5350",
                ],
            ),
        ],
    );
}

#[test]
fn the_track_file_says_down_before_the_stop_signal_and_at_every_exit() {
    let specs = json!([
        { "name": "balancer", "argv": ["balancer"], "track_file": "/run/tandem/balancer-down" },
    ]);
    check(
        specs,
        &[
            ("@0 start", &["spawn balancer"]),
            (
                "@0 spawned balancer 11",
                &[
                    "balancer:started 11 balancer",
                    "track balancer ready",
                    "balancer:ready 11",
                ],
            ),
            (
                "@100 exited 11 signal 9",
                &[
                    "track balancer down",
                    "balancer:exited 11 signal 9 (SIGKILL)",
                    "balancer:restarting in 100ms, restart 1",
                    "wake @200",
                ],
            ),
            ("@200 tick", &["spawn balancer"]),
            (
                "@200 spawned balancer 12",
                &[
                    "balancer:started 12 balancer",
                    "track balancer ready",
                    "balancer:ready 12",
                ],
            ),
            (
                "@300 stop",
                &[
                    "track balancer down",
                    "signal 12 SIGTERM",
                    "ok",
                    "wake @5300",
                ],
            ),
            (
                "@310 exited 12 code 0",
                &[
                    "track balancer down",
                    "balancer:exited 12 code 0",
                    "balancer:stopped",
                    "list children",
                ],
            ),
        ],
    );
}

#[test]
fn a_service_that_cannot_be_started_is_retried_and_shutdown_cancels_the_retry() {
    let specs = json!([{ "name": "missing", "argv": ["/nonexistent"] }]);
    check(
        specs,
        &[
            ("@0 start", &["spawn missing"]),
            (
                "@0 spawn-failed missing starting `/nonexistent`: not found",
                &[
                    "missing:exited not started: starting `/nonexistent`: not found",
                    "missing:restarting in 100ms, restart 1",
                    "wake @100",
                ],
            ),
            (
                "@50 status",
                &["status: missing=backoff,last=not started", "wake @100"],
            ),
            ("@60 signal HUP", &["list children"]),
            ("@60 children", &["exit Hangup"]),
            // The executor has stopped; a request that still arrives is answered.
            ("@70 status", &["error: the supervisor is shutting down"]),
        ],
    );
}

#[test]
fn an_orphan_reaped_while_running_changes_nothing() {
    let specs = json!([{ "name": "web", "argv": ["web"] }]);
    check(
        specs,
        &[
            ("@0 start", &["spawn web"]),
            ("@0 spawned web 11", &["web:started 11 web", "web:ready 11"]),
            ("@10 exited 99 code 0", &[]),
            ("@20 status", &["status: web=running/11"]),
        ],
    );
}
