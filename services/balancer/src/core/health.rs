//! The health state machine of one backend, fed by active checks and by passive observations of
//! real traffic.
//!
//! Initial state (as HAProxy's default `init-state up`): a new backend is **up but unconfirmed**,
//! so traffic flows from the first moment; the first failure (failed check or refused
//! connection) takes it down at once, while the first passed check confirms it. A confirmed
//! backend goes down after `fall` consecutive failures and comes back after `rise` consecutive
//! passed checks. Only active checks raise a backend: real traffic is not sent to a down one.
//! Passive failures (connection reset before a response) count like failed checks; a
//! successful response resets the failure streak of an up backend.
//!
//! A failed TCP connect, by a check or by real traffic, takes a backend down at once (HAProxy's
//! `observe layer4` with `on-error mark-down`): on the cluster LAN a connect fails only when the
//! peer's machine or its web server is gone, and waiting for `fall` more failures would send
//! clients to a dead node for `fall × interval` after a failover.

use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// An active check got the expected status in time.
    CheckPassed,
    /// An active check failed: wrong status, timeout, connection error.
    CheckFailed,
    /// Real traffic's connection was reset or closed before a response.
    TrafficFailed,
    /// A TCP connect (check or traffic) was refused, unreachable or timed out.
    ConnectFailed,
    /// Real traffic got a response.
    TrafficOk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    state: State,
    /// False until the first check passed after start: then one failure is enough to go down.
    confirmed: bool,
    passes: u32,
    failures: u32,
    since: Instant,
}

impl Health {
    pub fn new(now: Instant) -> Health {
        Health {
            state: State::Up,
            confirmed: false,
            passes: 0,
            failures: 0,
            since: now,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Feed one observation; returns the transition if the state changed.
    pub fn observe(
        &mut self,
        obs: Observation,
        th: Thresholds,
        now: Instant,
    ) -> Option<Transition> {
        let rise = th.rise.max(1);
        let fall = th.fall.max(1);
        let before = self.state;
        match obs {
            Observation::CheckPassed => {
                self.failures = 0;
                match self.state {
                    State::Up => self.confirmed = true,
                    State::Down => {
                        self.passes += 1;
                        if self.passes >= rise {
                            self.state = State::Up;
                            self.confirmed = true;
                            self.passes = 0;
                        }
                    }
                }
            }
            Observation::CheckFailed | Observation::TrafficFailed => {
                self.passes = 0;
                if self.state == State::Up {
                    self.failures += 1;
                    if !self.confirmed || self.failures >= fall {
                        self.state = State::Down;
                        self.failures = 0;
                    }
                }
            }
            Observation::ConnectFailed => {
                self.passes = 0;
                if self.state == State::Up {
                    self.state = State::Down;
                    self.failures = 0;
                }
            }
            Observation::TrafficOk => {
                if self.state == State::Up {
                    self.failures = 0;
                }
            }
        }
        if self.state != before {
            self.since = now;
            Some(Transition {
                from: before,
                to: self.state,
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use Observation::*;

    /// Feeds `observations` from a fresh state and prints the state after each as `U`/`D`.
    fn check(rise: u32, fall: u32, observations: &[Observation], expected: &str) {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let th = Thresholds { rise, fall };
        let mut got = String::new();
        for (k, &o) in observations.iter().enumerate() {
            let now = t0 + Duration::from_secs(k as u64 + 1);
            let before = h.state();
            let t = h.observe(o, th, now);
            assert_eq!(t.is_some(), h.state() != before);
            if t.is_some() {
                assert_eq!(h.since(), now);
            }
            got.push(if h.state() == State::Up { 'U' } else { 'D' });
        }
        assert_eq!(got, expected, "rise {rise} fall {fall} {observations:?}");
    }

    #[test]
    fn health_table() {
        let p = CheckPassed;
        let f = CheckFailed;
        let t = TrafficFailed;
        let ok = TrafficOk;
        check(2, 3, &[p, p, p], "UUU");
        // Unconfirmed: the first failure takes it down at once (HAProxy's init-state up).
        check(2, 3, &[f], "D");
        check(2, 3, &[t], "D");
        // Confirmed: `fall` consecutive failures.
        check(2, 3, &[p, f, f, f], "UUUD");
        check(2, 3, &[p, f, f, p, f, f, f], "UUUUUUD");
        // Passive failures count with failed checks; a good response resets the streak.
        check(2, 3, &[p, t, f, t], "UUUD");
        check(2, 3, &[p, t, t, ok, t, t], "UUUUUU");
        // Down: `rise` consecutive passes; a failure restarts the count; traffic never raises.
        check(2, 3, &[f, p, p], "DDU");
        check(2, 3, &[f, p, f, p, p], "DDDDU");
        check(2, 3, &[f, ok, ok, ok], "DDDD");
        check(1, 1, &[p, f, p, f], "UDUD");
        // Zero thresholds behave as 1.
        check(0, 0, &[p, f, p], "UDU");
        // A failed connect takes even a confirmed backend down at once; checks raise it.
        let c = ConnectFailed;
        check(2, 3, &[p, p, c], "UUD");
        check(2, 3, &[p, c, p, p], "UDDU");
        check(2, 3, &[c, c, ok, p, c], "DDDDD");
    }
}
