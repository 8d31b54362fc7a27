//! Changed block ranges between two views (docs/design.md §2 "Diff").

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use crate::device::BLOCK_SIZE_U64;
use crate::error::Result;

use super::mapping::scan_layer;
use super::{Pool, Target};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiffRange {
    pub offset: u64,
    pub length: u64,
}

impl Pool {
    /// Byte ranges whose contents may differ between `a` and `b`; every range where they
    /// differ is included. Cost is proportional to the entries written on the two paths
    /// from `a` and `b` to their common ancestor, not to the volume size. The layers are
    /// chosen under the tree's read side together with a store view; the scan runs on the
    /// view with no lock held, so writes and reclaim go on meanwhile (reclaim moving
    /// entries between layers after that moment does not change what the view shows).
    pub fn diff(&self, a: &Target, b: &Target) -> Result<Vec<DiffRange>> {
        let (view, layers, size_a, size_b) = {
            let tree = self.tree_read();
            let (la, size_a) = super::io::target_layer(&tree, a)?;
            let (lb, size_b) = super::io::target_layer(&tree, b)?;
            let ca = tree.chain(la)?;
            let cb = tree.chain(lb)?;
            let in_b: HashSet<u64> = cb.iter().copied().collect();
            let lca = ca.iter().copied().find(|l| in_b.contains(l));
            let mut layers: Vec<u64> = ca.iter().copied().take_while(|l| Some(*l) != lca).collect();
            layers.extend(cb.iter().copied().take_while(|l| Some(*l) != lca));
            (self.store().view()?, layers, size_a, size_b)
        };
        let min_blocks = size_a.min(size_b) / BLOCK_SIZE_U64;
        let mut lbas = BTreeSet::new();
        for l in layers {
            scan_layer(&*view, l, 0, min_blocks, |lba, _| {
                lbas.insert(lba);
            })?;
        }
        let mut out: Vec<DiffRange> = Vec::new();
        for lba in lbas {
            let off = lba * BLOCK_SIZE_U64;
            match out.last_mut() {
                Some(r) if r.offset + r.length == off => r.length += BLOCK_SIZE_U64,
                _ => out.push(DiffRange {
                    offset: off,
                    length: BLOCK_SIZE_U64,
                }),
            }
        }
        let (lo, hi) = (size_a.min(size_b), size_a.max(size_b));
        if hi > lo {
            match out.last_mut() {
                Some(r) if r.offset + r.length == lo => r.length += hi - lo,
                _ => out.push(DiffRange {
                    offset: lo,
                    length: hi - lo,
                }),
            }
        }
        Ok(out)
    }
}
