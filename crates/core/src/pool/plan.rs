//! Whole-block I/O split into plan → data-device I/O → finish, so that the data I/O can be
//! done by whoever holds the plan: the pool itself (`read_blocks`, `write_blocks` in io.rs
//! run plan, device call, finish in a row) or, later, a frontend on its own io_uring (a ublk
//! queue task per tag, without a thread hop).
//!
//! Invariants:
//! * A [`ReadPlan`] holds a read pin (pins.rs) from before the mapping lookup until it is
//!   finished or dropped, so no block it names is reused meanwhile (design §6). Holding a
//!   plan never blocks anyone, so it may be held across asynchronous I/O.
//! * A [`WritePlan`] owns freshly allocated blocks that nothing references yet. Finishing it
//!   after the data writes succeeded commits the mapping (one batch); finishing it with an
//!   I/O error, failing to commit, or dropping it unfinished (a frontend that gave up)
//!   returns the blocks to the allocator at once.
//! * Offsets and lengths are whole blocks; device segments are block-aligned, so a
//!   block-aligned buffer can be used for O_DIRECT I/O.

use std::io;
use std::ops::Range;

use crate::device::{DataDevice, ReadSeg, WriteSeg, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::error::{Error, Result};
use crate::keys::{MapValue, VolId};

use super::io::target_layer;
use super::mapping::resolve;
use super::pins::ReadPin;
use super::{Pool, Target};

/// One contiguous data-device transfer: `len` bytes at `dev_offset` to or from
/// `buf[buf_offset..]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSeg {
    pub dev_offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

/// A planned read of whole blocks: fill `zeros` with zeros, read `segs` from the device,
/// then [`ReadPlan::finish`] verifies every block's checksum.
pub struct ReadPlan<'a> {
    _pin: ReadPin<'a>,
    pub segs: Vec<DeviceSeg>,
    /// Byte ranges of the buffer that read as zeros (holes and zero entries).
    pub zeros: Vec<Range<usize>>,
    /// (buffer offset, lba, pba, crc32c) of every block read from the device.
    checks: Vec<(usize, u64, u64, u32)>,
    target: Target,
}

impl<'a> ReadPlan<'a> {
    /// A plan from its parts (the format-2 pool builds its plans here too).
    pub(crate) fn from_parts(
        pin: ReadPin<'a>,
        segs: Vec<DeviceSeg>,
        zeros: Vec<Range<usize>>,
        checks: Vec<(usize, u64, u64, u32)>,
        target: Target,
    ) -> ReadPlan<'a> {
        ReadPlan {
            _pin: pin,
            segs,
            zeros,
            checks,
            target,
        }
    }

    /// The device reads of this plan as segments of `buf` (the whole request's buffer).
    pub fn device_reads<'b>(&self, buf: &'b mut [u8]) -> Vec<ReadSeg<'b>> {
        let mut segs = Vec::with_capacity(self.segs.len());
        let mut rest: &mut [u8] = buf;
        let mut consumed = 0usize;
        for s in &self.segs {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(s.buf_offset - consumed);
            let (seg, tail) = tail.split_at_mut(s.len);
            segs.push(ReadSeg {
                offset: s.dev_offset,
                buf: seg,
            });
            rest = tail;
            consumed = s.buf_offset + s.len;
        }
        segs
    }

    /// Checks the checksums of the blocks the device I/O brought into `buf`.
    pub fn finish(self, buf: &[u8]) -> Result<()> {
        self.verify(buf, true)
    }

    /// [`ReadPlan::finish`] for a plan read from `dev`: where `dev` reads through a cache
    /// that writes bypass (`data_cache = "reads"`), a checksum mismatch first drops the
    /// cached copy and reads the plan again from the media (bulk: around the cache) — the
    /// kernel keeps that cache coherent with direct writes only as a best effort — and
    /// fails only if the media's data is wrong too.
    pub fn finish_on(self, buf: &mut [u8], dev: &dyn DataDevice) -> Result<()> {
        // A bulk read already read the media (device::uring).
        if !dev.reads_cached() || crate::meta::is_bulk() {
            return self.finish(buf);
        }
        match self.verify(buf, false) {
            Err(Error::Checksum(m)) => {
                for s in &self.segs {
                    dev.forget_cached(s.dev_offset, s.len as u64);
                }
                crate::meta::bulk_reads(|| dev.read(&mut self.device_reads(buf)))
                    .map_err(|e| Error::device("read", e))?;
                let r = self.finish(buf);
                if r.is_ok() {
                    log::warn!("{m} in the host page cache's copy; the device has it right (read again, cached copy dropped)");
                }
                r
            }
            r => r,
        }
    }

    fn verify(&self, buf: &[u8], log_mismatch: bool) -> Result<()> {
        for &(i, lba, pba, crc) in &self.checks {
            let Some(block) = buf.get(i..i + BLOCK_SIZE) else {
                return Err(Error::invalid("read buffer", "shorter than the plan"));
            };
            let got = crc32c::crc32c(block);
            if got != crc {
                let t = &self.target;
                if log_mismatch {
                    log::error!(
                        "checksum mismatch: {t:?} lba {lba} pba {pba}: stored {crc:08x}, data {got:08x}"
                    );
                }
                return Err(Error::Checksum(format!(
                    "block {lba} of {t:?} (data block {pba}): stored crc32c {crc:08x}, data has {got:08x}"
                )));
            }
        }
        Ok(())
    }
}

