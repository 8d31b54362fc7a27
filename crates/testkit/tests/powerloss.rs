//! Power-loss torture: a mixed workload (writes, FUA writes, flushes, trims, snapshots,
//! clones, renames, resizes, rollbacks, deletes, reclaim) runs on a simulated machine
//! (`snapblk_testkit::powerloss`) whose power fails at a random point, or at a named
//! failpoint (`snapblk_core::failpoints::ALL`, each one tested). After the cut the pool is
//! opened from what was durable and must satisfy:
//! * every block written before the last completed FLUSH, and every FUA write, reads back
//!   exactly; a block written since may read as any value it held since then, or fail with
//!   EIO (its checksum catches data that did not reach the disk), never anything else;
//! * snapshots, clones, deletes and other metadata operations that completed are all there,
//!   snapshots with exactly their contents; the operation cut short happened or did not;
//! * `pool check` is clean, and the pool keeps working (more writes, a flush, reclaim, and
//!   everything checks again).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use snapblk_core::device::{DataDevice, BLOCK_SIZE, DATA_START};
use snapblk_core::pool2::Pool2;
use snapblk_core::{Error, MetaStore, Pool, Pool1};
use snapblk_testkit::cells::{observe, pattern, Cell};
use snapblk_testkit::model::ModelPool;
use snapblk_testkit::powerloss::{Machine, PowerLoss, Rng};

const BS: u64 = BLOCK_SIZE as u64;
const DEVICE_BYTES: usize = DATA_START as usize + 2048 * BLOCK_SIZE;
const MAX_BLOCKS: u64 = 40;

#[derive(Clone, Debug, Default)]
struct Vol {
    blocks: Vec<Cell>,
    snaps: BTreeMap<String, Vec<u64>>,
}

impl Vol {
    fn settle(&mut self) {
        self.blocks.iter_mut().for_each(Cell::settle);
    }
    fn contents(&self) -> Vec<u64> {
        self.blocks.iter().map(|c| c.latest).collect()
    }
}

#[derive(Clone, Debug, Default)]
struct Model {
    vols: BTreeMap<String, Vol>,
}

#[derive(Debug, Clone)]
enum Op {
    Create(String, u64),
    Write {
        vol: String,
        b: u64,
        n: u64,
        fua: bool,
    },
    Trim {
        vol: String,
        b: u64,
        n: u64,
        fua: bool,
    },
    Flush,
    Snapshot(String, String),
    DeleteSnapshot(String, String),
    Clone(String, String, String),
    Rollback(String, String),
    Rename(String, String),
    Resize(String, u64),
    DeleteVolume(String),
    Reclaim,
}

struct Gen {
    rng: Rng,
    tag: u64,
    names: u64,
}

impl Gen {
    fn name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    fn pick<'a>(&mut self, items: &[&'a String]) -> &'a String {
        items[self.rng.below(items.len() as u64) as usize]
    }

    /// A random operation that makes sense in `m`.
    fn op(&mut self, m: &Model) -> Op {
        let vols: Vec<&String> = m.vols.keys().collect();
        if vols.is_empty() || (vols.len() < 5 && self.rng.below(30) == 0) {
            let blocks = 8 + self.rng.below(MAX_BLOCKS - 8);
            return Op::Create(self.name("v"), blocks);
        }
        let v = self.pick(&vols).clone();
        let size = m.vols[&v].blocks.len() as u64;
        let snaps: Vec<&String> = m.vols[&v].snaps.keys().collect();
        let r = self.rng.below(100);
        match r {
            0..=44 => {
                let b = self.rng.below(size);
                let n = 1 + self.rng.below((size - b).min(6));
                Op::Write {
                    vol: v,
                    b,
                    n,
                    fua: self.rng.below(6) == 0,
                }
            }
            45..=51 => {
                let b = self.rng.below(size);
                let n = 1 + self.rng.below((size - b).min(8));
                Op::Trim {
                    vol: v,
                    b,
                    n,
                    fua: self.rng.below(4) == 0,
                }
            }
            52..=59 => Op::Flush,
            60..=67 => Op::Snapshot(v, self.name("s")),
            68..=71 if !snaps.is_empty() => {
                let s = self.pick(&snaps).clone();
                Op::DeleteSnapshot(v, s)
            }
            72..=75 if !snaps.is_empty() && vols.len() < 6 => {
                let s = self.pick(&snaps).clone();
                Op::Clone(v, s, self.name("c"))
            }
            76..=78 if !snaps.is_empty() => {
                let s = self.pick(&snaps).clone();
                Op::Rollback(v, s)
            }
            79..=81 => Op::Rename(v, self.name("r")),
            82..=86 => Op::Resize(v, 4 + self.rng.below(MAX_BLOCKS - 4)),
            87..=89 if vols.len() > 1 => Op::DeleteVolume(v),
            _ => Op::Reclaim,
        }
    }
}

