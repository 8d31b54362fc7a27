//! snapblk-core: thin volumes, O(1) copy-on-write snapshots and clones over a metadata
//! store and a data device. Depends on no particular store (RocksDB lives in
//! `snapblk-rocks`) and on no frontend (NBD lives in `snapblk-nbd`). See docs/design.md.

pub mod alloc;
pub mod device;
pub mod error;
pub mod export;
pub mod failpoints;
pub mod identity;
pub mod keys;
pub mod lock;
pub mod meta;
pub mod names;
pub mod pool;
pub mod pool2;
pub mod upgrade;
pub mod v2;
pub mod volume;

pub use error::{Error, Result, StoreError};
pub use export::{Export, ExportProvider};
pub use meta::{MemStore, MetaStore, WriteBatch};
pub use pool::Pool as Pool1;
pub use pool::Target;
/// The pool (metadata format 2). The format-1 pool stays as [`Pool1`] for `pool upgrade`.
pub use pool2::Pool2 as Pool;
pub use volume::{PoolExports, VolumeHandle};
