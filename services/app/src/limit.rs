//! Who a client is and how fast it may write: the client's address from the forwarding chain
//! (balancer → nginx → here), and a token bucket per address in a bounded map. Pure: the time
//! is an argument.

use std::collections::HashMap;
use std::net::IpAddr;

/// Writes one client may make at once (a full bucket).
pub const WRITE_BURST: u32 = 20;
/// Writes per second a client regains, up to [`WRITE_BURST`].
pub const WRITE_REFILL_PER_S: u32 = 2;
/// Clients tracked at once; beyond it, idle (full) buckets go first, then the least recent.
pub const MAX_TRACKED_CLIENTS: usize = 10_000;
/// Token amounts are kept in thousandths, so refill is integer arithmetic per millisecond.
const MILLI: u64 = 1000;

/// The client a request comes from. `x_forwarded_for` is the header as nginx passes it: what
/// the client sent, then what each proxy appended (the balancer appends its client's address,
/// nginx appends the balancer's). Walking from the right past `trusted` proxies (the cluster's
/// nodes and floating IP) reaches the first address no proxy of ours vouches for: the client.
/// Entries left of it are the client's own words and never used. Without the header, the
/// connection's peer.
pub fn client_address(x_forwarded_for: Option<&str>, peer: IpAddr, trusted: &[IpAddr]) -> IpAddr {
    let Some(chain) = x_forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for entry in chain.rsplit(',') {
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip.to_canonical();
                if !trusted.contains(&client) {
                    break;
                }
            }
            // Garbage can only come from a client: whoever appended the last address is it.
            Err(_) => break,
        }
    }
    client
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    /// Thousandths of a write.
    tokens: u64,
    /// When `tokens` was last brought up to date.
    at_ms: u64,
}

/// One token bucket per client address, at most `max_clients` of them.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    burst: u64,
    refill_per_s: u64,
    max_clients: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(WRITE_BURST, WRITE_REFILL_PER_S, MAX_TRACKED_CLIENTS)
    }
}

