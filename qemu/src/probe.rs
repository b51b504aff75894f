//! A client's view of availability: one HTTPS GET every `interval` from inside the cluster
//! namespace, each on a new TCP+TLS connection, whether or not earlier ones have finished. What
//! a user behind the floating IP would notice during a failover is the time between two
//! successful answers, so that is the headline number ([`ProbeReport::longest_gap`]).
//!
//! The IO (threads, ureq) is thin; what the records mean is decided by [`summarize`], a pure
//! function of the records that is table-tested.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::netns::Netns;

/// One request every 20 ms: 50 per second, fine-grained enough to see a 100 ms outage.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// A request that takes longer than this counts as failed (`timeout`).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Requests in flight at once; beyond that a request is not sent and counts as `overload`, so a
/// dead target cannot pile up threads.
pub const MAX_IN_FLIGHT: usize = 100;
/// A pause between successes longer than this many intervals is listed in
/// [`ProbeReport::gaps`].
pub const GAP_FACTOR: u32 = 5;
/// Bodies are read up to this size (`/node.html` is a few hundred bytes).
const BODY_LIMIT: u64 = 64 * 1024;
/// After the schedule ends, how long past `timeout` the probe waits for stragglers.
const STRAGGLER_GRACE: Duration = Duration::from_secs(2);

/// Error kinds (keys of [`ProbeReport::errors`]) the probe itself produces.
pub const OVERLOAD: &str = "overload";
pub const NO_ANSWER: &str = "no answer";

/// What to probe, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOptions {
    /// `https://…` (certificate not verified: the nodes' are self-signed) or `http://…`.
    pub url: String,
    pub interval: Duration,
    /// For the whole request: connect, TLS handshake, response and body.
    pub timeout: Duration,
    /// The probe stops sending after this long, even if nobody calls [`Probe::stop`].
    pub duration: Duration,
}

impl ProbeOptions {
    /// `url` at the default interval and timeout, for at most `duration`.
    pub fn new(url: impl Into<String>, duration: Duration) -> ProbeOptions {
        ProbeOptions {
            url: url.into(),
            interval: DEFAULT_PROBE_INTERVAL,
            timeout: DEFAULT_PROBE_TIMEOUT,
            duration,
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// HTTP 200; the node named by the body's `node: NAME`, if any.
    Ok(Option<String>),
    /// Anything else, by kind: `timeout`, `refused`, `status 502`, `overload`, …
    Failed(String),
}

/// One request: when it was sent and when it ended, as offsets from the probe's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub start: Duration,
    pub end: Duration,
    pub outcome: Outcome,
}

/// What the client saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeReport {
    /// Requests scheduled (including those counted as `overload` without being sent).
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// The longest time between two consecutive successful completions. When a request sent
    /// before the first success failed, counted from the probe's start; when one sent after the
    /// last success failed, to its end (an outage that never ended).
    pub longest_gap: Duration,
    /// Gaps longer than [`GAP_FACTOR`] intervals: (offset from the start, length), in order.
    pub gaps: Vec<(Duration, Duration)>,
    /// Successful answers by the node named in the body (`node: NAME`).
    pub by_node: BTreeMap<String, u64>,
    /// Failed requests by kind.
    pub errors: BTreeMap<String, u64>,
    /// Each failed request: when it was sent (offset from the start) and its kind, in order.
    pub failed_at: Vec<(Duration, String)>,
    /// How long the probe ran (to the last completion it waited for).
    pub elapsed: Duration,
}

