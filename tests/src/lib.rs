//! End-to-end tests of Tandem: whole clusters booted from the built images in QEMU.
//! The tests live in `e2e/` (one test binary); this library is empty on purpose.
