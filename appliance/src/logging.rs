//! Process-wide tracing setup: human-readable lines on stderr, filtered by `RUST_LOG`.
//!
//! Child output is emitted under the target `svc` with the fields `service` and `stream`, so
//! `RUST_LOG=svc=warn` quiets the services while keeping the supervisor's own messages.

use std::io::IsTerminal;

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
