//! The pool: metadata store + data device + the layer tree, and every operation on them.
//!
//! Threading rules (docs/design.md §6):
//! * `tree` (RwLock): read side to resolve mappings and read names; write side for every
//!   metadata commit, held for one store batch. Never held across data-device I/O except
//!   for `snapshot create`, which syncs the data device under it.
//! * `alloc` (Mutex): taken briefly, never while waiting for I/O; may be taken while `tree`
//!   is held, never the other way round.
//! * `pins` (pins.rs): reads pin the sync generation from before their mapping lookup to
//!   the end of their data I/O; a sync returns to the allocator only frees older than every
//!   pin. Never waits, so a reader may hold a pin across asynchronous I/O. Taken before
//!   `tree`.
//! * `stripes`: sub-block writes lock the stripe of their block before anything else.

mod io;
pub use io::{BLOCK_STATUS_MAX, STATUS_HOLE, STATUS_ZERO};
mod load;
pub(crate) mod mapping;
pub(crate) mod ops;
mod pins;
pub mod plan;
mod reclaim;

pub mod check;
pub mod diff;
pub mod scrub;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alloc::Allocator;
use crate::device::{DataDevice, BLOCK_SIZE_U64};
use crate::error::{Error, Result};
use crate::keys::{SuperRecord, VolId};
use crate::meta::MetaStore;

pub use ops::{SnapshotInfo, VolumeInfo};
pub(crate) use pins::Pins as PinTable;
pub use pins::ReadPin;
pub(crate) use tree::Tree;

mod tree;

/// What an I/O addresses: a volume's current head, or a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Volume(VolId),
    Snapshot(VolId, String),
}

const STRIPES: usize = 1024;
/// Reclaim steps between syncs that return the freed blocks to the allocator.
const RECLAIM_SYNC_EVERY: u64 = 64;

