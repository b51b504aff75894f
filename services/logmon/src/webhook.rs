//! Sends alerts as JSON POSTs to the optional webhook: a background thread behind a bounded
//! queue, retrying with exponential backoff a bounded number of times, so the monitor never
//! waits for the receiver, and a dead receiver costs at most a full queue.
//!
//! `http://` or `https://` with ureq (rustls with the ring provider; Mozilla's roots, or the
//! certificates of a private CA). The URL is validated by `cluster-config`
//! ([`WebhookUrl`]). Logs name the webhook by its origin (`scheme://host:port`) only: the path
//! and the query often carry a token.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use cluster_config::WebhookUrl;
use ureq::tls::{PemItem, RootCerts, TlsConfig};

use crate::Error;

/// Alerts waiting to be sent; when full, new ones are dropped (and counted), never waited for.
pub const QUEUE_LEN: usize = 256;
/// Delay before the first retry; doubled after each failed attempt, up to [`MAX_RETRY_DELAY`].
pub const INITIAL_RETRY_DELAY: Duration = Duration::from_millis(500);
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Attempts per alert before it is given up (about 2 minutes of retries).
pub const MAX_ATTEMPTS: u32 = 8;
/// The whole of one attempt: resolve, connect, TLS, send, the answer's head.
pub const TIMEOUT: Duration = Duration::from_secs(5);
pub const USER_AGENT: &str = "tandem-logmon";

/// The wait after failed attempt number `attempt` (1-based).
pub fn retry_delay(attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    INITIAL_RETRY_DELAY
        .saturating_mul(factor)
        .min(MAX_RETRY_DELAY)
}

/// `message` with the webhook's path and query replaced by `/…` (an HTTP client's error may
/// quote the URL it was given).
pub fn redact(message: &str, url: &WebhookUrl) -> String {
    let full = url.as_str();
    // The path and query: everything after the authority.
    let after_scheme = full.split_once("://").map_or(full, |(_, rest)| rest);
    let secret = after_scheme
        .find(['/', '?'])
        .map_or("", |i| &after_scheme[i..]);
    let message = message.replace(full, &format!("{}/…", url.origin()));
    if secret.len() > 1 {
        message.replace(secret, "/…")
    } else {
        message
    }
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
    origin: String,
}

impl Webhook {
    /// Starts the sender thread for `url`. An https server's certificate must chain to
    /// Mozilla's roots, or to a certificate in `ca_file` (PEM) when given.
    pub fn spawn(url: &WebhookUrl, ca_file: Option<&Path>) -> Result<Webhook, Error> {
        let roots = match ca_file {
            None => RootCerts::WebPki,
            Some(path) => RootCerts::new_with_certs(&read_certificates(path)?),
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            // A redirect would turn the POST into a GET elsewhere: a misconfiguration to see.
            .max_redirects(0)
            // The environment's proxy is for people; alerts go where the cluster says.
            .proxy(None)
            .user_agent(USER_AGENT)
            .build()
            .into();
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE_LEN);
        let stats = Arc::new(Stats::default());
        let thread_stats = stats.clone();
        let target = url.clone();
        // The thread logs to the caller's subscriber (a test's, or the global one).
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        thread::Builder::new()
            .name("webhook".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    for body in rx {
                        deliver(&agent, &target, &body, &thread_stats);
                    }
                });
            })
            .map_err(|e| Error::Webhook(format!("starting the webhook thread: {e}")))?;
        Ok(Webhook {
            tx,
            stats,
            origin: url.origin(),
        })
    }

    /// Queues one JSON body; never blocks.
    pub fn send(&self, body: Vec<u8>) {
        match self.tx.try_send(body) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(webhook = %self.origin, "webhook queue full: alert dropped");
            }
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

fn read_certificates(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, Error> {
    let io = |source| Error::Io {
        path: PathBuf::from(path),
        source,
    };
    let pem = std::fs::read(path).map_err(io)?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(Error::Webhook(format!(
            "{}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn deliver(agent: &ureq::Agent, url: &WebhookUrl, body: &[u8], stats: &Stats) {
    let origin = url.origin();
    for attempt in 1..=MAX_ATTEMPTS {
        let result = agent
            .post(url.as_str())
            .header("content-type", "application/json")
            .send(body);
        match result {
            Ok(response) if response.status().is_success() => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(response) => tracing::warn!(
                attempt,
                webhook = %origin,
                "webhook answered {}",
                response.status()
            ),
            Err(e) => tracing::warn!(
                attempt,
                webhook = %origin,
                "webhook: {}",
                redact(&e.to_string(), url)
            ),
        }
        stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if attempt < MAX_ATTEMPTS {
            thread::sleep(retry_delay(attempt));
        }
    }
    stats.given_up.fetch_add(1, Ordering::Relaxed);
    tracing::error!(webhook = %origin, "webhook: alert given up after {MAX_ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let delays: Vec<u64> = (1..=9).map(|a| retry_delay(a).as_millis() as u64).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
        );
    }

    #[test]
    fn redaction_leaves_the_origin_only() {
        let url = |u: &str| WebhookUrl::parse(u).unwrap();
        // (url, message, redacted)
        let table = [
            (
                "https://h:8443/hooks/T0KEN?key=T0KEN",
                "bad uri: https://h:8443/hooks/T0KEN?key=T0KEN",
                "bad uri: https://h:8443/…",
            ),
            (
                "http://h/hooks/T0KEN",
                "redirect to /hooks/T0KEN/x",
                "redirect to /…/x",
            ),
            (
                "http://h?key=T0KEN",
                "GET ?key=T0KEN failed",
                "GET /… failed",
            ),
            ("http://h/", "connection refused /", "connection refused /"),
            ("http://h", "io: timeout", "io: timeout"),
        ];
        for (u, message, expected) in table {
            assert_eq!(redact(message, &url(u)), expected, "{u}");
        }
    }
}
