//! [`Meta2`]: the format-2 metadata engine. Operations are applied to a [`Group`] — they read
//! through the group's cache, so later operations of a group see earlier ones — and
//! [`Meta2::commit`] writes the group as one store batch (format2.md §4.1).
//!
//! Fail-stop: in-memory state (lineages, regions, jobs) changes as operations are applied;
//! if the store refuses a batch, the engine refuses every later call, and a reopen reads
//! whatever the store kept — which is consistent, because each batch carried its own
//! regions and lineage records (C3 of docs/format2-review.md).
//!
//! Threading: one thread owns a `Meta2`. Readers use [`super::read::read_page`] on the
//! store concurrently; they never see a half-applied group.

use std::collections::hash_map::Entry;
use std::collections::{btree_map, BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ids::{Epoch, LineageId, PageNo};
use super::jobs::{Job, JobKind};
use super::keys;
use super::lineage::Lineage;
use super::page::{self, DeadRecord, Page};
use super::piece::{Piece, PieceFlags, SumRef, Sums, MAX_PBA};
use super::read::{self, Bases};
use super::region::Regions;
use super::sums::{self, SumBlock, SumBlocks};
use super::PAGE_BLOCKS;
use crate::error::{Error, Result};
use crate::meta::{try_scan, BatchOp, MetaRead, MetaStore, WriteBatch};

/// A live piece whose inline CRCs a checksum block now holds, from slot `slot` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub lineage: LineageId,
    pub page: PageNo,
    /// As committed: owned, inline CRCs.
    pub piece: Piece,
    pub slot: u16,
}

/// A `b` record: owned blocks naming the checksum block (u64 LE).
pub(super) fn decode_sum_count(v: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(v.try_into().ok()?)).filter(|n| *n > 0)
}

/// Change-index flag: `d(L, page, w)` exists.
pub const X_DEAD: u8 = 1;

/// One range of a volume's blocks, mapped to new data or unmapped (trim, zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub lineage: LineageId,
    pub lba: u64,
    pub len: u64,
    /// `Some((pba, crcs))`: blocks `lba..lba+len` now live at `pba..`, one CRC each.
    pub map: Option<(u64, Vec<u32>)>,
}

#[derive(Debug)]
pub(super) struct Cached<T> {
    pub(super) value: Option<T>,
    pub(super) dirty: bool,
}

/// The pending changes of one group commit.
#[derive(Debug, Default)]
pub struct Group {
    pages: HashMap<(LineageId, PageNo), Cached<Page>>,
    deads: BTreeMap<(LineageId, PageNo, Epoch), Cached<DeadRecord>>,
    /// Read checkpoints written (`Some`) or deleted (`None`) by this group.
    checkpoints: BTreeMap<(LineageId, PageNo, Epoch), Option<DeadRecord>>,
    index: BTreeMap<(LineageId, Epoch, PageNo), Option<u8>>,
    lineages: BTreeSet<LineageId>,
    counters: BTreeSet<LineageId>,
    jobs: BTreeMap<u64, Option<Vec<u8>>>,
    next_dirty: bool,
    extra: Vec<BatchOp>,
    freed: Vec<(u64, u64)>,
    allocated: Vec<(u64, u64)>,
    destroyed: Vec<LineageId>,
    durable: bool,
    /// Checksum-block counts read or changed by this group (`None`: no record).
    sum_counts: BTreeMap<u64, Cached<u64>>,
}

impl Group {
    /// Adds store operations of the caller (catalog records) to this group's batch.
    pub fn extra(&mut self, op: BatchOp) {
        self.extra.push(op);
    }
    /// Makes the commit durable (FUA, management operations).
    pub fn set_durable(&mut self) {
        self.durable = true;
    }
    pub(super) fn jobs_done(&mut self, seq: u64) {
        self.jobs.insert(seq, None);
    }
    pub(super) fn job_update(&mut self, seq: u64, v: Vec<u8>) {
        self.jobs.insert(seq, Some(v));
    }
    /// The lineage's record is rewritten (or deleted if it is gone) at commit.
    pub(super) fn lineage_changed(&mut self, l: LineageId) {
        self.lineages.insert(l);
    }
    pub(super) fn lineage_gone(&mut self, l: LineageId) {
        self.lineages.insert(l);
        self.counters.insert(l);
        self.destroyed.push(l);
    }
    /// Whether this group already decided change-index entry (l, w, p).
    pub(super) fn index_decided(&self, l: LineageId, w: Epoch, p: PageNo) -> bool {
        self.index.contains_key(&(l, w, p))
    }
    /// Whether this group's view of `d(l, p, w)` holds pieces (only for records it loaded).
    /// Deletes read checkpoint `c(l, p, e)` in this group's batch.
    pub(super) fn delete_checkpoint(&mut self, l: LineageId, p: PageNo, e: Epoch) {
        self.checkpoints.insert((l, p, e), None);
    }
    pub(super) fn has_dead(&self, l: LineageId, p: PageNo, w: Epoch) -> bool {
        self.deads
            .get(&(l, p, w))
            .is_some_and(|c| c.value.as_ref().is_some_and(|r| !r.pieces.is_empty()))
    }
}

