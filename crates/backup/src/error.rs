//! Errors of the backup engine. Each names the object, chunk or input that was wrong.

use crate::store::StoreError;

pub type Result<T, E = BackupError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no snapblk backup repository at {0} (run `snapblk repo init` first)")]
    NoRepository(String),
    #[error("a repository already exists at {0}")]
    RepositoryExists(String),
    #[error("wrong key or passphrase for the repository at {0}")]
    WrongKey(String),
    #[error("repository object {object} is corrupt: {detail}")]
    Corrupt { object: String, detail: String },
    #[error("chunk {chunk} (pack {pack}) is bad: {detail}")]
    BadChunk {
        chunk: String,
        pack: String,
        detail: String,
    },
    #[error("chunk {0} is referenced but not stored in any pack")]
    MissingChunk(String),
    #[error(
        "backup {backup} is listed in its pool's catalog but {object} is gone from the store \
         (deleted?): it cannot be restored; `snapblk backup forget` drops it from the catalog"
    )]
    Lost { backup: String, object: String },
    #[error("busy: {0}")]
    Busy(String),
    #[error(
        "this host's clock ({host}) is {seconds} s {} {store}'s; leases and gc's cut-offs need clocks within {} s of the store's: synchronise the clock (NTP) and run again",
        if *ahead { "ahead of" } else { "behind" },
        crate::lease::MAX_CLOCK_SKEW
    )]
    ClockSkew {
        host: String,
        store: String,
        seconds: u64,
        ahead: bool,
    },
    #[error("no backup of {0} in the repository")]
    NoSuchBackup(String),
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("unsupported repository: {0}")]
    Unsupported(String),
    #[error("{cause}; the partly restored volume {volume} was removed")]
    RestoreFailed {
        volume: String,
        cause: Box<BackupError>,
    },
    #[error(transparent)]
    Volume(#[from] snapblk_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// This host's own files (the local chunk index, a job's table copy) could not be
    /// read or written: the repository is not at fault.
    #[error("{what} {path}: {detail}")]
    LocalState {
        what: String,
        path: String,
        detail: String,
    },
    #[error(
        "the repository at {repo} was rolled back: its config is format {found} but this host saw format {seen}; \
         someone put an older config back (if the store was restored from an older copy on purpose, remove {marks})"
    )]
    FormatRolledBack {
        repo: String,
        seen: u64,
        found: u32,
        marks: String,
    },
    #[error(
        "the repository at {repo} was rolled back: its index generation {found} but this host saw generation {seen}; \
         someone deleted or replaced gen/ objects (if the store was restored from an older copy on purpose, remove {marks})"
    )]
    IndexRolledBack {
        repo: String,
        seen: u64,
        found: String,
        marks: String,
    },
    #[error(
        "the repository at {repo} was rolled back: pool {pool}'s backup catalog is {found} but this host saw generation {seen}; \
         someone deleted newer catalog objects (if the store was restored from an older copy on purpose, remove {marks})"
    )]
    RolledBack {
        repo: String,
        pool: String,
        seen: u64,
        /// "at generation N" or "gone".
        found: String,
        marks: String,
    },
}

impl BackupError {
    pub fn corrupt(object: impl Into<String>, detail: impl Into<String>) -> Self {
        BackupError::Corrupt {
            object: object.into(),
            detail: detail.into(),
        }
    }
    pub fn invalid(what: impl Into<String>, detail: impl Into<String>) -> Self {
        BackupError::Invalid {
            what: what.into(),
            detail: detail.into(),
        }
    }
}
