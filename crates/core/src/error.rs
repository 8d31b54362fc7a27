//! Typed errors of the core. Every error that can reach a client maps to an errno
//! (`Error::errno`) so that frontends (NBD, ublk) answer with the protocol's error code.

use std::io;

/// Errors of the metadata store backends.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store: {0}")]
    Backend(String),
    #[error("metadata store I/O: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} '{name}' not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} '{name}' already exists")]
    Exists { kind: &'static str, name: String },
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("request out of range: offset {offset} + length {len} exceeds size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{0} is read-only")]
    ReadOnly(String),
    #[error("no space left in the pool (need {needed} blocks, {free} free)")]
    NoSpace { needed: u64, free: u64 },
    #[error(
        "volume '{volume}' is over its quota ({used} of {quota} bytes used, snapshots included)"
    )]
    QuotaExceeded {
        volume: String,
        quota: u64,
        used: u64,
    },
    #[error("{0}")]
    Busy(String),
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    #[error("data device: {context}: {source}")]
    Device {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("pool is shutting down")]
    Shutdown,
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A failpoint armed by a test (`failpoints` feature only; see `failpoints.rs`).
    #[error("injected failure at failpoint {0}")]
    Injected(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(what: &'static str, why: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            why: why.into(),
        }
    }
    pub fn not_found(kind: &'static str, name: impl Into<String>) -> Self {
        Error::NotFound {
            kind,
            name: name.into(),
        }
    }
    pub fn exists(kind: &'static str, name: impl Into<String>) -> Self {
        Error::Exists {
            kind,
            name: name.into(),
        }
    }
    pub fn device(context: impl Into<String>, source: io::Error) -> Self {
        Error::Device {
            context: context.into(),
            source,
        }
    }

    /// The errno a block frontend should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound { .. } => libc::ENOENT,
            Error::Exists { .. } => libc::EEXIST,
            Error::Invalid { .. } | Error::OutOfRange { .. } => libc::EINVAL,
            Error::ReadOnly(_) => libc::EPERM,
            Error::NoSpace { .. } | Error::QuotaExceeded { .. } => libc::ENOSPC,
            Error::Busy(_) => libc::EBUSY,
            Error::Shutdown => libc::ESHUTDOWN,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Checksum(_)
            | Error::Corrupt(_)
            | Error::Device { .. }
            | Error::Store(_)
            | Error::Injected(_) => libc::EIO,
        }
    }
}
