//! The pool on metadata format 2 (docs/format2.md): the same services as [`crate::Pool`] —
//! volumes, snapshots, clones, rollback, reads and writes with per-block checksums — with
//! snapshot-independent I/O cost, O(change) snapshot delete, extents and a persisted
//! allocator. Under construction (format2.md §11 step 3-4): not yet used by the frontends.
//!
//! Threading (format2.md §4.2):
//! * the committer thread (committer.rs) is the only metadata writer; callers block on
//!   their Txn;
//! * `catalog` (RwLock): readers resolve a target (µs); the committer writes after a
//!   commit (µs); nobody holds it across I/O;
//! * `mgmt` (Mutex): one management operation at a time, including its wait for the
//!   committer;
//! * `alloc`, `pins`: µs, never across I/O; `sync_lock`, `device_sync`: one sync at a time.
//! * `stripes`: a sub-block write holds its edge blocks' stripes across its read-modify-write.

mod committer;
mod consolidate;
mod inspect;
mod io;
mod plan;
mod records;
mod space;
mod sums;
pub use plan::{WritePlan, WriteThen};
pub use space::SpaceRelief;
mod ops;

pub mod catalog;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::alloc::Allocator;
use crate::device::{DataDevice, DeviceHeader, BLOCK_SIZE, BLOCK_SIZE_U64, DATA_START};
use crate::error::{Error, Result};
use crate::keys::{self, SuperRecord};
use crate::meta::{MetaStore, WriteBatch};
use crate::pool::ReadPin;
use crate::v2::cache::{CacheStats, ContentCache};
use crate::v2::Meta2;

use catalog::Catalog;
use committer::Shared;

pub use crate::pool::Target;

/// Checksum consolidation counters ([`Pool2::checksum_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SumStats {
    /// Checksum blocks written and named by the map.
    pub blocks_written: u64,
    /// Data blocks whose CRCs moved into them.
    pub blocks_moved: u64,
    /// Blocks of large writes left inline because the queue was full.
    pub offers_dropped: u64,
    /// Checksum blocks read from the device (cache misses).
    pub loads: u64,
    /// Blocks sweeps over the live pages offered (inline pieces found), and passes done.
    pub swept: u64,
    pub sweeps: u64,
}

/// The superblock and device-header version of format 2.
pub const FORMAT2: u32 = 2;
const STRIPES: usize = 1024;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning means another thread panicked mid-update of plain in-memory state; the
    // durable state is in the store, so continuing is no worse than the panic itself.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Pool2 {
    store: Arc<dyn MetaStore>,
    dev: Arc<dyn DataDevice>,
    sup: SuperRecord,
    catalog: RwLock<Catalog>,
    committer: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    mgmt: Mutex<()>,
    alloc: Arc<Mutex<Allocator>>,
    pins: crate::pool::PinTable,
    generation: AtomicU64,
    sync_lock: Mutex<()>,
    device_sync: Mutex<()>,
    /// Incremented when a device fdatasync *starts* (under `device_sync`): a write whose
    /// data completed when the counter read `c` is covered by every sync numbered > `c`.
    sync_starts: AtomicU64,
    data_dirty: AtomicBool,
    dirty: AtomicBool,
    stripes: Vec<Mutex<()>>,
    open_targets: Mutex<std::collections::HashMap<Target, usize>>,
    shutdown: AtomicBool,
    /// Wakes the sync thread (shared with it, so it waits without holding the pool).
    wake: Arc<(Mutex<bool>, Condvar)>,
    /// Owned blocks per lineage, quota reservations, the relief hook (space.rs).
    usage: Mutex<space::Usage>,
    /// Page contents at retained epochs, as reads resolved them (v2/cache.rs).
    contents: ContentCache,
    /// Checksum blocks (format2.md §9b), for every reader of the map.
    sums: Arc<sums::DeviceSums>,
    /// Checksum consolidation's queue; `None` when off.
    consolidator: Option<Arc<consolidate::Consolidator>>,
}

