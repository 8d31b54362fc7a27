//! RocksDB implementation of `snapblk_core::MetaStore` (docs/design.md §3).
//!
//! Writes go through the WAL (never disabled): a committed batch survives the death of the
//! process; `sync` (and `durable` commits) fsync the WAL so it survives power loss too.
//! Threading: `rocksdb::DB` is internally synchronised; this type is `Send + Sync`.
//! Readers ([`MetaStore::reader`]) are used by one thread at a time; the iterators they
//! hold are kept in a small pool between uses (`reader.rs`).

mod derived;
mod reader;

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Mutex;

use rocksdb::{BlockBasedOptions, Cache, Options, ReadOptions, WriteOptions, DB};
use snapblk_core::meta::{BatchOp, MetaRead, MetaStore, ScanVisitor, WriteBatch};
use snapblk_core::StoreError;

pub struct RocksStore {
    /// Iterators kept between readers. Declared before `db`, so dropped before it: no
    /// iterator outlives the database it reads.
    kept: Mutex<Vec<reader::Kept>>,
    /// The derived key space (`derived.rs`), when kept. Dropped before `db` (flushed).
    derived: Option<derived::Derived>,
    db: DB,
    dir: std::path::PathBuf,
}

/// A clean close writes the memtables to SST files, so the next open replays no WAL (start
/// time does not depend on what was written before) and the size on disk is what it holds.
impl Drop for RocksStore {
    fn drop(&mut self) {
        if let Err(e) = self.db.flush() {
            log::warn!("flushing the metadata store at close: {e}");
        }
    }
}

fn err(e: rocksdb::Error) -> StoreError {
    StoreError::Backend(e.into_string())
}

/// The RAM a store may hold for writes (each of up to two memtables: one filling, one
/// being flushed) and for reads (the block cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub write_buffer: usize,
    pub block_cache: usize,
    /// Largest table file a compaction writes: while it writes one it holds the hash of
    /// every key of it (for its bloom filter, 8 bytes a key) and the file's index.
    pub table_file: u64,
    /// Disk bytes for derived entries (snapshot contents resolved by reads, format2.md
    /// §8c) in `<db>/derived`; 0: none kept. Its memtable adds up to 32 MiB of RAM.
    pub derived: u64,
}

impl Memory {
    /// A daemon serving volumes for days: batches of many clients share large memtables
    /// (fewer, larger flushes) and hot map blocks stay cached.
    pub const DAEMON: Memory = Memory {
        write_buffer: 64 << 20,
        block_cache: 256 << 20,
        table_file: 64 << 20,
        derived: DERIVED,
    };
    /// One command run on the pool directly (`--meta`/`--data`, no daemon): a job writes
    /// in bulk and exits, and may run on a small host (a rescue restore). Its memtables
    /// flush about every GiB restored, its cache holds 2 MiB and its compactions write
    /// files of at most 2 MiB, so the store's share of a job's memory is reached in the
    /// first GiBs and stays flat. Measured on restores (heaptrack, 4 and 16 GiB): a 32
    /// MiB cache grew with the volume restored (the write path's lookups read back the
    /// new volume's own map blocks, +5 MiB from 4 to 16 GiB), a 4 MiB one still by 1.6
    /// MiB, and compactions into one growing file held 8 bytes per key of the volume's
    /// map for its bloom filter (1.2 MiB at 16 GiB). Sequential one-pass jobs lose
    /// nothing by it.
    pub const ONE_SHOT: Memory = Memory {
        write_buffer: 1 << 20,
        block_cache: 2 << 20,
        table_file: 2 << 20,
        derived: 0,
    };
}

/// A daemon's default [`Memory::derived`]: the contents of ~3.5 million sequentially written
/// snapshot pages (~900 GiB of snapshot data read).
pub const DERIVED: u64 = 1 << 30;

impl RocksStore {
    /// Opens (or with `create`, creates) the store in `dir`, sized for a daemon.
    pub fn open(dir: &Path, create: bool) -> Result<Self, StoreError> {
        RocksStore::open_with(dir, create, Memory::DAEMON)
    }

    /// As [`RocksStore::open`], holding at most `memory` in RAM.
    pub fn open_with(dir: &Path, create: bool, memory: Memory) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(create);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_write_buffer_size(memory.write_buffer);
        opts.set_target_file_size_base(memory.table_file);
        opts.set_max_total_wal_size(256 << 20);
        // After a power cut, recover the WAL up to its first damaged record: a prefix of
        // the committed batches, whole batches only (docs/design.md §5).
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // Point lookups and short range scans over 17-byte map keys: bloom filters on the
        // 9-byte (prefix byte + layer id) prefix would not help range scans, so use a
        // plain block cache with whole-key blooms for `get`.
        let mut table = BlockBasedOptions::default();
        let cache = Cache::new_lru_cache(memory.block_cache);
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(true);
        opts.set_block_based_table_factory(&table);
        if !create && !dir.join("CURRENT").exists() {
            return Err(StoreError::Backend(format!(
                "{} holds no snapblk metadata (no RocksDB database)",
                dir.display()
            )));
        }
        let db = DB::open(&opts, dir).map_err(err)?;
        let derived = if memory.derived > 0 {
            derived::Derived::open(dir, memory.derived, &cache)?
        } else {
            derived::Derived::remove(dir)?;
            None
        };
        Ok(RocksStore {
            kept: Mutex::new(Vec::new()),
            derived,
            db,
            dir: dir.to_path_buf(),
        })
    }
}

