//! `pool upgrade`: converts a format-1 pool to format 2 in place, offline
//! (docs/format2.md §10).
//!
//! How: the format-1 pool is opened (its own reclaim settles it), its layer tree is cut
//! into lineages — each volume's chain of layers, and each chain of snapshots a rollback
//! left without a volume, with a clone lineage starting where its chain leaves a layer
//! another lineage already took — and every layer's entries are replayed, in layer-id
//! order (the order they were created in), through the format-2 engine: a layer's data
//! entries become writes of the same data blocks with the same checksums, its zero entries
//! unmaps, and a frozen layer a snapshot. The engine derives dead records, copy-ups,
//! retention and allocation regions exactly as if the history had happened on format 2.
//! Then every volume and snapshot is compared block by block (data block and checksum)
//! with format 1, `check` runs, and only then the superblock switches.
//!
//! Crash safety: format-1 keys (uppercase prefixes) are never changed by the replay, and the
//! format-2 keys (lowercase) are cleared before a replay starts, so an interrupted upgrade
//! is simply run again. The switch is one batch setting the superblock to version 2 (synced)
//! and then the device header; an upgrade run after a cut between the two finishes the
//! header, and one run after the switch only removes format-1 leftovers.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use serde::Serialize;

use crate::device::{DataDevice, BLOCK_SIZE_U64};
use crate::error::{Error, Result};
use crate::identity::{read_header, write_header};
use crate::keys::{self, LayerId, MapValue, SuperRecord, VolId};
use crate::meta::{try_scan, BatchOp, MetaStore, WriteBatch};
use crate::pool::Pool as Pool1;
use crate::pool2::catalog::{self, Catalog, Ids, SnapRec, VolRec};
use crate::pool2::FORMAT2;
use crate::v2::read::{read_page, Bases};
use crate::v2::sums::NoSumBlocks;
use crate::v2::{Edit, Epoch, LineageId, Meta2, PageNo, PAGE_BLOCKS};

/// Entries replayed per group commit.
const GROUP_ENTRIES: usize = 1024;
/// Format-2 key prefixes, cleared before a replay (format 1 uses uppercase ones and `S`).
const V2_PREFIXES: &[u8] = b"dgiklnpqrsvx";
/// Format-1 key prefixes removed after the switch (`S` is shared and stays).
const V1_PREFIXES: &[u8] = b"CLMNPV";

#[derive(Debug, Default, Clone, Serialize)]
pub struct UpgradeReport {
    /// What the pool was: 1 (converted now) or 2 (already; leftovers cleaned).
    pub from_format: u32,
    pub volumes: usize,
    pub snapshots: usize,
    pub lineages: usize,
    /// Format-1 map entries replayed.
    pub entries: u64,
    /// Volume and snapshot blocks compared between the two formats.
    pub blocks_verified: u64,
}

/// One lineage of the plan: layers oldest first; the last is the volume's head (unfrozen)
/// unless the lineage is closed (a chain of snapshots a rollback left behind).
struct LinPlan {
    layers: Vec<LayerId>,
    base: Option<LayerId>,
    volume: Option<VolId>,
}

fn delete_prefixes(store: &dyn MetaStore, prefixes: &[u8]) -> Result<()> {
    let mut b = WriteBatch::new();
    for &p in prefixes {
        b.delete_range(vec![p], vec![p + 1]);
    }
    store.commit(b, true)?;
    Ok(())
}

/// Converts the pool in `store` + `dev` to format 2 (or finishes an interrupted
/// conversion). The caller holds the pool lock; no daemon runs.
pub fn upgrade(
    store: Arc<dyn MetaStore>,
    dev: Arc<dyn DataDevice>,
    progress: &dyn Fn(&str),
) -> Result<UpgradeReport> {
    let key = keys::super_key();
    let raw = store
        .get(&key)?
        .ok_or_else(|| Error::not_found("pool", "no pool superblock in the metadata store"))?;
    let mut sup: SuperRecord = keys::decode_record("superblock", &key, &raw)?;
    if sup.format_version == FORMAT2 {
        let mut h = read_header(&*dev)?;
        if h.format_version != FORMAT2 {
            progress("finishing an interrupted switch: device header");
            h.format_version = FORMAT2;
            write_header(&*dev, &h)?;
        }
        delete_prefixes(&*store, V1_PREFIXES)?;
        return Ok(UpgradeReport {
            from_format: FORMAT2,
            ..Default::default()
        });
    }
    if sup.format_version != 1 {
        return Err(Error::invalid(
            "pool",
            format!("metadata format {} cannot be upgraded", sup.format_version),
        ));
    }
    progress("clearing any earlier partial conversion");
    delete_prefixes(&*store, V2_PREFIXES)?;
    progress("settling the format-1 pool (reclaim)");
    let old = Pool1::open(Arc::clone(&store), Arc::clone(&dev))?;
    old.reclaim_all()?;
    old.sync()?;
    let mut report = UpgradeReport {
        from_format: 1,
        ..Default::default()
    };
    convert(&old, &store, &mut report, progress)?;
    progress("verifying every volume and snapshot against format 1");
    verify(&old, &store, &mut report)?;
    let chk = crate::v2::check::check(&*store.view()?, sup.data_blocks, &NoSumBlocks)?;
    if !chk.is_clean() {
        return Err(Error::Corrupt(format!(
            "converted metadata fails check (format 1 is unchanged; nothing switched): {:?}",
            chk.errors
        )));
    }
    drop(old);
    progress("switching the pool to format 2");
    crate::failpoint!("upgrade.before_switch");
    store.sync()?;
    sup.format_version = FORMAT2;
    let mut b = WriteBatch::new();
    b.put(keys::super_key(), keys::encode_record(&sup));
    store.commit(b, true)?;
    crate::failpoint!("upgrade.before_header");
    let mut h = read_header(&*dev)?;
    h.format_version = FORMAT2;
    write_header(&*dev, &h)?;
    crate::failpoint!("upgrade.before_cleanup");
    delete_prefixes(&*store, V1_PREFIXES)?;
    Ok(report)
}

