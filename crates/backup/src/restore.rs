//! Restoring a backed-up snapshot into a volume, and fetching single chunks (lazy restore).
//!
//! Every chunk is checked against its id (a keyed hash of its bytes) before any of it is
//! written, so the restored image is the backed-up image or the restore fails naming the
//! bad chunk; nothing wrong is written. Chunks are fetched with ranged GETs, adjacent
//! chunks of a pack coalesced into one request.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use snapblk_core::device::AlignedVec;
use snapblk_core::Export;

use crate::chunk::Decoded;
use crate::chunks::{Chunks, Locations};
use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::index::Loc;
use crate::manifest::{Header, Table};
use crate::par::lock;
use crate::progress::Progress;
use crate::repo::{self, Repository};
use crate::tablecopy::{self, TableCopy};

/// Largest single write into the restored volume.
const MAX_WRITE: usize = 4 << 20;

/// Largest coalesced ranged GET. A download thread keeps two buffers of about this size
/// for its whole life (crate::restore::Fetched): the body as received, its chunks
/// decoded in place, and the block-aligned run the pool writes as it is; so with
/// `--downloads` 8 a restore's buffers stay near 64 MiB at any volume size, and stop
/// growing after the first requests (a thread that allocated per request let glibc's heap
/// creep by ~35 MiB over a 4 GiB restore). 4 MiB is also what S3 serves well per request
/// (the SDKs' default part size is 8).
pub(crate) const MAX_FETCH: u64 = 4 << 20;

/// Largest run of unneeded bytes inside one coalesced GET. After many incrementals a
/// backup's chunks are scattered over its chain's packs with superseded chunks between
/// them; downloading a few of those is cheaper than another request (restic fetches a
/// pack's whole needed span). Bounds the waste at about 1 MiB per needed chunk.
const MAX_GAP: u64 = 1 << 20;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub manifest: String,
    pub volume: String,
    pub snapshot: String,
    /// Where the backup came from: its pool and host.
    pub pool: String,
    pub host: String,
    pub size: u64,
    pub bytes_written: u64,
    pub bytes_downloaded: u64,
    pub chunks: u64,
    pub seconds: f64,
}

/// Reads and verifies the chunks of one table (memory grows with the table, not the
/// repository).
pub struct Fetcher {
    pub repo: Repository,
    pub index: Locations,
}

impl Fetcher {
    /// Locates every chunk of `table`; fails naming the first one no index lists.
    pub fn new(repo: &Repository, table: &Table) -> Result<Self> {
        let mut wanted: Vec<ChunkId> = table.cells.iter().map(|(_, id)| *id).collect();
        wanted.sort_unstable();
        wanted.dedup();
        wanted.shrink_to_fit();
        let f = Fetcher {
            repo: repo.clone(),
            index: Locations::load(repo, wanted)?,
        };
        if let Some(id) = f.index.first_missing() {
            return Err(BackupError::MissingChunk(id.hex()));
        }
        Ok(f)
    }

    pub fn locate(&self, id: &ChunkId) -> Result<Loc> {
        self.index
            .get(id)
            .ok_or_else(|| BackupError::MissingChunk(id.hex()))
    }

    /// Fetches and verifies one chunk.
    pub fn fetch(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        fetch_one(&self.repo, &self.index, id, &loc)
    }

    /// Fetches `ids` (sorted into ranged GETs per pack) on `threads` threads, handing each
    /// request's verified chunks to `sink` together. Stops at the first error.
    pub(crate) fn fetch_many(
        &self,
        ids: &[ChunkId],
        threads: usize,
        buffers: &Buffers,
        sink: impl Fn(&Fetched, &mut AlignedVec) -> Result<()> + Sync,
        downloaded: &AtomicU64,
    ) -> Result<()> {
        let mut items: Vec<(Loc, ChunkId)> = Vec::with_capacity(ids.len());
        for id in ids {
            items.push((self.locate(id)?, *id));
        }
        fetch_located(
            &self.repo,
            &self.index,
            items,
            Downloads {
                threads,
                max_fetch: MAX_FETCH,
                buffers,
            },
            sink,
            downloaded,
        )
    }
}

