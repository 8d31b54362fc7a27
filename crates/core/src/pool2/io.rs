//! The format-2 data path: read, write, trim, zero (format2.md §3.1, §3.2).
//!
//! A write allocates, writes its data (RWF_DSYNC if FUA), then hands its mapping to the
//! committer and waits; the blocks are referenced once that group commits. A read pins the
//! sync generation, resolves its target in the catalog, reads each page's content from the
//! store without locks, then the data blocks, verifying each block's CRC32C.

use crate::device::{AlignedBuf, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::error::{Error, Result};
use crate::keys::VolId;
use crate::v2::read::read_page_raw;
use crate::v2::{PageNo, PAGE_BLOCKS};

use super::catalog::BaseMap;
use super::committer::{Answer, Work};
use super::plan::WriteThen;
use super::{lock, Pool2, Target, STRIPES};

/// Blocks unmapped per Txn by trim and zero (a long range becomes several groups).
const UNMAP_CHUNK: u64 = 1 << 18;

fn answer(a: Answer) -> Result<u64> {
    match a {
        Answer::Value(v) => Ok(v),
        Answer::Retry => Err(Error::Busy("retry".into())),
        Answer::Rejected(e) | Answer::Failed(e) => Err(e),
    }
}

impl Pool2 {
    /// Parses `vol` or `vol@snap` and finds it.
    pub fn resolve_target(&self, name: &str) -> Result<Target> {
        let (vol, snap) = crate::names::parse_target(name)?;
        let cat = self.catalog_read();
        let id = cat.volume_id(vol)?;
        let t = match snap {
            Some(s) => Target::Snapshot(id, s.to_string()),
            None => Target::Volume(id),
        };
        cat.source(&t)?;
        Ok(t)
    }

    pub fn target_size(&self, t: &Target) -> Result<u64> {
        Ok(self.catalog_read().source(t)?.size)
    }

    /// Where block `lba` of `t` is read from: the data device's byte offset, or `None` when
    /// it reads as zeros (diagnostics and tests).
    pub fn block_location(&self, t: &Target, lba: u64) -> Result<Option<u64>> {
        let (src, bases) = {
            let cat = self.catalog_read();
            (cat.source(t)?, BaseMap(cat.bases.clone()))
        };
        let p = lba / PAGE_BLOCKS;
        let content = read_page_raw(&**self.store(), &bases, src.lineage, src.at, PageNo(p))?;
        Ok(content[(lba % PAGE_BLOCKS) as usize].map(|b| self.block_offset(b.pba)))
    }

    /// Reads whole blocks `b0..b0+n` of `t`, checking every block's CRC.
    pub(crate) fn read_blocks(&self, t: &Target, b0: u64, n: u64) -> Result<AlignedBuf> {
        let len = (n * BLOCK_SIZE_U64) as usize;
        let plan = self.plan_read(t, b0 * BLOCK_SIZE_U64, len)?;
        let mut buf = AlignedBuf::zeroed(len);
        if !plan.segs.is_empty() {
            self.device()
                .read(&mut plan.device_reads(&mut buf))
                .map_err(|e| Error::device("read", e))?;
        }
        plan.finish_on(&mut buf, &**self.device())?;
        Ok(buf)
    }

    /// Reads `out.len()` bytes at byte `offset` of `t`.
    pub fn read(&self, t: &Target, offset: u64, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        if offset.is_multiple_of(BLOCK_SIZE_U64)
            && out.len().is_multiple_of(BLOCK_SIZE)
            && (out.as_ptr() as usize).is_multiple_of(BLOCK_SIZE)
        {
            // Whole blocks into a block-aligned buffer (NBD replies are laid out so): the
            // device reads straight into it, no bounce buffer and no copy.
            let plan = self.plan_read(t, offset, out.len())?;
            for z in &plan.zeros {
                out[z.clone()].fill(0);
            }
            if !plan.segs.is_empty() {
                self.device()
                    .read(&mut plan.device_reads(out))
                    .map_err(|e| Error::device("read", e))?;
            }
            return plan.finish_on(out, &**self.device());
        }
        let b0 = offset / BLOCK_SIZE_U64;
        let end = offset
            .checked_add(out.len() as u64)
            .ok_or_else(|| Error::invalid("read", "range overflows"))?;
        let b1 = end.div_ceil(BLOCK_SIZE_U64);
        let buf = self.read_blocks(t, b0, b1 - b0)?;
        let start = (offset - b0 * BLOCK_SIZE_U64) as usize;
        out.copy_from_slice(&buf[start..start + out.len()]);
        Ok(())
    }

    fn check_range(&self, vol: VolId, offset: u64, len: u64) -> Result<()> {
        let size = self.catalog_read().volume(vol)?.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    /// Locks the stripes of the partial edge blocks of `[offset, offset+len)`, in order.
    fn edge_stripes(&self, offset: u64, len: u64) -> Vec<std::sync::MutexGuard<'_, ()>> {
        let first = offset / BLOCK_SIZE_U64;
        let last = (offset + len - 1) / BLOCK_SIZE_U64;
        let mut idx = Vec::new();
        if !offset.is_multiple_of(BLOCK_SIZE_U64) {
            idx.push(first as usize % STRIPES);
        }
        if !(offset + len).is_multiple_of(BLOCK_SIZE_U64) {
            idx.push(last as usize % STRIPES);
        }
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| lock(&self.stripes[i])).collect()
    }

    /// Writes `data` at byte `offset` of volume `vol`; with `fua` it is durable on return.
    pub fn write(&self, vol: VolId, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_range(vol, offset, data.len() as u64)?;
        let _edges = self.edge_stripes(offset, data.len() as u64);
        let b0 = offset / BLOCK_SIZE_U64;
        let b1 = (offset + data.len() as u64).div_ceil(BLOCK_SIZE_U64);
        let head = (offset - b0 * BLOCK_SIZE_U64) as usize;
        let aligned = head == 0 && data.len().is_multiple_of(BLOCK_SIZE);
        if aligned && crate::device::is_aligned(data) {
            // Whole blocks in memory the device can take as it is (an AlignedVec's).
            return self.write_blocks(vol, b0, data, fua);
        }
        let buf = if aligned {
            AlignedBuf::copy_of(data)
        } else {
            // Read-modify-write of the edge blocks (their stripes are held).
            let t = Target::Volume(vol);
            let mut b = AlignedBuf::zeroed(((b1 - b0) * BLOCK_SIZE_U64) as usize);
            let first = self.read_blocks(&t, b0, 1)?;
            b[..BLOCK_SIZE].copy_from_slice(&first);
            if b1 - b0 > 1 {
                let last = self.read_blocks(&t, b1 - 1, 1)?;
                let at = b.len() - BLOCK_SIZE;
                b[at..].copy_from_slice(&last);
            }
            b[head..head + data.len()].copy_from_slice(data);
            b
        };
        self.write_blocks(vol, b0, &buf, fua)
    }

    /// [`Pool2::write`] that does not wait for the metadata commit: `then` gets the outcome,
    /// on this thread when it is known before the commit (an error, an empty write, a
    /// sub-block write, which waits as `write` does), otherwise on the committer thread
    /// once the write's group commits (it must not block). The data write itself is done
    /// before this returns, so `data` is not needed afterwards. Keep the pool alive until
    /// `then` has run ([`Pool2::finish_write_then`]).
    pub fn write_then(&self, vol: VolId, offset: u64, data: &[u8], fua: bool, then: WriteThen) {
        let whole = offset.is_multiple_of(BLOCK_SIZE_U64)
            && data.len().is_multiple_of(BLOCK_SIZE)
            && crate::device::is_aligned(data);
        if data.is_empty() || !whole {
            return then(self.write(vol, offset, data, fua));
        }
        if let Err(e) = self.check_range(vol, offset, data.len() as u64) {
            return then(Err(e));
        }
        let plan = match self.plan_write(vol, offset, data, fua) {
            Ok(p) => p,
            Err(e) => return then(Err(e)),
        };
        let io = if plan.segs.is_empty() {
            Ok(())
        } else {
            self.device().write(&plan.device_writes(data), fua)
        };
        self.finish_write_then(plan, io, then)
    }

    /// Allocates, writes and commits whole blocks.
    fn write_blocks(&self, vol: VolId, b0: u64, buf: &[u8], fua: bool) -> Result<()> {
        let plan = self.plan_write(vol, b0 * BLOCK_SIZE_U64, buf, fua)?;
        let io = if plan.segs.is_empty() {
            Ok(())
        } else {
            self.device().write(&plan.device_writes(buf), fua)
        };
        self.finish_write(plan, io)
    }

    /// Unmaps whole blocks `b0..b1` (in chunks, each one group).
    fn unmap(&self, vol: VolId, b0: u64, b1: u64, fua: bool) -> Result<()> {
        let mut at = b0;
        while at < b1 {
            let n = (b1 - at).min(UNMAP_CHUNK);
            answer(self.committer.submit(Work::Write {
                vol,
                edits: vec![(at, n, None)],
                fua: fua && at + n == b1,
                counter: 0,
                reserved: 0,
            }))?;
            at += n;
        }
        if b0 == b1 && fua {
            answer(self.committer.submit(Work::Flush))?;
        }
        Ok(())
    }

    /// Discards `[offset, offset+len)`: whole blocks read as zeros afterwards; partial
    /// blocks at the edges are left as they are (a discard is a hint).
    pub fn trim(&self, vol: VolId, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_range(vol, offset, len)?;
        let b0 = offset.div_ceil(BLOCK_SIZE_U64);
        let b1 = (offset + len) / BLOCK_SIZE_U64;
        self.unmap(vol, b0, b1.max(b0), fua)
    }

    /// Makes `[offset, offset+len)` read as zeros: whole blocks are unmapped, partial edge
    /// blocks rewritten.
    pub fn zero(&self, vol: VolId, offset: u64, len: u64, fua: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(vol, offset, len)?;
        let end = offset + len;
        let b0 = offset.div_ceil(BLOCK_SIZE_U64);
        let b1 = end / BLOCK_SIZE_U64;
        if b0 >= b1 {
            return self.write(vol, offset, &vec![0u8; len as usize], fua);
        }
        if offset < b0 * BLOCK_SIZE_U64 {
            let n = (b0 * BLOCK_SIZE_U64 - offset) as usize;
            self.write(vol, offset, &vec![0u8; n], fua)?;
        }
        if end > b1 * BLOCK_SIZE_U64 {
            let n = (end - b1 * BLOCK_SIZE_U64) as usize;
            self.write(vol, b1 * BLOCK_SIZE_U64, &vec![0u8; n], fua)?;
        }
        self.unmap(vol, b0, b1, fua)
    }
}