/// Cuts the format-1 layer tree into lineages.
fn plan(tree: &crate::pool::Tree) -> Result<Vec<LinPlan>> {
    let mut claimed: HashMap<LayerId, usize> = HashMap::new();
    let mut plans: Vec<LinPlan> = Vec::new();
    let mut tips: Vec<(LayerId, Option<VolId>)> = tree
        .volumes
        .values()
        .map(|v| (v.head, Some(v.id)))
        .collect();
    let mut leaves: Vec<LayerId> = tree
        .layers
        .iter()
        .filter(|(_, l)| l.rec.frozen && l.children.is_empty())
        .map(|(id, _)| *id)
        .collect();
    leaves.sort_unstable();
    tips.extend(leaves.into_iter().map(|l| (l, None)));
    for (tip, volume) in tips {
        let mut chain = tree.chain(tip)?;
        chain.reverse();
        let first_new = chain.iter().position(|l| !claimed.contains_key(l));
        let Some(i) = first_new else {
            return Err(Error::Corrupt(format!(
                "layer {tip} is on two volumes' paths"
            )));
        };
        let idx = plans.len();
        for l in &chain[i..] {
            claimed.insert(*l, idx);
        }
        plans.push(LinPlan {
            layers: chain[i..].to_vec(),
            base: i.checked_sub(1).map(|j| chain[j]),
            volume,
        });
    }
    Ok(plans)
}

