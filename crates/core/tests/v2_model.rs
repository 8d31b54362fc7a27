//! Model test of the format-2 metadata engine (docs/format2.md §11 step 2): random
//! histories of writes, trims, snapshots, snapshot deletes in any order, clones of old
//! snapshots, rollbacks, volume deletes, reclaim steps, grouped commits and reopens, checked
//! after every step against a model that keeps a full copy of every volume and snapshot:
//! * every volume and every snapshot reads exactly as the model says;
//! * every block the engine frees is referenced by nothing the model still has, and is
//!   freed once (the region bitmap refuses a second free);
//! * `check` is clean (it also compares every read checkpoint with the dead records);
//! * once the reclaim jobs drain, the allocated blocks are exactly the referenced ones.
//!
//! Histories also consolidate checksums (format2.md §9b): live pieces, some of them no
//! longer live as offered, move their CRCs into checksum blocks; a checksum block counts
//! as referenced while the model references any block whose CRC it holds, so the checks
//! above also say that it is freed exactly when its last such block goes, and never before.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use snapblk_core::v2::check::check;
use snapblk_core::v2::engine::Candidate;
use snapblk_core::v2::page::Page;
use snapblk_core::v2::piece::{Sums, SUM_SLOTS};
use snapblk_core::v2::read::Block;
use snapblk_core::v2::sums::{self, MemSumBlocks};
use snapblk_core::v2::{keys, Edit, Epoch, LineageId, Meta2, PageNo, PAGE_BLOCKS};
use snapblk_core::{MemStore, MetaStore};

const PAGES: u64 = 3;
const BLOCKS: u64 = PAGES * PAGE_BLOCKS;
const DATA_BLOCKS: u64 = 1 << 16;

type Content = BTreeMap<u64, Block>;

#[derive(Clone)]
struct Snap {
    lineage: LineageId,
    epoch: Epoch,
    content: Content,
}

struct Vol {
    lineage: LineageId,
    content: Content,
    snaps: Vec<Snap>,
}

/// What the model says a lineage keeps: the content of each retained epoch, with its
/// snapshot and hold counts (a clone or rollback holds its base epoch until it is destroyed).
struct Lin {
    base: Option<(LineageId, Epoch)>,
    open: bool,
    retained: BTreeMap<Epoch, (u32, u32, Content)>,
}

struct World {
    store: Arc<MemStore>,
    meta: Meta2,
    vols: Vec<Vol>,
    lins: BTreeMap<LineageId, Lin>,
    free: BTreeSet<u64>,
    next_crc: u32,
    /// Dead records between read checkpoints (0: none), so histories exercise both.
    checkpoint_every: u64,
    /// The data device's checksum blocks, and for each one still allocated the data
    /// blocks whose CRCs it holds.
    sums: Arc<MemSumBlocks>,
    sum_blocks: BTreeMap<u64, BTreeSet<u64>>,
}

