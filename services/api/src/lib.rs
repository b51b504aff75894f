//! Formats that more than one Tandem crate reads or writes. A file name, a status record or a
//! line format lives here once, typed, and both sides use it; services never depend on each
//! other, only on this crate and `cluster-config`.

pub mod access_log;
pub mod control;
pub mod db;
pub mod events;
pub mod files;
pub mod fsio;
pub mod ports;
pub mod prometheus;
pub mod secret;
pub mod settings;
pub mod sqlite;
pub mod storage;
pub mod text;
pub mod update;
pub mod vip;
