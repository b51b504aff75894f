//! The log monitor of a Tandem node.
//!
//! - [`store`]: the size-capped log store the supervisor writes every service's output and
//!   its events into (`<state>/logs/<name>.log`, rotated; total cap).
//! - [`tail`]: follows those files across rotation; nginx's access lines are read with
//!   [`api::access_log`] (the format `web` gives nginx), [`parse`] reads the structured status
//!   lines of Tandem's services and the database agent's status ([`api::db::AgentStatus`]).
//! - [`engine`]: the alert rules (pure: observations and the time in, transitions out).
//! - [`cert`]: which certificate chains the balancer serves and when their leaves expire.
//! - [`alerts`]: the alert history in `<state>/alerts.db` and its query API;
//!   [`webhook`]: the background JSON POST sender (http or https, ureq with rustls).
//! - [`metrics`]: the Prometheus text the monitor serves on `127.0.0.1:9101` (hyper, on a
//!   small tokio runtime of its own) and its client (ureq).
//! - [`monitor`]: `appliance logmon`, the loop that ties it together.
//!
//! This crate never depends on the supervisor: it reads the supervisor's state DB through
//! its documented table ([`api::events`]) and the log files through their documented format.

pub mod alerts;
pub mod cert;
pub mod engine;
pub mod metrics;
pub mod monitor;
pub mod parse;
pub mod store;
pub mod tail;
pub mod time;
pub mod webhook;

use std::path::PathBuf;

pub use engine::{Alert, AlertState, Rule, Rules, Severity};
pub use metrics::METRICS_PORT;
pub use monitor::{run, Config};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", .path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{} has schema version {found}, newer than this binary's {supported}", .path.display())]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Events(#[from] api::events::ReadError),
    #[error("webhook: {0}")]
    Webhook(String),
}
