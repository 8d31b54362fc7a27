//! Management operations: volumes, snapshots, clones, rollback. Each is one durable store
//! batch followed by the matching in-memory change, under the tree write lock, so after a
//! crash an operation has either happened entirely or not at all.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::device::BLOCK_SIZE_U64;
use crate::error::{Error, Result};
use crate::keys::{self, Incomplete, LayerId, LayerRecord, SnapshotRecord, VolId, VolumeRecord};
use crate::meta::{MetaRead, WriteBatch};
use crate::names::validate_name;

use super::mapping::scan_layer;
use super::{Pool, Target, Tree};

/// Largest volume size accepted (64 PiB), far below where byte offsets could overflow.
pub const MAX_VOLUME_SIZE: u64 = 1 << 56;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u64,
    pub size: u64,
    /// Bytes written since the last snapshot (data held by the volume's head).
    pub written: u64,
    pub snapshots: usize,
    /// Bytes held by this volume's snapshots' own layers.
    pub snapshot_bytes: u64,
    /// Bytes the volume and its snapshots hold (what its quota limits).
    pub used: u64,
    /// Bytes the volume and its snapshots may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    /// The snapshot this volume was cloned from or rolled back to, if any.
    pub origin: Option<String>,
    pub created: u64,
    /// Open exports of the volume itself (NBD connections, ublk devices): rollback and
    /// delete wait for 0.
    pub open: usize,
    /// Why the volume's contents are not whole yet (an unfinished or interrupted restore);
    /// `None` for an ordinary volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<Incomplete>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    /// Identifies the snapshot within its pool for as long as it exists (its layer id);
    /// never reused. Backups record it to find their incremental base.
    pub id: u64,
    pub size: u64,
    pub created: u64,
    /// Bytes of data stored in this snapshot's own layer (written between the previous
    /// snapshot and this one).
    pub written: u64,
    /// Bytes that deleting this snapshot would free (only with `snapshot info`).
    pub exclusive: Option<u64>,
    /// The previous snapshot in this snapshot's lineage.
    pub parent: Option<String>,
    /// Deleting it is refused until it is unprotected.
    pub protected: bool,
}

pub fn validate_size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::invalid("size", "must be greater than zero"));
    }
    if !size.is_multiple_of(BLOCK_SIZE_U64) {
        return Err(Error::invalid(
            "size",
            format!("{size} bytes is not a multiple of 4 KiB"),
        ));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(Error::invalid(
            "size",
            format!("{size} bytes exceeds the maximum of {MAX_VOLUME_SIZE} bytes (64 PiB)"),
        ));
    }
    Ok(())
}

fn snapshot_names(tree: &Tree) -> HashMap<LayerId, String> {
    tree.snapshots
        .iter()
        .map(|((vid, _), s)| {
            let v = tree.volumes.get(vid).map_or("?", |v| v.name.as_str());
            (s.layer, format!("{v}@{}", s.name))
        })
        .collect()
}

/// The nearest named snapshot strictly above `layer`.
fn named_ancestor(tree: &Tree, names: &HashMap<LayerId, String>, layer: LayerId) -> Option<String> {
    let chain = tree.chain(layer).ok()?;
    chain.iter().skip(1).find_map(|l| names.get(l).cloned())
}

fn next_id_put(b: &mut WriteBatch, tree: &Tree) {
    b.put(keys::next_id_key(), tree.next_id.to_be_bytes().to_vec());
}

