//! The repository's chunk locations, read from the `index/` objects (one per pack).
//!
//! Memory is bounded by the job, not the repository: indexes are read a batch at a time
//! ([`visit`]) and each job keeps only what it needs —
//! - a backup keeps [`KnownChunks`]: the first 8 bytes of every stored chunk id, sorted
//!   (8 bytes per chunk). A hit is a candidate only; before a backup commits, every chunk
//!   it references is confirmed by full id against the indexes ([`missing`]), so a
//!   prefix collision costs a re-read, never a wrong reference;
//! - a restore keeps [`Locations`] of the chunks its table names, and nothing else;
//! - gc, verify and repair load the whole map ([`ChunkIndex`]).
//!
//! For a backup ([`Purpose::Backup`]) two kinds of pack are left out, so a backup never
//! references a chunk it cannot count on: packs marked in `trash/` (condemned by garbage
//! collection, about to be deleted), and indexes whose pack object is not in the store's
//! listing (an index left behind after its pack was lost or deleted: referencing its
//! chunks would make the new backup unrestorable).
//!
//! A chunk may be stored in several packs (a gc repack, a re-store after a lost pack, two
//! pools storing it at once, a backup compacting its packs). Every reader picks the same
//! copy ([`PackInfo::rank`]): a pack that exists before one that does not, a live one
//! before a condemned one, then the newest index object, then the lowest pack id. So gc
//! keeps exactly the copies restores read, a compacted copy supersedes the old ones (which
//! become garbage), and no job locates a chunk in a pack that is gone.
//!
//! Threading: [`visit`] fetches each batch on [`FETCH_THREADS`] threads and calls its
//! visitor on the caller's thread, in pack-id order.

use std::collections::{HashMap, HashSet};

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::pack::{decode_index, index_aad, PackEntry, MAX_PACK_OBJECT};
use crate::repo::{self, Repository};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// Position in the pack list of the map holding it.
    pub pack: u32,
    pub offset: u32,
    pub len: u32,
}

#[derive(Debug, Default)]
pub struct PackInfo {
    pub id: String,
    pub entries: Vec<PackEntry>,
    pub condemned: bool,
    /// When its index object was stored (seconds; 0 if unknown).
    pub modified: u64,
    /// Whether the pack object itself is in the store's listing.
    pub exists: bool,
}

/// What decides which copy of a chunk is read: larger wins, ties go to the pack visited
/// first (the lowest id).
pub type Rank = (bool, bool, u64);

impl PackInfo {
    pub fn rank(&self) -> Rank {
        (self.exists, !self.condemned, self.modified)
    }
}

/// The whole map, every pack's entries kept (gc, verify, repair).
#[derive(Debug, Default)]
pub struct ChunkIndex {
    pub packs: Vec<PackInfo>,
    pub map: HashMap<ChunkId, Loc>,
}

/// Parallel small GETs (index objects, manifest headers): latency-bound, so many.
pub const FETCH_THREADS: usize = 32;

/// Indexes fetched and decoded at a time by [`visit`] (as many as fetch threads): with
/// 8 MiB packs of 64 KiB chunks about 5 KiB each decoded, of 4 KiB chunks 80 KiB, so a
/// batch holds at most a few MiB whatever the repository's size.
const BATCH: usize = FETCH_THREADS;

/// What the chunk map is loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Checking or collecting: every index, as stored.
    Read,
    /// Restoring: every index whose pack exists (condemned ones included: they still
    /// hold the data until gc deletes them), so a chunk stored again after its first pack
    /// was lost is read from where it is.
    Restore,
    /// Deduplicating a new backup against: only chunks in packs that exist and are not
    /// condemned.
    Backup,
}

/// Calls `f` with every index object `purpose` covers (condemned ones flagged; left out
/// altogether for a backup), in pack-id order, holding at most [`BATCH`] at a time.
pub fn visit(
    repo: &Repository,
    purpose: Purpose,
    mut f: impl FnMut(PackInfo) -> Result<()>,
) -> Result<()> {
    let store = repo.store();
    let condemned: HashSet<String> = store
        .list(repo::TRASH)?
        .into_iter()
        .filter_map(|o| o.key.strip_prefix(repo::TRASH).map(str::to_string))
        .collect();
    let mut ids: Vec<(String, u64)> = store
        .list(repo::INDEX)?
        .into_iter()
        .filter_map(|o| Some((o.key.strip_prefix(repo::INDEX)?.to_string(), o.modified)))
        .collect();
    ids.sort();
    if let Some(c) = repo.cache() {
        // Indexes gone from the store (their pack deleted) leave the cache too.
        c.retain(repo, "index", |name| {
            ids.binary_search_by(|(i, _)| i.as_str().cmp(name)).is_ok()
        });
    }
    let packs: HashSet<String> = store
        .list(repo::PACKS)?
        .into_iter()
        .filter_map(|o| o.key.rsplit('/').next().map(str::to_string))
        .collect();
    if purpose != Purpose::Read {
        let before = ids.len();
        ids.retain(|(id, _)| packs.contains(id));
        if ids.len() < before {
            log::warn!(
                "{}: {} pack indexes have no pack; their chunks are stored again (run `snapblk repo repair`)",
                repo.describe(),
                before - ids.len()
            );
        }
    }
    if purpose == Purpose::Backup {
        ids.retain(|(id, _)| !condemned.contains(id));
    }
    for batch in ids.chunks(BATCH) {
        let loaded = crate::par::map(batch, FETCH_THREADS, |(id, _)| read_index(repo, id))?;
        for ((id, modified), entries) in batch.iter().zip(loaded) {
            f(PackInfo {
                condemned: condemned.contains(id),
                exists: packs.contains(id),
                modified: *modified,
                id: id.clone(),
                entries,
            })?;
        }
    }
    Ok(())
}