/// A planned write of whole blocks: write `segs` (data from the caller's buffer) to the
/// device, then [`Pool::finish_write`] commits the mapping.
pub struct WritePlan<'a> {
    pool: &'a Pool,
    pub segs: Vec<DeviceSeg>,
    vol: VolId,
    b0: u64,
    /// Per block: its new data block and checksum, or None for an all-zero block (a hole).
    assigned: Vec<Option<(u64, u32)>>,
    allocated: Vec<u64>,
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
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let rem = words.remainder();
    words
        .into_iter()
        .all(|w| <[u8; 8]>::try_from(w).is_ok_and(|a| u64::from_ne_bytes(a) == 0))
        && rem.iter().all(|&x| x == 0)
}

pub(crate) fn whole_blocks(what: &'static str, offset: u64, len: usize) -> Result<(u64, u64)> {
    if !offset.is_multiple_of(BLOCK_SIZE_U64) || !len.is_multiple_of(BLOCK_SIZE) {
        return Err(Error::invalid(
            what,
            format!("offset {offset} and length {len} must be whole 4 KiB blocks"),
        ));
    }
    Ok((offset / BLOCK_SIZE_U64, (len / BLOCK_SIZE) as u64))
}

impl Pool {
    /// Plans a read of `len` bytes (whole blocks) at `offset` of `t`.
    pub fn plan_read(&self, t: &Target, offset: u64, len: usize) -> Result<ReadPlan<'_>> {
        let (b0, n) = whole_blocks("read", offset, len)?;
        let pin = self.pin_read();
        let map = {
            let tree = self.tree_read();
            let (layer, _) = target_layer(&tree, t)?;
            let chain = tree.chain(layer)?;
            resolve(&**self.store(), &chain, b0, b0 + n)?
        };
        let mut segs: Vec<DeviceSeg> = Vec::new();
        let mut checks = Vec::new();
        let mut zeros: Vec<Range<usize>> = Vec::new();
        let mut zero_from = 0usize;
        for (&lba, v) in &map {
            let MapValue::Data { pba, crc } = *v else {
                continue;
            };
            let i = ((lba - b0) * BLOCK_SIZE_U64) as usize;
            if i > zero_from {
                zeros.push(zero_from..i);
            }
            zero_from = i + BLOCK_SIZE;
            checks.push((i, lba, pba, crc));
            let dev = self.block_offset(pba);
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
        if zero_from < len {
            zeros.push(zero_from..len);
        }
        Ok(ReadPlan {
            _pin: pin,
            segs,
            zeros,
            checks,
            target: t.clone(),
        })
    }