/// Replays the format-1 history into format-2 metadata (engine + catalog records).
fn convert(
    old: &Pool1,
    store: &Arc<dyn MetaStore>,
    report: &mut UpgradeReport,
    progress: &dyn Fn(&str),
) -> Result<()> {
    let tree = old.tree_read();
    let plans = plan(&tree)?;
    report.lineages = plans.len();
    let mut meta = Meta2::open(Arc::clone(store), old.data_blocks(), Arc::new(NoSumBlocks))?;
    // Layer -> (plan index, position in the plan); layer -> epoch once frozen.
    let mut where_: HashMap<LayerId, usize> = HashMap::new();
    for (i, p) in plans.iter().enumerate() {
        for l in &p.layers {
            where_.insert(*l, i);
        }
    }
    let mut order: Vec<LayerId> = where_.keys().copied().collect();
    order.sort_unstable();
    let mut lineage_of: Vec<Option<LineageId>> = vec![None; plans.len()];
    let mut epoch_of: HashMap<LayerId, Epoch> = HashMap::new();
    let mut written_at: HashMap<LayerId, u64> = HashMap::new();
    let mut max_lba = 0u64;
    let snapshot_layers: HashMap<LayerId, usize> =
        tree.snapshots.values().fold(HashMap::new(), |mut m, s| {
            *m.entry(s.layer).or_default() += 1;
            m
        });
    for (n, layer) in order.iter().enumerate() {
        let pi = where_[layer];
        let l = match lineage_of[pi] {
            Some(l) => l,
            None => {
                let base = match plans[pi].base {
                    Some(b) => {
                        let bl = where_.get(&b).and_then(|i| lineage_of[*i]).ok_or_else(|| {
                            Error::Corrupt(format!("base layer {b} not replayed"))
                        })?;
                        let be = *epoch_of
                            .get(&b)
                            .ok_or_else(|| Error::Corrupt(format!("base layer {b} not frozen")))?;
                        Some((bl, be))
                    }
                    None => None,
                };
                let mut g = meta.begin()?;
                let l = meta.create_lineage(&mut g, base)?;
                meta.commit(g)?;
                lineage_of[pi] = Some(l);
                l
            }
        };
        report.entries += replay_layer(old, &mut meta, l, *layer, &mut max_lba)?;
        if n == order.len() / 2 {
            crate::failpoint!("upgrade.mid_replay");
        }
        let info = tree.layer(*layer)?;
        if info.rec.frozen {
            let snaps = snapshot_layers.get(layer).copied().unwrap_or(0);
            if snaps > 1 {
                return Err(Error::Corrupt(format!(
                    "layer {layer} holds {snaps} snapshots"
                )));
            }
            written_at.insert(*layer, meta.lineage(l)?.born_now);
            let mut g = meta.begin()?;
            let e = meta.snapshot(&mut g, l)?;
            meta.commit(g)?;
            epoch_of.insert(*layer, e);
        }
        if n % 64 == 0 {
            progress(&format!("replayed {} of {} layers", n + 1, order.len()));
        }
    }
    // Frozen layers without a snapshot (branch points) were kept by a placeholder
    // snapshot while the history replayed; their clones hold them now.
    let mut g = meta.begin()?;
    for layer in &order {
        if epoch_of.contains_key(layer) && !snapshot_layers.contains_key(layer) {
            let l = replayed(&where_, &lineage_of, *layer)?;
            meta.release_snapshot(&mut g, l, epoch_of[layer])?;
        }
    }
    // Lineages without a volume are closed; volume tails beyond the size are unmapped.
    let mut cat = Catalog {
        ids: Ids {
            volume: tree.next_id,
            snapshot: tree.next_id,
        },
        ..Catalog::default()
    };
    for (pi, p) in plans.iter().enumerate() {
        let l = lineage_of[pi]
            .ok_or_else(|| Error::Corrupt(format!("lineage plan {pi} has no layer")))?;
        match p.volume {
            None => meta.close(&mut g, l, false)?,
            Some(vid) => {
                let v = tree.volume(vid)?;
                // Entries beyond the size (a shrink cut short) must not show after a grow.
                let from = v.size / BLOCK_SIZE_U64;
                if from <= max_lba {
                    let e = Edit {
                        lineage: l,
                        lba: from,
                        len: max_lba + 1 - from,
                        map: None,
                    };
                    meta.apply(&mut g, &e)?;
                }
                let rec = VolRec {
                    id: vid,
                    name: v.name.clone(),
                    size: v.size,
                    lineage: l,
                    created: v.created,
                    incomplete: v.incomplete.clone(),
                    quota: None,
                };
                g.extra(BatchOp::Put(
                    catalog::volume_key(vid),
                    catalog::encode(&rec),
                ));
                g.extra(BatchOp::Put(
                    catalog::name_key(&v.name),
                    vid.to_be_bytes().to_vec(),
                ));
                cat.volumes.insert(vid, rec);
            }
        }
    }
    for ((vid, name), s) in &tree.snapshots {
        let l = replayed(&where_, &lineage_of, s.layer)?;
        let epoch = *epoch_of.get(&s.layer).ok_or_else(|| {
            Error::Corrupt(format!(
                "snapshot {name} names layer {}, which is not frozen",
                s.layer
            ))
        })?;
        let rec = SnapRec {
            id: s.layer,
            vol: *vid,
            name: name.clone(),
            lineage: l,
            epoch,
            size: s.size,
            created: s.created,
            written: written_at
                .get(&s.layer)
                .copied()
                .unwrap_or(0)
                .saturating_mul(BLOCK_SIZE_U64),
            protected: false,
        };
        g.extra(BatchOp::Put(
            catalog::snapshot_key(*vid, name),
            catalog::encode(&rec),
        ));
        cat.snapshots.insert((*vid, name.clone()), rec);
    }
    g.extra(BatchOp::Put(catalog::ids_key(), catalog::encode(&cat.ids)));
    g.set_durable();
    meta.commit(g)?;
    report.volumes = cat.volumes.len();
    report.snapshots = cat.snapshots.len();
    progress("reclaiming what only the conversion's placeholders kept");
    loop {
        let mut g = meta.begin()?;
        let more = meta.reclaim_step(&mut g, 256)?;
        meta.commit(g)?;
        if !more {
            break;
        }
    }
    store.sync()?;
    Ok(())
}

/// The lineage a layer was replayed into; a format-1 tree that names a layer on no chain is
/// corrupt input, not a reason to panic.
fn replayed(
    where_: &HashMap<LayerId, usize>,
    lineage_of: &[Option<LineageId>],
    layer: LayerId,
) -> Result<LineageId> {
    where_
        .get(&layer)
        .and_then(|i| lineage_of[*i])
        .ok_or_else(|| {
            Error::Corrupt(format!(
                "format-1 layer {layer} is on no volume's or snapshot's chain"
            ))
        })
}

