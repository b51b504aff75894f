//! Every [`INTERVAL`]: backend connections idle longer than the pool keeps them are closed (as
//! HAProxy's `pool-purge-delay` does; before, they were dropped only when a request came by),
//! and memory freed since the last trim goes back to the system once the balancer is idle.
//!
//! glibc keeps what a process frees for its next allocations: after 1,000 client connections
//! closed, the balancer stayed at their 28 MiB; `malloc_trim` brings it back to 8.7 MiB
//! (measured with `bench/balancer.sh`'s hold). A trim holds each arena's lock while it walks
//! its free memory and gives pages back, and those pages fault in again on the next
//! allocations: 0.6–7 ms measured on this host, more in a TCG guest; a stall a client would
//! see. So a trim runs only after a whole interval without a new client connection or a
//! forwarded request. (A rolling-upgrade test failure was first blamed on trims under traffic;
//! it recurred without them: requests in flight when the floating IP moves.)

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::coarse_now;
use crate::proxy::Shared;

pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

/// The counters a pass reads: client connections accepted and closed, requests forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counts {
    pub accepted: u64,
    pub closed: u64,
    pub requests: u64,
}

/// Whether a pass trims: the balancer was idle for the whole interval since the previous pass
/// (`before`), and there is something to give back (connections closed since the last trim,
/// or idle backend connections the previous pass closed: their tasks free their buffers after
/// it, on their worker threads).
pub(crate) fn should_trim(
    now: Counts,
    before: Counts,
    closed_at_last_trim: u64,
    purged: usize,
) -> bool {
    let idle = now.accepted == before.accepted && now.requests == before.requests;
    idle && (purged > 0 || now.closed > closed_at_last_trim)
}

fn counts(shared: &Shared) -> Counts {
    let g = &shared.global;
    let active = g.active_connections.load(Relaxed);
    let accepted = g.connections.load(Relaxed);
    let requests = shared
        .routes
        .load()
        .entries
        .iter()
        .map(|e| e.backend.metrics.requests.load(Relaxed))
        .sum();
    Counts {
        accepted,
        closed: accepted.saturating_sub(active),
        requests,
    }
}

pub(crate) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut before, mut closed_at_last_trim, mut purged_before) = (counts(&shared), 0, 0);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let purged: usize = shared
            .routes
            .load()
            .entries
            .iter()
            .map(|e| e.backend.pool.purge(coarse_now()))
            .sum();
        let now = counts(&shared);
        let trim_now = should_trim(now, before, closed_at_last_trim, purged_before);
        (before, purged_before) = (now, purged);
        if trim_now {
            closed_at_last_trim = now.closed;
            // On a blocking thread: this task shares its thread with worker 0's connections.
            let trimmed = tokio::task::spawn_blocking(|| {
                let start = std::time::Instant::now();
                (trim(), start.elapsed())
            })
            .await;
            if let Ok((released, took)) = trimmed {
                tracing::debug!(
                    purged,
                    closed = now.closed,
                    released,
                    took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                    "memory returned to the system"
                );
            }
        }
    }
}

/// Give the allocator's free memory back to the system; whether any was.
fn trim() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_when_idle_and_something_was_freed() {
        let c = |accepted, closed, requests| Counts {
            accepted,
            closed,
            requests,
        };
        let idle = c(100, 100, 500);
        assert!(
            should_trim(idle, idle, 0, 0),
            "100 closed since the last trim"
        );
        assert!(!should_trim(idle, idle, 100, 0), "already trimmed");
        assert!(
            should_trim(idle, idle, 100, 3),
            "idle backend connections were closed"
        );
        // Any activity in the interval: no trim, whatever there is to give back.
        assert!(
            !should_trim(c(101, 101, 500), idle, 0, 3),
            "a new connection"
        );
        assert!(
            !should_trim(c(100, 100, 501), idle, 0, 3),
            "a forwarded request"
        );
        assert!(
            !should_trim(c(0, 0, 0), c(0, 0, 0), 0, 0),
            "nothing ever happened"
        );
    }
}