/// The verified chunks of one ranged GET, decoded where they arrived (a raw chunk is
/// used in the body's own bytes, a compressed one decompressed into `extra`). A download
/// thread keeps one and reuses its buffers for every request it makes: its memory is
/// reached on its first requests and then stays (no allocation per request, so no heap
/// growth from fragmentation over a long job).
#[derive(Default)]
pub(crate) struct Fetched {
    body: Vec<u8>,
    extra: Vec<u8>,
    chunks: Vec<(ChunkId, Decoded)>,
}

impl Fetched {
    /// Each chunk of the request (in pack order) and its data.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = (ChunkId, &[u8])> + '_ {
        self.chunks.iter().map(|(id, d)| {
            let data = match d {
                Decoded::InPlace(r) => &self.body[r.clone()],
                Decoded::Appended(r) => &self.extra[r.clone()],
            };
            (*id, data)
        })
    }
}

/// How [`fetch_located`] downloads: `threads` ranged GETs at once, each of at most
/// `max_fetch` bytes, with buffers from `buffers`.
pub(crate) struct Downloads<'a> {
    pub threads: usize,
    pub max_fetch: u64,
    pub buffers: &'a Buffers,
}

/// The buffers of download threads that come and go (a restore starts its threads again
/// for every frame of its table): a thread takes a set and gives it back when it ends, so
/// the next frame's threads reuse them instead of allocating their own.
///
/// A set is allocated once at its largest size (a body of the largest request, a run
/// buffer of the sink's largest run), never grown through smaller sizes: each growth
/// freed the smaller buffer into glibc's arenas, where its pages could stay resident, and
/// which threads grew how far differed from run to run (a restore's peak moved by ~10
/// MiB between identical runs).
#[derive(Default)]
pub(crate) struct Buffers {
    sets: Mutex<Vec<(Fetched, AlignedVec)>>,
    /// Bytes each run buffer is allocated with (0: grown as needed, for sets used once).
    run: usize,
}

impl Buffers {
    /// Sets kept and reused, their run buffers allocated at `run` bytes.
    pub(crate) fn with_run(run: usize) -> Buffers {
        Buffers {
            sets: Mutex::default(),
            run,
        }
    }
    fn take(&self, max_fetch: u64) -> (Fetched, AlignedVec) {
        let (mut got, mut run) = lock(&self.sets).pop().unwrap_or_default();
        // Bodies past the allocator's mmap threshold get a mapping of their own: its
        // untouched pages cost nothing, and it goes back to the kernel when freed.
        let body = usize::try_from(max_fetch).unwrap_or(usize::MAX);
        if got.body.capacity() < body {
            got.body = Vec::with_capacity(body);
        }
        run.reserve_total(self.run);
        (got, run)
    }
    fn give(&self, set: (Fetched, AlignedVec)) {
        lock(&self.sets).push(set);
    }
}

/// The name of a location's pack (locations number their packs).
pub(crate) trait PackNames: Sync {
    fn name_of(&self, pack: u32) -> &str;
}

impl PackNames for Locations {
    fn name_of(&self, pack: u32) -> &str {
        self.pack_name(pack)
    }
}

/// Decodes and verifies chunk `id`, read from `loc`.
fn decode(
    repo: &Repository,
    packs: &dyn PackNames,
    id: &ChunkId,
    loc: &Loc,
    sealed: &[u8],
) -> Result<Vec<u8>> {
    let max = repo.config().chunk_size as usize;
    crate::chunk::decode(repo.keys(), id, sealed, max).map_err(|detail| BackupError::BadChunk {
        chunk: id.hex(),
        pack: packs.name_of(loc.pack).to_string(),
        detail,
    })
}

/// Fetches and verifies chunk `id` at `loc`.
pub(crate) fn fetch_one(
    repo: &Repository,
    packs: &dyn PackNames,
    id: &ChunkId,
    loc: &Loc,
) -> Result<Vec<u8>> {
    let pack = packs.name_of(loc.pack);
    let b = repo.store().get_range(
        &repo::pack_key(pack),
        u64::from(loc.offset),
        u64::from(loc.len),
    )?;
    if b.len() != loc.len as usize {
        return Err(BackupError::BadChunk {
            chunk: id.hex(),
            pack: pack.to_string(),
            detail: format!("pack is truncated ({} of {} bytes)", b.len(), loc.len),
        });
    }
    decode(repo, packs, id, loc, &b)
}