/// Engine settings of an open pool. The defaults are what the daemon uses; tests make
/// read checkpoints frequent so that model and power-loss runs exercise them.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Dead records a page gains between read checkpoints (format2.md §8a); 0: none.
    pub checkpoint_every: u64,
    /// Bytes of page contents at retained epochs kept in RAM (format2.md §8b); 0: none.
    pub content_cache: usize,
    /// Move the CRCs of large writes into checksum blocks (format2.md §9b) once this many
    /// are queued (1..=1024; a partly filled block after a second without offers); `None`:
    /// keep them inline. Tests use small values so that blocks are written often.
    pub consolidate: Option<u64>,
}

/// [`OpenOptions::content_cache`] of a daemon: ~150,000 sequentially written pages, the
/// map of ~35 GiB of snapshot or clone base data.
pub const CONTENT_CACHE: usize = 64 << 20;

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            checkpoint_every: crate::v2::CHECKPOINT_EVERY,
            content_cache: CONTENT_CACHE,
            consolidate: Some(crate::v2::piece::SUM_SLOTS as u64),
        }
    }
}

impl Pool2 {
    /// Formats an empty store and a data device as a new format-2 pool; returns its uuid.
    pub fn format(store: &dyn MetaStore, dev: &dyn DataDevice) -> Result<String> {
        if store.get(&keys::super_key())?.is_some() {
            return Err(Error::exists(
                "pool",
                "metadata directory already holds a pool",
            ));
        }
        let len = dev.len();
        if len < DATA_START + 16 * BLOCK_SIZE_U64 {
            return Err(Error::invalid(
                "data device size",
                format!("{len} bytes is too small"),
            ));
        }
        let uuid = uuid::Uuid::new_v4();
        let header = DeviceHeader {
            format_version: FORMAT2,
            block_size: BLOCK_SIZE as u32,
            pool_uuid: *uuid.as_bytes(),
            data_start: DATA_START,
            size_at_format: len,
        };
        crate::identity::write_header(dev, &header)?;
        Meta2::format(store)?;
        let sup = SuperRecord {
            format_version: FORMAT2,
            pool_uuid: uuid.to_string(),
            block_size: BLOCK_SIZE as u32,
            data_start: DATA_START,
            data_blocks: (len - DATA_START) / BLOCK_SIZE_U64,
            created: keys::now_secs(),
        };
        let mut b = WriteBatch::new();
        b.put(keys::super_key(), keys::encode_record(&sup));
        crate::failpoint!("format2.before_commit");
        store.commit(b, true)?;
        Ok(sup.pool_uuid)
    }

    fn check_identity(store: &dyn MetaStore, dev: &dyn DataDevice) -> Result<SuperRecord> {
        crate::identity::check(store, dev, FORMAT2)
    }

    /// Opens a format-2 pool: reads lineages, catalog, jobs and allocation regions (no map
    /// scan) and starts the committer. Reclaim runs every 8th group and on `reclaim_all`
    /// until `start_background` adds idle reclaim and a sync every half second.
    pub fn open(store: Arc<dyn MetaStore>, dev: Arc<dyn DataDevice>) -> Result<Arc<Pool2>> {
        Self::open_with(store, dev, &OpenOptions::default())
    }

