//! `backup copy SRC DST`: copies backups from one repository into another without reading
//! any volume (PBS sync jobs, restic copy, kopia sync-to).
//!
//! Each backup of the source (of the pools chosen; oldest first, so copies chain) that the
//! destination's catalog of its pool does not list (same snapshot id) is backed up into the
//! destination from an image read out of the source ([`BackupImage`]): chunks are fetched,
//! authenticated with the source key, and stored under the destination's key and chunk ids
//! (ids are keyed hashes, so two repositories with different keys share no ids). The copy
//! keeps the backup's identity — pool, host, volume, snapshot, snapshot id, times — so a
//! restore from the destination finds it as it would in the source, and its own pool's
//! later direct backups to the destination dedup against it.
//!
//! Incremental: if the destination holds an earlier backup of the same volume and pool that
//! the source also holds, the source's two tables are compared and only cells whose chunk
//! differs are read; the others are taken from the destination's table. Resumable: chunks
//! an interrupted copy stored are never uploaded again (the backup pipeline's dedup), and
//! backups copied before the interruption are skipped.
//!
//! Leases: a shared lease on the source while its chunks are read (gc there keeps them);
//! the backup pipeline takes its own on the destination.

use std::sync::{Arc, Mutex, OnceLock};

use snapblk_core::export::StatusRun;
use snapblk_core::Export;

use crate::backup::{self, Job, Summary};
use crate::catalog::{self, Catalogs};
use crate::chunks::Chunks;
use crate::error::{BackupError, Result};
use crate::frame;
use crate::lease::Lease;
use crate::manifest::{self, Header, Table};
use crate::par::lock;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::restore::Fetcher;
use crate::tablecopy::{self, TableCopy};

/// A backed-up image, read-only, served from its repository chunk by chunk. Its table is
/// a local copy (taken under the copy's lease on the source) read a frame at a time: the
/// frames being read, with their chunks' locations, are held (the backup pipeline's
/// readers move through the image in order, so two cover a frame boundary); memory
/// follows a frame, not the image.
pub struct BackupImage {
    name: String,
    size: u64,
    chunk_size: u32,
    table: TableCopy,
    chunks: Chunks,
    repo: Repository,
    /// The frames read lately, each loaded once however many readers want it (they reach
    /// a frame boundary together).
    recent: Mutex<Vec<(u64, Slot)>>,
}

/// One frame of the image: its entries and where their chunks are.
struct FrameView {
    table: Table,
    fetcher: Fetcher,
}

/// A frame as loaded once for every reader (None: its load failed).
type Slot = Arc<OnceLock<Option<FrameView>>>;

/// Frames a [`BackupImage`] holds at once.
const RECENT_FRAMES: usize = 2;

impl BackupImage {
    /// Opens `h`'s image: its table copied locally and every chunk checked to be located
    /// before anything is read (a copy fails before it uploads, naming the chunk).
    pub fn open(repo: &Repository, h: &Header) -> Result<BackupImage> {
        let table = TableCopy::take(repo, h)?;
        let chunks = Chunks::load(repo)?;
        for k in 0..table.count() {
            let wanted = tablecopy::distinct(&table.frame(k)?.cells);
            if let Some(id) = chunks.first_missing(&wanted)? {
                return Err(BackupError::MissingChunk(id.hex()));
            }
        }
        Ok(BackupImage {
            name: h.name(),
            size: h.size,
            chunk_size: h.chunk_size,
            table,
            chunks,
            repo: repo.clone(),
            recent: Mutex::new(Vec::new()),
        })
    }

