//! Counters kept with relaxed atomics on the request path, rendered in the Prometheus text
//! format on demand.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use api::prometheus::escape_label as escape;

use crate::backend::Routes;
use crate::core::admission::Refusal;

/// Upper bounds of the latency histogram buckets, in seconds (the last bucket is `+Inf`).
pub(crate) const LATENCY_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; index `LATENCY_BUCKETS.len()` is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |v| v.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Per backend; kept across reloads while the backend stays in the configuration.
#[derive(Debug, Default)]
pub struct BackendMetrics {
    pub requests: AtomicU64,
    /// Failed attempts: connect errors, resets, timeouts.
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    /// Responses by class: 1xx..5xx.
    pub responses: [AtomicU64; 5],
    /// From the request sent until the response head arrived.
    pub latency: Histogram,
    pub checks_failed: AtomicU64,
    /// Connections opened to the backend (the rest of the requests reused one).
    pub connections: AtomicU64,
}

impl BackendMetrics {
    pub fn response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Relaxed);
    }
}

/// Balancer-wide counters.
#[derive(Debug, Default)]
pub struct Global {
    pub connections: AtomicU64,
    pub active_connections: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// Responses the balancer made itself, by reason.
    pub redirects: AtomicU64,
    pub no_backend: AtomicU64,
    pub bad_request: AtomicU64,
    pub request_timeout: AtomicU64,
    pub too_large: AtomicU64,
    pub bad_gateway: AtomicU64,
    pub gateway_timeout: AtomicU64,
    /// Connections refused over the caps, by [`Refusal`].
    pub refused_global: AtomicU64,
    pub refused_per_client: AtomicU64,
}

impl Global {
    /// The refused-connections counter for `reason`.
    pub fn refused(&self, reason: Refusal) -> &AtomicU64 {
        match reason {
            Refusal::Global => &self.refused_global,
            Refusal::PerClient => &self.refused_per_client,
        }
    }
}

/// `clients`: client addresses holding a connection now (the per-client table's size).
pub(crate) fn render(global: &Global, routes: &Routes, clients: usize) -> String {
    let mut out = String::with_capacity(4096);
    let g = |out: &mut String, name: &str, kind: &str, help: &str, v: &AtomicU64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {}", v.load(Relaxed));
    };
    let p = "tandem_balancer";
    g(
        &mut out,
        &format!("{p}_connections_total"),
        "counter",
        "Client connections accepted (within the connection caps).",
        &global.connections,
    );
    let _ = writeln!(
        out,
        "# HELP {p}_connections_refused_total Client connections refused over a cap: the balancer's (global) or one address's (per_client).\n# TYPE {p}_connections_refused_total counter"
    );
    for reason in [Refusal::Global, Refusal::PerClient] {
        let _ = writeln!(
            out,
            "{p}_connections_refused_total{{reason=\"{}\"}} {}",
            reason.as_str(),
            global.refused(reason).load(Relaxed)
        );
    }
    g(
        &mut out,
        &format!("{p}_connections_active"),
        "gauge",
        "Client connections open.",
        &global.active_connections,
    );
    let _ = writeln!(
        out,
        "# HELP {p}_connections_clients Client addresses holding at least one connection.\n# TYPE {p}_connections_clients gauge\n{p}_connections_clients {clients}"
    );
    g(
        &mut out,
        &format!("{p}_tls_handshake_failures_total"),
        "counter",
        "TLS handshakes that failed or timed out.",
        &global.tls_handshake_failures,
    );
    let _ = writeln!(
        out,
        "# HELP {p}_local_responses_total Responses made by the balancer itself.\n# TYPE {p}_local_responses_total counter"
    );
    for (reason, v) in [
        ("redirect", &global.redirects),
        ("no_backend", &global.no_backend),
        ("bad_request", &global.bad_request),
        ("request_timeout", &global.request_timeout),
        ("too_large", &global.too_large),
        ("bad_gateway", &global.bad_gateway),
        ("gateway_timeout", &global.gateway_timeout),
    ] {
        let _ = writeln!(
            out,
            "{p}_local_responses_total{{reason=\"{reason}\"}} {}",
            v.load(Relaxed)
        );
    }

    let labels: Vec<String> = routes
        .entries
        .iter()
        .map(|e| {
            format!(
                "backend=\"{}\",addr=\"{}\"",
                escape(&e.backend.name),
                e.backend.addr
            )
        })
        .collect();
    let series =
        |out: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(usize) -> u64| {
            let _ = writeln!(
                out,
                "# HELP {p}_backend_{name} {help}\n# TYPE {p}_backend_{name} {kind}"
            );
            for (i, l) in labels.iter().enumerate() {
                let _ = writeln!(out, "{p}_backend_{name}{{{l}}} {}", f(i));
            }
        };
    let b = |i: usize| &routes.entries[i].backend;
    series(
        &mut out,
        "connections_opened_total",
        "counter",
        "Connections opened to the backend; the other requests reused a kept-alive one.",
        &|i| b(i).metrics.connections.load(Relaxed),
    );
    series(
        &mut out,
        "up",
        "gauge",
        "1 when the backend is up (takes traffic), 0 when down.",
        &|i| u64::from(b(i).is_up()),
    );
    series(
        &mut out,
        "requests_total",
        "counter",
        "Requests sent to the backend (each attempt).",
        &|i| b(i).metrics.requests.load(Relaxed),
    );
    series(
        &mut out,
        "errors_total",
        "counter",
        "Attempts that failed: connect errors, resets, timeouts.",
        &|i| b(i).metrics.errors.load(Relaxed),
    );
    series(
        &mut out,
        "retries_total",
        "counter",
        "Requests retried on another backend after failing on this one.",
        &|i| b(i).metrics.retries.load(Relaxed),
    );
    series(
        &mut out,
        "active_requests",
        "gauge",
        "Requests in flight on the backend.",
        &|i| b(i).active.load(Relaxed),
    );
    series(
        &mut out,
        "checks_failed_total",
        "counter",
        "Active health checks that failed.",
        &|i| b(i).metrics.checks_failed.load(Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP {p}_backend_responses_total Responses from the backend by status class.\n# TYPE {p}_backend_responses_total counter"
    );
    for (i, l) in labels.iter().enumerate() {
        for (k, v) in b(i).metrics.responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "{p}_backend_responses_total{{{l},code=\"{}xx\"}} {}",
                k + 1,
                v.load(Relaxed)
            );
        }
    }
    let name = format!("{p}_backend_response_seconds");
    let _ = writeln!(
        out,
        "# HELP {name} Time from sending a request to the backend until its response head.\n# TYPE {name} histogram"
    );
    for (i, l) in labels.iter().enumerate() {
        b(i).metrics.latency.render(&mut out, &name, l);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_inf() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "b=\"1\"");
        assert!(out.contains("x_bucket{b=\"1\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{b=\"1\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{b=\"1\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{b=\"1\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{b=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{b=\"1\"} 60.0033\n"), "{out}");
    }
}
