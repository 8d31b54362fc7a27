//! Errors of the daemon's commands and wiring. Each names the volume, device, policy,
//! repository, path or setting it concerns; [`DaemonError::kind`] is what the control
//! protocol reports (and the CLI's exit code).

use snapblk_control::ErrorKind;

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Pool(#[from] snapblk_core::Error),
    #[error(transparent)]
    Backup(#[from] snapblk_backup::BackupError),
    #[error(transparent)]
    Store(#[from] snapblk_backup::store::StoreError),
    #[error(transparent)]
    Ublk(#[from] snapblk_ublk::Error),
    #[error(transparent)]
    Metrics(#[from] snapblk_metrics::MetricsError),
    #[error(transparent)]
    Tls(#[from] snapblk_nbd::tls::TlsError),
    /// A file, socket or thread operation failed; `what` says on what. (The cause is
    /// part of the message, not a `source()`: `{:#}` printers would repeat it.)
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// A setting or argument that cannot be used (config file, command, stored record).
    #[error("{0}")]
    Invalid(String),
    /// A named thing (policy, device, lazy restore) that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Refused because it is already there (a pool on the device, a data file).
    #[error("{0}")]
    Exists(String),
    /// Refused while something else uses the volume (a lazy restore, another process).
    #[error("{0}")]
    InUse(String),
    /// Needs the daemon (ublk devices, lazy restores) but ran on a directly opened pool.
    #[error("{0}")]
    NeedsDaemon(String),
    /// The protection-policy manager, a hook or a notification refused or failed.
    #[error("{0}")]
    Policy(String),
    /// `context`: `inner` (what was being done when it failed; the cause is part of the
    /// message, as for `Io`).
    #[error("{context}: {inner}")]
    Context {
        context: String,
        inner: Box<DaemonError>,
    },
}

impl DaemonError {
    /// An I/O error, saying on what.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
        let what = what.into();
        move |error| DaemonError::Io { what, error }
    }

    /// This error with what was being done put in front.
    pub fn context(self, context: impl Into<String>) -> DaemonError {
        DaemonError::Context {
            context: context.into(),
            inner: Box::new(self),
        }
    }

    /// The kind the control protocol reports (and the CLI's exit code follows).
    pub fn kind(&self) -> ErrorKind {
        use snapblk_core::Error as E;
        let pool = |e: &E| match e {
            E::NotFound { .. } => ErrorKind::NotFound,
            E::Exists { .. } => ErrorKind::Exists,
            E::Busy(_) | E::ReadOnly(_) => ErrorKind::InUse,
            E::Invalid { .. } | E::OutOfRange { .. } | E::Unsupported(_) => ErrorKind::Invalid,
            _ => ErrorKind::Other,
        };
        match self {
            DaemonError::Pool(e) | DaemonError::Ublk(snapblk_ublk::Error::Volume(e)) => pool(e),
            DaemonError::Invalid(_) => ErrorKind::Invalid,
            DaemonError::NotFound(_) => ErrorKind::NotFound,
            DaemonError::InUse(_) => ErrorKind::InUse,
            DaemonError::Exists(_) => ErrorKind::Exists,
            DaemonError::Context { inner, .. } => inner.kind(),
            _ => ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_follows_the_cause_through_context() {
        let e = DaemonError::from(snapblk_core::Error::not_found("volume", "x".to_string()))
            .context("opening");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "opening: volume 'x' not found");
        let e = DaemonError::InUse("volume v is still being restored".into()).context("x");
        assert_eq!(e.kind(), ErrorKind::InUse);
        let e = DaemonError::io("reading /x")(std::io::ErrorKind::NotFound.into()).context("y");
        assert_eq!(e.kind(), ErrorKind::Other);
        // Causes are in the message once: nothing for a chain printer to repeat.
        assert_eq!(e.to_string(), "y: reading /x: entity not found");
        assert!(std::error::Error::source(&e).is_none());
    }
}