    /// Frame `k` with its chunks located: loaded by the first reader that wants it while
    /// the others wait for it; the [`RECENT_FRAMES`] newest are kept.
    fn frame(&self, k: u64) -> Result<Slot> {
        let slot = {
            let mut recent = lock(&self.recent);
            match recent.iter().find(|(at, _)| *at == k) {
                Some((_, f)) => Arc::clone(f),
                None => {
                    if recent.len() >= RECENT_FRAMES {
                        // The lowest frame: readers move forward.
                        let oldest = (0..recent.len()).min_by_key(|&i| recent[i].0);
                        if let Some(i) = oldest {
                            recent.remove(i);
                        }
                    }
                    let f = Arc::new(OnceLock::new());
                    recent.push((k, Arc::clone(&f)));
                    f
                }
            }
        };
        let mut err = None;
        let got = slot.get_or_init(|| match self.load(k) {
            Ok(v) => Some(v),
            Err(e) => {
                err = Some(e);
                None
            }
        });
        if got.is_none() {
            // Not kept: the next reader tries again.
            lock(&self.recent).retain(|(_, f)| !Arc::ptr_eq(f, &slot));
            return Err(err.unwrap_or_else(|| {
                BackupError::invalid(
                    &self.name,
                    format!("frame {k} of its table could not be read (see the first error)"),
                )
            }));
        }
        Ok(slot)
    }

    /// Reads frame `k` and locates its chunks.
    fn load(&self, k: u64) -> Result<FrameView> {
        let table = self.table.frame(k)?;
        let fetcher = Fetcher {
            repo: self.repo.clone(),
            index: self.chunks.locations(tablecopy::distinct(&table.cells))?,
        };
        if let Some(id) = fetcher.index.first_missing() {
            return Err(BackupError::MissingChunk(id.hex()));
        }
        Ok(FrameView { table, fetcher })
    }

    /// Byte ranges holding data (the cells the table lists), frame by frame.
    fn allocated(&self) -> Result<Vec<(u64, u64)>> {
        let cs = u64::from(self.chunk_size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for k in 0..self.table.count() {
            let t = self.table.frame(k)?;
            for (c, _) in &t.cells {
                let off = c * cs;
                let len = t.cell_len(*c);
                match out.last_mut() {
                    Some(r) if r.0 + r.1 == off => r.1 += len,
                    _ => out.push((off, len)),
                }
            }
        }
        Ok(out)
    }
}

fn refused(what: &str) -> snapblk_core::Error {
    snapblk_core::Error::ReadOnly(format!("a backup image cannot be {what}"))
}

fn core_err(name: &str, e: BackupError) -> snapblk_core::Error {
    snapblk_core::Error::Device {
        context: format!("reading backup {name} from the source repository"),
        source: std::io::Error::other(e.to_string()),
    }
}

impl Export for BackupImage {
    fn size(&self) -> snapblk_core::Result<u64> {
        Ok(self.size)
    }
    fn read_only(&self) -> bool {
        true
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> snapblk_core::Result<()> {
        let cs = u64::from(self.chunk_size);
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or(snapblk_core::Error::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.size,
            })?;
        let mut pos = offset;
        while pos < end {
            let cell = pos / cs;
            let in_cell = pos - cell * cs;
            let n = (cs - in_cell).min(end - pos) as usize;
            let out = &mut buf[(pos - offset) as usize..][..n];
            let slot = self
                .frame(cell / frame::SEG)
                .map_err(|e| core_err(&self.name, e))?;
            let Some(f) = slot.get().and_then(Option::as_ref) else {
                return Err(core_err(
                    &self.name,
                    BackupError::invalid("table", "a frame could not be read"),
                ));
            };
            let at = f.table.cells.binary_search_by_key(&cell, |(c, _)| *c);
            match at.map(|i| f.table.cells[i].1) {
                Err(_) => out.fill(0),
                Ok(id) => {
                    let data = f.fetcher.fetch(&id).map_err(|e| core_err(&self.name, e))?;
                    f.table
                        .check_cell(cell, &id, &data)
                        .map_err(|d| core_err(&self.name, BackupError::invalid("table", d)))?;
                    out.copy_from_slice(&data[in_cell as usize..][..n]);
                }
            }
            pos += n as u64;
        }
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> snapblk_core::Result<()> {
        Err(refused("written"))
    }
    fn flush(&self) -> snapblk_core::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> snapblk_core::Result<()> {
        Err(refused("trimmed"))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> snapblk_core::Result<()> {
        Err(refused("written"))
    }
    fn block_status(&self, offset: u64, len: u64) -> snapblk_core::Result<Vec<StatusRun>> {
        // Data everywhere: the copy reads only the cells the table lists anyway.
        Ok(vec![(len.min(self.size.saturating_sub(offset)), 0)])
    }
}

/// What one backup's copy did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Copied {
    /// `vol@snap` and the source's id.
    pub backup: String,
    pub source_id: String,
    pub pool: String,
    /// The destination's summary (`already_stored` when it held it).
    pub summary: Summary,
}

/// Cells whose chunk differs between two tables of one volume (present in one only, or
/// with different chunks), as byte ranges.
fn changed(a: &Table, b: &Table) -> Vec<(u64, u64)> {
    let cs = u64::from(b.chunk_size);
    let mut cells = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.cells.len() || j < b.cells.len() {
        match (a.cells.get(i), b.cells.get(j)) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                if x.1 != y.1 {
                    cells.push(x.0);
                }
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                cells.push(x.0);
                i += 1;
            }
            (Some(_), Some(y)) => {
                cells.push(y.0);
                j += 1;
            }
            (Some(x), None) => {
                cells.push(x.0);
                i += 1;
            }
            (None, Some(y)) => {
                cells.push(y.0);
                j += 1;
            }
            (None, None) => break,
        }
    }
    cells.into_iter().map(|c| (c * cs, cs)).collect()
}

