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

use crate::config::VERSION_GENERATIONS;
use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::generation;
use crate::lease::Lease;
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

/// A pack's index object as listed: `index/<id>` (formats up to 4) or
/// `ix/<t>-<id>-<size>` (format 5: `t` the writer's [`Lease::stamp`], 13 decimal digits
/// of milliseconds, so keys sort by when they were written and a listing can start
/// after a time; `size` the pack object's, so a view knows what is stored without
/// listing `packs/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    pub id: String,
    /// `t` of an `ix/` key; None for `index/<id>`.
    pub stamp: Option<u64>,
    /// When the store says the object was stored (seconds; 0 if unknown): what ranks
    /// copies of a chunk ([`PackInfo::rank`]).
    pub modified: u64,
    /// The pack object's size: from an `ix/` key, or from a listing of `packs/` (0 if
    /// none was listed).
    pub size: u64,
}

/// Digits of an `ix/` key's time.
const STAMP_DIGITS: usize = 13;

impl Indexed {
    /// The object's key in the store.
    pub fn key(&self) -> String {
        match self.stamp {
            Some(t) => ix_key(t, &self.id, self.size),
            None => repo::index_key(&self.id),
        }
    }

    /// The index object a listed key names; None for a key of neither form.
    pub fn parse(key: &str, modified: u64) -> Option<Indexed> {
        let plain = |id: &str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric());
        if let Some(id) = key.strip_prefix(repo::INDEX) {
            return plain(id).then(|| Indexed {
                id: id.to_string(),
                stamp: None,
                modified,
                size: 0,
            });
        }
        let mut parts = key.strip_prefix(repo::IX)?.split('-');
        let (t, id, size) = (parts.next()?, parts.next()?, parts.next()?);
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if parts.next().is_some() || t.len() != STAMP_DIGITS || !digits(t) || !digits(size) {
            return None;
        }
        let (stamp, size) = (t.parse().ok()?, size.parse().ok()?);
        plain(id).then(|| Indexed {
            id: id.to_string(),
            stamp: Some(stamp),
            modified,
            size,
        })
    }
}

/// `ix/<t>-<id>-<size>`.
pub fn ix_key(stamp: u64, id: &str, size: u64) -> String {
    format!(
        "{}{stamp:0width$}-{id}-{size}",
        repo::IX,
        width = STAMP_DIGITS
    )
}

/// Where listing `ix/` starts to return the keys stamped at or after `t`.
pub fn ix_after(t: u64) -> String {
    format!("{}{t:0width$}", repo::IX, width = STAMP_DIGITS)
}

/// Stores pack `id`'s sealed index object where the repository's format keeps it, and
/// in the local cache (as `index/<id>` whatever its store key). Format 5: under an `ix/`
/// key stamped by `lease`, checked first — a writer whose lease lapsed (paused past its
/// life: gc may have deleted its pack as an orphan meanwhile) must not make that pack
/// look present (docs/design.md §12 "Index generations", Writers).
pub(crate) fn put_index(
    repo: &Repository,
    lease: Option<&Lease>,
    id: &str,
    pack_size: u64,
    index: &[u8],
) -> Result<()> {
    let key = if repo.config().version >= VERSION_GENERATIONS {
        let lease = lease.ok_or_else(|| {
            BackupError::invalid(
                format!("index of pack {id} in {}", repo.describe()),
                "a format-5 index object is written under a lease",
            )
        })?;
        lease.check()?;
        ix_key(lease.stamp(), id, pack_size)
    } else {
        repo::index_key(id)
    };
    repo.store().put(&key, index)?;
    if let Some(c) = repo.cache() {
        c.put(repo, &repo::index_key(id), index);
        note_seen(repo, id);
    }
    Ok(())
}

/// Where this host notes a pack it wrote or found by a HEAD (crate::chunks, confirming
/// packs a view names only through its `ix/` listing).
fn seen_key(id: &str) -> String {
    format!("seen/{id}")
}

/// Notes in the local cache that pack `id` exists (it was just written, or a HEAD found
/// it): later jobs of this host send it no HEAD. A pack only leaves a view by gc (its
/// generation lists it deleted, its index object goes), so a note never makes a pack
/// gc deleted look present; a pack lost by other means is what gc, verify and repair
/// report.
pub(crate) fn note_seen(repo: &Repository, id: &str) {
    if let Some(c) = repo.cache() {
        c.put(repo, &seen_key(id), b"");
    }
}

/// Whether this host noted pack `id` ([`note_seen`]).
pub(crate) fn was_seen(repo: &Repository, id: &str) -> bool {
    repo.cache()
        .is_some_and(|c| c.get(repo, &seen_key(id), 0).is_some())
}

