//! Management operations on format 2 (format2.md §3.3): each validates against the catalog
//! under the `mgmt` mutex, then runs as one committer step — engine change, catalog records
//! and the reclaim job it queues in one durable batch — and is published to readers after
//! that batch is in the store.

use std::collections::HashMap;

use crate::device::BLOCK_SIZE_U64;
use crate::error::{Error, Result};
use crate::keys::{self, Incomplete, VolId};
use crate::meta::BatchOp;
use crate::names::validate_name;
use crate::pool::ops::validate_size;
use crate::pool::{SnapshotInfo, VolumeInfo};
use crate::v2::{Edit, Epoch, LineageId};

use super::catalog::{self as cat, Catalog, SnapRec, VolRec};
use super::committer::{Answer, MgmtCtx, MgmtFn, Outcome, Work};
use super::{lock, Pool2, Target};

/// Snapshot create retries a device sync at most this often before giving up.
const SNAPSHOT_ATTEMPTS: usize = 4;

fn put(ctx: &mut MgmtCtx<'_>, key: Vec<u8>, value: Vec<u8>) {
    ctx.group.extra(BatchOp::Put(key, value));
}
fn del(ctx: &mut MgmtCtx<'_>, key: Vec<u8>) {
    ctx.group.extra(BatchOp::Delete(key));
}
fn done(apply: impl FnOnce(&mut Catalog) + Send + 'static) -> Result<Outcome> {
    Ok(Outcome::Done {
        apply: Box::new(apply),
        value: 0,
        undefer: Vec::new(),
        durable: true,
    })
}

impl Pool2 {
    pub(super) fn run(&self, f: MgmtFn) -> Result<u64> {
        match self.committer.submit(Work::Mgmt(f)) {
            Answer::Value(v) => Ok(v),
            Answer::Retry => Err(Error::Busy("retry".into())),
            Answer::Rejected(e) | Answer::Failed(e) => Err(e),
        }
    }

