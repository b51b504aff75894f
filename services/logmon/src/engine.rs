//! The alert engine: observations and the time in, alert transitions out. Pure: no clock, no
//! IO; the monitor feeds it and stores, logs and sends what it returns.
//!
//! Every alert has a rule and a subject (a service, a check, `data`, a certificate path…).
//! One (rule, subject) fires at most once until it resolves, and not again within the
//! cool-down after it fired (such repeats are counted as suppressed).
//!
//! The engine remembers at most [`MAX_ALERT_KEYS`] (rule, subject) pairs: when a new one comes
//! and the table is full, the pair resolved longest ago is forgotten; when every pair is
//! firing, the new alert is refused and counted as dropped. Firing alerts are never forgotten.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// This many restarts of one service within [`CRASH_LOOP_WINDOW`] is a crash loop.
pub const CRASH_LOOP_RESTARTS: usize = 3;
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);
/// A crash loop (or a VIP move) resolves after this long without a restart (move) while the
/// service is ready.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// The 5xx ratio is judged only over at least this many requests in the window.
pub const MIN_REQUESTS: u64 = 20;
/// Distinct (rule, subject) pairs kept in memory. A node has a few dozen (ten rules over its
/// services, backends, certificates); the bound is for a source that invents subjects (a
/// hostile or broken service naming a new backend per line), which must not grow the
/// monitor without limit.
pub const MAX_ALERT_KEYS: usize = 256;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    ErrorRatio5xx,
    ServiceRestarted,
    CrashLoop,
    ServiceFailed,
    HealthDown,
    ReplicationStopped,
    ReplicationLag,
    DiskUsage,
    CertExpiry,
    VipMoved,
}

impl Rule {
    pub const ALL: [Rule; 10] = [
        Rule::ErrorRatio5xx,
        Rule::ServiceRestarted,
        Rule::CrashLoop,
        Rule::ServiceFailed,
        Rule::HealthDown,
        Rule::ReplicationStopped,
        Rule::ReplicationLag,
        Rule::DiskUsage,
        Rule::CertExpiry,
        Rule::VipMoved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ErrorRatio5xx => "5xx-ratio",
            Rule::ServiceRestarted => "service-restarted",
            Rule::CrashLoop => "crash-loop",
            Rule::ServiceFailed => "service-failed",
            Rule::HealthDown => "health-down",
            Rule::ReplicationStopped => "replication-stopped",
            Rule::ReplicationLag => "replication-lag",
            Rule::DiskUsage => "disk-usage",
            Rule::CertExpiry => "cert-expiry",
            Rule::VipMoved => "vip-moved",
        }
    }

    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.as_str() == name)
    }

    pub fn severity(self) -> Severity {
        match self {
            Rule::ServiceRestarted | Rule::ReplicationLag | Rule::CertExpiry | Rule::DiskUsage => {
                Severity::Warning
            }
            Rule::VipMoved => Severity::Info,
            Rule::ErrorRatio5xx
            | Rule::CrashLoop
            | Rule::ServiceFailed
            | Rule::HealthDown
            | Rule::ReplicationStopped => Severity::Critical,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// One alert, as stored, logged and sent. `rule` and `severity` are text so that rows written
/// by a newer binary still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Row id in the alerts database; 0 before it is stored.
    pub id: i64,
    pub rule: String,
    pub subject: String,
    pub severity: String,
    pub state: AlertState,
    pub message: String,
    pub fired_ms: i64,
    pub resolved_ms: Option<i64>,
}

/// Thresholds and time spans of the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub error_ratio_5xx: f64,
    pub window: Duration,
    pub min_requests: u64,
    pub cooldown: Duration,
    pub disk_used_percent: u8,
    pub cert_expiry_days: u32,
    pub crash_restarts: usize,
    pub crash_window: Duration,
    pub stable_after: Duration,
    pub max_lag: Duration,
}

