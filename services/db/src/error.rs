//! What can go wrong running the agent and the `db` commands.

use std::path::PathBuf;

use crate::client::SqlError;

/// An error of the agent or the `db` commands; each names the file or server it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done: `reading`, `creating`, …
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file holds something else than it should.
    #[error("{}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
    /// A step of a command failed on a server.
    #[error("{step}: {source}")]
    Sql {
        step: &'static str,
        #[source]
        source: SqlError,
    },
    /// The node's servers do not answer as the command expects.
    #[error("{0}")]
    Cluster(String),
}

impl Error {
    /// An [`Error::Io`] with `what` and `path`, for `map_err`.
    pub(crate) fn io(
        what: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let (what, path) = (what.into(), path.into());
        move |source| Error::Io { what, path, source }
    }
}