/// Replays one layer's entries as edits of lineage `l`; returns how many.
fn replay_layer(
    old: &Pool1,
    meta: &mut Meta2,
    l: LineageId,
    layer: LayerId,
    max_lba: &mut u64,
) -> Result<u64> {
    // At most GROUP_ENTRIES entries in memory at a time, whatever the layer holds.
    let mut n = 0u64;
    let mut from = 0u64;
    loop {
        let mut chunk: Vec<(u64, MapValue)> = Vec::with_capacity(GROUP_ENTRIES);
        let (a, b) = keys::map_range(layer, from, u64::MAX);
        try_scan(&**old.store(), &a, &b, |k, v| {
            let (_, lba) = keys::decode_map_key(k)?;
            chunk.push((lba, MapValue::decode(v)?));
            Ok::<_, Error>(if chunk.len() >= GROUP_ENTRIES {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
        let Some(&(last, _)) = chunk.last() else {
            break;
        };
        *max_lba = (*max_lba).max(last);
        n += chunk.len() as u64;
        let mut g = meta.begin()?;
        let mut edits: Vec<Edit> = Vec::new();
        for &(lba, v) in &chunk {
            let extend = match (edits.last_mut(), v) {
                (Some(e), MapValue::Data { pba, crc }) if e.lba + e.len == lba => {
                    match &mut e.map {
                        Some((p, crcs)) if *p + e.len == pba => {
                            crcs.push(crc);
                            e.len += 1;
                            true
                        }
                        _ => false,
                    }
                }
                (Some(e), MapValue::Zero) if e.lba + e.len == lba && e.map.is_none() => {
                    e.len += 1;
                    true
                }
                _ => false,
            };
            if !extend {
                edits.push(Edit {
                    lineage: l,
                    lba,
                    len: 1,
                    map: match v {
                        MapValue::Data { pba, crc } => Some((pba, vec![crc])),
                        MapValue::Zero => None,
                    },
                });
            }
        }
        for e in &edits {
            meta.apply(&mut g, e)?;
        }
        meta.commit(g)?;
        match last.checked_add(1) {
            Some(next) if chunk.len() >= GROUP_ENTRIES => from = next,
            _ => break,
        }
    }
    Ok(n)
}

struct PlainBases(BTreeMap<LineageId, Option<(LineageId, Epoch)>>);
impl Bases for PlainBases {
    fn base(&self, l: LineageId) -> Result<Option<(LineageId, Epoch)>> {
        self.0
            .get(&l)
            .copied()
            .ok_or_else(|| Error::Corrupt(format!("lineage {l} has no record")))
    }
}

/// Every volume and snapshot reads the same data blocks with the same checksums in both
/// formats (no data is read: the mappings are compared).
fn verify(old: &Pool1, store: &Arc<dyn MetaStore>, report: &mut UpgradeReport) -> Result<()> {
    let view = store.view()?;
    let lineages = crate::v2::engine::load_lineages(&*view)?;
    let cat = Catalog::load(&*view, &lineages)?;
    let bases = PlainBases(lineages.iter().map(|(l, x)| (*l, x.base)).collect());
    let tree = old.tree_read();
    let mut targets: Vec<(String, LayerId, LineageId, Option<Epoch>, u64)> = Vec::new();
    for v in tree.volumes.values() {
        let l = cat.volume(v.id)?.lineage;
        targets.push((v.name.clone(), v.head, l, None, v.size));
    }
    for ((vid, name), s) in &tree.snapshots {
        let r = cat.snapshot(*vid, name)?;
        targets.push((
            format!("{}@{name}", tree.volume(*vid)?.name),
            s.layer,
            r.lineage,
            Some(r.epoch),
            s.size,
        ));
    }
    for (name, layer, l, at, size) in targets {
        let chain = tree.chain(layer)?;
        let blocks = size / BLOCK_SIZE_U64;
        for p in 0..blocks.div_ceil(PAGE_BLOCKS) {
            let (b0, b1) = (p * PAGE_BLOCKS, ((p + 1) * PAGE_BLOCKS).min(blocks));
            let want = crate::pool::mapping::resolve(&**old.store(), &chain, b0, b1)?;
            let got = read_page(&*view, &bases, &NoSumBlocks, l, at, PageNo(p))?;
            for lba in b0..b1 {
                let w = match want.get(&lba) {
                    Some(MapValue::Data { pba, crc }) => Some((*pba, *crc)),
                    _ => None,
                };
                let g = got[(lba - b0) as usize].map(|b| (b.pba, b.crc));
                if w != g {
                    return Err(Error::Corrupt(format!(
                        "conversion differs at {name} block {lba}: format 1 {w:?}, format 2 {g:?} \
                         (format 1 is unchanged; nothing switched)"
                    )));
                }
            }
            report.blocks_verified += b1 - b0;
        }
    }
    Ok(())
}
