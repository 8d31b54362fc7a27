//! Pool behaviours on metadata format 2 (`Pool2`) and the costs issue 10 asks of it,
//! counted in store operations (gets, scans, batch operations) so that they hold on any
//! machine: live reads cost the same at 0 and 200 snapshots, reading the oldest snapshot is
//! bounded, a 1 MiB write is a handful of puts, deleting the oldest snapshot costs the same
//! on a 16 and a 64 MiB volume with the same churn, snapshot create is flat in data written.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::{DataDevice, ReadSeg, WriteSeg, DATA_START};
use snapblk_core::pool2::{OpenOptions, Pool2};
use snapblk_core::{Error, MetaStore, Target};
use snapblk_testkit::counting::CountingStore;
use snapblk_testkit::powerloss::Rng;

const BS: u64 = 4096;

/// A pool without the content cache: the store work counted is every read's own.
fn mem_pool(bytes: u64) -> (Arc<Pool2>, Arc<CountingStore>, Arc<MemDevice>) {
    mem_pool_with(bytes, 0)
}

/// Checksum consolidation off: its background steps would be counted with the work
/// measured (the tests of consolidation turn it on).
fn mem_pool_with(
    bytes: u64,
    content_cache: usize,
) -> (Arc<Pool2>, Arc<CountingStore>, Arc<MemDevice>) {
    mem_pool_opts(
        bytes,
        &OpenOptions {
            content_cache,
            consolidate: None,
            ..Default::default()
        },
    )
}

fn mem_pool_opts(
    bytes: u64,
    opts: &OpenOptions,
) -> (Arc<Pool2>, Arc<CountingStore>, Arc<MemDevice>) {
    let store = Arc::new(CountingStore::new());
    let dev = Arc::new(MemDevice::new(bytes));
    Pool2::format(&*store, &*dev).unwrap();
    let opts = opts.clone();
    let pool = Pool2::open_with(store.clone(), dev.clone(), &opts).unwrap();
    (pool, store, dev)
}

fn ops(s: &CountingStore) -> (u64, u64, u64) {
    (
        s.gets.load(Ordering::SeqCst),
        s.scans.load(Ordering::SeqCst),
        s.ops.load(Ordering::SeqCst),
    )
}

/// Store work of `f`: (gets, scans, batch operations).
fn cost(s: &CountingStore, f: impl FnOnce()) -> (u64, u64, u64) {
    let (g0, s0, o0) = ops(s);
    f();
    let (g1, s1, o1) = ops(s);
    (g1 - g0, s1 - s0, o1 - o0)
}

/// Fills `vol` (blocks) once, then takes `snaps` snapshots with `churn` random 4K writes
/// before each (never rewriting the volume: the worst case for a layer chain).
fn history(pool: &Pool2, vol: &str, blocks: u64, snaps: usize, churn: u64, seed: u64) {
    let id = pool.volume_id(vol).unwrap();
    for chunk in (0..blocks).step_by(256) {
        let n = 256.min(blocks - chunk);
        pool.write(id, chunk * BS, &vec![1u8; (n * BS) as usize], false)
            .unwrap();
    }
    let mut rng = Rng(seed);
    for s in 0..snaps {
        pool.create_snapshot(vol, &format!("s{s}")).unwrap();
        for _ in 0..churn {
            let b = rng.below(blocks);
            pool.write(id, b * BS, &[(s % 250) as u8 + 2; 4096], false)
                .unwrap();
        }
    }
}

#[test]
fn live_reads_cost_the_same_at_any_snapshot_count() {
    let (pool, store, _) = mem_pool(256 << 20);
    let blocks = 4096; // 16 MiB
    pool.create_volume("v", blocks * BS).unwrap();
    let id = pool.volume_id("v").unwrap();
    let measure = |pool: &Pool2| {
        let mut rng = Rng(7);
        cost(&store, || {
            let mut b = vec![0u8; 4096];
            for _ in 0..200 {
                pool.read(&Target::Volume(id), rng.below(blocks) * BS, &mut b)
                    .unwrap();
            }
        })
    };
    history(&pool, "v", blocks, 0, 0, 1);
    let at0 = measure(&pool);
    history(&pool, "v", blocks, 200, 41, 2); // ~1% churn per snapshot
    let at200 = measure(&pool);
    assert_eq!(
        at0, at200,
        "live 4K reads: (gets, scans, ops) at 0 vs 200 snapshots"
    );
    assert_eq!(at0.0, 200, "one page get per 4K read");
    // The oldest snapshot: a get and one scan of the page's dead records per read, which
    // stops at the first read checkpoint: about CHECKPOINT_EVERY records, not the ~94 dead
    // records a page of the oldest snapshot has here (format2.md §8a).
    let mut rng = Rng(9);
    let nexts0 = store.nexts.load(Ordering::SeqCst);
    let old = cost(&store, || {
        let mut b = vec![0u8; 4096];
        for _ in 0..200 {
            pool.read(
                &Target::Snapshot(id, "s0".into()),
                rng.below(blocks) * BS,
                &mut b,
            )
            .unwrap();
        }
    });
    assert!(
        old.0 <= 200 && old.1 <= 200,
        "oldest-snapshot reads: {old:?}"
    );
    let nexts = store.nexts.load(Ordering::SeqCst) - nexts0;
    let bound = 200 * (snapblk_core::v2::CHECKPOINT_EVERY + 2);
    assert!(
        nexts <= bound,
        "oldest-snapshot reads visited {nexts} records (bound {bound})"
    );
    // A clone of the oldest: one more (missing) local page get.
    pool.clone_snapshot("v", "s0", "c").unwrap();
    let c = pool.volume_id("c").unwrap();
    let clone = cost(&store, || {
        let mut b = vec![0u8; 4096];
        for _ in 0..200 {
            pool.read(&Target::Volume(c), rng.below(blocks) * BS, &mut b)
                .unwrap();
        }
    });
    assert!(
        clone.0 <= 400 && clone.1 <= 200,
        "clone-of-oldest reads: {clone:?}"
    );
}

