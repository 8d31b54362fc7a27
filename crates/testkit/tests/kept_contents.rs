//! Snapshot contents kept in the store's derived key space (format2.md §8c) across the
//! events that could make a kept entry wrong: a restart, metadata put back from an older
//! copy while the derived entries stay newer, and a pool made anew in the same directory.
//! Every test reads with no RAM tier, so each answer it checks came from the store tier
//! or from the map.

use std::ops::ControlFlow;
use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::meta::{MemStore, MetaStore, WriteBatch};
use snapblk_core::pool2::{OpenOptions, Pool2};
use snapblk_core::Target;
use snapblk_rocks::{Memory, RocksStore};

const BS: u64 = 4096;
const BLOCKS: u64 = 256; // 4 pages

/// Block `b` as written in `round` (round 0: never written, zeros).
fn block(b: u64, round: u64) -> Vec<u8> {
    if round == 0 {
        return vec![0; 4096];
    }
    let mut v = vec![(b ^ round.wrapping_mul(13)) as u8 | 1; 4096];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&round.to_le_bytes());
    v
}

fn opts() -> OpenOptions {
    OpenOptions {
        content_cache: 0,
        ..Default::default()
    }
}

fn write(pool: &Pool2, blocks: std::ops::Range<u64>, round: u64, model: &mut [u64]) {
    let id = pool.volume_id("v").unwrap();
    for b in blocks {
        pool.write(id, b * BS, &block(b, round), false).unwrap();
        model[b as usize] = round;
    }
}

/// Reads snapshot `snap` of "v" whole and compares it with `model`, block by block.
fn check_snapshot(pool: &Pool2, snap: &str, model: &[u64]) {
    let id = pool.volume_id("v").unwrap();
    let mut got = vec![0u8; (BLOCKS * BS) as usize];
    pool.read(&Target::Snapshot(id, snap.into()), 0, &mut got)
        .unwrap_or_else(|e| panic!("reading snapshot {snap}: {e}"));
    for b in 0..BLOCKS {
        let off = (b * BS) as usize;
        assert!(
            got[off..off + 4096] == block(b, model[b as usize])[..],
            "snapshot {snap} block {b}: read round {}, expected {}",
            u64::from_le_bytes(got[off + 8..off + 16].try_into().unwrap()),
            model[b as usize]
        );
    }
}

fn derived_entries(store: &dyn MetaStore) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    store
        .derived_scan(&[], &[0xff], &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            ControlFlow::Continue(())
        })
        .unwrap();
    out
}

/// A RocksDB store keeping derived entries (64 MiB) in `dir`.
fn disk_store(dir: &std::path::Path, create: bool) -> Arc<RocksStore> {
    let memory = Memory {
        derived: 64 << 20,
        ..Memory::ONE_SHOT
    };
    Arc::new(RocksStore::open_with(dir, create, memory).unwrap())
}

/// A new pool on `store` and `dev` with volume "v", opened without a RAM tier.
fn new_pool(store: Arc<dyn MetaStore>, dev: Arc<MemDevice>) -> Arc<Pool2> {
    Pool2::format(&*store, &*dev).unwrap();
    let pool = Pool2::open_with(store, dev, &opts()).unwrap();
    pool.create_volume("v", BLOCKS * BS).unwrap();
    pool
}

#[test]
fn kept_contents_answer_snapshot_reads_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new(64 << 20));
    let mut model = vec![0u64; BLOCKS as usize];
    let at_s;
    {
        let pool = new_pool(disk_store(dir.path(), true), dev.clone());
        write(&pool, 0..BLOCKS, 1, &mut model);
        pool.create_snapshot("v", "s").unwrap();
        at_s = model.clone();
        write(&pool, 10..100, 2, &mut model);
        check_snapshot(&pool, "s", &at_s);
        let st = pool.content_cache_stats();
        assert_eq!(st.stored_hits, 0, "{st:?}");
        pool.shutdown().unwrap();
    }
    let store = disk_store(dir.path(), false);
    let pool = Pool2::open_with(store.clone(), dev, &opts()).unwrap();
    check_snapshot(&pool, "s", &at_s);
    let st = pool.content_cache_stats();
    assert_eq!(
        (st.misses, st.stored_hits),
        (4, 4),
        "every page of s from the kept contents: {st:?}"
    );
    // `pool check` compares them with the map, and names one that differs.
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.errors);
    assert_eq!(report.kept_contents, 4);
    let entries = derived_entries(&*store);
    let (_, v) = &entries[1];
    let (k2, _) = &entries[2];
    store.derived_put(k2, v).unwrap();
    let report = pool.check().unwrap();
    assert_eq!(report.error_count, 1, "{:?}", report.errors);
    assert!(
        report.errors[0].contains("differs from the map"),
        "{:?}",
        report.errors
    );
    store.derived_put(k2, &v[..v.len() - 1]).unwrap();
    let report = pool.check().unwrap();
    assert!(
        report.errors[0].contains("does not decode"),
        "{:?}",
        report.errors
    );
}

