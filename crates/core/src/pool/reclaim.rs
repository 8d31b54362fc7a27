//! Background reclaim of unreferenced layers (docs/design.md §2 "Reclaim").
//!
//! Each step handles up to `RECLAIM_BATCH` entries of one layer in one store batch under
//! the tree write lock, and every step preserves the view of every referenced layer, so a
//! crash between steps loses nothing and reclaim simply continues at the next open.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use crate::error::{Error, Result};
use crate::keys::{self, MapValue};
use crate::meta::{try_scan, WriteBatch};

use super::mapping::scan_layer;
use super::Pool;

const RECLAIM_BATCH: usize = 1024;

impl Pool {
    /// One reclaim step; false when nothing is left to do.
    pub(crate) fn reclaim_step(&self) -> Result<bool> {
        let store = &**self.store();
        let mut tree = self.tree_write();
        let Some(&l) = tree.reclaimable().first() else {
            return Ok(false);
        };
        let info = tree.layer(l)?.clone();
        let mut entries: Vec<(u64, MapValue)> = Vec::new();
        let (a, b) = keys::map_range(l, 0, u64::MAX);
        try_scan(store, &a, &b, |k, v| {
            let (_, lba) = keys::decode_map_key(k)?;
            entries.push((lba, MapValue::decode(v)?));
            Ok::<_, Error>(if entries.len() >= RECLAIM_BATCH {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
        let done = entries.len() < RECLAIM_BATCH;
        let child = info.children.iter().next().copied();
        let mut batch = WriteBatch::new();
        let mut frees = Vec::new();
        let (mut c_entries, mut c_data) = (0i64, 0i64);
        let mut shadowed = BTreeMap::new();
        if let (Some(c), Some(first), Some(last)) = (child, entries.first(), entries.last()) {
            scan_layer(store, c, first.0, last.0.saturating_add(1), |lba, mv| {
                shadowed.insert(lba, mv);
            })?;
        }
        for &(lba, mv) in &entries {
            batch.delete(keys::map_key(l, lba).to_vec());
            match child {
                Some(c) if !shadowed.contains_key(&lba) => {
                    batch.put(keys::map_key(c, lba).to_vec(), mv.encode().to_vec());
                    c_entries += 1;
                    c_data += i64::from(mv.pba().is_some());
                }
                _ => frees.extend(mv.pba()),
            }
        }
        let l_data = entries.iter().filter(|(_, mv)| mv.pba().is_some()).count() as i64;
        if done {
            batch.delete(keys::layer_key(l));
            if let Some(c) = child {
                let mut crec = tree.layer(c)?.rec.clone();
                crec.parent = info.rec.parent;
                batch.put(keys::layer_key(c), keys::encode_record(&crec));
            }
        }
        if info.children.len() > 1 {
            return Err(Error::Corrupt(format!(
                "reclaim picked layer {l} with several children"
            )));
        }
        crate::failpoint!("reclaim.before_commit");
        store.commit(batch, false)?;
        crate::failpoint!("reclaim.after_commit");
        tree.adjust_counts(l, -(entries.len() as i64), -l_data);
        if let Some(c) = child {
            tree.adjust_counts(c, c_entries, c_data);
        }
        if done {
            if let Some(c) = child {
                tree.set_parent(c, info.rec.parent);
            }
            tree.remove_layer(l);
            log::debug!("reclaimed layer {l}");
        }
        self.defer_frees(&frees);
        self.mark_dirty();
        Ok(true)
    }
}
