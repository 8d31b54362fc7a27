//! Reading a page of a lineage at an epoch (format2.md §3.2), lock-free on any store view.
//!
//! The live page is read before the dead records: a piece alive at a retained epoch e is
//! either still in the live page when it is read, or was moved to a dead record before, and
//! dead pieces e needs are not removed while e is retained. A piece moved between the two
//! reads is seen twice with the same blocks; slots make that harmless.
//!
//! Read checkpoints (format2.md §8a): the scan of a page's dead records from epoch e on stops
//! at the first checkpoint `c(L, page, E)`, E ≥ e, which holds the content at E; the content at
//! e is its pieces born ≤ e plus those of the dead records with death in (e, E] — all met
//! before it in one ordered scan, so one store iterator (one implicit store snapshot) sees
//! both as one state. A job that moves dead records across an epoch deletes the checkpoint
//! there in the same batch if that epoch is no longer retained; records never move across a
//! retained one. So the checkpoint a scan meets and the records before it always agree.

use std::ops::{ControlFlow, Range};

use super::cache::ContentCache;
use super::ids::{Epoch, LineageId, PageNo};
use super::keys;
use super::page::{DeadRecord, Page};
use super::piece::{Piece, PieceFlags, PieceView, Sum, SumRef, Sums};
use super::sums::{SumBlock, SumBlocks};
use super::PAGE_BLOCKS;
use crate::error::{Error, Result};
use crate::meta::{try_scan, MetaRead};

/// One mapped block: where it is and its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub pba: u64,
    pub crc: u32,
}

/// The content of one page: a slot per block, `None` = reads as zeros.
pub type Content = [Option<Block>; PAGE_BLOCKS as usize];

/// Where a lineage's unwritten pages come from, as the catalog knows it.
pub trait Bases {
    fn base(&self, l: LineageId) -> Result<Option<(LineageId, Epoch)>>;
}

pub fn decode_page(key: &[u8], v: &[u8]) -> Result<Page> {
    Page::decode(v).map_err(|e| Error::Corrupt(format!("page key {}: {e}", hex(key))))
}
pub fn decode_dead(key: &[u8], v: &[u8]) -> Result<DeadRecord> {
    DeadRecord::decode(v).map_err(|e| Error::Corrupt(format!("dead record key {}: {e}", hex(key))))
}
pub fn hex(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// One mapped block before its checksum is looked up: where it is, and its CRC or the
/// checksum-block slot holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raw {
    pub pba: u64,
    pub sum: Sum,
}

/// A page's content with checksums not looked up yet (copy-up keeps references as they are).
pub type RawContent = [Option<Raw>; PAGE_BLOCKS as usize];

/// Where [`fill_from`] puts a record's pieces: returns the first slot on which a piece
/// disagrees with what an earlier one put there.
trait Sink {
    fn add(&mut self, p: &PieceView<'_>) -> Option<usize>;
    /// From now on every slot is wanted (a read that moves on to a retained epoch, whose
    /// content the cache keeps whole).
    fn want_all(&mut self) {}
    /// The slot past the last one wanted: pieces are in slot order, so a record's pieces
    /// starting there or later are not visited.
    fn wanted_end(&self) -> usize {
        PAGE_BLOCKS as usize
    }
}

impl Sink for RawContent {
    fn add(&mut self, p: &PieceView<'_>) -> Option<usize> {
        let mut clash = None;
        for i in 0..usize::from(p.len) {
            let b = Raw {
                pba: p.pba + i as u64,
                sum: p.sum(i),
            };
            let s = &mut self[usize::from(p.off) + i];
            match s {
                Some(old) if old.pba != b.pba => {
                    clash.get_or_insert(usize::from(p.off) + i);
                }
                Some(old) => {
                    let same_form = matches!(
                        (old.sum, b.sum),
                        (Sum::Crc(_), Sum::Crc(_)) | (Sum::Slot(_), Sum::Slot(_))
                    );
                    if same_form && old.sum != b.sum {
                        clash.get_or_insert(usize::from(p.off) + i);
                    }
                }
                None => *s = Some(b),
            }
        }
        clash
    }
}

/// A content being read: blocks whose CRC is inline are final; the others are marked
/// `pending` with their checksum block (an index into `blocks`, the distinct ones met:
/// usually one) and slot, to be looked up once per checksum block by
/// [`Filling::resolve`]. What a read costs: no copy of the page, no allocation. Only the
/// slots in `want` are filled (a 4 KiB read of a volume's own page decodes the page but
/// copies one block's location): slots outside it stay `None`, and pieces outside it are
/// neither checked against others nor resolved.
struct Filling {
    content: Content,
    want: Range<usize>,
    pending: u64,
    slots: [u16; PAGE_BLOCKS as usize],
    which: [u8; PAGE_BLOCKS as usize],
    blocks: smallvec::SmallVec<[SumRef; 2]>,
}

impl Filling {
    fn new(want: Range<usize>) -> Filling {
        Filling {
            content: [None; PAGE_BLOCKS as usize],
            want,
            pending: 0,
            slots: [0; PAGE_BLOCKS as usize],
            which: [0; PAGE_BLOCKS as usize],
            blocks: smallvec::SmallVec::new(),
        }
    }