#[derive(Debug, Clone)]
enum Op {
    NewVolume,
    Write {
        vol: usize,
        lba: u64,
        len: u64,
        scatter: bool,
    },
    Trim {
        vol: usize,
        lba: u64,
        len: u64,
    },
    Grouped {
        vol: usize,
        a: u64,
        b: u64,
    },
    Snapshot {
        vol: usize,
    },
    DeleteSnapshot {
        vol: usize,
        idx: usize,
    },
    Clone {
        vol: usize,
        idx: usize,
    },
    Rollback {
        vol: usize,
        idx: usize,
    },
    DeleteVolume {
        vol: usize,
        one_by_one: bool,
    },
    Reclaim {
        steps: usize,
    },
    Reopen,
    /// Consolidates the live pieces of a volume picked by `pick`'s bits, plus (if
    /// `stale`) one that is no longer live as offered.
    Consolidate {
        vol: usize,
        pick: u64,
        stale: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::NewVolume),
        10 => (any::<usize>(), 0..BLOCKS, 1..80u64, any::<bool>())
            .prop_map(|(vol, lba, len, scatter)| Op::Write { vol, lba, len, scatter }),
        3 => (any::<usize>(), 0..BLOCKS, 1..150u64).prop_map(|(vol, lba, len)| Op::Trim { vol, lba, len }),
        2 => (any::<usize>(), 0..BLOCKS, 0..BLOCKS).prop_map(|(vol, a, b)| Op::Grouped { vol, a, b }),
        5 => any::<usize>().prop_map(|vol| Op::Snapshot { vol }),
        4 => (any::<usize>(), any::<usize>()).prop_map(|(vol, idx)| Op::DeleteSnapshot { vol, idx }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(vol, idx)| Op::Clone { vol, idx }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(vol, idx)| Op::Rollback { vol, idx }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(vol, one_by_one)| Op::DeleteVolume { vol, one_by_one }),
        3 => (1..6usize).prop_map(|steps| Op::Reclaim { steps }),
        1 => Just(Op::Reopen),
        3 => (any::<usize>(), any::<u64>(), any::<bool>())
            .prop_map(|(vol, pick, stale)| Op::Consolidate { vol, pick, stale }),
    ]
}

impl World {
    fn new(checkpoint_every: u64) -> World {
        let store = Arc::new(MemStore::new());
        Meta2::format(&*store).unwrap();
        let sums = Arc::new(MemSumBlocks::default());
        let mut meta = Meta2::open(
            store.clone() as Arc<dyn MetaStore>,
            DATA_BLOCKS,
            sums.clone(),
        )
        .unwrap();
        meta.set_checkpoint_every(checkpoint_every);
        World {
            checkpoint_every,
            sums,
            sum_blocks: BTreeMap::new(),
            store,
            meta,
            vols: Vec::new(),
            lins: BTreeMap::new(),
            free: (0..DATA_BLOCKS).collect(),
            next_crc: 1,
        }
    }

    /// A world with one volume written whole, sequentially.
    fn filled(checkpoint_every: u64) -> World {
        let mut w = World::new(checkpoint_every);
        w.run(&Op::NewVolume);
        w.run(&Op::Write {
            vol: 0,
            lba: 0,
            len: BLOCKS,
            scatter: false,
        });
        w
    }

    fn referenced(&self) -> BTreeSet<u64> {
        let mut r = BTreeSet::new();
        for v in &self.vols {
            r.extend(v.content.values().map(|b| b.pba));
        }
        for lin in self.lins.values() {
            for (_, _, c) in lin.retained.values() {
                r.extend(c.values().map(|b| b.pba));
            }
        }
        let sums: Vec<u64> = self
            .sum_blocks
            .iter()
            .filter(|(_, data)| data.iter().any(|b| r.contains(b)))
            .map(|(at, _)| *at)
            .collect();
        r.extend(sums);
        r
    }

    fn new_lin(&mut self, l: LineageId, base: Option<(LineageId, Epoch)>) {
        if let Some((lb, eb)) = base {
            self.lins
                .get_mut(&lb)
                .unwrap()
                .retained
                .get_mut(&eb)
                .unwrap()
                .1 += 1;
        }
        self.lins.insert(
            l,
            Lin {
                base,
                open: true,
                retained: BTreeMap::new(),
            },
        );
    }

    /// Drops epoch `e`'s snapshot (or hold) count; destroys closed lineages nothing keeps.
    fn release(&mut self, l: LineageId, e: Epoch, hold: bool) {
        let lin = self.lins.get_mut(&l).unwrap();
        let c = lin.retained.get_mut(&e).unwrap();
        if hold {
            c.1 -= 1
        } else {
            c.0 -= 1
        }
        if c.0 + c.1 == 0 {
            lin.retained.remove(&e);
        }
        self.maybe_destroy(l);
    }

    fn maybe_destroy(&mut self, l: LineageId) {
        let lin = &self.lins[&l];
        if !lin.open && lin.retained.is_empty() {
            let base = lin.base;
            self.lins.remove(&l);
            if let Some((lb, eb)) = base {
                self.release(lb, eb, true);
            }
        }
    }

