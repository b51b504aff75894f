//! What to do with a client connection when its timer fires (pure: the time is passed in).

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
    /// When the first byte of the current, incomplete head arrived.
    pub head_started: Option<Instant>,
}

pub fn decide(
    t: ConnTimes,
    now: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
) -> Decision {
    let at = |deadline: Instant, then: Decision| {
        if now >= deadline {
            then
        } else {
            Decision::WaitUntil(deadline)
        }
    };
    match t.progress {
        // A slow request body: nothing read for the idle timeout, whatever is in flight.
        Progress::InBody => at(t.last_read + idle_timeout, Decision::Close),
        // A response is being made or sent: the backend timeouts apply, not these.
        _ if t.inflight > 0 => Decision::WaitUntil(now + idle_timeout),
        Progress::InHead => at(
            t.head_started.unwrap_or(t.last_read) + header_timeout,
            Decision::RequestTimeout,
        ),
        Progress::Idle if !t.seen_bytes => at(t.last_read + header_timeout, Decision::Close),
        Progress::Idle | Progress::Off => at(t.last_read + idle_timeout, Decision::Close),
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
