//! The repository's chunk locations, read from the `index/` objects (one per pack).
//!
//! Backups, restores and compaction use the local chunk index instead ([`crate::chunks`]:
//! on disk, nothing in RAM per chunk stored); [`visit`] streams the index objects a batch
//! at a time for it and for gc (which decides pack by pack with the local index), and
//! for verify and repair, which still load the whole map ([`ChunkIndex`]) — the next
//! step of issue 12 moves them to the local index too.
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

/// What a job's listing of the repository shows about packs: 3 LISTs, in this order
/// (trash marks first: a pack condemned after them is still seen to exist).
pub struct Listing {
    /// Packs marked in `trash/`.
    pub condemned: HashSet<String>,
    /// Index objects (pack id, when stored), sorted.
    pub indexes: Vec<(String, u64)>,
    /// Pack objects.
    pub packs: HashSet<String>,
}

impl Listing {
    /// Lists the repository; cached index objects no longer listed are dropped.
    pub fn take(repo: &Repository) -> Result<Listing> {
        let store = repo.store();
        let condemned: HashSet<String> = store
            .list(repo::TRASH)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(repo::TRASH).map(str::to_string))
            .collect();
        let mut indexes: Vec<(String, u64)> = store
            .list(repo::INDEX)?
            .into_iter()
            .filter_map(|o| Some((o.key.strip_prefix(repo::INDEX)?.to_string(), o.modified)))
            .collect();
        indexes.sort();
        if let Some(c) = repo.cache() {
            // Indexes gone from the store (their pack deleted) leave the cache too.
            c.retain(repo, "index", |name| {
                indexes
                    .binary_search_by(|(i, _)| i.as_str().cmp(name))
                    .is_ok()
            });
        }
        let packs: HashSet<String> = store
            .list(repo::PACKS)?
            .into_iter()
            .filter_map(|o| o.key.rsplit('/').next().map(str::to_string))
            .collect();
        Ok(Listing {
            condemned,
            indexes,
            packs,
        })
    }
}

/// Calls `f` with every index object `purpose` covers (condemned ones flagged; left out
/// altogether for a backup), in pack-id order, holding at most [`BATCH`] at a time.
pub fn visit(
    repo: &Repository,
    purpose: Purpose,
    f: impl FnMut(PackInfo) -> Result<()>,
) -> Result<()> {
    visit_listed(repo, purpose, &Listing::take(repo)?, f)
}

/// As [`visit`], over a listing the caller took.
pub fn visit_listed(
    repo: &Repository,
    purpose: Purpose,
    listing: &Listing,
    mut f: impl FnMut(PackInfo) -> Result<()>,
) -> Result<()> {
    let Listing {
        condemned,
        indexes,
        packs,
    } = listing;
    let mut ids = indexes.clone();
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
pub(crate) fn read_index(repo: &Repository, id: &str) -> Result<Vec<PackEntry>> {
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

/// The first 8 bytes of a chunk id.
pub fn prefix(id: &ChunkId) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&id.0[..8]);
    u64::from_be_bytes(a)
}
