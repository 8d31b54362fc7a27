//! Readers: one RocksDB iterator serving a request's gets and scans, kept for the next
//! request and refreshed instead of created again.
//!
//! Why: a read of a snapshot or of a clone scans a page's dead records (format2.md §8a).
//! Creating an iterator per scan (a merging iterator over the memtables and every level)
//! was most of such a read's metadata time; `Iterator::Refresh` on a kept one only moves
//! its sequence number while the memtables and table files are the same ("super
//! version"), and rebuilds it when they changed.
//!
//! Invariants:
//! * A reader reads one consistent state, taken when it was handed out (a refresh reads
//!   the latest published sequence: every batch committed before it is seen), like a
//!   [`MetaStore::view`](snapblk_core::MetaStore::view).
//! * A kept iterator pins the state of its last refresh (memtables, table files); the pool
//!   holds at most [`MAX_KEPT`], and lets go of those idle for [`IDLE`] whenever a reader
//!   is taken and when the pool's background thread calls `tidy` (every half second), so
//!   an idle daemon holds none after about 1.5 s.
//! * Every iterator is dropped before the database: the pool is a field of `RocksStore`
//!   declared before `db`, and a reader borrows the store.
//! * Cost: a reader's `get` is a seek (no bloom filter), and a scan that reaches the end of
//!   its range steps on to the next live key, past any deletions not yet compacted there
//!   (a bounded iterator would stop at the bound); both are paid per request instead of
//!   building an iterator per page.
//!
//! Threading: the pool is a mutex held only to push or pop (iterators are dropped after it
//! is released: dropping the last one of an old state frees memtables and files inline);
//! a reader is used by the thread that took it, and a visitor calling back into the reader
//! it scans gets an error (the iterator is in use), never a deadlock.

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rocksdb::{DBRawIteratorWithThreadMode, ReadOptions, DB};
use snapblk_core::meta::{MetaRead, ScanVisitor};
use snapblk_core::StoreError;

use super::{err, RocksStore};

/// Iterators kept at most: about one per thread serving requests at once.
const MAX_KEPT: usize = 8;
/// A kept iterator unused for this long is dropped rather than refreshed.
const IDLE: Duration = Duration::from_secs(1);

type Iter = DBRawIteratorWithThreadMode<'static, DB>;

/// An iterator waiting in the pool, and when it was last given back.
pub(crate) struct Kept {
    it: Iter,
    used: Instant,
}

/// A consistent state of the store for a few short reads; gives its iterator back to the
/// pool when dropped.
pub(crate) struct Reader<'a> {
    store: &'a RocksStore,
    it: Mutex<Option<Iter>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RocksStore {
    /// A reader on a kept iterator (refreshed) or a new one.
    pub(crate) fn take_reader(&self) -> Result<Reader<'_>, StoreError> {
        let (kept, idle) = {
            let mut pool = lock(&self.kept);
            let idle = take_idle(&mut pool);
            (pool.pop(), idle)
        };
        drop(idle);
        let it = match kept {
            Some(mut k) => {
                k.it.refresh().map_err(err)?;
                k.it
            }
            None => {
                let it = self.db.raw_iterator_opt(ReadOptions::default());
                // SAFETY: the iterator's lifetime only ties it to `self.db` (a marker; it
                // holds no Rust reference into `DB`, which may move). It is used by a
                // `Reader<'_>` borrowing `self`, or kept in `self.kept`, which is declared
                // before `db` in `RocksStore` and so dropped before the database closes.
                unsafe { std::mem::transmute::<DBRawIteratorWithThreadMode<'_, DB>, Iter>(it) }
            }
        };
        Ok(Reader {
            store: self,
            it: Mutex::new(Some(it)),
        })
    }

    /// Lets go of kept iterators idle for [`IDLE`] (they pin old memtables and files).
    pub(crate) fn drop_idle_readers(&self) {
        let idle = take_idle(&mut lock(&self.kept));
        drop(idle);
    }

    /// Drops every iterator kept and not in use now (before a compaction).
    pub(crate) fn drop_kept_readers(&self) {
        let kept = std::mem::take(&mut *lock(&self.kept));
        drop(kept);
    }

    /// Iterators kept for readers now (tests).
    pub fn kept_readers(&self) -> usize {
        lock(&self.kept).len()
    }
}

/// Removes the idle iterators from the pool, for the caller to drop once it is unlocked.
fn take_idle(pool: &mut Vec<Kept>) -> Vec<Kept> {
    // Called on every reader taken: no allocation unless something is idle.
    if !pool.iter().any(|k| k.used.elapsed() >= IDLE) {
        return Vec::new();
    }
    let (idle, busy): (Vec<Kept>, Vec<Kept>) =
        pool.drain(..).partition(|k| k.used.elapsed() >= IDLE);
    *pool = busy;
    idle
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        let Some(it) = lock(&self.it).take() else {
            return;
        };
        let mut pool = lock(&self.store.kept);
        if pool.len() < MAX_KEPT {
            pool.push(Kept {
                it,
                used: Instant::now(),
            });
        } else {
            drop(pool);
            drop(it);
        }
    }
}

impl Reader<'_> {
    fn with<R>(&self, f: impl FnOnce(&mut Iter) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let mut g = match self.it.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(StoreError::Backend(
                    "a store reader was used from inside its own scan".into(),
                ))
            }
        };
        let it = g
            .as_mut()
            .ok_or_else(|| StoreError::Backend("reader used after it was given back".into()))?;
        f(it)
    }
}

impl MetaRead for Reader<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|it| {
            it.seek(key);
            match (it.key(), it.value()) {
                (Some(k), Some(v)) if k == key => Ok(Some(v.to_vec())),
                _ => it.status().map(|()| None).map_err(err),
            }
        })
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        self.with(|it| {
            it.seek(from);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if k >= to || visit(k, v) == ControlFlow::Break(()) {
                    return Ok(());
                }
                it.next();
            }
            it.status().map_err(err)
        })
    }
}
