//! The snapblk daemon as a library: what `snapblk daemon` runs and what the CLI runs on a
//! directly opened pool. The binary (src/) parses the command line, connects or opens,
//! and renders replies; everything that acts lives here.
//!
//! Arrows point down: the control server ([`server`]) and the CLI's direct mode call
//! [`admin::execute`], the one place management commands are validated and run; it calls
//! the pool (snapblk-core), the backup engine, the ublk registry ([`devices`]) and the
//! protection policies ([`policies`], [`guard`], [`alerts`]).
//!
//! Threading: see each module. The daemon ([`run`]) starts the pool's background threads,
//! the policy scheduler, the space guard, NBD and control acceptors (a thread per
//! connection), the metrics endpoint and the watchdog; its main thread waits for SIGTERM
//! or SIGINT and then stops them in order (docs/design.md, lock table).

pub mod admin;
pub mod alerts;
pub mod devices;
pub mod error;
pub mod guard;
pub mod media;
pub mod metrics;
pub mod notify;
pub mod open;
pub mod policies;
pub mod relay;
pub mod repos;
pub mod run;
pub mod server;
pub mod sockets;

pub use error::{DaemonError, Result};
