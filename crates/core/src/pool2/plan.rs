//! Whole-block I/O split into plan → data-device I/O → finish on format 2 (the same
//! contract as pool/plan.rs, whose `ReadPlan` this pool builds too): a frontend with its own
//! io_uring (a ublk queue) does the device I/O between the two calls.
//!
//! * A read plan holds a read pin from before its page reads until it is finished or
//!   dropped, so no block it names is reused meanwhile.
//! * A [`WritePlan`] owns freshly allocated blocks nothing references; all-zero blocks get
//!   none (they are unmapped: holes). Finishing it after the data writes hands the mapping
//!   to the committer; an I/O error, a refused Txn or dropping the plan returns the blocks
//!   at once. A failed commit sets them aside (the engine stops; the next open decides).

use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering;

use crate::device::{WriteSeg, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::error::{Error, Result};
use crate::keys::VolId;
use crate::meta::LazyReader;
use crate::meta::MetaStore;
use crate::pool::plan::{is_zero, whole_blocks, DeviceSeg, ReadPlan};
use crate::v2::cache::ContentCache;
use crate::v2::read::{read_page_split, read_page_split_raw, Content, RawContent};
use crate::v2::{Epoch, LineageId, PageNo, PAGE_BLOCKS};

use super::catalog::{BaseMap, Source};
use super::committer::{Answer, Edits, Work};
use super::{lock, Pool2, Target};

pub struct WritePlan<'a> {
    pool: &'a Pool2,
    pub segs: Vec<DeviceSeg>,
    vol: VolId,
    b0: u64,
    /// Per block: its new data block and checksum, or None for an all-zero block.
    assigned: Vec<Option<(u64, u32)>>,
    allocated: Vec<u64>,
    /// Blocks reserved against the volume's quota until this plan ends (space.rs).
    reserved: u64,
    pub fua: bool,
}

impl WritePlan<'_> {
    /// The device writes of this plan as segments of `data` (the buffer it was planned from).
    pub fn device_writes<'b>(&self, data: &'b [u8]) -> Vec<WriteSeg<'b>> {
        self.segs
            .iter()
            .map(|s| WriteSeg {
                offset: s.dev_offset,
                buf: &data[s.buf_offset..s.buf_offset + s.len],
            })
            .collect()
    }

    /// The mapping changes: runs of consecutive data blocks, and runs of zero blocks.
    fn edits(&self) -> Edits {
        let mut edits: Edits = Vec::new();
        for (i, a) in self.assigned.iter().enumerate() {
            let lba = self.b0 + i as u64;
            match (edits.last_mut(), a) {
                (Some((l, n, Some((p, crcs)))), Some((pba, crc)))
                    if *l + *n == lba && *p + *n == *pba =>
                {
                    *n += 1;
                    crcs.push(*crc);
                }
                (Some((l, n, None)), None) if *l + *n == lba => *n += 1,
                (_, Some((pba, crc))) => edits.push((lba, 1, Some((*pba, vec![*crc])))),
                (_, None) => edits.push((lba, 1, None)),
            }
        }
        edits
    }
}

/// A write's outcome, delivered to a caller that did not wait for its commit.
pub type WriteThen = Box<dyn FnOnce(Result<()>) + Send>;

fn write_result(a: Answer) -> Result<()> {
    match a {
        Answer::Value(_) => Ok(()),
        Answer::Rejected(e) | Answer::Failed(e) => Err(e),
        Answer::Retry => Err(Error::Busy("write refused for retry".into())),
    }
}

/// What a write planned to commit holds until its Txn is answered ([`Pool2::settle`]).
pub(crate) struct Settle {
    allocated: Vec<u64>,
}

impl Drop for WritePlan<'_> {
    fn drop(&mut self) {
        self.pool.unreserve(self.vol, self.reserved);
        if !self.allocated.is_empty() {
            let mut a = lock(&self.pool.alloc);
            for &b in &self.allocated {
                a.free_now(b);
            }
        }
    }
}

