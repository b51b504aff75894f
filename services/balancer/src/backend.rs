//! Backends at run time and the routing table that picks among them.
//!
//! A `Backend` (health, counters, in-flight count) lives as long as its address stays in the
//! configuration: a reload builds a new `Routes` that reuses the `Backend`s it keeps, so health
//! and metrics carry over and requests in flight finish on the table they started with.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use cluster_config::{Algorithm, BalancerMode};

use crate::core::health::{Health, Observation, State, Thresholds, Transition};
use crate::core::select::{self, Candidate};
use crate::metrics::BackendMetrics;
use crate::plan::Plan;
use crate::pool::Pool;

#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// `<addr>` as the authority of every URI sent to this backend.
    pub authority: http::uri::Authority,
    health: Mutex<Health>,
    up: AtomicBool,
    /// A passive failure was seen and not yet cleared by a good response (so the request path
    /// only takes the lock when there is something to clear).
    suspect: AtomicBool,
    pub active: AtomicU64,
    /// Set when a reload removed it: its health check stops.
    pub retired: AtomicBool,
    pub metrics: BackendMetrics,
    /// Idle keep-alive connections.
    pub pool: Pool,
}

/// `addr` as a URI authority (`1.2.3.4:80`, `[::1]:80`).
#[allow(
    clippy::expect_used,
    reason = "a SocketAddr displays as host:port with only digits, dots, colons and brackets, which is always a valid authority"
)]
fn authority(addr: SocketAddr) -> http::uri::Authority {
    http::uri::Authority::try_from(addr.to_string().as_str())
        .expect("a socket address is a valid authority")
}

impl Backend {
    pub fn new(name: &str, addr: SocketAddr, now: Instant) -> Backend {
        Backend {
            name: name.to_string(),
            addr,
            authority: authority(addr),
            health: Mutex::new(Health::new(now)),
            up: AtomicBool::new(true),
            suspect: AtomicBool::new(false),
            active: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            metrics: BackendMetrics::default(),
            pool: Pool::default(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn state(&self) -> State {
        if self.is_up() {
            State::Up
        } else {
            State::Down
        }
    }

    /// Feed an observation to the health state machine; returns the transition, if any.
    pub fn observe(&self, obs: Observation, th: Thresholds, now: Instant) -> Option<Transition> {
        if obs == Observation::TrafficOk && !self.suspect.load(Relaxed) {
            return None;
        }
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let t = h.observe(obs, th, now);
        self.suspect
            .store(obs == Observation::TrafficFailed, Relaxed);
        self.up.store(h.state() == State::Up, Relaxed);
        t
    }
}

/// One backend as this configuration uses it.
#[derive(Debug)]
pub struct Entry {
    pub backend: Arc<Backend>,
    pub weight: u32,
    pub backup: bool,
}

/// The routing table: which backends, how to pick among them.
#[derive(Debug)]
pub struct Routes {
    pub entries: Vec<Entry>,
    pub algorithm: Algorithm,
    pub mode: BalancerMode,
    pub thresholds: Thresholds,
    schedule: ArcSwap<Vec<usize>>,
    cursor: AtomicU64,
}

impl Routes {
    /// Build the table for `plan`, reusing the backends of `previous` that have the same address.
    pub fn new(plan: &Plan, previous: Option<&Routes>, now: Instant) -> Routes {
        let entries = plan
            .backends
            .iter()
            .map(|spec| {
                let kept = previous.and_then(|p| {
                    p.entries
                        .iter()
                        .find(|e| e.backend.addr == spec.addr && e.backend.name == spec.name)
                        .map(|e| e.backend.clone())
                });
                Entry {
                    backend: kept
                        .unwrap_or_else(|| Arc::new(Backend::new(&spec.name, spec.addr, now))),
                    weight: spec.weight,
                    backup: spec.backup,
                }
            })
            .collect();
        let routes = Routes {
            entries,
            algorithm: plan.algorithm,
            mode: plan.mode,
            thresholds: Thresholds {
                rise: plan.health.rise,
                fall: plan.health.fall,
            },
            schedule: ArcSwap::from_pointee(Vec::new()),
            cursor: AtomicU64::new(0),
        };
        routes.rebuild();
        routes
    }

    fn candidates(&self) -> Vec<Candidate> {
        self.entries
            .iter()
            .map(|e| Candidate {
                weight: e.weight,
                backup: e.backup,
                up: e.backend.is_up(),
                active: e.backend.active.load(Relaxed),
            })
            .collect()
    }

    /// Recompute the schedule after a health change.
    pub fn rebuild(&self) {
        let s = select::schedule(&self.candidates(), self.algorithm, self.mode);
        self.schedule.store(Arc::new(s));
    }

    /// The entry index for the next request.
    pub fn pick(&self) -> Option<usize> {
        let cursor = self.cursor.fetch_add(1, Relaxed);
        let schedule = self.schedule.load();
        match self.algorithm {
            // Only least connections needs the live counts.
            Algorithm::LeastConnections => {
                select::pick(&schedule, &self.candidates(), self.algorithm, cursor, None)
            }
            _ => select::pick(&schedule, &[], self.algorithm, cursor, None),
        }
    }

    /// The entry index for retrying a request that failed on entry `failed`.
    pub fn pick_retry(&self, failed: usize) -> Option<usize> {
        let cursor = self.cursor.fetch_add(1, Relaxed);
        select::pick_retry(
            &self.candidates(),
            self.algorithm,
            self.mode,
            cursor,
            failed,
        )
    }
}
