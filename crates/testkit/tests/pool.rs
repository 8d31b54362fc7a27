//! Focused behaviours of the format-1 pool (kept for `pool upgrade`; tests/pool2.rs has
//! the same for the pool in use): O(1) snapshots, snapshot atomicity under concurrent writes,
//! out-of-space and recovery, checksum verification, diff.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::{DataDevice, ReadSeg, WriteSeg, DATA_START};
use snapblk_core::{Error, MetaStore, Pool1 as Pool, Target};
use snapblk_testkit::counting::CountingStore;

fn mem_pool(bytes: u64) -> (Arc<Pool>, Arc<CountingStore>, Arc<MemDevice>) {
    let store = Arc::new(CountingStore::default());
    let dev = Arc::new(MemDevice::new(bytes));
    Pool::format(&*store, &*dev).unwrap();
    let pool = Pool::open(store.clone(), dev.clone()).unwrap();
    (pool, store, dev)
}

#[test]
fn snapshot_cost_does_not_grow_with_data() {
    let (pool, store, _) = mem_pool(256 << 20);
    pool.create_volume("v", 128 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    let mut costs = Vec::new();
    for round in 0..3u8 {
        // Write more data each round, then measure the snapshot's metadata operations.
        pool.write(
            id,
            0,
            &vec![round + 1; (round as usize + 1) * (16 << 20)],
            false,
        )
        .unwrap();
        let before = store.ops.load(Ordering::SeqCst);
        pool.create_snapshot("v", &format!("s{round}")).unwrap();
        costs.push(store.ops.load(Ordering::SeqCst) - before);
    }
    assert!(
        costs.iter().all(|&c| c == costs[0] && c <= 5),
        "snapshot batch sizes {costs:?}"
    );
}

#[test]
fn snapshot_is_atomic_point_in_time_under_concurrent_writes() {
    let (pool, _, _) = mem_pool(64 << 20);
    pool.create_volume("v", 1 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    const THREADS: usize = 4;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (pool, acked, stop) = (pool.clone(), acked.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut v = 0u64;
            while !stop.load(Ordering::SeqCst) {
                v += 1;
                let mut block = vec![0u8; 4096];
                block[..8].copy_from_slice(&v.to_le_bytes());
                pool.write(id, t as u64 * 4096, &block, false).unwrap();
                acked[t].store(v, Ordering::SeqCst);
            }
        }));
    }
    let mut windows = Vec::new();
    for i in 0..20 {
        let lo: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        pool.create_snapshot("v", &format!("s{i}")).unwrap();
        let hi: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        windows.push((lo, hi));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().unwrap();
    }
    for (i, (lo, hi)) in windows.iter().enumerate() {
        for t in 0..THREADS {
            let mut b = [0u8; 8];
            pool.read(
                &Target::Snapshot(id, format!("s{i}")),
                t as u64 * 4096,
                &mut b,
            )
            .unwrap();
            let v = u64::from_le_bytes(b);
            // Acknowledged before the snapshot started => in it; in it => issued before it ended.
            assert!(
                v >= lo[t] && v <= hi[t] + 1,
                "snapshot s{i} thread {t}: {v} not in [{}, {}]",
                lo[t],
                hi[t] + 1
            );
        }
    }
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn out_of_space_fails_cleanly_and_recovers_after_trim() {
    // 1 MiB header + 64 blocks of data.
    let (pool, _, _) = mem_pool(DATA_START + 64 * 4096);
    pool.create_volume("v", 1 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![1u8; 60 * 4096], false).unwrap();
    let e = pool
        .write(id, 60 * 4096, &vec![2u8; 8 * 4096], false)
        .unwrap_err();
    assert!(matches!(e, Error::NoSpace { .. }), "{e}");
    assert_eq!(e.errno(), libc_enospc());
    // Nothing of the failed write is visible, and everything else still reads.
    let mut b = vec![0u8; 8 * 4096];
    pool.read(&Target::Volume(id), 60 * 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let mut b = vec![0u8; 4096];
    pool.read(&Target::Volume(id), 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    // Trim frees space (released at the sync the failed allocation triggers): writes work again.
    pool.zero(id, 0, 32 * 4096, false).unwrap();
    pool.write(id, 60 * 4096, &vec![2u8; 8 * 4096], false)
        .unwrap();
    assert!(pool.check().unwrap().is_clean());
}

fn libc_enospc() -> i32 {
    28
}

#[test]
fn corrupted_data_is_reported_never_returned() {
    let (pool, _, dev) = mem_pool(16 << 20);
    pool.create_volume("v", 1 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![7u8; 8192], false).unwrap();
    // Flip one bit in every data block on the device.
    let mut buf = snapblk_core::device::AlignedBuf::zeroed(4096);
    for blk in 0..2u64 {
        let off = DATA_START + blk * 4096;
        dev.read(&mut [ReadSeg {
            offset: off,
            buf: &mut buf,
        }])
        .unwrap();
        buf[100] ^= 0x10;
        dev.write(
            &[WriteSeg {
                offset: off,
                buf: &buf,
            }],
            false,
        )
        .unwrap();
    }
    let mut out = vec![0u8; 4096];
    let e = pool.read(&Target::Volume(id), 4096, &mut out).unwrap_err();
    assert!(matches!(e, Error::Checksum(_)), "{e}");
    assert_eq!(e.errno(), 5);
}

#[test]
fn diff_lists_exactly_the_written_blocks() {
    let (pool, _, _) = mem_pool(64 << 20);
    pool.create_volume("v", 8 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![1u8; 1 << 20], false).unwrap();
    pool.create_snapshot("v", "a").unwrap();
    pool.write(id, 8192, &[2u8; 4096], false).unwrap();
    pool.write(id, 12288, &[3u8; 100], false).unwrap();
    pool.create_snapshot("v", "b").unwrap();
    pool.zero(id, 4 << 20, 8192, false).unwrap(); // never written: no change
    pool.write(id, 1 << 20, &[4u8; 4096], false).unwrap();
    let a = Target::Snapshot(id, "a".into());
    let b = Target::Snapshot(id, "b".into());
    let d = pool.diff(&a, &b).unwrap();
    assert_eq!(
        d.iter().map(|r| (r.offset, r.length)).collect::<Vec<_>>(),
        vec![(8192, 8192)]
    );
    let d = pool.diff(&a, &Target::Volume(id)).unwrap();
    assert_eq!(
        d.iter().map(|r| (r.offset, r.length)).collect::<Vec<_>>(),
        vec![(8192, 8192), (1 << 20, 4096)]
    );
    // Symmetric, and across a clone.
    assert_eq!(pool.diff(&b, &a).unwrap(), pool.diff(&a, &b).unwrap());
    pool.clone_snapshot("v", "a", "c").unwrap();
    let c = pool.volume_id("c").unwrap();
    pool.write(c, 0, &[9u8; 4096], false).unwrap();
    let d = pool.diff(&b, &Target::Volume(c)).unwrap();
    assert_eq!(
        d.iter().map(|r| (r.offset, r.length)).collect::<Vec<_>>(),
        vec![(0, 4096), (8192, 8192)]
    );
}

#[test]
fn deleting_snapshots_frees_exactly_their_exclusive_space() {
    let (pool, store, _) = mem_pool(64 << 20);
    pool.create_volume("v", 4 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![1u8; 1 << 20], false).unwrap(); // 256 blocks
    pool.create_snapshot("v", "old").unwrap();
    pool.write(id, 0, &vec![2u8; 512 << 10], false).unwrap(); // overwrite 128
    pool.create_snapshot("v", "mid").unwrap();
    pool.write(id, 0, &vec![3u8; 256 << 10], false).unwrap(); // overwrite 64
    pool.create_snapshot("v", "new").unwrap();
    let info = pool.snapshot_info("v", "old").unwrap();
    let brief = pool.snapshot_summary("v", "old").unwrap();
    assert_eq!(
        (brief.id, brief.created, brief.exclusive),
        (info.id, info.created, None)
    );
    assert_eq!(info.exclusive, Some(128 * 4096));
    pool.sync().unwrap();
    let used = |p: &Pool| p.info().used;
    let u0 = used(&pool);
    // Middle snapshot: its 128 blocks, 64 shadowed by "new", 64 move into "new".
    pool.delete_snapshot("v", "mid").unwrap();
    pool.reclaim_all().unwrap();
    pool.sync().unwrap();
    assert_eq!(u0 - used(&pool), 64 * 4096);
    // Oldest: 128 of its blocks are shadowed by what is now "new".
    pool.delete_snapshot("v", "old").unwrap();
    pool.reclaim_all().unwrap();
    pool.sync().unwrap();
    assert_eq!(u0 - used(&pool), (64 + 128) * 4096);
    let mut b = vec![0u8; 1 << 20];
    pool.read(&Target::Snapshot(id, "new".into()), 0, &mut b)
        .unwrap();
    assert!(
        b[..256 << 10].iter().all(|&x| x == 3) && b[256 << 10..512 << 10].iter().all(|&x| x == 2)
    );
    assert!(b[512 << 10..].iter().all(|&x| x == 1));
    assert!(pool.check().unwrap().is_clean());
    // The store holds no entries of the removed layers.
    let mut layers = std::collections::BTreeSet::new();
    MetaStore::scan(&*store, b"M", b"N", &mut |k, _| {
        layers.insert(k[1..9].to_vec());
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(
        layers.len(),
        1,
        "only the layer of 'new' holds entries (the head is empty)"
    );
}

#[test]
fn scrub_names_bad_blocks_and_what_they_affect() {
    let (pool, _, dev) = mem_pool(16 << 20);
    pool.create_volume("v", 1 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![7u8; 8192], false).unwrap();
    pool.create_snapshot("v", "s").unwrap();
    pool.write(id, 65536, &vec![9u8; 4096], false).unwrap();
    let clean = pool.scrub(&|_, _| {}).unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.blocks, 3);
    // Flip one bit in the first data block (lba 0, owned by the snapshot's layer).
    let mut buf = snapblk_core::device::AlignedBuf::zeroed(4096);
    dev.read(&mut [ReadSeg {
        offset: DATA_START,
        buf: &mut buf,
    }])
    .unwrap();
    buf[9] ^= 1;
    dev.write(
        &[WriteSeg {
            offset: DATA_START,
            buf: &buf,
        }],
        false,
    )
    .unwrap();
    let rep = pool.scrub(&|_, _| {}).unwrap();
    assert_eq!(rep.bad.len(), 1, "{rep:?}");
    let b = &rep.bad[0];
    assert_eq!((b.lba, b.pba), (0, 0));
    assert!(b.detail.contains("crc32c"), "{}", b.detail);
    let mut affects = b.affects.clone();
    affects.sort();
    assert_eq!(affects, vec!["v".to_string(), "v@s".to_string()]);
}

/// Writes to `vol` that complete while `f` is inside a (slowed) store scan.
fn writes_during_scan(
    pool: &Pool,
    store: &CountingStore,
    vol: u64,
    f: impl FnOnce() + Send,
) -> u64 {
    store.slow.store(true, Ordering::SeqCst);
    let running = AtomicBool::new(true);
    let during = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            f();
            running.store(false, Ordering::SeqCst);
        });
        let mut n = 0u64;
        while running.load(Ordering::SeqCst) {
            let scanning = store.scanning.load(Ordering::SeqCst);
            pool.write(vol, (100 << 20) + (n % 1024) * 4096, &[2u8; 4096], false)
                .unwrap();
            if scanning && store.scanning.load(Ordering::SeqCst) {
                during.fetch_add(1, Ordering::SeqCst);
            }
            n += 1;
        }
    });
    store.slow.store(false, Ordering::SeqCst);
    during.load(Ordering::SeqCst)
}

