//! The repository's chunk map, loaded from every `index/` object: chunk id -> where its
//! sealed blob lies. For a backup ([`Purpose::Backup`]) two kinds of pack are left out of
//! the map, so a backup never references a chunk it cannot count on: packs marked in
//! `trash/` (condemned by garbage collection, about to be deleted), and indexes whose pack
//! object is not in the store's listing (an index left behind after its pack was lost or
//! deleted: referencing its chunks would make the new backup unrestorable).

use std::collections::{HashMap, HashSet};

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::pack::{decode_index, index_aad, PackEntry, MAX_PACK_OBJECT};
use crate::repo::{self, Repository};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// Position in `ChunkIndex::packs`.
    pub pack: u32,
    pub offset: u32,
    pub len: u32,
}

#[derive(Debug, Default)]
pub struct PackInfo {
    pub id: String,
    pub entries: Vec<PackEntry>,
    pub condemned: bool,
}

#[derive(Debug, Default)]
pub struct ChunkIndex {
    pub packs: Vec<PackInfo>,
    pub map: HashMap<ChunkId, Loc>,
}

/// Parallel small GETs (index objects, manifest headers): latency-bound, so many.
pub const FETCH_THREADS: usize = 32;

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

impl ChunkIndex {
    /// Loads every index object (see [`Purpose`] for what a backup leaves out of `map`).
    pub fn load(repo: &Repository, purpose: Purpose) -> Result<ChunkIndex> {
        let skip_condemned = purpose == Purpose::Backup;
        let store = repo.store();
        let condemned: HashSet<String> = store
            .list(repo::TRASH)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(repo::TRASH).map(str::to_string))
            .collect();
        let mut ids: Vec<String> = store
            .list(repo::INDEX)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(repo::INDEX).map(str::to_string))
            .collect();
        ids.sort();
        if let Some(c) = repo.cache() {
            // Indexes gone from the store (their pack deleted) leave the cache too.
            c.retain(repo, "index", |name| {
                ids.binary_search_by(|i| i.as_str().cmp(name)).is_ok()
            });
        }
        if purpose != Purpose::Read {
            let packs: HashSet<String> = store
                .list(repo::PACKS)?
                .into_iter()
                .filter_map(|o| o.key.rsplit('/').next().map(str::to_string))
                .collect();
            let before = ids.len();
            ids.retain(|id| packs.contains(id));
            if ids.len() < before {
                log::warn!(
                    "{}: {} pack indexes have no pack; their chunks are stored again (run `snapblk repo repair`)",
                    repo.describe(),
                    before - ids.len()
                );
            }
        }
        let loaded = crate::par::map(&ids, FETCH_THREADS, |id| -> Result<Vec<PackEntry>> {
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
        })?;
        let mut ix = ChunkIndex::default();
        for (id, entries) in ids.into_iter().zip(loaded) {
            let dead = condemned.contains(&id);
            let p = ix.packs.len() as u32;
            for e in &entries {
                if dead && skip_condemned {
                    continue;
                }
                let loc = Loc {
                    pack: p,
                    offset: e.offset,
                    len: e.len,
                };
                // Prefer a live pack when a chunk is stored twice (after a repack).
                match ix.map.get(&e.id) {
                    Some(old) if !ix.packs[old.pack as usize].condemned || dead => {}
                    _ => {
                        ix.map.insert(e.id, loc);
                    }
                }
            }
            ix.packs.push(PackInfo {
                id,
                entries,
                condemned: dead,
            });
        }
        Ok(ix)
    }

    pub fn pack_id(&self, loc: &Loc) -> &str {
        &self.packs[loc.pack as usize].id
    }
}