/// Applies `op` to the pool; the model is updated by the caller only if this succeeds.
fn run_op<P: ModelPool>(pool: &P, op: &Op, tags: &mut u64) -> Result<Vec<u64>, Error> {
    let mut written = Vec::new();
    match op {
        Op::Create(v, blocks) => {
            pool.create_volume(v, blocks * BS)?;
        }
        Op::Write { vol, b, n, fua } => {
            let id = pool.volume_id(vol)?;
            let mut data = Vec::with_capacity((*n * BS) as usize);
            for _ in 0..*n {
                *tags += 1;
                written.push(*tags);
                data.extend_from_slice(&pattern(*tags));
            }
            pool.write(id, b * BS, &data, *fua)?;
        }
        Op::Trim { vol, b, n, fua } => {
            let id = pool.volume_id(vol)?;
            pool.trim(id, b * BS, n * BS, *fua)?;
        }
        Op::Flush => pool.sync()?,
        Op::Snapshot(v, s) => {
            pool.create_snapshot(v, s)?;
        }
        Op::DeleteSnapshot(v, s) => pool.delete_snapshot(v, s)?,
        Op::Clone(v, s, new) => {
            pool.clone_snapshot(v, s, new)?;
        }
        Op::Rollback(v, s) => {
            pool.rollback(v, s)?;
        }
        Op::Rename(v, new) => {
            pool.rename_volume(v, new)?;
        }
        Op::Resize(v, blocks) => {
            pool.resize_volume(v, blocks * BS, true)?;
        }
        Op::DeleteVolume(v) => pool.delete_volume(v, true)?,
        Op::Reclaim => pool.reclaim_all()?,
    }
    Ok(written)
}

/// The model after `op` succeeded, `written` being the tags a write stored.
fn model_after(m: &Model, op: &Op, written: &[u64]) -> Model {
    let mut m = m.clone();
    match op {
        Op::Create(v, blocks) => {
            m.vols.insert(
                v.clone(),
                Vol {
                    blocks: vec![Cell::exact(0); *blocks as usize],
                    snaps: BTreeMap::new(),
                },
            );
        }
        Op::Write { vol, b, n, fua } => {
            let vol = m.vols.get_mut(vol).expect("model volume");
            for i in 0..*n {
                vol.blocks[(b + i) as usize].set(written[i as usize], *fua);
            }
        }
        Op::Trim { vol, b, n, fua } => {
            let vol = m.vols.get_mut(vol).expect("model volume");
            for i in 0..*n {
                vol.blocks[(b + i) as usize].set(0, *fua);
            }
        }
        Op::Flush => m.vols.values_mut().for_each(Vol::settle),
        Op::Snapshot(v, s) => {
            let vol = m.vols.get_mut(v).expect("model volume");
            vol.settle();
            let c = vol.contents();
            vol.snaps.insert(s.clone(), c);
        }
        Op::DeleteSnapshot(v, s) => {
            m.vols.get_mut(v).expect("model volume").snaps.remove(s);
        }
        Op::Clone(v, s, new) => {
            let c = m.vols[v].snaps[s].clone();
            m.vols.insert(
                new.clone(),
                Vol {
                    blocks: c.into_iter().map(Cell::exact).collect(),
                    snaps: BTreeMap::new(),
                },
            );
        }
        Op::Rollback(v, s) => {
            let vol = m.vols.get_mut(v).expect("model volume");
            vol.blocks = vol.snaps[s].iter().map(|&t| Cell::exact(t)).collect();
        }
        Op::Rename(v, new) => {
            let vol = m.vols.remove(v).expect("model volume");
            m.vols.insert(new.clone(), vol);
        }
        Op::Resize(v, blocks) => {
            let vol = m.vols.get_mut(v).expect("model volume");
            // The new size is committed durably; a grown tail reads as zeros.
            vol.blocks.resize(*blocks as usize, Cell::exact(0));
        }
        Op::DeleteVolume(v) => {
            m.vols.remove(v);
        }
        Op::Reclaim => {}
    }
    m
}