    fn close_lin(&mut self, l: LineageId, drop_snapshots: bool) {
        let lin = self.lins.get_mut(&l).unwrap();
        lin.open = false;
        if drop_snapshots {
            for c in lin.retained.values_mut() {
                c.0 = 0;
            }
            lin.retained.retain(|_, c| c.1 > 0);
        }
        self.maybe_destroy(l);
    }

    /// Commits `g`, checking that what it freed is referenced by nothing.
    fn commit(&mut self, g: snapblk_core::v2::Group) {
        let done = self.meta.commit(g).unwrap();
        // Freed data blocks leave the checksum blocks' sets first (they may be reused).
        for (pba, len) in &done.freed {
            for data in self.sum_blocks.values_mut() {
                data.retain(|b| !(*pba..*pba + *len).contains(b));
            }
        }
        let referenced = self.referenced();
        for (pba, len) in done.freed {
            for b in pba..pba + len {
                assert!(
                    !referenced.contains(&b),
                    "block {b} freed while the model references it"
                );
                assert!(self.free.insert(b), "block {b} freed twice");
                self.sum_blocks.remove(&b);
            }
        }
    }

    /// Moves the CRCs of some live pieces of `vol` into a new checksum block.
    fn consolidate(&mut self, vol: usize, pick: u64, stale: bool) {
        let l = self.vols[vol].lineage;
        let mut cands = Vec::new();
        let mut slot = 0usize;
        let mut bit = 0;
        for p in 0..PAGES {
            let Some(v) = self.store.get(&keys::page(l, PageNo(p))).unwrap() else {
                continue;
            };
            for x in Page::decode(&v).unwrap().pieces {
                bit += 1;
                if !x.owned() || x.sums.inline().is_none() || pick & (1 << (bit % 64)) == 0 {
                    continue;
                }
                // Sometimes only part of the piece.
                let x = if pick & 1 != 0 && x.len > 2 {
                    x.slice(x.start() + 1, x.end())
                } else {
                    x
                };
                if slot + usize::from(x.len) > SUM_SLOTS {
                    break;
                }
                cands.push(Candidate {
                    lineage: l,
                    page: PageNo(p),
                    slot: slot as u16,
                    piece: x.clone(),
                });
                slot += usize::from(x.len);
            }
        }
        let live: u64 = cands.iter().map(|c| u64::from(c.piece.len)).sum();
        let data: BTreeSet<u64> = cands
            .iter()
            .flat_map(|c| c.piece.pba..c.piece.pba + u64::from(c.piece.len))
            .collect();
        if stale && slot < SUM_SLOTS {
            // Blocks no piece holds (free now): the engine must skip it.
            let pba = *self.free.iter().next().unwrap();
            cands.push(Candidate {
                lineage: l,
                page: PageNo(0),
                slot: slot as u16,
                piece: snapblk_core::v2::Piece {
                    off: 0,
                    len: 1,
                    pba,
                    birth: Epoch(1),
                    flags: snapblk_core::v2::PieceFlags::OWN,
                    sums: Sums::Inline(smallvec_one(7)),
                },
            });
        }
        let mut block = [0u32; SUM_SLOTS];
        for c in &cands {
            let s = usize::from(c.slot);
            block[s..s + usize::from(c.piece.len)].copy_from_slice(c.piece.sums.inline().unwrap());
        }
        let at = *self.free.iter().next_back().unwrap();
        self.sums.write(at, sums::encode(&block));
        let mut g = self.meta.begin().unwrap();
        let n = self.meta.consolidate(&mut g, at, &block, &cands).unwrap();
        self.commit(g);
        assert_eq!(n, live, "blocks consolidated");
        if n > 0 {
            self.free.remove(&at);
            self.sum_blocks.insert(at, data);
        }
    }