/// `pool check`, `diff` and `snapshot info` (exclusive bytes) scan a store view, not the
/// store under the tree lock: writes keep completing while they scan the whole map
/// (before, every commit waited: 0 writes completed during the scan).
#[test]
fn long_scans_do_not_stall_writes() {
    let (pool, store, _) = mem_pool(256 << 20);
    pool.create_volume("v", 128 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![1u8; 64 << 20], false).unwrap(); // 16 Ki mapped blocks
    pool.create_snapshot("v", "a").unwrap();
    pool.write(id, 0, &vec![3u8; 64 << 20], false).unwrap();
    pool.create_snapshot("v", "b").unwrap();
    let (a, b) = (
        pool.resolve_target("v@a").unwrap(),
        pool.resolve_target("v@b").unwrap(),
    );
    let n = writes_during_scan(&pool, &store, id, || {
        assert!(pool.check().unwrap().is_clean());
    });
    assert!(
        n >= 20,
        "only {n} writes completed while pool check scanned the map"
    );
    let n = writes_during_scan(&pool, &store, id, || {
        let d = pool.diff(&a, &b).unwrap();
        assert_eq!(d.iter().map(|r| r.length).sum::<u64>(), 64 << 20);
    });
    assert!(
        n >= 20,
        "only {n} writes completed while diff scanned the map"
    );
    let n = writes_during_scan(&pool, &store, id, || {
        let info = pool.snapshot_info("v", "a").unwrap();
        assert_eq!(info.exclusive, Some(64 << 20));
    });
    assert!(
        n >= 20,
        "only {n} writes completed while snapshot info scanned the map"
    );
    assert!(pool.check().unwrap().is_clean());
}