impl ProbeReport {
    /// One line for humans, e.g. `sent 400, ok 390, failed 10 (timeout 10); longest gap 312 ms;
    /// 1 gap > 100 ms: 312 ms at 3.02 s; served by server1 200, server2 190`.
    pub fn summary(&self) -> String {
        let mut s = format!("sent {}, ok {}, failed {}", self.sent, self.ok, self.failed);
        if !self.errors.is_empty() {
            s.push_str(&format!(" ({})", join_counts(&self.errors)));
        }
        let _ = write!(s, "; longest gap {}", ms(self.longest_gap));
        if !self.gaps.is_empty() {
            let _ = write!(s, "; {} long gap(s):", self.gaps.len());
            for (i, (at, len)) in self.gaps.iter().enumerate().take(5) {
                let sep = if i == 0 { " " } else { ", " };
                let _ = write!(s, "{sep}{} at {:.2} s", ms(*len), at.as_secs_f64());
            }
            if self.gaps.len() > 5 {
                s.push_str(", …");
            }
        }
        if !self.failed_at.is_empty() {
            s.push_str("; failed requests sent at");
            for (i, (at, kind)) in self.failed_at.iter().enumerate().take(5) {
                let sep = if i == 0 { " " } else { ", " };
                let _ = write!(s, "{sep}{:.2} s ({kind})", at.as_secs_f64());
            }
            if self.failed_at.len() > 5 {
                s.push_str(", …");
            }
        }
        if !self.by_node.is_empty() {
            let _ = write!(s, "; served by {}", join_counts(&self.by_node));
        }
        s
    }
}

/// `12 ms`, `1234 ms`.
pub(crate) fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn join_counts(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report for `records` (in any order) of a probe that scheduled `sent` requests and ran
/// until `end`. Requests scheduled but without a record are still in flight and not counted as
/// failed (see [`Probe::snapshot`]); the final report gives each a [`NO_ANSWER`] record.
pub fn summarize(records: &[Record], sent: u64, end: Duration, interval: Duration) -> ProbeReport {
    let mut r = ProbeReport {
        sent,
        elapsed: end,
        ..ProbeReport::default()
    };
    for rec in records {
        match &rec.outcome {
            Outcome::Ok(node) => {
                r.ok += 1;
                if let Some(n) = node {
                    *r.by_node.entry(n.clone()).or_default() += 1;
                }
            }
            Outcome::Failed(kind) => {
                r.failed += 1;
                *r.errors.entry(kind.clone()).or_default() += 1;
                r.failed_at.push((rec.start, kind.clone()));
            }
        }
    }
    r.failed_at.sort();
    let threshold = interval * GAP_FACTOR;
    for (at, len) in gaps(records, end) {
        r.longest_gap = r.longest_gap.max(len);
        if len > threshold {
            r.gaps.push((at, len));
        }
    }
    r
}

/// Every pause between consecutive successful completions, as (offset, length), in order. A
/// request sent before the first success that failed opens a pause at 0; one sent after the last
/// success that failed leaves a pause open until `end`. Without any failure, the time to the first answer is latency, not a
/// pause, and is left out.
pub fn gaps(records: &[Record], end: Duration) -> Vec<(Duration, Duration)> {
    let mut ok: Vec<Duration> = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Ok(_)))
        .map(|r| r.end)
        .collect();
    ok.sort();
    let failures = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)));
    let (first, last) = match (ok.first(), ok.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => {
            // Nothing succeeded: one pause over the whole run, if anything was tried at all.
            return match records.is_empty() {
                true => Vec::new(),
                false => vec![(Duration::ZERO, end)],
            };
        }
    };
    let mut points = Vec::with_capacity(ok.len() + 2);
    // By when a failed request was sent: one sent before the first answer says the target was
    // not answering from the start; one sent after the last answer, that it stopped. (A request
    // that times out after later ones succeeded says neither.)
    if failures.clone().any(|r| r.start < first) {
        points.push(Duration::ZERO);
    }
    points.extend(ok);
    if failures.clone().any(|r| r.start > last) {
        points.push(end.max(last));
    }
    points
        .windows(2)
        .map(|w| (w[0], w[1].saturating_sub(w[0])))
        .collect()
}

/// The node name in a page containing `node: NAME` (as `/node.html` does).
pub fn node_in_body(body: &str) -> Option<String> {
    let rest = &body[body.find("node: ")? + "node: ".len()..];
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    (!name.is_empty()).then_some(name)
}