/// Checks the reopened pool against the model; returns what it found (every block exact),
/// or the first difference, in words.
fn verify<P: ModelPool>(pool: &P, m: &Model, lost: &BTreeSet<usize>) -> Result<Model, String> {
    let mut names: Vec<String> = pool.volume_names();
    names.sort();
    let want: Vec<String> = m.vols.keys().cloned().collect();
    if names != want {
        return Err(format!("volumes {names:?}, expected {want:?}"));
    }
    let mut seen = Model::default();
    for (name, vol) in &m.vols {
        let size = pool.volume_size(name).map_err(|e| e.to_string())?;
        if size != vol.blocks.len() as u64 * BS {
            return Err(format!(
                "{name}: size {size}, expected {}",
                vol.blocks.len() as u64 * BS
            ));
        }
        let mut out = Vol::default();
        for (b, cell) in vol.blocks.iter().enumerate() {
            out.blocks.push(Cell::exact(observe(
                pool,
                name,
                b as u64,
                &cell.allowed,
                lost,
            )?));
        }
        let mut snaps: Vec<String> = pool.snapshot_names(name).map_err(|e| e.to_string())?;
        snaps.sort();
        let want: Vec<String> = vol.snaps.keys().cloned().collect();
        if snaps != want {
            return Err(format!("{name}: snapshots {snaps:?}, expected {want:?}"));
        }
        for (s, contents) in &vol.snaps {
            let target = format!("{name}@{s}");
            for (b, &tag) in contents.iter().enumerate() {
                observe(pool, &target, b as u64, &[tag], lost)?;
            }
            out.snaps.insert(s.clone(), contents.clone());
        }
        seen.vols.insert(name.clone(), out);
    }
    let errors = pool.check_errors();
    if !errors.is_empty() {
        return Err(format!("pool check: {errors:?}"));
    }
    Ok(seen)
}

fn open<P: ModelPool>(m: &Machine) -> Arc<P> {
    let store: Arc<dyn MetaStore> = m.store.clone();
    let dev: Arc<dyn DataDevice> = m.dev.clone();
    P::open_on(store, dev).expect("the pool opens after a power cut")
}

/// What happened to the operation the power cut interrupted.
struct Outcome {
    before: Model,
    /// The model had the interrupted operation completed (None: the cut fell between
    /// operations).
    after: Option<Model>,
    ops: usize,
}

/// Runs random operations until one fails (`stop` says whether the failure is the
/// expected power cut / injected failure) or `max_ops` are done.
fn workload<P: ModelPool>(
    pool: &P,
    g: &mut Gen,
    m: &mut Model,
    max_ops: usize,
    stop: &dyn Fn(&Error) -> bool,
) -> Outcome {
    for i in 0..max_ops {
        let op = g.op(m);
        match run_op(pool, &op, &mut g.tag) {
            Ok(written) => *m = model_after(m, &op, &written),
            Err(e) if stop(&e) => {
                // A write that failed had its tags assigned: the model "after" holds them.
                let written: Vec<u64> = match &op {
                    Op::Write { n, .. } => (g.tag + 1 - n..=g.tag).collect(),
                    _ => Vec::new(),
                };
                return Outcome {
                    before: m.clone(),
                    after: Some(model_after(m, &op, &written)),
                    ops: i + 1,
                };
            }
            Err(e) => panic!("operation {op:?} failed: {e}"),
        }
    }
    Outcome {
        before: m.clone(),
        after: None,
        ops: max_ops,
    }
}

