//! Backing up one frozen snapshot.
//!
//! Pipeline (bounded channels throughout, so memory stays at a few packs):
//! reader threads take cells in order, read them from the snapshot, drop all-zero cells,
//! hash the rest and, for chunks not yet in the repository, compress and seal them ->
//! one packer thread fills packs -> uploader threads store each pack, then its index.
//! The manifest (table, then header) is written only after every upload succeeded.
//!
//! Incremental: with a base manifest and the ranges `diff` reports between the base's
//! snapshot and this one, only cells touching those ranges are read; every other cell is
//! taken from the base's table. Resume: chunks already in the repository (from an
//! interrupted earlier run whose packs and indexes were stored) are never uploaded again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::bounded;
use snapblk_core::Export;

use crate::catalog;
use crate::chunks::Chunks;
use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::index;
use crate::lease::Lease;
use crate::manifest::{self, BackupStats, Header, Table};
use crate::pack::{Pack, PackBuilder};
use crate::par::lock;
use crate::progress::Progress;
use crate::repo::{self, Repository};

/// Byte ranges `(offset, length)`.
pub type Ranges = Vec<(u64, u64)>;

/// An incremental base: its manifest header and the ranges changed since it.
pub type Base = (Header, Ranges);

/// What to back up.
pub struct Job {
    /// The frozen snapshot, read through the volume API.
    pub source: Arc<dyn Export>,
    pub volume: String,
    pub snapshot: String,
    pub snapshot_id: u64,
    pub pool: String,
    pub created: u64,
    /// Byte ranges of the snapshot that hold data (others read as zeros).
    pub allocated: Ranges,
    pub base: Option<Base>,
    pub readers: usize,
    pub uploaders: usize,
    /// The host the backup is recorded as taken on (None: this one; a copy keeps the
    /// original's).
    pub host: Option<String>,
    /// Compact the packs it references when they are spread out (crate::compact): true
    /// when the source is local (re-reading is free); false for a copy, whose source
    /// reads are GETs.
    pub compact: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub manifest: String,
    pub volume: String,
    pub snapshot: String,
    pub size: u64,
    pub base: Option<String>,
    /// True when this snapshot was already in the repository (nothing was done).
    pub already_stored: bool,
    pub stats: BackupStats,
}

impl Summary {
    /// The backup of this snapshot the repository already holds.
    fn already_stored(h: Header) -> Summary {
        Summary {
            manifest: h.id,
            volume: h.volume,
            snapshot: h.snapshot,
            size: h.size,
            base: h.base,
            already_stored: true,
            stats: h.stats,
        }
    }
}

/// Cells (of `cs` bytes) that overlap any of `ranges`, within `cells`.
fn cells_of(ranges: &[(u64, u64)], cs: u64, cells: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for &(off, len) in ranges {
        if len == 0 {
            continue;
        }
        let first = off / cs;
        let last = (off.saturating_add(len) - 1) / cs;
        out.extend((first..=last.min(cells.saturating_sub(1))).filter(|c| *c < cells));
    }
    out.sort_unstable();
    out.dedup();
    out.shrink_to_fit();
    out
}

