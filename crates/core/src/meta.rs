//! The metadata-store abstraction: an ordered byte-key store with atomic batches.
//!
//! Invariants every implementation keeps (checked by `tests/store_conformance.rs`):
//! * a committed batch is visible as a whole to every later `get`/`scan`, never in part;
//! * `scan` yields keys in ascending byte order within `[from, to)`;
//! * after `sync` returns, every batch committed before `sync` was called survives a crash
//!   (a batch committed with `durable = true` survives once `commit` returns).
//!
//! Threading: implementations are `Send + Sync`; callers may commit from many threads.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Mutex;

use crate::error::StoreError;

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
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
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// Visitor for [`MetaStore::scan`]: return `ControlFlow::Break(())` to stop early.
pub type ScanVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

pub trait MetaStore: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Visits every key in `[from, to)` in ascending order.
    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError>;
    /// Applies `batch` atomically; with `durable`, it is on stable storage when this returns.
    fn commit(&self, batch: WriteBatch, durable: bool) -> Result<(), StoreError>;
    /// Makes every batch committed so far durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// Approximate bytes the store occupies on disk (0 for memory stores).
    fn size_on_disk(&self) -> u64;
}

/// In-memory store for tests and models. A clone of an `Arc<MemStore>` "reopens" it.
#[derive(Default)]
pub struct MemStore {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
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
        let map = self.lock();
        for (k, v) in map.range(from.to_vec()..to.to_vec()) {
            if visit(k, v).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn commit(&self, batch: WriteBatch, _durable: bool) -> Result<(), StoreError> {
        let mut map = self.lock();
        for op in batch.ops {
            match op {
                BatchOp::Put(k, v) => {
                    map.insert(k, v);
                }
                BatchOp::Delete(k) => {
                    map.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        0
    }
}
