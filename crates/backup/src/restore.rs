//! Restoring a backed-up snapshot into a volume, and fetching single chunks (lazy restore).
//!
//! Every chunk is checked against its id (a keyed hash of its bytes) before any of it is
//! written, so the restored image is the backed-up image or the restore fails naming the
//! bad chunk; nothing wrong is written. Chunks are fetched with ranged GETs, adjacent
//! chunks of a pack coalesced into one request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use snapblk_core::Export;

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::index::{ChunkIndex, Loc};
use crate::manifest::{self, Header, Table};
use crate::par::lock;
use crate::progress::Progress;
use crate::repo::{self, Repository};

/// Largest coalesced ranged GET.
const MAX_FETCH: u64 = 16 << 20;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub manifest: String,
    pub volume: String,
    pub snapshot: String,
    pub size: u64,
    pub bytes_written: u64,
    pub bytes_downloaded: u64,
    pub chunks: u64,
    pub seconds: f64,
}

/// Reads and verifies chunks of one repository.
pub struct Fetcher {
    pub repo: Repository,
    pub index: ChunkIndex,
}

impl Fetcher {
    pub fn new(repo: &Repository) -> Result<Self> {
        Ok(Fetcher {
            repo: repo.clone(),
            index: ChunkIndex::load(repo, false)?,
        })
    }

    pub fn locate(&self, id: &ChunkId) -> Result<Loc> {
        self.index
            .map
            .get(id)
            .copied()
            .ok_or_else(|| BackupError::MissingChunk(id.hex()))
    }

    fn decode(&self, id: &ChunkId, loc: &Loc, sealed: &[u8]) -> Result<Vec<u8>> {
        let max = self.repo.config().chunk_size as usize;
        crate::chunk::decode(self.repo.keys(), id, sealed, max).map_err(|detail| {
            BackupError::BadChunk {
                chunk: id.hex(),
                pack: self.index.pack_id(loc).to_string(),
                detail,
            }
        })
    }

    /// Fetches and verifies one chunk.
    pub fn fetch(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        let key = repo::pack_key(self.index.pack_id(&loc));
        let b = self
            .repo
            .store()
            .get_range(&key, u64::from(loc.offset), u64::from(loc.len))?;
        if b.len() != loc.len as usize {
            return Err(BackupError::BadChunk {
                chunk: id.hex(),
                pack: self.index.pack_id(&loc).to_string(),
                detail: format!("pack is truncated ({} of {} bytes)", b.len(), loc.len),
            });
        }
        self.decode(id, &loc, &b)
    }

