//! A job's view of the repository's chunks (docs/design.md §12 "Segmented tables and an
//! on-disk chunk index"): the local chunk index ([`crate::localindex`]) brought up to
//! date with this job's listing of `index/`, `packs/` and `trash/`, and the standing of
//! each of its packs in that listing. Backups dedup against it and confirm against it
//! before they commit; restores, lazy restores and compaction locate chunks with it.
//!
//! Memory: per pack, its name and standing (~150 bytes: 20 MiB per TiB of 8 MiB packs);
//! nothing per chunk stored in the repository. What a job asks about it holds itself
//! ([`Locations`]: 44 bytes per chunk it reads).
//!
//! Which copies count ([`Purpose`], as for [`crate::index::visit`]): a pack whose index
//! object is not listed now is ignored (gc deleted it; its records in the local index are
//! dead until the next rebuild); a backup dedups only against packs that exist and are
//! not condemned; a restore reads from packs that exist. Where a chunk has several copies
//! every reader ranks them alike ([`crate::index::PackInfo::rank`]; ties go to the lowest
//! pack id), so gc keeps the copies restores read.
//!
//! The local index is a cache: a record names a pack of this repository (the index
//! objects it was built from were authenticated) and a chunk read through it is checked
//! against its id, so for a reader a wrong record costs a failed read, never wrong data.
//! gc trusts it more: a record of a copy that does not exist, in a listed pack ranking
//! above the real copy, would let gc condemn the real one. Records come only from
//! authenticated index objects, and files are checksummed (crate::localindex).
//!
//! Threading: lookups take `&self` and may run on any number of threads.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::index::{find, read_index, Listing, Loc, Purpose, Rank, FETCH_THREADS};
use crate::localindex::{Hit, LocalIndex};
use crate::repo::Repository;

/// Pack states (`Chunks::state`).
const SEEN: u8 = 0;
const UNCONFIRMED: u8 = 1;
const GONE: u8 = 2;

/// Index objects fetched at a time while the local index catches up.
const BATCH: usize = 4 * FETCH_THREADS;

pub struct Chunks {
    ix: LocalIndex,
    /// Per pack number of `ix`: its standing in this job's listing (None: its index
    /// object is not listed).
    standing: Vec<Option<Rank>>,
    /// Per pack number: [`SEEN`], or [`UNCONFIRMED`] if this job's view takes the pack
    /// to exist only because its index object is listed (crate::index::Listing::
    /// unconfirmed) until a HEAD says [`SEEN`] or [`GONE`]. [`Chunks::missing`] and
    /// [`Chunks::locations`] send a HEAD for those their answer depends on, once per
    /// pack per load.
    state: Vec<AtomicU8>,
    /// For those HEADs.
    repo: Repository,
    /// Where the index lives when the repository has no cache (removed on drop).
    _scratch: Option<tempfile::TempDir>,
    /// The chunks this job stored itself since it loaded the index ([`Chunks::remember`]):
    /// an index of its own in a private directory, so a backup dedups against what it
    /// stored in its earlier batches without a set of them in RAM.
    own: Option<(LocalIndex, tempfile::TempDir)>,
}

/// The directory of `repo`'s local chunk index: beside its object cache, or a temporary
/// one.
fn index_dir(repo: &Repository) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    if let Some(c) = repo.cache() {
        return Ok((c.chunk_index_dir(repo), None));
    }
    let t = scratch_index()?;
    Ok((t.path().to_path_buf(), Some(t)))
}

/// A temporary directory for a job's own chunk index (removed when dropped).
fn scratch_index() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("snapblk-chunk-index")
        .tempdir()
        .map_err(|e| BackupError::LocalState {
            what: "a temporary chunk index".into(),
            path: std::env::temp_dir().display().to_string(),
            detail: e.to_string(),
        })
}

impl Chunks {
    /// Lists the repository (trash, index objects, packs: 3 LISTs), brings the local
    /// index up to date (GETs only of index objects neither it nor the object cache
    /// holds) and notes each pack's standing.
    pub fn load(repo: &Repository) -> Result<Chunks> {
        Chunks::from_listing(repo, &Listing::for_job(repo)?)
    }