/// The kind of a failed request, with few distinct values so the counts stay readable.
fn error_kind(e: &ureq::Error) -> String {
    use std::io::ErrorKind as K;
    match e {
        ureq::Error::Timeout(_) => "timeout".into(),
        ureq::Error::StatusCode(code) => format!("status {code}"),
        ureq::Error::Io(io) => match io.kind() {
            K::ConnectionRefused => "refused".into(),
            K::ConnectionReset => "reset".into(),
            K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe => "closed".into(),
            K::TimedOut | K::WouldBlock => "timeout".into(),
            K::HostUnreachable | K::NetworkUnreachable => "unreachable".into(),
            other => format!("io {other:?}").to_lowercase(),
        },
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => "tls".into(),
        ureq::Error::Protocol(_) => "protocol".into(),
        ureq::Error::ConnectionFailed => "connect failed".into(),
        ureq::Error::BodyExceedsLimit(_) => "body too large".into(),
        _ => "other".into(),
    }
}

/// One GET on a fresh connection.
fn request(agent: &ureq::Agent, url: &str) -> Outcome {
    let result = agent.get(url).header("Connection", "close").call();
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(error_kind(&e)),
    };
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(BODY_LIMIT)
        .read_to_string();
    match (status, body) {
        (200, Ok(body)) => Outcome::Ok(node_in_body(&body)),
        (200, Err(e)) => Outcome::Failed(error_kind(&e)),
        (code, _) => Outcome::Failed(format!("status {code}")),
    }
}

/// A client without connection reuse, redirects, proxies or certificate checks.
fn agent(timeout: Duration) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .disable_verification(true)
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .max_idle_connections(0)
        .max_idle_connections_per_host(0)
        .max_redirects(0)
        .proxy(None)
        .user_agent("tandem-qemu-probe")
        .tls_config(tls)
        .build()
        .new_agent()
}

struct Shared {
    t0: Instant,
    stop: AtomicBool,
    /// Requests scheduled so far.
    sent: AtomicU64,
    in_flight: AtomicUsize,
    /// `None` once the final report is taken: late workers drop their record.
    records: Mutex<Option<Vec<Record>>>,
    /// When the coordinator stopped waiting (offset from `t0`).
    ended: Mutex<Option<Duration>>,
}

impl Shared {
    fn push(&self, record: Record) {
        if let Some(v) = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            v.push(record);
        }
    }
}

/// A running probe. [`Probe::stop`] ends it early and returns the report; dropping it stops it.
pub struct Probe {
    shared: Arc<Shared>,
    interval: Duration,
    coordinator: Option<JoinHandle<()>>,
}

impl Probe {
    /// Start probing from inside `netns`.
    pub fn start(netns: &Arc<Netns>, opts: ProbeOptions) -> Result<Probe> {
        if opts.interval.is_zero() || opts.timeout.is_zero() {
            return Err(Error::Spec(format!(
                "probe interval ({:?}) and timeout ({:?}) must be positive",
                opts.interval, opts.timeout
            )));
        }
        opts.url
            .parse::<ureq::http::Uri>()
            .map_err(|e| Error::Http(format!("probe URL {:?}: {e}", opts.url)))?;
        let shared = Arc::new(Shared {
            t0: Instant::now(),
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            records: Mutex::new(Some(Vec::new())),
            ended: Mutex::new(None),
        });
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let netns2 = netns.clone();
        let shared2 = shared.clone();
        let interval = opts.interval;
        let coordinator = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                // Threads spawned from here on are born in the namespace too.
                let entered = netns2.enter_current_thread();
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    coordinate(&shared2, &opts);
                }
            })
            .map_err(|source| Error::Netns {
                netns: netns.name().to_string(),
                what: "starting the probe thread".into(),
                source,
            })?;
        ready
            .recv()
            .unwrap_or_else(|_| Err(Error::Http("the probe thread died".into())))?;
        Ok(Probe {
            shared,
            interval,
            coordinator: Some(coordinator),
        })
    }

    /// Time since the probe started.
    pub fn elapsed(&self) -> Duration {
        self.shared.t0.elapsed()
    }

    /// The report so far (requests still in flight are not counted yet).
    pub fn snapshot(&self) -> ProbeReport {
        let guard = self
            .shared
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let records = guard.as_deref().unwrap_or_default();
        summarize(
            records,
            self.shared.sent.load(Ordering::SeqCst),
            self.elapsed(),
            self.interval,
        )
    }

    /// Stop sending, wait for the requests in flight (at most the timeout), and report.
    pub fn stop(mut self) -> ProbeReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.finish()
    }

    /// Wait until the probe's `duration` is over, then report.
    pub fn wait(mut self) -> ProbeReport {
        self.finish()
    }

    fn finish(&mut self) -> ProbeReport {
        if let Some(c) = self.coordinator.take() {
            c.thread().unpark();
            let _ = c.join();
        }
        let end = self
            .shared
            .ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(|| self.elapsed());
        let mut records = self
            .shared
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let sent = self.shared.sent.load(Ordering::SeqCst);
        let missing = sent.saturating_sub(records.len() as u64);
        records.extend((0..missing).map(|_| Record {
            start: end,
            end,
            outcome: Outcome::Failed(NO_ANSWER.into()),
        }));
        summarize(&records, sent, end, self.interval)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self.coordinator.take() {
            c.thread().unpark();
            let _ = c.join();
        }
    }
}

