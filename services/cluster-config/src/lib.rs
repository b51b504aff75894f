//! The cluster description: `cluster.toml` as users write it (the wire format), checked and
//! turned into validated domain types that every other crate consumes.
//!
//! Parsing never panics on input; every error names the file, the line and the key.

mod model;
pub mod settings;
mod validate;
mod wire;

pub use model::*;
pub use validate::{ConfigError, ConfigErrors};

/// The built-in default cluster: the seed's two servers on 10.88.0.0/24.
pub const DEFAULT_CLUSTER_TOML: &str = include_str!("../default-cluster.toml");
/// Name shown in errors for the embedded default.
pub const DEFAULT_CLUSTER_NAME: &str = "<built-in default cluster.toml>";
