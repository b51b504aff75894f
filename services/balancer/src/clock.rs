//! A coarse clock for per-read bookkeeping: one atomic load instead of a clock read on every
//! socket read. Ticks every [`TICK`]; timeouts built on it may fire up to one tick early.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub(crate) const TICK: Duration = Duration::from_millis(20);

static BASE: OnceLock<Instant> = OnceLock::new();
static MILLIS: AtomicU64 = AtomicU64::new(0);

fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// Now, to within one tick (while [`run`] runs somewhere in the process).
pub(crate) fn coarse_now() -> Instant {
    base() + Duration::from_millis(MILLIS.load(Relaxed))
}

fn update() {
    let ms = u64::try_from(base().elapsed().as_millis()).unwrap_or(u64::MAX);
    MILLIS.fetch_max(ms, Relaxed);
}

/// Keeps the coarse clock ticking; one per balancer (more are harmless).
pub(crate) async fn run(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        update();
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
    }
}
