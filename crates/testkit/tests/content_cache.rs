//! Snapshot and clone reads through the content cache (format2.md §8b) while everything
//! else runs: two readers read kept snapshots and a clone of one of them (single pages and
//! requests spanning several, so both the first-page store get and the reader's gets are
//! used) and compare every byte with what the snapshot held when it was taken, while a
//! writer overwrites the volume, a manager takes and deletes other snapshots (their
//! reclaim merging the dead records and dropping the read checkpoints the kept snapshots'
//! first answers came from), on RocksDB with small memtables (table files, flushes,
//! compactions, kept iterators refreshed) and a cache too small for the pages read
//! (entries are evicted and resolved again). Run twice: with the RAM tier alone, and with
//! no RAM tier and the contents kept in the store's derived database (format2.md §8c).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::pool2::{OpenOptions, Pool2};
use snapblk_core::Target;
use snapblk_rocks::{Memory, RocksStore};
use snapblk_testkit::powerloss::Rng;

const BS: u64 = 4096;
const BLOCKS: u64 = 4096; // 16 MiB: 64 pages

/// Block `b` as written in `round`.
fn block(b: u64, round: u64) -> Vec<u8> {
    let mut v = vec![(b ^ round.wrapping_mul(7)) as u8 | 1; 4096];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&round.to_le_bytes());
    v
}

#[test]
fn snapshot_and_clone_reads_stay_right_under_writes_deletes_and_reclaim() {
    // 4 sequentially written pages per shard (64 in all): fewer than the 128 (lineage,
    // epoch, page) entries the readers visit.
    let st = reads_under_load(Memory::ONE_SHOT, 16 * 2048);
    assert!(st.hits > 0 && st.misses > 0, "{st:?}");
    assert!(st.bytes <= 16 * 2048, "{st:?}");
    assert_eq!(st.stored_hits, 0, "{st:?}");
}

#[test]
fn snapshot_and_clone_reads_stay_right_from_contents_kept_in_the_store() {
    let memory = Memory {
        derived: 64 << 20,
        ..Memory::ONE_SHOT
    };
    let st = reads_under_load(memory, 0);
    assert!(st.stored_hits > 0 && st.stored_bytes > 0, "{st:?}");
    assert_eq!(st.stored_errors, 0, "{st:?}");
}

fn reads_under_load(memory: Memory, ram: usize) -> snapblk_core::v2::cache::CacheStats {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open_with(dir.path(), true, memory).unwrap());
    let dev = Arc::new(MemDevice::new(512 << 20));
    Pool2::format(&*store, &*dev).unwrap();
    let opts = OpenOptions {
        checkpoint_every: 2,
        content_cache: ram,
        ..Default::default()
    };
    let pool = Pool2::open_with(store, dev, &opts).unwrap();
    pool.start_background();
    pool.create_volume("v", BLOCKS * BS).unwrap();
    let id = pool.volume_id("v").unwrap();
    let mut model = vec![0u64; BLOCKS as usize];
    for chunk in (0..BLOCKS).step_by(64) {
        let data: Vec<u8> = (chunk..chunk + 64).flat_map(|b| block(b, 0)).collect();
        pool.write(id, chunk * BS, &data, false).unwrap();
    }
    // Two kept snapshots with history between and above them, and a clone of the first.
    let mut rng = Rng(5);
    let mut kept = Vec::new();
    for (k, round) in [(0u64, 1u64), (1, 2)] {
        pool.create_snapshot("v", &format!("k{k}")).unwrap();
        kept.push(model.clone());
        for _ in 0..600 {
            let b = rng.below(BLOCKS);
            pool.write(id, b * BS, &block(b, round), false).unwrap();
            model[b as usize] = round;
        }
    }
    pool.clone_snapshot("v", "k0", "c").unwrap();
    let c = pool.volume_id("c").unwrap();
    let targets: Vec<(Target, Vec<u64>)> = vec![
        (Target::Snapshot(id, "k0".into()), kept[0].clone()),
        (Target::Snapshot(id, "k1".into()), kept[1].clone()),
        (Target::Volume(c), kept[0].clone()),
    ];
    let stop = AtomicBool::new(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    // Every loop also ends a while past the deadline: a failing thread must fail the
    // test, not leave the others running.
    let over = || {
        stop.load(Ordering::Relaxed)
            || std::time::Instant::now() > deadline + std::time::Duration::from_secs(30)
    };
    std::thread::scope(|s| {
        for seed in [11u64, 12] {
            let (pool, targets, over) = (&pool, &targets, &over);
            s.spawn(move || {
                let mut rng = Rng(seed);
                let mut reads = 0u64;
                while !over() {
                    let (t, m) = &targets[rng.below(targets.len() as u64) as usize];
                    // 1 block, or up to 3 pages from a random block.
                    let n = if rng.below(2) == 0 {
                        1
                    } else {
                        1 + rng.below(192)
                    };
                    let b0 = rng.below(BLOCKS - n);
                    let mut got = vec![0u8; (n * BS) as usize];
                    pool.read(t, b0 * BS, &mut got).unwrap();
                    for i in 0..n {
                        let b = b0 + i;
                        let off = (i * BS) as usize;
                        assert!(
                            got[off..off + 4096] == block(b, m[b as usize])[..],
                            "{t:?} block {b}: read round {}, expected {}",
                            u64::from_le_bytes(got[off + 8..off + 16].try_into().unwrap()),
                            m[b as usize]
                        );
                    }
                    reads += 1;
                }
                assert!(reads > 100, "only {reads} reads");
            });
        }
        let (pool, stop, over) = (&pool, &stop, &over);
        s.spawn(move || {
            let mut rng = Rng(21);
            let mut round = 10;
            while !over() {
                for _ in 0..64 {
                    let b = rng.below(BLOCKS);
                    pool.write(id, b * BS, &block(b, round), false).unwrap();
                }
                round += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        s.spawn(move || {
            let mut i = 0;
            while std::time::Instant::now() < deadline {
                pool.create_snapshot("v", &format!("t{i}")).unwrap();
                if i >= 2 {
                    pool.delete_snapshot("v", &format!("t{}", i - 2)).unwrap();
                }
                if i % 4 == 3 {
                    pool.reclaim_all().unwrap();
                }
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            stop.store(true, Ordering::Relaxed);
            assert!(i > 10, "only {i} snapshot rounds");
        });
    });
    let st = pool.content_cache_stats();
    pool.reclaim_all().unwrap();
    assert!(pool.check().unwrap().is_clean());
    st
}