/// The schedule: one request per interval until stopped or `duration` is over, then wait for
/// the stragglers.
fn coordinate(shared: &Arc<Shared>, opts: &ProbeOptions) {
    let agent = agent(opts.timeout);
    let t0 = shared.t0;
    let mut due = Duration::ZERO;
    while !shared.stop.load(Ordering::SeqCst) && due < opts.duration {
        let now = t0.elapsed();
        if now < due {
            std::thread::park_timeout(due - now);
            continue;
        }
        shared.sent.fetch_add(1, Ordering::SeqCst);
        if shared.in_flight.load(Ordering::SeqCst) >= MAX_IN_FLIGHT {
            shared.push(Record {
                start: due,
                end: due,
                outcome: Outcome::Failed(OVERLOAD.into()),
            });
        } else {
            launch(shared, &agent, &opts.url, due);
        }
        // When late (a slow spawn, a stalled host), skip the missed slots rather than burst.
        due += opts.interval;
        let now = t0.elapsed();
        if now > due + opts.interval {
            due = now;
        }
    }
    let deadline = Instant::now() + opts.timeout + STRAGGLER_GRACE;
    while shared.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    *shared.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(t0.elapsed());
}

fn launch(shared: &Arc<Shared>, agent: &ureq::Agent, url: &str, start: Duration) {
    /// Decrements the in-flight count however the worker ends.
    struct InFlight(Arc<Shared>);
    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight(shared.clone());
    let (agent, url) = (agent.clone(), url.to_string());
    let spawned = std::thread::Builder::new()
        .name("probe-req".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let outcome = request(&agent, &url);
            let end = guard.0.t0.elapsed();
            guard.0.push(Record {
                start,
                end,
                outcome,
            });
        });
    if spawned.is_err() {
        // The closure (and its guard) was dropped: the count is already back.
        shared.push(Record {
            start,
            end: shared.t0.elapsed(),
            outcome: Outcome::Failed("no thread".into()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// `(start ms, end ms, ok)`.
    fn records(rows: &[(u64, u64, bool)]) -> Vec<Record> {
        rows.iter()
            .map(|&(s, e, ok)| Record {
                start: d(s),
                end: d(e),
                outcome: if ok {
                    Outcome::Ok(None)
                } else {
                    Outcome::Failed("timeout".into())
                },
            })
            .collect()
    }

    #[test]
    fn gap_table() {
        // (records, end of probe, expected longest gap, expected gaps > 5 × 20 ms)
        #[allow(clippy::type_complexity)]
        let table: &[(&[(u64, u64, bool)], u64, u64, &[(u64, u64)])] = &[
            // Nothing tried.
            (&[], 1000, 0, &[]),
            // Steady: answers 20 ms apart; the 5 ms latency to the first one is not a gap.
            (&[(0, 5, true), (20, 25, true), (40, 45, true)], 60, 20, &[]),
            // Completions out of order are sorted first.
            (&[(40, 45, true), (0, 5, true), (20, 25, true)], 60, 20, &[]),
            // An outage: from the last success before it to the first success after it.
            (
                &[
                    (0, 5, true),
                    (20, 25, true),
                    (40, 1040, false),
                    (60, 1060, false),
                    (300, 310, true),
                    (320, 330, true),
                ],
                1100,
                285,
                &[(25, 285)],
            ),
            // A slow success still closes the gap only when it completes.
            (
                &[(0, 5, true), (20, 600, true), (40, 45, true)],
                620,
                555,
                &[(45, 555)],
            ),
            // Failures before the first success: the gap starts at 0.
            (
                &[(0, 1000, false), (20, 30, false), (200, 210, true)],
                220,
                210,
                &[(0, 210)],
            ),
            // Failures after the last success and no recovery: the gap runs to the end.
            (
                &[(0, 5, true), (20, 25, true), (40, 1040, false)],
                2000,
                1975,
                &[(25, 1975)],
            ),
            // Nothing succeeded: the whole run is one gap.
            (
                &[(0, 1000, false), (20, 1020, false)],
                1100,
                1100,
                &[(0, 1100)],
            ),
            // Two separate outages, both listed; the longest wins.
            (
                &[
                    (0, 5, true),
                    (20, 25, false),
                    (200, 205, true),
                    (220, 225, true),
                    (240, 245, false),
                    (600, 605, true),
                ],
                620,
                380,
                &[(5, 200), (225, 380)],
            ),
        ];
        for (i, (rows, end, longest, expected)) in table.iter().enumerate() {
            let recs = records(rows);
            let r = summarize(&recs, recs.len() as u64, d(*end), d(20));
            let expected: Vec<_> = expected.iter().map(|&(a, l)| (d(a), d(l))).collect();
            assert_eq!(
                (r.longest_gap, &r.gaps),
                (d(*longest), &expected),
                "row {i}: {rows:?}"
            );
        }
    }

    #[test]
    fn counts_by_node_and_error() {
        let recs = vec![
            Record {
                start: d(0),
                end: d(5),
                outcome: Outcome::Ok(Some("server1".into())),
            },
            Record {
                start: d(20),
                end: d(25),
                outcome: Outcome::Ok(Some("server1".into())),
            },
            Record {
                start: d(40),
                end: d(45),
                outcome: Outcome::Ok(None),
            },
            Record {
                start: d(60),
                end: d(61),
                outcome: Outcome::Failed("refused".into()),
            },
            Record {
                start: d(80),
                end: d(85),
                outcome: Outcome::Failed("status 502".into()),
            },
            Record {
                start: d(100),
                end: d(105),
                outcome: Outcome::Ok(Some("server2".into())),
            },
        ];
        let r = summarize(&recs, 7, d(120), d(20));
        assert_eq!((r.sent, r.ok, r.failed), (7, 4, 2));
        assert_eq!(
            r.by_node.into_iter().collect::<Vec<_>>(),
            [("server1".to_string(), 2), ("server2".to_string(), 1)]
        );
        assert_eq!(
            r.errors.into_iter().collect::<Vec<_>>(),
            [("refused".to_string(), 1), ("status 502".to_string(), 1)]
        );
        assert_eq!(r.longest_gap, d(60));
        assert_eq!(r.gaps, []);
    }

    #[test]
    fn summary_line() {
        let r = ProbeReport {
            sent: 400,
            ok: 390,
            failed: 10,
            longest_gap: d(312),
            gaps: vec![(d(3020), d(312))],
            by_node: [("server1".into(), 200), ("server2".into(), 190)].into(),
            errors: [("timeout".into(), 10)].into(),
            failed_at: vec![(d(3010), "timeout".into())],
            elapsed: d(8000),
        };
        assert_eq!(
            r.summary(),
            "sent 400, ok 390, failed 10 (timeout 10); longest gap 312 ms; 1 long gap(s): \
             312 ms at 3.02 s; failed requests sent at 3.01 s (timeout); served by server1 200, \
             server2 190"
        );
    }

    #[test]
    fn node_names_from_bodies() {
        let check = |body: &str, expected: Option<&str>| {
            assert_eq!(node_in_body(body).as_deref(), expected, "{body:?}");
        };
        check("<p>node: server1</p>\n", Some("server1"));
        check("<h1>x</h1><p>node: db-2_b</p>", Some("db-2_b"));
        check("node: \n", None);
        check("<p>role: primary</p>", None);
        check("", None);
    }
}