/// Block `b` as written by `round` (a different pattern per block and round).
fn block_data(b: u64, round: u64) -> Vec<u8> {
    let tag = (b.wrapping_mul(31) ^ round.wrapping_mul(0x9E37)) as u8 | 1;
    let mut v = vec![tag; 4096];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&round.to_le_bytes());
    v
}

fn read_all(pool: &Pool2, t: &Target, blocks: u64) -> Vec<u8> {
    let mut out = vec![0u8; (blocks * BS) as usize];
    for (i, c) in out.chunks_mut(4096).enumerate() {
        pool.read(t, i as u64 * BS, c).unwrap();
    }
    out
}

/// Reads of a snapshot or a clone's inherited pages are answered from the content cache
/// once resolved (no store work), and what the cache answers stays right while the volume
/// and the clone change, neighbouring snapshots go and reclaim merges the dead records and
/// drops the read checkpoints the first answers came from. A live page (the volume's, the
/// clone's own) is never answered from it.
#[test]
fn snapshot_reads_repeat_from_the_content_cache_and_stay_right() {
    let (pool, store, _) = mem_pool_with(256 << 20, 8 << 20);
    let blocks = 2048; // 8 MiB: 32 pages
    pool.create_volume("v", blocks * BS).unwrap();
    let id = pool.volume_id("v").unwrap();
    let mut model: Vec<u64> = vec![0; blocks as usize]; // round that wrote each block
    for b in 0..blocks {
        pool.write(id, b * BS, &block_data(b, 0), false).unwrap();
    }
    let mut rng = Rng(11);
    let mut at_snap: Vec<Vec<u64>> = Vec::new();
    for s in 0..12u64 {
        pool.create_snapshot("v", &format!("s{s}")).unwrap();
        at_snap.push(model.clone());
        for _ in 0..100 {
            let b = rng.below(blocks);
            pool.write(id, b * BS, &block_data(b, s + 1), false)
                .unwrap();
            model[b as usize] = s + 1;
        }
    }
    let expect = |m: &[u64]| -> Vec<u8> {
        m.iter()
            .enumerate()
            .flat_map(|(b, r)| block_data(b as u64, *r))
            .collect()
    };
    let s2 = Target::Snapshot(id, "s2".into());
    let first = cost(&store, || {
        assert!(read_all(&pool, &s2, blocks) == expect(&at_snap[2]))
    });
    assert!(
        first.0 >= 32 && first.1 >= 32,
        "first read of s2: {first:?}"
    );
    let again = cost(&store, || {
        assert!(read_all(&pool, &s2, blocks) == expect(&at_snap[2]))
    });
    assert_eq!(
        (again.0, again.1),
        (0, 0),
        "s2 read again: every page from the cache"
    );
    // A clone of s2: its own (missing) page is a get each time; the base from the cache.
    pool.clone_snapshot("v", "s2", "c").unwrap();
    let c = pool.volume_id("c").unwrap();
    let clone = cost(&store, || {
        assert!(read_all(&pool, &Target::Volume(c), blocks) == expect(&at_snap[2]))
    });
    assert_eq!(
        clone.1, 0,
        "clone of s2: inherited pages from the cache: {clone:?}"
    );
    // The clone writes: its page is its own now, read live.
    let mut clone_model = at_snap[2].clone();
    for b in [0, 5, 64, 65, 2047] {
        pool.write(c, b * BS, &block_data(b, 99), false).unwrap();
        clone_model[b as usize] = 99;
    }
    assert!(read_all(&pool, &Target::Volume(c), blocks) == expect(&clone_model));
    // The volume changes, its neighbours go, reclaim merges what s2 reads from.
    for _ in 0..300 {
        let b = rng.below(blocks);
        pool.write(id, b * BS, &block_data(b, 50), false).unwrap();
        model[b as usize] = 50;
    }
    for s in [0, 1, 3, 4, 5, 6, 7, 8, 9, 10] {
        pool.delete_snapshot("v", &format!("s{s}")).unwrap();
    }
    pool.reclaim_all().unwrap();
    assert!(read_all(&pool, &Target::Volume(id), blocks) == expect(&model));
    let cached = cost(&store, || {
        assert!(read_all(&pool, &s2, blocks) == expect(&at_snap[2]))
    });
    assert_eq!((cached.0, cached.1), (0, 0), "s2 after reclaim: {cached:?}");
    // Epochs are not mixed up: s11, first read now, from the store.
    let s11 = Target::Snapshot(id, "s11".into());
    assert!(read_all(&pool, &s11, blocks) == expect(&at_snap[11]));
    assert!(read_all(&pool, &Target::Volume(c), blocks) == expect(&clone_model));
    // A snapshot of the clone: its unwritten pages are the base's, cached under the
    // clone's snapshot too (the second read does no store work at all).
    pool.create_snapshot("c", "cs").unwrap();
    let cs = Target::Snapshot(c, "cs".into());
    assert!(read_all(&pool, &cs, blocks) == expect(&clone_model));
    let again = cost(&store, || {
        assert!(read_all(&pool, &cs, blocks) == expect(&clone_model))
    });
    assert_eq!(
        (again.0, again.1),
        (0, 0),
        "clone snapshot read again: {again:?}"
    );
    // A backup-style pass (bulk reads) fills nothing.
    pool.create_snapshot("v", "s12").unwrap();
    let s12 = Target::Snapshot(id, "s12".into());
    let before = pool.content_cache_stats().entries;
    snapblk_core::meta::bulk_reads(|| assert!(read_all(&pool, &s12, blocks) == expect(&model)));
    assert_eq!(pool.content_cache_stats().entries, before);
    assert!(read_all(&pool, &s12, blocks) == expect(&model));
    assert_eq!(pool.content_cache_stats().entries, before + 32);
    let st = pool.content_cache_stats();
    assert!(st.hits >= 3 * 32 && st.entries >= 64, "{st:?}");
    assert!(st.bytes <= 8 << 20, "{st:?}");
    assert!(pool.check().unwrap().is_clean());
}