/// Copies the backups of `src` (of the pools or hosts `from` names, all if `None`; of
/// volume `volume` only if given) that `dst` lacks. Returns one entry per backup looked at.
pub fn run(
    src: &Repository,
    dst: &Repository,
    from: Option<&str>,
    volume: Option<&str>,
    progress: &dyn Progress,
) -> Result<Vec<Copied>> {
    run_except(src, dst, from, volume, &[], progress)
}

/// [`run`], leaving out the source backups whose ids `skip` lists (a destination's
/// retention would not keep them).
pub fn run_except(
    src: &Repository,
    dst: &Repository,
    from: Option<&str>,
    volume: Option<&str>,
    skip: &[String],
    progress: &dyn Progress,
) -> Result<Vec<Copied>> {
    let _lease = Lease::shared(src, "copy (reading)")?;
    let catalogs = Catalogs::load(src)?;
    let pools: Vec<&str> = match from {
        Some(f) => {
            let p = catalogs.pools_named(f);
            if p.is_empty() {
                return Err(BackupError::invalid(
                    format!("--from {f}"),
                    "names no pool or host that has backups in the source",
                ));
            }
            p
        }
        None => catalogs.pools.keys().map(String::as_str).collect(),
    };
    let mut headers: Vec<Header> = catalogs
        .headers()
        .into_iter()
        .filter(|h| pools.contains(&h.pool.as_str()))
        .filter(|h| volume.is_none_or(|v| h.volume == v))
        .filter(|h| !skip.contains(&h.id))
        .collect();
    manifest::sort(&mut headers);
    let mut out = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for h in &headers {
        let in_dst: Vec<Header> = catalog::load_pool(dst, &h.pool)?
            .map(|l| l.catalog.backups)
            .unwrap_or_default();
        // Held already: nothing is read from the source for it.
        if let Some(d) = in_dst.iter().find(|d| d.snapshot_id == h.snapshot_id) {
            out.push(Copied {
                backup: h.name(),
                source_id: h.id.clone(),
                pool: h.pool.clone(),
                summary: Summary {
                    manifest: d.id.clone(),
                    volume: d.volume.clone(),
                    snapshot: d.snapshot.clone(),
                    size: d.size,
                    base: d.base.clone(),
                    already_stored: true,
                    stats: d.stats.clone(),
                },
            });
            continue;
        }
        match copy_one(src, dst, &catalogs, &in_dst, h, progress) {
            Ok(summary) => out.push(Copied {
                backup: h.name(),
                source_id: h.id.clone(),
                pool: h.pool.clone(),
                summary,
            }),
            // One unreadable source backup does not stop the others.
            Err(e) => failed.push(format!("{} ({}): {e}", h.name(), h.id)),
        }
    }
    if !failed.is_empty() {
        return Err(BackupError::invalid(
            "copy",
            format!(
                "{} of {} backups could not be copied: {}",
                failed.len(),
                headers.len(),
                failed.join("; ")
            ),
        ));
    }
    Ok(out)
}