    /// As [`Chunks::load`], with a listing the caller took (gc judges every pack's copies
    /// against the one listing it also visits the packs of).
    pub fn from_listing(repo: &Repository, listing: &Listing) -> Result<Chunks> {
        let Listing {
            condemned,
            indexes: listed,
            packs,
            unconfirmed: window,
        } = listing;
        let orphans = listed.iter().filter(|i| !packs.contains(&i.id)).count();
        if orphans > 0 {
            log::warn!(
                "{}: {orphans} pack indexes have no pack; their chunks are stored again (run `snapblk repo repair`)",
                repo.describe()
            );
        }
        let names: Vec<String> = listed.iter().map(|i| i.id.clone()).collect();
        let fetch = |batch: &[String]| {
            crate::par::map(batch, FETCH_THREADS, |id| match find(listed, id) {
                Some(i) => read_index(repo, i),
                None => Err(BackupError::invalid(
                    format!("index of pack {id} in {}", repo.describe()),
                    "asked for, but not listed",
                )),
            })
        };
        let (dir, mut scratch) = index_dir(repo)?;
        let ix = match LocalIndex::sync(&dir, &names, BATCH, fetch) {
            // This host's cache directory is unusable (full, read-only): the job still runs,
            // with an index of its own in a temporary directory.
            Err(e @ BackupError::LocalState { .. }) if scratch.is_none() => {
                log::warn!("{e}; using a temporary chunk index for this job");
                let t = scratch_index()?;
                let ix = LocalIndex::sync(t.path(), &names, BATCH, fetch)?;
                scratch = Some(t);
                ix
            }
            r => r?,
        };
        drop(names);
        let mut standing = vec![None; ix.pack_count()];
        let state: Vec<AtomicU8> = (0..ix.pack_count()).map(|_| AtomicU8::new(SEEN)).collect();
        for i in listed {
            if let Some(n) = ix.number(&i.id) {
                standing[n as usize] = Some((
                    packs.contains(&i.id),
                    !condemned.contains(&i.id),
                    i.modified,
                ));
                if window.contains(&i.id) {
                    state[n as usize].store(UNCONFIRMED, Ordering::Relaxed);
                }
            }
        }
        Ok(Chunks {
            ix,
            standing,
            state,
            repo: repo.clone(),
            _scratch: scratch,
            own: None,
        })
    }

    /// Records packs this job has just stored (their names and entries), so
    /// [`Chunks::stored_by_job`] finds their chunks. Written to the job's own index, never to
    /// the shared one (that one follows the repository's listing: the next load adds
    /// them from the index objects the job cached).
    pub fn remember(
        &mut self,
        repo: &Repository,
        packs: Vec<(String, Vec<crate::pack::PackEntry>)>,
    ) -> Result<()> {
        if packs.is_empty() {
            return Ok(());
        }
        if self.own.is_none() {
            let dir = crate::tablecopy::scratch(repo, "own-index-", "this job's chunk index")?;
            let ix = LocalIndex::open(dir.path())?;
            self.own = Some((ix, dir));
        }
        if let Some((ix, _)) = &mut self.own {
            ix.add(packs.into_iter().map(Ok))?;
        }
        Ok(())
    }

    /// Whether this job stored `id` itself ([`Chunks::remember`]).
    pub fn stored_by_job(&self, id: &ChunkId) -> Result<bool> {
        match &self.own {
            Some((ix, _)) => Ok(!ix.lookup(id)?.is_empty()),
            None => Ok(false),
        }
    }

    /// The standing of pack `n`, if `purpose` may use it.
    fn usable(&self, n: u32, purpose: Purpose) -> Option<Rank> {
        self.standing.get(n as usize)?.as_ref()?;
        let r = self.rank_of(n);
        let (exists, live, _) = r;
        match purpose {
            Purpose::Read => Some(r),
            Purpose::Restore => exists.then_some(r),
            Purpose::Backup => (exists && live).then_some(r),
        }
    }

    /// Whether a pack a backup may dedup against holds `id`.
    pub fn stored(&self, id: &ChunkId) -> Result<bool> {
        let hits = self.ix.lookup(id)?;
        Ok(hits
            .iter()
            .any(|h| self.usable(h.pack, Purpose::Backup).is_some()))
    }

    pub fn pack_name(&self, n: u32) -> &str {
        self.ix.pack_name(n).unwrap_or("")
    }

    /// Records in the local index (every copy of every chunk of the listed packs, and
    /// records of packs deleted since it was last rebuilt).
    pub fn records(&self) -> u64 {
        self.ix.len()
    }

    /// Whether this job's listing has pack `name` in the local index.
    pub fn knows(&self, name: &str) -> bool {
        self.ix
            .number(name)
            .is_some_and(|n| self.usable(n, Purpose::Read).is_some())
    }

