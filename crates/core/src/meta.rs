//! The metadata-store abstraction: an ordered byte-key store with atomic batches.
//!
//! Invariants every implementation keeps (checked by `snapblk_testkit::conformance`):
//! * a committed batch is visible as a whole to every later `get`/`scan`, never in part;
//! * `scan` yields keys in ascending byte order within `[from, to)`;
//! * a `view` sees the store as it was when the view was taken, whatever is committed
//!   after (so a long scan on a view is consistent without holding writers off);
//! * `DeleteRange(from, to)` removes every key in `[from, to)`, in batch order with the
//!   batch's other operations;
//! * after `sync` returns, every batch committed before `sync` was called survives a crash
//!   (a batch committed with `durable = true` survives once `commit` returns).
//!
//! Threading: implementations are `Send + Sync`; callers may commit from many threads.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use crate::error::StoreError;

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Every key in `[from, to)`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// An atomic group of puts and deletes, applied in order.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Put(key.into(), value.into()));
    }
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::Delete(key.into()));
    }
    /// Deletes every key in `[from, to)` (one range tombstone on RocksDB).
    pub fn delete_range(&mut self, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push(BatchOp::DeleteRange(from.into(), to.into()));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// Visitor for [`MetaStore::scan`]: return `ControlFlow::Break(())` to stop early.
pub type ScanVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

thread_local! {
    static BULK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's store reads marked *bulk*: a one-pass read of much data
/// (a backup reading a whole snapshot; scrub's data reads) whose blocks a store should not keep in its
/// caches (RocksDB: `fill_cache(false)`), so it neither evicts the live volumes' working
/// set nor grows the process with the volume it reads. The data device reads such data
/// around the host page cache too (`device::uring`). A hint: stores may ignore it.
pub fn bulk_reads<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            BULK.with(|b| b.set(self.0));
        }
    }
    let _restore = Restore(BULK.with(|b| b.replace(true)));
    f()
}

/// Whether this thread's reads are bulk ([`bulk_reads`]).
pub fn is_bulk() -> bool {
    BULK.with(|b| b.get())
}

/// Reads of one point in time (a [`MetaStore::view`]).
pub trait MetaRead: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Visits every key in `[from, to)` in ascending order.
    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError>;
    /// A `get` whose answer may come from a state *older* than later reads through this
    /// view see, never a newer one (a [`LazyReader`] not taken yet answers from the
    /// store's plain, bloom-filtered `get` and takes its state afterwards). For readers
    /// that need "read X, then read Y from a state no older" rather than one state; a
    /// view already fixed must answer from its own state. Default: [`MetaRead::get`].
    fn get_leading(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(key)
    }
}

