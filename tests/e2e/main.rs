//! End-to-end tests: the built images booted in QEMU on a private network, driven from a client
//! inside that network. One test binary (`cargo test -p tests --test e2e`).
//!
//! Images come from `$TANDEM_IMAGES` (default `<workspace>/target/images`, built by
//! `scripts/build-images`). Missing images fail the tests; they are never skipped.
//! `TANDEM_KEEP=1` keeps each cluster's work dir (overlays, logs) under `target/e2e/`.

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod disk_faults;
mod floating_ip;
mod node_lifecycle;
mod services;
mod updates;
