//! The balancer against real nginx backends, real curl and real openssl.

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod hostile;
mod malformed;
mod proxy;
mod tls;