    /// Plans a write of `data` (whole blocks) at `offset` of volume `vol`: allocates a data
    /// block for every block that is not all zeros and checksums it. The caller writes
    /// `segs` (from `data`) and then calls [`Pool::finish_write`].
    pub fn plan_write(
        &self,
        vol: VolId,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<WritePlan<'_>> {
        let (b0, _) = whole_blocks("write", offset, data.len())?;
        let blocks: Vec<&[u8]> = data.chunks(BLOCK_SIZE).collect();
        let nonzero: Vec<bool> = blocks.iter().map(|b| !is_zero(b)).collect();
        let ndata = nonzero.iter().filter(|x| **x).count() as u64;
        let runs = self.allocate(ndata)?;
        let mut pbas = runs.iter().flat_map(|r| r.start..r.start + r.len);
        let assigned: Vec<Option<(u64, u32)>> = blocks
            .iter()
            .zip(&nonzero)
            .map(|(b, &nz)| {
                if nz {
                    pbas.next().map(|p| (p, crc32c::crc32c(b)))
                } else {
                    None
                }
            })
            .collect();
        let allocated: Vec<u64> = assigned.iter().flatten().map(|(p, _)| *p).collect();
        // One segment per run of blocks that are consecutive in both the buffer and pba.
        let mut segs: Vec<DeviceSeg> = Vec::new();
        let mut i = 0;
        while i < assigned.len() {
            let Some((p0, _)) = assigned[i] else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < assigned.len()
                && matches!(assigned[j], Some((p, _)) if p == p0 + (j - i) as u64)
            {
                j += 1;
            }
            segs.push(DeviceSeg {
                dev_offset: self.block_offset(p0),
                buf_offset: i * BLOCK_SIZE,
                len: (j - i) * BLOCK_SIZE,
            });
            i = j;
        }
        Ok(WritePlan {
            pool: self,
            segs,
            vol,
            b0,
            assigned,
            allocated,
            fua,
        })
    }

    fn commit_plan(&self, plan: &WritePlan<'_>) -> Result<()> {
        crate::failpoint!("write.before_commit");
        self.commit_blocks(plan.vol, plan.b0, &plan.assigned, plan.fua)
    }

    /// Completes a planned write: with the data I/O's outcome `io`, commits the mapping, or
    /// returns the plan's blocks to the allocator when the I/O or the commit failed.
    pub fn finish_write(&self, mut plan: WritePlan<'_>, io: io::Result<()>) -> Result<()> {
        debug_assert!(std::ptr::eq(self, plan.pool), "a plan of another pool");
        // On every error return below, dropping `plan` frees its blocks.
        if let Err(e) = io {
            return Err(Error::device("write", e));
        }
        if !plan.segs.is_empty() {
            self.mark_data_dirty();
        }
        if let Err(e) = self.commit_plan(&plan) {
            if !matches!(e, Error::Store(_)) {
                // Refused before anything reached the store (the volume shrank or went
                // away meanwhile): dropping the plan frees its blocks.
                return Err(e);
            }
            // A store may fail a commit after making it durable (RocksDB: the WAL record
            // was written, then its fsync or memtable insert failed), so after a restart
            // the mapping may reference these blocks. They are not reused in this run; the
            // next open rebuilds the allocator from the mapping and returns them if the
            // commit did not survive.
            if !plan.allocated.is_empty() {
                log::warn!(
                    "commit of a write failed: {} data blocks set aside until the pool is reopened",
                    plan.allocated.len()
                );
            }
            plan.allocated.clear();
            return Err(e);
        }
        // Committed: the mapping references the blocks now.
        plan.allocated.clear();
        Ok(())
    }
}

impl Drop for WritePlan<'_> {
    fn drop(&mut self) {
        if !self.allocated.is_empty() {
            self.pool.free_now(&self.allocated);
        }
    }
}
