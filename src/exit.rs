//! Exit codes of the CLI (README): what kind of failure a command met, whether it ran in
//! the daemon (the reply carries the kind) or on a directly opened pool (the error chain
//! holds the pool's typed error).
//!
//! 0 ok; 1 failed (anything else, and `pool check`/`backup verify` finding damage); 2 bad
//! command line (clap); 3 not found; 4 in use; 5 invalid argument; 6 daemon not running
//! (and no --meta/--data to open the pool directly); 7 already exists.

use snapblk_control::ErrorKind;

/// A failure whose kind is known (a daemon reply, or no daemon to talk to).
#[derive(Debug)]
pub struct Failed {
    pub message: String,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Reply(ErrorKind),
    NoDaemon,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failed {}

/// The kind of a pool error anywhere in `e`'s chain.
pub fn kind_of(e: &anyhow::Error) -> ErrorKind {
    use snapblk_core::Error as E;
    for cause in e.chain() {
        if let Some(de) = cause.downcast_ref::<snapblk_daemon::DaemonError>() {
            return de.kind();
        }
        if let Some(pe) = cause.downcast_ref::<E>() {
            return match pe {
                E::NotFound { .. } => ErrorKind::NotFound,
                E::Exists { .. } => ErrorKind::Exists,
                E::Busy(_) | E::ReadOnly(_) => ErrorKind::InUse,
                E::Invalid { .. } | E::OutOfRange { .. } | E::Unsupported(_) => ErrorKind::Invalid,
                _ => ErrorKind::Other,
            };
        }
        if let Some(f) = cause.downcast_ref::<Failed>() {
            if let Kind::Reply(k) = f.kind {
                return k;
            }
        }
    }
    ErrorKind::Other
}

/// `e` and its causes, outermost first, as `{:#}` prints them but without a cause the
/// message before it already ends with (errors that show their source in their own text
/// and also return it from `source()`, such as the pool's device errors).
pub fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.ends_with(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// The exit code for a failed command.
pub fn code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| {
        c.downcast_ref::<Failed>()
            .is_some_and(|f| f.kind == Kind::NoDaemon)
    }) {
        return 6;
    }
    match kind_of(e) {
        ErrorKind::NotFound => 3,
        ErrorKind::InUse => 4,
        ErrorKind::Invalid => 5,
        ErrorKind::Exists => 7,
        ErrorKind::Other => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e =
            anyhow::Error::new(snapblk_core::Error::device("reading block 7", io)).context("scrub");
        assert_eq!(
            message(&e),
            "scrub: data device: reading block 7: entity not found"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(message(&e), "outer: inner");
    }

    #[test]
    fn codes_follow_the_kind_through_context() {
        let e = anyhow::Error::new(snapblk_core::Error::not_found("volume", "x".to_string()))
            .context("opening");
        assert_eq!(code(&e), 3);
        let e = anyhow::Error::new(Failed {
            message: "busy".into(),
            kind: Kind::Reply(ErrorKind::InUse),
        });
        assert_eq!(code(&e), 4);
        let e = anyhow::Error::new(Failed {
            message: "no daemon".into(),
            kind: Kind::NoDaemon,
        });
        assert_eq!(code(&e), 6);
        assert_eq!(code(&anyhow::anyhow!("disk on fire")), 1);
        // Direct mode: the daemon crate's error, its pool error inside.
        let e = anyhow::Error::new(
            snapblk_daemon::DaemonError::from(snapblk_core::Error::not_found("volume", "x"))
                .context("opening"),
        )
        .context("running");
        assert_eq!(code(&e), 3);
    }
}