/// Copies one backup the destination lacks.
fn copy_one(
    src: &Repository,
    dst: &Repository,
    catalogs: &Catalogs,
    in_dst: &[Header],
    h: &Header,
    progress: &dyn Progress,
) -> Result<Summary> {
    {
        let image = BackupImage::open(src, h)?;
        let base = base_for(src, catalogs, in_dst, h, &image, dst)?;
        let job = Job {
            allocated: image.allocated()?,
            volume: h.volume.clone(),
            snapshot: h.snapshot.clone(),
            snapshot_id: h.snapshot_id,
            pool: h.pool.clone(),
            created: h.created,
            host: Some(h.host.clone()),
            base,
            readers: dst.parallelism().readers.max(src.parallelism().downloads),
            uploaders: dst.parallelism().uploaders,
            // Re-reading a chunk here is a GET from the source: never compact a copy.
            compact: false,
            source: Arc::new(image),
        };
        backup::run(dst, job, progress)
    }
}

/// The destination's backup to copy `h` incrementally against, with the changed ranges:
/// the newest one of the same pool and volume whose snapshot the source also holds.
fn base_for(
    src: &Repository,
    catalogs: &Catalogs,
    in_dst: &[Header],
    h: &Header,
    image: &BackupImage,
    dst: &Repository,
) -> Result<Option<backup::Base>> {
    let src_same: Vec<Header> = catalogs
        .pools
        .get(&h.pool)
        .map(|l| l.catalog.backups.clone())
        .unwrap_or_default();
    let mut cands: Vec<&Header> = in_dst
        .iter()
        .filter(|d| d.volume == h.volume && d.snapshot_id != h.snapshot_id)
        .filter(|d| d.chunk_size == dst.config().chunk_size)
        .collect();
    cands.sort_by_key(|d| std::cmp::Reverse((d.created, d.snapshot_id)));
    for d in cands {
        let Some(s) = src_same.iter().find(|s| s.snapshot_id == d.snapshot_id) else {
            continue;
        };
        if s.chunk_size != image.chunk_size {
            continue;
        }
        // Compared frame by frame, from a local copy of the older table.
        let old = TableCopy::take(src, s)?;
        let mut ranges = Vec::new();
        for k in 0..old.count().max(image.table.count()) {
            let frame_of = |t: &TableCopy| {
                if k < t.count() {
                    t.frame(k)
                } else {
                    Ok(Table {
                        size: t.size(),
                        chunk_size: image.chunk_size,
                        cells: Vec::new(),
                    })
                }
            };
            ranges.extend(changed(&frame_of(&old)?, &frame_of(&image.table)?));
        }
        return Ok(Some((d.clone(), ranges)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::ChunkId;

    #[test]
    fn changed_cells_of_two_tables() {
        let t = |cells: &[(u64, u8)]| Table {
            size: 10 * 4096,
            chunk_size: 4096,
            cells: cells.iter().map(|(c, b)| (*c, ChunkId([*b; 32]))).collect(),
        };
        let a = t(&[(0, 1), (2, 2), (3, 3), (7, 7)]);
        let b = t(&[(0, 1), (2, 9), (4, 4), (7, 7), (9, 9)]);
        assert_eq!(
            changed(&a, &b),
            [(2, 2), (3, 3), (4, 4), (9, 9)].map(|(c, _)| (c * 4096, 4096))
        );
        assert!(changed(&a, &a).is_empty());
    }
}
