//! The monitor's metrics in the Prometheus text format (version 0.0.4), served on
//! `127.0.0.1:`[`METRICS_PORT`] for the admin server to aggregate, and a small client for it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::engine::Rule;
use crate::parse::{AccessLine, StatusClass};

/// The monitor's metrics port.
pub const METRICS_PORT: u16 = 9101;
/// Upper bounds (seconds) of the request-time histogram buckets.
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// How long the server waits for a request, and the client for an answer.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where the monitor of a node listens: loopback, on the node's own address when that is a
/// loopback address (several nodes on one developer machine), else on 127.0.0.1.
pub fn default_addr(node_address: Ipv4Addr) -> SocketAddr {
    let ip = if node_address.is_loopback() {
        node_address
    } else {
        Ipv4Addr::LOCALHOST
    };
    SocketAddr::from((ip, METRICS_PORT))
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceMetrics {
    pub up: bool,
    pub restarts: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DiskMetrics {
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub avail_bytes: u64,
}

/// Everything the monitor exports.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub services: BTreeMap<String, ServiceMetrics>,
    pub requests: BTreeMap<StatusClass, u64>,
    pub response_bytes: u64,
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS`].
    pub latency_buckets: [u64; LATENCY_BUCKETS.len()],
    pub latency_sum: f64,
    pub latency_count: u64,
    pub log_lines: BTreeMap<String, u64>,
    pub unparsed_access_lines: u64,
    pub disk: Option<DiskMetrics>,
    /// By certificate file.
    pub cert_not_after_ms: BTreeMap<String, i64>,
    pub replication_running: Option<bool>,
    pub replication_lag_ms: Option<u64>,
    pub alerts_firing: BTreeMap<Rule, u64>,
    pub alerts_fired: BTreeMap<Rule, u64>,
    pub alerts_suppressed: u64,
    pub alerts_dropped: u64,
    pub webhook_delivered: u64,
    pub webhook_failed_attempts: u64,
    pub webhook_given_up: u64,
    pub webhook_dropped: u64,
}

impl Metrics {
    pub fn observe_access(&mut self, line: &AccessLine<'_>) {
        *self.requests.entry(line.class()).or_default() += 1;
        self.response_bytes += line.bytes;
        for (count, &le) in self.latency_buckets.iter_mut().zip(&LATENCY_BUCKETS) {
            if line.request_time <= le {
                *count += 1;
            }
        }
        self.latency_sum += line.request_time;
        self.latency_count += 1;
    }

    /// The text exposition: every family with HELP and TYPE, series sorted, label values
    /// escaped.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, series: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (suffix_labels, value) in series {
                let _ = writeln!(out, "{name}{suffix_labels} {value}");
            }
        };
        let label = |k: &str, v: &str| format!("{{{k}=\"{}\"}}", escape(v));
        let num = |v: u64| v.to_string();

        let up: Vec<_> = self
            .services
            .iter()
            .map(|(s, m)| (label("service", s), num(u64::from(m.up))))
            .collect();
        family(
            "tandem_service_up",
            "gauge",
            "Whether the service's process is running (1) or not (0).",
            &up,
        );
        let restarts: Vec<_> = self
            .services
            .iter()
            .map(|(s, m)| (label("service", s), num(m.restarts)))
            .collect();
        family(
            "tandem_service_restarts_total",
            "counter",
            "Restarts of the service recorded by the supervisor.",
            &restarts,
        );

        let requests: Vec<_> = StatusClass::ALL
            .iter()
            .map(|c| {
                (
                    label("class", c.as_str()),
                    num(self.requests.get(c).copied().unwrap_or(0)),
                )
            })
            .collect();
        family(
            "tandem_http_requests_total",
            "counter",
            "Requests answered by nginx, by status class.",
            &requests,
        );
        family(
            "tandem_http_response_bytes_total",
            "counter",
            "Response body bytes sent by nginx.",
            &[(String::new(), num(self.response_bytes))],
        );
        let mut histogram: Vec<(String, String)> = LATENCY_BUCKETS
            .iter()
            .zip(&self.latency_buckets)
            .map(|(le, count)| {
                (
                    format!("_bucket{}", label("le", &le.to_string())),
                    num(*count),
                )
            })
            .collect();
        histogram.push((
            format!("_bucket{}", label("le", "+Inf")),
            num(self.latency_count),
        ));
        histogram.push(("_sum".into(), self.latency_sum.to_string()));
        histogram.push(("_count".into(), num(self.latency_count)));
        family(
            "tandem_http_request_duration_seconds",
            "histogram",
            "Time nginx took per request.",
            &histogram,
        );
        family(
            "tandem_http_unparsed_lines_total",
            "counter",
            "Lines on nginx's stdout that are not access lines.",
            &[(String::new(), num(self.unparsed_access_lines))],
        );
        let lines: Vec<_> = self
            .log_lines
            .iter()
            .map(|(s, n)| (label("log", s), num(*n)))
            .collect();
        family(
            "tandem_log_lines_total",
            "counter",
            "Lines read from the log store, by log.",
            &lines,
        );

        if let Some(disk) = self.disk {
            family(
                "tandem_data_size_bytes",
                "gauge",
                "Size of the data partition.",
                &[(String::new(), num(disk.size_bytes))],
            );
            family(
                "tandem_data_used_bytes",
                "gauge",
                "Bytes used on the data partition.",
                &[(String::new(), num(disk.used_bytes))],
            );
            family(
                "tandem_data_avail_bytes",
                "gauge",
                "Bytes available to unprivileged writers on the data partition.",
                &[(String::new(), num(disk.avail_bytes))],
            );
        }
        if !self.cert_not_after_ms.is_empty() {
            let certs: Vec<_> = self
                .cert_not_after_ms
                .iter()
                .map(|(path, ms)| (label("path", path), (ms / 1000).to_string()))
                .collect();
            family(
                "tandem_tls_cert_not_after_seconds",
                "gauge",
                "Expiry of the leaf of each certificate chain the balancer serves, seconds since the Unix epoch.",
                &certs,
            );
        }
        if let Some(running) = self.replication_running {
            family(
                "tandem_db_replication_running",
                "gauge",
                "Whether replication to this node's database runs (1) or not (0).",
                &[(String::new(), num(u64::from(running)))],
            );
        }
        if let Some(lag) = self.replication_lag_ms {
            family(
                "tandem_db_replication_lag_seconds",
                "gauge",
                "How far this replica lags behind the primary.",
                &[(String::new(), (lag as f64 / 1000.0).to_string())],
            );
        }

        let firing: Vec<_> = Rule::ALL
            .iter()
            .map(|r| {
                (
                    label("rule", r.as_str()),
                    num(self.alerts_firing.get(r).copied().unwrap_or(0)),
                )
            })
            .collect();
        family(
            "tandem_alerts_firing",
            "gauge",
            "Alerts firing now, by rule.",
            &firing,
        );
        let fired: Vec<_> = Rule::ALL
            .iter()
            .map(|r| {
                (
                    label("rule", r.as_str()),
                    num(self.alerts_fired.get(r).copied().unwrap_or(0)),
                )
            })
            .collect();
        family(
            "tandem_alerts_fired_total",
            "counter",
            "Alerts fired since the monitor started, by rule.",
            &fired,
        );
        family(
            "tandem_alerts_suppressed_total",
            "counter",
            "Alerts not raised again within their cool-down.",
            &[(String::new(), num(self.alerts_suppressed))],
        );
        family(
            "tandem_alerts_dropped_total",
            "counter",
            "Alerts not raised because the monitor already holds its maximum of alert subjects, all firing.",
            &[(String::new(), num(self.alerts_dropped))],
        );
        let webhook = [
            ("delivered", self.webhook_delivered),
            ("failed_attempt", self.webhook_failed_attempts),
            ("given_up", self.webhook_given_up),
            ("dropped", self.webhook_dropped),
        ];
        let webhook: Vec<_> = webhook
            .iter()
            .map(|(r, n)| (label("result", r), num(*n)))
            .collect();
        family(
            "tandem_webhook_sends_total",
            "counter",
            "Alert webhook sends, by result.",
            &webhook,
        );
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Serves `GET /metrics` with the latest text in `snapshot`, one connection at a time, on a
/// thread of its own. Returns the bound address.
pub fn serve(addr: SocketAddr, snapshot: Arc<Mutex<String>>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Err(e) = answer(stream, &snapshot) {
                    tracing::debug!("metrics client: {e}");
                }
            }
        })?;
    Ok(bound)
}

fn answer(mut stream: TcpStream, snapshot: &Mutex<String>) -> io::Result<()> {
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > 16 * 1024 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let text = snapshot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            ("200 OK", CONTENT_TYPE, text)
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Fetches the metrics text of a monitor (for the admin server's aggregation and tests).
pub fn fetch(addr: SocketAddr) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no end of the response head"))?;
    if !head.starts_with("HTTP/1.1 200") {
        let first = head.lines().next().unwrap_or("");
        return Err(io::Error::other(format!("metrics: {first}")));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_access;

    #[test]
    fn histogram_is_cumulative_and_labels_are_escaped() {
        let mut m = Metrics::default();
        for line in [
            r#"1.2.3.4 [t] "GET / HTTP/1.1" 200 100 0.004"#,
            r#"1.2.3.4 [t] "GET / HTTP/1.1" 503 10 0.300"#,
            r#"1.2.3.4 [t] "GET / HTTP/1.1" 200 1 30.0"#,
        ] {
            m.observe_access(&parse_access(line).unwrap());
        }
        m.services.insert(
            "we\"ird".into(),
            ServiceMetrics {
                up: true,
                restarts: 2,
            },
        );
        let text = m.render();
        for expected in [
            "tandem_http_request_duration_seconds_bucket{le=\"0.005\"} 1\n",
            "tandem_http_request_duration_seconds_bucket{le=\"0.25\"} 1\n",
            "tandem_http_request_duration_seconds_bucket{le=\"0.5\"} 2\n",
            "tandem_http_request_duration_seconds_bucket{le=\"10\"} 2\n",
            "tandem_http_request_duration_seconds_bucket{le=\"+Inf\"} 3\n",
            "tandem_http_request_duration_seconds_count 3\n",
            "tandem_http_requests_total{class=\"5xx\"} 1\n",
            "tandem_http_response_bytes_total 111\n",
            "tandem_service_restarts_total{service=\"we\\\"ird\"} 2\n",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
    }

    #[test]
    fn metrics_address() {
        assert_eq!(
            default_addr(Ipv4Addr::new(10, 88, 0, 11)).to_string(),
            "127.0.0.1:9101"
        );
        assert_eq!(
            default_addr(Ipv4Addr::new(127, 0, 0, 12)).to_string(),
            "127.0.0.12:9101"
        );
    }
}