pub trait MetaStore: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Visits every key in `[from, to)` in ascending order.
    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError>;
    /// A read-only view of the store as of now: batches committed later are not visible in
    /// it. Cheap to take; hold it only as long as a scan needs (RocksDB keeps the versions
    /// it sees from compaction meanwhile).
    fn view(&self) -> Result<Box<dyn MetaRead + '_>, StoreError>;
    /// A view of the store as of now, like [`MetaStore::view`], for a few short reads (one
    /// request's pages): a store may hand out one it kept from an earlier call, brought up
    /// to date (RocksDB: a kept iterator refreshed, far cheaper than a new one per scan).
    /// Its answers are one consistent state that includes every batch committed before the
    /// call; drop it soon. A reader is for one thread, and a scan's visitor must not call
    /// back into the reader it scans (RocksDB's answers such a call with an error).
    /// Default: [`MetaStore::view`].
    fn reader(&self) -> Result<Box<dyn MetaRead + '_>, StoreError> {
        self.view()
    }
    /// Lets go of what the store keeps for reuse and no longer needs (RocksDB: readers'
    /// iterators idle for a second, which pin old memtables and table files). A daemon's
    /// pool calls it about every half second (its background thread); a pool opened by one
    /// command keeps them until its next `reader()` or until it closes.
    fn tidy(&self) {}
    /// Applies `batch` atomically; with `durable`, it is on stable storage when this returns.
    fn commit(&self, batch: WriteBatch, durable: bool) -> Result<(), StoreError>;
    /// Makes every batch committed so far durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// Approximate bytes the store occupies on disk (0 for memory stores).
    fn size_on_disk(&self) -> u64;
    /// Rewrites the store's files so they hold only live entries (RocksDB: the memtables
    /// flushed, then every level compacted into the last): what `size_on_disk` reports
    /// afterwards is what the pool's metadata takes, without old versions and deletions
    /// waiting for a background compaction. Takes time and I/O proportional to the store;
    /// reads and commits go on meanwhile. Default: nothing to do.
    fn compact(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Approximate bytes the store holds in RAM for its write buffers and caches (bounded
    /// by its configuration; 0 when it does not say).
    fn memory(&self) -> u64 {
        0
    }

    /// Whether the store keeps *derived* entries: a second key space, apart from the
    /// batches, for what callers can compute again from the map (format2.md §8c: page
    /// contents at retained epochs). Its contract is a cache's: a `derived_put` is not in
    /// any batch nor ordered with them, may be lost at a crash, and any entry may vanish
    /// at any time (the store bounds the space by dropping old entries); an entry never
    /// changes by itself. Default: none kept.
    fn derived(&self) -> bool {
        false
    }
    /// The derived entry under `key`, if the store still has it.
    fn derived_get(&self, _key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }
    /// Keeps `value` under `key` as a derived entry (nothing when derived entries are off).
    fn derived_put(&self, _key: &[u8], _value: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Visits the derived entries in `[from, to)` in ascending key order.
    fn derived_scan(
        &self,
        _from: &[u8],
        _to: &[u8],
        _visit: &mut ScanVisitor<'_>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// Drops every derived entry in each `[from, to)` of `ranges`, for good: no crash
    /// brings them back once this returns.
    fn derived_delete_ranges(&self, _ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Forgets every derived entry, now and for later opens of the store (what a caller
    /// does when it cannot tell which ones are still right). Best effort; logged.
    fn derived_forget(&self) {}
    /// Approximate bytes the derived entries occupy (memory or disk).
    fn derived_size(&self) -> u64 {
        0
    }
}

/// Derived entries kept in memory: by [`MemStore`] and the test stores. Holds at most
/// `cap` entries, dropping the lowest keys past it (the contract lets any entry vanish).
#[derive(Debug)]
pub struct DerivedMap {
    map: Mutex<Map>,
    cap: usize,
}

impl DerivedMap {
    pub fn new(cap: usize) -> Self {
        DerivedMap {
            map: Mutex::new(Map::new()),
            cap,
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Map> {
        // Each operation leaves the map whole; poisoning carries no meaning.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().get(key).cloned()
    }
    pub fn put(&self, key: &[u8], value: &[u8]) {
        let mut m = self.lock();
        m.insert(key.to_vec(), value.to_vec());
        while m.len() > self.cap {
            m.pop_first();
        }
    }
    pub fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) {
        if from >= to {
            return;
        }
        let items: Vec<(Vec<u8>, Vec<u8>)> = self
            .lock()
            .range(from.to_vec()..to.to_vec())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in items {
            if visit(&k, &v).is_break() {
                break;
            }
        }
    }
    pub fn delete_range(&self, from: &[u8], to: &[u8]) {
        if from < to {
            self.lock()
                .retain(|k, _| k.as_slice() < from || k.as_slice() >= to);
        }
    }
    pub fn len(&self) -> usize {
        self.lock().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keeps each entry or drops it as `keep` says (a simulated crash: which entries had
    /// reached the disk).
    pub fn retain(&self, mut keep: impl FnMut() -> bool) {
        self.lock().retain(|_, _| keep());
    }
    pub fn bytes(&self) -> u64 {
        self.lock()
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum()
    }
}

/// A [`MetaStore::reader`] taken at its first use: a request that reads only what the
/// store's plain `get` answers (a volume's own pages) never takes one.
pub struct LazyReader<'a> {
    store: &'a dyn MetaStore,
    reader: std::sync::OnceLock<Box<dyn MetaRead + 'a>>,
}

impl<'a> LazyReader<'a> {
    pub fn new(store: &'a dyn MetaStore) -> Self {
        LazyReader {
            store,
            reader: std::sync::OnceLock::new(),
        }
    }
    fn reader(&self) -> Result<&(dyn MetaRead + 'a), StoreError> {
        if let Some(r) = self.reader.get() {
            return Ok(&**r);
        }
        let r = self.store.reader()?;
        Ok(&**self.reader.get_or_init(|| r))
    }
}

impl MetaRead for LazyReader<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.reader()?.get(key)
    }
    fn get_leading(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.reader.get() {
            Some(r) => r.get(key),
            // The reader, taken at the next read, includes every batch committed before
            // it, so it is at least as new as this answer.
            None => self.store.get(key),
        }
    }
    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        self.reader()?.scan(from, to, visit)
    }
}

/// Visits `[from, to)` with a visitor that may fail: its first error stops the scan and is
/// returned (as is a store error). The one place that carries a visitor's error out.
pub fn try_scan<E: From<StoreError>>(
    store: &(impl MetaRead + ?Sized),
    from: &[u8],
    to: &[u8],
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<ControlFlow<()>, E>,
) -> Result<(), E> {
    let mut err = None;
    store.scan(from, to, &mut |k, v| match visit(k, v) {
        Ok(c) => c,
        Err(e) => {
            err = Some(e);
            ControlFlow::Break(())
        }
    })?;
    err.map_or(Ok(()), Err)
}

/// Every store reads like a view of itself at each call.
impl<T: MetaStore + ?Sized> MetaRead for T {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        MetaStore::get(self, key)
    }
    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        MetaStore::scan(self, from, to, visit)
    }
}

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// Applies `op` to an ordered map (the memory stores and the power-loss simulator).
pub fn apply_op(map: &mut Map, op: BatchOp) {
    match op {
        BatchOp::Put(k, v) => {
            map.insert(k, v);
        }
        BatchOp::Delete(k) => {
            map.remove(&k);
        }
        BatchOp::DeleteRange(from, to) => {
            if from < to {
                let doomed: Vec<Vec<u8>> = map.range(from..to).map(|(k, _)| k.clone()).collect();
                for k in doomed {
                    map.remove(&k);
                }
            }
        }
    }
}

/// A frozen copy of an ordered map, read as a store view.
pub struct MapView(pub Arc<Map>);

impl MetaRead for MapView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.get(key).cloned())
    }
    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        if from < to {
            for (k, v) in self.0.range(from.to_vec()..to.to_vec()) {
                if visit(k, v).is_break() {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// In-memory store for tests and models. A clone of an `Arc<MemStore>` "reopens" it. The
/// map is shared copy-on-write with views: a commit copies it only while a view lives.
pub struct MemStore {
    map: Mutex<Arc<Map>>,
    derived: DerivedMap,
}

/// Derived entries a [`MemStore`] keeps: enough for the tests' pools to hit, few enough
/// that long runs also see entries dropped.
pub const MEM_DERIVED_ENTRIES: usize = 4096;

impl Default for MemStore {
    fn default() -> Self {
        MemStore {
            map: Mutex::default(),
            derived: DerivedMap::new(MEM_DERIVED_ENTRIES),
        }
    }
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<Map>> {
        // A panic while holding this lock can only come from a bug in this file; the map is
        // never left half-updated by the code below, so the poison flag carries no meaning.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MetaStore for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(key).cloned())
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        // The visitor may call back into the store: scan a snapshot of the map.
        let map = Arc::clone(&self.lock());
        MapView(map).scan(from, to, visit)
    }

    fn view(&self) -> Result<Box<dyn MetaRead + '_>, StoreError> {
        Ok(Box::new(MapView(Arc::clone(&self.lock()))))
    }

    fn commit(&self, batch: WriteBatch, _durable: bool) -> Result<(), StoreError> {
        let mut guard = self.lock();
        let map = Arc::make_mut(&mut guard);
        for op in batch.ops {
            apply_op(map, op);
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        0
    }

    fn derived(&self) -> bool {
        true
    }
    fn derived_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.derived.get(key))
    }
    fn derived_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.derived.put(key, value);
        Ok(())
    }
    fn derived_scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), StoreError> {
        self.derived.scan(from, to, visit);
        Ok(())
    }
    fn derived_delete_ranges(&self, ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        for (from, to) in ranges {
            self.derived.delete_range(from, to);
        }
        Ok(())
    }
    fn derived_forget(&self) {
        self.derived.delete_range(&[], &[0xff; 2]);
    }
    fn derived_size(&self) -> u64 {
        self.derived.bytes()
    }
}
