//! Backing up one frozen snapshot.
//!
//! Pipeline (bounded channels throughout): reader threads take cells in order, read them
//! from the snapshot, drop all-zero cells, hash the rest and, for chunks not yet in the
//! repository, compress and seal them -> one packer thread fills packs, each in a file of
//! the job's scratch directory (`crate::spool`) -> uploader threads stream each pack's
//! file to the store, then put its index. Memory: 64 sealed chunks and the packer's write
//! buffer; a pack waiting or in flight is page cache, whatever the pack size.
//!
//! Streaming (docs/design.md §12): the image goes frame by frame (65,536 cells), in
//! batches of frames holding about [`Repository::batch`] cells to read (a frame's worth). A batch runs the
//! pipeline; then each of its frames is completed (the base's kept entries, from the
//! job's local copy of the base table, and the cells read) and handed to the table
//! writer, which seals it, keeps it locally and puts it. The packs a batch stored go into
//! the job's own index, so later batches dedup against them. Memory: one batch's lists
//! and a few frames, never the table or anything per chunk of the volume.
//!
//! Before the commit every chunk of the new table is confirmed to be in a live pack (the
//! repository listed again, the frames read back from the local copy); a chunk gone (gc
//! condemned its pack meanwhile) is read and stored again, at most twice. Only then does
//! the header go into the pool's catalog (the commit point).
//!
//! Incremental: with a base manifest and the ranges `diff` reports between the base's
//! snapshot and this one, only cells touching those ranges are read; every other cell is
//! taken from the base's table. Resume: chunks already in the repository (from an
//! interrupted earlier run whose packs and indexes were stored) are never uploaded again.
//!
//! Threading: `run` is one job's; the pipeline's threads are scoped inside each batch.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::bounded;
use snapblk_core::Export;

use crate::catalog;
use crate::chunks::Chunks;
use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::frame;
use crate::index;
use crate::lease::Lease;
use crate::manifest::{BackupStats, Header, TableWriter};
use crate::pack::PackEntry;
use crate::par::lock;
use crate::progress::Progress;
use crate::repo::{self, Repository};
use crate::spool::{SpoolBuilder, SpooledPack};
use crate::tablecopy::{self, TableCopy};

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

/// The cells touching some byte ranges, as sorted, disjoint cell spans `[first, end)`.
struct CellSpans(Vec<(u64, u64)>);

impl CellSpans {
    /// The cells of an image of `cells` cells of `cs` bytes touching the ranges of each
    /// part that are at or past its own first cell.
    fn new(parts: &[(&[(u64, u64)], u64)], cs: u64, cells: u64) -> CellSpans {
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for &(ranges, from) in parts {
            for &(off, len) in ranges {
                if len == 0 {
                    continue;
                }
                let first = (off / cs).max(from);
                let end = ((off.saturating_add(len) - 1) / cs + 1).min(cells);
                if first < end {
                    spans.push((first, end));
                }
            }
        }
        spans.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match out.last_mut() {
                Some(l) if a <= l.1 => l.1 = l.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out.shrink_to_fit();
        CellSpans(out)
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a).sum()
    }

    fn cursor(&self) -> SpanCursor<'_> {
        SpanCursor {
            spans: &self.0,
            i: 0,
        }
    }
}

/// Takes the cells of [`CellSpans`] range by range, in increasing order.
struct SpanCursor<'a> {
    spans: &'a [(u64, u64)],
    i: usize,
}

impl SpanCursor<'_> {
    /// Appends the cells inside `r` (which starts at or past every earlier `r`'s end).
    fn take(&mut self, r: Range<u64>, out: &mut Vec<u64>) {
        while let Some(&(a, b)) = self.spans.get(self.i) {
            if a >= r.end {
                break;
            }
            out.extend(a.max(r.start)..b.min(r.end));
            if b > r.end {
                break;
            }
            self.i += 1;
        }
    }
}

/// An incremental base as the job reads it: its table (a local copy, taken under the
/// lease) and the cell below which its entries are kept (its last, possibly short cell
/// and anything past the new image are read again).
struct BaseTable {
    copy: TableCopy,
    keep_below: u64,
}

