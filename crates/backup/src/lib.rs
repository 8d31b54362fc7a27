//! snapblk-backup: backup repositories for snapblk snapshots.
//!
//! A repository lives in an [`ObjectStore`] (a local directory here, S3 in `snapblk-s3`).
//! Snapshot images are cut into fixed cells of `chunk_size` bytes; each non-zero cell is a
//! chunk named by a keyed BLAKE3 hash of its contents (dedup across snapshots and volumes),
//! zstd-compressed, sealed with XChaCha20-Poly1305 and packed with others into pack objects
//! of a few MiB. A manifest per snapshot (cell -> chunk id, plus a digest of the whole
//! table) is written last, so a backup is visible only once everything it names is stored.
//! The layout is specified in docs/design.md §12.
//!
//! Threading: the engine runs reader, packer and uploader threads joined by bounded
//! crossbeam channels (bounded memory); stores must be `Send + Sync` and are called from
//! several threads at once. Nothing here depends on a metadata store, a frontend or AWS: the
//! engine reads and writes images through `snapblk_core::Export`.

pub mod backup;
pub mod cache;
pub mod catalog;
mod cellmap;
pub mod chunk;
pub mod chunks;
pub mod compact;
pub mod config;
pub mod copy;
pub mod crypto;
pub mod error;
pub mod file;
pub mod frame;
pub mod gc;
mod gcgen;
pub mod generation;
pub mod hold;
pub mod index;
pub mod lazy;
pub mod lease;
pub mod liveset;
pub mod localindex;
pub mod manifest;
pub mod marks;
pub mod pace;
pub mod pack;
mod par;
pub mod progress;
pub mod prune;
pub mod repair;
pub mod repo;
pub mod restore;
pub mod spool;
pub mod store;
pub mod table;
pub mod tablecopy;
pub mod verify;
pub mod volume;

pub use error::{BackupError, Result};
pub use progress::{NoProgress, Progress};
pub use repo::Repository;
pub use store::{ObjectMeta, ObjectStore, StoreError};