    /// Allocates `len` blocks: one run, or scattered single blocks.
    fn alloc(&mut self, len: u64, scatter: bool) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let picks: Vec<u64> = if scatter {
            self.free
                .iter()
                .step_by(2)
                .take(len as usize)
                .copied()
                .collect()
        } else {
            let start = self
                .free
                .iter()
                .copied()
                .find(|s| (*s..*s + len).all(|b| self.free.contains(&b)))
                .expect("space");
            (start..start + len).collect()
        };
        for b in picks {
            self.free.remove(&b);
            match runs.last_mut() {
                Some((s, l)) if *s + *l == b => *l += 1,
                _ => runs.push((b, 1)),
            }
        }
        runs
    }

    fn write_edits(&mut self, vol: usize, lba: u64, len: u64, scatter: bool) -> Vec<Edit> {
        let len = len.min(BLOCKS - lba);
        let l = self.vols[vol].lineage;
        let mut edits = Vec::new();
        let mut at = lba;
        for (pba, n) in self.alloc(len, scatter) {
            let crcs: Vec<u32> = (0..n).map(|i| self.next_crc + i as u32).collect();
            self.next_crc += n as u32;
            for i in 0..n {
                self.vols[vol].content.insert(
                    at + i,
                    Block {
                        pba: pba + i,
                        crc: crcs[i as usize],
                    },
                );
            }
            edits.push(Edit {
                lineage: l,
                lba: at,
                len: n,
                map: Some((pba, crcs)),
            });
            at += n;
        }
        edits
    }

    fn run(&mut self, op: &Op) {
        let n = self.vols.len();
        match *op {
            Op::NewVolume => {
                let mut g = self.meta.begin().unwrap();
                let l = self.meta.create_lineage(&mut g, None).unwrap();
                self.new_lin(l, None);
                self.commit(g);
                self.vols.push(Vol {
                    lineage: l,
                    content: Content::new(),
                    snaps: Vec::new(),
                });
            }
            _ if n == 0 => {}
            Op::Write {
                vol,
                lba,
                len,
                scatter,
            } => {
                let edits = self.write_edits(vol % n, lba, len, scatter);
                let mut g = self.meta.begin().unwrap();
                for e in &edits {
                    self.meta.apply(&mut g, e).unwrap();
                }
                self.commit(g);
            }
            Op::Grouped { vol, a, b } => {
                // Several requests (to this and another volume) in one group commit.
                let mut edits = self.write_edits(vol % n, a, 5, false);
                edits.extend(self.write_edits((vol + 1) % n, b, 70, true));
                let v = vol % n;
                let t = (b / 2, 20.min(BLOCKS - b / 2));
                for i in t.0..t.0 + t.1 {
                    self.vols[v].content.remove(&i);
                }
                edits.push(Edit {
                    lineage: self.vols[v].lineage,
                    lba: t.0,
                    len: t.1,
                    map: None,
                });
                edits.extend(self.write_edits(v, a, 3, false));
                let mut g = self.meta.begin().unwrap();
                for e in &edits {
                    self.meta.apply(&mut g, e).unwrap();
                }
                self.commit(g);
            }
            Op::Trim { vol, lba, len } => {
                let v = &mut self.vols[vol % n];
                let len = len.min(BLOCKS - lba);
                for i in lba..lba + len {
                    v.content.remove(&i);
                }
                let e = Edit {
                    lineage: v.lineage,
                    lba,
                    len,
                    map: None,
                };
                let mut g = self.meta.begin().unwrap();
                self.meta.apply(&mut g, &e).unwrap();
                self.commit(g);
            }
            Op::Snapshot { vol } => {
                let v = vol % n;
                let mut g = self.meta.begin().unwrap();
                let e = self.meta.snapshot(&mut g, self.vols[v].lineage).unwrap();
                let content = self.vols[v].content.clone();
                self.lins
                    .get_mut(&self.vols[v].lineage)
                    .unwrap()
                    .retained
                    .insert(e, (1, 0, content));
                self.commit(g);
                let s = Snap {
                    lineage: self.vols[v].lineage,
                    epoch: e,
                    content: self.vols[v].content.clone(),
                };
                self.vols[v].snaps.push(s);
            }
            Op::DeleteSnapshot { vol, idx } => {
                let v = &mut self.vols[vol % n];
                if v.snaps.is_empty() {
                    return;
                }
                let s = v.snaps.remove(idx % v.snaps.len());
                let mut g = self.meta.begin().unwrap();
                self.meta
                    .release_snapshot(&mut g, s.lineage, s.epoch)
                    .unwrap();
                self.release(s.lineage, s.epoch, false);
                self.commit(g);
            }
            Op::Clone { vol, idx } => {
                let v = &self.vols[vol % n];
                if v.snaps.is_empty() {
                    return;
                }
                let s = v.snaps[idx % v.snaps.len()].clone();
                let mut g = self.meta.begin().unwrap();
                let l = self
                    .meta
                    .create_lineage(&mut g, Some((s.lineage, s.epoch)))
                    .unwrap();
                self.new_lin(l, Some((s.lineage, s.epoch)));
                self.commit(g);
                self.vols.push(Vol {
                    lineage: l,
                    content: s.content,
                    snaps: Vec::new(),
                });
            }
            Op::Rollback { vol, idx } => {
                let v = vol % n;
                if self.vols[v].snaps.is_empty() {
                    return;
                }
                let s = self.vols[v].snaps[idx % self.vols[v].snaps.len()].clone();
                let old = self.vols[v].lineage;
                let mut g = self.meta.begin().unwrap();
                let l = self
                    .meta
                    .create_lineage(&mut g, Some((s.lineage, s.epoch)))
                    .unwrap();
                self.meta.close(&mut g, old, false).unwrap();
                self.new_lin(l, Some((s.lineage, s.epoch)));
                self.close_lin(old, false);
                self.vols[v].lineage = l;
                self.vols[v].content = s.content;
                self.commit(g);
            }
            Op::DeleteVolume { vol, one_by_one } => {
                let v = self.vols.remove(vol % n);
                let mut g = self.meta.begin().unwrap();
                for s in &v.snaps {
                    if one_by_one || s.lineage != v.lineage {
                        self.meta
                            .release_snapshot(&mut g, s.lineage, s.epoch)
                            .unwrap();
                        self.release(s.lineage, s.epoch, false);
                    }
                }
                self.meta.close(&mut g, v.lineage, !one_by_one).unwrap();
                self.close_lin(v.lineage, !one_by_one);
                self.commit(g);
            }
            Op::Reclaim { steps } => {
                for _ in 0..steps {
                    self.reclaim_step();
                }
            }
            Op::Reopen => self.reopen(),
            Op::Consolidate { vol, pick, stale } => self.consolidate(vol % n, pick, stale),
        }
    }

    fn reclaim_step(&mut self) -> bool {
        let mut g = self.meta.begin().unwrap();
        let more = self.meta.reclaim_step(&mut g, 3).unwrap();
        self.commit(g);
        more
    }

    fn reopen(&mut self) {
        self.meta = Meta2::open(
            self.store.clone() as Arc<dyn MetaStore>,
            DATA_BLOCKS,
            self.sums.clone(),
        )
        .unwrap();
        self.meta.set_checkpoint_every(self.checkpoint_every);
    }

    fn verify(&self) {
        let read = |l: LineageId, at: Option<Epoch>| -> Content {
            let mut c = Content::new();
            for p in 0..PAGES {
                let page = self.meta.read(l, at, PageNo(p)).unwrap();
                for (i, b) in page.iter().enumerate() {
                    if let Some(b) = b {
                        c.insert(p * PAGE_BLOCKS + i as u64, *b);
                    }
                }
            }
            c
        };
        for (i, v) in self.vols.iter().enumerate() {
            assert_eq!(
                read(v.lineage, None),
                v.content,
                "volume {i} (lineage {})",
                v.lineage
            );
            for s in &v.snaps {
                assert_eq!(
                    read(s.lineage, Some(s.epoch)),
                    s.content,
                    "snapshot of volume {i} at lineage {} epoch {}",
                    s.lineage,
                    s.epoch
                );
            }
        }
        let report = check(&*self.store.view().unwrap(), DATA_BLOCKS, &*self.sums).unwrap();
        assert!(report.is_clean(), "check: {:#?}", report.errors);
    }

    /// Runs every job to its end; then allocated = referenced exactly.
    fn drain(&mut self) {
        while self.reclaim_step() {}
        self.reclaim_step();
        assert_eq!(self.meta.pending_jobs(), 0);
        let allocated: BTreeSet<u64> = self.meta.regions().iter_set().collect();
        let referenced = self.referenced();
        let leaked: Vec<_> = allocated.difference(&referenced).take(10).collect();
        assert!(leaked.is_empty(), "leaked blocks {leaked:?}");
        assert_eq!(allocated, referenced);
    }
}

