//! The derived key space of a [`crate::RocksStore`] (`MetaStore::derived*`, format2.md §8c):
//! a second RocksDB database in `<db>/derived`, for entries the pool can compute again.
//!
//! * **No WAL for puts**: they go to the memtable only; a crash loses what was not flushed
//!   (a clean close flushes). The contract allows any loss. Range deletes (the pool's
//!   sweep at open) are synced through the WAL: one a crash undid could bring back
//!   entries of an epoch that a later history of the pool retains anew.
//! * **Bounded** by FIFO compaction: past `bytes` of table files the oldest file is
//!   deleted, so the space is a cache that forgets what was inserted longest ago. Intra-L0
//!   compaction merges small files (fewer bloom probes per get); bloom filters and
//!   indexes live in the shared block cache, pinned (~1.3% of the space in RAM).
//! * **Never stalls a reader**: puts carry `no_slowdown` and a put RocksDB would delay is
//!   dropped; FIFO has no level-0 stall triggers.
//! * **Removed by an open that does not keep it** (one-shot commands, `snapshot_cache_disk
//!   = "0"`), and its marker by a pool whose sweep failed: a database that missed changes
//!   to the pool is never trusted later (core v2/cache.rs).
//! * **Bound to its database**: `<db>/derived/OWNER` holds the main database's `IDENTITY`
//!   (unique per RocksDB database). A derived database without it, or of another
//!   database (a pool made again in the same directory), is removed and made anew; so is
//!   one that fails to open. What is kept stays a function of the main database's
//!   history; the pool sweeps what its current state does not retain (core v2/cache.rs).
//!
//! Threading: `rocksdb::DB` is internally synchronised; gets and puts come from readers'
//! threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rocksdb::{BlockBasedOptions, Cache, Options, ReadOptions, WriteOptions, DB};
use snapblk_core::meta::ScanVisitor;
use snapblk_core::StoreError;

use crate::err;

/// Memtable of the derived database: table files start at about this size.
const WRITE_BUFFER: usize = 16 << 20;

pub(crate) struct Derived {
    db: DB,
    /// Set by [`Derived::forget`]: nothing is answered any more.
    forgotten: AtomicBool,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
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
    // Filters and indexes charged to the shared block cache (RAM stays bounded by it and
    // shows in `memory()`), pinned there: every file is in level 0 and probed by a get.
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
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
    /// most about `bytes` of table files. `Ok(None)` when it cannot be had (logged; none
    /// is left behind): the pool then runs without it. An error only when a database that
    /// could not be used cannot be removed either.
    pub(crate) fn open(
        main: &Path,
        bytes: u64,
        cache: &Cache,
    ) -> Result<Option<Derived>, StoreError> {
        let dir = main.join("derived");
        let got = match owner_of(main) {
            Some(owner) => Derived::open_in(&dir, &owner, bytes, cache),
            None => Err(StoreError::Backend(format!(
                "{}: no IDENTITY file to bind it to",
                main.display()
            ))),
        };
        match got {
            Ok(d) => Ok(Some(d)),
            Err(e) => {
                log::warn!(
                    "{}: not keeping snapshot contents on the metadata disk: {e}",
                    dir.display()
                );
                Derived::remove(main)?;
                Ok(None)
            }
        }
    }

    fn open_in(dir: &Path, owner: &[u8], bytes: u64, cache: &Cache) -> Result<Derived, StoreError> {
        let opts = options(bytes, cache)?;
        let marker: PathBuf = dir.join("OWNER");
        let ours = std::fs::read(&marker).is_ok_and(|m| m == owner);
        if ours {
            match DB::open(&opts, dir) {
                Ok(db) => return Ok(Derived::new(db)),
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
        Ok(Derived::new(db))
    }

    fn new(db: DB) -> Derived {
        Derived {
            db,
            forgotten: AtomicBool::new(false),
        }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if self.forgotten.load(Ordering::Acquire) {
            return Ok(None);
        }
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
        crate::scan_raw(self.db.raw_iterator_opt(ro), from, visit)
    }

    pub(crate) fn delete_ranges(&self, ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        // Durable, unlike puts: a sweep's delete that a crash undid could bring back
        // entries of epochs a later history retains anew (core v2/cache.rs). One batch,
        // one sync, however many ranges.
        let mut b = rocksdb::WriteBatch::default();
        for (from, to) in ranges.iter().filter(|(f, t)| f < t) {
            b.delete_range(from, to);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(b, &wo).map_err(err)
    }

    /// Stops answering gets and removes the marker that binds this database to its main
    /// one, so the next open starts it anew.
    pub(crate) fn forget(&self, main: &Path) {
        self.forgotten.store(true, Ordering::Release);
        let marker = main.join("derived").join("OWNER");
        if let Err(e) = std::fs::remove_file(&marker).and_then(|()| sync_dir(&main.join("derived")))
        {
            log::warn!(
                "{}: {e}; the derived metadata may be used again at the next open",
                marker.display()
            );
        }
    }

    /// Removes the derived database of `main`, if any, durably: an open that will commit
    /// without sweeping it (a one-shot command, `snapshot_cache_disk = "0"`) must leave
    /// none that a later open could trust (core v2/cache.rs).
    pub(crate) fn remove(main: &Path) -> Result<(), StoreError> {
        let dir = main.join("derived");
        if !dir.exists() {
            return Ok(());
        }
        let gone = std::fs::remove_file(dir.join("OWNER"))
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .and_then(|()| sync_dir(&dir))
            .and_then(|()| std::fs::remove_dir_all(&dir))
            .and_then(|()| sync_dir(main));
        gone.map_err(|e| {
            StoreError::Backend(format!(
                "removing {} (snapshot contents kept by a daemon; this open does not keep them \
                 up to date): {e}",
                dir.display()
            ))
        })
    }

    pub(crate) fn size(&self) -> u64 {
        let p = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        p("rocksdb.total-sst-files-size") + p("rocksdb.size-all-mem-tables")
    }
}
