//! The data path: read, write, zero/trim, block status (docs/design.md §2, §5, §6).
//!
//! Requests arrive here already validated by `volume::VolumeHandle` (range, size limits,
//! read-only). This file re-checks only what can change concurrently (the volume's size)
//! under the tree lock at commit time.

use std::collections::{BTreeMap, BTreeSet};

use crate::alloc::Run;
use crate::device::{AlignedBuf, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::error::{Error, Result};
use crate::keys::{self, LayerId, MapValue, VolId};
use crate::meta::WriteBatch;

use super::mapping::{resolve, scan_layer, visible_data};
use super::{lock, Pool, Target, Tree, STRIPES};

/// Whole blocks zeroed per metadata batch by `zero`.
const ZERO_CHUNK_BLOCKS: u64 = 16 * 1024;
/// Largest range one `block_status` call describes.
pub const BLOCK_STATUS_MAX: u64 = 1 << 30;

/// Block status flags, as NBD's base:allocation context defines them.
pub const STATUS_HOLE: u32 = 1;
pub const STATUS_ZERO: u32 = 2;

pub(crate) fn target_layer(tree: &Tree, t: &Target) -> Result<(LayerId, u64)> {
    match t {
        Target::Volume(id) => {
            let v = tree.volume(*id)?;
            Ok((v.head, v.size))
        }
        Target::Snapshot(id, s) => {
            let s = tree.snapshot(*id, s)?;
            Ok((s.layer, s.size))
        }
    }
}

/// The mapping changes of one commit to a volume's head, with the blocks they free and the
/// head's count deltas. `commit_blocks` and `zero_blocks` build one each.
struct HeadEdit {
    head: LayerId,
    batch: WriteBatch,
    frees: Vec<u64>,
    d_entries: i64,
    d_data: i64,
}

impl HeadEdit {
    fn new(head: LayerId) -> Self {
        HeadEdit {
            head,
            batch: WriteBatch::new(),
            frees: Vec::new(),
            d_entries: 0,
            d_data: 0,
        }
    }

    /// The old entry's data block (if it owned one) is freed.
    fn release(&mut self, old: Option<MapValue>) {
        if let Some(MapValue::Data { pba, .. }) = old {
            self.frees.push(pba);
            self.d_data -= 1;
        }
    }

    fn set_data(&mut self, lba: u64, old: Option<MapValue>, pba: u64, crc: u32) {
        self.release(old);
        let key = keys::map_key(self.head, lba).to_vec();
        self.batch
            .put(key, MapValue::Data { pba, crc }.encode().to_vec());
        self.d_entries += i64::from(old.is_none());
        self.d_data += 1;
    }

    /// Makes `lba` read as zeros: a ZERO entry if data below the head shows through,
    /// otherwise no entry at all.
    fn set_zero(&mut self, lba: u64, old: Option<MapValue>, data_below: bool) {
        self.release(old);
        let key = keys::map_key(self.head, lba).to_vec();
        if data_below {
            if old != Some(MapValue::Zero) {
                self.batch.put(key, MapValue::Zero.encode().to_vec());
                self.d_entries += i64::from(old.is_none());
            }
        } else if old.is_some() {
            self.batch.delete(key);
            self.d_entries -= 1;
        }
    }

    /// Commits the batch, then applies counts and frees. Called with the tree write lock held.
    fn apply(self, pool: &Pool, tree: &mut Tree, fua: bool) -> Result<()> {
        crate::failpoint!("head_edit.before_commit");
        if !self.batch.is_empty() {
            pool.store().commit(self.batch, fua)?;
        } else if fua {
            // Nothing to change: the blocks already read as asked, but possibly only through
            // an earlier commit that is not durable yet (a TRIM before a FUA write-zeroes).
            // FUA promises the state is durable, so make the log durable.
            pool.store().sync()?;
        }
        crate::failpoint!("head_edit.after_commit");
        tree.adjust_counts(self.head, self.d_entries, self.d_data);
        pool.defer_frees(&self.frees);
        pool.mark_dirty();
        Ok(())
    }
}

impl Pool {
    /// Parses `vol` or `vol@snap` and finds it.
    pub fn resolve_target(&self, name: &str) -> Result<Target> {
        let (vol, snap) = crate::names::parse_target(name)?;
        let tree = self.tree_read();
        let id = tree.volume_id(vol)?;
        let t = match snap {
            Some(s) => Target::Snapshot(id, s.to_string()),
            None => Target::Volume(id),
        };
        target_layer(&tree, &t)?;
        Ok(t)
    }

    pub fn target_size(&self, t: &Target) -> Result<u64> {
        Ok(target_layer(&self.tree_read(), t)?.1)
    }

    /// Where block `lba` of `t` is read from: the data device's byte offset, or `None` when
    /// it reads as zeros (diagnostics and tests).
    pub fn block_location(&self, t: &Target, lba: u64) -> Result<Option<u64>> {
        let tree = self.tree_read();
        let (layer, _) = target_layer(&tree, t)?;
        let chain = tree.chain(layer)?;
        let map = resolve(&**self.store(), &chain, lba, lba.saturating_add(1))?;
        Ok(match map.get(&lba) {
            Some(MapValue::Data { pba, .. }) => Some(self.block_offset(*pba)),
            _ => None,
        })
    }

    /// Reads `n` whole blocks starting at `b0` of `t` into an aligned buffer, verifying
    /// each block's checksum.
    pub(crate) fn read_blocks(&self, t: &Target, b0: u64, n: u64) -> Result<AlignedBuf> {
        let len = (n * BLOCK_SIZE_U64) as usize;
        let plan = self.plan_read(t, b0 * BLOCK_SIZE_U64, len)?;
        let mut buf = AlignedBuf::zeroed(len);
        if !plan.segs.is_empty() {
            self.device()
                .read(&mut plan.device_reads(&mut buf))
                .map_err(|e| Error::device("read", e))?;
        }
        plan.finish(&buf)?;
        Ok(buf)
    }

    /// Reads `out.len()` bytes at byte `offset` of `t`.
    pub fn read(&self, t: &Target, offset: u64, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let b0 = offset / BLOCK_SIZE_U64;
        let b1 = (offset + out.len() as u64).div_ceil(BLOCK_SIZE_U64);
        let buf = self.read_blocks(t, b0, b1 - b0)?;
        let start = (offset - b0 * BLOCK_SIZE_U64) as usize;
        out.copy_from_slice(&buf[start..start + out.len()]);
        Ok(())
    }

    /// Refuses a request that does not fit the volume before any part of it is applied
    /// (the commit re-checks, since the size can change meanwhile).
    fn check_range(&self, vol: VolId, offset: u64, len: u64) -> Result<()> {
        let size = self.tree_read().volume(vol)?.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    fn stripe(vol: VolId, lba: u64) -> usize {
        ((vol.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)) >> 32)
            as usize
            % STRIPES
    }

    /// Writes `data` at byte `offset` of volume `vol`.
    pub fn write(&self, vol: VolId, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_range(vol, offset, data.len() as u64)?;
        let end = offset + data.len() as u64;
        let b0 = offset / BLOCK_SIZE_U64;
        let b1 = end.div_ceil(BLOCK_SIZE_U64);
        let n = b1 - b0;
        let head_partial = !offset.is_multiple_of(BLOCK_SIZE_U64);
        let tail_partial = !end.is_multiple_of(BLOCK_SIZE_U64);
        let mut stripes = Vec::new();
        if head_partial {
            stripes.push(Self::stripe(vol, b0));
        }
        if tail_partial {
            stripes.push(Self::stripe(vol, b1 - 1));
        }
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: Vec<_> = stripes.iter().map(|&i| lock(&self.stripes[i])).collect();
        let mut buf = AlignedBuf::zeroed((n * BLOCK_SIZE_U64) as usize);
        let t = Target::Volume(vol);
        if head_partial {
            let old = self.read_blocks(&t, b0, 1)?;
            buf[..BLOCK_SIZE].copy_from_slice(&old);
        }
        if tail_partial && !(head_partial && n == 1) {
            let old = self.read_blocks(&t, b1 - 1, 1)?;
            buf[((n - 1) * BLOCK_SIZE_U64) as usize..].copy_from_slice(&old);
        }
        let start = (offset - b0 * BLOCK_SIZE_U64) as usize;
        buf[start..start + data.len()].copy_from_slice(data);
        self.write_blocks(vol, b0, &buf, fua)
    }

    /// Allocates `n` blocks; when the pool looks full, syncs once so that pending frees
    /// return, then tries again.
    pub(crate) fn allocate(&self, n: u64) -> Result<Vec<Run>> {
        if let Some(r) = self.alloc_lock().alloc(n) {
            return Ok(r);
        }
        self.sync()?;
        let mut a = self.alloc_lock();
        let free = a.free();
        a.alloc(n).ok_or(Error::NoSpace { needed: n, free })
    }

    pub(crate) fn free_now(&self, pbas: &[u64]) {
        let mut a = self.alloc_lock();
        for &p in pbas {
            a.free_now(p);
        }
    }

    /// Writes whole blocks (buf is a multiple of the block size) starting at block `b0`.
    fn write_blocks(&self, vol: VolId, b0: u64, buf: &AlignedBuf, fua: bool) -> Result<()> {
        let plan = self.plan_write(vol, b0 * BLOCK_SIZE_U64, buf, fua)?;
        let io = self.device().write(&plan.device_writes(buf), fua);
        self.finish_write(plan, io)
    }

    /// Points blocks `b0..` of `vol`'s head at their new data (Some) or at zeros (None).
    pub(crate) fn commit_blocks(
        &self,
        vol: VolId,
        b0: u64,
        assigned: &[Option<(u64, u32)>],
        fua: bool,
    ) -> Result<()> {
        let n = assigned.len() as u64;
        let store = &**self.store();
        let mut tree = self.tree_write();
        let v = tree.volume(vol)?;
        if b0 + n > v.size / BLOCK_SIZE_U64 {
            return Err(Error::OutOfRange {
                offset: b0 * BLOCK_SIZE_U64,
                len: n * BLOCK_SIZE_U64,
                size: v.size,
            });
        }
        let head = v.head;
        let mut existing = BTreeMap::new();
        scan_layer(store, head, b0, b0 + n, |l, mv| {
            existing.insert(l, mv);
        })?;
        let below = if assigned.iter().any(Option::is_none) {
            let chain = tree.chain(head)?;
            visible_data(store, &chain[1..], b0, b0 + n)?
        } else {
            BTreeSet::new()
        };
        let mut edit = HeadEdit::new(head);
        for (i, a) in assigned.iter().enumerate() {
            let lba = b0 + i as u64;
            let old = existing.get(&lba).copied();
            match *a {
                Some((pba, crc)) => edit.set_data(lba, old, pba, crc),
                None => edit.set_zero(lba, old, below.contains(&lba)),
            }
        }
        edit.apply(self, &mut tree, fua)
    }

    /// Queues `pbas` (unreferenced by the batch just committed) for release after the next
    /// sync. Called with the tree write lock held, right after the commit.
    pub(crate) fn defer_frees(&self, pbas: &[u64]) {
        if pbas.is_empty() {
            return;
        }
        let g = self.current_generation();
        let mut a = self.alloc_lock();
        for &p in pbas {
            a.free_deferred(g, p);
        }
    }

    /// Whole blocks `[w0, w1)` become holes, one metadata batch per chunk.
    fn zero_whole_blocks(&self, vol: VolId, w0: u64, w1: u64, fua: bool) -> Result<()> {
        let mut c0 = w0;
        while c0 < w1 {
            let c1 = (c0 + ZERO_CHUNK_BLOCKS).min(w1);
            self.zero_blocks(vol, c0, c1, fua, true)?;
            c0 = c1;
        }
        Ok(())
    }

    /// TRIM: whole blocks inside `[offset, offset + len)` become holes (read as zeros, space
    /// returned); partial blocks at the edges are left alone, as NBD and the block layer allow.
    pub fn trim(&self, vol: VolId, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_range(vol, offset, len)?;
        let w0 = offset.div_ceil(BLOCK_SIZE_U64);
        let w1 = (offset + len) / BLOCK_SIZE_U64;
        self.zero_whole_blocks(vol, w0, w1, fua)
    }

    /// Makes `[offset, offset + len)` of `vol` read as zeros without storing data
    /// (WRITE_ZEROES). Whole blocks become holes; partial blocks at the edges are written.
    pub fn zero(&self, vol: VolId, offset: u64, len: u64, fua: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(vol, offset, len)?;
        let end = offset + len;
        let w0 = offset.div_ceil(BLOCK_SIZE_U64);
        let w1 = end / BLOCK_SIZE_U64;
        if w0 >= w1 {
            return self.write(vol, offset, &vec![0u8; len as usize], fua);
        }
        if offset < w0 * BLOCK_SIZE_U64 {
            self.write(
                vol,
                offset,
                &vec![0u8; (w0 * BLOCK_SIZE_U64 - offset) as usize],
                fua,
            )?;
        }
        if end > w1 * BLOCK_SIZE_U64 {
            self.write(
                vol,
                w1 * BLOCK_SIZE_U64,
                &vec![0u8; (end - w1 * BLOCK_SIZE_U64) as usize],
                fua,
            )?;
        }
        self.zero_whole_blocks(vol, w0, w1, fua)
    }

    /// Turns whole blocks `[c0, c1)` of `vol`'s head into holes, in one batch.
    pub(crate) fn zero_blocks(
        &self,
        vol: VolId,
        c0: u64,
        c1: u64,
        fua: bool,
        check_size: bool,
    ) -> Result<()> {
        let store = &**self.store();
        let mut tree = self.tree_write();
        let v = tree.volume(vol)?;
        if check_size && c1 > v.size / BLOCK_SIZE_U64 {
            return Err(Error::OutOfRange {
                offset: c0 * BLOCK_SIZE_U64,
                len: (c1 - c0) * BLOCK_SIZE_U64,
                size: v.size,
            });
        }
        let head = v.head;
        let mut existing = BTreeMap::new();
        scan_layer(store, head, c0, c1, |l, mv| {
            existing.insert(l, mv);
        })?;
        let chain = tree.chain(head)?;
        let below = visible_data(store, &chain[1..], c0, c1)?;
        let lbas: BTreeSet<u64> = existing
            .keys()
            .copied()
            .chain(below.iter().copied())
            .collect();
        let mut edit = HeadEdit::new(head);
        for lba in lbas {
            edit.set_zero(lba, existing.get(&lba).copied(), below.contains(&lba));
        }
        edit.apply(self, &mut tree, fua)
    }

    /// Allocation status of `[offset, offset + len)` of `t` (len capped at
    /// [`BLOCK_STATUS_MAX`]): runs of (bytes, flags) covering the range from `offset`.
    pub fn block_status(&self, t: &Target, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let len = len.min(BLOCK_STATUS_MAX);
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let b0 = offset / BLOCK_SIZE_U64;
        let b1 = end.div_ceil(BLOCK_SIZE_U64);
        let map = {
            let tree = self.tree_read();
            let (layer, _) = target_layer(&tree, t)?;
            let chain = tree.chain(layer)?;
            resolve(&**self.store(), &chain, b0, b1)?
        };
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut push = |bytes: u64, flags: u32| match out.last_mut() {
            Some((l, f)) if *f == flags => *l += bytes,
            _ => out.push((bytes, flags)),
        };
        let mut pos = offset;
        for (&lba, v) in map.range(b0..b1) {
            if !matches!(v, MapValue::Data { .. }) {
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
        if pos < end {
            push(end - pos, STATUS_HOLE | STATUS_ZERO);
        }
        Ok(out)
    }
}