pub fn run(repo: &Repository, job: Job, progress: &dyn Progress) -> Result<Summary> {
    let t0 = Instant::now();
    let listed = catalog::load_pool(repo, &job.pool)?.map(|c| c.catalog.backups);
    // Held from before the chunk index is loaded until the commit: gc keeps every pack
    // this job may reference (crate::lease).
    let lease = Lease::shared(repo, format!("backup {}@{}", job.volume, job.snapshot))?;
    if let Some(h) = listed
        .iter()
        .flatten()
        .find(|h| h.snapshot_id == job.snapshot_id)
    {
        return Ok(Summary::already_stored(h.clone()));
    }
    let size = job.source.size()?;
    let cs = repo.chunk_size();
    let table0 = Table {
        size,
        chunk_size: repo.config().chunk_size,
        cells: Vec::new(),
    };
    let ncells = table0.cell_count();
    // The new table's cells, sorted by cell; memory is ~40 bytes per cell holding data.
    let mut cells: Vec<(u64, ChunkId)> = Vec::new();
    let to_read = match &job.base {
        Some((bh, changed)) => {
            let bt = manifest::read_table(repo, bh)?;
            if bt.chunk_size != table0.chunk_size {
                return Err(BackupError::invalid("base", "chunk size differs"));
            }
            let mut read = cells_of(changed, cs, ncells);
            // A base cell whose length differs (the old last cell) must be read again.
            let keep_below = bt.size.min(size) / cs;
            cells = bt.cells;
            cells.retain(|(c, _)| *c < keep_below && read.binary_search(c).is_err());
            cells.shrink_to_fit();
            // Cells past the base's end are read where they hold data.
            let alloc = cells_of(&job.allocated, cs, ncells);
            let tail = alloc.iter().copied().filter(|c| *c >= keep_below);
            read.extend(tail);
            read.sort_unstable();
            read.dedup();
            read
        }
        None => cells_of(&job.allocated, cs, ncells),
    };
    let mut stats = BackupStats::default();
    let mut forced: HashSet<ChunkId> = HashSet::new();
    let mut pending = to_read;
    // The repository's chunks as this job sees them (the local index and each pack's
    // standing): pass 0 dedups against them; with compaction they also locate the kept
    // chunks.
    let mut chunks = Chunks::load(repo)?;
    if job.compact && job.base.is_some() && !cells.is_empty() {
        // The kept chunks spread over too many packs: store the sparsest packs' again.
        let new_bytes = (pending.len() as u64).saturating_mul(cs);
        let locs = chunks.locations(crate::compact::wanted(&cells))?;
        let plan = crate::compact::plan(repo, &cells, &locs, new_bytes)?;
        drop(locs);
        if let Some(p) = plan {
            log::info!(
                "backup {}@{}: compacting: {} chunks ({} bytes) stored again, {} packs -> about {}",
                job.volume,
                job.snapshot,
                p.ids.len(),
                p.bytes,
                p.packs_before,
                p.packs_after
            );
            cells.retain(|(c, _)| p.cells.binary_search(c).is_err());
            pending.extend(p.cells);
            pending.sort_unstable();
            pending.dedup();
            stats.chunks_compacted = p.ids.len() as u64;
            stats.bytes_compacted = p.bytes;
            forced = p.ids;
        }
    }
    // Normally one pass; another when garbage collection condemned a pack holding a chunk
    // we reused while we ran, or two new chunks shared an id prefix in `seen` (those
    // cells are read and stored again).
    for pass in 0..3 {
        let dedup = Dedup {
            known: &chunks,
            forced: &forced,
            // Sized once: a growing table holds two copies while it moves.
            seen: Mutex::new(HashSet::with_capacity(pending.len())),
        };
        let (got, zeros) = pipeline(repo, &job, &table0, &pending, dedup, progress, &mut stats)?;
        pending = Vec::new();
        if pass == 0 {
            // The cells read are not among the base's kept ones: append, then sort.
            if cells.is_empty() {
                cells = got;
            } else {
                cells.reserve_exact(got.len());
                cells.extend(got);
            }
            cells.sort_unstable_by_key(|(c, _)| *c);
        } else {
            for (c, id) in got {
                if let Ok(i) = cells.binary_search_by_key(&c, |(c, _)| *c) {
                    cells[i].1 = id;
                }
            }
            cells.retain(|(c, _)| zeros.binary_search(c).is_err());
        }
        // Everything referenced must be in a live pack now: listed again (this job's
        // packs are new, gc may have condemned others meanwhile), confirmed by full id.
        drop(chunks);
        chunks = Chunks::load(repo)?;
        let missing = chunks.missing(&cells)?;
        if missing.is_empty() {
            break;
        }
        pending = cells
            .iter()
            .filter(|(_, id)| missing.contains(id))
            .map(|(c, _)| *c)
            .collect();
        forced = missing;
    }
    if !pending.is_empty() {
        return Err(BackupError::invalid(
            "backup",
            "chunks kept disappearing from the repository while backing up (garbage collection running with no grace period?)",
        ));
    }
    let table = Table { cells, ..table0 };
    stats.seconds = t0.elapsed().as_secs_f64();
    let stored: u64 = table.cells.iter().map(|(c, _)| table.cell_len(*c)).sum();
    let ncells = table.cells.len() as u64;
    let chunk_size = table.chunk_size;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{}@{}", job.volume, job.snapshot);
    let written = manifest::write_table(repo, &id, &name, table)?;
    let header = Header {
        id,
        volume: job.volume.clone(),
        snapshot: job.snapshot.clone(),
        snapshot_id: job.snapshot_id,
        pool: job.pool.clone(),
        created: job.created,
        backed_up: repo::now(),
        size,
        chunk_size,
        cells: ncells,
        stored_bytes: stored,
        digest: written.digest,
        base: job.base.as_ref().map(|(h, _)| h.id.clone()),
        stats: stats.clone(),
        host: job.host.clone().unwrap_or_else(catalog::host_name),
        framed: written.framed,
    };
    lease.check()?;
    // The commit point: listed in the pool's catalog, the backup exists.
    if let Some(h) = catalog::update(repo, &job.pool, catalog::Change::Add(&header))? {
        // Another run of this job committed first; our table is an orphan gc removes.
        return Ok(Summary::already_stored(h));
    }
    // A copy, for `repo repair` and as evidence should the catalog be rolled back.
    if let Err(e) = manifest::write_header(repo, &header) {
        log::warn!(
            "backup {} is committed but its header copy was not stored: {e}",
            header.name()
        );
    }
    Ok(Summary {
        manifest: header.id,
        volume: job.volume,
        snapshot: job.snapshot,
        size,
        base: header.base,
        already_stored: false,
        stats,
    })
}