/// What a committed group did to the allocator.
#[derive(Debug, Default)]
pub struct Committed {
    /// Owned blocks no piece references any more: reusable once this batch is durable.
    pub freed: Vec<(u64, u64)>,
    /// Blocks the batch made referenced.
    pub allocated: Vec<(u64, u64)>,
    /// Lineages whose last records the batch deleted.
    pub destroyed: Vec<LineageId>,
    /// Owned-block counts the batch wrote (`None`: the lineage is gone).
    pub owned: Vec<(LineageId, Option<u64>)>,
}

#[derive(Serialize, Deserialize, Default)]
struct NextIds {
    lineage: u64,
    job: u64,
}

/// A page gets a read checkpoint every this many dead records (format2.md §8a): a read of
/// an old snapshot scans at most about this many records of a page.
pub const CHECKPOINT_EVERY: u64 = 16;

pub struct Meta2 {
    pub(super) store: Arc<dyn MetaStore>,
    checkpoint_every: u64,
    pub(super) lineages: BTreeMap<LineageId, Lineage>,
    pub(super) regions: Regions,
    pub(super) jobs: VecDeque<Job>,
    next: NextIds,
    failed: Option<String>,
    sums: Arc<dyn SumBlocks>,
    /// Committed checksum-block counts recently read or written (this engine is their
    /// only writer, so they stay right): random overwrites of consolidated data then cost
    /// a count put per group, not a get too. Bounded: cleared at [`SUM_COUNTS_CACHED`].
    sum_counts: HashMap<u64, u64>,
}

/// Checksum-block counts [`Meta2`] keeps in memory at most (~1.5 MiB).
const SUM_COUNTS_CACHED: usize = 65536;