    /// Registers an open export of `t`: deletes and rollbacks of it are refused meanwhile.
    pub fn register_open(&self, t: &Target) -> Result<()> {
        self.catalog_read().source(t)?;
        *lock(&self.open_targets).entry(t.clone()).or_insert(0) += 1;
        Ok(())
    }
    pub fn unregister_open(&self, t: &Target) {
        let mut m = lock(&self.open_targets);
        if let Some(n) = m.get_mut(t) {
            *n -= 1;
            if *n == 0 {
                m.remove(t);
            }
        }
    }
    fn open_count(&self, pred: impl Fn(&Target) -> bool) -> usize {
        lock(&self.open_targets)
            .iter()
            .filter(|(t, _)| pred(t))
            .map(|(_, n)| *n)
            .sum()
    }

    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.create_volume_marked(name, size, None)
    }

    /// Creates a volume, marked incomplete (being restored) in the same batch if asked.
    pub fn create_volume_marked(
        &self,
        name: &str,
        size: u64,
        incomplete: Option<&Incomplete>,
    ) -> Result<VolumeInfo> {
        let incomplete = incomplete.cloned();
        validate_name("volume name", name)?;
        validate_size(size)?;
        let _m = lock(&self.mgmt);
        let name = name.to_string();
        let n2 = name.clone();
        self.run(Box::new(move |ctx| {
            if ctx.catalog.names.contains_key(&name) {
                return Err(Error::exists("volume", name));
            }
            let mut ids = ctx.catalog.ids;
            let id = ids.volume.max(1);
            ids.volume = id + 1;
            let l = {
                let (m, g) = ctx.parts();
                m.create_lineage(g, None)?
            };
            let v = VolRec {
                id,
                name: name.clone(),
                size,
                lineage: l,
                created: keys::now_secs(),
                incomplete,
                quota: None,
            };
            put(ctx, cat::volume_key(id), cat::encode(&v));
            put(ctx, cat::name_key(&name), id.to_be_bytes().to_vec());
            put(ctx, cat::ids_key(), cat::encode(&ids));
            done(move |c| {
                c.add_lineage(l, None);
                c.names.insert(name, id);
                c.volumes.insert(id, v);
                c.ids = ids;
            })
        }))?;
        self.volume_info(&n2)
    }

    /// Whether the pool answers: a no-op step through the committer (so a hung committer
    /// or a stopped engine shows). Takes no management lock and writes nothing.
    pub fn health(&self) -> Result<()> {
        self.run(Box::new(|_| {
            Ok(Outcome::Done {
                apply: Box::new(|_| {}),
                value: 0,
                undefer: Vec::new(),
                durable: false,
            })
        }))
        .map(|_| ())
    }

    /// Compacts the metadata store ([`MetaStore::compact`]: only live entries kept) and
    /// answers [`Pool2::info`] after it. Runs beside I/O and management commands.
    pub fn compact_metadata(&self) -> Result<crate::pool::PoolInfo> {
        self.store().compact()?;
        Ok(self.info())
    }

    /// Space and object counts; `hidden_layers` counts lineages that back no volume and
    /// hold no snapshot (clones' origins, reclaim in progress).
    pub fn info(&self) -> crate::pool::PoolInfo {
        let c = self.catalog_read();
        let (free, pending) = {
            let a = lock(&self.alloc);
            (a.free(), a.pending())
        };
        let referenced: std::collections::HashSet<LineageId> = c
            .volumes
            .values()
            .map(|v| v.lineage)
            .chain(c.snapshots.values().map(|s| s.lineage))
            .collect();
        let blocks = self.data_blocks();
        let mut reclaim_jobs = 0u64;
        let (a, b) = crate::v2::keys::jobs();
        let _ = self.store().scan(&a, &b, &mut |_, _| {
            reclaim_jobs += 1;
            std::ops::ControlFlow::Continue(())
        });
        crate::pool::PoolInfo {
            reclaim_jobs,
            uuid: self.uuid().to_string(),
            format_version: super::FORMAT2,
            block_size: BLOCK_SIZE_U64,
            capacity: blocks * BLOCK_SIZE_U64,
            used: (blocks - free) * BLOCK_SIZE_U64,
            free: free * BLOCK_SIZE_U64,
            pending_free: pending * BLOCK_SIZE_U64,
            metadata_size: self.store().size_on_disk(),
            volumes: c.volumes.len(),
            snapshots: c.snapshots.len(),
            hidden_layers: c.bases.keys().filter(|l| !referenced.contains(l)).count(),
        }
    }

    pub fn volume_id(&self, name: &str) -> Result<VolId> {
        self.catalog_read().volume_id(name)
    }

    /// The snapshot a clone was made from, as ZFS shows a clone's `origin`: the nearest
    /// base snapshot of another volume. Rolling back to one's own snapshot does not change
    /// it (a rolled-back volume that never was a clone has none).
    fn origin(c: &Catalog, vol: VolId, mut l: LineageId) -> Option<String> {
        // Bounded: each base is an older lineage (ids only grow).
        loop {
            let (lb, eb) = (*c.bases.get(&l)?)?;
            if lb >= l {
                return None;
            }
            // A base no snapshot names any more (deleted, kept for the clone): go on up.
            match c
                .snapshots
                .values()
                .find(|s| s.lineage == lb && s.epoch == eb)
            {
                Some(s) if s.vol != vol => {
                    let v = c.volumes.get(&s.vol).map_or("?", |v| v.name.as_str());
                    return Some(format!("{v}@{}", s.name));
                }
                _ => l = lb,
            }
        }
    }

    /// Bytes the volume wrote since its last snapshot (its lineage's counter record).
    fn written_now(&self, l: LineageId) -> u64 {
        // The record's first 8 bytes (born in the current epoch), then owned blocks.
        match self.store().get(&crate::v2::keys::counter(l)) {
            Ok(Some(v)) => v
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, |b| u64::from_le_bytes(b).saturating_mul(BLOCK_SIZE_U64)),
            _ => 0,
        }
    }

    fn info_of(&self, c: &Catalog, v: &VolRec) -> VolumeInfo {
        VolumeInfo {
            name: v.name.clone(),
            id: v.id,
            size: v.size,
            written: self.written_now(v.lineage),
            snapshots: c.snapshots_of(v.id).count(),
            snapshot_bytes: c.snapshots_of(v.id).map(|s| s.written).sum(),
            used: self.used_bytes(c, v),
            quota: v.quota,
            origin: Self::origin(c, v.id, v.lineage),
            created: v.created,
            open: self.open_count(|t| *t == Target::Volume(v.id)),
            incomplete: v.incomplete.clone(),
        }
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let c = self.catalog_read();
        c.volumes.values().map(|v| self.info_of(&c, v)).collect()
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let c = self.catalog_read();
        let v = c.volume(c.volume_id(name)?)?;
        Ok(self.info_of(&c, v))
    }

    /// Grows a volume, or shrinks it with `force`: the cut-off blocks are unmapped in the
    /// same batch as the new size, so growing later shows zeros there.
    pub fn resize_volume(&self, name: &str, size: u64, force: bool) -> Result<VolumeInfo> {
        validate_size(size)?;
        let _m = lock(&self.mgmt);
        let (vid, old) = {
            let c = self.catalog_read();
            let v = c.volume(c.volume_id(name)?)?;
            (v.id, v.size)
        };
        if size < old && !force {
            return Err(Error::invalid(
                "size",
                format!("shrinking '{name}' from {old} to {size} bytes discards data; add --force"),
            ));
        }
        self.run(Box::new(move |ctx| {
            let mut v = ctx.catalog.volume(vid)?.clone();
            if size < v.size {
                let (b0, b1) = (size / BLOCK_SIZE_U64, v.size / BLOCK_SIZE_U64);
                let e = Edit {
                    lineage: v.lineage,
                    lba: b0,
                    len: b1 - b0,
                    map: None,
                };
                {
                    let (m, g) = ctx.parts();
                    m.apply(g, &e)?
                };
            }
            v.size = size;
            put(ctx, cat::volume_key(vid), cat::encode(&v));
            done(move |c| {
                c.volumes.insert(vid, v);
            })
        }))?;
        self.volume_info(name)
    }

    /// Sets (`Some`) or clears (`None`) the volume's incomplete mark; durable on return.
    pub fn set_volume_incomplete(
        &self,
        name: &str,
        incomplete: Option<&Incomplete>,
    ) -> Result<VolumeInfo> {
        let _m = lock(&self.mgmt);
        let vid = self.volume_id(name)?;
        let inc = incomplete.cloned();
        self.run(Box::new(move |ctx| {
            let mut v = ctx.catalog.volume(vid)?.clone();
            v.incomplete = inc;
            put(ctx, cat::volume_key(vid), cat::encode(&v));
            done(move |c| {
                c.volumes.insert(vid, v);
            })
        }))?;
        self.volume_info(name)
    }

    pub fn rename_volume(&self, old: &str, new: &str) -> Result<VolumeInfo> {
        validate_name("volume name", new)?;
        let _m = lock(&self.mgmt);
        let vid = self.volume_id(old)?;
        let (old_s, new_s) = (old.to_string(), new.to_string());
        self.run(Box::new(move |ctx| {
            if ctx.catalog.names.contains_key(&new_s) {
                return Err(Error::exists("volume", new_s));
            }
            let mut v = ctx.catalog.volume(vid)?.clone();
            v.name = new_s.clone();
            put(ctx, cat::volume_key(vid), cat::encode(&v));
            del(ctx, cat::name_key(&old_s));
            put(ctx, cat::name_key(&new_s), vid.to_be_bytes().to_vec());
            done(move |c| {
                c.names.remove(&old_s);
                c.names.insert(new_s, vid);
                c.volumes.insert(vid, v);
            })
        }))?;
        self.volume_info(new)
    }

    /// Deletes a volume; with `recursive` also its snapshots (clones made from them keep
    /// their data). Its space is reclaimed in the background.
    pub fn delete_volume(&self, name: &str, recursive: bool) -> Result<()> {
        let _m = lock(&self.mgmt);
        let vid = self.volume_id(name)?;
        let (nsnaps, held) = {
            let c = self.catalog_read();
            let held: Vec<String> = c
                .snapshots_of(vid)
                .filter(|s| s.protected)
                .map(|s| s.name.clone())
                .collect();
            (c.snapshots_of(vid).count(), held)
        };
        if !held.is_empty() {
            return Err(Error::Busy(format!(
                "volume '{name}' has protected snapshot(s) {}; unprotect them first",
                held.join(", ")
            )));
        }
        if nsnaps > 0 && !recursive {
            return Err(Error::Busy(format!(
                "volume '{name}' has {nsnaps} snapshot(s); delete them first or use --recursive"
            )));
        }
        let open = self.open_count(|t| match t {
            Target::Volume(v) | Target::Snapshot(v, _) => *v == vid,
        });
        if open > 0 {
            return Err(Error::Busy(format!(
                "volume '{name}' is in use by {open} export(s); disconnect them first"
            )));
        }
        let name = name.to_string();
        self.run(Box::new(move |ctx| {
            let v = ctx.catalog.volume(vid)?.clone();
            let snaps: Vec<SnapRec> = ctx.catalog.snapshots_of(vid).cloned().collect();
            // Snapshots left in older lineages by rollbacks are released there, one by
            // one; the volume's own lineage drops its snapshots as it closes.
            for s in snaps.iter().filter(|s| s.lineage != v.lineage) {
                {
                    let (m, g) = ctx.parts();
                    m.release_snapshot(g, s.lineage, s.epoch)?
                };
            }
            {
                let (m, g) = ctx.parts();
                m.close(g, v.lineage, true)?
            };
            for s in &snaps {
                del(ctx, cat::snapshot_key(vid, &s.name));
            }
            del(ctx, cat::volume_key(vid));
            del(ctx, cat::name_key(&name));
            done(move |c| {
                for s in &snaps {
                    c.snapshots.remove(&(vid, s.name.clone()));
                }
                c.volumes.remove(&vid);
                c.names.remove(&name);
            })
        }))?;
        Ok(())
    }

    /// Creates `vol@snap` in O(1). The data device is synced first, outside every lock; if
    /// a write of this volume applied meanwhile was not covered by that sync, the volume's
    /// writes are held while it syncs again (format2.md §3.3), so a snapshot never
    /// references data that is not durable.
    pub fn create_snapshot(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        self.create_snapshots(&[vol], snap)?;
        self.snapshot_summary(vol, snap)
    }

    /// Snapshots every volume of `vols` as `snap` in one committer step — one durable batch
    /// at one point of the write order, so the snapshots are one cut: a write applied
    /// before it is in every snapshot of its volume, one applied after is in none (a
    /// consistency group, as `rbd group snap create`). All or nothing: if one name is
    /// taken, no snapshot is made. Durability as for one volume, per member lineage.
    pub fn create_snapshots(&self, vols: &[&str], snap: &str) -> Result<Vec<SnapshotInfo>> {
        validate_name("snapshot name", snap)?;
        if vols.is_empty() {
            return Err(Error::invalid("snapshot", "no volume given"));
        }
        let _m = lock(&self.mgmt);
        let mut vids = Vec::with_capacity(vols.len());
        for v in vols {
            let id = self.volume_id(v)?;
            if vids.contains(&id) {
                return Err(Error::invalid(
                    "snapshot",
                    format!("volume '{v}' named twice"),
                ));
            }
            vids.push(id);
        }
        let mut deferred: Vec<LineageId> = Vec::new();
        for _ in 0..SNAPSHOT_ATTEMPTS {
            let synced = (|| {
                crate::failpoint!("snapshot2.before_sync");
                self.sync_device()
            })();
            let n = match synced {
                Ok(n) => n,
                Err(e) => {
                    self.undefer(std::mem::take(&mut deferred));
                    return Err(e);
                }
            };
            let name = snap.to_string();
            let members = vids.clone();
            let r = self.committer.submit(Work::Mgmt(Box::new(move |ctx| {
                let mut vrecs = Vec::with_capacity(members.len());
                for vid in &members {
                    let v = ctx.catalog.volume(*vid)?.clone();
                    if ctx.catalog.snapshots.contains_key(&(*vid, name.clone())) {
                        return Err(Error::exists("snapshot", format!("{}@{name}", v.name)));
                    }
                    vrecs.push(v);
                }
                let unsynced: Vec<LineageId> = vrecs
                    .iter()
                    .map(|v| v.lineage)
                    .filter(|l| ctx.written.get(l).copied().unwrap_or(0) >= n)
                    .collect();
                if !unsynced.is_empty() {
                    return Ok(Outcome::Retry(unsynced));
                }
                let mut ids = ctx.catalog.ids;
                let mut recs = Vec::with_capacity(members.len());
                for (vid, v) in members.iter().zip(&vrecs) {
                    let id = ids.snapshot.max(1);
                    ids.snapshot = id + 1;
                    let l = v.lineage;
                    let (written, e) = {
                        let (m, g) = ctx.parts();
                        let written = m.lineage(l)?.born_now.saturating_mul(BLOCK_SIZE_U64);
                        (written, m.snapshot(g, l)?)
                    };
                    let rec = SnapRec {
                        id,
                        vol: *vid,
                        name: name.clone(),
                        lineage: l,
                        epoch: e,
                        size: v.size,
                        created: keys::now_secs(),
                        written,
                        protected: false,
                    };
                    put(ctx, cat::snapshot_key(*vid, &name), cat::encode(&rec));
                    recs.push(rec);
                }
                put(ctx, cat::ids_key(), cat::encode(&ids));
                let lineages = vrecs.iter().map(|v| v.lineage).collect();
                Ok(Outcome::Done {
                    apply: Box::new(move |c| {
                        for rec in recs {
                            c.snapshots.insert((rec.vol, rec.name.clone()), rec);
                        }
                        c.ids = ids;
                    }),
                    value: 0,
                    undefer: lineages,
                    durable: true,
                })
            })));
            match r {
                Answer::Value(_) => {
                    return vols
                        .iter()
                        .map(|v| self.snapshot_summary(v, snap))
                        .collect()
                }
                Answer::Retry => {
                    // The step deferred the members that had unsynced writes; all of them
                    // are released by the step that succeeds (or below).
                    let c = self.catalog_read();
                    deferred = vids
                        .iter()
                        .filter_map(|v| c.volume(*v).ok().map(|v| v.lineage))
                        .collect();
                }
                Answer::Rejected(e) | Answer::Failed(e) => {
                    self.undefer(std::mem::take(&mut deferred));
                    return Err(e);
                }
            }
        }
        self.undefer(deferred);
        Err(Error::Busy(format!(
            "snapshot {}@{snap}: writes kept landing during {SNAPSHOT_ATTEMPTS} device syncs",
            vols.join(",")
        )))
    }

    fn undefer(&self, ls: Vec<LineageId>) {
        if !ls.is_empty() {
            let _ = self.committer.submit(Work::Mgmt(Box::new(move |_| {
                Ok(Outcome::Done {
                    apply: Box::new(|_| {}),
                    value: 0,
                    undefer: ls,
                    durable: true,
                })
            })));
        }
    }

    fn snapshot_info_of(c: &Catalog, s: &SnapRec) -> SnapshotInfo {
        let parent = c
            .snapshots_of(s.vol)
            .filter(|p| p.lineage == s.lineage && p.epoch < s.epoch)
            .max_by_key(|p| p.epoch)
            .map(|p| p.name.clone());
        SnapshotInfo {
            volume: c
                .volumes
                .get(&s.vol)
                .map_or(String::new(), |v| v.name.clone()),
            name: s.name.clone(),
            id: s.id,
            size: s.size,
            created: s.created,
            written: s.written,
            exclusive: None,
            parent,
            protected: s.protected,
        }
    }

    /// A snapshot's record (no scan).
    pub fn snapshot_summary(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        let c = self.catalog_read();
        let s = c.snapshot(c.volume_id(vol)?, snap)?;
        Ok(Self::snapshot_info_of(&c, s))
    }

    /// A snapshot's record and the bytes deleting it would free (a dry run of its reclaim:
    /// O(pages changed between its neighbours)); `snapshot_summary` skips the latter.
    pub fn snapshot_info(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        let mut info = self.snapshot_summary(vol, snap)?;
        info.exclusive = Some(self.snapshot_exclusive(vol, snap)?);
        Ok(info)
    }

    pub fn snapshot_by_id(&self, id: u64) -> Option<String> {
        let c = self.catalog_read();
        c.snapshots.values().find(|s| s.id == id).map(|s| {
            let v = c.volumes.get(&s.vol).map_or("?", |v| v.name.as_str());
            format!("{v}@{}", s.name)
        })
    }

    pub fn list_snapshots(&self, vol: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let c = self.catalog_read();
        let ids: Vec<VolId> = match vol {
            Some(v) => vec![c.volume_id(v)?],
            None => c.volumes.keys().copied().collect(),
        };
        let mut out = Vec::new();
        for id in ids {
            let mut snaps: Vec<&SnapRec> = c.snapshots_of(id).collect();
            snaps.sort_by_key(|s| (s.lineage, s.epoch));
            out.extend(snaps.into_iter().map(|s| Self::snapshot_info_of(&c, s)));
        }
        Ok(out)
    }

    pub fn delete_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        let _m = lock(&self.mgmt);
        let vid = self.volume_id(vol)?;
        let open = self.open_count(|t| *t == Target::Snapshot(vid, snap.to_string()));
        if open > 0 {
            return Err(Error::Busy(format!(
                "snapshot '{vol}@{snap}' is in use by {open} export(s)"
            )));
        }
        let name = snap.to_string();
        self.run(Box::new(move |ctx| {
            let s = ctx.catalog.snapshot(vid, &name)?.clone();
            if s.protected {
                return Err(Error::Busy(format!(
                    "snapshot '{}@{name}' is protected; unprotect it first",
                    ctx.catalog.volume(vid)?.name
                )));
            }
            {
                let (m, g) = ctx.parts();
                m.release_snapshot(g, s.lineage, s.epoch)?
            };
            del(ctx, cat::snapshot_key(vid, &name));
            done(move |c| {
                c.snapshots.remove(&(vid, name));
            })
        }))?;
        Ok(())
    }

    /// Protects `vol@snap` from deletion (or lifts that): one durable record change.
    pub fn set_snapshot_protected(&self, vol: &str, snap: &str, on: bool) -> Result<()> {
        let _m = lock(&self.mgmt);
        let vid = self.volume_id(vol)?;
        let name = snap.to_string();
        self.run(Box::new(move |ctx| {
            let mut s = ctx.catalog.snapshot(vid, &name)?.clone();
            s.protected = on;
            put(ctx, cat::snapshot_key(vid, &name), cat::encode(&s));
            done(move |c| {
                c.snapshots.insert((vid, name), s);
            })
        }))?;
        Ok(())
    }

    /// A new writable volume sharing all data with `vol@snap`.
    pub fn clone_snapshot(&self, vol: &str, snap: &str, new: &str) -> Result<VolumeInfo> {
        validate_name("volume name", new)?;
        let _m = lock(&self.mgmt);
        let vid = self.volume_id(vol)?;
        let (snap_s, new_s) = (snap.to_string(), new.to_string());
        self.run(Box::new(move |ctx| {
            let s = ctx.catalog.snapshot(vid, &snap_s)?.clone();
            if ctx.catalog.names.contains_key(&new_s) {
                return Err(Error::exists("volume", new_s));
            }
            let mut ids = ctx.catalog.ids;
            let id = ids.volume.max(1);
            ids.volume = id + 1;
            let base = Some((s.lineage, s.epoch));
            let l = {
                let (m, g) = ctx.parts();
                m.create_lineage(g, base)?
            };
            let v = VolRec {
                id,
                name: new_s.clone(),
                size: s.size,
                lineage: l,
                created: keys::now_secs(),
                incomplete: None,
                quota: None,
            };
            put(ctx, cat::volume_key(id), cat::encode(&v));
            put(ctx, cat::name_key(&new_s), id.to_be_bytes().to_vec());
            put(ctx, cat::ids_key(), cat::encode(&ids));
            done(move |c| {
                c.add_lineage(l, base);
                c.names.insert(new_s, id);
                c.volumes.insert(id, v);
                c.ids = ids;
            })
        }))?;
        self.volume_info(new)
    }

    /// Returns `vol` to the contents (and size) of `vol@snap`; snapshots taken after it stay.
    /// Refused while the volume is exported, since clients would keep cached data.
    pub fn rollback(&self, vol: &str, snap: &str) -> Result<VolumeInfo> {
        let _m = lock(&self.mgmt);
        let vid = self.volume_id(vol)?;
        let open = self.open_count(|t| *t == Target::Volume(vid));
        if open > 0 {
            return Err(Error::Busy(format!(
                "volume '{vol}' is in use by {open} export(s); disconnect (unmount) it before rolling back"
            )));
        }
        let snap_s = snap.to_string();
        self.run(Box::new(move |ctx| {
            let s = ctx.catalog.snapshot(vid, &snap_s)?.clone();
            let mut v = ctx.catalog.volume(vid)?.clone();
            let base = Some((s.lineage, s.epoch));
            let l = {
                let (m, g) = ctx.parts();
                m.create_lineage(g, base)?
            };
            {
                let (m, g) = ctx.parts();
                m.close(g, v.lineage, false)?
            };
            v.lineage = l;
            v.size = s.size;
            put(ctx, cat::volume_key(vid), cat::encode(&v));
            done(move |c| {
                c.add_lineage(l, base);
                c.volumes.insert(vid, v);
            })
        }))?;
        self.volume_info(vol)
    }

    /// Runs reclaim until no job is left (tests; callers that want a settled pool).
    pub fn reclaim_all(&self) -> Result<()> {
        let mut steps = 0u64;
        loop {
            let more = self.run(Box::new(|ctx| {
                let (m, g) = ctx.parts();
                let more = m.reclaim_step(g, 64)?;
                Ok(Outcome::Done {
                    apply: Box::new(|_| {}),
                    value: u64::from(more),
                    undefer: Vec::new(),
                    durable: false,
                })
            }))?;
            steps += 1;
            if steps.is_multiple_of(64) {
                self.sync()?;
            }
            if more == 0 {
                return self.sync();
            }
        }
    }

    /// Checks the metadata on one store view: the engine's invariants (v2::check) and the
    /// catalog against the lineages' retained sets.
    pub fn check(&self) -> Result<crate::v2::check::Report> {
        let view = self.store().view()?;
        let mut report = crate::v2::check::check(&*view, self.data_blocks(), &*self.sums)?;
        let lineages = crate::v2::engine::load_lineages(&*view)?;
        let c = Catalog::load(&*view, &lineages)?;
        report.volumes = c.volumes.len() as u64;
        report.snapshots = c.snapshots.len() as u64;
        let mut snaps: HashMap<(LineageId, Epoch), u32> = HashMap::new();
        for s in c.snapshots.values() {
            *snaps.entry((s.lineage, s.epoch)).or_default() += 1;
        }
        for (l, lin) in &lineages {
            for (e, n) in lin.retained.counts() {
                let have = snaps.remove(&(*l, e)).unwrap_or(0);
                if have != n.snapshots {
                    report.add_error(format!(
                        "lineage {l} epoch {e}: {} snapshots counted, {have} snapshot records",
                        n.snapshots
                    ));
                }
            }
        }
        for ((l, e), n) in snaps {
            report.add_error(format!(
                "{n} snapshot record(s) at lineage {l} epoch {e}, which is not retained"
            ));
        }
        let mut backing: HashMap<LineageId, u32> = HashMap::new();
        for v in c.volumes.values() {
            *backing.entry(v.lineage).or_default() += 1;
            match lineages.get(&v.lineage) {
                Some(lin) if lin.closed.is_none() => {}
                _ => report.add_error(format!(
                    "volume '{}' uses lineage {}, which is not open",
                    v.name, v.lineage
                )),
            }
        }
        for (l, lin) in &lineages {
            if lin.closed.is_none() && backing.get(l).copied().unwrap_or(0) != 1 {
                report.add_error(format!(
                    "open lineage {l} backs {} volumes",
                    backing.get(l).copied().unwrap_or(0)
                ));
            }
        }
        // Contents kept on the metadata disk (format2.md §8c) at retained epochs: what
        // reads would be given. Entries put after the view was taken are compared with
        // it too (a retained epoch's content is the same in every state).
        let retained =
            |l: LineageId, e: Epoch| lineages.get(&l).is_some_and(|lin| lin.retained.contains(e));
        let still_retained = &mut |l: LineageId, e: Epoch| {
            let now =
                (self.store().view().ok()).and_then(|v| crate::v2::engine::load_lineages(&*v).ok());
            now.is_none_or(|now| now.get(&l).is_some_and(|lin| lin.retained.contains(e)))
        };
        let (n, bad) = self.contents.verify(
            &retained,
            &mut |l, e, p| {
                crate::v2::read::read_page(&*view, &lineages, &*self.sums, l, Some(e), p)
            },
            still_retained,
        )?;
        report.kept_contents = n;
        for b in bad {
            report.add_error(b);
        }
        Ok(report)
    }
}
