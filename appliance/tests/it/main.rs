//! The appliance binary and library against real processes, nginx, MariaDB and sockets.

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod console;
mod db;
mod logmon;
mod privilege;
mod run;
mod settings;
mod setup_console;
mod supervisor;
mod support;