pub struct Pool {
    store: Arc<dyn MetaStore>,
    dev: Arc<dyn DataDevice>,
    sup: SuperRecord,
    tree: RwLock<Tree>,
    alloc: Mutex<Allocator>,
    pins: pins::Pins,
    generation: AtomicU64,
    sync_lock: Mutex<()>,
    /// Held across the data device's `fdatasync`, so a caller that finds nothing dirty
    /// (because another caller's sync is covering it) waits for that sync to finish
    /// before it counts its writes as durable.
    device_sync: Mutex<()>,
    stripes: Vec<Mutex<()>>,
    open_targets: Mutex<HashMap<Target, usize>>,
    /// Serialises resizes (a shrink zeroes the cut-off tail after committing the size).
    resize_lock: Mutex<()>,
    wake: (Mutex<bool>, Condvar),
    shutdown: AtomicBool,
    dirty: AtomicBool,
    /// Set after every data-device write, cleared by the sync that covers it: lets `sync`
    /// and `snapshot create` skip an `fdatasync` that has nothing to do.
    data_dirty: AtomicBool,
    background: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolInfo {
    pub uuid: String,
    pub format_version: u32,
    pub block_size: u64,
    pub capacity: u64,
    pub used: u64,
    pub free: u64,
    pub pending_free: u64,
    pub metadata_size: u64,
    pub volumes: usize,
    pub snapshots: usize,
    pub hidden_layers: usize,
    /// Reclaim jobs queued (format 2): 0 once deleted snapshots' space is all reclaimed.
    pub reclaim_jobs: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning means another thread panicked mid-update of plain in-memory state; the
    // durable state is in the store, and the data structures here are updated only after
    // a successful commit, so continuing is no worse than the panic itself.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    pub(crate) fn tree_read(&self) -> RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn tree_write(&self) -> RwLockWriteGuard<'_, Tree> {
        self.tree.write().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn resize_guard(&self) -> MutexGuard<'_, ()> {
        lock(&self.resize_lock)
    }
    pub(crate) fn alloc_lock(&self) -> MutexGuard<'_, Allocator> {
        lock(&self.alloc)
    }
    /// Pins the current sync generation for a reader (see pins.rs).
    pub(crate) fn pin_read(&self) -> pins::ReadPin<'_> {
        self.pins.pin(&self.generation)
    }

    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }
    pub fn device(&self) -> &Arc<dyn DataDevice> {
        &self.dev
    }
    pub fn uuid(&self) -> &str {
        &self.sup.pool_uuid
    }
    pub fn data_blocks(&self) -> u64 {
        self.sup.data_blocks
    }
    pub(crate) fn block_offset(&self, pba: u64) -> u64 {
        self.sup.data_start + pba * BLOCK_SIZE_U64
    }
    /// The generation that frees committed now are tagged with.
    pub(crate) fn current_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
    pub(crate) fn mark_data_dirty(&self) {
        self.data_dirty.store(true, Ordering::Release);
    }

    /// `fdatasync`s the data device if anything was written since the last time. Every
    /// data write that completed before this call is durable when it returns: the flag
    /// is cleared only under `device_sync`, held until the `fdatasync` that covers the
    /// writes it stood for has returned (a concurrent caller that sees it clear waits
    /// here for that `fdatasync`, instead of returning while it is still running).
    pub(crate) fn sync_device(&self) -> Result<()> {
        let _covering = lock(&self.device_sync);
        if self.data_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.dev.sync() {
                self.mark_data_dirty();
                return Err(Error::device("sync", e));
            }
        }
        Ok(())
    }

    pub(crate) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Makes every acknowledged write durable (data device, then metadata) and returns the
    /// blocks freed before this call to the allocator, except those a reader that is still
    /// running may be reading (pins.rs); those wait for a later sync.
    pub fn sync(&self) -> Result<()> {
        let _serial = lock(&self.sync_lock);
        self.dirty.store(false, Ordering::Release);
        let g = self.generation.fetch_add(1, Ordering::AcqRel);
        let r = self.sync_device().and_then(|()| {
            crate::failpoint!("sync.before_store_sync");
            Ok(self.store.sync()?)
        });
        if let Err(e) = r {
            self.mark_dirty();
            return Err(e);
        }
        crate::failpoint!("sync.before_release");
        let through = self.pins.release_bound(g);
        if let Some(t) = through {
            self.alloc_lock().release_through(t);
        }
        if through != Some(g) && self.alloc_lock().pending() > 0 {
            // Frees held back for a running reader: the background sync comes back for them.
            self.mark_dirty();
        }
        Ok(())
    }

    pub fn info(&self) -> PoolInfo {
        let tree = self.tree_read();
        let (free, pending) = {
            let a = self.alloc_lock();
            (a.free(), a.pending())
        };
        let referenced: std::collections::BTreeSet<_> = tree
            .volumes
            .values()
            .map(|v| v.head)
            .chain(tree.snapshots.values().map(|s| s.layer))
            .collect();
        PoolInfo {
            uuid: self.sup.pool_uuid.clone(),
            format_version: self.sup.format_version,
            block_size: BLOCK_SIZE_U64,
            capacity: self.sup.data_blocks * BLOCK_SIZE_U64,
            used: (self.sup.data_blocks - free) * BLOCK_SIZE_U64,
            free: free * BLOCK_SIZE_U64,
            pending_free: pending * BLOCK_SIZE_U64,
            metadata_size: self.store.size_on_disk(),
            volumes: tree.volumes.len(),
            snapshots: tree.snapshots.len(),
            reclaim_jobs: 0,
            hidden_layers: tree
                .layers
                .keys()
                .filter(|l| !referenced.contains(l))
                .count(),
        }
    }

    /// Registers an open export of `target` (NBD connection, ublk device); volumes and
    /// snapshots with open exports cannot be deleted.
    /// Checks that `t` exists and registers it as open, atomically with respect to deletes
    /// (which check the open count under the tree write lock).
    #[allow(dead_code)] // the format-1 pool is no longer exported (only read by upgrade)
    pub(crate) fn register_open(&self, t: &Target) -> Result<()> {
        let tree = self.tree_read();
        io::target_layer(&tree, t)?;
        *lock(&self.open_targets).entry(t.clone()).or_insert(0) += 1;
        Ok(())
    }
    #[allow(dead_code)]
    pub(crate) fn unregister_open(&self, t: &Target) {
        let mut m = lock(&self.open_targets);
        if let Some(n) = m.get_mut(t) {
            *n -= 1;
            if *n == 0 {
                m.remove(t);
            }
        }
    }
    pub(crate) fn open_count(&self, pred: impl Fn(&Target) -> bool) -> usize {
        lock(&self.open_targets)
            .iter()
            .filter(|(t, _)| pred(t))
            .map(|(_, n)| *n)
            .sum()
    }

    /// Starts the background thread: reclaim of unreferenced layers and a sync every
    /// second when something changed.
    pub fn start_background(self: &Arc<Self>) {
        let me = Arc::clone(self);
        let h = std::thread::Builder::new()
            .name("snapblk-bg".into())
            .spawn(move || me.background_loop());
        match h {
            Ok(h) => *lock(&self.background) = Some(h),
            Err(e) => log::error!("cannot start background thread: {e}"),
        }
    }

    fn background_loop(&self) {
        let mut steps = 0u64;
        while !self.shutdown.load(Ordering::Acquire) {
            match self.reclaim_step() {
                Ok(true) => {
                    // Return reclaimed space regularly instead of piling up pending frees.
                    steps += 1;
                    if steps.is_multiple_of(RECLAIM_SYNC_EVERY) {
                        if let Err(e) = self.sync() {
                            log::error!("sync during reclaim: {e}");
                        }
                    }
                    continue;
                }
                Ok(false) => {}
                Err(e) => log::error!("reclaim: {e}"),
            }
            if self.dirty.load(Ordering::Acquire) {
                if let Err(e) = self.sync() {
                    log::error!("periodic sync: {e}");
                }
            }
            let (m, cv) = &self.wake;
            let mut woken = lock(m);
            if !*woken {
                woken = cv
                    .wait_timeout(woken, Duration::from_secs(1))
                    .map(|r| r.0)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            *woken = false;
        }
    }

    pub(crate) fn wake_background(&self) {
        let (m, cv) = &self.wake;
        *lock(m) = true;
        cv.notify_all();
    }

    /// Runs reclaim until nothing is left (tests, `pool check` callers that want a settled
    /// pool).
    pub fn reclaim_all(&self) -> Result<()> {
        let mut steps = 0u64;
        while self.reclaim_step()? {
            steps += 1;
            if steps.is_multiple_of(RECLAIM_SYNC_EVERY) {
                self.sync()?;
            }
        }
        Ok(())
    }

    /// Stops the background thread and makes everything durable.
    pub fn shutdown(&self) -> Result<()> {
        self.shutdown.store(true, Ordering::Release);
        self.wake_background();
        if let Some(h) = lock(&self.background).take() {
            let _ = h.join();
        }
        self.sync()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
    }
}
