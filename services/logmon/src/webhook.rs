//! Sends alerts as JSON POSTs to the optional webhook: a background thread behind a bounded
//! queue, retrying with exponential backoff, so the monitor never waits for the receiver.
//!
//! Plain `http://` only, with std's `TcpStream` (HTTP/1.1, `Connection: close`). An `https://`
//! webhook is refused at start (alerts are still stored and logged) until a TLS client is
//! brought in.

use std::io::{self, BufRead, BufReader, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::Error;

/// Alerts waiting to be sent; when full, new ones are dropped (and counted), never waited for.
pub const QUEUE_LEN: usize = 256;
/// Delay before the first retry; doubled after each failed attempt, up to [`MAX_RETRY_DELAY`].
pub const INITIAL_RETRY_DELAY: Duration = Duration::from_millis(500);
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Attempts per alert before it is given up (about 2 minutes of retries).
pub const MAX_ATTEMPTS: u32 = 8;
/// Connect, write and read timeout of one attempt.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Where to POST: host, port and path of an `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Parses `http://host[:port][/path]`.
pub fn parse_url(url: &str) -> Result<Url, String> {
    if url.starts_with("https://") {
        return Err(format!(
            "{url}: https webhooks are not supported yet (use http://)"
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not an http:// URL"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    if authority.contains('@') {
        return Err(format!("{url}: credentials in the URL are not supported"));
    }
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{url}: bad port {p:?}"))
    };
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (h, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("{url}: unclosed `[`"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, port(p)?),
            None if after.is_empty() => (h, 80),
            None => return Err(format!("{url}: junk after the address")),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, port(p)?),
            None => (authority, 80),
        }
    };
    if host.is_empty() || path.contains(char::is_whitespace) {
        return Err(format!("{url}: no host, or spaces in the path"));
    }
    Ok(Url {
        host: host.to_string(),
        port,
        path,
    })
}

/// The wait after failed attempt number `attempt` (1-based).
pub fn retry_delay(attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    INITIAL_RETRY_DELAY
        .saturating_mul(factor)
        .min(MAX_RETRY_DELAY)
}

/// Counters of the sender, for the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub delivered: AtomicU64,
    /// Attempts that failed (each retry counts).
    pub failed_attempts: AtomicU64,
    /// Alerts given up after [`MAX_ATTEMPTS`].
    pub given_up: AtomicU64,
    /// Alerts dropped because the queue was full.
    pub dropped: AtomicU64,
}

pub struct Webhook {
    tx: SyncSender<Vec<u8>>,
    stats: Arc<Stats>,
}

impl Webhook {
    /// Starts the sender thread for `url`.
    pub fn spawn(url: &str) -> Result<Webhook, Error> {
        let target = parse_url(url).map_err(Error::Webhook)?;
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE_LEN);
        let stats = Arc::new(Stats::default());
        let thread_stats = stats.clone();
        thread::Builder::new()
            .name("webhook".into())
            .spawn(move || {
                for body in rx {
                    deliver(&target, &body, &thread_stats);
                }
            })
            .map_err(|e| Error::Webhook(format!("starting the webhook thread: {e}")))?;
        Ok(Webhook { tx, stats })
    }

    /// Queues one JSON body; never blocks.
    pub fn send(&self, body: Vec<u8>) {
        match self.tx.try_send(body) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("webhook queue full: alert dropped");
            }
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

fn deliver(target: &Url, body: &[u8], stats: &Stats) {
    for attempt in 1..=MAX_ATTEMPTS {
        match post(target, body) {
            Ok(status) if (200..300).contains(&status) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(status) => tracing::warn!(
                attempt,
                "webhook {}:{}{} answered {status}",
                target.host,
                target.port,
                target.path
            ),
            Err(e) => tracing::warn!(
                attempt,
                "webhook {}:{}{}: {e}",
                target.host,
                target.port,
                target.path
            ),
        }
        stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if attempt < MAX_ATTEMPTS {
            thread::sleep(retry_delay(attempt));
        }
    }
    stats.given_up.fetch_add(1, Ordering::Relaxed);
    tracing::error!("webhook: alert given up after {MAX_ATTEMPTS} attempts");
}

/// One POST; returns the status code.
fn post(target: &Url, body: &[u8]) -> io::Result<u16> {
    let addr = (target.host.as_str(), target.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "host has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let host = if target.host.contains(':') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: tandem-logmon\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        target.path,
        target.port,
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut status_line = String::new();
    BufReader::new(stream).read_line(&mut status_line)?;
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/"))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = |url: &str, host: &str, port: u16, path: &str| {
            assert_eq!(
                parse_url(url),
                Ok(Url {
                    host: host.into(),
                    port,
                    path: path.into()
                }),
                "{url}"
            );
        };
        ok("http://10.0.0.1:8080/hook", "10.0.0.1", 8080, "/hook");
        ok("http://alerts.example", "alerts.example", 80, "/");
        ok("http://h?x=1", "h", 80, "/?x=1");
        ok("http://[::1]:9000/a/b", "::1", 9000, "/a/b");
        ok("http://[::1]", "::1", 80, "/");
        for bad in [
            "https://h/x",
            "ftp://h",
            "http://",
            "http://h:99999/",
            "http://u:p@h/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let delays: Vec<u64> = (1..=9).map(|a| retry_delay(a).as_millis() as u64).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
        );
    }
}