/// Visits `[from, to)` with a raw iterator: keys and values are borrowed from RocksDB, not
/// copied into boxes per entry (a snapshot read visits up to ~17 entries per 4K read).
pub(crate) fn scan_raw<D: rocksdb::DBAccess>(
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, D>,
    from: &[u8],
    visit: &mut ScanVisitor<'_>,
) -> Result<(), StoreError> {
    it.seek(from);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if visit(k, v) == ControlFlow::Break(()) {
            return Ok(());
        }
        it.next();
    }
    it.status().map_err(err)
}

/// Read options for this thread: blocks read in bulk (`snapblk_core::meta::bulk_reads`,
/// a backup reading a snapshot) are not kept in the block cache.
fn read_opts() -> ReadOptions {
    let mut ro = ReadOptions::default();
    if snapblk_core::meta::is_bulk() {
        ro.fill_cache(false);
    }
    ro
}

fn bounded(to: &[u8]) -> ReadOptions {
    let mut ro = read_opts();
    ro.set_iterate_upper_bound(to.to_vec());
    ro
}

/// A RocksDB snapshot: reads as of when it was taken.
struct RocksView<'a> {
    snap: rocksdb::SnapshotWithThreadMode<'a, DB>,
}

impl MetaRead for RocksView<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.snap.get_opt(key, read_opts()).map_err(err)
    }
    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        scan_raw(self.snap.raw_iterator_opt(bounded(to)), from, visit)
    }
}

impl MetaStore for RocksStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_opt(key, &read_opts()).map_err(err)
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        scan_raw(self.db.raw_iterator_opt(bounded(to)), from, visit)
    }

    fn view(&self) -> Result<Box<dyn MetaRead + '_>, StoreError> {
        Ok(Box::new(RocksView {
            snap: self.db.snapshot(),
        }))
    }

    fn reader(&self) -> Result<Box<dyn MetaRead + '_>, StoreError> {
        if snapblk_core::meta::is_bulk() {
            // A bulk job's reads bypass the block cache; kept iterators fill it.
            return self.view();
        }
        Ok(Box::new(self.take_reader()?))
    }

    fn commit(&self, batch: WriteBatch, durable: bool) -> Result<(), StoreError> {
        let mut b = rocksdb::WriteBatch::default();
        for op in batch.ops {
            match op {
                BatchOp::Put(k, v) => b.put(k, v),
                BatchOp::Delete(k) => b.delete(k),
                BatchOp::DeleteRange(from, to) => {
                    if from < to {
                        b.delete_range(from, to)
                    }
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(durable);
        self.db.write_opt(b, &wo).map_err(err)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(err)
    }

    fn tidy(&self) {
        self.drop_idle_readers();
    }

    fn compact(&self) -> Result<(), StoreError> {
        // Kept iterators pin the table files they read: let those not in use go (a reader
        // takes its iterator out of the pool while it reads), so the files compaction
        // replaces are deleted rather than kept for them.
        self.drop_kept_readers();
        self.db.flush().map_err(err)?;
        let mut o = rocksdb::CompactOptions::default();
        o.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db.compact_range_opt(None::<&[u8]>, None::<&[u8]>, &o);
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        let p = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        p("rocksdb.total-sst-files-size") + p("rocksdb.size-all-mem-tables")
    }

    fn memory(&self) -> u64 {
        let p = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        p("rocksdb.cur-size-all-mem-tables")
            + p("rocksdb.block-cache-usage")
            + p("rocksdb.estimate-table-readers-mem")
    }

    fn derived(&self) -> bool {
        self.derived.is_some()
    }
    fn derived_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.derived.as_ref().map_or(Ok(None), |d| d.get(key))
    }
    fn derived_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.derived.as_ref().map_or(Ok(()), |d| d.put(key, value))
    }
    fn derived_scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), StoreError> {
        self.derived
            .as_ref()
            .map_or(Ok(()), |d| d.scan(from, to, visit))
    }
    fn derived_delete_ranges(&self, ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        self.derived
            .as_ref()
            .map_or(Ok(()), |d| d.delete_ranges(ranges))
    }
    fn derived_forget(&self) {
        if let Some(d) = &self.derived {
            d.forget(&self.dir);
        }
    }
    fn derived_size(&self) -> u64 {
        self.derived.as_ref().map_or(0, |d| d.size())
    }
}
