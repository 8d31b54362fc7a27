//! The in-memory copy of the pool's names and layer tree (docs/design.md §2).
//!
//! Invariants (checked by `pool check`): every layer's parent exists and the parent links
//! have no cycle; `children` is the inverse of `parent`; a volume head is not frozen and
//! has no children; a snapshot's layer is frozen. A layer is *referenced* when a volume
//! head or a snapshot names it; unreferenced layers are reclaim's work list.
//!
//! Threading: owned by `Pool::tree` (an RwLock); every change happens after the store
//! commit that makes it durable, under the write lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::{Error, Result};
use crate::keys::{LayerId, LayerRecord, SnapshotRecord, VolId, VolumeRecord};

#[derive(Debug, Clone)]
pub struct LayerInfo {
    pub rec: LayerRecord,
    pub children: BTreeSet<LayerId>,
    /// Mapping entries (data and zero) stored in this layer.
    pub entries: u64,
    /// Of those, entries that own a data block.
    pub data_blocks: u64,
}

#[derive(Debug, Default)]
pub struct Tree {
    pub volumes: BTreeMap<VolId, VolumeRecord>,
    pub names: HashMap<String, VolId>,
    pub snapshots: BTreeMap<(VolId, String), SnapshotRecord>,
    pub layers: HashMap<LayerId, LayerInfo>,
    pub next_id: u64,
}

impl Tree {
    pub fn volume_id(&self, name: &str) -> Result<VolId> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| Error::not_found("volume", name))
    }

    pub fn volume(&self, id: VolId) -> Result<&VolumeRecord> {
        self.volumes
            .get(&id)
            .ok_or_else(|| Error::not_found("volume", format!("#{id}")))
    }

    pub fn volume_by_name(&self, name: &str) -> Result<&VolumeRecord> {
        self.volume(self.volume_id(name)?)
    }

    pub fn snapshot(&self, vol: VolId, snap: &str) -> Result<&SnapshotRecord> {
        self.snapshots.get(&(vol, snap.to_string())).ok_or_else(|| {
            let vname = self.volumes.get(&vol).map_or("?", |v| v.name.as_str());
            Error::not_found("snapshot", format!("{vname}@{snap}"))
        })
    }

    pub fn snapshots_of(&self, vol: VolId) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots
            .range((vol, String::new())..)
            .take_while(move |((v, _), _)| *v == vol)
            .map(|(_, s)| s)
    }

    pub fn layer(&self, id: LayerId) -> Result<&LayerInfo> {
        self.layers
            .get(&id)
            .ok_or_else(|| Error::Corrupt(format!("layer {id} is missing")))
    }

    /// The layer and its ancestors, nearest first.
    pub fn chain(&self, mut id: LayerId) -> Result<Vec<LayerId>> {
        let mut out = Vec::new();
        loop {
            if out.len() > self.layers.len() {
                return Err(Error::Corrupt(format!(
                    "cycle in the layer tree at layer {id}"
                )));
            }
            out.push(id);
            match self.layer(id)?.rec.parent {
                Some(p) => id = p,
                None => return Ok(out),
            }
        }
    }

    pub fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Unreferenced layers that reclaim can act on now (no more than one child).
    pub fn reclaimable(&self) -> Vec<LayerId> {
        let referenced: BTreeSet<LayerId> = self
            .volumes
            .values()
            .map(|v| v.head)
            .chain(self.snapshots.values().map(|s| s.layer))
            .collect();
        // Leaves first: freeing a leaf is cheaper than merging a layer into a child that
        // is itself about to go (e.g. a volume deleted with its snapshots).
        let mut out: Vec<(usize, LayerId)> = self
            .layers
            .iter()
            .filter(|(id, l)| !referenced.contains(id) && l.children.len() <= 1)
            .map(|(id, l)| (l.children.len(), *id))
            .collect();
        out.sort_unstable();
        out.into_iter().map(|(_, id)| id).collect()
    }

    pub fn insert_layer(&mut self, rec: LayerRecord) {
        if let Some(p) = rec.parent {
            if let Some(pl) = self.layers.get_mut(&p) {
                pl.children.insert(rec.id);
            }
        }
        self.layers.insert(
            rec.id,
            LayerInfo {
                rec,
                children: BTreeSet::new(),
                entries: 0,
                data_blocks: 0,
            },
        );
    }

    pub fn remove_layer(&mut self, id: LayerId) {
        if let Some(l) = self.layers.remove(&id) {
            if let Some(p) = l.rec.parent {
                if let Some(pl) = self.layers.get_mut(&p) {
                    pl.children.remove(&id);
                }
            }
        }
    }

    /// Re-parents `child` from its current parent to `new_parent`.
    pub fn set_parent(&mut self, child: LayerId, new_parent: Option<LayerId>) {
        let old = self.layers.get(&child).and_then(|l| l.rec.parent);
        if let Some(o) = old {
            if let Some(ol) = self.layers.get_mut(&o) {
                ol.children.remove(&child);
            }
        }
        if let Some(n) = new_parent {
            if let Some(nl) = self.layers.get_mut(&n) {
                nl.children.insert(child);
            }
        }
        if let Some(cl) = self.layers.get_mut(&child) {
            cl.rec.parent = new_parent;
        }
    }

    pub fn adjust_counts(&mut self, id: LayerId, entries: i64, data: i64) {
        if let Some(l) = self.layers.get_mut(&id) {
            l.entries = l.entries.saturating_add_signed(entries);
            l.data_blocks = l.data_blocks.saturating_add_signed(data);
        }
    }
}