    /// Fetches `ids` (sorted into ranged GETs per pack) on `threads` threads, handing each
    /// verified chunk to `sink`. Stops at the first error.
    pub fn fetch_many(
        &self,
        ids: &[ChunkId],
        threads: usize,
        sink: impl Fn(&ChunkId, Vec<u8>) -> Result<()> + Sync,
        downloaded: &AtomicU64,
    ) -> Result<()> {
        let mut locs: Vec<(Loc, ChunkId)> = Vec::with_capacity(ids.len());
        for id in ids {
            locs.push((self.locate(id)?, *id));
        }
        locs.sort_unstable_by_key(|(l, _)| (l.pack, l.offset));
        // Group into requests: same pack, contiguous or nearly (gap <= 64 KiB).
        let mut reqs: Vec<Vec<(Loc, ChunkId)>> = Vec::new();
        for (l, id) in locs {
            if let Some(last) = reqs.last_mut() {
                let (first, prev) = (last[0].0, last[last.len() - 1].0);
                let end = u64::from(prev.offset) + u64::from(prev.len);
                let new_end = u64::from(l.offset) + u64::from(l.len);
                if prev.pack == l.pack
                    && u64::from(l.offset) >= end
                    && u64::from(l.offset) - end <= 64 << 10
                    && new_end - u64::from(first.offset) <= MAX_FETCH
                {
                    last.push((l, id));
                    continue;
                }
            }
            reqs.push(vec![(l, id)]);
        }
        let next = AtomicUsize::new(0);
        let err: Mutex<Option<BackupError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.clamp(1, reqs.len().max(1)) {
                s.spawn(|| loop {
                    if lock(&err).is_some() {
                        return;
                    }
                    let Some(req) = reqs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    if let Err(e) = self.fetch_request(req, &sink, downloaded) {
                        lock(&err).get_or_insert(e);
                        return;
                    }
                });
            }
        });
        match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn fetch_request(
        &self,
        req: &[(Loc, ChunkId)],
        sink: &(impl Fn(&ChunkId, Vec<u8>) -> Result<()> + Sync),
        downloaded: &AtomicU64,
    ) -> Result<()> {
        let (first, last) = (req[0].0, req[req.len() - 1].0);
        let start = u64::from(first.offset);
        let len = u64::from(last.offset) + u64::from(last.len) - start;
        let pack = self.index.pack_id(&first);
        let b = self
            .repo
            .store()
            .get_range(&repo::pack_key(pack), start, len)?;
        downloaded.fetch_add(b.len() as u64, Ordering::Relaxed);
        for (l, id) in req {
            let a = (u64::from(l.offset) - start) as usize;
            let z = a + l.len as usize;
            let Some(sealed) = b.get(a..z) else {
                return Err(BackupError::BadChunk {
                    chunk: id.hex(),
                    pack: pack.to_string(),
                    detail: format!("pack is truncated ({} bytes from offset {start})", b.len()),
                });
            };
            sink(id, self.decode(id, l, sealed)?)?;
        }
        Ok(())
    }
}

/// Chunk id -> the cells holding it.
pub fn cells_by_chunk(table: &Table) -> HashMap<ChunkId, Vec<u64>> {
    let mut m: HashMap<ChunkId, Vec<u64>> = HashMap::new();
    for (c, id) in &table.cells {
        m.entry(*id).or_default().push(*c);
    }
    m
}

/// Writes the image of `header` into `sink` (a new, empty volume of at least its size;
/// cells not in the table are left unwritten and read as zeros).
pub fn run(
    repo: &Repository,
    header: &Header,
    sink: &dyn Export,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Summary> {
    let t0 = Instant::now();
    let table = manifest::read_table(repo, header)?;
    let fetcher = Fetcher::new(repo)?;
    let by_chunk = cells_by_chunk(&table);
    let ids: Vec<ChunkId> = by_chunk.keys().copied().collect();
    // Everything must be present before the first write.
    for id in &ids {
        fetcher.locate(id)?;
    }
    progress.start("restore", header.stored_bytes);
    let written = AtomicU64::new(0);
    let downloaded = AtomicU64::new(0);
    let cs = u64::from(table.chunk_size);
    fetcher.fetch_many(
        &ids,
        threads,
        |id, data| {
            for &c in by_chunk.get(id).map(Vec::as_slice).unwrap_or(&[]) {
                let len = table.cell_len(c) as usize;
                if data.len() != len {
                    return Err(BackupError::corrupt(
                        repo::table_key(&header.id),
                        format!(
                            "cell {c} is {len} bytes but chunk {} holds {}",
                            id.hex(),
                            data.len()
                        ),
                    ));
                }
                sink.write(c * cs, &data, false)?;
                written.fetch_add(len as u64, Ordering::Relaxed);
                progress.advance(len as u64);
            }
            Ok(())
        },
        &downloaded,
    )?;
    sink.flush()?;
    Ok(Summary {
        manifest: header.id.clone(),
        volume: header.volume.clone(),
        snapshot: header.snapshot.clone(),
        size: header.size,
        bytes_written: written.into_inner(),
        bytes_downloaded: downloaded.into_inner(),
        chunks: ids.len() as u64,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
