//! Connection caps: how many client connections the balancer holds at once, in all and per
//! client address (HAProxy's `maxconn`, nginx's `limit_conn`). Pure: the caller holds the lock,
//! owns the sockets and passes the time in.
//!
//! A connection counts from its admission until its slot is released, which the caller ties to
//! the socket's lifetime (a TLS handshake, keep-alive, an upgraded tunnel all count). A client
//! with no connection left has no entry: the table holds at most one entry per open connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// At most one warning in this long about refused connections; the rest go to the counter
/// and debug lines (a flood must not become a flood of log lines).
pub const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub global: usize,
    pub per_client: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The balancer holds `Caps::global` connections.
    Global,
    /// This client address holds `Caps::per_client` connections.
    PerClient,
}

impl Refusal {
    /// The `reason` label of the refused-connections counter.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Global => "global",
            Refusal::PerClient => "per_client",
        }
    }
}

#[derive(Debug, Default)]
pub struct Admission {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
    refused_since_warning: u64,
    last_warning: Option<Instant>,
}

impl Admission {
    /// Take a slot for a new connection from `client`, or say why not.
    pub fn admit(&mut self, client: IpAddr, caps: Caps) -> Result<(), Refusal> {
        if self.total >= caps.global {
            return Err(Refusal::Global);
        }
        let n = self.per_client.entry(client).or_insert(0);
        if *n >= caps.per_client {
            if *n == 0 {
                // A cap of 0 per client: never leave an empty entry behind.
                self.per_client.remove(&client);
            }
            return Err(Refusal::PerClient);
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    /// Give back the slot of a connection from `client` that [`Admission::admit`] let in.
    pub fn release(&mut self, client: IpAddr) {
        if let Some(n) = self.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client);
            }
            self.total -= 1;
        } else {
            debug_assert!(false, "released a slot {client} never had");
        }
    }

    /// Record a refusal; `Some(refusals since the last warning)` when a warning is due now.
    pub fn refused(&mut self, now: Instant) -> Option<u64> {
        self.refused_since_warning += 1;
        let due = self
            .last_warning
            .is_none_or(|last| now.saturating_duration_since(last) >= WARN_EVERY);
        if !due {
            return None;
        }
        self.last_warning = Some(now);
        Some(std::mem::take(&mut self.refused_since_warning))
    }

    /// Connections held.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Client addresses with at least one connection.
    pub fn clients(&self) -> usize {
        self.per_client.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Admit(u8),
        Release(u8),
    }
    use Op::*;

    /// Runs `ops` from an empty table with `caps`; each admit's outcome must match, and at the
    /// end the totals (connections, client entries).
    fn check(caps: (usize, usize), ops: &[(Op, Result<(), Refusal>)], end: (usize, usize)) {
        let caps = Caps {
            global: caps.0,
            per_client: caps.1,
        };
        let ip = |n: u8| IpAddr::from([192, 0, 2, n]);
        let mut a = Admission::default();
        for (k, (op, expected)) in ops.iter().enumerate() {
            match *op {
                Admit(c) => assert_eq!(a.admit(ip(c), caps), *expected, "op {k}: {op:?}"),
                Release(c) => a.release(ip(c)),
            }
        }
        assert_eq!((a.total(), a.clients()), end, "{ops:?}");
    }

    #[test]
    fn admission_table() {
        use Refusal::*;
        let ok = Ok(());
        check(
            (10, 2),
            &[(Admit(1), ok), (Admit(1), ok), (Admit(1), Err(PerClient))],
            (2, 1),
        );
        // Other clients are not affected by one client's cap.
        check(
            (10, 2),
            &[
                (Admit(1), ok),
                (Admit(1), ok),
                (Admit(2), ok),
                (Admit(1), Err(PerClient)),
            ],
            (3, 2),
        );
        // A closed connection frees its slot; a client with none left has no entry.
        check(
            (10, 2),
            &[
                (Admit(1), ok),
                (Admit(1), ok),
                (Release(1), ok),
                (Admit(1), ok),
                (Release(1), ok),
                (Release(1), ok),
            ],
            (0, 0),
        );
        // The global cap counts every client, and is checked first.
        check(
            (3, 2),
            &[
                (Admit(1), ok),
                (Admit(2), ok),
                (Admit(3), ok),
                (Admit(4), Err(Global)),
                (Admit(1), Err(Global)),
                (Release(2), ok),
                (Admit(4), ok),
            ],
            (3, 3),
        );
        // Refusals leave no entry behind, even with a cap of 0.
        check((0, 2), &[(Admit(1), Err(Global))], (0, 0));
        check((5, 0), &[(Admit(1), Err(PerClient))], (0, 0));
    }

    #[test]
    fn refusals_warn_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut a = Admission::default();
        assert_eq!(a.refused(t0), Some(1));
        for _ in 0..999 {
            assert_eq!(a.refused(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(a.refused(t0 + WARN_EVERY), Some(1000));
        assert_eq!(a.refused(t0 + WARN_EVERY), None);
    }
}
