//! Keep-alive connections to one backend: a stack of idle HTTP/1.1 connections, most recently
//! used first. A connection goes back when the response body it carried has been read to the
//! end; one that closed meanwhile is dropped on the way out.
//!
//! One stack per worker thread ([`set_worker`]): a backend connection's task runs on the
//! worker that opened it, and only that worker's requests use it, so a request never wakes
//! another thread (and the stacks' locks are never contended).

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::ReqBody;
use crate::clock::coarse_now;

/// Idle connections kept per backend and worker; more are closed when they come back.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed instead of reused: well before nginx's own
/// keep-alive timeout (75 s), so a request is rarely sent on a connection the backend is
/// closing at that moment (a non-idempotent one could not be retried).
pub(crate) const MAX_IDLE_AGE: Duration = Duration::from_secs(30);

/// Worker threads the process runs at most (see [`reserve_workers`]): pools made from now on
/// get one stack each.
static WORKERS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread's worker number; 0 for any thread that is not a balancer worker.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Pools made from now on keep one stack for each of `n` workers.
pub(crate) fn reserve_workers(n: usize) {
    WORKERS.fetch_max(n, Relaxed);
}

/// This thread is worker `i` (`0..n` of [`reserve_workers`]).
pub(crate) fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

type Idle = Mutex<Vec<(SendRequest<ReqBody>, Instant)>>;

/// Whether a connection idle since `since` is too old to be used at `now`.
fn expired(since: Instant, now: Instant) -> bool {
    now.saturating_duration_since(since) >= MAX_IDLE_AGE
}

#[derive(Debug)]
pub struct Pool {
    /// Per worker: most recently used last, with the time it came back.
    idle: Box<[Idle]>,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            idle: (0..WORKERS.load(Relaxed).max(1))
                .map(|_| Idle::default())
                .collect(),
        }
    }
}

#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing reached the backend.
    Connect(io::Error),
    /// The request failed on an established connection.
    Http(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Http(e) => write!(f, "{e}"),
        }
    }
}

impl Pool {
    /// This worker's stack (a pool made before more workers were reserved shares its stacks).
    fn mine(&self) -> &Idle {
        let i = WORKER.with(Cell::get);
        &self.idle[i % self.idle.len()]
    }

    fn take(&self) -> Option<SendRequest<ReqBody>> {
        let now = coarse_now();
        let mut idle = self.mine().lock().unwrap_or_else(|p| p.into_inner());
        while let Some((c, since)) = idle.pop() {
            if expired(since, now) {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            if !c.is_closed() {
                return Some(c);
            }
        }
        None
    }

    /// Return a connection whose response was read to the end.
    pub fn put(&self, c: SendRequest<ReqBody>) {
        if c.is_closed() {
            return;
        }
        let mut idle = self.mine().lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((c, coarse_now()));
        }
    }

    /// Close the idle connections of every worker that are too old to be used
    /// ([`MAX_IDLE_AGE`]) or closed by the backend; how many went.
    pub(crate) fn purge(&self, now: Instant) -> usize {
        let mut purged = 0;
        for stack in &self.idle {
            let mut idle = stack.lock().unwrap_or_else(|p| p.into_inner());
            let before = idle.len();
            idle.retain(|(c, since)| !expired(*since, now) && !c.is_closed());
            purged += before - idle.len();
        }
        purged
    }

    /// Send `req` on an idle connection, or a new one. A request that an idle connection
    /// could not take (the backend closed it meanwhile) goes on the next one, or a new one.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<ReqBody>,
        connect_timeout: Duration,
        opened: &AtomicU64,
    ) -> Result<(Response<Incoming>, SendRequest<ReqBody>), SendError> {
        loop {
            let (mut c, pooled) = match self.take() {
                Some(c) => (c, true),
                None => {
                    // Boxed: inline, the connect and handshake futures would make every
                    // request's future (moved into each HTTP/2 stream's task) larger.
                    let c = Box::pin(connect(addr, connect_timeout)).await?;
                    opened.fetch_add(1, Relaxed);
                    (c, false)
                }
            };
            if c.ready().await.is_err() && pooled {
                continue;
            }
            match c.try_send_request(req).await {
                Ok(resp) => return Ok((resp, c)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<SendRequest<ReqBody>, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(SendError::Connect(e)),
        Err(_) => return Err(SendError::Connect(io::ErrorKind::TimedOut.into())),
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        // Small requests: one flat buffer and one write() beat writev() (measured).
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(SendError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(backend = %addr, error = %e, "backend connection ended with an error");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection over an in-memory pipe; the other end plays the backend.
    async fn conn() -> (SendRequest<ReqBody>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (sender, conn) = http1::handshake(TokioIo::new(ours)).await.unwrap();
        tokio::spawn(conn);
        (sender, theirs)
    }

    #[tokio::test]
    async fn purge_closes_the_stale_and_the_closed_only() {
        let pool = Pool::default();
        let now = Instant::now();
        let (fresh, _backend1) = conn().await;
        let (stale, _backend2) = conn().await;
        let (closed, backend3) = conn().await;
        drop(backend3);
        for _ in 0..200 {
            if closed.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(closed.is_closed(), "the backend's close was not seen");
        let long_ago = now
            .checked_sub(MAX_IDLE_AGE + Duration::from_secs(1))
            .unwrap();
        pool.mine()
            .lock()
            .unwrap()
            .extend([(stale, long_ago), (closed, now), (fresh, now)]);
        assert_eq!(pool.purge(now), 2);
        assert_eq!(pool.mine().lock().unwrap().len(), 1);
        assert!(
            pool.take().is_some(),
            "the fresh connection stays for the next request"
        );
        assert_eq!(pool.purge(now), 0);
    }
}
