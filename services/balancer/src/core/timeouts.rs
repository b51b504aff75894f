//! What to do with a client connection when its timer fires (pure: the time is passed in).
//!
//! A request head has two deadlines, and the earlier one wins:
//! - the framing tracker's: from the first byte of the head it saw (408);
//! - one that does not depend on the tracker, for HTTP/1 connections: from the first byte read
//!   while no request was in flight until hyper delivered a head (408). The tracker may stop
//!   following a connection (a line longer than it buffers, something it does not parse) while
//!   hyper goes on reading heads; this deadline still holds then.

use std::time::{Duration, Instant};

use crate::core::framing::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing yet; look again at this instant.
    WaitUntil(Instant),
    /// Close without a word (idle keep-alive, or a stalled body).
    Close,
    /// A request head is too slow: answer 408 and close (slowloris).
    RequestTimeout,
}

#[derive(Debug, Clone, Copy)]
pub struct ConnTimes {
    pub progress: Progress,
    /// Requests whose response is not yet fully sent.
    pub inflight: u64,
    /// Whether any request byte ever arrived (a new connection gets the head timeout to start).
    pub seen_bytes: bool,
    pub last_read: Instant,
    /// When the first byte of the current, incomplete head arrived (framing tracker).
    pub head_started: Option<Instant>,
    /// HTTP/1: when the first byte arrived that was read while no request was in flight and that
    /// hyper has not yet turned into a request (independent of the tracker).
    pub unanswered_since: Option<Instant>,
}

pub fn decide(
    t: ConnTimes,
    now: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
) -> Decision {
    let tracked = match t.progress {
        // A slow request body: nothing read for the idle timeout, whatever is in flight.
        Progress::InBody => Some((t.last_read + idle_timeout, Decision::Close)),
        // A response is being made or sent (or a body forwarded): the backend timeouts apply.
        _ if t.inflight > 0 => None,
        Progress::InHead => Some((
            t.head_started.unwrap_or(t.last_read) + header_timeout,
            Decision::RequestTimeout,
        )),
        Progress::Idle if !t.seen_bytes => Some((t.last_read + header_timeout, Decision::Close)),
        Progress::Idle | Progress::Off => Some((t.last_read + idle_timeout, Decision::Close)),
    };
    let unanswered = t
        .unanswered_since
        .filter(|_| t.inflight == 0)
        .map(|since| (since + header_timeout, Decision::RequestTimeout));
    // On a tie the tracker's reason stands.
    let first = match (tracked, unanswered) {
        (Some(a), Some(b)) if b.0 < a.0 => Some(b),
        (a, b) => a.or(b),
    };
    match first {
        Some((deadline, then)) if now >= deadline => then,
        Some((deadline, _)) => Decision::WaitUntil(deadline),
        None => Decision::WaitUntil(now + idle_timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;
    use Progress::*;

    #[test]
    fn timeout_table() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let (head, idle) = (s(10), s(60));
        let times =
            |progress, inflight, seen_bytes, last_read: u64, head_started: Option<u64>| ConnTimes {
                progress,
                inflight,
                seen_bytes,
                last_read: t0 + s(last_read),
                head_started: head_started.map(|h| t0 + s(h)),
                unanswered_since: None,
            };
        let unanswered = |t: ConnTimes, since: u64| ConnTimes {
            unanswered_since: Some(t0 + s(since)),
            ..t
        };
        #[rustfmt::skip]
        let table = [
            // new connection, nothing sent: head timeout, silent close
            (times(Idle, 0, false, 0, None),       5,  WaitUntil(t0 + s(10))),
            (times(Idle, 0, false, 0, None),       10, Close),
            // keep-alive between requests: idle timeout
            (times(Idle, 0, true, 0, None),        30, WaitUntil(t0 + s(60))),
            (times(Idle, 0, true, 0, None),        61, Close),
            // slowloris: bytes trickle in, the head never completes -> 408 from its first byte
            (times(InHead, 0, true, 11, Some(0)),  12, RequestTimeout),
            (times(InHead, 0, true, 9, Some(0)),   9,  WaitUntil(t0 + s(10))),
            // a request in flight suspends the head/idle timers
            (times(Idle, 1, true, 0, None),        100, WaitUntil(t0 + s(160))),
            (times(InHead, 1, true, 0, Some(0)),   100, WaitUntil(t0 + s(160))),
            // a stalled upload is closed even with the request in flight
            (times(InBody, 1, true, 0, None),      59, WaitUntil(t0 + s(60))),
            (times(InBody, 1, true, 0, None),      60, Close),
            (times(Off, 0, true, 0, None),         60, Close),
            // A head the tracker no longer follows (Off) still has its deadline: bytes trickle in
            // (last read at 9 s), hyper makes no request of them.
            (unanswered(times(Off, 0, true, 9, None), 0),      5,  WaitUntil(t0 + s(10))),
            (unanswered(times(Off, 0, true, 9, None), 0),      10, RequestTimeout),
            // ... whatever the tracker believes (a tracker out of step with hyper).
            (unanswered(times(InBody, 0, true, 9, None), 0),   10, RequestTimeout),
            (unanswered(times(Idle, 0, true, 9, None), 0),     10, RequestTimeout),
            // The earlier of the two head deadlines wins; on a tie the tracker's.
            (unanswered(times(InHead, 0, true, 9, Some(2)), 0), 10, RequestTimeout),
            (unanswered(times(InHead, 0, true, 9, Some(0)), 3), 11, RequestTimeout),
            (unanswered(times(InHead, 0, true, 9, Some(3)), 0), 5,  WaitUntil(t0 + s(10))),
            // Not while a request is in flight (its body, a pipelined head).
            (unanswered(times(Off, 1, true, 9, None), 0),      30, WaitUntil(t0 + s(90))),
        ];
        for (k, (t, now, expected)) in table.into_iter().enumerate() {
            assert_eq!(
                decide(t, t0 + s(now), head, idle),
                expected,
                "row {k}: {t:?}"
            );
        }
    }
}