impl Rules {
    /// The cluster's thresholds, with this crate's defaults for the rest.
    pub fn from_cluster(cluster: &cluster_config::Cluster) -> Rules {
        let a = &cluster.alerts;
        Rules {
            error_ratio_5xx: a.error_ratio_5xx,
            window: a.window,
            min_requests: MIN_REQUESTS,
            cooldown: a.cooldown,
            disk_used_percent: a.disk_used_percent,
            cert_expiry_days: a.cert_expiry_days,
            crash_restarts: CRASH_LOOP_RESTARTS,
            crash_window: CRASH_LOOP_WINDOW,
            stable_after: STABLE_AFTER,
            max_lag: cluster.db.max_lag,
        }
    }
}

/// Something the monitor saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A supervisor event (`kind` as in the state DB: started, ready, exited, restarting, …).
    Event {
        service: String,
        kind: String,
        detail: String,
    },
    /// Requests answered since the last observation, and how many of them were 5xx.
    Requests {
        total: u64,
        server_errors: u64,
    },
    Disk {
        used_percent: f64,
    },
    Cert {
        subject: String,
        not_after_ms: i64,
    },
    Health {
        check: String,
        up: bool,
    },
    Replication {
        running: bool,
        lag_ms: Option<u64>,
    },
    Vip {
        holder: String,
    },
}

#[derive(Debug, Default)]
struct Key {
    firing: Option<Alert>,
    last_fired_ms: Option<i64>,
    /// When not firing: the order in which it resolved (the engine's counter, not the time,
    /// which comes from several clocks), so the oldest resolved key is forgotten first.
    resolved_seq: u64,
}

#[derive(Debug, Default)]
struct ServiceState {
    restarts: VecDeque<i64>,
    last_restart_ms: Option<i64>,
    ready: bool,
}