    /// The index of checksum block `r` in `blocks` (added if new). A page names at most
    /// 64 of them: it fits a u8.
    fn block_index(&mut self, r: SumRef) -> u8 {
        let k = match self
            .blocks
            .iter()
            .position(|b| b.at == r.at && b.crc == r.crc)
        {
            Some(k) => k,
            None => {
                self.blocks.push(r);
                self.blocks.len() - 1
            }
        };
        k as u8
    }

    /// Marks slot `idx` (block `pba`) as having its CRC in slot `r.slot` of block `r`.
    fn defer(&mut self, idx: usize, pba: u64, r: SumRef) {
        let k = self.block_index(r);
        self.content[idx] = Some(Block { pba, crc: 0 });
        self.pending |= 1 << idx;
        self.slots[idx] = r.slot;
        self.which[idx] = k;
    }

    /// Looks every pending CRC up through `sums` (in place: a page's content is 1 KiB,
    /// and reads should not copy it more than once).
    fn resolve(&mut self, sums: &dyn SumBlocks) -> Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        for k in 0..self.blocks.len() {
            let want = self.blocks[k];
            let (content, pending, slots, which) = (
                &mut self.content,
                &mut self.pending,
                &self.slots,
                &self.which,
            );
            let only = self.blocks.len() == 1;
            sums.with_block(want, &mut |block: &SumBlock| {
                let mut bits = *pending;
                while bits != 0 {
                    let idx = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if !only && usize::from(which[idx]) != k {
                        continue;
                    }
                    if let (Some(b), Some(crc)) =
                        (&mut content[idx], block.get(usize::from(slots[idx])))
                    {
                        b.crc = *crc;
                        *pending &= !(1 << idx);
                    }
                }
            })?;
        }
        if self.pending != 0 {
            return Err(Error::Corrupt(format!(
                "block {} of a page: its checksum slot is beyond its checksum block",
                self.pending.trailing_zeros()
            )));
        }
        Ok(())
    }
}

impl Sink for Filling {
    fn want_all(&mut self) {
        self.want = 0..PAGE_BLOCKS as usize;
    }
    fn wanted_end(&self) -> usize {
        self.want.end
    }

    fn add(&mut self, p: &PieceView<'_>) -> Option<usize> {
        let (start, end) = (usize::from(p.off), usize::from(p.off) + usize::from(p.len));
        let (from, to) = (start.max(self.want.start), end.min(self.want.end));
        if from >= to {
            return None;
        }
        let (off, len) = (from, to - from);
        if let Some(r) = p.sum_block() {
            if self.content[off..off + len].iter().all(Option::is_none) {
                // The common case, a whole piece into empty slots: one block lookup.
                let k = self.block_index(r);
                let skip = off - start;
                for i in 0..len {
                    self.content[off + i] = Some(Block {
                        pba: p.pba + (skip + i) as u64,
                        crc: 0,
                    });
                    self.slots[off + i] = r.slot + (skip + i) as u16;
                    self.which[off + i] = k;
                }
                let mask = if len == 64 {
                    u64::MAX
                } else {
                    ((1u64 << len) - 1) << off
                };
                self.pending |= mask;
                return None;
            }
        }
        let mut clash = None;
        for idx in off..to {
            let i = idx - start;
            let pba = p.pba + i as u64;
            match (&self.content[idx], p.sum(i)) {
                (Some(old), _) if old.pba != pba => {
                    clash.get_or_insert(idx);
                }
                // Both inline: they must agree. A CRC in a checksum block is compared
                // with nothing (a reader may meet a piece in both forms, §9b).
                (Some(old), Sum::Crc(c)) if self.pending & (1 << idx) == 0 && old.crc != c => {
                    clash.get_or_insert(idx);
                }
                (Some(_), _) => {}
                (None, Sum::Crc(crc)) => self.content[idx] = Some(Block { pba, crc }),
                (None, Sum::Slot(r)) => self.defer(idx, pba, r),
            }
        }
        clash
    }
}