    /// [`Pool2::open`] with engine settings other than the defaults (the daemon's cache
    /// size, tests).
    pub fn open_with(
        store: Arc<dyn MetaStore>,
        dev: Arc<dyn DataDevice>,
        opts: &OpenOptions,
    ) -> Result<Arc<Pool2>> {
        let sup = Self::check_identity(&*store, &*dev)?;
        let sums = Arc::new(sums::DeviceSums::new(
            Arc::clone(&dev),
            sup.data_start,
            sup.data_blocks,
        ));
        let mut meta = Meta2::open(Arc::clone(&store), sup.data_blocks, sums.clone())?;
        meta.set_checkpoint_every(opts.checkpoint_every);
        let catalog = Catalog::load(&*store, meta.lineages())?;
        let mut alloc = Allocator::new(sup.data_blocks);
        for pba in meta.regions().iter_set() {
            alloc.mark_used(pba);
        }
        let usage = space::Usage {
            owned: meta.lineages().values().map(|l| (l.id, l.owned)).collect(),
            ..Default::default()
        };
        // The store tier of the content cache serves only once its entries of epochs not
        // retained now are gone (v2/cache.rs): if that sweep fails, they are forgotten
        // (for later opens too) and this pool keeps contents in RAM only.
        let mut contents = ContentCache::with_store(opts.content_cache, Some(Arc::clone(&store)));
        let retained = |l, e| {
            meta.lineages()
                .get(&l)
                .is_some_and(|lin| lin.retained.contains(e))
        };
        match contents.sweep(&retained) {
            Ok(0) => {}
            Ok(n) => log::info!("dropped the kept snapshot contents of {n} epochs not retained"),
            Err(e) => {
                log::warn!("not using the kept snapshot contents: sweeping them failed: {e}");
                contents.forget_stored();
            }
        }
        let pool = Arc::new(Pool2 {
            store,
            dev,
            sup,
            catalog: RwLock::new(catalog),
            committer: Arc::new(Shared::default()),
            threads: Mutex::new(Vec::new()),
            mgmt: Mutex::new(()),
            alloc: Arc::new(Mutex::new(alloc)),
            pins: Default::default(),
            generation: AtomicU64::new(1),
            sync_lock: Mutex::new(()),
            device_sync: Mutex::new(()),
            sync_starts: AtomicU64::new(0),
            data_dirty: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            open_targets: Mutex::new(Default::default()),
            shutdown: AtomicBool::new(false),
            wake: Arc::new((Mutex::new(false), Condvar::new())),
            usage: Mutex::new(usage),
            contents,
            sums,
            consolidator: opts
                .consolidate
                .map(|fill| Arc::new(consolidate::Consolidator::new(fill))),
        });
        let weak = Arc::downgrade(&pool);
        let shared = Arc::clone(&pool.committer);
        let c = std::thread::Builder::new()
            .name("snapblk-commit".into())
            .spawn(move || committer::run(weak, shared, meta))
            .map_err(|e| Error::device("starting the committer thread", e))?;
        let weak = Arc::downgrade(&pool);
        let wake = Arc::clone(&pool.wake);
        let shared = Arc::clone(&pool.committer);
        let b = std::thread::Builder::new()
            .name("snapblk-sync".into())
            .spawn(move || background(weak, shared, wake))
            .map_err(|e| Error::device("starting the sync thread", e))?;
        let mut threads = vec![c, b];
        if let Some(work) = &pool.consolidator {
            let w = consolidate::Worker::new(&pool, Arc::clone(work));
            threads.push(
                std::thread::Builder::new()
                    .name("snapblk-csum".into())
                    .spawn(move || w.run())
                    .map_err(|e| Error::device("starting the checksum thread", e))?,
            );
        }
        *lock(&pool.threads) = threads;
        Ok(pool)
    }

