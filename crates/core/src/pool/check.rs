//! `pool check`: verifies every metadata invariant of docs/design.md against the store
//! (and, for an open pool, against the in-memory allocator and counts).
//!
//! On an open pool the check reads a store *view* taken, together with copies of the
//! in-memory layer counts and allocator state, under the tree write lock (no commit runs
//! then, so the four agree); the lock is released before the scan, so I/O and management
//! commands go on while the whole map is checked.

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;

use bitvec::prelude::*;
use serde::Serialize;

use crate::error::Result;
use crate::keys::LayerId;
use crate::keys::{self, MapValue, SuperRecord};
use crate::meta::{MetaRead, MetaStore};

use super::{Pool, Tree};

#[derive(Debug, Default, Clone, Serialize)]
pub struct CheckReport {
    pub errors: Vec<String>,
    pub notes: Vec<String>,
    pub volumes: usize,
    pub snapshots: usize,
    pub layers: usize,
    pub data_blocks: u64,
    pub zero_entries: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// What `check_store` found, for the live comparison.
struct Found {
    tree: Option<Tree>,
    counts: HashMap<u64, (u64, u64)>,
    used: BitVec<u64, Lsb0>,
}

fn check_store(store: &(impl MetaRead + ?Sized), r: &mut CheckReport) -> Result<Found> {
    let sk = keys::super_key();
    let data_blocks = match store.get(&sk)? {
        None => {
            r.errors.push("no superblock record".into());
            0
        }
        Some(v) => match keys::decode_record::<SuperRecord>("superblock", &sk, &v) {
            Ok(s) => s.data_blocks,
            Err(e) => {
                r.errors.push(e.to_string());
                0
            }
        },
    };
    let mut found = Found {
        tree: None,
        counts: HashMap::new(),
        used: bitvec![u64, Lsb0; 0; data_blocks as usize],
    };
    let tree = match Pool::load_tree(store) {
        Ok(t) => t,
        Err(e) => {
            r.errors.push(format!("loading names and layers: {e}"));
            return Ok(found);
        }
    };
    r.volumes = tree.volumes.len();
    r.snapshots = tree.snapshots.len();
    r.layers = tree.layers.len();
    // Name index both ways.
    let (a, b) = keys::prefix_range(keys::K_NAME);
    let mut indexed = 0usize;
    store.scan(&a, &b, &mut |k, v| {
        indexed += 1;
        let name = String::from_utf8_lossy(&k[1..]).to_string();
        match <[u8; 8]>::try_from(v).map(u64::from_be_bytes) {
            Ok(id) => match tree.volumes.get(&id) {
                Some(vr) if vr.name == name => {}
                Some(vr) => r.errors.push(format!(
                    "name index '{name}' points at volume {id} named '{}'",
                    vr.name
                )),
                None => r
                    .errors
                    .push(format!("name index '{name}' points at missing volume {id}")),
            },
            Err(_) => r
                .errors
                .push(format!("name index '{name}' has a bad value")),
        }
        ControlFlow::Continue(())
    })?;
    if indexed != tree.volumes.len() {
        r.errors.push(format!(
            "{} volumes but {indexed} name index entries",
            tree.volumes.len()
        ));
    }
    if tree.next_id
        <= tree
            .layers
            .keys()
            .chain(tree.volumes.keys())
            .copied()
            .max()
            .unwrap_or(0)
    {
        r.errors.push(format!(
            "next id {} is not above every used id",
            tree.next_id
        ));
    }
    // Tree shape.
    for (id, l) in &tree.layers {
        if let Err(e) = tree.chain(*id) {
            r.errors.push(e.to_string());
        }
        if l.rec.id != *id {
            r.errors
                .push(format!("layer record {id} carries id {}", l.rec.id));
        }
    }
    let mut heads = BTreeSet::new();
    for v in tree.volumes.values() {
        match tree.layers.get(&v.head) {
            None => r.errors.push(format!(
                "volume '{}' head layer {} is missing",
                v.name, v.head
            )),
            Some(l) => {
                if l.rec.frozen {
                    r.errors.push(format!(
                        "volume '{}' head layer {} is frozen",
                        v.name, v.head
                    ));
                }
                if !l.children.is_empty() {
                    r.errors.push(format!(
                        "volume '{}' head layer {} has children",
                        v.name, v.head
                    ));
                }
            }
        }
        if !heads.insert(v.head) {
            r.errors
                .push(format!("layer {} is the head of two volumes", v.head));
        }
    }
    for ((vid, _), s) in &tree.snapshots {
        let vname = tree.volumes.get(vid).map(|v| v.name.clone());
        let Some(vname) = vname else {
            r.errors.push(format!(
                "snapshot '{}' belongs to missing volume {vid}",
                s.name
            ));
            continue;
        };
        match tree.layers.get(&s.layer) {
            None => r.errors.push(format!(
                "snapshot {vname}@{} layer {} is missing",
                s.name, s.layer
            )),
            Some(l) if !l.rec.frozen => r.errors.push(format!(
                "snapshot {vname}@{} layer {} is not frozen",
                s.name, s.layer
            )),
            _ => {}
        }
        if heads.contains(&s.layer) {
            r.errors.push(format!(
                "snapshot {vname}@{} shares layer {} with a volume head",
                s.name, s.layer
            ));
        }
    }
    let pending = tree.reclaimable();
    if !pending.is_empty() {
        r.notes.push(format!(
            "{} unreferenced layer(s) awaiting background reclaim",
            pending.len()
        ));
    }
    // Extent map.
    let (a, b) = keys::prefix_range(keys::K_MAP);
    store.scan(&a, &b, &mut |k, v| {
        let entry = keys::decode_map_key(k).and_then(|(l, lba)| Ok((l, lba, MapValue::decode(v)?)));
        match entry {
            Err(e) => r.errors.push(e.to_string()),
            Ok((layer, lba, mv)) => {
                if !tree.layers.contains_key(&layer) {
                    r.errors.push(format!("map entry (layer {layer}, lba {lba}) belongs to a missing layer"));
                }
                let c = found.counts.entry(layer).or_default();
                c.0 += 1;
                match mv {
                    MapValue::Zero => r.zero_entries += 1,
                    MapValue::Data { pba, .. } => {
                        c.1 += 1;
                        r.data_blocks += 1;
                        match found.used.get_mut(pba as usize) {
                            None => r.errors.push(format!(
                                "layer {layer} lba {lba}: data block {pba} is beyond the device ({data_blocks} blocks)"
                            )),
                            Some(bit) if *bit => {
                                r.errors.push(format!("layer {layer} lba {lba}: data block {pba} is mapped twice"))
                            }
                            Some(mut bit) => bit.set(true),
                        }
                    }
                }
            }
        }
        if r.errors.len() > 1000 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    found.tree = Some(tree);
    Ok(found)
}

/// Checks a pool that is not open (no daemon).
pub fn check_offline(store: &dyn MetaStore) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    check_store(store, &mut r)?;
    Ok(r)
}

impl Pool {
    /// Checks the open pool (see the module doc: commits wait only while the view and the
    /// copies are taken, not during the scan).
    pub fn check(&self) -> Result<CheckReport> {
        let (view, counts, (layers, volumes), (used_bits, free, pending)) = {
            let tree = self.tree_write();
            let view = self.store().view()?;
            let counts: HashMap<LayerId, (u64, u64)> = tree
                .layers
                .iter()
                .map(|(id, l)| (*id, (l.entries, l.data_blocks)))
                .collect();
            let sizes = (tree.layers.len(), tree.volumes.len());
            let alloc = self.alloc_lock().snapshot();
            (view, counts, sizes, alloc)
        };
        let mut r = CheckReport::default();
        let found = check_store(&*view, &mut r)?;
        drop(view);
        for (id, (entries, data)) in &counts {
            let (e, d) = found.counts.get(id).copied().unwrap_or((0, 0));
            if (*entries, *data) != (e, d) {
                r.errors.push(format!(
                    "layer {id}: in-memory counts {entries}/{data} differ from the store's {e}/{d}"
                ));
            }
        }
        if let Some(st) = &found.tree {
            if st.layers.len() != layers || st.volumes.len() != volumes {
                r.errors
                    .push("in-memory tree differs from the store".into());
            }
        }
        let mut not_marked = 0u64;
        for pba in found.used.iter_ones() {
            if !used_bits.get(pba).is_some_and(|b| *b) {
                not_marked += 1;
            }
        }
        if not_marked > 0 {
            r.errors.push(format!(
                "{not_marked} mapped data blocks are free in the allocator"
            ));
        }
        let used = used_bits.len() as u64 - free;
        let accounted = r.data_blocks + pending;
        if used > accounted {
            r.notes.push(format!(
                "{} blocks allocated to writes in flight",
                used - accounted
            ));
        } else if used < accounted {
            r.errors.push(format!(
                "allocator has {used} blocks in use, but {accounted} are mapped or pending"
            ));
        }
        Ok(r)
    }
}