/// Adds the pieces of one encoded record (`page`: a live page, else a dead record or
/// checkpoint) born at or before `at` to `slots`, without allocating (nor decoding pieces
/// past the slots `slots` wants). Two pieces giving a
/// slot different blocks, or different checksums of one form, are corruption; the same
/// block with its CRC inline once and in a checksum block once is not (a reader may meet a
/// piece before and after consolidation, format2.md §9b).
fn fill_from<S: Sink>(
    slots: &mut S,
    key: &[u8],
    v: &[u8],
    page: bool,
    at: Option<Epoch>,
) -> Result<()> {
    let mut clash = None;
    let end = slots.wanted_end();
    let visit = |p: &PieceView<'_>| {
        if usize::from(p.off) >= end {
            return ControlFlow::Break(());
        }
        if at.is_some_and(|e| p.birth > e) {
            return ControlFlow::Continue(());
        }
        if let Some(i) = slots.add(p) {
            clash.get_or_insert(i);
        }
        ControlFlow::Continue(())
    };
    let decoded = if page {
        Page::visit(v, visit)
    } else {
        DeadRecord::visit(v, visit)
    };
    let what = if page { "page" } else { "dead record" };
    decoded.map_err(|e| Error::Corrupt(format!("{what} key {}: {e}", hex(key))))?;
    match clash {
        Some(i) => Err(Error::Corrupt(format!(
            "two pieces disagree about block {i} of page key {}",
            hex(key)
        ))),
        None => Ok(()),
    }
}

/// `raw` with every checksum looked up (one lookup per checksum block met).
pub fn resolve(raw: &RawContent, sums: &dyn SumBlocks) -> Result<Content> {
    let mut f = Filling::new(0..PAGE_BLOCKS as usize);
    for (i, r) in raw.iter().enumerate() {
        let Some(r) = r else { continue };
        match r.sum {
            Sum::Crc(crc) => f.content[i] = Some(Block { pba: r.pba, crc }),
            Sum::Slot(s) => f.defer(i, r.pba, s),
        }
    }
    f.resolve(sums)?;
    Ok(f.content)
}

/// The content of page `p` of lineage `l` at epoch `at` (`None`: the live content).
pub fn read_page<S: MetaRead + ?Sized>(
    store: &S,
    bases: &dyn Bases,
    sums: &dyn SumBlocks,
    l: LineageId,
    at: Option<Epoch>,
    p: PageNo,
) -> Result<Content> {
    read_page_with(store, bases, sums, l, at, p, true)
}

/// [`read_page`] from the dead records alone, ignoring read checkpoints: what `check`
/// compares each checkpoint with.
pub fn read_page_exact<S: MetaRead + ?Sized>(
    store: &S,
    bases: &dyn Bases,
    sums: &dyn SumBlocks,
    l: LineageId,
    at: Option<Epoch>,
    p: PageNo,
) -> Result<Content> {
    read_page_with(store, bases, sums, l, at, p, false)
}

