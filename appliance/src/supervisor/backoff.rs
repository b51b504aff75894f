//! Restart decisions: exponential backoff, and a crash loop retried at the maximum delay.
//!
//! Pure: the caller passes how long the process ran and how it ended; no clock, no sleeps.
//!
//! A service is never given up on: a node whose balancer stays down for good after a burst of
//! crashes (an attacker's, or a dependency's) is worse than one that keeps trying every
//! [`MAX_BACKOFF`] and says so.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::spec::millis;

/// Delay before the first restart after a quick failure.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Each further consecutive quick failure multiplies the delay by this.
pub const BACKOFF_FACTOR: u32 = 2;
/// The delay never grows past this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run that stayed ready at least this long is stable: it resets the failure count.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// This many consecutive failures without a stable run in between are a crash loop: the service
/// is reported failed (an alert) and from then on retried every `max_backoff`.
pub const MAX_QUICK_FAILURES: u32 = 5;

/// When a service that ended gets started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Restart after any exit (a oneshot that succeeded is done and never restarted).
    #[default]
    Always,
    /// Restart only after a non-zero exit, a signal or a readiness timeout.
    OnFailure,
    /// Never restart.
    Never,
}

/// How a service is restarted. Every field has a named default above.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    pub mode: RestartMode,
    #[serde(rename = "initial_backoff_ms", with = "millis")]
    pub initial_backoff: Duration,
    pub factor: u32,
    #[serde(rename = "max_backoff_ms", with = "millis")]
    pub max_backoff: Duration,
    #[serde(rename = "stable_after_ms", with = "millis")]
    pub stable_after: Duration,
    pub max_quick_failures: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: RestartMode::Always,
            initial_backoff: INITIAL_BACKOFF,
            factor: BACKOFF_FACTOR,
            max_backoff: MAX_BACKOFF,
            stable_after: STABLE_AFTER,
            max_quick_failures: MAX_QUICK_FAILURES,
        }
    }
}

/// What to do after a service's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after `delay`.
    Restart { delay: Duration },
    /// The policy says it stays down (e.g. `on-failure` after a clean exit).
    Stay,
    /// Crash loop: `max_quick_failures` or more quick failures in a row. The caller raises a
    /// `failed` event (an alert) and starts it again after `delay`, the maximum backoff.
    CrashLoop { delay: Duration },
}

/// The decision and the updated count of consecutive quick failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub quick_failures: u32,
    pub decision: Decision,
}

/// Decides about a process that ended.
///
/// `quick_failures` is the count so far; `success` is whether it exited with code 0;
/// `ready_for` is how long it had been ready when it ended (zero if it never became ready).
pub fn decide(
    policy: &RestartPolicy,
    quick_failures: u32,
    success: bool,
    ready_for: Duration,
) -> Outcome {
    let stable = ready_for >= policy.stable_after;
    let quick_failures = if stable {
        0
    } else {
        quick_failures.saturating_add(1)
    };
    let wanted = match policy.mode {
        RestartMode::Always => true,
        RestartMode::OnFailure => !success,
        RestartMode::Never => false,
    };
    let budget = policy.max_quick_failures.max(1);
    let decision = if !wanted {
        Decision::Stay
    } else if quick_failures >= budget {
        Decision::CrashLoop {
            delay: policy.max_backoff,
        }
    } else {
        Decision::Restart {
            delay: delay(policy, quick_failures),
        }
    };
    Outcome {
        quick_failures,
        decision,
    }
}

