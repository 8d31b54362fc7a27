//! `pool scrub`: reads every data block every layer owns and checks it against the CRC32C
//! stored with its mapping entry, naming the volumes and snapshots a bad block can affect.
//!
//! Consistency with concurrent I/O: each step holds a read pin (pins.rs) from looking up a
//! slice of a layer's entries to the end of reading their blocks, so no block freed in the
//! meantime can be reused under it. Steps are bounded, so frees are held back for at most
//! one step; nobody waits for a scrub.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::device::{AlignedBuf, ReadSeg, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::error::Result;
use crate::keys::{LayerId, MapValue};

use super::mapping::scan_layer;
use super::Pool;

/// Lbas looked up per step.
const STEP_LBAS: u64 = 1 << 16;
/// Largest single device read (blocks).
const MAX_RUN: u64 = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadBlock {
    pub layer: LayerId,
    pub lba: u64,
    pub pba: u64,
    pub detail: String,
    /// `vol` / `vol@snap` whose view includes this layer.
    pub affects: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScrubReport {
    pub layers: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub bad: Vec<BadBlock>,
}

impl ScrubReport {
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty()
    }
}

impl Pool {
    /// Verifies every stored data block; `progress(done_bytes, total_bytes)` is called as
    /// it goes.
    pub fn scrub(&self, progress: &dyn Fn(u64, u64)) -> Result<ScrubReport> {
        let (layers, affects, max_lba, total) = {
            let tree = self.tree_read();
            let mut affects: BTreeMap<LayerId, Vec<String>> = BTreeMap::new();
            let mut max_size = 0u64;
            for v in tree.volumes.values() {
                max_size = max_size.max(v.size);
                for l in tree.chain(v.head)? {
                    affects.entry(l).or_default().push(v.name.clone());
                }
            }
            for ((vid, name), s) in &tree.snapshots {
                max_size = max_size.max(s.size);
                let vname = tree
                    .volume(*vid)
                    .map(|v| v.name.clone())
                    .unwrap_or_default();
                for l in tree.chain(s.layer)? {
                    affects
                        .entry(l)
                        .or_default()
                        .push(format!("{vname}@{name}"));
                }
            }
            let mut layers: Vec<LayerId> = tree.layers.keys().copied().collect();
            layers.sort_unstable();
            let total: u64 = tree.layers.values().map(|l| l.data_blocks).sum();
            (
                layers,
                affects,
                max_size.div_ceil(BLOCK_SIZE_U64),
                total * BLOCK_SIZE_U64,
            )
        };
        let mut rep = ScrubReport {
            layers: layers.len() as u64,
            ..Default::default()
        };
        progress(0, total);
        for layer in layers {
            let mut from = 0;
            while from < max_lba {
                let _pin = self.pin_read();
                let mut entries: Vec<(u64, u64, u32)> = Vec::new();
                scan_layer(&**self.store(), layer, from, from + STEP_LBAS, |lba, mv| {
                    if let MapValue::Data { pba, crc } = mv {
                        entries.push((lba, pba, crc));
                    }
                })?;
                from += STEP_LBAS;
                self.scrub_entries(layer, &entries, &affects, &mut rep)?;
                progress(rep.bytes, total);
            }
        }
        Ok(rep)
    }

    fn scrub_entries(
        &self,
        layer: LayerId,
        entries: &[(u64, u64, u32)],
        affects: &BTreeMap<LayerId, Vec<String>>,
        rep: &mut ScrubReport,
    ) -> Result<()> {
        let mut i = 0;
        while i < entries.len() {
            // A run of entries whose blocks are consecutive on the device.
            let mut n = 1;
            while i + n < entries.len()
                && (n as u64) < MAX_RUN
                && entries[i + n].1 == entries[i].1 + n as u64
            {
                n += 1;
            }
            let run = &entries[i..i + n];
            let mut buf = AlignedBuf::zeroed(n * BLOCK_SIZE);
            let read = self.device().read(&mut [ReadSeg {
                offset: self.block_offset(run[0].1),
                buf: &mut buf,
            }]);
            for (k, &(lba, pba, crc)) in run.iter().enumerate() {
                let detail = match &read {
                    Err(e) => Some(format!("read error: {e}")),
                    Ok(()) => {
                        let got = crc32c::crc32c(&buf[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE]);
                        (got != crc).then(|| format!("stored crc32c {crc:08x}, data has {got:08x}"))
                    }
                };
                if let Some(detail) = detail {
                    log::error!("scrub: layer {layer} lba {lba} pba {pba}: {detail}");
                    rep.bad.push(BadBlock {
                        layer,
                        lba,
                        pba,
                        detail,
                        affects: affects.get(&layer).cloned().unwrap_or_default(),
                    });
                }
            }
            rep.blocks += n as u64;
            rep.bytes += n as u64 * BLOCK_SIZE_U64;
            i += n;
        }
        Ok(())
    }
}
