//! `pool upgrade` (issue 10, acceptance 3): format-1 pools built by the format-1 pool code
//! from random histories (writes, zeroes, trims, snapshots, clones, rollbacks, deletes,
//! resizes, renames) are converted in place; the format-2 pool then reads every volume and
//! snapshot byte for byte as before, `pool check` is clean, and it keeps working. A power cut
//! at any point of the conversion leaves a pool that the next `pool upgrade` finishes with
//! the same result, and the format-2 pool refuses a format-1 pool naming the command.

use std::sync::Arc;

use proptest::prelude::*;
use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::DataDevice;
use snapblk_core::upgrade::upgrade;
use snapblk_core::{MemStore, MetaStore, Pool, Pool1};
use snapblk_testkit::model::{self, build, finish, op_strategy, verify, Model, Op};
use snapblk_testkit::powerloss::{Machine, PowerLoss, Rng};

/// A format-1 pool in memory after `ops`, and what it holds.
fn format1(ops: &[Op]) -> (Arc<dyn MetaStore>, Arc<dyn DataDevice>, Model) {
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::new());
    let dev: Arc<dyn DataDevice> = Arc::new(MemDevice::new(model::device_bytes()));
    let (s, d) = (Arc::clone(&store), Arc::clone(&dev));
    let mut formatted = false;
    let mut open = move || {
        if !formatted {
            Pool1::format(&*s, &*d).expect("format");
            formatted = true;
        }
        Pool1::open(Arc::clone(&s), Arc::clone(&d)).expect("open")
    };
    let (pool, m) = build(&mut open, ops);
    pool.sync().expect("flush");
    drop(pool);
    (store, dev, m)
}

/// A flushed format-1 pool after `ops` on a fresh power-loss machine, and what it holds.
fn format1_machine(ops: &[Op]) -> (Machine, Model) {
    let machine = PowerLoss::machine(model::device_bytes() as usize);
    let (s, d): (Arc<dyn MetaStore>, Arc<dyn DataDevice>) =
        (machine.store.clone(), machine.dev.clone());
    let mut formatted = false;
    let mut open = move || {
        if !formatted {
            Pool1::format(&*s, &*d).expect("format");
            formatted = true;
        }
        Pool1::open(Arc::clone(&s), Arc::clone(&d)).expect("open")
    };
    let (pool, m) = build(&mut open, ops);
    pool.sync().expect("flush");
    drop(pool);
    (machine, m)
}