/// After the cut: the reopened pool matches the model before or after the interrupted
/// operation; returns what it holds.
fn check_after_cut<P: ModelPool>(
    pool: &P,
    o: &Outcome,
    lost: &BTreeSet<usize>,
    what: &str,
) -> Model {
    match verify(pool, &o.before, lost) {
        Ok(seen) => seen,
        Err(e1) => match &o.after {
            Some(after) => match verify(pool, after, lost) {
                Ok(seen) => seen,
                Err(e2) => panic!(
                    "{what}: state after the power cut matches neither side of the interrupted \
                     operation:\n  without it: {e1}\n  with it: {e2}"
                ),
            },
            None => panic!("{what}: after the power cut: {e1}"),
        },
    }
}

/// The reopened pool keeps working: more operations, a flush, full reclaim, all checked.
fn keep_going<P: ModelPool>(
    pool: &P,
    g: &mut Gen,
    mut m: Model,
    lost: &BTreeSet<usize>,
    what: &str,
) {
    let o = workload(pool, g, &mut m, 25, &|_| false);
    let mut m = o.before;
    pool.sync().expect("flush");
    m.vols.values_mut().for_each(Vol::settle);
    pool.reclaim_all().expect("reclaim");
    if let Err(e) = verify(pool, &m, lost) {
        panic!("{what}: after reopening and more work: {e}");
    }
    // Nothing may stay unreadable once every block was written again and flushed.
    let vols: Vec<(String, u64)> = m
        .vols
        .iter()
        .map(|(n, v)| (n.clone(), v.blocks.len() as u64))
        .collect();
    for (name, blocks) in vols {
        let op = Op::Write {
            vol: name,
            b: 0,
            n: blocks,
            fua: false,
        };
        let written = run_op(pool, &op, &mut g.tag).expect("rewrite");
        m = model_after(&m, &op, &written);
    }
    pool.sync().expect("flush");
    m.vols.values_mut().for_each(Vol::settle);
    if let Err(e) = verify(pool, &m, lost) {
        panic!("{what}: after rewriting every block: {e}");
    }
}

fn new_pool<P: ModelPool>(g: &mut Gen) -> (Machine, Arc<P>, Model) {
    let machine = PowerLoss::machine(DEVICE_BYTES);
    P::format_on(&*machine.store, &*machine.dev).expect("format");
    let pool = open::<P>(&machine);
    let mut m = Model::default();
    for _ in 0..2 {
        let op = Op::Create(g.name("v"), 16 + g.rng.below(MAX_BLOCKS - 16));
        run_op(&*pool, &op, &mut g.tag).expect("create");
        m = model_after(&m, &op, &[]);
    }
    (machine, pool, m)
}

/// The power fails after a random number of device writes, syncs and metadata commits,
/// so the cut lands anywhere inside any operation (or between two).
/// The format-1 pool (kept for `pool upgrade`).
#[test]
fn random_power_cuts_lose_nothing_flushed_format1() {
    power_cuts::<Pool1>(600);
}

/// The same on metadata format 2 (its committer, dead records, regions and reclaim jobs).
/// Format 2 commits fewer batches per operation (a group per request, reclaim in larger
/// steps), so it takes more seeds to lose as many unsynced batches: the bar stays the same.
#[test]
fn random_power_cuts_lose_nothing_flushed_format2() {
    power_cuts::<Pool2>(900);
}

fn power_cuts<P: ModelPool>(seeds: u64) {
    let _serial = fail::FailScenario::setup();
    let (mut lost_blocks, mut lost_batches, mut mid_op) = (0, 0, 0);
    for seed in 1..=seeds {
        let what = format!("seed {seed}");
        let mut g = Gen {
            rng: Rng(seed),
            tag: 0,
            names: 0,
        };
        let (machine, pool, mut m) = new_pool::<P>(&mut g);
        let budget = g.rng.below(200);
        machine.power.arm(budget);
        let power = machine.power.clone();
        let o = workload(&*pool, &mut g, &mut m, 150, &|_| power.failed());
        mid_op += usize::from(o.after.is_some());
        drop(pool);
        let (rebooted, stats) = machine.power.cut(&mut g.rng);
        lost_blocks += stats.blocks_dropped + stats.blocks_torn;
        lost_batches += stats.batches_dropped;
        let pool = open::<P>(&rebooted);
        let m = check_after_cut(&*pool, &o, &stats.lost, &format!("{what} ({} ops)", o.ops));
        keep_going(&*pool, &mut g, m, &stats.lost, &what);
    }
    // The torture must really have cut operations and thrown unsynced state away.
    assert!(mid_op > 300, "only {mid_op} cuts fell inside an operation");
    assert!(
        lost_blocks > 300,
        "only {lost_blocks} block writes lost or torn"
    );
    assert!(
        lost_batches > 300,
        "only {lost_batches} metadata batches lost"
    );
}

