//! The monitor's metrics in the Prometheus text format (version 0.0.4), served on
//! `127.0.0.1:`[`METRICS_PORT`] (hyper) for the admin server to aggregate, and a client for it
//! (ureq).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use api::access_log::AccessLine;
use api::prometheus::escape_label;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{oneshot, Semaphore};

use crate::engine::Rule;
use crate::parse::StatusClass;

/// The monitor's metrics port.
pub const METRICS_PORT: u16 = 9101;
/// Upper bounds (seconds) of the request-time histogram buckets.
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// How long the server waits for a request head, and the client for an answer.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The Prometheus text format's media type.
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
        *self
            .requests
            .entry(StatusClass::of(line.status))
            .or_default() += 1;
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
        let label = |k: &str, v: &str| format!("{{{k}=\"{}\"}}", escape_label(v));
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

/// The metrics server's limits (the defaults are the named constants below).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// A request head (or, on a kept-alive connection, the next one) must arrive within this.
    pub header_read_timeout: Duration,
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// The longest a connection lives, so a client that stops reading cannot hold one.
    pub connection_lifetime: Duration,
}

/// The most connections the metrics server holds open: scrapers are the admin server and a
/// person with curl, so a handful is plenty, and a loop opening connections costs little.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest a connection to the metrics server lives.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The largest request head the server reads (hyper answers 431 beyond it).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: HTTP_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            connection_lifetime: CONNECTION_LIFETIME,
        }
    }
}

/// The running metrics server; dropping it stops the server and closes its connections.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// The address it listens on (the port the system chose, when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the metrics server's thread panicked");
            }
        }
    }
}

/// Serves `GET /metrics` (and `HEAD`) with the latest text in `snapshot`, with the default
/// [`ServerLimits`], on a thread of its own.
pub fn serve(addr: SocketAddr, snapshot: Arc<Mutex<String>>) -> io::Result<MetricsServer> {
    serve_with(addr, snapshot, ServerLimits::default())
}

/// [`serve`] with other limits: HTTP/1.1 (hyper) on a single-threaded tokio runtime on a
/// thread of its own (the rest of the monitor is plain threads), many clients at once.
pub fn serve_with(
    addr: SocketAddr,
    snapshot: Arc<Mutex<String>>,
    limits: ServerLimits,
) -> io::Result<MetricsServer> {
    let listener = std::net::TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let (stop, stopped) = oneshot::channel();
    let thread = thread::Builder::new()
        .name("metrics".into())
        .spawn(move || runtime.block_on(accept_loop(listener, snapshot, limits, stopped)))?;
    Ok(MetricsServer {
        addr: bound,
        stop: Some(stop),
        thread: Some(thread),
    })
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    snapshot: Arc<Mutex<String>>,
    limits: ServerLimits,
    mut stopped: oneshot::Receiver<()>,
) {
    let permits = Arc::new(Semaphore::new(
        limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper refuses (panics on) a read buffer under 8 KiB.
        .max_buf_size(MAX_HEAD_BYTES.max(8192))
        .max_header_size(MAX_HEAD_BYTES);
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, mostly: wait instead of spinning on the error.
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: {} connections open, one more closed", limits.max_connections);
            continue;
        };
        let snapshot = snapshot.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let text = snapshot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let response = respond(request.method(), request.uri().path(), text).map(Full::new);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(limits.connection_lifetime, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, "metrics client: {e}"),
                Err(_) => tracing::debug!(%peer, "metrics client: connection lifetime reached"),
            }
        });
    }
}

/// The answer to `method path` (pure): the metrics `text` for `GET /metrics`, its head only
/// for `HEAD`, 404 for any other path, 405 for any other method.
fn respond(method: &Method, path: &str, text: String) -> Response<Bytes> {
    let (status, content_type, body) = if path != "/metrics" {
        (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into())
    } else if method != Method::GET && method != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET or HEAD only\n".into(),
        )
    } else {
        (StatusCode::OK, CONTENT_TYPE, text)
    };
    let length = body.len();
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// Fetches the metrics text of a monitor (for the admin server's aggregation and tests); an
/// answer other than 200 is an error naming its status.
pub fn fetch(addr: SocketAddr) -> io::Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(HTTP_TIMEOUT))
        .http_status_as_error(false)
        // The monitor is on loopback: the environment's proxy is not for it.
        .proxy(None)
        .build()
        .into();
    let url = format!("http://{addr}/metrics");
    let mut response = agent
        .get(&url)
        .call()
        .map_err(|e| io::Error::other(format!("{url}: {e}")))?;
    if response.status() != StatusCode::OK {
        return Err(io::Error::other(format!(
            "{url}: answered {}",
            response.status()
        )));
    }
    response
        .body_mut()
        .read_to_string()
        .map_err(|e| io::Error::other(format!("{url}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::access_log::parse as parse_access;

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
    fn answers() {
        // (method, path) -> (status, content type, Allow, body)
        let table = [
            ("GET", "/metrics", (200, CONTENT_TYPE, None, "up 1\n")),
            ("HEAD", "/metrics", (200, CONTENT_TYPE, None, "")),
            ("GET", "/", (404, "text/plain", None, "try /metrics\n")),
            ("HEAD", "/metric", (404, "text/plain", None, "")),
            ("DELETE", "/x", (404, "text/plain", None, "try /metrics\n")),
            (
                "POST",
                "/metrics",
                (405, "text/plain", Some("GET, HEAD"), "GET or HEAD only\n"),
            ),
            (
                "OPTIONS",
                "/metrics",
                (405, "text/plain", Some("GET, HEAD"), "GET or HEAD only\n"),
            ),
        ];
        for (method, path, (status, content_type, allow, body)) in table {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let response = respond(&method, path, "up 1\n".into());
            let headers = response.headers();
            let got = (
                response.status().as_u16(),
                headers[header::CONTENT_TYPE].to_str().unwrap(),
                headers.get(header::ALLOW).map(|v| v.to_str().unwrap()),
                response.body().clone(),
            );
            assert_eq!(
                got,
                (status, content_type, allow, Bytes::from(body)),
                "{method} {path}"
            );
            // HEAD says how long the GET's body is.
            let get_length = if method == Method::HEAD {
                respond(&Method::GET, path, "up 1\n".into()).headers()[header::CONTENT_LENGTH]
                    .clone()
            } else {
                HeaderValue::from(body.len())
            };
            assert_eq!(
                headers[header::CONTENT_LENGTH],
                get_length,
                "{method} {path}"
            );
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
