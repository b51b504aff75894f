//! Request and response bodies of the proxy, with the guards that count requests in flight.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use crate::backend::Backend;
use crate::conn::ConnShared;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What is sent to a backend: nothing (replayable, so retries are possible) or the client's
/// body, streamed, cut off at the body limit, counted in flight on the client connection until
/// it ends or is dropped.
pub enum ReqBody {
    Empty,
    Stream(Limited<Incoming>, Inflight),
}

/// The client's request body failed while it was forwarded. It reaches the proxy inside the
/// backend request's error, and says the fault is the client's, not the backend's.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientBodyError {
    #[error("request body larger than the limit")]
    TooLarge,
    /// Its framing is broken (a bad chunk) or it was cut short (the client closed, reset).
    #[error("request body broken by the client: {0}")]
    Broken(#[source] BoxError),
}

impl ReqBody {
    pub fn stream(body: Limited<Incoming>, inflight: Inflight) -> ReqBody {
        ReqBody::Stream(body, inflight)
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            // Everything this body yields comes from the client: so do its errors.
            ReqBody::Stream(b, _) => Pin::new(b).poll_frame(cx).map_err(|e| {
                if e.is::<LengthLimitError>() {
                    ClientBodyError::TooLarge.into()
                } else {
                    ClientBodyError::Broken(e).into()
                }
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Stream(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Stream(b, _) => b.size_hint(),
        }
    }
}

/// The client body error behind an error of the client library, if that is what it is.
pub(crate) fn client_body_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ClientBodyError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<ClientBodyError>() {
            return Some(c);
        }
        cur = e.source();
    }
    None
}

/// Counts a request in flight until dropped: on a backend (least connections, metrics) or on a
/// client connection (timeouts). Held by the response body, so the count lasts until the body
/// is fully sent.
pub enum Inflight {
    Backend(Arc<Backend>),
    Conn(Arc<ConnShared>),
}

impl Inflight {
    fn counter(&self) -> &AtomicU64 {
        match self {
            Inflight::Backend(b) => &b.active,
            Inflight::Conn(c) => &c.inflight,
        }
    }

    pub fn backend(b: &Arc<Backend>) -> Inflight {
        let g = Inflight::Backend(b.clone());
        g.counter().fetch_add(1, Relaxed);
        g
    }

    pub fn conn(c: &Arc<ConnShared>) -> Inflight {
        let g = Inflight::Conn(c.clone());
        g.counter().fetch_add(1, Relaxed);
        g
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.counter().fetch_sub(1, Relaxed);
    }
}

/// What goes back to the client: a backend's body or a small local one.
pub(crate) struct RespBody {
    kind: Kind,
    _guards: [Option<Inflight>; 2],
}

enum Kind {
    /// The backend connection goes back to its pool once the body was read to the end.
    Backend {
        body: Incoming,
        backend: Arc<Backend>,
        conn: Option<SendRequest<ReqBody>>,
    },
    Full(Option<Bytes>),
}

impl Drop for RespBody {
    fn drop(&mut self) {
        if let Kind::Backend {
            body,
            backend,
            conn,
        } = &mut self.kind
        {
            // A body not read to the end leaves the connection mid-response: drop it.
            if body.is_end_stream() {
                if let Some(c) = conn.take() {
                    backend.pool.put(c);
                }
            }
        }
    }
}

impl RespBody {
    pub(crate) fn full(b: impl Into<Bytes>) -> RespBody {
        let b = b.into();
        RespBody {
            kind: Kind::Full((!b.is_empty()).then_some(b)),
            _guards: [None, None],
        }
    }

    pub(crate) fn empty() -> RespBody {
        RespBody::full(Bytes::new())
    }

    pub(crate) fn backend(
        body: Incoming,
        backend: Arc<Backend>,
        conn: SendRequest<ReqBody>,
        guards: [Option<Inflight>; 2],
    ) -> RespBody {
        RespBody {
            kind: Kind::Backend {
                body,
                backend,
                conn: Some(conn),
            },
            _guards: guards,
        }
    }

    pub(crate) fn add_guard(&mut self, g: Inflight) {
        if let Some(slot) = self._guards.iter_mut().find(|s| s.is_none()) {
            *slot = Some(g);
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Backend { body, .. } => Pin::new(body).poll_frame(cx),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Backend { body, .. } => body.is_end_stream(),
            Kind::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Backend { body, .. } => body.size_hint(),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