/// One request's page reads of one resolved target (plan_read, block_status).
struct RequestPages<'a> {
    store: &'a dyn MetaStore,
    retained: LazyReader<'a>,
    bases: BaseMap,
    cache: &'a ContentCache,
    sums: &'a dyn crate::v2::sums::SumBlocks,
    lineage: LineageId,
    at: Option<Epoch>,
}

impl RequestPages<'_> {
    /// The page's content; only the slots in `want` are sure to be filled.
    fn content(&self, p: PageNo, want: Range<usize>) -> Result<Content> {
        read_page_split(
            self.store,
            &self.retained,
            &self.bases,
            self.sums,
            self.cache,
            self.lineage,
            self.at,
            p,
            want,
        )
    }
    /// Where the page's blocks are, checksums not looked up (block status).
    fn locations(&self, p: PageNo) -> Result<RawContent> {
        read_page_split_raw(
            self.store,
            &self.retained,
            &self.bases,
            self.cache,
            self.lineage,
            self.at,
            p,
        )
    }
}

impl Pool2 {
    fn request_pages(&self, src: &Source, bases: BaseMap) -> RequestPages<'_> {
        let store = &**self.store();
        RequestPages {
            store,
            retained: LazyReader::new(store),
            bases,
            cache: &self.contents,
            sums: &*self.sums,
            lineage: src.lineage,
            at: src.at,
        }
    }

    /// Plans a read of `len` bytes (whole blocks) at `offset` of `t`.
    pub fn plan_read(&self, t: &Target, offset: u64, len: usize) -> Result<ReadPlan<'_>> {
        let (b0, n) = whole_blocks("read", offset, len)?;
        let pin = self.pin_read();
        let (src, bases) = {
            let cat = self.catalog_read();
            (cat.source(t)?, BaseMap(cat.bases.clone()))
        };
        if b0
            .checked_add(n)
            .is_none_or(|end| end > src.size / BLOCK_SIZE_U64)
        {
            return Err(Error::OutOfRange {
                offset,
                len: len as u64,
                size: src.size,
            });
        }
        let mut segs: Vec<DeviceSeg> = Vec::new();
        let mut checks = Vec::new();
        let mut zeros: Vec<Range<usize>> = Vec::new();
        let mut zero_from = 0usize;
        // A volume's own page is one get. What is read at a retained epoch (a snapshot, a
        // clone's inherited pages) comes from the content cache, or also scans dead
        // records: those scans go through one store reader (a kept RocksDB iterator,
        // refreshed), taken at its first scan after the target was resolved and shared by
        // the request's pages (read_page_split says why it may trail the gets).
        let pages = self.request_pages(&src, bases);
        for p in b0 / PAGE_BLOCKS..(b0 + n).div_ceil(PAGE_BLOCKS) {
            // The request's slots of this page: a volume's own page fills only those.
            let first = p * PAGE_BLOCKS;
            let want = (b0.max(first) - first) as usize
                ..((b0 + n).min(first + PAGE_BLOCKS) - first) as usize;
            let content = pages.content(PageNo(p), want)?;
            for (k, slot) in content.iter().enumerate() {
                let lba = p * PAGE_BLOCKS + k as u64;
                let Some(b) = slot else { continue };
                if lba < b0 || lba >= b0 + n {
                    continue;
                }
                let i = ((lba - b0) * BLOCK_SIZE_U64) as usize;
                if i > zero_from {
                    zeros.push(zero_from..i);
                }
                zero_from = i + BLOCK_SIZE;
                checks.push((i, lba, b.pba, b.crc));
                let dev = self.block_offset(b.pba);
                match segs.last_mut() {
                    Some(s) if s.buf_offset + s.len == i && s.dev_offset + s.len as u64 == dev => {
                        s.len += BLOCK_SIZE
                    }
                    _ => segs.push(DeviceSeg {
                        dev_offset: dev,
                        buf_offset: i,
                        len: BLOCK_SIZE,
                    }),
                }
            }
        }
        if zero_from < len {
            zeros.push(zero_from..len);
        }
        Ok(ReadPlan::from_parts(pin, segs, zeros, checks, t.clone()))
    }

    /// Plans a write of `data` (whole blocks) at `offset` of volume `vol`. A full pool
    /// asks the space relief (which may block) before answering `NoSpace`.
    pub fn plan_write(
        &self,
        vol: VolId,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<WritePlan<'_>> {
        self.plan_write_with(vol, offset, data, fua, true)
    }

    /// [`Pool2::plan_write`] that never waits for space relief: a full pool answers
    /// `NoSpace` at once. For callers that must not block (a ublk queue thread, whose
    /// own reads' pins would keep freed blocks from returning); they retry the write
    /// where it may wait.
    pub fn plan_write_now(
        &self,
        vol: VolId,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<WritePlan<'_>> {
        self.plan_write_with(vol, offset, data, fua, false)
    }

    fn plan_write_with(
        &self,
        vol: VolId,
        offset: u64,
        data: &[u8],
        fua: bool,
        relief: bool,
    ) -> Result<WritePlan<'_>> {
        let (b0, _) = whole_blocks("write", offset, data.len())?;
        let blocks: Vec<&[u8]> = data.chunks(BLOCK_SIZE).collect();
        let nonzero: Vec<bool> = blocks.iter().map(|b| !is_zero(b)).collect();
        let ndata = nonzero.iter().filter(|x| **x).count() as u64;
        let reserved = self.reserve(vol, ndata)?;
        let runs = match self.allocate(vol, ndata, relief) {
            Ok(r) => r,
            Err(e) => {
                self.unreserve(vol, reserved);
                return Err(e);
            }
        };
        let mut pbas = runs.iter().flat_map(|r| r.start..r.start + r.len);
        let assigned: Vec<Option<(u64, u32)>> = blocks
            .iter()
            .zip(&nonzero)
            .map(|(b, &nz)| {
                nz.then(|| pbas.next().map(|p| (p, crc32c::crc32c(b))))
                    .flatten()
            })
            .collect();
        let allocated: Vec<u64> = assigned.iter().flatten().map(|(p, _)| *p).collect();
        let mut segs: Vec<DeviceSeg> = Vec::new();
        for (i, a) in assigned.iter().enumerate() {
            let Some((p, _)) = a else { continue };
            let dev = self.block_offset(*p);
            match segs.last_mut() {
                Some(s)
                    if s.buf_offset + s.len == i * BLOCK_SIZE
                        && s.dev_offset + s.len as u64 == dev =>
                {
                    s.len += BLOCK_SIZE
                }
                _ => segs.push(DeviceSeg {
                    dev_offset: dev,
                    buf_offset: i * BLOCK_SIZE,
                    len: BLOCK_SIZE,
                }),
            }
        }
        Ok(WritePlan {
            pool: self,
            segs,
            vol,
            b0,
            assigned,
            allocated,
            reserved,
            fua,
        })
    }

    /// The committer's work for a planned write whose data I/O succeeded, and what it
    /// holds until answered.
    fn commit_parts(&self, mut plan: WritePlan<'_>) -> (Work, Settle) {
        debug_assert!(std::ptr::eq(self, plan.pool), "a plan of another pool");
        if !plan.segs.is_empty() {
            self.data_dirty.store(true, Ordering::SeqCst);
        }
        let counter = if plan.fua {
            0
        } else {
            self.sync_starts.load(Ordering::SeqCst)
        };
        let work = Work::Write {
            vol: plan.vol,
            edits: plan.edits(),
            fua: plan.fua,
            counter,
            // The committer releases it (committer.rs `Work::Write`).
            reserved: std::mem::take(&mut plan.reserved),
        };
        let settle = Settle {
            allocated: std::mem::take(&mut plan.allocated),
        };
        (work, settle)
    }

    /// Releases the blocks a write held once its Txn is answered (its quota reservation
    /// is the committer's to release): on success the blocks are referenced; if nothing
    /// was applied they return at once; after a failed commit they stay out of use until
    /// the next open decides (the batch may survive in the store's log).
    pub(crate) fn settle(&self, s: Settle, a: &Answer) {
        match a {
            Answer::Value(_) => {}
            Answer::Rejected(_) | Answer::Retry => {
                let mut alloc = lock(&self.alloc);
                for &b in &s.allocated {
                    alloc.free_now(b);
                }
            }
            Answer::Failed(_) => {
                if !s.allocated.is_empty() {
                    log::warn!(
                        "commit of a write failed: {} data blocks set aside until the pool is reopened",
                        s.allocated.len()
                    );
                }
            }
        }
    }

    /// Completes a planned write with the data I/O's outcome `io`.
    pub fn finish_write(&self, plan: WritePlan<'_>, io: io::Result<()>) -> Result<()> {
        if let Err(e) = io {
            // Dropping the plan frees its blocks.
            return Err(Error::device("write", e));
        }
        let (work, settle) = self.commit_parts(plan);
        let a = self.committer.submit(work);
        self.settle(settle, &a);
        write_result(a)
    }

    /// [`Pool2::finish_write`] that does not wait for the commit: `then` gets the outcome,
    /// on this thread if it is known at once, otherwise on the committer thread after the
    /// commit (it must not block). The caller keeps the pool alive until `then` has run
    /// (as a frontend does through its export), so the committer never drops the last
    /// reference to its own pool.
    pub fn finish_write_then(&self, plan: WritePlan<'_>, io: io::Result<()>, then: WriteThen) {
        if let Err(e) = io {
            drop(plan);
            return then(Err(Error::device("write", e)));
        }
        let (work, settle) = self.commit_parts(plan);
        let cb: super::committer::Then = Box::new(move |a| then(write_result(a)));
        if let Err((settle, cb)) = self.committer.submit_then(work, settle, cb) {
            let a = Answer::Rejected(Error::Shutdown);
            self.settle(settle, &a);
            cb(a);
        }
    }

    /// Allocation state of `[offset, offset+len)` of `t` (≤ 1 GiB described per call):
    /// (bytes, flags) runs with NBD's base:allocation flags.
    pub fn block_status(&self, t: &Target, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        use crate::pool::{STATUS_HOLE, STATUS_ZERO};
        let len = len.min(crate::pool::BLOCK_STATUS_MAX);
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid("block status", "range overflows"))?;
        let (b0, b1) = (offset / BLOCK_SIZE_U64, end.div_ceil(BLOCK_SIZE_U64));
        let _pin = self.pin_read();
        let (src, bases) = {
            let cat = self.catalog_read();
            (cat.source(t)?, BaseMap(cat.bases.clone()))
        };
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut push = |bytes: u64, flags: u32| match out.last_mut() {
            Some((l, f)) if *f == flags => *l += bytes,
            _ => out.push((bytes, flags)),
        };
        let mut pos = offset;
        // As plan_read: one store reader for what is read at a retained epoch.
        let pages = self.request_pages(&src, bases);
        for p in b0 / PAGE_BLOCKS..b1.div_ceil(PAGE_BLOCKS) {
            let content = pages.locations(PageNo(p))?;
            for (k, slot) in content.iter().enumerate() {
                let lba = p * PAGE_BLOCKS + k as u64;
                if slot.is_none() || lba < b0 || lba >= b1 {
                    continue;
                }
                let s = (lba * BLOCK_SIZE_U64).max(offset);
                let e = ((lba + 1) * BLOCK_SIZE_U64).min(end);
                if s > pos {
                    push(s - pos, STATUS_HOLE | STATUS_ZERO);
                }
                push(e - s, 0);
                pos = e;
            }
        }
        if pos < end {
            push(end - pos, STATUS_HOLE | STATUS_ZERO);
        }
        Ok(out)
    }
}