fn converted(ops: &[Op]) {
    // Failpoints are global: every upgrade in this binary runs alone (CI caught one
    // hitting the failpoint another test had armed).
    let _serial = fail::FailScenario::setup();
    let (store, dev, mut m) = format1(ops);
    let err = Pool::open(Arc::clone(&store), Arc::clone(&dev))
        .err()
        .expect("format 1 refused");
    assert!(err.to_string().contains("snapblk pool upgrade"), "{err}");
    let rep = upgrade(Arc::clone(&store), Arc::clone(&dev), &|_| {}).expect("upgrade");
    assert_eq!(rep.from_format, 1);
    assert_eq!(
        (rep.volumes, rep.snapshots),
        (m.volumes.len(), m.snapshots.len())
    );
    let pool = Pool::open(Arc::clone(&store), Arc::clone(&dev)).expect("format 2 opens");
    verify(&*pool, &m);
    // Upgrading again only says so.
    drop(pool);
    assert_eq!(
        upgrade(Arc::clone(&store), Arc::clone(&dev), &|_| {})
            .unwrap()
            .from_format,
        2
    );
    let pool = Pool::open(store, dev).expect("format 2 opens");
    // No format-1 key is left.
    let mut left = 0;
    pool.store()
        .scan(b"A", b"Z", &mut |k, _| {
            if k[0] != b'S' {
                left += 1;
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(left, 0, "format-1 keys left after the upgrade");
    finish(&*pool, &mut m);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn random_format1_histories_convert_exactly(ops in prop::collection::vec(op_strategy(), 1..60)) {
        converted(&ops);
    }
}

/// Clones of clones, rollbacks that leave snapshot chains without a volume, hidden branch
/// points, zeroed and shrunk-then-grown ranges.
#[test]
fn scripted_history_converts_exactly() {
    use Op::*;
    let w = |vol, sector, sectors, seed| Write {
        vol,
        sector,
        sectors,
        seed,
        zeros: false,
        fua: false,
    };
    converted(&[
        Create,
        w(0, 0, 120, 1),
        Snapshot { vol: 0 },
        w(0, 16, 24, 2),
        Snapshot { vol: 0 },
        Clone { snap: 0 },
        w(1, 3, 40, 3),
        Snapshot { vol: 1 },
        Clone { snap: 2 },
        Zero {
            vol: 2,
            sector: 0,
            sectors: 40,
        },
        Rollback { snap: 0 },
        w(0, 64, 8, 4),
        Snapshot { vol: 0 },
        DeleteSnapshot { snap: 1 },
        Resize { vol: 1, blocks: 3 },
        Resize { vol: 1, blocks: 20 },
        Trim {
            vol: 0,
            sector: 8,
            sectors: 16,
        },
        DeleteVolume {
            vol: 1,
            recursive: true,
        },
    ]);
}

/// A power cut anywhere in the conversion (replay, verification, switch, cleanup): the
/// next upgrade finishes it and the result is the same.
#[test]
fn an_interrupted_upgrade_finishes_on_the_next_run() {
    use Op::*;
    let _serial = fail::FailScenario::setup();
    let w = |vol, sector, sectors, seed| Write {
        vol,
        sector,
        sectors,
        seed,
        zeros: false,
        fua: false,
    };
    let ops = [
        Create,
        w(0, 0, 64, 1),
        Snapshot { vol: 0 },
        w(0, 8, 16, 2),
        Clone { snap: 0 },
        w(1, 0, 8, 3),
        Snapshot { vol: 1 },
        Rollback { snap: 0 },
        Create,
        w(2, 4, 30, 5),
    ];
    let (machine, m) = format1_machine(&ops);
    let mut cuts_inside = 0;
    let mut machine = machine;
    for budget in 0..400 {
        machine.power.arm(budget);
        let r = upgrade(machine.store.clone(), machine.dev.clone(), &|_| {});
        let (rebooted, _) = machine.power.cut(&mut Rng(budget));
        machine = rebooted;
        if r.is_err() {
            cuts_inside += 1;
            // Either format still opens as what it is, or the next upgrade finishes it.
        }
        let rep = upgrade(machine.store.clone(), machine.dev.clone(), &|_| {})
            .unwrap_or_else(|e| panic!("budget {budget}: the next upgrade fails: {e}"));
        assert!(rep.from_format == 1 || rep.from_format == 2);
        let pool = Pool::open(machine.store.clone(), machine.dev.clone())
            .unwrap_or_else(|e| panic!("budget {budget}: {e}"));
        verify(&*pool, &m);
        drop(pool);
        if r.is_ok() {
            break;
        }
        // Back to format 1 for the next budget: rebuild the machine from scratch.
        let (fresh, _) = format1_machine(&ops);
        machine = fresh;
    }
    assert!(
        cuts_inside >= 10,
        "only {cuts_inside} cuts fell inside the upgrade"
    );
}

/// Each named failpoint of the upgrade stops it right there; after a power cut the next
/// upgrade finishes it with the same result.
#[test]
fn every_upgrade_failpoint_is_survived() {
    use Op::*;
    let _serial = fail::FailScenario::setup();
    let w = |vol, sector, sectors, seed| Write {
        vol,
        sector,
        sectors,
        seed,
        zeros: false,
        fua: false,
    };
    let ops = [
        Create,
        w(0, 0, 64, 1),
        Snapshot { vol: 0 },
        w(0, 8, 16, 2),
        Clone { snap: 0 },
        w(1, 0, 8, 3),
        Snapshot { vol: 1 },
        Rollback { snap: 0 },
    ];
    for &fp in snapblk_core::failpoints::FORMAT2
        .iter()
        .filter(|f| f.starts_with("upgrade."))
    {
        let (machine, m) = format1_machine(&ops);
        fail::cfg(fp, "return").expect("fail cfg");
        let r = upgrade(machine.store.clone(), machine.dev.clone(), &|_| {});
        fail::remove(fp);
        assert!(
            matches!(r, Err(snapblk_core::Error::Injected(_))),
            "{fp}: {r:?}"
        );
        let (rebooted, _) = machine.power.cut(&mut Rng(3));
        upgrade(rebooted.store.clone(), rebooted.dev.clone(), &|_| {})
            .unwrap_or_else(|e| panic!("{fp}: the next upgrade fails: {e}"));
        let pool = Pool::open(rebooted.store.clone(), rebooted.dev.clone())
            .unwrap_or_else(|e| panic!("{fp}: {e}"));
        verify(&*pool, &m);
    }
}

/// A layer with more map entries than the upgrade holds in memory at once (it streams them
/// in chunks of 1024): data and zero runs across chunk boundaries, under and over a snapshot.
#[test]
fn a_layer_larger_than_a_chunk_converts_exactly() {
    let _serial = fail::FailScenario::setup();
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::new());
    let dev: Arc<dyn DataDevice> = Arc::new(MemDevice::new(64 << 20));
    Pool1::format(&*store, &*dev).expect("format");
    let pool = Pool1::open(Arc::clone(&store), Arc::clone(&dev)).expect("open");
    let blocks = 3000u64;
    pool.create_volume("v", blocks * 4096).unwrap();
    let id = pool.volume_id("v").unwrap();
    let data: Vec<u8> = (0..blocks * 4096)
        .map(|i| (i / 4096 % 251) as u8 + 1)
        .collect();
    pool.write(id, 0, &data, false).unwrap();
    pool.create_snapshot("v", "s").unwrap();
    // Zero every third 100-block run, rewrite a run straddling the 1024th entry.
    for r in (0..blocks / 100).step_by(3) {
        pool.zero(id, r * 100 * 4096, 100 * 4096, false).unwrap();
    }
    pool.write(id, 1000 * 4096, &vec![0xabu8; 50 * 4096], false)
        .unwrap();
    let read = |p: &dyn Fn(&str, &mut [u8])| {
        let mut live = vec![0u8; data.len()];
        let mut snap = vec![0u8; data.len()];
        p("v", &mut live);
        p("v@s", &mut snap);
        (live, snap)
    };
    let before = read(&|t, b| {
        let t = pool.resolve_target(t).unwrap();
        pool.read(&t, 0, b).unwrap()
    });
    pool.sync().unwrap();
    drop(pool);
    let rep = upgrade(Arc::clone(&store), Arc::clone(&dev), &|_| {}).expect("upgrade");
    assert!(rep.entries > 4000, "{rep:?}");
    let pool = Pool::open(store, dev).expect("open format 2");
    let after = read(&|t, b| {
        let t = pool.resolve_target(t).unwrap();
        pool.read(&t, 0, b).unwrap()
    });
    assert!(before == after, "contents differ after the upgrade");
    assert!(before.1 == data, "the snapshot holds the first write");
    assert!(pool.check().unwrap().is_clean());
}
