//! Space on format 2: what each volume holds (quotas) and what a write does when the pool
//! is full (space relief).
//!
//! * **Owned blocks** of each lineage are counted by the engine in the lineage's `k`
//!   record, in the same batch as the pieces that change them (so the count is exactly
//!   what `check` finds: live pages plus dead records, I1). The committer publishes the
//!   counts after each commit into [`Usage`].
//! * **A volume's usage** is the owned blocks of its lineage, of the lineages its
//!   snapshots are on, and of the bases up from those (histories it rolled back from, kept
//!   whole while it is based on them), stopping at a base another volume's snapshot names:
//!   its data plus what its snapshots keep, as ZFS's `used` counts a dataset and its
//!   snapshots. A clone's own writes count for the clone; what it shares with its origin
//!   counts for the origin. A deleted snapshot's blocks count until reclaim frees them.
//! * **Quota** (`volume set-quota`): a write that allocates n blocks is refused with
//!   ENOSPC (for that volume only) when usage + blocks reserved by its writes in flight + n
//!   exceeds the quota — also when it overwrites blocks it will free, since a snapshot may
//!   keep them. The reservation is taken before allocating and dropped when the write's
//!   plan ends, after its commit published the new count: concurrent writes cannot
//!   overshoot. Trims and zeroing whole blocks allocate nothing and are always allowed.
//! * **Relief**: a write that finds no free block (after a sync made pending frees
//!   reusable) calls the pool's [`SpaceRelief`] — the daemon's space guard, which deletes
//!   snapshots its policies allow — and tries again while relief reports progress, so a
//!   writer sees ENOSPC only when nothing deletable is left.
//!
//! Threading: `usage` is a mutex held for µs, never across I/O, taken after the catalog's
//! read lock when both are needed. The relief hook runs on the writer's thread holding no
//! pool lock but a sub-block write's edge stripes (which nothing the relief does takes);
//! never on the committer (writes never run there) and never for `plan_write_now` (the
//! ublk direct path: a queue thread must not block, its reads' pins would keep freed
//! blocks from returning; it retries the write on its helper thread).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use crate::device::BLOCK_SIZE_U64;
use crate::error::{Error, Result};
use crate::keys::VolId;
use crate::pool::VolumeInfo;
use crate::v2::LineageId;

use super::catalog::{self as cat, Catalog, VolRec};
use super::committer::Outcome;
use super::{lock, Pool2};

/// What frees space when the pool is full (the daemon's space guard). `relieve` may block
/// (it deletes snapshots and waits for reclaim); it returns whether space was (or is
/// being) freed, so the write should try again.
pub trait SpaceRelief: Send + Sync {
    fn relieve(&self, needed_blocks: u64) -> bool;
}

/// A write tries relief at most this often before it reports ENOSPC.
const MAX_RELIEFS: usize = 64;

#[derive(Default)]
pub(crate) struct Usage {
    /// Owned blocks per lineage, as last committed.
    pub owned: HashMap<LineageId, u64>,
    /// Per volume, the lineages its usage counts, as of catalog generation `.0`.
    pub lineages: HashMap<VolId, (u64, Vec<LineageId>)>,
    /// Blocks allocated by writes of each volume not yet committed.
    pub reserved: HashMap<VolId, u64>,
    pub relief: Option<Weak<dyn SpaceRelief>>,
}

/// The lineages whose owned blocks count for volume `v`: its own, those its snapshots
/// are on, and up each one's bases the histories it rolled back from — stopping at a base
/// another volume's snapshot names (a clone's origin: counted there). O(snapshots) per
/// base step; cached per catalog generation.
fn lineages_of(c: &Catalog, v: &VolRec) -> Vec<LineageId> {
    let mut set: HashSet<LineageId> = c.snapshots_of(v.id).map(|s| s.lineage).collect();
    set.insert(v.lineage);
    let mut todo: Vec<LineageId> = set.iter().copied().collect();
    while let Some(mut l) = todo.pop() {
        // Bounded: each base is an older lineage (ids only grow).
        while let Some(Some((lb, eb))) = c.bases.get(&l).copied() {
            if lb >= l
                || c.snapshots
                    .values()
                    .any(|s| s.lineage == lb && s.epoch == eb && s.vol != v.id)
                || !set.insert(lb)
            {
                break;
            }
            l = lb;
        }
    }
    set.into_iter().collect()
}

impl Usage {
    fn unreserve(&mut self, vol: VolId, n: u64) {
        if let Some(r) = self.reserved.get_mut(&vol) {
            *r = r.saturating_sub(n);
            if *r == 0 {
                self.reserved.remove(&vol);
            }
        }
    }

    pub fn volume_blocks(&mut self, c: &Catalog, v: &VolRec) -> u64 {
        let fresh = matches!(self.lineages.get(&v.id), Some((g, _)) if *g == c.gen);
        if !fresh {
            self.lineages.retain(|id, _| c.volumes.contains_key(id));
            self.lineages.insert(v.id, (c.gen, lineages_of(c, v)));
        }
        let ls = &self.lineages[&v.id].1;
        ls.iter()
            .map(|l| self.owned.get(l).copied().unwrap_or(0))
            .sum()
    }
}

