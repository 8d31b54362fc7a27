//! The derived key space of a [`crate::RocksStore`] (`MetaStore::derived*`, format2.md §8c):
//! a second RocksDB database in `<db>/derived`, for entries the pool can compute again.
//!
//! * **No WAL for puts**: they go to the memtable only; a crash loses what was not flushed
//!   (a clean close flushes). The contract allows any loss. Range deletes (the pool's
//!   sweep at open) are synced through the WAL: one a crash undid could bring back
//!   entries of an epoch that a later history of the pool retains anew.
//! * **Bounded** by FIFO compaction: past `bytes` of table files the oldest file is
//!   deleted, so the space is a cache that forgets what was inserted longest ago. Intra-L0
//!   compaction merges small files (fewer bloom probes per get); bloom filters stay in
//!   the table readers, not the shared block cache.
//! * **Never stalls a reader**: puts carry `no_slowdown` and a put RocksDB would delay is
//!   dropped; FIFO has no level-0 stall triggers.
//! * **Bound to its database**: `<db>/derived/OWNER` holds the main database's `IDENTITY`
//!   (unique per RocksDB database). A derived database without it, or of another
//!   database (a pool made again in the same directory), is removed and made anew; so is
//!   one that fails to open. What is kept stays a function of the main database's
//!   history; the pool sweeps what its current state does not retain (core v2/cache.rs).
//!
//! Threading: `rocksdb::DB` is internally synchronised; gets and puts come from readers'
//! threads.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use rocksdb::{BlockBasedOptions, Cache, Options, ReadOptions, WriteOptions, DB};
use snapblk_core::meta::ScanVisitor;
use snapblk_core::StoreError;

use crate::err;

/// Memtable of the derived database: table files start at about this size.
const WRITE_BUFFER: usize = 16 << 20;

pub(crate) struct Derived {
    db: DB,
}

impl Drop for Derived {
    fn drop(&mut self) {
        // Its puts skip the WAL: flushed at a clean close, they survive a restart.
        if let Err(e) = self.db.flush() {
            log::warn!("flushing the derived metadata store at close: {e}");
        }
    }
}

fn options(bytes: u64, cache: &Cache) -> Result<Options, StoreError> {
    let mut base = Options::default();
    base.create_if_missing(true);
    base.set_compression_type(rocksdb::DBCompressionType::Lz4);
    base.set_write_buffer_size(WRITE_BUFFER);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(false);
    base.set_block_based_table_factory(&table);
    base.get_options_from_string(format!(
        "compaction_style=kCompactionStyleFIFO;\
         compaction_options_fifo={{max_table_files_size={bytes};allow_compaction=true}}"
    ))
    .map_err(err)
}

fn owner_of(main: &Path) -> Option<Vec<u8>> {
    std::fs::read(main.join("IDENTITY"))
        .ok()
        .filter(|id| !id.is_empty())
}

impl Derived {
    /// Opens (or makes) the derived database of the main database in `main`, holding at
    /// most about `bytes` of table files. `None` when it cannot be had (logged): the pool
    /// then runs without it.
    pub(crate) fn open(main: &Path, bytes: u64, cache: &Cache) -> Option<Derived> {
        let dir = main.join("derived");
        let Some(owner) = owner_of(main) else {
            log::warn!(
                "{}: no IDENTITY file; not keeping derived metadata",
                main.display()
            );
            return None;
        };
        match Derived::open_in(&dir, &owner, bytes, cache) {
            Ok(d) => Some(d),
            Err(e) => {
                log::warn!(
                    "{}: not keeping derived metadata (snapshot contents): {e}",
                    dir.display()
                );
                None
            }
        }
    }

    fn open_in(dir: &Path, owner: &[u8], bytes: u64, cache: &Cache) -> Result<Derived, StoreError> {
        let opts = options(bytes, cache)?;
        let marker: PathBuf = dir.join("OWNER");
        let ours = std::fs::read(&marker).is_ok_and(|m| m == owner);
        if ours {
            match DB::open(&opts, dir) {
                Ok(db) => return Ok(Derived { db }),
                Err(e) => log::warn!("{}: {e}; making it anew", dir.display()),
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| StoreError::Backend(format!("removing {}: {e}", dir.display())))?;
        }
        let db = DB::open(&opts, dir).map_err(err)?;
        // Written last: a crash before leaves no marker, and the next open starts over.
        std::fs::write(&marker, owner)
            .map_err(|e| StoreError::Backend(format!("writing {}: {e}", marker.display())))?;
        Ok(Derived { db })
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_opt(key, &ReadOptions::default()).map_err(err)
    }

    pub(crate) fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        wo.set_no_slowdown(true);
        match self.db.put_opt(key, value, &wo) {
            Ok(()) => Ok(()),
            // A put that would have waited for a flush: dropped, as the contract allows.
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    pub(crate) fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(to.to_vec());
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(from);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if visit(k, v) == ControlFlow::Break(()) {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(err)
    }

    pub(crate) fn delete_range(&self, from: &[u8], to: &[u8]) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        // Durable, unlike puts: a sweep's delete that a crash undid could bring back
        // entries of epochs a later history retains anew (core v2/cache.rs).
        let mut b = rocksdb::WriteBatch::default();
        b.delete_range(from, to);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(b, &wo).map_err(err)
    }

    pub(crate) fn size(&self) -> u64 {
        let p = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        p("rocksdb.total-sst-files-size") + p("rocksdb.size-all-mem-tables")
    }
}