/// Fetches the chunks at `items`' locations (sorted into ranged GETs per pack: gaps of
/// at most [`MAX_GAP`], at most `max_fetch` bytes each) on `threads` threads, handing
/// each request's verified chunks to `sink` together, with a block-aligned buffer the
/// thread keeps for it (data built there goes to the device without another copy). Stops
/// at the first error.
pub(crate) fn fetch_located(
    repo: &Repository,
    packs: &dyn PackNames,
    mut items: Vec<(Loc, ChunkId)>,
    how: Downloads<'_>,
    sink: impl Fn(&Fetched, &mut AlignedVec) -> Result<()> + Sync,
    downloaded: &AtomicU64,
) -> Result<()> {
    let Downloads {
        threads,
        max_fetch,
        buffers,
    } = how;
    items.sort_unstable_by_key(|(l, _)| (l.pack, l.offset));
    // Group into requests (ranges of `items`): same pack, gaps of at most MAX_GAP.
    let mut reqs: Vec<std::ops::Range<usize>> = Vec::new();
    for (k, (l, _)) in items.iter().enumerate() {
        if let Some(last) = reqs.last_mut() {
            let (first, prev) = (items[last.start].0, items[last.end - 1].0);
            let end = u64::from(prev.offset) + u64::from(prev.len);
            let new_end = u64::from(l.offset) + u64::from(l.len);
            if prev.pack == l.pack
                && u64::from(l.offset) >= end
                && u64::from(l.offset) - end <= MAX_GAP
                && new_end - u64::from(first.offset) <= max_fetch
            {
                last.end = k + 1;
                continue;
            }
        }
        reqs.push(k..k + 1);
    }
    let next = AtomicUsize::new(0);
    let err: Mutex<Option<BackupError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, reqs.len().max(1)) {
            s.spawn(|| {
                let (mut got, mut scratch) = buffers.take(max_fetch);
                loop {
                    if lock(&err).is_some() {
                        break;
                    }
                    let Some(req) = reqs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let r = fetch_request(repo, packs, &items[req.clone()], &mut got, downloaded)
                        .and_then(|()| sink(&got, &mut scratch));
                    if let Err(e) = r {
                        lock(&err).get_or_insert(e);
                        break;
                    }
                }
                buffers.give((got, scratch));
            });
        }
    });
    match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One ranged GET covering `req` (one pack, in offset order), its chunks decoded and
/// verified into `got`.
fn fetch_request(
    repo: &Repository,
    packs: &dyn PackNames,
    req: &[(Loc, ChunkId)],
    got: &mut Fetched,
    downloaded: &AtomicU64,
) -> Result<()> {
    let (first, last) = (req[0].0, req[req.len() - 1].0);
    let start = u64::from(first.offset);
    let len = u64::from(last.offset) + u64::from(last.len) - start;
    let pack = packs.name_of(first.pack);
    repo.store()
        .get_range_into(&repo::pack_key(pack), start, len, &mut got.body)?;
    downloaded.fetch_add(got.body.len() as u64, Ordering::Relaxed);
    got.extra.clear();
    got.chunks.clear();
    let max = repo.config().chunk_size as usize;
    for (l, id) in req {
        let a = (u64::from(l.offset) - start) as usize;
        let z = a + l.len as usize;
        let have = got.body.len();
        let Some(sealed) = got.body.get_mut(a..z) else {
            return Err(BackupError::BadChunk {
                chunk: id.hex(),
                pack: pack.to_string(),
                detail: format!("pack is truncated ({have} bytes from offset {start})"),
            });
        };
        let at = crate::chunk::decode_in_place(repo.keys(), id, sealed, max, &mut got.extra)
            .map_err(|detail| BackupError::BadChunk {
                chunk: id.hex(),
                pack: pack.to_string(),
                detail,
            })?;
        let at = match at {
            Decoded::InPlace(r) => Decoded::InPlace(a + r.start..a + r.end),
            d => d,
        };
        got.chunks.push((*id, at));
    }
    Ok(())
}

/// Positions of `table`'s cells ordered by chunk id (4 bytes per cell): the cells holding
/// one chunk are a run of it, found by binary search.
struct ByChunk<'a> {
    table: &'a Table,
    order: Vec<u32>,
}

impl<'a> ByChunk<'a> {
    fn new(table: &'a Table) -> Self {
        let mut order: Vec<u32> = (0..table.cells.len() as u32).collect();
        order.sort_unstable_by_key(|&i| table.cells[i as usize].1);
        ByChunk { table, order }
    }

