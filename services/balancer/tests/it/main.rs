//! The balancer against real nginx backends, real curl and real openssl.

mod support;

mod hostile;
mod malformed;
mod proxy;
mod tls;
