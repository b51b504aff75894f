use std::io;

/// Why a bundle was refused, or could not be written. Messages name the member, payload or
/// chunk at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("signature does not verify with any trusted key")]
    BadSignature,
    #[error("no trusted keys: the keyring is empty")]
    NoTrustedKeys,
    #[error("bundle is for product {found}, this is {expected}")]
    WrongProduct { found: String, expected: String },
    #[error("bundle is for {found}, this system is {expected}")]
    Incompatible { found: String, expected: String },
    #[error("version {bundle} is not newer than the running {running} (use --force)")]
    NotNewer { bundle: String, running: String },
    #[error(
        "version {version} failed on this node before (it did not become healthy): use --force to install it again"
    )]
    KnownBad { version: String },
    #[error("unsupported bundle format version {found} (this build reads version {supported})")]
    UnsupportedFormat { found: u64, supported: u32 },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("bundle member {index}: expected {expected}, found {found}")]
    UnexpectedMember {
        index: usize,
        expected: String,
        found: String,
    },
    #[error("bundle truncated in {0}")]
    Truncated(String),
    #[error("payload {payload} chunk {chunk}: sha256 mismatch")]
    ChunkMismatch { payload: String, chunk: u64 },
    #[error("payload {payload}: sha256 of the whole payload does not match the manifest")]
    PayloadMismatch { payload: String },
    #[error("payload {payload}: {found} bytes, the manifest says {expected}")]
    PayloadSize {
        payload: String,
        found: u64,
        expected: u64,
    },
    #[error("payload {payload}: corrupt compressed data: {source}")]
    Corrupt { payload: String, source: io::Error },
    #[error("payload {payload} was not read to its end before the next one was asked for")]
    PayloadNotFinished { payload: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0}")]
    Key(String),
    #[error("unknown slot {0:?} (expected a or b)")]
    UnknownSlot(String),
    #[error("{0}")]
    Boot(String),
    #[error("payload rootfs is {needed} bytes, more than the {size} bytes of {device}")]
    DeviceTooSmall {
        device: String,
        size: u64,
        needed: u64,
    },
    #[error(
        "slot {slot} holds the default boot entry (the fallback): installing over it would leave no known-good entry; boot and bless the other slot first"
    )]
    TargetIsDefault { slot: crate::boot::Slot },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The bundle error inside an `io::Error` that a [`crate::Payload`] reader returned (or a
    /// copy loop passed on); any other I/O error becomes [`Error::Io`] with `what`.
    pub fn from_io(what: &str, e: io::Error) -> Error {
        if !e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            return Error::io(what, e);
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(err)) => *err,
            // Not reached: the check above saw an `Error` inside.
            Some(Err(other)) => Error::io(what, io::Error::new(kind, other)),
            None => Error::io(what, io::Error::from(kind)),
        }
    }
}