/// One pack's index, from the local cache or the store, authenticated.
fn read_index(repo: &Repository, id: &str) -> Result<Vec<PackEntry>> {
    let key = repo::index_key(id);
    crate::cache::get_with(repo, &key, MAX_PACK_OBJECT, |sealed| {
        let plain = repo.keys().open(sealed, &index_aad(id)).ok_or_else(|| {
            BackupError::corrupt(
                &key,
                "fails authentication (altered, moved from another pack's name, or another repository's)",
            )
        })?;
        decode_index(&plain, None).map_err(|d| BackupError::corrupt(&key, d))
    })
}

/// Adds `e` of pack `p` to `map` unless the copy there ranks at least as high.
fn place(map: &mut HashMap<ChunkId, Loc>, rank: impl Fn(u32) -> Rank, p: u32, e: &PackEntry) {
    let loc = Loc {
        pack: p,
        offset: e.offset,
        len: e.len,
    };
    match map.get(&e.id) {
        Some(old) if rank(old.pack) >= rank(p) => {}
        _ => {
            map.insert(e.id, loc);
        }
    }
}

impl ChunkIndex {
    /// Loads every index object (see [`Purpose`] for what a backup leaves out).
    pub fn load(repo: &Repository, purpose: Purpose) -> Result<ChunkIndex> {
        let mut ix = ChunkIndex::default();
        visit(repo, purpose, |pack| {
            let p = ix.packs.len() as u32;
            let mine = pack.rank();
            for e in &pack.entries {
                let packs = &ix.packs;
                place(
                    &mut ix.map,
                    |q| {
                        if q == p {
                            mine
                        } else {
                            packs[q as usize].rank()
                        }
                    },
                    p,
                    e,
                );
            }
            ix.packs.push(pack);
            Ok(())
        })?;
        Ok(ix)
    }

    pub fn pack_id(&self, loc: &Loc) -> &str {
        &self.packs[loc.pack as usize].id
    }
}

/// Where the chunks one job reads lie: only those chunks, and the packs holding them.
/// Sorted vectors, no maps: 44 bytes per chunk (its id and location).
#[derive(Debug, Default)]
pub struct Locations {
    packs: Vec<(String, Rank)>,
    /// Sorted, distinct.
    ids: Vec<ChunkId>,
    /// `locs[i]` locates `ids[i]`; `pack == NOWHERE` where no index lists it.
    locs: Vec<Loc>,
}

const NOWHERE: u32 = u32::MAX;

impl Locations {
    /// Locates every chunk of `wanted` (sorted, distinct) that the indexes list
    /// ([`Purpose::Restore`]). Where a chunk has several copies, a job reads the one in a
    /// pack that exists and is live (as every reader, [`PackInfo::rank`]), and among
    /// those the one in the pack holding most of the job's own chunks, then the newest:
    /// a backup's chunks are read from as few packs as its copies allow (an old backup
    /// from its own packs, the newest from the packs compaction wrote for it). Memory:
    /// 16 bytes per copy found besides the 44 per chunk.
    pub fn load(repo: &Repository, wanted: Vec<ChunkId>) -> Result<Locations> {
        Self::load_and(repo, wanted, |_| {})
    }

