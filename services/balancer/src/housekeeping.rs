//! Every [`INTERVAL`]: backend connections idle longer than the pool keeps them are closed (as
//! HAProxy's `pool-purge-delay` does; before, they were dropped only when a request came by),
//! and memory freed since the last pass goes back to the system once connections have closed.
//!
//! glibc keeps what a process frees for its next allocations: after 1,000 client connections
//! closed, the balancer stayed at their 28 MiB; `malloc_trim` brings it back to 8.7 MiB
//! (measured with `bench/balancer.sh`'s hold). A trim takes each arena's lock in turn, so it
//! runs only after enough connections closed, not on a busy steady state.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::coarse_now;
use crate::proxy::Shared;

pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

/// Connections closed since the last trim that make the next pass trim.
const TRIM_AFTER_CLOSED: u64 = 64;

/// What a pass saw: client connections closed in all; idle backend connections the previous
/// pass closed (their tasks free their buffers after it, on their worker threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pass {
    pub closed: u64,
    /// Client connections open now.
    pub active: u64,
    pub purged: usize,
}

/// Whether a pass trims, given the closed count at the last trim: after a purge, after
/// [`TRIM_AFTER_CLOSED`] closed connections, or once the last connection closed.
pub(crate) fn should_trim(pass: Pass, closed_at_last_trim: u64) -> bool {
    let closed = pass.closed.saturating_sub(closed_at_last_trim);
    pass.purged > 0 || closed >= TRIM_AFTER_CLOSED || (closed > 0 && pass.active == 0)
}

pub(crate) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut closed_at_last_trim, mut purged_before) = (0, 0);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = coarse_now();
        let purged: usize = shared
            .routes
            .load()
            .entries
            .iter()
            .map(|e| e.backend.pool.purge(now))
            .sum();
        let g = &shared.global;
        let active = g.active_connections.load(Relaxed);
        let closed = g.connections.load(Relaxed).saturating_sub(active);
        let pass = Pass {
            closed,
            active,
            purged: purged_before,
        };
        purged_before = purged;
        if should_trim(pass, closed_at_last_trim) {
            closed_at_last_trim = closed;
            // On a blocking thread: this task shares its thread with worker 0's connections,
            // and a trim walks every arena's free memory.
            let trimmed = tokio::task::spawn_blocking(|| {
                let start = std::time::Instant::now();
                (trim(), start.elapsed())
            })
            .await;
            if let Ok((released, took)) = trimmed {
                tracing::debug!(
                    purged,
                    closed,
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
    fn trims_after_closed_connections_or_a_purge_only() {
        let pass = |closed, active, purged| Pass {
            closed,
            active,
            purged,
        };
        assert!(!should_trim(pass(0, 0, 0), 0), "nothing happened");
        assert!(
            !should_trim(pass(63, 5, 0), 0),
            "too few connections closed"
        );
        assert!(should_trim(pass(64, 5, 0), 0));
        assert!(
            !should_trim(pass(1063, 5, 0), 1000),
            "counted from the last trim"
        );
        assert!(should_trim(pass(1064, 5, 0), 1000));
        assert!(
            should_trim(pass(1001, 0, 0), 1000),
            "the last connection closed"
        );
        assert!(
            !should_trim(pass(1000, 0, 0), 1000),
            "idle, already trimmed"
        );
        assert!(
            should_trim(pass(0, 5, 1), 0),
            "idle backend connections closed"
        );
    }
}
