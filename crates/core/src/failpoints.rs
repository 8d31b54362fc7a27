//! Named failpoints at every step of a metadata commit (docs/design.md §5, "Failpoints").
//!
//! With the `failpoints` feature, `failpoint!("name")` consults the `fail` crate's registry
//! and, when a test has configured `name` with the `return` action, makes the enclosing
//! function return `Error::Injected(name)` at that exact step. The power-loss tests
//! (crates/testkit/tests/powerloss.rs) arm each point in [`ALL`] in turn, cut the power right
//! there, reopen the pool and check it. Without the feature the macro expands to nothing.
//!
//! Invariant: every `failpoint!` name used in this crate is listed in [`ALL`] (a testkit
//! test scans the sources), so none goes untested.

/// Every failpoint, in the order an operation meets them.
pub const ALL: &[&str] = &[
    // Pool::format: header written and synced, superblock not yet committed.
    "format.before_commit",
    // A write: data is on the device, its mapping batch not yet committed.
    "write.before_commit",
    // Any head edit (write, trim, write-zeroes, resize tail): before / after its batch.
    "head_edit.before_commit",
    "head_edit.after_commit",
    // FLUSH / periodic sync: data device synced, metadata not yet.
    "sync.before_store_sync",
    // Sync done, pending frees not yet returned to the allocator.
    "sync.before_release",
    "volume_create.before_commit",
    // Resize: between the zeroing of a grown tail and the size record / after a shrink's
    // size record, before its tail is zeroed.
    "resize.before_commit",
    "resize.after_commit",
    "rename.before_commit",
    "volume_delete.before_commit",
    // Snapshot create: before the data-device sync, then between it and the batch.
    "snapshot_create.before_sync",
    "snapshot_create.before_commit",
    "snapshot_delete.before_commit",
    "clone.before_commit",
    "rollback.before_commit",
    // One reclaim step: before / after its batch (its frees not yet deferred).
    "reclaim.before_commit",
    "reclaim.after_commit",
    // Format 2 (the pool in use): see FORMAT2.
    "format2.before_commit",
    "commit2.before_store",
    "commit2.after_store",
    "reclaim2.mid_step",
    "snapshot2.before_sync",
    "upgrade.mid_replay",
    "upgrade.before_switch",
    "upgrade.before_header",
    "upgrade.before_cleanup",
];

/// The failpoints of the format-2 pool and of `pool upgrade` (the rest are the format-1
/// pool's, kept for the upgrade).
pub const FORMAT2: &[&str] = &[
    // Pool2::format: header and engine records written, superblock not yet.
    "format2.before_commit",
    // Every group commit (writes, management steps, reclaim steps): before the store batch,
    // and after it was committed but before the engine reports success (as a store that
    // wrote its WAL record and then failed: the engine stops).
    "commit2.before_store",
    "commit2.after_store",
    // A reclaim step that changed the engine's memory and did not commit (the engine stops).
    "reclaim2.mid_step",
    // Snapshot create, before its device sync.
    "snapshot2.before_sync",
    // pool upgrade: during the replay, after verification before the superblock switch,
    // between the superblock and the device header, before removing format-1 keys.
    "upgrade.mid_replay",
    "upgrade.before_switch",
    "upgrade.before_header",
    "upgrade.before_cleanup",
];

/// Returns `Err(Error::Injected(name))` from the enclosing function when a test armed `name`.
#[macro_export]
#[doc(hidden)]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| Err($crate::Error::Injected($name)));
    };
}
