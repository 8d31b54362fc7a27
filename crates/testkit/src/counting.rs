//! A memory store that counts what it is asked to do (batch operations, gets, scans) and
//! can be slowed down, for tests of what an operation costs and of what runs while a long
//! scan does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapblk_core::meta::{MetaRead, ScanVisitor, WriteBatch};
use snapblk_core::{MemStore, MetaStore, StoreError};

/// A MemStore that counts the operations of every committed batch; with `slow` set, its
/// scans (and its views' scans) take 1 ms per 64 keys and raise `scanning` meanwhile.
#[derive(Default)]
pub struct CountingStore {
    inner: MemStore,
    /// Operations of committed batches.
    pub ops: AtomicU64,
    /// Point reads (`get`, on the store or a view).
    pub gets: AtomicU64,
    /// Scans started (each one a seek).
    pub scans: AtomicU64,
    /// Entries scans visited (each one a `next`).
    pub nexts: AtomicU64,
    pub slow: AtomicBool,
    pub scanning: AtomicBool,
}

impl CountingStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn slow_scan(
        &self,
        read: &dyn MetaRead,
        from: &[u8],
        to: &[u8],
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), StoreError> {
        self.scans.fetch_add(1, Ordering::SeqCst);
        if !self.slow.load(Ordering::SeqCst) {
            return read.scan(from, to, &mut |k, v| {
                self.nexts.fetch_add(1, Ordering::Relaxed);
                visit(k, v)
            });
        }
        self.scanning.store(true, Ordering::SeqCst);
        let mut n = 0u64;
        let r = read.scan(from, to, &mut |k, v| {
            n += 1;
            self.nexts.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(64) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            visit(k, v)
        });
        self.scanning.store(false, Ordering::SeqCst);
        r
    }
}

/// A view of a `CountingStore` (slow like it).
struct CountingView<'a> {
    store: &'a CountingStore,
    inner: Box<dyn MetaRead + 'a>,
}

impl MetaRead for CountingView<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key)
    }
    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        self.store.slow_scan(&*self.inner, from, to, visit)
    }
}

impl MetaStore for CountingStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        MetaStore::get(&self.inner, key)
    }
    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        self.slow_scan(&self.inner, from, to, visit)
    }
    fn view(&self) -> Result<Box<dyn MetaRead + '_>, StoreError> {
        Ok(Box::new(CountingView {
            store: self,
            inner: self.inner.view()?,
        }))
    }
    fn commit(&self, batch: WriteBatch, durable: bool) -> Result<(), StoreError> {
        self.ops.fetch_add(batch.len() as u64, Ordering::SeqCst);
        self.inner.commit(batch, durable)
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.inner.sync()
    }
    fn size_on_disk(&self) -> u64 {
        0
    }
}