/// The metadata is put back from a copy taken before a snapshot existed, but the derived
/// entries read since stay: the snapshot's epoch is then taken again by another snapshot
/// with other contents. The sweep at open must drop the old entries (checked to fail
/// without it: the new snapshot read the old one's blocks).
#[test]
fn metadata_put_back_from_an_older_copy_does_not_see_newer_kept_contents() {
    let dev = Arc::new(MemDevice::new(64 << 20));
    let a = Arc::new(MemStore::new());
    let mut model = vec![0u64; BLOCKS as usize];
    let b = Arc::new(MemStore::new());
    {
        let pool = new_pool(a.clone(), dev.clone());
        write(&pool, 0..BLOCKS, 1, &mut model);
        pool.create_snapshot("v", "s0").unwrap();
        pool.sync().unwrap();
        // The copy: every key of the map as of now.
        let mut copy = WriteBatch::new();
        a.scan(&[], &[0xff], &mut |k, v| {
            copy.put(k.to_vec(), v.to_vec());
            ControlFlow::Continue(())
        })
        .unwrap();
        b.commit(copy, true).unwrap();
        // Later history on the original: s1 over blocks 0..8 of round 2, then read.
        let mut later = model.clone();
        write(&pool, 0..8, 2, &mut later);
        pool.create_snapshot("v", "s1").unwrap();
        let at_s1 = later.clone();
        write(&pool, 0..BLOCKS, 3, &mut later);
        check_snapshot(&pool, "s1", &at_s1);
        pool.shutdown().unwrap();
    }
    let kept = derived_entries(&*a);
    assert!(!kept.is_empty());
    for (k, v) in &kept {
        b.derived_put(k, v).unwrap();
    }
    // The older copy goes on: its own s1, at the same epoch, over other blocks.
    let pool = Pool2::open_with(b.clone(), dev, &opts()).unwrap();
    write(&pool, 100..108, 4, &mut model);
    pool.create_snapshot("v", "s1").unwrap();
    let at_s1 = model.clone();
    write(&pool, 0..BLOCKS, 5, &mut model);
    check_snapshot(&pool, "s1", &at_s1);
    check_snapshot(&pool, "s0", &vec![1; BLOCKS as usize]);
}

/// A pool made anew in the same metadata directory (the RocksDB files removed, the
/// derived database left): its lineage and epochs start over, so the old entries would
/// name retained epochs of the new pool. The derived database is bound to its RocksDB
/// database and starts empty (checked to fail without that binding).
#[test]
fn a_pool_made_anew_in_the_same_directory_starts_without_kept_contents() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u64; BLOCKS as usize];
    {
        let dev = Arc::new(MemDevice::new(64 << 20));
        let pool = new_pool(disk_store(dir.path(), true), dev);
        write(&pool, 0..BLOCKS, 1, &mut model);
        pool.create_snapshot("v", "s").unwrap();
        let at_s = model.clone();
        write(&pool, 0..BLOCKS, 2, &mut model);
        check_snapshot(&pool, "s", &at_s);
        pool.shutdown().unwrap();
    }
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "derived" {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    assert!(dir.path().join("derived").is_dir());
    let dev = Arc::new(MemDevice::new(64 << 20));
    let store = disk_store(dir.path(), true);
    assert!(derived_entries(&*store).is_empty(), "old entries kept");
    let pool = new_pool(store, dev);
    let mut model = vec![0u64; BLOCKS as usize];
    write(&pool, 0..BLOCKS / 2, 7, &mut model);
    pool.create_snapshot("v", "s").unwrap();
    let at_s = model.clone();
    write(&pool, 0..BLOCKS, 8, &mut model);
    check_snapshot(&pool, "s", &at_s);
}

/// An open that does not keep the contents up to date (a one-shot command, or a daemon
/// with `snapshot_cache_disk = "0"`) may change the pool without sweeping them; it removes
/// them, so no later open trusts entries that missed its changes.
#[test]
fn an_open_that_does_not_keep_contents_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDevice::new(64 << 20));
    let mut model = vec![0u64; BLOCKS as usize];
    {
        let pool = new_pool(disk_store(dir.path(), true), dev.clone());
        write(&pool, 0..BLOCKS, 1, &mut model);
        pool.create_snapshot("v", "s").unwrap();
        check_snapshot(&pool, "s", &model);
        pool.shutdown().unwrap();
    }
    assert!(dir.path().join("derived/OWNER").is_file());
    drop(RocksStore::open_with(dir.path(), false, Memory::ONE_SHOT).unwrap());
    assert!(!dir.path().join("derived").exists());
    let store = disk_store(dir.path(), false);
    assert!(store.derived() && derived_entries(&*store).is_empty());
}