/// `initial * factor^(failures - 1)`, capped; the first restart (and one after a stable run)
/// waits `initial`.
fn delay(policy: &RestartPolicy, quick_failures: u32) -> Duration {
    let exponent = quick_failures.saturating_sub(1);
    let multiplier = policy
        .factor
        .max(1)
        .checked_pow(exponent)
        .unwrap_or(u32::MAX);
    policy
        .initial_backoff
        .checked_mul(multiplier)
        .unwrap_or(policy.max_backoff)
        .min(policy.max_backoff)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn check(policy: &RestartPolicy, exits: &[(bool, u64)], expected: &[(u32, Decision)]) {
        let mut failures = 0;
        let mut got = Vec::new();
        for &(success, ready_ms) in exits {
            let outcome = decide(policy, failures, success, MS(ready_ms));
            failures = outcome.quick_failures;
            got.push((outcome.quick_failures, outcome.decision));
        }
        assert_eq!(got, expected, "exits {exits:?}");
    }

    fn restart(ms: u64) -> Decision {
        Decision::Restart { delay: MS(ms) }
    }

    fn crash_loop() -> Decision {
        Decision::CrashLoop { delay: MAX_BACKOFF }
    }

    #[test]
    fn crash_loop_doubles_then_retries_at_the_maximum_forever() {
        let crash = (false, 0);
        check(
            &RestartPolicy::default(),
            &[crash; 8],
            &[
                (1, restart(100)),
                (2, restart(200)),
                (3, restart(400)),
                (4, restart(800)),
                (5, crash_loop()),
                (6, crash_loop()),
                (7, crash_loop()),
                (8, crash_loop()),
            ],
        );
    }

    #[test]
    fn a_stable_run_ends_the_crash_loop() {
        let crash = (false, 0);
        let stable = (false, 10_000);
        check(
            &RestartPolicy::default(),
            &[crash, crash, crash, crash, crash, crash, stable, crash],
            &[
                (1, restart(100)),
                (2, restart(200)),
                (3, restart(400)),
                (4, restart(800)),
                (5, crash_loop()),
                (6, crash_loop()),
                (0, restart(100)),
                (1, restart(100)),
            ],
        );
    }

    #[test]
    fn stable_run_resets_the_budget() {
        let crash = (false, 0);
        let stable = (false, 10_000);
        check(
            &RestartPolicy::default(),
            &[crash, crash, crash, stable, crash, crash],
            &[
                (1, restart(100)),
                (2, restart(200)),
                (3, restart(400)),
                (0, restart(100)),
                (1, restart(100)),
                (2, restart(200)),
            ],
        );
    }

    #[test]
    fn almost_stable_is_still_quick() {
        check(
            &RestartPolicy::default(),
            &[(true, 9_999), (true, 9_999)],
            &[(1, restart(100)), (2, restart(200))],
        );
    }

    #[test]
    fn delay_is_capped() {
        let policy = RestartPolicy {
            max_quick_failures: 100,
            ..RestartPolicy::default()
        };
        let exits = [(false, 0); 12];
        let mut failures = 0;
        let mut last = Duration::ZERO;
        for &(success, ready_ms) in &exits {
            let outcome = decide(&policy, failures, success, MS(ready_ms));
            failures = outcome.quick_failures;
            let Decision::Restart { delay } = outcome.decision else {
                panic!("{outcome:?}")
            };
            last = delay;
        }
        assert_eq!(last, MAX_BACKOFF);
        // Huge exponents saturate instead of overflowing.
        let outcome = decide(&policy, 60, false, Duration::ZERO);
        assert_eq!(outcome.decision, restart(30_000));
    }

    #[test]
    fn modes() {
        let on_failure = RestartPolicy {
            mode: RestartMode::OnFailure,
            ..RestartPolicy::default()
        };
        check(
            &on_failure,
            &[(false, 0), (true, 0)],
            &[(1, restart(100)), (2, Decision::Stay)],
        );
        let never = RestartPolicy {
            mode: RestartMode::Never,
            ..RestartPolicy::default()
        };
        check(&never, &[(false, 0)], &[(1, Decision::Stay)]);
    }

    #[test]
    fn budget_of_one_is_a_crash_loop_at_once() {
        let policy = RestartPolicy {
            max_quick_failures: 1,
            ..RestartPolicy::default()
        };
        check(
            &policy,
            &[(false, 0), (false, 0)],
            &[(1, crash_loop()), (2, crash_loop())],
        );
        let zero = RestartPolicy {
            max_quick_failures: 0,
            ..RestartPolicy::default()
        };
        check(&zero, &[(false, 0)], &[(1, crash_loop())]);
        // `never` and `on-failure` after a clean exit stay down even in a crash loop.
        let never = RestartPolicy {
            mode: RestartMode::Never,
            ..policy
        };
        check(&never, &[(false, 0)], &[(1, Decision::Stay)]);
    }
}