fn run_history(ops: &[Op], checkpoint_every: u64) {
    let mut w = World::new(checkpoint_every);
    w.run(&Op::NewVolume);
    for op in ops {
        w.run(op);
        w.verify();
    }
    w.drain();
    w.verify();
    // Deleting everything leaves nothing behind.
    while !w.vols.is_empty() {
        w.run(&Op::DeleteVolume {
            vol: 0,
            one_by_one: false,
        });
    }
    w.drain();
    w.verify();
    let r = check(&*w.store.view().unwrap(), DATA_BLOCKS, &*w.sums).unwrap();
    assert_eq!(
        (
            r.lineages,
            r.pages,
            r.dead_records,
            r.index_entries,
            r.checkpoints
        ),
        (0, 0, 0, 0, 0),
        "{r:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]
    #[test]
    fn random_histories(
        ops in prop::collection::vec(op(), 1..240),
        k in prop_oneof![Just(0u64), Just(1), Just(2), Just(16)],
    ) {
        run_history(&ops, k);
    }
}

/// Checksum blocks across a life: a fully written volume's CRCs consolidated, then
/// snapshots, partial overwrites, a clone of the oldest snapshot (which copies references
/// up), deletes and reopen; every step reads right and `check` agrees with the counts, and
/// the checksum blocks are freed exactly when the last block they cover goes.
#[test]
fn checksum_blocks_follow_their_data() {
    let mut w = World::filled(2);
    w.run(&Op::Consolidate {
        vol: 0,
        pick: u64::MAX - 1,
        stale: true,
    });
    assert_eq!(w.sum_blocks.len(), 1, "one checksum block for the volume");
    w.verify();
    for i in 0..6u64 {
        w.run(&Op::Snapshot { vol: 0 });
        w.run(&Op::Write {
            vol: 0,
            lba: i * 29 % BLOCKS,
            len: 20,
            scatter: i % 2 == 0,
        });
        w.run(&Op::Consolidate {
            vol: 0,
            pick: u64::MAX - 1,
            stale: false,
        });
        if i == 3 {
            w.run(&Op::Clone { vol: 0, idx: 0 });
            w.run(&Op::Write {
                vol: 1,
                lba: 70,
                len: 3,
                scatter: false,
            });
            w.run(&Op::Reopen);
        }
        w.verify();
    }
    assert!(w.sum_blocks.len() > 3, "{:?}", w.sum_blocks.keys());
    let clone = w.meta.read(w.vols[1].lineage, None, PageNo(1)).unwrap();
    assert!(
        clone.iter().flatten().count() > 60,
        "the clone copied pieces up"
    );
    for _ in 0..6 {
        w.run(&Op::DeleteSnapshot { vol: 0, idx: 0 });
        w.verify();
    }
    w.run(&Op::Write {
        vol: 0,
        lba: 0,
        len: BLOCKS,
        scatter: false,
    });
    w.drain();
    w.verify();
    w.run(&Op::DeleteVolume {
        vol: 1,
        one_by_one: true,
    });
    w.drain();
    w.verify();
    // Only the volume's last write is left, whose CRCs are inline: no checksum block.
    assert!(w.sum_blocks.is_empty(), "{:?}", w.sum_blocks);
}

/// Deep chains: 250 snapshots with ~2% churn between them, rolling retention of 40, clones
/// of the oldest kept snapshot, all checked at the end.
#[test]
fn deep_chain_rolling_retention() {
    for k in [2, 16] {
        deep_chain(k);
    }
}

fn deep_chain(checkpoint_every: u64) {
    let mut w = World::filled(checkpoint_every);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    for i in 0..250 {
        w.run(&Op::Snapshot { vol: 0 });
        for _ in 0..4 {
            let lba = rnd(BLOCKS);
            w.run(&Op::Write {
                vol: 0,
                lba,
                len: 1,
                scatter: false,
            });
        }
        if w.vols[0].snaps.len() > 40 {
            w.run(&Op::DeleteSnapshot { vol: 0, idx: 0 });
        }
        if i % 50 == 49 {
            w.run(&Op::Clone { vol: 0, idx: 0 });
            let c = w.vols.len() - 1;
            w.run(&Op::Write {
                vol: c,
                lba: rnd(BLOCKS),
                len: 9,
                scatter: true,
            });
        }
        w.run(&Op::Reclaim { steps: 2 });
        if i % 25 == 0 {
            w.verify();
        }
    }
    w.verify();
    let r = check(&*w.store.view().unwrap(), DATA_BLOCKS, &*w.sums).unwrap();
    assert!(r.checkpoints > 0, "no read checkpoint made: {r:?}");
    w.drain();
    w.verify();
}

/// Thinning (keep every 10th of 100 snapshots, as hourly → daily retention does): once the
/// jobs ran, a page keeps at most one dead record per retained snapshot — reading the oldest
/// snapshot scans at most that many — and every snapshot still reads right.
#[test]
fn thinning_merges_dead_records_per_retained_interval() {
    // Read checkpoints every 2 records: thinning must delete the ones of released epochs
    // (check says if one is left behind or disagrees with the merged records).
    let mut w = World::filled(2);
    for i in 0..100u64 {
        w.run(&Op::Snapshot { vol: 0 });
        w.run(&Op::Write {
            vol: 0,
            lba: (i * 37) % BLOCKS,
            len: 3,
            scatter: true,
        });
    }
    // Delete all but every 10th, newest first and oldest first alternately.
    let keep: Vec<Epoch> = w.vols[0]
        .snaps
        .iter()
        .map(|s| s.epoch)
        .filter(|e| e.0 % 10 == 0)
        .collect();
    while w.vols[0].snaps.len() > keep.len() {
        let snaps = &w.vols[0].snaps;
        let pos = |rev: bool| {
            let mut it: Box<dyn Iterator<Item = (usize, &Snap)>> = if rev {
                Box::new(snaps.iter().enumerate().rev())
            } else {
                Box::new(snaps.iter().enumerate())
            };
            it.find(|(_, s)| !keep.contains(&s.epoch)).unwrap().0
        };
        let idx = pos(snaps.len().is_multiple_of(2));
        w.run(&Op::DeleteSnapshot { vol: 0, idx });
    }
    w.drain();
    w.verify();
    let l = w.vols[0].lineage;
    for p in 0..PAGES {
        let mut n = 0;
        let (a, b) = (
            [&[b'd'][..], &l.0.to_be_bytes(), &p.to_be_bytes()].concat(),
            [&[b'd'][..], &l.0.to_be_bytes(), &(p + 1).to_be_bytes()].concat(),
        );
        w.store
            .scan(&a, &b, &mut |k, _| {
                // Dead records only (a read checkpoint's key has one more byte).
                n += usize::from(k.len() == 25);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        assert!(
            n <= keep.len(),
            "page {p}: {n} dead records for {} retained snapshots",
            keep.len()
        );
    }
}

fn smallvec_one(c: u32) -> snapblk_core::v2::piece::Crcs {
    std::iter::once(c).collect()
}
