//! The log monitor's parts with real files, sockets, TLS, `openssl` and `promtool`, and
//! property tests of its parsers ([`fuzz`]).

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fuzz;
mod metrics;
mod monitor;
mod store;
mod webhook;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;

/// What the receiver got: the request target and the JSON body.
pub type Received = (String, serde_json::Value);

/// A tiny HTTP receiver on 127.0.0.1: answers the first `fail_first` requests with 503 and
/// the rest with 200; every request it answered 200 to arrives on the channel.
pub fn webhook_receiver(fail_first: usize) -> (SocketAddr, Receiver<serde_json::Value>) {
    let (addr, rx) = receiver(fail_first, None);
    let (tx, bodies) = mpsc::channel();
    thread::spawn(move || {
        for (_, body) in rx {
            let _ = tx.send(body);
        }
    });
    (addr, bodies)
}

/// The same over TLS with `config` (plain HTTP when `None`), served by hyper. Connections
/// that fail (a client refusing the certificate) are skipped and do not count.
pub fn receiver(
    fail_first: usize,
    config: Option<Arc<rustls::ServerConfig>>,
) -> (SocketAddr, Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let (tx, rx) = mpsc::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    thread::spawn(move || {
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let tls = config.map(tokio_rustls::TlsAcceptor::from);
            let answered = Arc::new(AtomicUsize::new(0));
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (tls, answered, tx) = (tls.clone(), answered.clone(), tx.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        answer(request, fail_first, answered.clone(), tx.clone())
                    });
                    let http = http1::Builder::new();
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(tcp), service).await,
                        Some(tls) => {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            http.serve_connection(TokioIo::new(stream), service).await
                        }
                    };
                });
            }
        });
    });
    (addr, rx)
}

/// Answers one request: 503 for the first `fail_first` requests, 200 after; a 200 request's
/// target and JSON body go to `tx`.
async fn answer(
    request: Request<Incoming>,
    fail_first: usize,
    answered: Arc<AtomicUsize>,
    tx: mpsc::Sender<Received>,
) -> Result<Response<Empty<Bytes>>, hyper::Error> {
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(String::new, |p| p.as_str().to_string());
    let body = request.into_body().collect().await?.to_bytes();
    let ok = answered.fetch_add(1, Ordering::SeqCst) >= fail_first;
    if ok {
        if let Ok(json) = serde_json::from_slice(&body) {
            let _ = tx.send((target, json));
        }
    }
    let mut response = Response::new(Empty::new());
    *response.status_mut() = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(response)
}

/// A private CA for the tests: its certificate (PEM) and what signs with it.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn generate() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tandem test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = params.self_signed(&key).unwrap();
        TestCa {
            pem: issuer.pem(),
            issuer,
            key,
        }
    }

    /// A leaf for `names` (DNS names or IP addresses) expiring at midnight (UTC) `days` from
    /// now (rcgen's far-future default when `None`): (certificate PEM, key).
    pub fn leaf(&self, names: &[&str], days: Option<i64>) -> (String, rcgen::KeyPair) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if let Some(days) = days {
            let day = logmon::time::now_ms().div_euclid(86_400_000) + days;
            let (y, m, d) = logmon::time::civil_from_days(day);
            params.not_after = rcgen::date_time_ymd(y as i32, m as u8, d as u8);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer, &self.key).unwrap();
        (cert.pem(), key)
    }

    /// A TLS server config presenting a leaf for 127.0.0.1 signed by this CA.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let (pem, key) = self.leaf(&["127.0.0.1"], None);
        let chain =
            vec![rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Arc::new(config)
    }
}

/// Log lines written while it is the default subscriber (also in threads that inherit it).
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let logs = self.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || logs.clone())
            .finish()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `promtool check metrics` on `text`; fails the test with promtool's complaints.
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e} (install it: apt-get install prometheus)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics:\n{complaints}\n---- text ----\n{text}"
    );
}
