//! Active health checks: one task per backend, an HTTP GET of the health path on a fresh
//! connection every interval (the first one at once), judged by status and timeout. A connect
//! that fails within the balancer's connect timeout takes the backend down at once (see
//! `core::health`). [`Shared::recheck`] wakes every check early: the balancer does so when
//! its node takes the floating IP, so a peer that died with the address is found at once.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::backend::Backend;
use crate::core::health::Observation;
use crate::proxy::Shared;

pub(crate) async fn run(
    shared: Arc<Shared>,
    backend: Arc<Backend>,
    mut shutdown: watch::Receiver<bool>,
    _tasks: mpsc::Sender<()>,
) {
    loop {
        if backend.retired.load(Relaxed) || *shutdown.borrow() {
            return;
        }
        let settings = shared.settings.load_full();
        let hc = &settings.plan.health;
        let connect_timeout = shared.limits.connect_timeout.min(hc.timeout);
        let result = tokio::time::timeout(
            hc.timeout,
            check(&backend, &hc.path, &settings.plan.domain, connect_timeout),
        )
        .await
        .unwrap_or_else(|_| {
            Err(CheckError::Other(format!(
                "no answer within {} ms",
                hc.timeout.as_millis()
            )))
        });
        let obs = match result {
            Ok(status) if status == hc.expect_status => Observation::CheckPassed,
            Ok(status) => {
                let why = format!("check got status {status}, expected {}", hc.expect_status);
                fail(&shared, &backend, Observation::CheckFailed, &why);
                Observation::CheckFailed
            }
            Err(CheckError::Connect(why)) => {
                fail(&shared, &backend, Observation::ConnectFailed, &why);
                Observation::ConnectFailed
            }
            Err(CheckError::Other(why)) => {
                fail(&shared, &backend, Observation::CheckFailed, &why);
                Observation::CheckFailed
            }
        };
        if obs == Observation::CheckPassed {
            shared.observe(&backend, obs, "check passed");
        }
        let interval = hc.interval.max(Duration::from_millis(10));
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shared.recheck.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn fail(shared: &Shared, backend: &Backend, obs: Observation, why: &str) {
    backend.metrics.checks_failed.fetch_add(1, Relaxed);
    tracing::debug!(target: "health", backend = %backend.name, addr = %backend.addr, reason = why, "check failed");
    shared.observe(backend, obs, why);
}

enum CheckError {
    /// The TCP connect failed or timed out.
    Connect(String),
    Other(String),
}

/// The status of `GET path` on a new connection to the backend.
async fn check(
    backend: &Backend,
    path: &str,
    host: &str,
    connect_timeout: Duration,
) -> Result<u16, CheckError> {
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(backend.addr)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(CheckError::Connect(format!("connect: {e}"))),
        Err(_) => {
            return Err(CheckError::Connect(format!(
                "connect: no answer within {} ms",
                connect_timeout.as_millis()
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CheckError::Other(format!("handshake: {e}")))?;
    let conn = tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, host)
        .header(header::USER_AGENT, "tandem-balancer-check")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| CheckError::Other(format!("request: {e}")))?;
    let result = sender
        .send_request(req)
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| CheckError::Other(format!("request: {e}")));
    conn.abort();
    result
}