    /// [`Locations::load`], showing every index visited to `also` too (one pass serves
    /// two needs: a backup's dedup prefixes and its compaction plan).
    pub fn load_and(
        repo: &Repository,
        wanted: Vec<ChunkId>,
        mut also: impl FnMut(&PackInfo),
    ) -> Result<Locations> {
        let nowhere = Loc {
            pack: NOWHERE,
            offset: 0,
            len: 0,
        };
        let mut out = Locations {
            packs: Vec::new(),
            locs: vec![nowhere; wanted.len()],
            ids: wanted,
        };
        // Every copy of a wanted chunk: (chunk, its location); and per pack, the bytes of
        // wanted chunks it holds.
        let mut copies: Vec<(u32, Loc)> = Vec::new();
        let mut held: Vec<u64> = Vec::new();
        visit(repo, Purpose::Restore, |pack| {
            also(&pack);
            let p = out.packs.len() as u32;
            let mut bytes = 0u64;
            for e in &pack.entries {
                let Ok(i) = out.ids.binary_search(&e.id) else {
                    continue;
                };
                copies.push((
                    i as u32,
                    Loc {
                        pack: p,
                        offset: e.offset,
                        len: e.len,
                    },
                ));
                bytes += u64::from(e.len);
            }
            if bytes > 0 {
                out.packs.push((pack.id.clone(), pack.rank()));
                held.push(bytes);
            }
            Ok(())
        })?;
        let key = |l: &Loc, packs: &[(String, Rank)]| {
            let (exists, live, modified) = packs[l.pack as usize].1;
            (exists, live, held[l.pack as usize], modified)
        };
        for (i, loc) in copies {
            let cur = out.locs[i as usize];
            // Ties go to the copy found first (the lower pack id).
            if cur.pack == NOWHERE || key(&loc, &out.packs) > key(&cur, &out.packs) {
                out.locs[i as usize] = loc;
            }
        }
        Ok(out)
    }

    pub fn get(&self, id: &ChunkId) -> Option<Loc> {
        let i = self.ids.binary_search(id).ok()?;
        Some(self.locs[i]).filter(|l| l.pack != NOWHERE)
    }

    /// The first chunk asked for that no index lists.
    pub fn first_missing(&self) -> Option<&ChunkId> {
        self.ids
            .iter()
            .zip(&self.locs)
            .find(|(_, l)| l.pack == NOWHERE)
            .map(|(id, _)| id)
    }

    /// Every chunk asked for, sorted.
    pub fn ids(&self) -> &[ChunkId] {
        &self.ids
    }

    pub fn pack_id(&self, loc: &Loc) -> &str {
        &self.packs[loc.pack as usize].0
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The first 8 bytes of a chunk id, the key of [`KnownChunks`].
pub fn prefix(id: &ChunkId) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&id.0[..8]);
    u64::from_be_bytes(a)
}

/// Which chunks a backup may skip storing: the sorted 8-byte prefixes of every chunk in a
/// live pack. Candidates only; [`missing`] confirms by full id before the backup commits.
#[derive(Debug, Default)]
pub struct KnownChunks {
    prefixes: Vec<u64>,
}

impl KnownChunks {
    pub fn load(repo: &Repository) -> Result<KnownChunks> {
        let mut prefixes = Vec::new();
        visit(repo, Purpose::Backup, |pack| {
            prefixes.extend(pack.entries.iter().map(|e| prefix(&e.id)));
            Ok(())
        })?;
        Ok(Self::from_prefixes(prefixes))
    }

    /// [`KnownChunks::load`] and the [`Locations`] of `wanted` in one pass over the
    /// indexes (the packs a backup may dedup against are those a restore reads, less the
    /// condemned ones).
    pub fn load_with_locations(
        repo: &Repository,
        wanted: Vec<ChunkId>,
    ) -> Result<(KnownChunks, Locations)> {
        let mut prefixes = Vec::new();
        let locs = Locations::load_and(repo, wanted, |pack| {
            if !pack.condemned {
                prefixes.extend(pack.entries.iter().map(|e| prefix(&e.id)));
            }
        })?;
        Ok((Self::from_prefixes(prefixes), locs))
    }

    fn from_prefixes(mut prefixes: Vec<u64>) -> KnownChunks {
        prefixes.sort_unstable();
        prefixes.dedup();
        prefixes.shrink_to_fit();
        KnownChunks { prefixes }
    }

    /// Whether a chunk with `id`'s prefix is stored (probably `id` itself).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.prefixes.binary_search(&prefix(id)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }
}

/// The chunks of `cells` not in a live pack now ([`Purpose::Backup`]): what a backup about
/// to commit must store again. Memory: 12 bytes per cell (sorted id prefixes and their
/// positions; a prefix match is confirmed against the cell's full id) and a bit per cell.
pub fn missing(repo: &Repository, cells: &[(u64, ChunkId)]) -> Result<HashSet<ChunkId>> {
    let mut order: Vec<u32> = (0..cells.len() as u32).collect();
    order.sort_unstable_by_key(|&i| prefix(&cells[i as usize].1));
    let keys: Vec<u64> = order
        .iter()
        .map(|&i| prefix(&cells[i as usize].1))
        .collect();
    let mut found = vec![0u64; cells.len().div_ceil(64)];
    visit(repo, Purpose::Backup, |pack| {
        for e in &pack.entries {
            let k = prefix(&e.id);
            let start = keys.partition_point(|x| *x < k);
            for (&key, &i) in keys[start..].iter().zip(&order[start..]) {
                if key != k {
                    break;
                }
                let i = i as usize;
                if cells[i].1 == e.id {
                    found[i / 64] |= 1 << (i % 64);
                }
            }
        }
        Ok(())
    })?;
    Ok(cells
        .iter()
        .enumerate()
        .filter(|(i, _)| found[i / 64] & (1 << (i % 64)) == 0)
        .map(|(_, (_, id))| *id)
        .collect())
}