    /// Starts idle reclaim in the committer and the periodic sync (the daemon does this).
    pub fn start_background(&self) {
        self.committer.background.store(true, Ordering::Release);
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
    /// What checksum consolidation did so far (format2.md §9b).
    pub fn checksum_stats(&self) -> SumStats {
        let mut stats = SumStats {
            loads: self.sums.loads(),
            ..SumStats::default()
        };
        if let Some(c) = &self.consolidator {
            stats.blocks_written = c.blocks_written.load(Ordering::Relaxed);
            stats.blocks_moved = c.blocks_moved.load(Ordering::Relaxed);
            stats.offers_dropped = c.dropped.load(Ordering::Relaxed);
            stats.swept = c.swept.load(Ordering::Relaxed);
            stats.sweeps = c.sweeps.load(Ordering::Relaxed);
        }
        stats
    }
    /// What the cache of page contents at retained epochs holds and how it served reads.
    pub fn content_cache_stats(&self) -> CacheStats {
        self.contents.stats()
    }
    pub(crate) fn catalog_read(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn catalog_write(&self) -> RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn block_offset(&self, pba: u64) -> u64 {
        self.sup
            .data_start
            .saturating_add(pba.saturating_mul(BLOCK_SIZE_U64))
    }
    pub(crate) fn free_blocks(&self) -> u64 {
        lock(&self.alloc).free()
    }
    pub(crate) fn pin_read(&self) -> ReadPin<'_> {
        self.pins.pin(&self.generation)
    }
    pub(crate) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }
    pub(crate) fn defer_frees(&self, runs: &[(u64, u64)]) {
        if runs.is_empty() {
            return;
        }
        let g = self.generation.load(Ordering::Acquire);
        let mut a = lock(&self.alloc);
        for &(pba, len) in runs {
            for b in pba..pba + len {
                a.free_deferred(g, b);
            }
        }
    }

    /// `fdatasync`s the data device if anything was written since the last one; returns
    /// the number of this sync (see `sync_starts`).
    pub(crate) fn sync_device(&self) -> Result<u64> {
        let _covering = lock(&self.device_sync);
        let n = self.sync_starts.fetch_add(1, Ordering::SeqCst) + 1;
        if self.data_dirty.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.dev.sync() {
                self.data_dirty.store(true, Ordering::SeqCst);
                return Err(Error::device("sync", e));
            }
        }
        Ok(n)
    }

    /// Makes every acknowledged write durable (data device, then metadata) and returns
    /// frees older than every running reader to the allocator.
    pub fn sync(&self) -> Result<()> {
        let _serial = lock(&self.sync_lock);
        self.dirty.store(false, Ordering::Release);
        let g = self.generation.fetch_add(1, Ordering::AcqRel);
        let r = self.sync_device().and_then(|_| Ok(self.store.sync()?));
        if let Err(e) = r {
            self.mark_dirty();
            return Err(e);
        }
        let through = self.pins.release_bound(g);
        let mut a = lock(&self.alloc);
        if let Some(t) = through {
            a.release_through(t);
        }
        if through != Some(g) && a.pending() > 0 {
            self.mark_dirty();
        }
        Ok(())
    }

    /// Stops the committer and the sync thread and makes everything durable.
    pub fn shutdown(&self) -> Result<()> {
        self.stop_threads();
        self.sync()
    }

    /// Tells the threads to stop and joins them (not the calling thread, if it is one).
    fn stop_threads(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.committer.shutdown();
        if let Some(c) = &self.consolidator {
            c.shutdown();
        }
        {
            let (m, cv) = &*self.wake;
            *lock(m) = true;
            cv.notify_all();
        }
        let me = std::thread::current().id();
        for h in lock(&self.threads).drain(..) {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

/// Syncs every half second when something changed, returning pending frees to the
/// allocator, and lets the store tidy what it keeps. Takes the pool only to sync (periodic sync on), never while it waits or idles.
fn background(
    pool: std::sync::Weak<Pool2>,
    shared: Arc<Shared>,
    wake: Arc<(Mutex<bool>, Condvar)>,
) {
    loop {
        if shared.is_shutdown() {
            return;
        }
        if shared.background_on() {
            let Some(p) = pool.upgrade() else { return };
            if p.dirty.load(Ordering::Acquire) {
                if let Err(e) = p.sync() {
                    log::error!("periodic sync: {e}");
                }
            }
            p.store.tidy();
        }
        let (m, cv) = &*wake;
        let mut woken = lock(m);
        if !*woken {
            woken = cv
                .wait_timeout(woken, Duration::from_millis(500))
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *woken = false;
    }
}

impl Drop for Pool2 {
    fn drop(&mut self) {
        self.stop_threads();
    }
}
