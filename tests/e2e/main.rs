//! End-to-end tests: the built images booted in QEMU on a private network, driven from a client
//! inside that network. One test binary (`cargo test -p tests --test e2e`).
//!
//! Images come from `$TANDEM_IMAGES` (default `<workspace>/target/images`, built by
//! `scripts/build-images`). Missing images fail the tests; they are never skipped.
//! The wizard test boots `generic.qcow2` (`image-builder build --generic`) from the same
//! directory and drives headless Chromium (Debian's `chromium` and `chromium-driver`); its
//! screenshots go to `target/e2e/<id>/screenshots/`. `TANDEM_SETUP_CUT_MS` delays its power
//! cut after the last serial answer (default: at once).
//! `TANDEM_KEEP=1` keeps each cluster's work dir (overlays, logs) under `target/e2e/`.
//!
//! The admin port wants a login: the tests log in with the build machine's admin password and
//! read `/metrics` with its metrics token (both kept next to the cluster CA, see `support`).

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod disk_faults;
mod floating_ip;
mod node_lifecycle;
mod services;
mod updates;
mod wizard;