pub struct Engine {
    rules: Rules,
    keys: BTreeMap<(Rule, String), Key>,
    services: BTreeMap<String, ServiceState>,
    /// (second, requests, 5xx) buckets within the window.
    requests: VecDeque<(i64, u64, u64)>,
    vip: Option<String>,
    vip_moved_ms: Option<i64>,
    suppressed: u64,
    /// Alerts refused because [`MAX_ALERT_KEYS`] pairs were held, all firing.
    dropped: u64,
    /// Counts resolutions, for [`Key::resolved_seq`].
    resolutions: u64,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Engine {
    pub fn new(rules: Rules) -> Engine {
        Engine {
            rules,
            keys: BTreeMap::new(),
            services: BTreeMap::new(),
            requests: VecDeque::new(),
            vip: None,
            vip_moved_ms: None,
            suppressed: 0,
            dropped: 0,
            resolutions: 0,
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Takes over alerts stored by an earlier run (oldest first): firing ones stay firing (and
    /// can resolve), and every one counts for the cool-down. The same bound as for new alerts
    /// applies.
    pub fn restore(&mut self, alerts: &[Alert]) {
        for alert in alerts {
            let Some(rule) = Rule::from_name(&alert.rule) else {
                continue;
            };
            let seq = self.resolutions + 1;
            let Some(key) = self.admit(rule, &alert.subject) else {
                continue;
            };
            key.last_fired_ms = key.last_fired_ms.max(Some(alert.fired_ms));
            if alert.state == AlertState::Firing {
                key.firing = Some(alert.clone());
            } else if key.firing.is_none() {
                key.resolved_seq = seq;
                self.resolutions = seq;
            }
        }
    }

    /// Tells the engine whether a service is ready without judging it (the state before the
    /// first event the monitor reads).
    pub fn assume_service(&mut self, service: &str, ready: bool) {
        self.services.entry(service.to_string()).or_default().ready = ready;
    }

    /// Alerts firing now, by rule and subject.
    pub fn firing(&self) -> impl Iterator<Item = &Alert> {
        self.keys.values().filter_map(|k| k.firing.as_ref())
    }

    /// Alerts not raised because of the cool-down, since the engine started.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Alerts not raised because [`MAX_ALERT_KEYS`] pairs were held and all of them firing.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The (rule, subject) pairs held now; at most [`MAX_ALERT_KEYS`].
    pub fn subjects(&self) -> usize {
        self.keys.len()
    }

    /// The key of (rule, subject), made room for if new: the key resolved longest ago is
    /// forgotten (with its cool-down). `None`, counted as dropped, when every key fires.
    fn admit(&mut self, rule: Rule, subject: &str) -> Option<&mut Key> {
        let id = (rule, subject.to_string());
        if !self.keys.contains_key(&id) && self.keys.len() >= MAX_ALERT_KEYS {
            // A linear scan: the table is small and full only under a flood of new subjects.
            let oldest = self
                .keys
                .iter()
                .filter(|(_, k)| k.firing.is_none())
                .min_by_key(|(_, k)| k.resolved_seq)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(oldest) => {
                    self.keys.remove(&oldest);
                }
                None => {
                    self.dropped += 1;
                    return None;
                }
            }
        }
        Some(self.keys.entry(id).or_default())
    }

    /// Takes one observation made at `now_ms`; returns the alerts that fired or resolved.
    pub fn observe(&mut self, obs: Observation, now_ms: i64) -> Vec<Alert> {
        let mut out = Vec::new();
        match obs {
            Observation::Event {
                service,
                kind,
                detail,
            } => self.event(&service, &kind, &detail, now_ms, &mut out),
            Observation::Requests {
                total,
                server_errors,
            } => {
                let second = now_ms.div_euclid(1000);
                match self.requests.back_mut() {
                    Some((s, t, e)) if *s == second => {
                        *t += total;
                        *e += server_errors;
                    }
                    _ => self.requests.push_back((second, total, server_errors)),
                }
            }
            Observation::Disk { used_percent } => {
                let limit = f64::from(self.rules.disk_used_percent);
                let msg = format!("data partition {used_percent:.1}% used (limit {limit}%)");
                self.set(
                    Rule::DiskUsage,
                    "data",
                    used_percent > limit,
                    msg,
                    now_ms,
                    &mut out,
                );
            }
            Observation::Cert {
                subject,
                not_after_ms,
            } => {
                let left_ms = not_after_ms - now_ms;
                let limit_ms = i64::from(self.rules.cert_expiry_days) * 86_400_000;
                let msg = if left_ms <= 0 {
                    format!("certificate {subject} has expired")
                } else {
                    format!(
                        "certificate {subject} expires in {} days",
                        left_ms / 86_400_000
                    )
                };
                self.set(
                    Rule::CertExpiry,
                    &subject,
                    left_ms <= limit_ms,
                    msg,
                    now_ms,
                    &mut out,
                );
            }
            Observation::Health { check, up } => {
                let msg = format!("health check {check} is down");
                self.set(Rule::HealthDown, &check, !up, msg, now_ms, &mut out);
            }
            Observation::Replication { running, lag_ms } => {
                let msg = "replication is stopped".to_string();
                self.set(
                    Rule::ReplicationStopped,
                    "replica",
                    !running,
                    msg,
                    now_ms,
                    &mut out,
                );
                let max = ms(self.rules.max_lag);
                let lag = lag_ms.map_or(0, |l| i64::try_from(l).unwrap_or(i64::MAX));
                let msg = format!("replication lags {lag} ms behind (limit {max} ms)");
                self.set(
                    Rule::ReplicationLag,
                    "replica",
                    running && lag > max,
                    msg,
                    now_ms,
                    &mut out,
                );
            }
            Observation::Vip { holder } => {
                if let Some(previous) = self.vip.replace(holder.clone()) {
                    if previous != holder {
                        self.vip_moved_ms = Some(now_ms);
                        let msg = format!("the floating IP moved from {previous} to {holder}");
                        self.fire(Rule::VipMoved, "floating-ip", msg, now_ms, &mut out);
                    }
                }
            }
        }
        out
    }

    /// Judges what depends on time passing: the 5xx window, crash loops and VIP moves that
    /// have become stable.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Alert> {
        let mut out = Vec::new();
        let window_ms = ms(self.rules.window);
        while self
            .requests
            .front()
            .is_some_and(|&(s, _, _)| s * 1000 <= now_ms - window_ms)
        {
            self.requests.pop_front();
        }
        let (total, errors) = self
            .requests
            .iter()
            .fold((0, 0), |(t, e), &(_, rt, re)| (t + rt, e + re));
        let ratio = if total == 0 {
            0.0
        } else {
            errors as f64 / total as f64
        };
        let bad = total >= self.rules.min_requests && ratio > self.rules.error_ratio_5xx;
        let msg = format!(
            "{:.1}% of {total} requests failed with 5xx in the last {}s (limit {:.1}%)",
            ratio * 100.0,
            self.rules.window.as_secs(),
            self.rules.error_ratio_5xx * 100.0
        );
        self.set(Rule::ErrorRatio5xx, "http", bad, msg, now_ms, &mut out);

        let stable_ms = ms(self.rules.stable_after);
        let stable: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.ready && s.last_restart_ms.is_none_or(|t| now_ms - t >= stable_ms))
            .map(|(name, _)| name.clone())
            .collect();
        for service in stable {
            self.resolve(Rule::CrashLoop, &service, now_ms, &mut out);
        }
        if self.vip_moved_ms.is_some_and(|t| now_ms - t >= stable_ms) {
            self.resolve(Rule::VipMoved, "floating-ip", now_ms, &mut out);
        }
        out
    }

    fn event(
        &mut self,
        service: &str,
        kind: &str,
        detail: &str,
        now_ms: i64,
        out: &mut Vec<Alert>,
    ) {
        let rules = self.rules.clone();
        let state = self.services.entry(service.to_string()).or_default();
        match kind {
            "restarting" => {
                state.ready = false;
                state.last_restart_ms = Some(now_ms);
                state.restarts.push_back(now_ms);
                let window_ms = ms(rules.crash_window);
                while state
                    .restarts
                    .front()
                    .is_some_and(|&t| t <= now_ms - window_ms)
                {
                    state.restarts.pop_front();
                }
                let count = state.restarts.len();
                let msg = format!("service {service} is restarting ({detail})");
                self.fire(Rule::ServiceRestarted, service, msg, now_ms, out);
                if count >= rules.crash_restarts {
                    let msg = format!(
                        "service {service} restarted {count} times within {}s: crash loop",
                        rules.crash_window.as_secs()
                    );
                    self.fire(Rule::CrashLoop, service, msg, now_ms, out);
                }
            }
            "ready" => {
                state.ready = true;
                for rule in [
                    Rule::ServiceRestarted,
                    Rule::ServiceFailed,
                    Rule::HealthDown,
                ] {
                    self.resolve(rule, service, now_ms, out);
                }
            }
            "failed" => {
                state.ready = false;
                let msg = format!("service {service} failed: {detail}");
                self.fire(Rule::ServiceFailed, service, msg, now_ms, out);
            }
            "timeout" => {
                state.ready = false;
                let msg = format!("service {service} is not ready: {detail}");
                self.fire(Rule::HealthDown, service, msg, now_ms, out);
            }
            "exited" | "stopped" | "started" => state.ready = false,
            _ => {}
        }
    }

    /// Fires or resolves a condition that holds or not.
    fn set(
        &mut self,
        rule: Rule,
        subject: &str,
        bad: bool,
        msg: String,
        now_ms: i64,
        out: &mut Vec<Alert>,
    ) {
        if bad {
            self.fire(rule, subject, msg, now_ms, out);
        } else {
            self.resolve(rule, subject, now_ms, out);
        }
    }

    fn fire(
        &mut self,
        rule: Rule,
        subject: &str,
        message: String,
        now_ms: i64,
        out: &mut Vec<Alert>,
    ) {
        let cooldown = ms(self.rules.cooldown);
        let Some(key) = self.admit(rule, subject) else {
            return;
        };
        if key.firing.is_some() {
            return;
        }
        if key.last_fired_ms.is_some_and(|t| now_ms - t < cooldown) {
            self.suppressed += 1;
            return;
        }
        let alert = Alert {
            id: 0,
            rule: rule.as_str().into(),
            subject: subject.into(),
            severity: rule.severity().as_str().into(),
            state: AlertState::Firing,
            message,
            fired_ms: now_ms,
            resolved_ms: None,
        };
        key.last_fired_ms = Some(now_ms);
        key.firing = Some(alert.clone());
        out.push(alert);
    }

    fn resolve(&mut self, rule: Rule, subject: &str, now_ms: i64, out: &mut Vec<Alert>) {
        let Some(key) = self.keys.get_mut(&(rule, subject.to_string())) else {
            return;
        };
        if let Some(mut alert) = key.firing.take() {
            self.resolutions += 1;
            key.resolved_seq = self.resolutions;
            alert.state = AlertState::Resolved;
            alert.resolved_ms = Some(now_ms);
            out.push(alert);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            error_ratio_5xx: 0.05,
            window: Duration::from_secs(60),
            min_requests: 20,
            cooldown: Duration::from_secs(300),
            disk_used_percent: 85,
            cert_expiry_days: 14,
            crash_restarts: 3,
            crash_window: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
            max_lag: Duration::from_secs(5),
        }
    }

    fn ev(service: &str, kind: &str) -> Observation {
        Observation::Event {
            service: service.into(),
            kind: kind.into(),
            detail: String::new(),
        }
    }

    enum Step {
        Obs(i64, Observation),
        Tick(i64),
    }
    use Step::{Obs, Tick};

    /// Runs the steps; returns `rule:subject:state@seconds` of every transition.
    fn check(steps: Vec<Step>, expected: &[&str]) {
        let mut engine = Engine::new(rules());
        let mut got = Vec::new();
        for step in steps {
            let (t, alerts) = match step {
                Obs(t, obs) => (t, engine.observe(obs, t * 1000)),
                Tick(t) => (t, engine.tick(t * 1000)),
            };
            got.extend(
                alerts
                    .iter()
                    .map(|a| format!("{}:{}:{}@{t}", a.rule, a.subject, a.state.as_str())),
            );
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn crash_loop_fires_once_and_resolves_when_stable() {
        let mut steps = vec![Obs(0, ev("web", "ready"))];
        for t in [10, 12, 14, 16] {
            steps.push(Obs(t, ev("web", "exited")));
            steps.push(Obs(t, ev("web", "restarting")));
            steps.push(Obs(t, ev("web", "started")));
            steps.push(Obs(t + 1, ev("web", "ready")));
            steps.push(Tick(t + 1));
        }
        // Not yet stable: 59 s after the last restart.
        steps.push(Tick(75));
        steps.push(Tick(76));
        // Within the cool-down (300 s after it fired) a new crash loop is suppressed; after
        // it, it fires again.
        for t in [100, 101, 102, 400, 401, 402] {
            steps.push(Obs(t, ev("web", "restarting")));
        }
        check(
            steps,
            &[
                "service-restarted:web:firing@10",
                "service-restarted:web:resolved@11",
                "crash-loop:web:firing@14",
                "crash-loop:web:resolved@76",
                "service-restarted:web:firing@400",
                "crash-loop:web:firing@402",
            ],
        );
    }

    #[test]
    fn restarts_spread_out_are_no_crash_loop() {
        check(
            vec![
                Obs(0, ev("db", "restarting")),
                Obs(40, ev("db", "restarting")),
                Obs(80, ev("db", "restarting")),
                Obs(130, ev("db", "restarting")),
            ],
            &["service-restarted:db:firing@0"],
        );
    }

    #[test]
    fn failed_timeout_and_ready() {
        check(
            vec![
                Obs(0, ev("db", "timeout")),
                Obs(1, ev("db", "failed")),
                Obs(2, ev("db", "failed")),
                Obs(9, ev("db", "ready")),
            ],
            &[
                "health-down:db:firing@0",
                "service-failed:db:firing@1",
                "service-failed:db:resolved@9",
                "health-down:db:resolved@9",
            ],
        );
    }

    #[test]
    fn error_ratio_over_the_window() {
        let req = |total, server_errors| Observation::Requests {
            total,
            server_errors,
        };
        check(
            vec![
                // Too few requests to judge.
                Obs(0, req(10, 10)),
                Tick(0),
                // 10 of 200 = 5 %: not above the limit.
                Obs(1, req(190, 0)),
                Tick(1),
                // 20 of 250 = 8 %.
                Obs(30, req(50, 10)),
                Tick(30),
                Tick(31),
                // The first bucket leaves the window: 10 of 240.
                Tick(60),
                // Then 10 of 50 = 20 %, but within the cool-down; then no traffic at all.
                Tick(61),
                Tick(90),
            ],
            &["5xx-ratio:http:firing@30", "5xx-ratio:http:resolved@60"],
        );
    }

    #[test]
    fn levels_disk_cert_replication_health_vip() {
        let day = 86_400;
        let cert = |not_after_s: i64| Observation::Cert {
            subject: "/tls/cert.pem".into(),
            not_after_ms: not_after_s * 1000,
        };
        check(
            vec![
                Obs(0, Observation::Disk { used_percent: 85.0 }),
                Obs(1, Observation::Disk { used_percent: 90.2 }),
                Obs(2, Observation::Disk { used_percent: 91.0 }),
                Obs(3, Observation::Disk { used_percent: 50.0 }),
                Obs(4, cert(4 + 15 * day)),
                Obs(5, cert(5 + 14 * day)),
                Obs(6, cert(6 + 90 * day)),
                Obs(
                    7,
                    Observation::Replication {
                        running: true,
                        lag_ms: Some(5000),
                    },
                ),
                Obs(
                    8,
                    Observation::Replication {
                        running: true,
                        lag_ms: Some(5001),
                    },
                ),
                Obs(
                    9,
                    Observation::Replication {
                        running: false,
                        lag_ms: None,
                    },
                ),
                Obs(
                    10,
                    Observation::Replication {
                        running: true,
                        lag_ms: Some(0),
                    },
                ),
                Obs(
                    11,
                    Observation::Health {
                        check: "nginx".into(),
                        up: false,
                    },
                ),
                Obs(
                    12,
                    Observation::Health {
                        check: "nginx".into(),
                        up: true,
                    },
                ),
                Obs(
                    13,
                    Observation::Vip {
                        holder: "server1".into(),
                    },
                ),
                Obs(
                    14,
                    Observation::Vip {
                        holder: "server2".into(),
                    },
                ),
                Tick(20),
                Tick(74),
            ],
            &[
                "disk-usage:data:firing@1",
                "disk-usage:data:resolved@3",
                "cert-expiry:/tls/cert.pem:firing@5",
                "cert-expiry:/tls/cert.pem:resolved@6",
                "replication-lag:replica:firing@8",
                "replication-stopped:replica:firing@9",
                "replication-lag:replica:resolved@9",
                "replication-stopped:replica:resolved@10",
                "health-down:nginx:firing@11",
                "health-down:nginx:resolved@12",
                "vip-moved:floating-ip:firing@14",
                "vip-moved:floating-ip:resolved@74",
            ],
        );
    }

    /// Bursts of distinct subjects: `Fire` raises health-down for `<prefix>0..n`, `Resolve`
    /// clears it, `Flap` does both for each subject in turn.
    enum Burst {
        Fire(&'static str, usize),
        Resolve(&'static str, usize),
        Flap(&'static str, usize),
    }

    /// What the engine holds after the bursts.
    #[derive(Debug, PartialEq)]
    struct Held {
        subjects: usize,
        firing: usize,
        dropped: u64,
    }

    /// Runs the bursts (one observation per second); checks the counts, that every subject in
    /// `kept` is still known and none in `forgotten` is.
    fn check_cap(bursts: &[Burst], expected: Held, kept: &[&str], forgotten: &[&str]) {
        let mut engine = Engine::new(rules());
        let mut t = 0;
        let mut health = |engine: &mut Engine, check: String, up: bool| {
            t += 1000;
            engine.observe(Observation::Health { check, up }, t);
        };
        for burst in bursts {
            match *burst {
                Burst::Fire(p, n) => {
                    (0..n).for_each(|i| health(&mut engine, format!("{p}{i}"), false))
                }
                Burst::Resolve(p, n) => {
                    (0..n).for_each(|i| health(&mut engine, format!("{p}{i}"), true))
                }
                Burst::Flap(p, n) => (0..n).for_each(|i| {
                    health(&mut engine, format!("{p}{i}"), false);
                    health(&mut engine, format!("{p}{i}"), true);
                }),
            }
        }
        let got = Held {
            subjects: engine.subjects(),
            firing: engine.firing().count(),
            dropped: engine.dropped(),
        };
        assert_eq!(got, expected);
        assert!(engine.keys.len() <= MAX_ALERT_KEYS);
        let known = |s: &str| engine.keys.contains_key(&(Rule::HealthDown, s.to_string()));
        for s in kept {
            assert!(known(s), "{s} was forgotten");
        }
        for s in forgotten {
            assert!(!known(s), "{s} is still held");
        }
    }

    #[test]
    fn distinct_subjects_are_capped_firing_kept_oldest_resolved_forgotten_first() {
        use Burst::{Fire, Flap, Resolve};
        let cap = MAX_ALERT_KEYS;
        // 10 000 subjects that fire and resolve: memory stays at the cap, the newest kept.
        check_cap(
            &[Flap("s", 10_000)],
            Held {
                subjects: cap,
                firing: 0,
                dropped: 0,
            },
            &["s9999", &format!("s{}", 10_000 - cap)],
            &["s0", &format!("s{}", 10_000 - cap - 1)],
        );
        // Every held subject firing: 10 000 new ones are refused and counted; none of the
        // firing ones is forgotten.
        check_cap(
            &[Fire("f", cap), Fire("x", 10_000)],
            Held {
                subjects: cap,
                firing: cap,
                dropped: 10_000,
            },
            &["f0", &format!("f{}", cap - 1)],
            &["x0", "x9999"],
        );
        // Firing and resolved mixed: new subjects replace the oldest resolved ones, in order.
        check_cap(
            &[Fire("f", 100), Flap("r", cap - 100), Fire("n", 10)],
            Held {
                subjects: cap,
                firing: 110,
                dropped: 0,
            },
            &["f0", "f99", "r10", &format!("r{}", cap - 101), "n0", "n9"],
            &["r0", "r9"],
        );
        // The one resolved subject makes room for one new one; the next is dropped.
        check_cap(
            &[Fire("f", cap), Resolve("f", 1), Fire("x", 2)],
            Held {
                subjects: cap,
                firing: cap,
                dropped: 1,
            },
            &["f1", "x0"],
            &["f0", "x1"],
        );
        // Below the cap nothing is forgotten.
        check_cap(
            &[Flap("s", 10), Fire("f", 10)],
            Held {
                subjects: 20,
                firing: 10,
                dropped: 0,
            },
            &["s0", "s9", "f0"],
            &[],
        );
    }

    #[test]
    fn restored_alerts_are_not_fired_again() {
        let mut engine = Engine::new(rules());
        let stored = Alert {
            id: 7,
            rule: "crash-loop".into(),
            subject: "web".into(),
            severity: "critical".into(),
            state: AlertState::Firing,
            message: String::new(),
            fired_ms: 1000,
            resolved_ms: None,
        };
        engine.restore(std::slice::from_ref(&stored));
        engine.assume_service("web", true);
        for t in [2, 3, 4] {
            let fired = engine.observe(ev("web", "restarting"), t * 1000);
            assert!(fired.iter().all(|a| a.rule != "crash-loop"), "{fired:?}");
        }
        engine.observe(ev("web", "ready"), 5000);
        let resolved = engine.tick(64_000);
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            (resolved[0].id, resolved[0].state),
            (7, AlertState::Resolved)
        );
    }
}