/// Every named failpoint, armed in turn (on its 1st, 2nd and 4th hit), stops the workload
/// right there; the power is cut at once and the pool must come back consistent. The
/// format-2 points run on the pool in use, the others on the format-1 pool; the upgrade's
/// are in tests/upgrade.rs.
#[test]
fn every_failpoint_is_survived() {
    let _serial = fail::FailScenario::setup();
    for &fp in snapblk_core::failpoints::ALL {
        let format2 = snapblk_core::failpoints::FORMAT2.contains(&fp);
        match fp {
            "format.before_commit" => format_interrupted::<Pool1>(fp),
            "format2.before_commit" => format_interrupted::<Pool>(fp),
            _ if fp.starts_with("upgrade.") => {}
            _ if format2 => survive::<Pool>(fp),
            _ => survive::<Pool1>(fp),
        }
    }
}

fn survive<P: ModelPool>(fp: &'static str) {
    for (skip, seed) in [(0u64, 11u64), (1, 12), (3, 13), (0, 14), (2, 15)] {
        let what = format!("failpoint {fp} (hit {}), seed {seed}", skip + 1);
        let mut g = Gen {
            rng: Rng(seed),
            tag: 0,
            names: 0,
        };
        let (machine, pool, mut m) = new_pool::<P>(&mut g);
        let action = if skip == 0 {
            "return".to_string()
        } else {
            format!("{skip}*off->return")
        };
        fail::cfg(fp, &action).expect("fail cfg");
        let o = workload(
            &*pool,
            &mut g,
            &mut m,
            2000,
            // Format 2 stops after a failure in its own background work (a reclaim step):
            // the next operation is refused, naming the failpoint.
            &|e| {
                matches!(e, Error::Injected(p) if *p == fp)
                    || e.to_string().contains(&format!("failpoint {fp})"))
            },
        );
        fail::remove(fp);
        assert!(o.after.is_some(), "{what}: never reached in {} ops", o.ops);
        drop(pool);
        let (rebooted, stats) = machine.power.cut(&mut g.rng);
        let pool = open::<P>(&rebooted);
        let m = check_after_cut(&*pool, &o, &stats.lost, &what);
        keep_going(&*pool, &mut g, m, &stats.lost, &what);
    }
}

/// `pool create` cut between the device header and the superblock: the metadata holds no
/// pool, opening says so, and formatting again works.
fn format_interrupted<P: ModelPool>(fp: &'static str) {
    let machine = PowerLoss::machine(DEVICE_BYTES);
    fail::cfg(fp, "return").expect("fail cfg");
    let r = P::format_on(&*machine.store, &*machine.dev);
    fail::remove(fp);
    assert!(matches!(r, Err(Error::Injected(_))), "{fp}: {:?}", r.err());
    let (rebooted, _) = machine.power.cut(&mut Rng(1));
    let store: Arc<dyn MetaStore> = rebooted.store.clone();
    let dev: Arc<dyn DataDevice> = rebooted.dev.clone();
    assert!(
        P::open_on(store, dev).is_err(),
        "{fp}: a half-created pool must not open"
    );
    P::format_on(&*rebooted.store, &*rebooted.dev).expect("format again");
    let pool = open::<P>(&rebooted);
    assert!(pool.check_errors().is_empty());
}

/// Every `failpoint!` in the core's sources is listed in `ALL` (and so tested above), and
/// every listed one exists.
#[test]
fn failpoint_list_matches_the_sources() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/src");
    let mut found = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read core sources") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("read source");
                // `crate::failpoint!("` marks a use (the macro's own docs do not).
                for part in text.split("crate::failpoint!(\"").skip(1) {
                    if let Some(end) = part.find('"') {
                        found.push(part[..end].to_string());
                    }
                }
            }
        }
    }
    found.sort();
    found.dedup();
    let mut listed: Vec<String> = snapblk_core::failpoints::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "failpoints in the sources vs failpoints::ALL"
    );
}