impl Bases for BTreeMap<LineageId, Lineage> {
    fn base(&self, l: LineageId) -> Result<Option<(LineageId, Epoch)>> {
        Ok(self
            .get(&l)
            .ok_or_else(|| Error::Corrupt(format!("lineage {l} has no record")))?
            .base)
    }
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

/// The state a format-2 engine (or `check`) starts from.
pub(super) struct Loaded {
    next: NextIds,
    pub(super) lineages: BTreeMap<LineageId, Lineage>,
    pub(super) regions: Regions,
    pub(super) jobs: VecDeque<Job>,
    /// Lineages whose `k` record predates owned-block counts (8 bytes): `owned` unknown.
    pub(super) legacy_owned: Vec<LineageId>,
}

/// A lineage's `k` record: blocks born in the current epoch, then blocks owned (16 bytes;
/// records written before owned counts were kept have only the first: `None`).
pub(super) fn decode_counter(v: &[u8]) -> Option<(u64, Option<u64>)> {
    match v.len() {
        8 => Some((u64::from_le_bytes(v.try_into().ok()?), None)),
        16 => Some((
            u64::from_le_bytes(v[..8].try_into().ok()?),
            Some(u64::from_le_bytes(v[8..].try_into().ok()?)),
        )),
        _ => None,
    }
}

fn encode_counter(lin: &Lineage) -> Vec<u8> {
    let mut v = lin.born_now.to_le_bytes().to_vec();
    v.extend_from_slice(&lin.owned.to_le_bytes());
    v
}

/// Blocks lineage `l` owns, counted from its live pages and dead records (I1: each once).
fn count_owned<S: MetaRead + ?Sized>(store: &S, l: LineageId) -> Result<u64> {
    let mut n = 0u64;
    for (a, b) in [keys::all_pages(l), keys::deads(l)] {
        try_scan(store, &a, &b, |k, v| {
            let pieces = if k.first() == Some(&keys::K_PAGE) {
                read::decode_page(k, v)?.pieces
            } else {
                match keys::dead_key(k) {
                    Some(keys::DeadKey::Dead(..)) => read::decode_dead(k, v)?.pieces,
                    _ => Vec::new(),
                }
            };
            n += pieces
                .iter()
                .filter(|x| x.owned())
                .map(|x| u64::from(x.len))
                .sum::<u64>();
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
    }
    Ok(n)
}

/// The lineage records as `store` has them.
pub fn load_lineages<S: MetaRead + ?Sized>(store: &S) -> Result<BTreeMap<LineageId, Lineage>> {
    let mut lineages = BTreeMap::new();
    let (a, b) = keys::lineages();
    try_scan(store, &a, &b, |k, v| {
        let l = Lineage::decode(v)
            .map_err(|e| corrupt(format!("lineage key {}: {e}", read::hex(k))))?;
        if keys::lineage(l.id) != k {
            return Err(corrupt(format!(
                "lineage record {} under key {}",
                l.id,
                read::hex(k)
            )));
        }
        lineages.insert(l.id, l);
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;
    Ok(lineages)
}

pub(super) fn load<S: MetaRead + ?Sized>(store: &S, data_blocks: u64) -> Result<Loaded> {
    if data_blocks > MAX_PBA {
        return Err(Error::invalid("data device", "more than 2^48 blocks"));
    }
    let next = match store.get(&keys::next_ids())? {
        Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt(format!("next ids: {e}")))?,
        None => NextIds::default(),
    };
    let mut lineages = BTreeMap::new();
    let (a, b) = keys::lineages();
    try_scan(store, &a, &b, |k, v| {
        let l = Lineage::decode(v)
            .map_err(|e| corrupt(format!("lineage key {}: {e}", read::hex(k))))?;
        if keys::lineage(l.id) != k {
            return Err(corrupt(format!(
                "lineage record {} under key {}",
                l.id,
                read::hex(k)
            )));
        }
        lineages.insert(l.id, l);
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;
    let mut regions = Regions::new(data_blocks);
    let (a, b) = keys::regions();
    try_scan(store, &a, &b, |k, v| {
        let [n] = keys::fields::<1>(k, keys::K_REGION)
            .ok_or_else(|| corrupt(format!("region key {}", read::hex(k))))?;
        regions.decode(n, v).map_err(corrupt)?;
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;
    regions.take_dirty();
    let (a, b) = keys::counters();
    let mut legacy_owned = Vec::new();
    try_scan(store, &a, &b, |k, v| {
        let [l] = keys::fields::<1>(k, keys::K_COUNTER)
            .ok_or_else(|| corrupt(format!("counter key {}", read::hex(k))))?;
        let (born, owned) = decode_counter(v)
            .ok_or_else(|| corrupt(format!("counter of lineage {l}: {} bytes", v.len())))?;
        if let Some(lin) = lineages.get_mut(&LineageId(l)) {
            lin.born_now = born;
            match owned {
                Some(o) => lin.owned = o,
                None => legacy_owned.push(lin.id),
            }
        }
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;
    let mut jobs = VecDeque::new();
    let (a, b) = keys::jobs();
    try_scan(store, &a, &b, |k, v| {
        let [seq] = keys::fields::<1>(k, keys::K_JOB)
            .ok_or_else(|| corrupt(format!("job key {}", read::hex(k))))?;
        jobs.push_back(Job::decode(seq, v).map_err(corrupt)?);
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;
    Ok(Loaded {
        next,
        lineages,
        regions,
        jobs,
        legacy_owned,
    })
}

impl Meta2 {
    /// Opens the format-2 metadata of a pool whose data device has `data_blocks` blocks.
    /// Reads lineages, jobs and region records: O(objects + data_blocks / 4096).
    ///
    /// A pool written before owned-block counts were kept gets them here, once: the pages
    /// and dead records of those lineages are counted (O(their metadata)) and the counts
    /// written in one durable batch.
    ///
    /// `sums` loads checksum blocks (format2.md §9b) for reads and copy-up.
    pub fn open(
        store: Arc<dyn MetaStore>,
        data_blocks: u64,
        sums: Arc<dyn SumBlocks>,
    ) -> Result<Meta2> {
        let mut st = load(&*store, data_blocks)?;
        if !st.legacy_owned.is_empty() {
            let mut b = WriteBatch::new();
            for l in &st.legacy_owned {
                let n = count_owned(&*store, *l)?;
                if let Some(lin) = st.lineages.get_mut(l) {
                    lin.owned = n;
                    b.put(keys::counter(*l), encode_counter(lin));
                }
            }
            log::info!(
                "counted the owned blocks of {} lineages (pool written by an older version)",
                st.legacy_owned.len()
            );
            store.commit(b, true)?;
        }
        Ok(Meta2 {
            store,
            checkpoint_every: CHECKPOINT_EVERY,
            lineages: st.lineages,
            regions: st.regions,
            jobs: st.jobs,
            next: st.next,
            failed: None,
            sums,
            sum_counts: HashMap::new(),
        })
    }

    /// Sets how many dead records a page gains between read checkpoints (0: none). Tests
    /// use small values; the pool uses [`CHECKPOINT_EVERY`].
    pub fn set_checkpoint_every(&mut self, n: u64) {
        self.checkpoint_every = n;
    }

    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }
    pub fn lineage(&self, l: LineageId) -> Result<&Lineage> {
        self.lineages
            .get(&l)
            .ok_or_else(|| Error::not_found("lineage", l.to_string()))
    }
    pub fn lineages(&self) -> &BTreeMap<LineageId, Lineage> {
        &self.lineages
    }
    pub fn regions(&self) -> &Regions {
        &self.regions
    }
    pub fn pending_jobs(&self) -> usize {
        self.jobs.len()
    }
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }
    /// Stops the engine: its memory may no longer match the store (a caller's step failed
    /// after changing it). Every later call fails until the pool is reopened.
    pub fn stop(&mut self, why: &str) {
        self.failed.get_or_insert_with(|| why.to_string());
    }

    pub fn begin(&self) -> Result<Group> {
        if let Some(why) = &self.failed {
            return Err(Error::Corrupt(format!(
                "metadata engine stopped after a failed commit ({why}); reopen the pool"
            )));
        }
        Ok(Group::default())
    }

    fn lineage_mut(&mut self, g: &mut Group, l: LineageId) -> Result<&mut Lineage> {
        g.lineages.insert(l);
        self.lineages
            .get_mut(&l)
            .ok_or_else(|| Error::not_found("lineage", l.to_string()))
    }

    // ---- cache ----

    pub(super) fn page_mut<'g>(
        &self,
        g: &'g mut Group,
        l: LineageId,
        p: PageNo,
    ) -> Result<&'g mut Cached<Page>> {
        match g.pages.entry((l, p)) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(slot) => {
                let key = keys::page(l, p);
                let value = match self.store.get(&key)? {
                    Some(v) => Some(read::decode_page(&key, &v)?),
                    None => None,
                };
                Ok(slot.insert(Cached {
                    value,
                    dirty: false,
                }))
            }
        }
    }

    pub(super) fn dead_mut<'g>(
        &self,
        g: &'g mut Group,
        l: LineageId,
        p: PageNo,
        death: Epoch,
    ) -> Result<&'g mut Cached<DeadRecord>> {
        match g.deads.entry((l, p, death)) {
            btree_map::Entry::Occupied(o) => Ok(o.into_mut()),
            btree_map::Entry::Vacant(slot) => {
                let key = keys::dead(l, p, death);
                let value = match self.store.get(&key)? {
                    Some(v) => Some(read::decode_dead(&key, &v)?),
                    None => None,
                };
                Ok(slot.insert(Cached {
                    value,
                    dirty: false,
                }))
            }
        }
    }

    pub(super) fn set_index(g: &mut Group, l: LineageId, w: Epoch, p: PageNo, flags: Option<u8>) {
        g.index.insert((l, w, p), flags);
    }

    /// Makes sure `x(l, w, p)` exists, without clobbering a stored DEAD flag.
    pub(super) fn ensure_index(
        &self,
        g: &mut Group,
        l: LineageId,
        w: Epoch,
        p: PageNo,
    ) -> Result<()> {
        if let btree_map::Entry::Vacant(slot) = g.index.entry((l, w, p)) {
            if self.store.get(&keys::index(l, w, p))?.is_none() {
                slot.insert(Some(0));
            }
        }
        Ok(())
    }

    /// Frees `piece` of lineage `l` (its owned blocks; an inherited piece frees nothing),
    /// and its checksum block once no owned block names it.
    pub(super) fn free_piece(&mut self, g: &mut Group, l: LineageId, piece: &Piece) -> Result<()> {
        if piece.owned() {
            let n = u64::from(piece.len);
            self.regions.clear(piece.pba, n).map_err(corrupt)?;
            g.freed.push((piece.pba, n));
            if let Some(lin) = self.lineages.get_mut(&l) {
                lin.owned = lin.owned.saturating_sub(n);
                g.counters.insert(l);
            }
            if let Some(at) = piece.counted_in() {
                let c = self.sum_count_mut(g, at)?;
                let left = c.value.and_then(|v| v.checked_sub(n)).ok_or_else(|| {
                    corrupt(format!(
                        "checksum block {at}: fewer counted blocks than lineage {l} frees ({n})"
                    ))
                })?;
                c.value = (left > 0).then_some(left);
                c.dirty = true;
                if left == 0 {
                    self.regions.clear(at, 1).map_err(corrupt)?;
                    g.freed.push((at, 1));
                }
            }
        }
        Ok(())
    }

    fn sum_count_mut<'g>(&self, g: &'g mut Group, at: u64) -> Result<&'g mut Cached<u64>> {
        match g.sum_counts.entry(at) {
            btree_map::Entry::Occupied(o) => Ok(o.into_mut()),
            btree_map::Entry::Vacant(slot) => {
                let value = match self.sum_counts.get(&at) {
                    Some(n) => Some(*n),
                    None => match self.store.get(&keys::sum_count(at))? {
                        Some(v) => Some(decode_sum_count(&v).ok_or_else(|| {
                            corrupt(format!("count of checksum block {at}: {} bytes", v.len()))
                        })?),
                        None => None,
                    },
                };
                Ok(slot.insert(Cached {
                    value,
                    dirty: false,
                }))
            }
        }
    }

    /// Moves the inline CRCs of live pieces into checksum block `at`, which holds `block`
    /// and is durable on the data device (format2.md §9b). Each candidate whose blocks
    /// are still live, owned and born as given in its lineage's live page, with the same
    /// CRCs as `block`'s slots from `slot` on, is rewritten to name the block; others
    /// (overwritten, trimmed, their lineage closed since) are skipped. Returns the blocks
    /// rewritten: at 0 nothing names `at` and the caller frees it; otherwise `at` is
    /// allocated and counted in this group.
    pub fn consolidate(
        &mut self,
        g: &mut Group,
        at: u64,
        block: &SumBlock,
        candidates: &[Candidate],
    ) -> Result<u64> {
        self.check_consolidation(at, block, candidates)?;
        let r = SumRef {
            at,
            slot: 0,
            crc: sums::block_crc(block),
        };
        let mut n = 0u64;
        for c in candidates {
            if self
                .lineages
                .get(&c.lineage)
                .is_none_or(|l| l.closed.is_some())
            {
                continue;
            }
            let done = self.consolidate_one(g, c, r);
            n += self.stop_on_error(done)?;
        }
        if n > 0 {
            let r = self.regions.set(at, 1).map_err(corrupt);
            self.stop_on_error(r)?;
            g.allocated.push((at, 1));
            let c = self.sum_count_mut(g, at)?;
            if c.value.is_some() {
                let e = corrupt(format!("checksum block {at} already has a count"));
                return self.stop_on_error(Err(e));
            }
            c.value = Some(n);
            c.dirty = true;
        }
        Ok(n)
    }

    /// Why [`Meta2::consolidate`] would refuse, checked before it changes anything: `at`
    /// in use or beyond the device, a candidate not owned and inline, or whose CRCs are not
    /// in its slots of `block`.
    pub fn check_consolidation(
        &self,
        at: u64,
        block: &SumBlock,
        candidates: &[Candidate],
    ) -> Result<()> {
        if self.regions.is_set(at) || at >= self.regions.blocks() {
            return Err(Error::invalid(
                "checksum block",
                format!("block {at} is in use or beyond the device"),
            ));
        }
        for c in candidates {
            let (from, n) = (usize::from(c.slot), usize::from(c.piece.len));
            let slots = block.get(from..from + n);
            if n == 0 || !c.piece.owned() || c.piece.sums.inline() != slots {
                return Err(Error::invalid(
                    "checksum block",
                    format!("block {at}: a candidate's CRCs are not in its slots"),
                ));
            }
        }
        Ok(())
    }

    fn consolidate_one(&mut self, g: &mut Group, c: &Candidate, r: SumRef) -> Result<u64> {
        let cached = self.page_mut(g, c.lineage, c.page)?;
        let Some(page) = cached.value.as_mut() else {
            return Ok(0);
        };
        let want = &c.piece;
        let Some(x) = page
            .pieces
            .iter()
            .find(|x| x.start() <= want.start() && want.end() <= x.end())
        else {
            return Ok(0);
        };
        let skip = (want.start() - x.start()) as usize;
        let same = x.owned()
            && want.owned()
            && x.birth == want.birth
            && x.pba + skip as u64 == want.pba
            && x.sums
                .inline()
                .and_then(|s| s.get(skip..skip + usize::from(want.len)))
                == want.sums.inline();
        if !same {
            return Ok(0);
        }
        page::cut(&mut page.pieces, want.start(), want.end());
        let moved = Piece {
            sums: Sums::Block(SumRef { slot: c.slot, ..r }),
            ..want.clone()
        };
        page::insert(&mut page.pieces, moved).map_err(|e| {
            corrupt(format!(
                "lineage {} page {}: consolidating: {e}",
                c.lineage, c.page
            ))
        })?;
        cached.dirty = true;
        Ok(u64::from(want.len))
    }

    // ---- lineages and snapshots ----

    /// A new lineage for a new volume (`base` None) or a clone / rollback of `base`, which
    /// must be a retained epoch; the base epoch gets a hold.
    pub fn create_lineage(
        &mut self,
        g: &mut Group,
        base: Option<(LineageId, Epoch)>,
    ) -> Result<LineageId> {
        if let Some((lb, eb)) = base {
            let b = self.lineage_mut(g, lb)?;
            if !b.retained.contains(eb) {
                return Err(Error::invalid(
                    "clone base",
                    format!("epoch {eb} of lineage {lb} is not retained"),
                ));
            }
            b.retained.add_hold(eb);
        }
        let id = LineageId(self.next.lineage.max(1));
        self.next.lineage = id.0 + 1;
        g.next_dirty = true;
        self.lineages.insert(id, Lineage::new(id, base));
        g.lineages.insert(id);
        g.durable = true;
        Ok(id)
    }

    /// Freezes the current epoch of open lineage `l` as a snapshot and returns it.
    pub fn snapshot(&mut self, g: &mut Group, l: LineageId) -> Result<Epoch> {
        let lin = self.lineage_mut(g, l)?;
        if lin.closed.is_some() {
            return Err(Error::invalid("snapshot", format!("lineage {l} is closed")));
        }
        let e = lin.epoch;
        lin.retained.add_snapshot(e);
        lin.epoch = e.next();
        lin.born_now = 0;
        g.counters.insert(l);
        g.durable = true;
        Ok(e)
    }

    /// Releases one snapshot of epoch `e` of `l`; queues the reclaim its data needs.
    pub fn release_snapshot(&mut self, g: &mut Group, l: LineageId, e: Epoch) -> Result<()> {
        let lin = self.lineage_mut(g, l)?;
        if lin
            .retained
            .remove_snapshot(e)
            .map_err(|w| Error::invalid("snapshot release", w))?
        {
            self.released(g, l, e)?;
        }
        g.durable = true;
        Ok(())
    }

    /// Closes open lineage `l` (its volume was rolled back or deleted); with
    /// `drop_snapshots`, its snapshots go too (volume delete --recursive).
    pub fn close(&mut self, g: &mut Group, l: LineageId, drop_snapshots: bool) -> Result<()> {
        let lin = self.lineage_mut(g, l)?;
        if lin.closed.is_some() {
            return Err(Error::invalid(
                "close",
                format!("lineage {l} is already closed"),
            ));
        }
        let ec = lin.epoch;
        lin.closed = Some(ec);
        if drop_snapshots {
            lin.retained.remove_all_snapshots();
        }
        let job = match lin.retained.max() {
            None => JobKind::Destroy,
            Some(_) if drop_snapshots => JobKind::drop(Epoch::FIRST, ec),
            Some(m) => JobKind::drop(m.next(), ec),
        };
        self.enqueue(g, l, job);
        g.durable = true;
        Ok(())
    }

    /// Nothing retains epoch `e` of `l` any more: queue the job that frees what only it
    /// kept (format2.md §3.4 table).
    pub(super) fn released(&mut self, g: &mut Group, l: LineageId, e: Epoch) -> Result<()> {
        let lin = self.lineage(l)?;
        let r = &lin.retained;
        // The whole retained interval around e, (e_prev, e_next], so the job can merge
        // its dead records into one per page (jobs.rs settle_page).
        let lo = r.before(e).map_or(Epoch::FIRST, |p| p.next());
        let job = match lin.closed {
            None => JobKind::drop(lo, r.after(e).map_or(lin.epoch, |n| n.min(lin.epoch))),
            Some(_) if r.is_empty() => JobKind::Destroy,
            Some(ec) => JobKind::drop(lo, r.after(e).unwrap_or(ec)),
        };
        self.enqueue(g, l, job);
        Ok(())
    }

    pub(super) fn enqueue(&mut self, g: &mut Group, l: LineageId, kind: JobKind) {
        if let JobKind::Drop { lo, hi, .. } = kind {
            if lo > hi {
                return;
            }
        }
        let seq = self.next.job;
        self.next.job += 1;
        g.next_dirty = true;
        let job = Job {
            seq,
            lineage: l,
            kind,
        };
        g.jobs.insert(seq, Some(job.encode()));
        self.jobs.push_back(job);
    }

    // ---- writes ----

    /// Applies one edit (a write's mapping, or an unmap) in the lineage's current epoch.
    pub fn apply(&mut self, g: &mut Group, edit: &Edit) -> Result<()> {
        let lin = self.lineage(edit.lineage)?.clone();
        if lin.closed.is_some() {
            return Err(Error::invalid(
                "write",
                format!("lineage {} is closed", lin.id),
            ));
        }
        let end = edit
            .lba
            .checked_add(edit.len)
            .ok_or_else(|| Error::invalid("edit", "range overflows"))?;
        if let Some((_, crcs)) = &edit.map {
            if crcs.len() as u64 != edit.len {
                return Err(Error::invalid("edit", "one checksum per block"));
            }
        }
        // From here on in-memory state changes: an error stops the engine.
        let r = self.apply_valid(g, &lin, edit, end);
        self.stop_on_error(r)
    }

    pub(super) fn stop_on_error<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.failed.get_or_insert_with(|| e.to_string());
        }
        r
    }

    fn apply_valid(&mut self, g: &mut Group, lin: &Lineage, edit: &Edit, end: u64) -> Result<()> {
        if let Some((pba, _)) = &edit.map {
            self.regions.set(*pba, edit.len).map_err(corrupt)?;
            g.allocated.push((*pba, edit.len));
            if let Some(l) = self.lineages.get_mut(&lin.id) {
                l.owned = l.owned.saturating_add(edit.len);
                g.counters.insert(lin.id);
            }
        }
        let pages: Vec<PageNo> = if edit.map.is_none() && lin.base.is_none() {
            self.mapped_pages(g, lin.id, edit.lba, end)?
        } else {
            (edit.lba / PAGE_BLOCKS..end.div_ceil(PAGE_BLOCKS))
                .map(PageNo)
                .collect()
        };
        for p in pages {
            let from = edit.lba.max(p.0 * PAGE_BLOCKS);
            let to = end.min((p.0 + 1) * PAGE_BLOCKS);
            self.apply_page(g, lin, p, from, to, edit)?;
        }
        Ok(())
    }

    /// Pages of a lineage without base that may hold blocks in `[from, to)`: the stored
    /// ones and the ones this group has.
    fn mapped_pages(&self, g: &Group, l: LineageId, from: u64, to: u64) -> Result<Vec<PageNo>> {
        let (pf, pt) = (from / PAGE_BLOCKS, to.div_ceil(PAGE_BLOCKS));
        let mut set = BTreeSet::new();
        let (a, b) = keys::pages(l, PageNo(pf), PageNo(pt));
        try_scan(&*self.store, &a, &b, |k, _| {
            let [_, p] = keys::fields::<2>(k, keys::K_PAGE)
                .ok_or_else(|| corrupt(format!("page key {}", read::hex(k))))?;
            set.insert(PageNo(p));
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        for (gl, gp) in g.pages.keys() {
            if *gl == l && (pf..pt).contains(&gp.0) {
                set.insert(*gp);
            }
        }
        Ok(set.into_iter().collect())
    }

    fn apply_page(
        &mut self,
        g: &mut Group,
        lin: &Lineage,
        p: PageNo,
        from: u64,
        to: u64,
        edit: &Edit,
    ) -> Result<()> {
        let w = lin.epoch;
        let base_off = p.0 * PAGE_BLOCKS;
        let mut page = match self.page_mut(g, lin.id, p)?.value.take() {
            Some(pg) => pg,
            None => match lin.base {
                // Copy-up: the base content becomes BASE pieces of this lineage.
                Some((lb, eb)) => {
                    // References to checksum blocks are copied as they are: the base's
                    // owners keep those blocks while `eb` is retained.
                    let content =
                        read::read_page_raw(&*self.store, &self.lineages, lb, Some(eb), p)?;
                    let pieces = read::to_pieces(&content, Epoch::ZERO, PieceFlags::BASE);
                    if pieces.is_empty() && edit.map.is_none() {
                        return Ok(());
                    }
                    Page {
                        x_epoch: Epoch::ZERO,
                        dead_run: 0,
                        pieces,
                    }
                }
                None => Page::default(),
            },
        };
        let removed = page::cut(&mut page.pieces, from - base_off, to - base_off);
        let changed = !removed.is_empty() || edit.map.is_some();
        let mut born: i64 = 0;
        for x in removed.iter().filter(|x| x.owned() && x.birth == w) {
            born -= i64::from(x.len);
        }
        if edit.map.is_some() {
            born += (to - from) as i64;
        }
        if born != 0 {
            if let Some(l) = self.lineages.get_mut(&lin.id) {
                l.born_now = l.born_now.saturating_add_signed(born);
            }
            g.counters.insert(lin.id);
        }
        for x in removed {
            if lin.retained.max().is_some_and(|m| m >= x.birth) {
                let d = self.dead_mut(g, lin.id, p, w)?;
                if d.value.as_ref().is_none_or(|r| r.pieces.is_empty()) {
                    page.dead_run = page.dead_run.saturating_add(1);
                }
                let rec = d.value.get_or_insert_with(DeadRecord::default);
                page::insert(&mut rec.pieces, x).map_err(|e| {
                    corrupt(format!(
                        "dead record of lineage {} page {p} epoch {w}: {e}",
                        lin.id
                    ))
                })?;
                d.dirty = true;
                Self::set_index(g, lin.id, w, p, Some(X_DEAD));
            } else {
                self.free_piece(g, lin.id, &x)?;
            }
        }
        if let Some((pba, crcs)) = &edit.map {
            let skip = (from - edit.lba) as usize;
            let n = (to - from) as usize;
            let piece = Piece {
                off: (from - base_off) as u8,
                len: n as u8,
                pba: pba + skip as u64,
                birth: w,
                flags: PieceFlags::OWN,
                sums: Sums::Inline(crate::v2::piece::Crcs::from_slice(&crcs[skip..skip + n])),
            };
            page::insert(&mut page.pieces, piece).map_err(corrupt)?;
        }
        if changed && !lin.retained.is_empty() && page.x_epoch < w {
            // The page may have been emptied and deleted earlier in this epoch (losing its
            // x_epoch) after its dead record was indexed: never clobber that DEAD flag.
            if let btree_map::Entry::Vacant(slot) = g.index.entry((lin.id, w, p)) {
                if self.store.get(&keys::index(lin.id, w, p))?.is_none() {
                    slot.insert(Some(0));
                }
            }
            page.x_epoch = w;
        }
        if self.checkpoint_every > 0 && page.dead_run >= self.checkpoint_every {
            if let Some(e) = lin.retained.max() {
                let pieces = self.pieces_at(g, lin.id, p, &page.pieces, e)?;
                g.checkpoints
                    .insert((lin.id, p, e), Some(DeadRecord { pieces }));
                page.dead_run = 0;
            }
        }
        let keep = !page.pieces.is_empty() || lin.base.is_some();
        let c = self.page_mut(g, lin.id, p)?;
        c.value = keep.then_some(page);
        c.dirty |= changed;
        Ok(())
    }

    /// The pieces of page `p` of `l` at epoch `e`, through this group's cache, given the
    /// page's current live pieces: those born ≤ e, and the dead ones born ≤ e with death
    /// > e (I3). Used for read checkpoints at e = max R, where few records lie above e.
    fn pieces_at(
        &self,
        g: &Group,
        l: LineageId,
        p: PageNo,
        live: &[Piece],
        e: Epoch,
    ) -> Result<Vec<Piece>> {
        let mut out: Vec<Piece> = Vec::new();
        let add = |out: &mut Vec<Piece>, x: &Piece| {
            page::insert(out, x.clone()).map_err(|why| {
                corrupt(format!(
                    "read checkpoint of lineage {l} page {p} at {e}: {why}"
                ))
            })
        };
        for x in live.iter().filter(|x| x.birth <= e) {
            add(&mut out, x)?;
        }
        let mut stored = Vec::new();
        let (a, b) = keys::deads_from(l, p, e.next());
        try_scan(&*self.store, &a, &b, |k, v| {
            if let Some(keys::DeadKey::Dead(_, _, d)) = keys::dead_key(k) {
                if !g.deads.contains_key(&(l, p, d)) {
                    stored.extend(read::decode_dead(k, v)?.pieces);
                }
            }
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        let cached = g
            .deads
            .range((l, p, e.next())..=(l, p, Epoch(u64::MAX)))
            .filter_map(|(_, c)| c.value.as_ref())
            .flat_map(|r| r.pieces.iter());
        for x in stored.iter().chain(cached).filter(|x| x.birth <= e) {
            add(&mut out, x)?;
        }
        Ok(out)
    }

    // ---- commit ----

    /// Writes the group as one batch. On a store error the engine stops (fail-stop).
    pub fn commit(&mut self, g: Group) -> Result<Committed> {
        if let Some(why) = &self.failed {
            return Err(Error::Corrupt(format!("metadata engine stopped: {why}")));
        }
        let mut b = WriteBatch::new();
        for ((l, p), c) in &g.pages {
            if c.dirty {
                match &c.value {
                    Some(pg) => b.put(keys::page(*l, *p), pg.encode()),
                    None => b.delete(keys::page(*l, *p)),
                }
            }
        }
        for ((l, p, d), c) in &g.deads {
            if c.dirty {
                match &c.value {
                    Some(rec) if !rec.pieces.is_empty() => {
                        b.put(keys::dead(*l, *p, *d), rec.encode())
                    }
                    _ => b.delete(keys::dead(*l, *p, *d)),
                }
            }
        }
        for ((l, p, e), c) in &g.checkpoints {
            match c {
                Some(rec) => b.put(keys::checkpoint(*l, *p, *e), rec.encode()),
                None => b.delete(keys::checkpoint(*l, *p, *e)),
            }
        }
        for ((l, w, p), f) in &g.index {
            match f {
                Some(flags) => b.put(keys::index(*l, *w, *p), vec![*flags]),
                None => b.delete(keys::index(*l, *w, *p)),
            }
        }
        for l in &g.lineages {
            match self.lineages.get(l) {
                Some(lin) => b.put(keys::lineage(*l), lin.encode()),
                None => b.delete(keys::lineage(*l)),
            }
        }
        let mut owned = Vec::with_capacity(g.counters.len());
        for l in &g.counters {
            match self.lineages.get(l) {
                Some(lin) => {
                    b.put(keys::counter(*l), encode_counter(lin));
                    owned.push((*l, Some(lin.owned)));
                }
                None => {
                    b.delete(keys::counter(*l));
                    owned.push((*l, None));
                }
            }
        }
        for (at, c) in &g.sum_counts {
            if c.dirty {
                match c.value {
                    Some(n) => b.put(keys::sum_count(*at), n.to_le_bytes().to_vec()),
                    None => b.delete(keys::sum_count(*at)),
                }
            }
        }
        if self.sum_counts.len() + g.sum_counts.len() > SUM_COUNTS_CACHED {
            self.sum_counts.clear();
        }
        // As the batch says (if the store refuses it, the engine stops and this is moot).
        for (at, c) in &g.sum_counts {
            match c.value {
                Some(n) => self.sum_counts.insert(*at, n),
                None => self.sum_counts.remove(at),
            };
        }
        for n in self.regions.take_dirty() {
            b.put(keys::region(n), self.regions.encode(n));
        }
        for (seq, v) in &g.jobs {
            match v {
                Some(v) => b.put(keys::job(*seq), v.clone()),
                None => b.delete(keys::job(*seq)),
            }
        }
        if g.next_dirty {
            b.put(
                keys::next_ids(),
                serde_json::to_vec(&self.next).expect("next ids serialise"),
            );
        }
        b.ops.extend(g.extra);
        if let Err(e) = self.store_commit(b, g.durable) {
            self.failed.get_or_insert_with(|| e.to_string());
            return Err(e);
        }
        Ok(Committed {
            freed: g.freed,
            allocated: g.allocated,
            destroyed: g.destroyed,
            owned,
        })
    }

    fn store_commit(&self, b: WriteBatch, durable: bool) -> Result<()> {
        crate::failpoint!("commit2.before_store");
        if !b.is_empty() || durable {
            self.store.commit(b, durable)?;
        }
        crate::failpoint!("commit2.after_store");
        Ok(())
    }

    /// Formats empty format-2 metadata (no lineages, every block free).
    pub fn format(store: &dyn MetaStore) -> Result<()> {
        let mut b = WriteBatch::new();
        b.put(
            keys::next_ids(),
            serde_json::to_vec(&NextIds { lineage: 1, job: 1 }).expect("serialise"),
        );
        store.commit(b, true)?;
        Ok(())
    }

    /// The content of page `p` of `l` at `at` (`None` = live), as committed.
    pub fn read(&self, l: LineageId, at: Option<Epoch>, p: PageNo) -> Result<read::Content> {
        read::read_page(&*self.store, &self.lineages, &*self.sums, l, at, p)
    }
}