impl RateLimiter {
    pub fn new(burst: u32, refill_per_s: u32, max_clients: usize) -> RateLimiter {
        RateLimiter {
            burst: u64::from(burst.max(1)) * MILLI,
            refill_per_s: u64::from(refill_per_s.max(1)),
            max_clients: max_clients.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Clients currently tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn refilled(&self, b: Bucket, now_ms: u64) -> u64 {
        let gained = now_ms
            .saturating_sub(b.at_ms)
            .saturating_mul(self.refill_per_s);
        b.tokens.saturating_add(gained).min(self.burst)
    }

    /// Takes one write for `client` at `now_ms` (a monotonic clock). `Err` holds the whole
    /// seconds until the next write is allowed (at least 1): the `Retry-After` value.
    pub fn take(&mut self, client: IpAddr, now_ms: u64) -> Result<(), u64> {
        if !self.buckets.contains_key(&client) && self.buckets.len() >= self.max_clients {
            self.make_room(now_ms);
        }
        let bucket = self.buckets.get(&client).copied().unwrap_or(Bucket {
            tokens: self.burst,
            at_ms: now_ms,
        });
        let tokens = self.refilled(bucket, now_ms);
        let (tokens, answer) = match tokens.checked_sub(MILLI) {
            Some(left) => (left, Ok(())),
            None => {
                let wait_ms = (MILLI - tokens).div_ceil(self.refill_per_s);
                (tokens, Err(wait_ms.div_ceil(1000).max(1)))
            }
        };
        self.buckets.insert(
            client,
            Bucket {
                tokens,
                at_ms: now_ms,
            },
        );
        answer
    }

    /// Forgets clients whose bucket refilled (as good as new), then, if none did, the one seen
    /// least recently.
    fn make_room(&mut self, now_ms: u64) {
        let burst = self.burst;
        let per_s = self.refill_per_s;
        self.buckets.retain(|_, b| {
            let gained = now_ms.saturating_sub(b.at_ms).saturating_mul(per_s);
            b.tokens.saturating_add(gained) < burst
        });
        if self.buckets.len() >= self.max_clients {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.at_ms)
                .map(|(ip, _)| *ip)
            {
                self.buckets.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_first_address_no_proxy_of_ours_vouches_for() {
        let trusted = [ip("10.88.0.11"), ip("10.88.0.12"), ip("10.88.0.10")];
        let peer = ip("127.0.0.1");
        let check = |xff: Option<&str>, want: &str| {
            assert_eq!(
                client_address(xff, peer, &trusted),
                ip(want),
                "X-Forwarded-For: {xff:?}"
            );
        };
        // Straight to nginx: nginx appended the client.
        check(Some("203.0.113.7"), "203.0.113.7");
        // Through a balancer: it appended the client, nginx appended the balancer.
        check(Some("203.0.113.7, 10.88.0.12"), "203.0.113.7");
        // A client's forged entries are left of its real address: ignored.
        check(
            Some("10.88.0.11, 1.2.3.4, 203.0.113.7, 10.88.0.11"),
            "203.0.113.7",
        );
        check(Some("garbage, 203.0.113.7, 10.88.0.11"), "203.0.113.7");
        // A node itself is the client.
        check(Some("10.88.0.12, 10.88.0.11"), "10.88.0.12");
        check(Some("garbage, 10.88.0.11"), "10.88.0.11");
        check(Some(" ::ffff:203.0.113.9 ,10.88.0.11"), "203.0.113.9");
        check(Some("2001:db8::1"), "2001:db8::1");
        // No header (not behind nginx): the connection's peer.
        check(None, "127.0.0.1");
        check(Some(""), "127.0.0.1");
    }

    #[test]
    fn token_buckets_allow_a_burst_then_the_refill_rate() {
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let mut l = RateLimiter::new(3, 2, 100);
        // (client, time in ms, expected answer)
        let steps: &[(IpAddr, u64, Result<(), u64>)] = &[
            (a, 0, Ok(())),
            (a, 0, Ok(())),
            (a, 0, Ok(())),
            (a, 0, Err(1)),
            (b, 0, Ok(())), // another client is not slowed down
            (a, 499, Err(1)),
            (a, 500, Ok(())), // 2 per second: one every 500 ms
            (a, 500, Err(1)),
            (a, 10_000, Ok(())), // refilled to the burst, not beyond
            (a, 10_000, Ok(())),
            (a, 10_000, Ok(())),
            (a, 10_000, Err(1)),
        ];
        for (i, (client, now, want)) in steps.iter().enumerate() {
            assert_eq!(
                l.take(*client, *now),
                *want,
                "step {i}: {client} at {now} ms"
            );
        }
        let mut slow = RateLimiter::new(1, 1, 10);
        assert_eq!(slow.take(a, 0), Ok(()));
        assert_eq!(slow.take(a, 1), Err(1));
        let mut slower = RateLimiter::new(1, 1, 10);
        assert_eq!(slower.take(a, 0), Ok(()));
        assert_eq!(slower.take(a, 0), Err(1));
        assert_eq!(slower.take(a, 999), Err(1));
        assert_eq!(slower.take(a, 1000), Ok(()));
    }

    #[test]
    fn the_map_stays_bounded_and_forgets_idle_clients_first() {
        let mut l = RateLimiter::new(2, 1, 3);
        let c = |n: u8| IpAddr::from([192, 0, 2, n]);
        for n in 1..=3 {
            assert_eq!(l.take(c(n), u64::from(n)), Ok(()));
        }
        assert_eq!(l.len(), 3);
        // All three are still below a full bucket: the least recent (c1) makes room.
        assert_eq!(l.take(c(4), 10), Ok(()));
        assert_eq!(l.len(), 3);
        assert_eq!(l.take(c(2), 10), Ok(()));
        assert_eq!(l.take(c(2), 10), Err(1), "c2 kept its bucket");
        // Much later every bucket is full again: all are forgotten before a new one is added.
        assert_eq!(l.take(c(5), 100_000), Ok(()));
        assert_eq!(l.len(), 1);
        // A flood of addresses never grows the map past its bound.
        for n in 0..=255 {
            let _ = l.take(c(n), 100_001);
            assert!(l.len() <= 3);
        }
    }
}
