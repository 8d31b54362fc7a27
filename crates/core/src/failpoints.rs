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