impl Pool {
    fn volume_info_locked(
        &self,
        tree: &Tree,
        names: &HashMap<LayerId, String>,
        v: &VolumeRecord,
    ) -> VolumeInfo {
        let head = tree.layers.get(&v.head);
        let snaps: Vec<&SnapshotRecord> = tree.snapshots_of(v.id).collect();
        VolumeInfo {
            name: v.name.clone(),
            id: v.id,
            size: v.size,
            written: head.map_or(0, |l| l.data_blocks) * BLOCK_SIZE_U64,
            snapshots: snaps.len(),
            snapshot_bytes: snaps
                .iter()
                .map(|s| tree.layers.get(&s.layer).map_or(0, |l| l.data_blocks))
                .sum::<u64>()
                * BLOCK_SIZE_U64,
            used: (head.map_or(0, |l| l.data_blocks)
                + snaps
                    .iter()
                    .map(|s| tree.layers.get(&s.layer).map_or(0, |l| l.data_blocks))
                    .sum::<u64>())
                * BLOCK_SIZE_U64,
            quota: None,
            origin: named_ancestor(tree, names, v.head),
            created: v.created,
            open: self.open_count(|t| *t == Target::Volume(v.id)),
            incomplete: v.incomplete.clone(),
        }
    }

    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.create_volume_marked(name, size, None)
    }

    /// Creates a volume, marked incomplete when `incomplete` says why (e.g. a restore is
    /// about to fill it). The mark is committed with the volume, so a crash while it fills
    /// leaves a volume that says it is incomplete, never one that looks whole.
    pub fn create_volume_marked(
        &self,
        name: &str,
        size: u64,
        incomplete: Option<&Incomplete>,
    ) -> Result<VolumeInfo> {
        validate_name("volume name", name)?;
        validate_size(size)?;
        let mut tree = self.tree_write();
        if tree.names.contains_key(name) {
            return Err(Error::exists("volume", name));
        }
        let (vid, lid) = (tree.take_id(), tree.take_id());
        let now = keys::now_secs();
        let layer = LayerRecord {
            id: lid,
            parent: None,
            frozen: false,
            created: now,
        };
        let vol = VolumeRecord {
            id: vid,
            name: name.to_string(),
            size,
            head: lid,
            created: now,
            incomplete: incomplete.cloned(),
        };
        let mut b = WriteBatch::new();
        b.put(keys::layer_key(lid), keys::encode_record(&layer));
        b.put(keys::volume_key(vid), keys::encode_record(&vol));
        b.put(keys::name_key(name), vid.to_be_bytes().to_vec());
        next_id_put(&mut b, &tree);
        crate::failpoint!("volume_create.before_commit");
        self.store().commit(b, true)?;
        tree.insert_layer(layer);
        tree.names.insert(name.to_string(), vid);
        tree.volumes.insert(vid, vol.clone());
        Ok(self.volume_info_locked(&tree, &HashMap::new(), &vol))
    }

    pub fn volume_id(&self, name: &str) -> Result<VolId> {
        self.tree_read().volume_id(name)
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let tree = self.tree_read();
        let names = snapshot_names(&tree);
        let mut out: Vec<VolumeInfo> = tree
            .volumes
            .values()
            .map(|v| self.volume_info_locked(&tree, &names, v))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let tree = self.tree_read();
        let v = tree.volume_by_name(name)?;
        Ok(self.volume_info_locked(&tree, &snapshot_names(&tree), v))
    }

    /// Grows a volume, or shrinks it with `force` (the cut-off data is discarded).
    pub fn resize_volume(&self, name: &str, size: u64, force: bool) -> Result<VolumeInfo> {
        validate_size(size)?;
        let _serial = self.resize_guard();
        let (vid, old) = {
            let tree = self.tree_read();
            let v = tree.volume_by_name(name)?;
            (v.id, v.size)
        };
        if size < old && !force {
            return Err(Error::invalid(
                "size",
                format!("shrinking '{name}' from {old} to {size} bytes discards data; add --force"),
            ));
        }
        if size > old {
            // Anything stale beyond the old end (from an earlier shrink cut short by a crash)
            // must read as zeros once the volume grows over it.
            self.zero_tail(vid, old, size)?;
        }
        {
            let mut tree = self.tree_write();
            let mut v = tree.volume(vid)?.clone();
            v.size = size;
            let mut b = WriteBatch::new();
            b.put(keys::volume_key(vid), keys::encode_record(&v));
            crate::failpoint!("resize.before_commit");
            self.store().commit(b, true)?;
            tree.volumes.insert(vid, v);
        }
        crate::failpoint!("resize.after_commit");
        if size < old {
            self.zero_tail(vid, size, old)?;
        }
        self.volume_info(name)
    }

    /// Makes `[from, to)` of the volume read as zeros; cost follows the entries mapped
    /// there in the volume's chain, not the length of the range.
    fn zero_tail(&self, vid: VolId, from: u64, to: u64) -> Result<()> {
        let (c0, c1) = (from / BLOCK_SIZE_U64, to / BLOCK_SIZE_U64);
        let mut lbas = std::collections::BTreeSet::new();
        {
            let tree = self.tree_read();
            let chain = tree.chain(tree.volume(vid)?.head)?;
            for l in chain {
                scan_layer(&**self.store(), l, c0, c1, |lba, _| {
                    lbas.insert(lba);
                })?;
            }
        }
        let mut it = lbas.into_iter().peekable();
        while let Some(first) = it.next() {
            let end = (first + 16 * 1024).min(c1);
            while it.peek().is_some_and(|l| *l < end) {
                it.next();
            }
            self.zero_blocks(vid, first, end, false, false)?;
        }
        Ok(())
    }

    /// Sets (`Some(why)`) or clears (`None`) the volume's incomplete mark; durable on return.
    pub fn set_volume_incomplete(
        &self,
        name: &str,
        incomplete: Option<&Incomplete>,
    ) -> Result<VolumeInfo> {
        {
            let mut tree = self.tree_write();
            let vid = tree.volume_id(name)?;
            let mut v = tree.volume(vid)?.clone();
            v.incomplete = incomplete.cloned();
            let mut b = WriteBatch::new();
            b.put(keys::volume_key(vid), keys::encode_record(&v));
            self.store().commit(b, true)?;
            tree.volumes.insert(vid, v);
        }
        self.volume_info(name)
    }

    pub fn rename_volume(&self, old: &str, new: &str) -> Result<VolumeInfo> {
        validate_name("volume name", new)?;
        {
            let mut tree = self.tree_write();
            let vid = tree.volume_id(old)?;
            if tree.names.contains_key(new) {
                return Err(Error::exists("volume", new));
            }
            let mut v = tree.volume(vid)?.clone();
            v.name = new.to_string();
            let mut b = WriteBatch::new();
            b.put(keys::volume_key(vid), keys::encode_record(&v));
            b.delete(keys::name_key(old));
            b.put(keys::name_key(new), vid.to_be_bytes().to_vec());
            crate::failpoint!("rename.before_commit");
            self.store().commit(b, true)?;
            tree.names.remove(old);
            tree.names.insert(new.to_string(), vid);
            tree.volumes.insert(vid, v);
        }
        self.volume_info(new)
    }

    /// Deletes a volume; with `recursive` also its snapshots (clones made from them keep
    /// their data).
    pub fn delete_volume(&self, name: &str, recursive: bool) -> Result<()> {
        {
            let mut tree = self.tree_write();
            let vid = tree.volume_id(name)?;
            let snaps: Vec<SnapshotRecord> = tree.snapshots_of(vid).cloned().collect();
            if !snaps.is_empty() && !recursive {
                return Err(Error::Busy(format!(
                    "volume '{name}' has {} snapshot(s); delete them first or use --recursive",
                    snaps.len()
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
            let mut b = WriteBatch::new();
            b.delete(keys::volume_key(vid));
            b.delete(keys::name_key(name));
            for s in &snaps {
                b.delete(keys::snapshot_key(vid, &s.name));
            }
            crate::failpoint!("volume_delete.before_commit");
            self.store().commit(b, true)?;
            tree.volumes.remove(&vid);
            tree.names.remove(name);
            for s in &snaps {
                tree.snapshots.remove(&(vid, s.name.clone()));
            }
        }
        self.wake_background();
        Ok(())
    }

    /// Creates `vol@snap` in O(1): the head is frozen as the snapshot's layer and the volume
    /// continues on a new empty head. The data device is synced first, under the tree lock,
    /// so the snapshot never references data that is not yet durable.
    pub fn create_snapshot(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        validate_name("snapshot name", snap)?;
        let mut tree = self.tree_write();
        let vid = tree.volume_id(vol)?;
        if tree.snapshots.contains_key(&(vid, snap.to_string())) {
            return Err(Error::exists("snapshot", format!("{vol}@{snap}")));
        }
        let mut v = tree.volume(vid)?.clone();
        let old_head = v.head;
        let mut frozen = tree.layer(old_head)?.rec.clone();
        frozen.frozen = true;
        let new_id = tree.take_id();
        let now = keys::now_secs();
        let new_head = LayerRecord {
            id: new_id,
            parent: Some(old_head),
            frozen: false,
            created: now,
        };
        let srec = SnapshotRecord {
            name: snap.to_string(),
            layer: old_head,
            size: v.size,
            created: now,
        };
        v.head = new_id;
        let mut b = WriteBatch::new();
        b.put(keys::layer_key(old_head), keys::encode_record(&frozen));
        b.put(keys::layer_key(new_id), keys::encode_record(&new_head));
        b.put(keys::volume_key(vid), keys::encode_record(&v));
        b.put(keys::snapshot_key(vid, snap), keys::encode_record(&srec));
        next_id_put(&mut b, &tree);
        crate::failpoint!("snapshot_create.before_sync");
        self.sync_device()?;
        crate::failpoint!("snapshot_create.before_commit");
        self.store().commit(b, true)?;
        if let Some(l) = tree.layers.get_mut(&old_head) {
            l.rec.frozen = true;
        }
        tree.insert_layer(new_head);
        tree.volumes.insert(vid, v);
        tree.snapshots.insert((vid, snap.to_string()), srec);
        let names = snapshot_names(&tree);
        self.snapshot_info_locked(&tree, &names, vid, snap)
    }

    fn snapshot_info_locked(
        &self,
        tree: &Tree,
        names: &HashMap<LayerId, String>,
        vid: VolId,
        snap: &str,
    ) -> Result<SnapshotInfo> {
        let v = tree.volume(vid)?;
        let s = tree.snapshot(vid, snap)?;
        let layer = tree.layer(s.layer)?;
        Ok(SnapshotInfo {
            volume: v.name.clone(),
            name: s.name.clone(),
            id: s.layer,
            size: s.size,
            created: s.created,
            written: layer.data_blocks * BLOCK_SIZE_U64,
            exclusive: None,
            parent: named_ancestor(tree, names, s.layer),
            protected: false,
        })
    }

    /// Bytes of `layer`'s data that every one of `children` shadows (freed if the layer
    /// went away), read from `store` (a view).
    fn exclusive_bytes(
        store: &(impl MetaRead + ?Sized),
        layer: LayerId,
        children: &[LayerId],
    ) -> Result<u64> {
        let mut data = Vec::new();
        scan_layer(store, layer, 0, u64::MAX, |lba, mv| {
            if mv.pba().is_some() {
                data.push(lba);
            }
        })?;
        let mut count = 0u64;
        for lba in data {
            let mut all = true;
            for &c in children {
                if store.get(&keys::map_key(c, lba))?.is_none() {
                    all = false;
                    break;
                }
            }
            count += u64::from(all);
        }
        Ok(count * BLOCK_SIZE_U64)
    }

    /// A snapshot's record with the bytes deleting it would free (`exclusive`): that scans
    /// the snapshot's own map, on a store view taken with the record (no lock held while
    /// it scans).
    pub fn snapshot_info(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        let (mut info, children, view) = {
            let tree = self.tree_read();
            let vid = tree.volume_id(vol)?;
            let info = self.snapshot_info_locked(&tree, &snapshot_names(&tree), vid, snap)?;
            let children: Vec<LayerId> = tree.layer(info.id)?.children.iter().copied().collect();
            (info, children, self.store().view()?)
        };
        info.exclusive = Some(Self::exclusive_bytes(&*view, info.id, &children)?);
        Ok(info)
    }

    /// A snapshot's record without `exclusive`: no scan (backups need only its id and time).
    pub fn snapshot_summary(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        let tree = self.tree_read();
        let vid = tree.volume_id(vol)?;
        self.snapshot_info_locked(&tree, &snapshot_names(&tree), vid, snap)
    }

    /// The `vol@snap` name of the snapshot whose `SnapshotInfo::id` is `id`, if it exists.
    pub fn snapshot_by_id(&self, id: u64) -> Option<String> {
        let tree = self.tree_read();
        let ((vol, name), _) = tree.snapshots.iter().find(|(_, r)| r.layer == id)?;
        Some(format!("{}@{}", tree.volume(*vol).ok()?.name, name))
    }

    /// Snapshots of one volume, or of all volumes, oldest first within a volume.
    pub fn list_snapshots(&self, vol: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let tree = self.tree_read();
        let names = snapshot_names(&tree);
        let vids: Vec<VolId> = match vol {
            Some(n) => vec![tree.volume_id(n)?],
            None => tree.volumes.keys().copied().collect(),
        };
        let mut out = Vec::new();
        for vid in vids {
            let mut snaps: Vec<&SnapshotRecord> = tree.snapshots_of(vid).collect();
            snaps.sort_by_key(|s| (s.layer, s.created));
            for s in snaps {
                out.push(self.snapshot_info_locked(&tree, &names, vid, &s.name)?);
            }
        }
        Ok(out)
    }

    pub fn delete_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        {
            let mut tree = self.tree_write();
            let vid = tree.volume_id(vol)?;
            tree.snapshot(vid, snap)?;
            let open = self.open_count(|t| *t == Target::Snapshot(vid, snap.to_string()));
            if open > 0 {
                return Err(Error::Busy(format!(
                    "snapshot '{vol}@{snap}' is in use by {open} export(s)"
                )));
            }
            let mut b = WriteBatch::new();
            b.delete(keys::snapshot_key(vid, snap));
            crate::failpoint!("snapshot_delete.before_commit");
            self.store().commit(b, true)?;
            tree.snapshots.remove(&(vid, snap.to_string()));
        }
        self.wake_background();
        Ok(())
    }

    /// A new writable volume sharing all data with `vol@snap`.
    pub fn clone_snapshot(&self, vol: &str, snap: &str, new: &str) -> Result<VolumeInfo> {
        validate_name("volume name", new)?;
        let mut tree = self.tree_write();
        let vid = tree.volume_id(vol)?;
        let s = tree.snapshot(vid, snap)?.clone();
        if tree.names.contains_key(new) {
            return Err(Error::exists("volume", new));
        }
        let (nvid, lid) = (tree.take_id(), tree.take_id());
        let now = keys::now_secs();
        let layer = LayerRecord {
            id: lid,
            parent: Some(s.layer),
            frozen: false,
            created: now,
        };
        let v = VolumeRecord {
            id: nvid,
            name: new.to_string(),
            size: s.size,
            head: lid,
            created: now,
            incomplete: None,
        };
        let mut b = WriteBatch::new();
        b.put(keys::layer_key(lid), keys::encode_record(&layer));
        b.put(keys::volume_key(nvid), keys::encode_record(&v));
        b.put(keys::name_key(new), nvid.to_be_bytes().to_vec());
        next_id_put(&mut b, &tree);
        crate::failpoint!("clone.before_commit");
        self.store().commit(b, true)?;
        tree.insert_layer(layer);
        tree.names.insert(new.to_string(), nvid);
        tree.volumes.insert(nvid, v.clone());
        let names = snapshot_names(&tree);
        Ok(self.volume_info_locked(&tree, &names, &v))
    }

    /// Returns `vol` to the contents (and size) of `vol@snap`. Snapshots taken after it stay
    /// valid. Refused while the volume is exported, since clients would keep cached data.
    pub fn rollback(&self, vol: &str, snap: &str) -> Result<VolumeInfo> {
        {
            let mut tree = self.tree_write();
            let vid = tree.volume_id(vol)?;
            let s = tree.snapshot(vid, snap)?.clone();
            let open = self.open_count(|t| *t == Target::Volume(vid));
            if open > 0 {
                return Err(Error::Busy(format!(
                    "volume '{vol}' is in use by {open} export(s); disconnect (unmount) it before rolling back"
                )));
            }
            let mut v = tree.volume(vid)?.clone();
            let lid = tree.take_id();
            let layer = LayerRecord {
                id: lid,
                parent: Some(s.layer),
                frozen: false,
                created: keys::now_secs(),
            };
            v.head = lid;
            v.size = s.size;
            let mut b = WriteBatch::new();
            b.put(keys::layer_key(lid), keys::encode_record(&layer));
            b.put(keys::volume_key(vid), keys::encode_record(&v));
            next_id_put(&mut b, &tree);
            crate::failpoint!("rollback.before_commit");
            self.store().commit(b, true)?;
            tree.insert_layer(layer);
            tree.volumes.insert(vid, v);
        }
        self.wake_background();
        self.volume_info(vol)
    }
}