    /// The cells holding `id`.
    fn cells(&self, id: ChunkId) -> impl Iterator<Item = u64> + '_ {
        let key = |i: &u32| self.table.cells[*i as usize].1;
        let start = self.order.partition_point(|i| key(i) < id);
        self.order[start..]
            .iter()
            .take_while(move |i| key(i) == id)
            .map(|i| self.table.cells[*i as usize].0)
    }
}

/// Writes the image of `header` into `sink` (a new, empty volume of at least its size;
/// cells not in the table are left unwritten and read as zeros).
///
/// The table is copied locally first ([`TableCopy`], under the lease: a prune + gc
/// meanwhile cannot take it away), then every frame is checked to be located before the
/// first write, then the image is written frame by frame, each with the locations of its
/// own chunks only: memory follows a frame (65,536 cells), not the volume.
pub fn run(
    repo: &Repository,
    header: &Header,
    sink: &dyn Export,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Summary> {
    let t0 = Instant::now();
    let _lease = crate::lease::Lease::shared(repo, format!("restore {}", header.name()))?;
    let copy = TableCopy::take(repo, header)?;
    let chunks = Chunks::load(repo)?;
    // Everything must be present before the first write.
    for k in 0..copy.count() {
        let wanted = tablecopy::distinct(&copy.frame(k)?.cells);
        if let Some(id) = chunks.first_missing(&wanted)? {
            return Err(BackupError::MissingChunk(id.hex()));
        }
    }
    progress.start("restore", header.stored_bytes);
    let written = AtomicU64::new(0);
    let downloaded = AtomicU64::new(0);
    let mut fetched = 0u64;
    let buffers = Buffers::with_run(MAX_WRITE);
    for k in 0..copy.count() {
        let table = copy.frame(k)?;
        if table.cells.is_empty() {
            continue;
        }
        let fetcher = Fetcher {
            repo: repo.clone(),
            index: chunks.locations(tablecopy::distinct(&table.cells))?,
        };
        if let Some(id) = fetcher.index.first_missing() {
            return Err(BackupError::MissingChunk(id.hex()));
        }
        fetched += fetcher.index.len() as u64;
        write_frame(
            header,
            &table,
            &fetcher,
            sink,
            threads,
            &buffers,
            progress,
            &written,
            &downloaded,
        )?;
    }
    sink.flush()?;
    Ok(Summary {
        manifest: header.id.clone(),
        volume: header.volume.clone(),
        pool: header.pool.clone(),
        host: header.host.clone(),
        snapshot: header.snapshot.clone(),
        size: header.size,
        bytes_written: written.into_inner(),
        bytes_downloaded: downloaded.into_inner(),
        chunks: fetched,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Writes the cells of `table` (one frame's) into `sink`, fetching their chunks.
#[allow(clippy::too_many_arguments)]
fn write_frame(
    header: &Header,
    table: &Table,
    fetcher: &Fetcher,
    sink: &dyn Export,
    threads: usize,
    buffers: &Buffers,
    progress: &dyn Progress,
    written: &AtomicU64,
    downloaded: &AtomicU64,
) -> Result<()> {
    let by_chunk = ByChunk::new(table);
    let cs = u64::from(table.chunk_size);
    fetcher.fetch_many(
        fetcher.index.ids(),
        threads,
        buffers,
        |got, run| {
            // Cells of one request are mostly adjacent: write runs of them at once.
            let mut cells: Vec<(u64, &[u8])> = Vec::new();
            for (id, data) in got.chunks() {
                for c in by_chunk.cells(id) {
                    table
                        .check_cell(c, &id, data)
                        .map_err(|d| BackupError::corrupt(repo::table_key(&header.id), d))?;
                    cells.push((c, data));
                }
            }
            cells.sort_unstable_by_key(|(c, _)| *c);
            run.clear();
            let mut start = 0u64;
            let mut next = u64::MAX;
            let flush_run = |run: &mut AlignedVec, start: u64| -> Result<()> {
                if !run.is_empty() {
                    sink.write(start * cs, run, false)?;
                    written.fetch_add(run.len() as u64, Ordering::Relaxed);
                    progress.advance(run.len() as u64);
                    run.clear();
                }
                Ok(())
            };
            for (c, data) in cells {
                if c != next || run.len() + data.len() > MAX_WRITE {
                    flush_run(run, start)?;
                    start = c;
                }
                run.extend_from_slice(data);
                next = c + 1;
            }
            flush_run(run, start)
        },
        downloaded,
    )
}
