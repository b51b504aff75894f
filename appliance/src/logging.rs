//! Process-wide tracing setup: human-readable lines on stderr, filtered by `RUST_LOG`.
//!
//! Child output is emitted under the target `svc` with the fields `service` and `stream`, so
//! `RUST_LOG=svc=warn` quiets the services while keeping the supervisor's own messages.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::writer::{EitherWriter, MakeWriter};
use tracing_subscriber::EnvFilter;

/// Filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";
/// PID 1's filter: the serial console gets the supervisor's own lines, and of the services'
/// output only what they log at warning level. Every line still reaches the log store (its
/// sink is not a `tracing` subscriber). A serial console is slow (under emulation each byte is
/// an I/O exit) and nginx alone writes a line per request.
pub const CONSOLE_FILTER: &str = "info,svc=warn";

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored).
///
/// It starts no threads, so the supervisor can still block signals for the whole process after
/// it (see [`crate::supervisor`]).
pub fn init() {
    init_with(DEFAULT_FILTER);
}

/// [`init`] with another default filter (`RUST_LOG` still wins).
pub fn init_with(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // PID 1 writes to a serial console that tests and people grep: plain text there.
        .with_ansi(
            std::io::stderr().is_terminal()
                && std::process::id() != 1
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .try_init();
}

/// Lines the console queue holds before it drops (a paused serial console fills it).
pub const CONSOLE_QUEUE_LINES: usize = 4096;
/// Lines per second the console gets on average ...
pub const CONSOLE_RATE_PER_S: f64 = 50.0;
/// ... and in one burst (a boot or a shutdown logs a few dozen lines at once).
pub const CONSOLE_BURST: f64 = 400.0;

/// The console writer's guard: dropping it writes out what is queued.
static CONSOLE_GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// [`init_with`] for the long-running processes (PID 1, `run`, `supervise`): they must never
/// block on their console. Lines go to a bounded queue that a writer thread empties; a full
/// queue (a slow or stopped serial console, a terminal nobody reads) drops lines instead of
/// stalling the caller, and at most [`CONSOLE_RATE_PER_S`] lines per second (bursts of
/// [`CONSOLE_BURST`]) are queued at all. The next line that gets through says how many were
/// lost. Call [`flush_console`] before exiting or halting.
pub fn init_daemon(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // The writer thread inherits our signal mask: it must have every signal blocked, or it
    // could take the signals the supervisor waits for (see `crate::supervisor`).
    let all = nix::sys::signal::SigSet::all();
    let old = all.thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK);
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(CONSOLE_QUEUE_LINES)
        .thread_name("console")
        .finish(std::io::stderr());
    if let Ok(old) = old {
        let _ = old.thread_set_mask();
    }
    *CONSOLE_GUARD.lock().unwrap_or_else(PoisonError::into_inner) = Some(guard);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(RateLimited::new(writer))
        .with_ansi(false)
        .try_init();
}

/// Writes out what the console queue still holds (bounded by the writer's own timeout).
pub fn flush_console() {
    drop(
        CONSOLE_GUARD
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(),
    );
}

/// A token bucket: `rate` tokens a second up to `burst`; each line takes one. Pure: the time
/// is an argument.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Whether a line may go out at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The console's `MakeWriter`: rate-limited, in front of the lossy queue.
struct RateLimited {
    inner: NonBlocking,
    bucket: Mutex<Bucket>,
    /// Lines refused by the bucket since the last report.
    limited: AtomicU64,
    /// The queue's drop count at the last report.
    dropped_reported: AtomicU64,
}

impl RateLimited {
    fn new(inner: NonBlocking) -> RateLimited {
        RateLimited {
            inner,
            bucket: Mutex::new(Bucket::new(CONSOLE_RATE_PER_S, CONSOLE_BURST)),
            limited: AtomicU64::new(0),
            dropped_reported: AtomicU64::new(0),
        }
    }
}

impl<'a> MakeWriter<'a> for RateLimited {
    type Writer = EitherWriter<NonBlocking, std::io::Sink>;

    fn make_writer(&'a self) -> Self::Writer {
        let allowed = self
            .bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(Instant::now());
        if !allowed {
            self.limited.fetch_add(1, Ordering::Relaxed);
            return EitherWriter::B(std::io::sink());
        }
        let limited = self.limited.swap(0, Ordering::Relaxed);
        let dropped = self.inner.error_counter().dropped_lines() as u64;
        let new_drops =
            dropped.saturating_sub(self.dropped_reported.swap(dropped, Ordering::Relaxed));
        let mut writer = self.inner.clone();
        if limited > 0 || new_drops > 0 {
            let _ = writeln!(
                writer,
                "console: {limited} lines over the rate limit and {new_drops} lines of a full queue were not shown (the log store has the services' lines)"
            );
        }
        EitherWriter::A(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 5.0);
        let allowed = (0..8).filter(|_| b.take(t0)).count();
        assert_eq!(allowed, 5, "the burst");
        // 10 lines a second: one every 100 ms.
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(120)));
        assert!(!b.take(t0 + Duration::from_millis(130)));
        // A long quiet time refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        let allowed = (0..20).filter(|_| b.take(later)).count();
        assert_eq!(allowed, 5);
        // Time going backwards (a clock step) takes nothing and refills nothing.
        assert!(!b.take(t0));
    }
}