/// [`read_page`] with two sources: `live` for the live page of `l` when `at` is `None` (a
/// volume's own page), `retained` for everything read at a retained epoch (a snapshot, or
/// the base a clone's unwritten page inherits), which must be one consistent state as new
/// as the request's target (a store reader: `MetaStore::reader`). Why that may be older
/// than `live`'s get: the content of a retained epoch does not change while it is
/// retained (I3; a snapshot's or a clone's base is, while the target exists), so any one
/// state from after the target existed gives it; a volume's own page must be current, and
/// an open clone's live page, once made, is kept even when empty (only destroying the
/// lineage removes it), so "absent now" means "absent in the reader's state" too.
/// Within a retained read, the page record may come from a state *older* than the dead
/// records' (`MetaRead::get_leading`: the first page of a request is a plain store get,
/// the reader is taken afterwards, at its scan) but never newer: a piece visible at e is
/// in the page when it is read or was moved to a dead record before, which the later
/// state holds (§3.2), and nothing moves from a dead record back into a page; the dead
/// records and the checkpoint that ends the scan are one state. (The other order would
/// lose a piece moved between the scan and the page read.)
///
/// `cache` holds contents at retained epochs (cache.rs says why they never go stale): the
/// first lookup at a retained epoch — a snapshot's page, or the base a clone's unwritten
/// page inherits — is answered from it when it can be, and remembered in it otherwise.
///
/// Only the slots in `want` are sure to be filled: a volume's own page fills just those
/// (a 4 KiB read copies one block's location out of the page); what is read at a
/// retained epoch is filled whole, for the cache.
#[allow(clippy::too_many_arguments)]
pub fn read_page_split<L: MetaRead + ?Sized, R: MetaRead + ?Sized>(
    live: &L,
    retained: &R,
    bases: &dyn Bases,
    sums: &dyn SumBlocks,
    cache: &ContentCache,
    l: LineageId,
    at: Option<Epoch>,
    p: PageNo,
    want: Range<usize>,
) -> Result<Content> {
    read_page_in(
        live,
        retained,
        bases,
        sums,
        Some(cache),
        l,
        at,
        p,
        true,
        want,
    )
}

fn read_page_with<S: MetaRead + ?Sized>(
    store: &S,
    bases: &dyn Bases,
    sums: &dyn SumBlocks,
    l: LineageId,
    at: Option<Epoch>,
    p: PageNo,
    checkpoints: bool,
) -> Result<Content> {
    let all = 0..PAGE_BLOCKS as usize;
    read_page_in(store, store, bases, sums, None, l, at, p, checkpoints, all)
}

#[allow(clippy::too_many_arguments)]
fn read_page_in<L: MetaRead + ?Sized, R: MetaRead + ?Sized>(
    live: &L,
    retained: &R,
    bases: &dyn Bases,
    sums: &dyn SumBlocks,
    cache: Option<&ContentCache>,
    l: LineageId,
    at: Option<Epoch>,
    p: PageNo,
    checkpoints: bool,
    want: Range<usize>,
) -> Result<Content> {
    // The retained (lineage, epoch)s this read looked up in the cache and missed: the
    // content found is theirs too (a snapshot of a clone whose page was not written by
    // then has its base's content at the base epoch), so each gets it.
    let mut missed: smallvec::SmallVec<[(LineageId, Epoch); 2]> = smallvec::SmallVec::new();
    let mut filling = Filling::new(want);
    let hit = read_raw_in(
        live,
        retained,
        bases,
        cache,
        &mut missed,
        &mut filling,
        l,
        at,
        p,
        checkpoints,
    )?;
    let content = match hit {
        Some(hit) => hit,
        None => {
            filling.resolve(sums)?;
            filling.content
        }
    };
    if let Some(c) = cache {
        for &(ml, me) in &missed {
            c.insert(ml, me, p, &content);
        }
    }
    Ok(content)
}

/// [`read_page_split`] without looking checksums up: where blocks are and which are holes
/// (block status), never a checksum-block read. Answers from the cache when it can; what
/// it finds is not cached (the cache holds resolved contents).
#[allow(clippy::too_many_arguments)]
pub fn read_page_split_raw<L: MetaRead + ?Sized, R: MetaRead + ?Sized>(
    live: &L,
    retained: &R,
    bases: &dyn Bases,
    cache: &ContentCache,
    l: LineageId,
    at: Option<Epoch>,
    p: PageNo,
) -> Result<RawContent> {
    let mut raw: RawContent = [None; PAGE_BLOCKS as usize];
    if let Some(hit) = raw_in(live, retained, bases, Some(cache), &mut raw, l, at, p)? {
        for (r, b) in raw.iter_mut().zip(hit.iter()) {
            *r = b.map(|b| Raw {
                pba: b.pba,
                sum: Sum::Crc(b.crc),
            });
        }
    }
    Ok(raw)
}

/// The content of page `p` of `l` at `at`, checksums not looked up: what copy-up copies,
/// and what needs only where blocks are (diff, block location).
pub fn read_page_raw<S: MetaRead + ?Sized>(
    store: &S,
    bases: &dyn Bases,
    l: LineageId,
    at: Option<Epoch>,
    p: PageNo,
) -> Result<RawContent> {
    let mut raw: RawContent = [None; PAGE_BLOCKS as usize];
    raw_in(store, store, bases, None, &mut raw, l, at, p)?;
    Ok(raw)
}

