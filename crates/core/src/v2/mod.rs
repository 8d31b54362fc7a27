//! Metadata format 2 (docs/format2.md): lineages with birth epochs, one live map per lineage
//! in 64-block pages, per-page dead records (ZFS-style dead lists) for data snapshots still
//! need, a change index for reclaim and diff, and allocation regions written in the same
//! batch as the map changes.
//!
//! This module is the metadata engine without threads or data I/O: [`Meta2`] applies
//! operations in groups ([`Group`]), each one atomic store batch. The pool's committer thread
//! (one writer) drives it; readers use [`read::read_page`] on the store without locks.
//!
//! Invariants (format2.md §1), kept by every operation and verified by [`check::check`]:
//! * I1: every owned block is in exactly one piece, in a live page or in one dead record;
//! * I2: a dead piece (and a closed lineage's live piece) exists only while an epoch of the
//!   lineage's retained set lies in its interval, or a queued job covers it;
//! * I3: the content of a retained epoch is its live pieces born by then plus the dead
//!   pieces alive then;
//! * I4: the region records hold exactly the owned blocks referenced by pieces;
//! * I5: `x(L, w, page)` has DEAD exactly when `d(L, page, w)` exists.
//!
//! Threading: `Meta2` is not synchronised; exactly one thread mutates it.

pub mod cache;
pub mod check;
pub mod engine;
pub mod ids;
pub mod jobs;
pub mod keys;
pub mod lineage;
pub mod page;
pub mod piece;
pub mod read;
pub mod region;
pub mod retained;
pub mod sums;
mod varint;

pub use engine::{Edit, Group, Meta2, CHECKPOINT_EVERY};
pub use ids::{Epoch, LineageId, PageNo};
pub use piece::{Piece, PieceFlags};

/// Blocks per map page.
pub const PAGE_BLOCKS: u64 = 64;