/// Index objects under both prefixes, sorted by pack id; a pack with two (an `index/`
/// key and an `ix/` key, left by `repo repair` or an upgrade) is listed once, by its
/// newest key.
pub fn list_indexes(repo: &Repository) -> Result<Vec<Indexed>> {
    let store = repo.store();
    let mut out: Vec<Indexed> = Vec::new();
    for prefix in [repo::INDEX, repo::IX] {
        out.extend(
            store
                .list(prefix)?
                .into_iter()
                .filter_map(|o| Indexed::parse(&o.key, o.modified)),
        );
    }
    out.sort_by(|a, b| a.id.cmp(&b.id).then(b.stamp.cmp(&a.stamp)));
    out.dedup_by(|later, first| later.id == first.id);
    Ok(out)
}

/// What a job's listing of the repository shows about packs: LISTs of `trash/`, then
/// the index objects, then `packs/` (trash marks first: a pack condemned after them is
/// still seen to exist).
pub struct Listing {
    /// Packs marked in `trash/`.
    pub condemned: HashSet<String>,
    /// Index objects, sorted by pack id.
    pub indexes: Vec<Indexed>,
    /// Pack objects (a view: every pack its generation or its `ix/` listing names).
    pub packs: HashSet<String>,
    /// Packs a view takes to exist only because their index object is listed (written
    /// since its generation's cut): a backup confirms those its references use with a
    /// HEAD ([`crate::chunks::Chunks::missing`]). Empty for a full listing.
    pub unconfirmed: HashSet<String>,
}

/// Loads of a view started over when gc retired the generation being read.
const VIEW_ATTEMPTS: usize = 4;