#[test]
fn a_one_mib_write_is_a_few_puts() {
    let (pool, store, _) = mem_pool(64 << 20);
    pool.create_volume("v", 16 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let (_, _, puts) = cost(&store, || pool.write(id, 0, &data, false).unwrap());
    // 4 pages + the lineage's counter + 1 allocation region (format 1: 256 map entries).
    assert!(puts <= 6, "a 1 MiB write committed {puts} operations");
    pool.create_snapshot("v", "s").unwrap();
    let (_, _, puts) = cost(&store, || pool.write(id, 0, &data, false).unwrap());
    // + 4 dead records + 4 change-index entries for the overwritten snapshot data.
    assert!(
        puts <= 14,
        "a 1 MiB overwrite after a snapshot committed {puts} operations"
    );
}

#[test]
fn snapshot_cost_does_not_grow_with_data() {
    let (pool, store, _) = mem_pool(256 << 20);
    pool.create_volume("v", 128 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    let mut costs = Vec::new();
    for round in 0..3u8 {
        pool.write(
            id,
            0,
            &vec![round + 1; (round as usize + 1) * (16 << 20)],
            false,
        )
        .unwrap();
        costs.push(cost(&store, || {
            drop(pool.create_snapshot("v", &format!("s{round}")).unwrap())
        }));
    }
    assert!(
        costs.iter().all(|&c| c == costs[0] && c.2 <= 5),
        "snapshot costs {costs:?}"
    );
}

/// Deleting the oldest snapshot costs what changed after it, not the volume size.
#[test]
fn oldest_snapshot_delete_is_flat_in_volume_size() {
    let mut costs = Vec::new();
    for blocks in [4096u64, 16384] {
        let (pool, store, _) = mem_pool((blocks * BS) * 3);
        pool.create_volume("v", blocks * BS).unwrap();
        history(&pool, "v", blocks, 3, 64, 5);
        pool.reclaim_all().unwrap();
        let c = cost(&store, || {
            pool.delete_snapshot("v", "s0").unwrap();
            pool.reclaim_all().unwrap();
        });
        assert!(pool.check().unwrap().is_clean());
        costs.push(c.0 + c.1 + c.2);
    }
    let ratio = costs[1] as f64 / costs[0] as f64;
    assert!(
        ratio <= 1.5,
        "oldest delete on 16 vs 64 MiB: {costs:?} store operations ({ratio:.2}x)"
    );
}

/// Rolling retention (create the newest, delete the oldest) costs the same every round.
#[test]
fn rolling_retention_cost_stays_flat() {
    let (pool, store, _) = mem_pool(128 << 20);
    let blocks = 8192;
    pool.create_volume("v", blocks * BS).unwrap();
    history(&pool, "v", blocks, 10, 80, 3);
    let id = pool.volume_id("v").unwrap();
    let mut rng = Rng(4);
    let mut costs = Vec::new();
    for r in 10..70 {
        for _ in 0..80 {
            pool.write(id, rng.below(blocks) * BS, &[7u8; 4096], false)
                .unwrap();
        }
        let c = cost(&store, || {
            pool.create_snapshot("v", &format!("s{r}")).unwrap();
            pool.delete_snapshot("v", &format!("s{}", r - 10)).unwrap();
            pool.reclaim_all().unwrap();
        });
        costs.push(c.0 + c.1 + c.2);
    }
    let early: u64 = costs[..10].iter().sum();
    let late: u64 = costs[50..].iter().sum();
    assert!(
        (late as f64) <= 1.3 * early as f64,
        "rolling retention: first 10 rounds {early}, last 10 rounds {late} store operations"
    );
    assert!(pool.check().unwrap().is_clean());
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
    let (pool, _, _) = mem_pool(DATA_START + 64 * 4096);
    pool.create_volume("v", 1 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![1u8; 60 * 4096], false).unwrap();
    let e = pool
        .write(id, 60 * 4096, &vec![2u8; 8 * 4096], false)
        .unwrap_err();
    assert!(matches!(e, Error::NoSpace { .. }), "{e}");
    let mut b = vec![0u8; 8 * 4096];
    pool.read(&Target::Volume(id), 60 * 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    pool.zero(id, 0, 32 * 4096, false).unwrap();
    pool.write(id, 60 * 4096, &vec![2u8; 8 * 4096], false)
        .unwrap();
    assert!(pool.check().unwrap().is_clean());
}

fn flip_bit(dev: &MemDevice, block: u64, byte: usize) {
    let mut buf = snapblk_core::device::AlignedBuf::zeroed(4096);
    let off = DATA_START + block * 4096;
    dev.read(&mut [ReadSeg {
        offset: off,
        buf: &mut buf,
    }])
    .unwrap();
    buf[byte] ^= 0x10;
    dev.write(
        &[WriteSeg {
            offset: off,
            buf: &buf,
        }],
        false,
    )
    .unwrap();
}

#[test]
fn corrupted_data_is_reported_never_returned() {
    let (pool, _, dev) = mem_pool(16 << 20);
    pool.create_volume("v", 1 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![7u8; 8192], false).unwrap();
    flip_bit(&dev, 1, 100);
    let mut out = vec![0u8; 4096];
    let e = pool.read(&Target::Volume(id), 4096, &mut out).unwrap_err();
    assert!(matches!(e, Error::Checksum(_)), "{e}");
    assert_eq!(e.errno(), 5);
}

/// Whole-block reads into a block-aligned buffer go straight from the device into it (the
/// NBD server reuses such buffers between requests): holes, zeroed ranges, trimmed blocks
/// and data must all overwrite whatever the buffer held, and a bad checksum still fails.
#[test]
fn aligned_reads_overwrite_the_whole_buffer() {
    use snapblk_core::device::AlignedBuf;
    let (pool, _, dev) = mem_pool(16 << 20);
    pool.create_volume("v", 1 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    let mut want = vec![0u8; 64 * 4096];
    for (b, fill) in [(3u64, 3u8), (4, 4), (10, 10), (40, 40), (41, 41)] {
        pool.write(id, b * BS, &[fill; 4096], false).unwrap();
        want[(b * BS) as usize..((b + 1) * BS) as usize].fill(fill);
    }
    pool.zero(id, 40 * BS, BS, false).unwrap();
    want[(40 * BS) as usize..(41 * BS) as usize].fill(0);
    pool.trim(id, 4 * BS, BS, false).unwrap();
    want[(4 * BS) as usize..(5 * BS) as usize].fill(0);
    pool.create_snapshot("v", "s").unwrap();
    let mut buf = AlignedBuf::zeroed(64 * 4096);
    for t in [Target::Volume(id), Target::Snapshot(id, "s".into())] {
        buf.fill(0xAA);
        pool.read(&t, 0, &mut buf).unwrap();
        assert!(buf[..] == want[..], "{t:?}: stale bytes left in the buffer");
    }
    flip_bit(&dev, 0, 7); // the data block of lba 3, the first one written
    buf.fill(0xAA);
    let e = pool.read(&Target::Volume(id), 0, &mut buf).unwrap_err();
    assert!(matches!(e, Error::Checksum(_)), "{e}");
}

/// Whole-block writes from block-aligned memory go to the device without the pool's
/// copy (restores build their runs in an AlignedVec): they must read back exactly,
/// checksummed, keep snapshots intact, and mixed with unaligned writes of the same
/// blocks the last write wins; the caller's buffer is free again on return.
#[test]
fn aligned_writes_go_straight_and_read_back() {
    use snapblk_core::device::{is_aligned, AlignedVec};
    let (pool, _, dev) = mem_pool(16 << 20);
    pool.create_volume("v", 1 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    let mut v = AlignedVec::default();
    v.extend_from_slice(&[5u8; 8 * 4096]);
    assert!(is_aligned(&v));
    pool.write(id, 8 * BS, &v, false).unwrap();
    pool.create_snapshot("v", "s").unwrap();
    v.clear();
    v.extend_from_slice(&[6u8; 4 * 4096]);
    pool.write(id, 10 * BS, &v, false).unwrap();
    v.clear();
    v.extend_from_slice(&[9u8; 4 * 4096]); // reusing the buffer changes nothing written
                                           // An unaligned slice of the same buffer (offset 1) takes the copying path.
    pool.write(id, 11 * BS, &v[1..4097], false).unwrap();
    let mut got = vec![0u8; 16 * 4096];
    pool.read(&Target::Volume(id), 0, &mut got).unwrap();
    let mut want = vec![0u8; 16 * 4096];
    want[8 * 4096..16 * 4096].fill(5);
    want[10 * 4096..14 * 4096].fill(6);
    want[11 * 4096..12 * 4096].fill(9);
    assert!(got == want, "volume contents");
    pool.read(&Target::Snapshot(id, "s".into()), 0, &mut got)
        .unwrap();
    let mut snap = vec![0u8; 16 * 4096];
    snap[8 * 4096..16 * 4096].fill(5);
    assert!(got == snap, "snapshot keeps the first write");
    flip_bit(&dev, 0, 7); // the first data block written (from the aligned buffer)
    let e = pool
        .read(&Target::Snapshot(id, "s".into()), 8 * BS, &mut got[..4096])
        .unwrap_err();
    assert!(matches!(e, Error::Checksum(_)), "{e}");
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
    let ranges = |d: Vec<snapblk_core::pool::diff::DiffRange>| {
        d.iter().map(|r| (r.offset, r.length)).collect::<Vec<_>>()
    };
    assert_eq!(ranges(pool.diff(&a, &b).unwrap()), vec![(8192, 8192)]);
    assert_eq!(
        ranges(pool.diff(&a, &Target::Volume(id)).unwrap()),
        vec![(8192, 8192), (1 << 20, 4096)]
    );
    assert_eq!(pool.diff(&b, &a).unwrap(), pool.diff(&a, &b).unwrap());
    pool.clone_snapshot("v", "a", "c").unwrap();
    let c = pool.volume_id("c").unwrap();
    pool.write(c, 0, &[9u8; 4096], false).unwrap();
    assert_eq!(
        ranges(pool.diff(&b, &Target::Volume(c)).unwrap()),
        vec![(0, 4096), (8192, 8192)]
    );
}

#[test]
fn deleting_snapshots_frees_exactly_their_exclusive_space() {
    let (pool, _, _) = mem_pool(64 << 20);
    pool.create_volume("v", 4 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![1u8; 1 << 20], false).unwrap(); // 256 blocks
    pool.create_snapshot("v", "old").unwrap();
    pool.write(id, 0, &vec![2u8; 512 << 10], false).unwrap(); // overwrite 128
    pool.create_snapshot("v", "mid").unwrap();
    pool.write(id, 0, &vec![3u8; 256 << 10], false).unwrap(); // overwrite 64
    pool.create_snapshot("v", "new").unwrap();
    let info = pool.snapshot_info("v", "old").unwrap();
    assert_eq!(pool.snapshot_summary("v", "old").unwrap().exclusive, None);
    assert_eq!(info.exclusive, Some(128 * 4096));
    assert_eq!(info.written, 256 * 4096);
    assert_eq!(
        pool.snapshot_info("v", "mid").unwrap().exclusive,
        Some(64 * 4096)
    );
    assert_eq!(pool.snapshot_info("v", "new").unwrap().exclusive, Some(0));
    pool.sync().unwrap();
    let used = |p: &Pool2| p.info().used;
    let u0 = used(&pool);
    pool.delete_snapshot("v", "mid").unwrap();
    pool.reclaim_all().unwrap();
    assert_eq!(u0 - used(&pool), 64 * 4096);
    assert_eq!(
        pool.snapshot_info("v", "old").unwrap().exclusive,
        Some(128 * 4096)
    );
    pool.delete_snapshot("v", "old").unwrap();
    pool.reclaim_all().unwrap();
    assert_eq!(u0 - used(&pool), (64 + 128) * 4096);
    let mut b = vec![0u8; 1 << 20];
    pool.read(&Target::Snapshot(id, "new".into()), 0, &mut b)
        .unwrap();
    assert!(b[..256 << 10].iter().all(|&x| x == 3));
    assert!(b[256 << 10..512 << 10].iter().all(|&x| x == 2));
    assert!(b[512 << 10..].iter().all(|&x| x == 1));
    assert!(pool.check().unwrap().is_clean());
    assert_eq!(pool.volume_info("v").unwrap().written, 0);
}

#[test]
fn scrub_names_bad_blocks_and_what_they_affect() {
    let (pool, _, dev) = mem_pool(16 << 20);
    pool.create_volume("v", 1 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    pool.write(id, 0, &vec![7u8; 8192], false).unwrap();
    pool.create_snapshot("v", "s").unwrap();
    pool.write(id, 65536, &vec![9u8; 4096], false).unwrap();
    pool.write(id, 0, &vec![8u8; 4096], false).unwrap(); // block 0 lives on in a dead record
    let clean = pool.scrub(&|_, _| {}).unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.blocks, 4);
    flip_bit(&dev, 0, 9);
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
    pool: &Pool2,
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

/// `pool check`, `diff` and `snapshot info` read store views: writes go on while they scan.
#[test]
fn long_scans_do_not_stall_writes() {
    let (pool, store, _) = mem_pool(512 << 20);
    pool.create_volume("v", 128 << 20).unwrap();
    let id = pool.volume_id("v").unwrap();
    let mut rng = Rng(3);
    for _ in 0..16384 {
        pool.write(id, rng.below(16384) * BS, &[1u8; 4096], false)
            .unwrap();
    }
    pool.create_snapshot("v", "a").unwrap();
    for _ in 0..16384 {
        pool.write(id, rng.below(16384) * BS, &[3u8; 4096], false)
            .unwrap();
    }
    pool.create_snapshot("v", "b").unwrap();
    let (a, b) = (
        pool.resolve_target("v@a").unwrap(),
        pool.resolve_target("v@b").unwrap(),
    );
    for (what, f) in [
        (
            "check",
            Box::new(|| assert!(pool.check().unwrap().is_clean())) as Box<dyn FnOnce() + Send>,
        ),
        ("diff", Box::new(|| drop(pool.diff(&a, &b).unwrap()))),
        (
            "snapshot info",
            Box::new(|| drop(pool.snapshot_info("v", "a").unwrap())),
        ),
    ] {
        let n = writes_during_scan(&pool, &store, id, f);
        assert!(n >= 20, "only {n} writes completed while {what} scanned");
    }
    assert!(pool.check().unwrap().is_clean());
}

/// Application records (policies, job state) are kept with the pool, listed by prefix,
/// durable across a reopen, bounded, and invisible to the pool's own check.
#[test]
fn records_are_kept_listed_by_prefix_and_bounded() {
    let (pool, store, dev) = mem_pool(16 << 20);
    pool.put_record("policy/b", Some(b"2".to_vec())).unwrap();
    pool.put_record("policy/a", Some(b"1".to_vec())).unwrap();
    pool.put_record("job/snapshot:a", Some(b"{}".to_vec()))
        .unwrap();
    pool.put_record("policy/a", Some(b"one".to_vec())).unwrap();
    let got = pool.records("policy/").unwrap();
    assert_eq!(
        got,
        vec![
            ("policy/a".into(), b"one".to_vec()),
            ("policy/b".into(), b"2".to_vec())
        ]
    );
    pool.put_record("policy/b", None).unwrap();
    assert!(pool.put_record("", Some(vec![])).is_err());
    assert!(pool.put_record(&"x".repeat(256), Some(vec![])).is_err());
    assert!(pool
        .put_record("big", Some(vec![0; (1 << 20) + 1]))
        .is_err());
    assert!(pool.check().unwrap().is_clean());
    pool.shutdown().unwrap();
    drop(pool);
    let pool = Pool2::open(store, dev).unwrap();
    assert_eq!(pool.records("").unwrap().len(), 2);
    assert_eq!(pool.records("job/").unwrap()[0].0, "job/snapshot:a");
}

/// A group snapshot is one cut (issue 13, acceptance 3): a writer stamps a sequence number
/// into volumes a, b, c in that order, each write acknowledged before the next; in every
/// group snapshot taken meanwhile no member is ahead of one written before it, and a is at
/// most one step ahead of c. (Snapshotting the members one by one fails this: c is taken
/// last and sees later writes than a.)
#[test]
fn group_snapshots_are_one_cut() {
    let (pool, _, _) = mem_pool(64 << 20);
    let names = ["a", "b", "c"];
    let ids: Vec<_> = names
        .iter()
        .map(|n| {
            pool.create_volume(n, 1 << 20).unwrap();
            pool.volume_id(n).unwrap()
        })
        .collect();
    let stop = AtomicBool::new(false);
    let seq_of = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap());
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let mut block = vec![0u8; 4096];
                block[..4].copy_from_slice(&i.to_le_bytes());
                for id in &ids {
                    pool.write(*id, 0, &block, false).unwrap();
                }
            }
            i
        });
        for k in 0..40 {
            pool.create_snapshots(&names, &format!("g{k}")).unwrap();
            std::thread::sleep(std::time::Duration::from_micros(300));
        }
        stop.store(true, Ordering::SeqCst);
        assert!(writer.join().unwrap() > 40, "the writer barely ran");
    });
    let mut ahead = 0;
    for k in 0..40 {
        let seqs: Vec<u32> = ids
            .iter()
            .map(|id| {
                let mut b = vec![0u8; 4096];
                pool.read(&Target::Snapshot(*id, format!("g{k}")), 0, &mut b)
                    .unwrap();
                seq_of(&b)
            })
            .collect();
        assert!(
            seqs[0] >= seqs[1] && seqs[1] >= seqs[2] && seqs[0] - seqs[2] <= 1,
            "group snapshot g{k} is not one cut: a, b, c at {seqs:?}"
        );
        ahead += usize::from(seqs[0] != seqs[2]);
    }
    // All or nothing: a taken name on one member makes none.
    pool.create_snapshot("b", "only-b").unwrap();
    assert!(pool.create_snapshots(&names, "only-b").is_err());
    assert!(pool.snapshot_summary("a", "only-b").is_err());
    assert!(pool.create_snapshots(&["a", "a"], "twice").is_err());
    let _ = ahead; // how often the cut fell inside a round: depends on timing only
}

