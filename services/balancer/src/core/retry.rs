//! When a failed request is tried again on another backend.
//!
//! A request is retried at most once, and only when its body can be sent again (it had none).
//! - The connection to the backend could not be made: nothing reached the backend, so any such
//!   request is retried (this is what makes a dying backend cost the client nothing).
//! - The request was sent but the connection closed or reset before any response: only
//!   idempotent methods (RFC 9110 §9.2.2) are retried, since the backend may have acted on it.
//! - A timeout after sending, or a response that already started: never retried.

use http::Method;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connecting failed (refused, unreachable, connect timeout).
    Connect,
    /// Sent, then closed or reset before the response head.
    ClosedBeforeResponse,
    /// Sent, no response within the timeout.
    Timeout,
    /// Any other error (the client's body failed, a protocol error).
    Other,
}

/// Attempts already made for this request, including the one that just failed.
pub const MAX_ATTEMPTS: u32 = 2;

pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether any failure of this attempt could be retried (what [`should_retry`] says for the
/// kindest failure): a request that cannot be retried needs no copy kept.
pub fn may_retry(body_replayable: bool, attempts: u32) -> bool {
    attempts < MAX_ATTEMPTS && body_replayable
}

pub fn should_retry(
    method: &Method,
    body_replayable: bool,
    failure: Failure,
    attempts: u32,
) -> bool {
    if !may_retry(body_replayable, attempts) {
        return false;
    }
    match failure {
        Failure::Connect => true,
        Failure::ClosedBeforeResponse => is_idempotent(method),
        Failure::Timeout | Failure::Other => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Failure::*;

    #[test]
    fn retry_table() {
        #[rustfmt::skip]
        let table = [
            (Method::GET,    true,  Connect,              1, true),
            (Method::GET,    true,  Connect,              2, false),
            (Method::GET,    false, Connect,              1, false),
            (Method::POST,   true,  Connect,              1, true),
            (Method::GET,    true,  ClosedBeforeResponse, 1, true),
            (Method::HEAD,   true,  ClosedBeforeResponse, 1, true),
            (Method::DELETE, true,  ClosedBeforeResponse, 1, true),
            (Method::POST,   true,  ClosedBeforeResponse, 1, false),
            (Method::PATCH,  true,  ClosedBeforeResponse, 1, false),
            (Method::GET,    true,  Timeout,              1, false),
            (Method::GET,    true,  Other,                1, false),
        ];
        for (method, replayable, failure, attempts, expected) in table {
            assert_eq!(
                should_retry(&method, replayable, failure, attempts),
                expected,
                "{method} replayable={replayable} {failure:?} attempts={attempts}"
            );
        }
    }
}