impl BaseTable {
    /// The entries of frame `k` the new table keeps: below `keep_below`, not among `read`
    /// (sorted).
    fn kept(&self, k: u64, read: &[u64]) -> Result<Vec<(u64, ChunkId)>> {
        if k >= self.copy.count() {
            return Ok(Vec::new());
        }
        let mut cells = self.copy.frame(k)?.cells;
        cells.retain(|(c, _)| *c < self.keep_below && read.binary_search(c).is_err());
        Ok(cells)
    }
}

/// Plans compaction (crate::compact) from the base's kept entries, located frame by frame.
fn plan_compaction(
    repo: &Repository,
    chunks: &Chunks,
    base: &BaseTable,
    reads: &CellSpans,
    cells: u64,
    cs: u64,
) -> Result<Option<crate::compact::Plan>> {
    let mut shares = crate::compact::Shares::default();
    let mut cur = reads.cursor();
    let mut read = Vec::new();
    for k in 0..base.copy.count().min(frame::count(cells)) {
        read.clear();
        cur.take(frame::range(cells, k), &mut read);
        let kept = base.kept(k, &read)?;
        if !kept.is_empty() {
            shares.add(&chunks.locations(tablecopy::distinct(&kept))?);
        }
    }
    let new_bytes = reads.count().saturating_mul(cs);
    Ok(crate::compact::plan(
        shares,
        new_bytes,
        u64::from(repo.config().pack_size),
    ))
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
    let chunk_size = repo.config().chunk_size;
    let ncells = size.div_ceil(cs);
    let name = format!("{}@{}", job.volume, job.snapshot);
    let mut header = Header {
        id: uuid::Uuid::new_v4().simple().to_string(),
        volume: job.volume.clone(),
        snapshot: job.snapshot.clone(),
        snapshot_id: job.snapshot_id,
        pool: job.pool.clone(),
        created: job.created,
        backed_up: 0,
        size,
        chunk_size,
        cells: 0,
        stored_bytes: 0,
        digest: String::new(),
        base: job.base.as_ref().map(|(h, _)| h.id.clone()),
        stats: BackupStats::default(),
        host: job.host.clone().unwrap_or_else(catalog::host_name),
        framed: false,
    };
    // What to read: cells touching the changed ranges, and those past the base's end
    // holding data; every other cell of the base is kept.
    let (base, reads) = match &job.base {
        Some((bh, changed)) => {
            if bh.chunk_size != chunk_size {
                return Err(BackupError::invalid("base", "chunk size differs"));
            }
            let keep_below = bh.size.min(size) / cs;
            let base = BaseTable {
                copy: TableCopy::take(repo, bh)?,
                keep_below,
            };
            let parts = [(&changed[..], 0), (&job.allocated[..], keep_below)];
            (Some(base), CellSpans::new(&parts, cs, ncells))
        }
        None => (None, CellSpans::new(&[(&job.allocated[..], 0)], cs, ncells)),
    };
    let mut stats = BackupStats::default();
    // The repository's chunks as this job sees them (the local index and each pack's
    // standing): the batches dedup against them (and against the job's own packs).
    let mut chunks = Chunks::load(repo)?;
    // Packs this job stored: its confirm takes them to exist without a HEAD.
    let mut own: HashSet<String> = HashSet::new();
    let compaction = match &base {
        Some(b) if job.compact => plan_compaction(repo, &chunks, b, &reads, ncells, cs)?,
        _ => None,
    };
    if let Some(p) = &compaction {
        log::info!(
            "backup {name}: compacting: the chunks it keeps in {} sparse packs ({} bytes) are stored again, {} packs -> about {}",
            p.packs.len(),
            p.bytes,
            p.packs_before,
            p.packs_after
        );
    }
    progress.start(
        "backup",
        reads
            .count()
            .saturating_mul(cs)
            .saturating_add(compaction.as_ref().map_or(0, |p| p.bytes))
            .min(size),
    );
    let mut writer = TableWriter::new(repo, header.clone())?;
    let frames = frame::count(ncells);
    let limit = repo.batch();
    let mut cur = reads.cursor();
    let mut k = 0;
    while k < frames {
        let first = k;
        // The batch's cells to read (sorted) and, with compaction, the kept chunks to
        // store again.
        let mut read: Vec<u64> = Vec::new();
        let mut forced: HashSet<ChunkId> = HashSet::new();
        while k < frames && (k == first || read.len() < limit) {
            let at = read.len();
            cur.take(frame::range(ncells, k), &mut read);
            if let (Some(p), Some(b)) = (&compaction, &base) {
                let kept = b.kept(k, &read[at..])?;
                let locs = chunks.locations(tablecopy::distinct(&kept))?;
                for (c, id) in kept {
                    let Some(l) = locs.get(&id) else { continue };
                    if p.packs.contains(locs.pack_id(&l)) {
                        read.push(c);
                        if forced.insert(id) {
                            stats.chunks_compacted += 1;
                            stats.bytes_compacted += u64::from(l.len);
                        }
                    }
                }
                read[at..].sort_unstable();
            }
            k += 1;
        }
        let dedup = Dedup {
            known: &chunks,
            lease: &lease,
            forced: &forced,
            seen: Mutex::new(HashSet::with_capacity(read.len())),
        };
        let out = pipeline(repo, &job, size, &read, dedup, progress, &mut stats)?;
        own.extend(out.packs.iter().map(|(name, _)| name.clone()));
        chunks.remember(repo, out.packs)?;
        let mut got = out.cells;
        got.sort_unstable_by_key(|(c, _)| *c);
        let (mut ri, mut gi) = (0, 0);
        for kf in first..k {
            let r = frame::range(ncells, kf);
            let re = ri + read[ri..].partition_point(|c| *c < r.end);
            let ge = gi + got[gi..].partition_point(|(c, _)| *c < r.end);
            let mut cells = match &base {
                Some(b) => b.kept(kf, &read[ri..re])?,
                None => Vec::new(),
            };
            cells.extend_from_slice(&got[gi..ge]);
            cells.sort_unstable_by_key(|(c, _)| *c);
            writer.push(kf, &cells)?;
            (ri, gi) = (re, ge);
        }
    }
    drop(base);
    let (written, table) = writer.finish()?;
    // Everything referenced must be in a live pack now: listed again (this job's packs
    // are new, gc may have condemned others meanwhile), confirmed by full id, frame by
    // frame from the local copy. Chunks found missing are read and stored again.
    let mut confirmed = false;
    for attempt in 0..3 {
        drop(chunks);
        chunks = Chunks::load(repo)?;
        chunks.trust(&own);
        let mut redo: Vec<(u64, ChunkId)> = Vec::new();
        for kf in 0..table.count() {
            let f = table.frame(kf)?;
            let missing = chunks.missing(&f.cells)?;
            if !missing.is_empty() {
                redo.extend(f.cells.iter().filter(|(_, id)| missing.contains(id)));
            }
        }
        if redo.is_empty() {
            confirmed = true;
            break;
        }
        if attempt == 2 {
            break;
        }
        let forced: HashSet<ChunkId> = redo.iter().map(|(_, id)| *id).collect();
        let cells: Vec<u64> = redo.iter().map(|(c, _)| *c).collect();
        progress.start("backup", (cells.len() as u64).saturating_mul(cs));
        let dedup = Dedup {
            known: &chunks,
            lease: &lease,
            forced: &forced,
            seen: Mutex::new(HashSet::with_capacity(cells.len())),
        };
        let out = pipeline(repo, &job, size, &cells, dedup, progress, &mut stats)?;
        own.extend(out.packs.iter().map(|(name, _)| name.clone()));
        let mut got = out.cells;
        got.sort_unstable_by_key(|(c, _)| *c);
        if !out.zeros.is_empty() || got != redo {
            return Err(BackupError::invalid(
                &name,
                "cells read again differ from the first read (the source changed while it was backed up)",
            ));
        }
    }
    if !confirmed {
        return Err(BackupError::invalid(
            "backup",
            "chunks kept disappearing from the repository while backing up (garbage collection running with no grace period?)",
        ));
    }
    drop(table);
    stats.seconds = t0.elapsed().as_secs_f64();
    header.backed_up = repo::now();
    header.cells = written.cells;
    header.stored_bytes = written.stored_bytes;
    header.digest = written.digest;
    header.framed = written.framed;
    header.stats = stats.clone();
    lease.check()?;
    // The commit point: listed in the pool's catalog, the backup exists.
    if let Some(h) = catalog::update(repo, &job.pool, catalog::Change::Add(&header))? {
        // Another run of this job committed first; our table is an orphan gc removes.
        return Ok(Summary::already_stored(h));
    }
    // A copy, for `repo repair` and as evidence should the catalog be rolled back.
    if let Err(e) = crate::manifest::write_header(repo, &header) {
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

/// What one run of the pipeline did: each cell read holding data with its chunk (in no
/// order), the all-zero cells, and the packs it stored (names and entries).
struct PassOutput {
    cells: Vec<(u64, ChunkId)>,
    zeros: Vec<u64>,
    packs: Vec<(String, Vec<PackEntry>)>,
}

/// Which chunks a batch stores: those neither a pack a backup may use nor an earlier
/// batch of this job holds, and those confirmed missing or chosen by compaction
/// (`forced`) unless an earlier batch stored them; each at most once per batch.
struct Dedup<'a> {
    known: &'a Chunks,
    /// The job's lease: stamps and guards each index object put (crate::index::put_index).
    lease: &'a Lease,
    forced: &'a HashSet<ChunkId>,
    /// Id prefixes of the chunks stored in this batch (8 bytes each, at most a batch of
    /// them; a prefix shared by two new chunks skips the second, which the full-id check
    /// before commit then stores).
    seen: Mutex<HashSet<u64>>,
}

impl Dedup<'_> {
    /// Whether `id` is to be stored now (false: stored already, or by another reader).
    fn store(&self, id: ChunkId) -> Result<bool> {
        let stored = if self.forced.contains(&id) {
            self.known.stored_by_job(&id)?
        } else {
            self.known.stored(&id)? || self.known.stored_by_job(&id)?
        };
        if stored {
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

/// Reads `cells` of an image of `size` bytes, stores new chunks, returns each cell's
/// chunk.
fn pipeline(
    repo: &Repository,
    job: &Job,
    size: u64,
    cells: &[u64],
    dedup: Dedup<'_>,
    progress: &dyn Progress,
    stats: &mut BackupStats,
) -> Result<PassOutput> {
    let cs = repo.chunk_size();
    let level = repo.config().zstd_level;
    let pack_size = u64::from(repo.config().pack_size);
    let keys = repo.keys();
    let next = AtomicU64::new(0);
    let known = &dedup;
    // Cells read and their chunks; all-zero cells apart (8 bytes each).
    let out: Mutex<Vec<(u64, ChunkId)>> = Mutex::new(Vec::with_capacity(cells.len()));
    let zeros: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let stored: Mutex<Vec<(String, Vec<PackEntry>)>> = Mutex::new(Vec::new());
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
    // Packs are files (crate::spool): waiting or in flight, they cost no memory. One
    // finished pack waits while the uploaders are busy.
    let (pack_tx, pack_rx) = bounded::<SpooledPack>(1);
    let spool = tablecopy::scratch(repo, "packs-", "packs waiting for their upload")?;
    std::thread::scope(|s| {
        for _ in 0..job.readers.max(1) {
            let chunk_tx = chunk_tx.clone();
            let (next, out, zeros, abort) = (&next, &out, &zeros, &abort);
            let (bytes_read, bytes_new, chunks_new, reused) =
                (&bytes_read, &bytes_new, &chunks_new, &reused);
            // A one-pass read of the snapshot: kept out of the pool's caches.
            s.spawn(move || {
                snapblk_core::meta::bulk_reads(|| {
                    let mut buf = vec![0u8; cs as usize];
                    loop {
                        if abort.is_set() {
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(&cell) = cells.get(i) else { return };
                        let len = cs.min(size - cell * cs) as usize;
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
                })
            });
        }
        drop(chunk_tx);
        {
            let abort = &abort;
            let spool = spool.path();
            s.spawn(move || {
                let mut b = SpoolBuilder::new(spool);
                let mut step = || -> Result<bool> {
                    for (id, sealed) in &chunk_rx {
                        b.add(id, &sealed)?;
                        if b.len() >= pack_size {
                            if let Some(p) = b.finish(keys)? {
                                if pack_tx.send(p).is_err() {
                                    return Ok(false);
                                }
                            }
                        }
                        if abort.is_set() {
                            return Ok(false);
                        }
                    }
                    Ok(true)
                };
                match step() {
                    Ok(true) if !abort.is_set() => match b.finish(keys) {
                        Ok(Some(p)) => {
                            let _ = pack_tx.send(p);
                        }
                        Ok(None) => {}
                        Err(e) => abort.set(e),
                    },
                    Ok(_) => {}
                    Err(e) => abort.set(e),
                }
            });
        }
        for _ in 0..job.uploaders.max(1) {
            let pack_rx = pack_rx.clone();
            let (abort, uploaded, packs, stored) = (&abort, &uploaded, &packs, &stored);
            s.spawn(move || {
                for p in pack_rx {
                    if abort.is_set() {
                        return;
                    }
                    let store = repo.store();
                    let SpooledPack {
                        id,
                        file,
                        len,
                        index,
                        entries,
                    } = p;
                    // (put_index caches it: the confirm before commit reads it from
                    // there, not by a GET.)
                    let r = repo.paced(len + index.len() as u64, || {
                        store.put_file(&repo::pack_key(&id), file.path(), len)?;
                        crate::index::put_index(repo, Some(known.lease), &id, len, &index)
                    });
                    drop(file);
                    match r {
                        Ok(()) => {
                            uploaded.fetch_add(len, Ordering::Relaxed);
                            packs.fetch_add(1, Ordering::Relaxed);
                            lock(stored).push((id, entries));
                        }
                        Err(e) => {
                            abort.set(e);
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
    let mut zeros: Vec<u64> = inner(zeros);
    zeros.sort_unstable();
    Ok(PassOutput {
        cells: inner(out),
        zeros,
        packs: inner(stored),
    })
}

/// The value of a mutex no thread holds any more (a panicked holder's value is kept).
fn inner<T>(m: Mutex<T>) -> T {
    m.into_inner().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::CellSpans;

    fn all(s: &CellSpans, cells: u64, step: u64) -> Vec<u64> {
        let mut cur = s.cursor();
        let mut out = Vec::new();
        let mut at = 0;
        while at < cells {
            cur.take(at..(at + step).min(cells), &mut out);
            at += step;
        }
        out
    }

    #[test]
    fn cells_touching_ranges_frame_by_frame() {
        let one = |r: &[(u64, u64)]| CellSpans::new(&[(r, 0)], 4096, 10);
        assert_eq!(all(&one(&[(0, 1)]), 10, 3), vec![0]);
        assert_eq!(all(&one(&[(4095, 2)]), 10, 3), vec![0, 1]);
        assert_eq!(all(&one(&[(8192, 4096), (0, 0)]), 10, 1), vec![2]);
        assert_eq!(all(&one(&[(36864, 1 << 20)]), 10, 4), vec![9]);
        // Overlapping and unsorted ranges, taken in pieces that cut spans.
        let s = one(&[(5 * 4096, 3 * 4096), (4096, 4096 * 5), (0, 1)]);
        assert_eq!(s.count(), 8);
        assert_eq!(all(&s, 10, 3), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        // A part counts only from its first cell.
        let s = CellSpans::new(&[(&[(0, 4096)], 0), (&[(0, 40960)], 8)], 4096, 10);
        assert_eq!(all(&s, 10, 7), vec![0, 8, 9]);
    }
}