/// ORIGIN is a clone's source snapshot only (as ZFS shows it): a volume rolled back to its
/// own snapshot has none, a clone names its snapshot and keeps it when rolled back to one
/// of its own.
#[test]
fn origin_is_a_clones_source_only() {
    let (pool, _, _) = mem_pool(16 << 20);
    pool.create_volume("v", 1 << 20).unwrap();
    pool.create_snapshot("v", "s1").unwrap();
    pool.create_snapshot("v", "s2").unwrap();
    assert_eq!(pool.volume_info("v").unwrap().origin, None);
    pool.rollback("v", "s1").unwrap();
    assert_eq!(
        pool.volume_info("v").unwrap().origin,
        None,
        "rolled back to its own snapshot"
    );
    pool.clone_snapshot("v", "s2", "c").unwrap();
    assert_eq!(
        pool.volume_info("c").unwrap().origin.as_deref(),
        Some("v@s2")
    );
    pool.create_snapshot("c", "cs").unwrap();
    pool.rollback("c", "cs").unwrap();
    assert_eq!(
        pool.volume_info("c").unwrap().origin.as_deref(),
        Some("v@s2")
    );
}

/// Two volumes written at the same time, 1 MiB each in turn (two guests copying files):
/// each one's data stays in runs of whole 16 MiB chunks on the device, not interleaved
/// per request (plain first fit left 64 runs per volume here).
#[test]
fn volumes_written_together_keep_their_data_contiguous() {
    // With checksum consolidation on: its blocks take chunks of their own, not holes in
    // the volumes' streams.
    let (pool, _, _) = mem_pool_opts(256 << 20, &OpenOptions::default());
    let mib = 1u64 << 20;
    for v in ["a", "b"] {
        pool.create_volume(v, 64 * mib).unwrap();
    }
    let ids = [pool.volume_id("a").unwrap(), pool.volume_id("b").unwrap()];
    for i in 0..64u64 {
        for (k, id) in ids.iter().enumerate() {
            let data = vec![(i as u8) ^ (k as u8) | 1; mib as usize];
            pool.write(*id, i * mib, &data, false).unwrap();
        }
    }
    for id in ids {
        let plan = pool
            .plan_read(&Target::Volume(id), 0, (64 * mib) as usize)
            .unwrap();
        let mut buf = vec![0u8; (64 * mib) as usize];
        let segs = plan.device_reads(&mut buf);
        assert!(
            segs.len() <= 4,
            "volume {id}: 64 MiB in {} device runs",
            segs.len()
        );
        assert!(segs.iter().all(|s| s.buf.len() as u64 >= 16 * mib));
    }
    wait_consolidated(&pool, 2 * 64 * 256);
}