/// [`read_raw_in`] into `raw`, with checkpoints and nothing to remember about misses.
#[allow(clippy::too_many_arguments)]
fn raw_in<L: MetaRead + ?Sized, R: MetaRead + ?Sized>(
    live: &L,
    retained: &R,
    bases: &dyn Bases,
    cache: Option<&ContentCache>,
    raw: &mut RawContent,
    l: LineageId,
    at: Option<Epoch>,
    p: PageNo,
) -> Result<Option<Content>> {
    let mut missed = smallvec::SmallVec::new();
    read_raw_in(
        live,
        retained,
        bases,
        cache,
        &mut missed,
        raw,
        l,
        at,
        p,
        true,
    )
}

/// Fills `slots` with the content of page `p` of `l` at `at`, or returns the content the
/// cache holds for it (`slots` then empty); `missed` gets the retained (lineage, epoch)s
/// the cache was asked for and did not have.
#[allow(clippy::too_many_arguments)]
fn read_raw_in<L: MetaRead + ?Sized, R: MetaRead + ?Sized, S: Sink>(
    live: &L,
    retained: &R,
    bases: &dyn Bases,
    cache: Option<&ContentCache>,
    missed: &mut smallvec::SmallVec<[(LineageId, Epoch); 2]>,
    slots: &mut S,
    mut l: LineageId,
    mut at: Option<Epoch>,
    p: PageNo,
    checkpoints: bool,
) -> Result<Option<Content>> {
    // Bounded: each step moves to an older lineage, and lineage ids only grow.
    loop {
        // Slots are still empty whenever `at` is a retained epoch: a lookup only moves on
        // to a base after finding no page, so a cached content is the whole answer.
        if at.is_some() {
            slots.want_all();
        }
        if let (Some(c), Some(e)) = (cache, at) {
            if let Some(hit) = c.get(l, e, p) {
                return Ok(Some(hit));
            }
            missed.push((l, e));
        }
        let key = keys::page(l, p);
        // At a retained epoch the page is read first and the dead records after it, from
        // a state no older (§3.2 needs no more than that): a reader not taken yet answers
        // with the store's plain get and takes its state at the scan below.
        let page = match at {
            None => live.get(&key)?,
            Some(_) => retained.get_leading(&key)?,
        };
        if page.is_none() {
            if let Some((lb, eb)) = bases.base(l)? {
                if lb >= l {
                    return Err(Error::Corrupt(format!(
                        "lineage {l} based on newer lineage {lb}"
                    )));
                }
                l = lb;
                at = Some(eb);
                continue;
            }
        }
        if let Some(v) = &page {
            fill_from(slots, &key, v, true, at)?;
        }
        if let Some(e) = at {
            // From c(e) on: the checkpoint at e itself if any, then d(e+1), c(e+1), ...
            let (from, to) = keys::reads_from(l, p, e);
            try_scan(retained, &from, &to, |k, v| {
                let is_checkpoint = match keys::dead_key(k) {
                    Some(keys::DeadKey::Checkpoint(..)) => true,
                    Some(keys::DeadKey::Dead(..)) => false,
                    None => return Err(Error::Corrupt(format!("dead-record key {}", hex(k)))),
                };
                if is_checkpoint && !checkpoints {
                    return Ok(ControlFlow::Continue(()));
                }
                fill_from(slots, k, v, false, Some(e))?;
                Ok::<_, Error>(if is_checkpoint {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                })
            })?;
        }
        return Ok(None);
    }
}

/// `content` as pieces with `flags` and `birth`, merging contiguous blocks whose checksums
/// continue (inline, or consecutive slots of one checksum block).
pub fn to_pieces(content: &RawContent, birth: Epoch, flags: PieceFlags) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for (i, s) in content.iter().enumerate() {
        let Some(b) = s else { continue };
        let sums = match b.sum {
            Sum::Crc(c) => Sums::Inline(smallvec::smallvec![c]),
            Sum::Slot(r) => Sums::Block(r),
        };
        let piece = Piece {
            off: i as u8,
            len: 1,
            pba: b.pba,
            birth,
            flags,
            sums,
        };
        if let Some(last) = out.last_mut() {
            if last.joins(&piece) {
                last.len += 1;
                last.sums.append(piece.sums);
                continue;
            }
        }
        out.push(piece);
    }
    out
}