impl Pool2 {
    /// Bytes volume `v` holds (its data and what its snapshots keep).
    pub(crate) fn used_bytes(&self, c: &Catalog, v: &VolRec) -> u64 {
        lock(&self.usage)
            .volume_blocks(c, v)
            .saturating_mul(BLOCK_SIZE_U64)
    }

    /// Publishes owned-block counts a commit wrote and, under the same lock, releases the
    /// reservations of the writes it committed: a concurrent [`Pool2::reserve`] sees their
    /// blocks either reserved or owned, never both (that double count refused writes
    /// below the quota).
    pub(crate) fn publish_owned(
        &self,
        owned: &[(LineageId, Option<u64>)],
        released: &[(VolId, u64)],
    ) {
        if owned.is_empty() && released.iter().all(|(_, n)| *n == 0) {
            return;
        }
        let mut u = lock(&self.usage);
        for (l, n) in owned {
            match n {
                Some(n) => u.owned.insert(*l, *n),
                None => u.owned.remove(l),
            };
        }
        for (vol, n) in released.iter().filter(|(_, n)| *n > 0) {
            u.unreserve(*vol, *n);
        }
    }

    /// Reserves `n` blocks for a write of `vol`, or refuses it if the volume's quota
    /// would be exceeded; returns the blocks reserved, to hand to [`Pool2::unreserve`].
    /// A volume without a quota reserves nothing: its writes never take the `usage` lock
    /// (writes already in flight when a quota is set are not counted against it).
    pub(crate) fn reserve(&self, vol: VolId, n: u64) -> Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        let c = self.catalog_read();
        let v = c.volume(vol)?;
        let Some(q) = v.quota else {
            return Ok(0);
        };
        let mut u = lock(&self.usage);
        let reserved = u.reserved.get(&vol).copied().unwrap_or(0);
        let used = u.volume_blocks(&c, v);
        let want = used.saturating_add(reserved).saturating_add(n);
        if want.saturating_mul(BLOCK_SIZE_U64) > q {
            return Err(Error::QuotaExceeded {
                volume: v.name.clone(),
                quota: q,
                used: used.saturating_mul(BLOCK_SIZE_U64),
            });
        }
        u.reserved.insert(vol, reserved + n);
        Ok(n)
    }

    pub(crate) fn unreserve(&self, vol: VolId, n: u64) {
        if n == 0 {
            return;
        }
        lock(&self.usage).unreserve(vol, n);
    }

    /// Sets (or with `None` removes) the quota of volume `name`: the bytes it and its
    /// snapshots may hold. A quota below the current usage is accepted (as ZFS does):
    /// writes that allocate are refused until snapshots are deleted or data trimmed.
    pub fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<VolumeInfo> {
        if let Some(q) = quota {
            if q < BLOCK_SIZE_U64 {
                return Err(Error::invalid(
                    "quota",
                    format!("{q} bytes is less than one block"),
                ));
            }
        }
        let _m = lock(&self.mgmt);
        let mut v = {
            let c = self.catalog_read();
            c.volume(c.volume_id(name)?)?.clone()
        };
        v.quota = quota;
        self.run(Box::new(move |ctx| {
            ctx.group.extra(crate::meta::BatchOp::Put(
                cat::volume_key(v.id),
                cat::encode(&v),
            ));
            Ok(Outcome::Done {
                apply: Box::new(move |c: &mut Catalog| {
                    c.volumes.insert(v.id, v);
                }),
                value: 0,
                undefer: Vec::new(),
                durable: true,
            })
        }))?;
        self.volume_info(name)
    }

    /// Installs what a full pool calls before failing a write with ENOSPC (held weakly:
    /// the hook usually holds the pool).
    pub fn set_space_relief(&self, relief: Weak<dyn SpaceRelief>) {
        lock(&self.usage).relief = Some(relief);
    }

    fn relief(&self) -> Option<Arc<dyn SpaceRelief>> {
        lock(&self.usage).relief.as_ref().and_then(Weak::upgrade)
    }

    /// Allocates `n` blocks for volume `vol`'s stream (alloc.rs: its new data stays
    /// contiguous): after a sync if frees are pending, then after relief while it frees
    /// something.
    pub(crate) fn allocate(
        &self,
        vol: VolId,
        n: u64,
        relief: bool,
    ) -> Result<Vec<crate::alloc::Run>> {
        let mut reliefs = 0;
        loop {
            for attempt in 0..2 {
                if let Some(runs) = lock(&self.alloc).alloc_for(vol, n) {
                    return Ok(runs);
                }
                if attempt == 0 {
                    // Frees may be pending a sync: make them reusable and try once more.
                    self.sync()?;
                }
            }
            if relief && reliefs < MAX_RELIEFS {
                if let Some(r) = self.relief() {
                    reliefs += 1;
                    if r.relieve(n) {
                        continue;
                    }
                }
            }
            let free = lock(&self.alloc).free();
            return Err(Error::NoSpace { needed: n, free });
        }
    }
}

impl Pool2 {
    /// (free bytes, capacity bytes) of the data device, as the allocator sees it now
    /// (frees waiting for a sync are not free yet).
    pub fn space(&self) -> (u64, u64) {
        (
            self.free_blocks().saturating_mul(BLOCK_SIZE_U64),
            self.data_blocks().saturating_mul(BLOCK_SIZE_U64),
        )
    }
}