    /// Whether the copy of `id` in pack `name`, of standing `rank`, is the one every
    /// reader picks ([`crate::index`]): no copy in a listed pack ranks higher, and none
    /// ranks the same in a pack whose name sorts first. One lookup (a pread per file).
    pub fn is_chosen(&self, id: &ChunkId, name: &str, rank: Rank) -> Result<bool> {
        for h in self.ix.lookup(id)? {
            let Some(r) = self.usable(h.pack, Purpose::Read) else {
                continue;
            };
            if r > rank || (r == rank && self.pack_name(h.pack) < name) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Takes the packs named (this job's own, stored by it) to exist without a HEAD.
    pub fn trust(&self, own: &HashSet<String>) {
        for name in own {
            if let Some(n) = self.ix.number(name) {
                self.state[n as usize].store(SEEN, Ordering::Relaxed);
            }
        }
    }

    fn unconfirmed(&self, n: u32) -> bool {
        self.state[n as usize].load(Ordering::Relaxed) == UNCONFIRMED
    }

    /// Sends a HEAD for each of `packs` not confirmed yet (in parallel); a pack found
    /// gone no longer counts as existing for this job. Returns whether any was gone.
    fn confirm(&self, packs: impl IntoIterator<Item = u32>) -> Result<bool> {
        let ask: Vec<u32> = packs
            .into_iter()
            .filter(|&n| self.unconfirmed(n))
            .collect::<HashSet<u32>>()
            .into_iter()
            .collect();
        if ask.is_empty() {
            return Ok(false);
        }
        let there = crate::par::map(&ask, FETCH_THREADS, |&n| {
            self.repo
                .store()
                .exists(&crate::repo::pack_key(self.pack_name(n)))
                .map_err(BackupError::from)
        })?;
        let mut gone = false;
        for (n, there) in ask.into_iter().zip(there) {
            if there {
                crate::index::note_seen(&self.repo, self.pack_name(n));
            } else {
                gone = true;
                log::warn!(
                    "{}: pack {} is listed but gone; its chunks are read from other copies or stored again",
                    self.repo.describe(),
                    self.pack_name(n)
                );
            }
            self.state[n as usize].store(if there { SEEN } else { GONE }, Ordering::Relaxed);
        }
        Ok(gone)
    }

    /// The chunks of `cells` no pack a backup may use holds now: what a backup about to
    /// commit must store again. Looks them up in id order (the local index streamed at
    /// most once, twice if the answer depends on packs seen only through the view's
    /// `ix/` listing: those are confirmed by a HEAD each first — a pack lost or deleted
    /// while its index object stayed is not counted on); memory: 12 bytes per cell of
    /// `cells` (the order, and one pass's answers), and the answer.
    pub fn missing(&self, cells: &[(u64, ChunkId)]) -> Result<HashSet<ChunkId>> {
        let mut order: Vec<u32> = (0..cells.len() as u32).collect();
        order.sort_unstable_by_key(|&i| cells[i as usize].1 .0);
        // Pass 1: the unconfirmed packs some chunk has no confirmed copy besides.
        let mut ask: HashSet<u32> = HashSet::new();
        if self
            .state
            .iter()
            .any(|s| s.load(Ordering::Relaxed) == UNCONFIRMED)
        {
            self.scan(cells, &order, |hits, confirmed| {
                if !confirmed {
                    ask.extend(hits.iter().filter(|&&n| self.unconfirmed(n)));
                }
            })?;
        }
        self.confirm(ask)?;
        let mut out = HashSet::new();
        for (i, found) in self.scan(cells, &order, |hits, _| !hits.is_empty())? {
            if !found {
                out.insert(cells[i as usize].1);
            }
        }
        Ok(out)
    }

    /// Calls `f` for each distinct chunk of `cells` (in `order`) with the packs holding a
    /// copy a backup may use and whether one of them is confirmed; returns, per cell
    /// index, what `f` answered.
    fn scan<T: Copy>(
        &self,
        cells: &[(u64, ChunkId)],
        order: &[u32],
        mut f: impl FnMut(&[u32], bool) -> T,
    ) -> Result<Vec<(u32, T)>> {
        let mut cur = self.ix.cursor();
        let mut hits = Vec::new();
        let mut packs = Vec::new();
        let mut out = Vec::with_capacity(order.len());
        let mut last: Option<(ChunkId, T)> = None;
        for &i in order {
            let id = cells[i as usize].1;
            let v = match last {
                Some((l, v)) if l == id => v,
                _ => {
                    cur.lookup(&id, &mut hits)?;
                    packs.clear();
                    packs.extend(
                        hits.iter()
                            .filter(|h| self.usable(h.pack, Purpose::Backup).is_some())
                            .map(|h| h.pack),
                    );
                    let confirmed = packs.iter().any(|&n| !self.unconfirmed(n));
                    let v = f(&packs, confirmed);
                    last = Some((id, v));
                    v
                }
            };
            out.push((i, v));
        }
        Ok(out)
    }

    /// The first chunk of `wanted` (sorted) no pack a restore may read holds.
    pub fn first_missing(&self, wanted: &[ChunkId]) -> Result<Option<ChunkId>> {
        let mut cur = self.ix.cursor();
        let mut hits = Vec::new();
        for id in wanted {
            cur.lookup(id, &mut hits)?;
            if !hits
                .iter()
                .any(|h| self.usable(h.pack, Purpose::Restore).is_some())
            {
                return Ok(Some(*id));
            }
        }
        Ok(None)
    }

    /// Where the chunks of `wanted` (sorted, distinct) lie, for a job reading them
    /// ([`Purpose::Restore`]). Where a chunk has several copies, the one in a pack that
    /// exists and is live (as every reader), then in the pack holding most of the job's
    /// own chunks, then the newest, then the lowest pack id: a backup's chunks are read
    /// from as few packs as its copies allow (an old backup from its own packs, the
    /// newest from the packs compaction wrote for it). Memory: 44 bytes per chunk, 16 per
    /// extra copy found.
    ///
    /// Packs the answer reads from that the view has not confirmed are confirmed by a
    /// HEAD first; if one is gone the answer is worked out again without it.
    pub fn locations(&self, wanted: Vec<ChunkId>) -> Result<Locations> {
        // Ends: each pass that finds a pack gone confirms it for good (at most once per
        // pack), and the next pass no longer uses it.
        let mut wanted = wanted;
        loop {
            let (locs, numbers) = self.locations_once(wanted)?;
            if !self.confirm(numbers)? {
                return Ok(locs);
            }
            wanted = locs.ids;
        }
    }

    /// [`Chunks::locations`] as this job's view stands; also the pack numbers it uses.
    fn locations_once(&self, wanted: Vec<ChunkId>) -> Result<(Locations, Vec<u32>)> {
        let mut copies: Vec<(u32, Hit)> = Vec::new();
        let mut held: HashMap<u32, u64> = HashMap::new();
        let mut cur = self.ix.cursor();
        let mut hits = Vec::new();
        for (i, id) in wanted.iter().enumerate() {
            cur.lookup(id, &mut hits)?;
            for h in &hits {
                if self.usable(h.pack, Purpose::Restore).is_some() {
                    copies.push((i as u32, *h));
                    *held.entry(h.pack).or_default() += u64::from(h.len);
                }
            }
        }
        // Pack numbers of this index -> positions in the answer's own pack list.
        let mut numbers: Vec<u32> = held.keys().copied().collect();
        numbers.sort_unstable_by(|a, b| self.pack_name(*a).cmp(self.pack_name(*b)));
        let position: HashMap<u32, u32> = numbers
            .iter()
            .enumerate()
            .map(|(p, n)| (*n, p as u32))
            .collect();
        let key = |n: u32| {
            let (exists, live, modified) = self.rank_of(n);
            (exists, live, held[&n], modified)
        };
        let nowhere = Loc {
            pack: NOWHERE,
            offset: 0,
            len: 0,
        };
        let mut best: Vec<Option<u32>> = vec![None; wanted.len()];
        let mut locs = vec![nowhere; wanted.len()];
        for (i, h) in copies {
            let i = i as usize;
            let better = match best[i] {
                None => true,
                // Ties go to the lower pack id (listed first).
                Some(cur) => {
                    (key(h.pack), std::cmp::Reverse(position[&h.pack]))
                        > (key(cur), std::cmp::Reverse(position[&cur]))
                }
            };
            if better {
                best[i] = Some(h.pack);
                locs[i] = Loc {
                    pack: position[&h.pack],
                    offset: h.offset,
                    len: h.len,
                };
            }
        }
        let packs = numbers
            .iter()
            .map(|n| (self.pack_name(*n).to_string(), self.rank_of(*n)))
            .collect();
        let locations = Locations {
            packs,
            ids: wanted,
            locs,
        };
        Ok((locations, numbers))
    }

    /// Pack `n`'s standing (a pack a HEAD found gone does not exist).
    fn rank_of(&self, n: u32) -> Rank {
        let mut r = self.standing[n as usize].unwrap_or_default();
        if self.state[n as usize].load(Ordering::Relaxed) == GONE {
            r.0 = false;
        }
        r
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
    /// Locates every chunk of `wanted` (sorted, distinct) that the repository holds
    /// ([`Chunks::locations`]).
    pub fn load(repo: &Repository, wanted: Vec<ChunkId>) -> Result<Locations> {
        Chunks::load(repo)?.locations(wanted)
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
        self.pack_name(loc.pack)
    }

    /// The name of pack number `n` of this answer's own list.
    pub fn pack_name(&self, n: u32) -> &str {
        self.packs.get(n as usize).map_or("", |p| p.0.as_str())
    }

    /// This answer's packs, by number: names and standing.
    pub fn packs(&self) -> &[(String, Rank)] {
        &self.packs
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}