/// What a pass read: each cell holding data with its chunk, and the all-zero cells
/// (sorted).
type PassOutput = (Vec<(u64, ChunkId)>, Vec<u64>);

/// Which chunks a pass stores: those no pack a backup may use holds, those confirmed
/// missing by an earlier pass or chosen by compaction (`forced`), each at most once per
/// pass.
struct Dedup<'a> {
    known: &'a Chunks,
    forced: &'a HashSet<ChunkId>,
    /// Id prefixes of the chunks stored in this pass (8 bytes each; a prefix shared by two
    /// new chunks skips the second, which the full-id check before commit then stores).
    seen: Mutex<HashSet<u64>>,
}

impl Dedup<'_> {
    /// Whether `id` is to be stored now (false: stored already, or by another reader).
    fn store(&self, id: ChunkId) -> Result<bool> {
        if !self.forced.contains(&id) && self.known.stored(&id)? {
            return Ok(false);
        }
        Ok(lock(&self.seen).insert(index::prefix(&id)))
    }
}

/// Shared failure slot: the first error wins and everyone stops.
struct Abort {
    flag: AtomicBool,
    err: Mutex<Option<BackupError>>,
}

impl Abort {
    fn set(&self, e: BackupError) {
        self.flag.store(true, Ordering::SeqCst);
        lock(&self.err).get_or_insert(e);
    }
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// Reads `cells`, stores new chunks, returns each cell's chunk (None: all zeros).
fn pipeline(
    repo: &Repository,
    job: &Job,
    table: &Table,
    cells: &[u64],
    dedup: Dedup<'_>,
    progress: &dyn Progress,
    stats: &mut BackupStats,
) -> Result<PassOutput> {
    let total: u64 = cells.iter().map(|c| table.cell_len(*c)).sum();
    progress.start("backup", total);
    let cs = repo.chunk_size();
    let level = repo.config().zstd_level;
    let pack_size = repo.config().pack_size as usize;
    let keys = repo.keys();
    let next = AtomicU64::new(0);
    let known = &dedup;
    // Cells read and their chunks; all-zero cells apart (8 bytes each).
    let out: Mutex<Vec<(u64, ChunkId)>> = Mutex::new(Vec::with_capacity(cells.len()));
    let zeros: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let abort = Abort {
        flag: AtomicBool::new(false),
        err: Mutex::new(None),
    };
    let (bytes_read, bytes_new, chunks_new, reused, uploaded, packs) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let (chunk_tx, chunk_rx) = bounded::<(ChunkId, Vec<u8>)>(64);
    let (pack_tx, pack_rx) = bounded::<Pack>(2);
    std::thread::scope(|s| {
        for _ in 0..job.readers.max(1) {
            let chunk_tx = chunk_tx.clone();
            let (next, out, zeros, abort) = (&next, &out, &zeros, &abort);
            let (bytes_read, bytes_new, chunks_new, reused) =
                (&bytes_read, &bytes_new, &chunks_new, &reused);
            s.spawn(move || {
                let mut buf = vec![0u8; cs as usize];
                loop {
                    if abort.is_set() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&cell) = cells.get(i) else { return };
                    let len = table.cell_len(cell) as usize;
                    let data = &mut buf[..len];
                    if let Err(e) = job.source.read(cell * cs, data) {
                        abort.set(e.into());
                        return;
                    }
                    bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                    progress.advance(len as u64);
                    if data.iter().all(|b| *b == 0) {
                        lock(zeros).push(cell);
                        continue;
                    }
                    let id = keys.chunk_id(data);
                    lock(out).push((cell, id));
                    match known.store(id) {
                        Ok(true) => {}
                        Ok(false) => {
                            reused.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Err(e) => {
                            abort.set(e);
                            return;
                        }
                    }
                    let (_, sealed) = crate::chunk::encode(keys, level, data);
                    bytes_new.fetch_add(len as u64, Ordering::Relaxed);
                    chunks_new.fetch_add(1, Ordering::Relaxed);
                    if chunk_tx.send((id, sealed)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(chunk_tx);
        {
            let abort = &abort;
            s.spawn(move || {
                let mut b = PackBuilder::default();
                for (id, sealed) in chunk_rx {
                    b.add(id, &sealed);
                    if b.len() >= pack_size {
                        let p = std::mem::take(&mut b).finish(keys);
                        if pack_tx.send(p).is_err() {
                            return;
                        }
                    }
                    if abort.is_set() {
                        return;
                    }
                }
                if !b.is_empty() && !abort.is_set() {
                    let _ = pack_tx.send(b.finish(keys));
                }
            });
        }
        for _ in 0..job.uploaders.max(1) {
            let pack_rx = pack_rx.clone();
            let (abort, uploaded, packs) = (&abort, &uploaded, &packs);
            s.spawn(move || {
                for p in pack_rx {
                    if abort.is_set() {
                        return;
                    }
                    let store = repo.store();
                    let r = repo.paced((p.bytes.len() + p.index.len()) as u64, || {
                        store
                            .put(&repo::pack_key(&p.id), &p.bytes)
                            .and_then(|_| store.put(&repo::index_key(&p.id), &p.index))
                    });
                    match r {
                        Ok(()) => {
                            // The confirm before commit reads it from here, not by a GET.
                            if let Some(c) = repo.cache() {
                                c.put(repo, &repo::index_key(&p.id), &p.index);
                            }
                            uploaded.fetch_add(p.bytes.len() as u64, Ordering::Relaxed);
                            packs.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            abort.set(e.into());
                            return;
                        }
                    }
                }
            });
        }
        drop(pack_rx);
    });
    stats.bytes_read += bytes_read.into_inner();
    stats.bytes_new += bytes_new.into_inner();
    stats.chunks_new += chunks_new.into_inner();
    stats.chunks_reused += reused.into_inner();
    stats.bytes_uploaded += uploaded.into_inner();
    stats.packs += packs.into_inner();
    if let Some(e) = abort.err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok((out.into_inner().unwrap_or_else(|p| p.into_inner()), {
        let mut z = zeros.into_inner().unwrap_or_else(|p| p.into_inner());
        z.sort_unstable();
        z
    }))
}

#[cfg(test)]
mod tests {
    use super::cells_of;

    #[test]
    fn cells_touching_ranges() {
        assert_eq!(cells_of(&[(0, 1)], 4096, 10), vec![0]);
        assert_eq!(cells_of(&[(4095, 2)], 4096, 10), vec![0, 1]);
        assert_eq!(cells_of(&[(8192, 4096), (0, 0)], 4096, 10), vec![2]);
        assert_eq!(cells_of(&[(36864, 1 << 20)], 4096, 10), vec![9]);
    }
}