impl Listing {
    /// Lists the repository; cached index objects no longer listed are dropped.
    pub fn take(repo: &Repository) -> Result<Listing> {
        let store = repo.store();
        let condemned: HashSet<String> = store
            .list(repo::TRASH)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(repo::TRASH).map(str::to_string))
            .collect();
        let mut indexes = list_indexes(repo)?;
        if let Some(c) = repo.cache() {
            // Indexes gone from the store (their pack deleted) leave the cache too.
            c.retain(repo, "index", |name| find(&indexes, name).is_some());
        }
        let sizes: HashMap<String, u64> = store
            .list(repo::PACKS)?
            .into_iter()
            .filter_map(|o| Some((o.key.rsplit('/').next()?.to_string(), o.size)))
            .collect();
        for i in indexes.iter_mut().filter(|i| i.stamp.is_none()) {
            i.size = sizes.get(&i.id).copied().unwrap_or(0);
        }
        let packs: HashSet<String> = sizes.into_keys().collect();
        Ok(Listing {
            condemned,
            indexes,
            packs,
            unconfirmed: HashSet::new(),
        })
    }

    /// Packs listed with an index object and a pack object, and their bytes.
    pub fn stored(&self) -> (u64, u64) {
        self.indexes
            .iter()
            .filter(|i| self.packs.contains(&i.id))
            .fold((0, 0), |(n, b), i| (n + 1, b + i.size))
    }

    /// What a job (backup, restore, verify of one backup, `backup list`) lists: from
    /// format 5 a view ([`Listing::view`]: requests independent of the packs stored),
    /// else the whole repository ([`Listing::take`]).
    pub fn for_job(repo: &Repository) -> Result<Listing> {
        if repo.config().version >= VERSION_GENERATIONS {
            Listing::view(repo)
        } else {
            Listing::take(repo)
        }
    }

    /// A format-5 job's view (docs/design.md §12 "Index generations", A job's view):
    /// LIST `trash/`, LIST `gen/`, GET the newest head (its parts from the local cache
    /// once fetched), LIST `ix/` after the generation's cut. A pack is present if the
    /// generation or that listing names it and no recent gc run recorded it deleted.
    /// No listing of `index/` or `packs/`.
    pub fn view(repo: &Repository) -> Result<Listing> {
        let store = repo.store();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let condemned: HashSet<String> = store
                .list(repo::TRASH)?
                .into_iter()
                .filter_map(|o| o.key.strip_prefix(repo::TRASH).map(str::to_string))
                .collect();
            let (heads, _) = generation::list(repo)?;
            let Some(&(newest, _)) = heads.last() else {
                return Err(BackupError::invalid(
                    format!("{} (format {})", repo.describe(), repo.config().version),
                    "holds no index generation (gen/): it was not created or upgraded by snapblk, or they were deleted by hand; run `snapblk repo gc` to write one",
                ));
            };
            let loaded = match generation::read(repo, newest) {
                // Retired by a gc between our listing and the read: list again.
                Err(BackupError::Store(e)) if e.is_not_found() && attempt < VIEW_ATTEMPTS => {
                    continue
                }
                r => r?,
            };
            match repo.check_index_generation(newest, &loaded.head_hash) {
                // Another job of this host may have read a generation gc wrote after our
                // listing of `gen/` (and raised the mark): list again before calling it a
                // rollback.
                Err(BackupError::IndexRolledBack { .. }) if attempt < VIEW_ATTEMPTS => continue,
                r => r?,
            }
            let g = loaded.generation;
            let after = ix_after(g.cut_ms);
            let deleted: HashSet<[u8; 32]> = g.deleted.iter().map(|d| d.0).collect();
            // (Consumed: the generation's records are not held beside their entries.)
            let mut indexes: Vec<Indexed> = g
                .packs
                .into_iter()
                .map(|p| Indexed {
                    id: generation::id_string(&p.id),
                    stamp: p.stamp,
                    modified: p.modified,
                    size: p.size,
                })
                .collect();
            let named = indexes.len();
            for o in store.list_after(repo::IX, &after)? {
                let Some(i) = Indexed::parse(&o.key, o.modified) else {
                    continue;
                };
                if generation::id_bytes(&i.id).is_some_and(|b| deleted.contains(&b)) {
                    continue;
                }
                indexes.push(i);
            }
            drop(deleted);
            // Packs only the window names (the generation's entries are sorted by id: hex
            // of the ids it sorts by).
            let in_generation = |id: &str| {
                indexes[..named]
                    .binary_search_by(|x| x.id.as_str().cmp(id))
                    .is_ok()
            };
            let unconfirmed: HashSet<String> = indexes[named..]
                .iter()
                .filter(|i| !in_generation(&i.id))
                .map(|i| i.id.clone())
                .collect();
            indexes.sort_by(|a, b| a.id.cmp(&b.id));
            // Equal ids (a pack in the generation and the window): the sort is stable and
            // the generation's entry came first, so keep the first of each id (the rank
            // value gc recorded).
            indexes.dedup_by(|later, first| later.id == first.id);
            if let Some(c) = repo.cache() {
                c.retain(repo, "index", |name| find(&indexes, name).is_some());
                c.retain(repo, "seen", |name| find(&indexes, name).is_some());
            }
            let unconfirmed: HashSet<String> = unconfirmed
                .into_iter()
                .filter(|id| !was_seen(repo, id))
                .collect();
            let packs: HashSet<String> = indexes.iter().map(|i| i.id.clone()).collect();
            return Ok(Listing {
                condemned,
                indexes,
                packs,
                unconfirmed,
            });
        }
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
        ..
    } = listing;
    let mut ids = indexes.clone();
    if purpose != Purpose::Read {
        let before = ids.len();
        ids.retain(|i| packs.contains(&i.id));
        if ids.len() < before {
            log::warn!(
                "{}: {} pack indexes have no pack; their chunks are stored again (run `snapblk repo repair`)",
                repo.describe(),
                before - ids.len()
            );
        }
    }
    if purpose == Purpose::Backup {
        ids.retain(|i| !condemned.contains(&i.id));
    }
    for batch in ids.chunks(BATCH) {
        let loaded = crate::par::map(batch, FETCH_THREADS, |i| read_index(repo, i))?;
        for (i, entries) in batch.iter().zip(loaded) {
            f(PackInfo {
                condemned: condemned.contains(&i.id),
                exists: packs.contains(&i.id),
                modified: i.modified,
                id: i.id.clone(),
                entries,
            })?;
        }
    }
    Ok(())
}

/// The listed index object of pack `id` in `indexes` (sorted by pack id).
pub fn find<'a>(indexes: &'a [Indexed], id: &str) -> Option<&'a Indexed> {
    let i = indexes.binary_search_by(|x| x.id.as_str().cmp(id)).ok()?;
    indexes.get(i)
}

/// One pack's index, from the local cache (as `index/<id>`) or the store (at the key it
/// was listed under), authenticated.
pub(crate) fn read_index(repo: &Repository, listed: &Indexed) -> Result<Vec<PackEntry>> {
    let id = listed.id.as_str();
    let key = listed.key();
    crate::cache::get_as(
        repo,
        &repo::index_key(id),
        &key,
        MAX_PACK_OBJECT,
        |sealed| {
            let plain = repo.keys().open(sealed, &index_aad(id)).ok_or_else(|| {
            BackupError::corrupt(
                &key,
                "fails authentication (altered, moved from another pack's name, or another repository's)",
            )
        })?;
            decode_index(&plain, None).map_err(|d| BackupError::corrupt(&key, d))
        },
    )
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