/// Waits until `blocks` data blocks' CRCs are in checksum blocks.
fn wait_consolidated(pool: &Pool2, blocks: u64) {
    let t0 = std::time::Instant::now();
    while pool.checksum_stats().blocks_moved < blocks {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "consolidation stalled: {:?}",
            pool.checksum_stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Store bytes (keys and values) of live pages.
fn page_bytes(store: &CountingStore) -> u64 {
    let mut n = 0;
    store
        .scan(b"p", b"q", &mut |k, v| {
            n += (k.len() + v.len()) as u64;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    n
}

/// Checksum consolidation (format2.md §9b) end to end: 1 MiB writes move their CRCs into
/// checksum blocks (page records shrink ~6x), every byte reads back through them, before
/// and after a reopen (empty checksum-block cache), `check` and `scrub` are clean, and a
/// damaged checksum block makes the reads it covers fail and scrub report every block it
/// covers — never a read of unverified data.
#[test]
fn large_writes_move_their_checksums_to_the_data_device() {
    let mib = 1u64 << 20;
    let (pool, store, dev) = mem_pool_opts(256 << 20, &OpenOptions::default());
    pool.create_volume("v", 64 * mib).unwrap();
    let id = pool.volume_id("v").unwrap();
    let fill = |i: u64| -> Vec<u8> { (0..mib).map(|b| (b.wrapping_mul(31) ^ i) as u8).collect() };
    for i in 0..64u64 {
        pool.write(id, i * mib, &fill(i), false).unwrap();
    }
    wait_consolidated(&pool, 64 * 256);
    // The same writes with consolidation off, to compare.
    let inline = {
        let (p, s, _) = mem_pool(256 << 20);
        p.create_volume("v", 64 * mib).unwrap();
        let v = p.volume_id("v").unwrap();
        for i in 0..64u64 {
            p.write(v, i * mib, &fill(i), false).unwrap();
        }
        page_bytes(&s)
    };
    let stats = pool.checksum_stats();
    assert_eq!(stats.blocks_written, 16, "{stats:?}");
    let moved = page_bytes(&store);
    assert!(moved * 5 < inline, "page bytes {inline} -> {moved}");
    let read_all = |pool: &Pool2| {
        for i in 0..64u64 {
            let mut out = vec![0u8; mib as usize];
            pool.read(&Target::Volume(id), i * mib, &mut out).unwrap();
            assert!(out == fill(i), "MiB {i}");
        }
    };
    read_all(&pool);
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
    assert!(pool.scrub(&|_, _| {}).unwrap().is_clean());
    pool.create_snapshot("v", "s").unwrap();
    pool.write(id, 3 * mib + 8192, &[9u8; 8192], false).unwrap();
    let mut b = vec![0u8; 4096];
    pool.read(&Target::Volume(id), 3 * mib + 8192, &mut b)
        .unwrap();
    assert_eq!(b, vec![9u8; 4096]);
    drop(pool);

    let pool = Pool2::open_with(store.clone(), dev.clone(), &OpenOptions::default()).unwrap();
    read_all_at(&pool, "v", "s", &fill);
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
    assert!(
        pool.checksum_stats().loads > 0,
        "reads loaded checksum blocks"
    );
    // Damage the first checksum block on the device.
    let mut first = None;
    store
        .scan(b"b", b"c", &mut |k, _| {
            first = Some(u64::from_be_bytes(k[1..9].try_into().unwrap()));
            std::ops::ControlFlow::Break(())
        })
        .unwrap();
    let at = first.expect("a checksum block");
    drop(pool);
    let mut junk = snapblk_core::device::AlignedBuf::zeroed(4096);
    junk[17] = 1;
    dev.write(
        &[WriteSeg {
            offset: DATA_START + at * BS,
            buf: &junk,
        }],
        true,
    )
    .unwrap();
    let pool = Pool2::open_with(store.clone(), dev.clone(), &OpenOptions::default()).unwrap();
    let mut bad_reads = 0;
    for i in 0..64u64 {
        let mut out = vec![0u8; mib as usize];
        match pool.read(&Target::Volume(id), i * mib, &mut out) {
            Ok(()) => assert!(i == 3 || out == fill(i), "MiB {i} read wrong data"),
            Err(e) => {
                assert!(e.to_string().contains("checksum block"), "{e}");
                bad_reads += 1;
            }
        }
    }
    assert_eq!(bad_reads, 4, "one checksum block covers 4 MiB");
    let scrub = pool.scrub(&|_, _| {}).unwrap();
    assert_eq!(scrub.bad.len(), 1024, "every block the damaged one covers");
    assert!(scrub
        .bad
        .iter()
        .all(|b| b.detail.contains(&format!("checksum block {at}"))));
}

/// Pieces written while consolidation was off (as by a pool written before it existed, or
/// offers dropped or still queued at close) are found by a sweep over the live pages once
/// a daemon's pool runs background work, and move into checksum blocks like fresh ones;
/// small pieces stay inline, a closed lineage's pieces (a volume rolled back: its old
/// lineage's pages stay while the snapshot does) are not offered, a one-shot open
/// (background off) sweeps nothing, and every byte reads back, check and scrub clean.
/// Fails without the sweep (nothing ever offers those pieces again).
#[test]
fn pieces_left_inline_are_swept_into_checksum_blocks() {
    let mib = 1u64 << 20;
    let (pool, store, dev) = mem_pool(256 << 20);
    pool.create_volume("v", 32 * mib).unwrap();
    let id = pool.volume_id("v").unwrap();
    let fill = |i: u64| -> Vec<u8> { (0..mib).map(|b| (b.wrapping_mul(17) ^ i) as u8).collect() };
    for i in 0..32u64 {
        pool.write(id, i * mib, &fill(i), false).unwrap();
    }
    pool.create_snapshot("v", "s").unwrap();
    // Two small writes after the snapshot: pieces of 2 blocks stay inline.
    pool.write(id, 5 * mib, &[3u8; 8192], false).unwrap();
    pool.write(id, 9 * mib + 4096, &[4u8; 8192], false).unwrap();
    let inline = page_bytes(&store);
    // A volume rolled back to its snapshot: its first lineage, closed, keeps 8 MiB of
    // inline pieces in its live pages.
    pool.create_volume("w", 8 * mib).unwrap();
    let w = pool.volume_id("w").unwrap();
    pool.write(w, 0, &vec![5u8; 8 * mib as usize], false)
        .unwrap();
    pool.create_snapshot("w", "k").unwrap();
    pool.rollback("w", "k").unwrap();
    let closed = page_bytes(&store) - inline;
    drop(pool);

    // A one-shot open: background work off, no sweep.
    let pool = Pool2::open_with(store.clone(), dev.clone(), &OpenOptions::default()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1300));
    assert_eq!(
        pool.checksum_stats().swept,
        0,
        "{:?}",
        pool.checksum_stats()
    );
    drop(pool);

    let pool = Pool2::open_with(store.clone(), dev.clone(), &OpenOptions::default()).unwrap();
    pool.start_background();
    // 32 MiB less the 4 blocks rewritten since and the 1-block piece left before the
    // second small write (below the 16 blocks worth a slot run).
    wait_consolidated(&pool, 32 * 256 - 5);
    let stats = pool.checksum_stats();
    assert_eq!(stats.sweeps, 1, "{stats:?}");
    assert_eq!(stats.blocks_moved, 32 * 256 - 5, "{stats:?}");
    assert_eq!(stats.swept, 32 * 256 - 5, "only open lineages: {stats:?}");
    // The closed lineage's pages are as they were.
    let moved = page_bytes(&store) - closed;
    assert!(moved * 4 < inline, "page bytes {inline} -> {moved}");
    let check = |pool: &Pool2| {
        let snap = Target::Snapshot(id, "s".into());
        for i in 0..32u64 {
            let mut out = vec![0u8; mib as usize];
            pool.read(&snap, i * mib, &mut out).unwrap();
            assert!(out == fill(i), "snapshot MiB {i}");
            let mut want = fill(i);
            match i {
                5 => want[..8192].fill(3),
                9 => want[4096..12288].fill(4),
                _ => {}
            }
            pool.read(&Target::Volume(id), i * mib, &mut out).unwrap();
            assert!(out == want, "MiB {i}");
        }
        let w = pool.volume_id("w").unwrap();
        let mut out = vec![0u8; 8 * mib as usize];
        pool.read(&Target::Volume(w), 0, &mut out).unwrap();
        assert!(out == vec![5u8; 8 * mib as usize], "w rolled back");
        let report = pool.check().unwrap();
        assert!(report.is_clean(), "{:?}", report.errors);
        assert!(pool.scrub(&|_, _| {}).unwrap().is_clean());
    };
    check(&pool);
    drop(pool);
    // Reopened: nothing left to sweep, the same content.
    let pool = Pool2::open_with(store.clone(), dev.clone(), &OpenOptions::default()).unwrap();
    pool.start_background();
    let t0 = std::time::Instant::now();
    while pool.checksum_stats().sweeps == 0 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        pool.checksum_stats().swept,
        0,
        "{:?}",
        pool.checksum_stats()
    );
    check(&pool);
}

/// Every MiB of volume `v` and its snapshot `s` (taken before MiB 3 was partly rewritten)
/// reads as `fill` says.
fn read_all_at(pool: &Pool2, v: &str, s: &str, fill: &dyn Fn(u64) -> Vec<u8>) {
    let mib = 1u64 << 20;
    let id = pool.volume_id(v).unwrap();
    let snap = Target::Snapshot(id, s.to_string());
    for i in 0..64u64 {
        let mut out = vec![0u8; mib as usize];
        pool.read(&snap, i * mib, &mut out).unwrap();
        assert!(out == fill(i), "snapshot MiB {i}");
        pool.read(&Target::Volume(id), i * mib, &mut out).unwrap();
        if i == 3 {
            assert_eq!(&out[8192..16384], &[9u8; 8192][..]);
        } else {
            assert!(out == fill(i), "MiB {i}");
        }
    }
}
