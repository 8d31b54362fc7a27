//! The backup engine end to end on an in-memory pool and a directory repository:
//! full and incremental backups restore byte for byte, clones dedup, interrupted backups
//! resume without re-uploading, damage is named and never restored, prune + gc leave only
//! referenced chunks while every remaining backup still restores.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use snapblk_backup::file::FileStore;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::store::ObjectStore;
use snapblk_backup::volume::{backup_snapshot, restore_volume};
use snapblk_backup::{gc, manifest, prune, verify, BackupError, NoProgress, Repository};
use snapblk_core::{Export, Pool, VolumeHandle};

mod common;
use common::{image, Call, Hooked, Op, MIB};

fn pool() -> Arc<Pool> {
    common::pool(512 * MIB)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn write(pool: &Arc<Pool>, vol: &str, off: u64, len: usize, rng: &mut Rng) {
    let mut b = vec![0u8; len];
    rng.fill(&mut b);
    VolumeHandle::open(pool, vol)
        .unwrap()
        .write(off, &b, false)
        .unwrap();
}

fn snap(pool: &Arc<Pool>, vol: &str, s: &str) -> String {
    pool.create_snapshot(vol, s).unwrap();
    format!("{vol}@{s}")
}

fn repo(dir: &std::path::Path, chunk: u32) -> Repository {
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(dir));
    let opts = InitOptions {
        chunk_size: chunk,
        pack_size: 1 << 20,
        ..Default::default()
    };
    Repository::init(store, b"test key", &opts).unwrap()
}

fn restored_equals(pool: &Arc<Pool>, r: &Repository, name: &str, as_vol: &str) {
    restore_volume(pool, r, name, None, as_vol, &NoProgress).unwrap();
    assert!(
        image(pool, name) == image(pool, as_vol),
        "{as_vol} differs from {name}"
    );
}

#[test]
fn full_incremental_clone_dedup_prune_gc() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool();
    let r = repo(dir.path(), 64 << 10);
    let mut rng = Rng(7);
    p.create_volume("v", 32 * MIB).unwrap();
    write(&p, "v", 0, 8 * MIB as usize, &mut rng);
    write(&p, "v", 20 * MIB + 4096, 100_000, &mut rng);
    let s1 = snap(&p, "v", "s1");
    let b1 = backup_snapshot(&p, &r, &s1, false, &NoProgress).unwrap();
    assert!(b1.base.is_none());
    assert!(
        b1.stats.bytes_read <= 9 * MIB,
        "only allocated cells are read"
    );
    // Same snapshot again: nothing to do.
    assert!(
        backup_snapshot(&p, &r, &s1, false, &NoProgress)
            .unwrap()
            .already_stored
    );

    // 1% of the volume changes, in cell-aligned 64 KiB writes.
    for i in 0..5u64 {
        write(&p, "v", (i * 7 + 1) * MIB, 64 << 10, &mut rng);
    }
    let s2 = snap(&p, "v", "s2");
    let b2 = backup_snapshot(&p, &r, &s2, false, &NoProgress).unwrap();
    assert_eq!(b2.base.as_deref(), Some(b1.manifest.as_str()));
    assert_eq!(b2.stats.bytes_read, 5 * (64 << 10));
    assert!(
        b2.stats.bytes_uploaded <= 5 * (64 << 10) * 105 / 100 + 4096,
        "{:?}",
        b2.stats
    );

    // Two clones of s2: their shared data is stored once.
    p.clone_snapshot("v", "s2", "c1").unwrap();
    p.clone_snapshot("v", "s2", "c2").unwrap();
    write(&p, "c1", 3 * MIB, 64 << 10, &mut rng);
    write(&p, "c2", 4 * MIB, 64 << 10, &mut rng);
    let c1 = snap(&p, "c1", "x");
    let c2 = snap(&p, "c2", "x");
    let bc1 = backup_snapshot(&p, &r, &c1, true, &NoProgress).unwrap();
    let bc2 = backup_snapshot(&p, &r, &c2, true, &NoProgress).unwrap();
    for b in [&bc1, &bc2] {
        assert_eq!(
            b.stats.chunks_new, 1,
            "only the clone's own cell is new: {:?}",
            b.stats
        );
        assert!(b.stats.chunks_reused > 100);
    }

    for (name, as_vol) in [(&s1, "r1"), (&s2, "r2"), (&c1, "rc1"), (&c2, "rc2")] {
        restored_equals(&p, &r, name, as_vol);
    }
    let rep = verify::run(&r, true, 2, &NoProgress).unwrap();
    assert!(rep.is_clean(), "{:?}", rep.problems);
    assert_eq!(rep.chunks_unreferenced, 0);

    // Keep the newest backup of each volume; everything else goes.
    let out = prune::run(
        &r,
        &prune::Policy {
            keep_last: 1,
            ..Default::default()
        },
        &Default::default(),
        false,
    )
    .unwrap();
    assert_eq!(out.removed.len(), 1, "{out:?}");
    let before = verify::run(&r, false, 2, &NoProgress).unwrap();
    assert!(
        before.chunks_unreferenced > 0,
        "s1's overwritten cells are unreferenced now"
    );
    let opts = gc::Options {
        grace_secs: 0,
        max_unused: 0.0,
        dry_run: false,
    };
    let g = gc::run(&r, &opts, &NoProgress).unwrap();
    assert!(g.packs_repacked + g.packs_deleted > 0, "{g:?}");
    let after = verify::run(&r, true, 2, &NoProgress).unwrap();
    assert!(after.is_clean(), "{:?}", after.problems);
    assert_eq!(after.chunks_unreferenced, 0, "unreferenced chunks are gone");
    for (name, as_vol) in [(&s2, "r2b"), (&c1, "rc1b"), (&c2, "rc2b")] {
        restored_equals(&p, &r, name, as_vol);
    }
    // A second gc finds nothing to do.
    let g2 = gc::run(&r, &opts, &NoProgress).unwrap();
    assert_eq!(
        (g2.packs_deleted, g2.packs_repacked, g2.packs_condemned),
        (0, 0, 0)
    );
}

#[test]
fn damage_is_named_and_never_restored() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool();
    let r = repo(dir.path(), 64 << 10);
    let mut rng = Rng(11);
    p.create_volume("v", 8 * MIB).unwrap();
    write(&p, "v", 0, 4 * MIB as usize, &mut rng);
    let s = snap(&p, "v", "s");
    backup_snapshot(&p, &r, &s, false, &NoProgress).unwrap();
    let packs = r.store().list("packs/").unwrap();
    let victim = &packs[0].key;
    let mut bytes = std::fs::read(dir.path().join(victim)).unwrap();
    bytes[1000] ^= 0x10;
    std::fs::write(dir.path().join(victim), &bytes).unwrap();

    let rep = verify::run(&r, true, 2, &NoProgress).unwrap();
    assert_eq!(rep.problems.len(), 1, "{:?}", rep.problems);
    assert!(rep.problems[0].object.starts_with("chunk "));
    assert_eq!(rep.problems[0].affects, vec![s.clone()]);
    let err = restore_volume(&p, &r, &s, None, "bad", &NoProgress).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(rep.problems[0].object.trim_start_matches("chunk ")),
        "{msg}"
    );
    assert!(
        p.volume_info("bad").is_err(),
        "the partial volume is removed"
    );

    // Wrong key and missing repository are clear errors.
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(dir.path()));
    assert!(matches!(
        Repository::open(store, b"other"),
        Err(BackupError::WrongKey(_))
    ));
    let none: Arc<dyn ObjectStore> = Arc::new(FileStore::new(dir.path().join("nothing")));
    assert!(matches!(
        Repository::open(none, b"k"),
        Err(BackupError::NoRepository(_))
    ));
}

#[test]
fn a_rotating_verify_reads_every_pack_once_per_round_and_finds_damage_in_its_part() {
    use snapblk_backup::verify::{part_of, run_with, ReadData};
    let dir = tempfile::tempdir().unwrap();
    let p = pool();
    let r = repo(dir.path(), 64 << 10);
    let mut rng = Rng(12);
    p.create_volume("v", 16 * MIB).unwrap();
    write(&p, "v", 0, 12 * MIB as usize, &mut rng);
    let s = snap(&p, "v", "s");
    backup_snapshot(&p, &r, &s, false, &NoProgress).unwrap();
    let all = verify::run(&r, true, 2, &NoProgress).unwrap();
    assert!(all.packs >= 6, "{} packs: too few to split", all.packs);
    let n = 3;
    let parts: Vec<_> = (0..n)
        .map(|k| run_with(&r, ReadData::Part(k, n), 2, &NoProgress).unwrap())
        .collect();
    assert_eq!(parts.iter().map(|x| x.packs).sum::<u64>(), all.packs);
    assert_eq!(
        parts.iter().map(|x| x.bytes_read).sum::<u64>(),
        all.bytes_read
    );
    assert!(
        parts.iter().all(|x| x.packs < all.packs),
        "parts are not all the same"
    );
    // Damage one pack: only the run of its part sees it.
    let packs = r.store().list("packs/").unwrap();
    let victim = &packs[0].key;
    let mut bytes = std::fs::read(dir.path().join(victim)).unwrap();
    bytes[1000] ^= 0x10;
    std::fs::write(dir.path().join(victim), &bytes).unwrap();
    let k = part_of(victim.rsplit('/').next().unwrap(), n);
    for j in 0..n {
        let rep = run_with(&r, ReadData::Part(j, n), 2, &NoProgress).unwrap();
        assert_eq!(rep.is_clean(), j != k, "part {j} (damage in {k})");
    }
    assert!(run_with(&r, ReadData::None, 2, &NoProgress)
        .unwrap()
        .is_clean());
}

#[test]
fn a_copy_to_another_repository_restores_chains_and_resumes() {
    use snapblk_backup::copy;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = pool();
    let a = repo(da.path(), 64 << 10);
    // Another key: no chunk id is shared between the two.
    let b = {
        let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(db.path()));
        let opts = InitOptions {
            chunk_size: 64 << 10,
            pack_size: 1 << 20,
            ..Default::default()
        };
        Repository::init(store, b"another key", &opts).unwrap()
    };
    let mut rng = Rng(21);
    p.create_volume("v", 16 * MIB).unwrap();
    write(&p, "v", 0, 8 * MIB as usize, &mut rng);
    let s1 = snap(&p, "v", "s1");
    backup_snapshot(&p, &a, &s1, false, &NoProgress).unwrap();
    write(&p, "v", 2 * MIB, 256 << 10, &mut rng);
    let s2 = snap(&p, "v", "s2");
    backup_snapshot(&p, &a, &s2, false, &NoProgress).unwrap();

    let out = copy::run(&a, &b, None, None, &NoProgress).unwrap();
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|c| !c.summary.already_stored));
    // The second copy is incremental: only the changed cells are read from the source.
    let second = &out[1].summary;
    assert!(second.base.is_some(), "{second:?}");
    assert!(
        second.stats.bytes_read <= 512 << 10,
        "read {} bytes for a 256 KiB change",
        second.stats.bytes_read
    );
    // Identity kept: the pool's own backups find them, restores equal the snapshots.
    let listed = snapblk_backup::catalog::load_pool(&b, p.uuid())
        .unwrap()
        .unwrap()
        .catalog
        .backups;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|h| h.pool == p.uuid()));
    restored_equals(&p, &b, &s1, "r1");
    restored_equals(&p, &b, &s2, "r2");
    assert!(verify::run(&b, true, 2, &NoProgress).unwrap().is_clean());
    // Again: nothing to do.
    let again = copy::run(&a, &b, None, None, &NoProgress).unwrap();
    assert!(again.iter().all(|c| c.summary.already_stored));
    // A direct backup of a later snapshot to the copy's repository is incremental against
    // the copied one and dedups against its chunks.
    write(&p, "v", 0, 64 << 10, &mut rng);
    let s3 = snap(&p, "v", "s3");
    let direct = backup_snapshot(&p, &b, &s3, false, &NoProgress).unwrap();
    assert!(direct.base.is_some());
    assert!(direct.stats.bytes_read <= 128 << 10, "{direct:?}");
    restored_equals(&p, &b, &s3, "r3");
    // Filters: an unknown host is an error, a volume filter copies nothing new here.
    assert!(copy::run(&a, &b, Some("nohost"), None, &NoProgress).is_err());
    assert!(copy::run(&a, &b, None, Some("w"), &NoProgress)
        .unwrap()
        .is_empty());
}

/// A directory store with injected faults: every pack `put` after the first
/// `allow_puts` fails, and ranged reads (chunk fetches) fail while the returned flag
/// (`down` at first) is set.
fn faulty(dir: &std::path::Path, allow_puts: u64, down: bool) -> (Hooked, Arc<AtomicBool>) {
    let down = Arc::new(AtomicBool::new(down));
    let (is_down, puts) = (Arc::clone(&down), AtomicU64::new(0));
    let store = Hooked::new(Arc::new(FileStore::new(dir)), move |c| match c {
        Call::Before(Op::GetRange { key, .. }) if is_down.load(Ordering::SeqCst) => {
            Err(common::store_failure("get", key, "503 Slow Down"))
        }
        // Only pack puts count (and fail), so every stored pack also gets its index
        // whatever order the parallel uploaders run in.
        Call::Before(Op::Put(key))
            if key.starts_with("packs/") && puts.fetch_add(1, Ordering::SeqCst) >= allow_puts =>
        {
            Err(common::store_failure("put", key, "connection refused"))
        }
        _ => Ok(()),
    });
    (store, down)
}

/// gc with a grace period of a second and no repacking.
const GRACE_1S: gc::Options = gc::Options {
    grace_secs: 1,
    max_unused: 0.0,
    dry_run: false,
};

/// A repository in a new directory whose only backup (4 MiB of random data from `seed`,
/// snapshot `v@s1` of the pool returned) was forgotten: all its packs are garbage.
fn forgotten_backup(seed: u64) -> (tempfile::TempDir, Arc<Pool>, Repository, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = pool();
    let r = repo(dir.path(), 64 << 10);
    let mut rng = Rng(seed);
    p.create_volume("v", 8 * MIB).unwrap();
    write(&p, "v", 0, 4 * MIB as usize, &mut rng);
    let s1 = snap(&p, "v", "s1");
    let b1 = backup_snapshot(&p, &r, &s1, false, &NoProgress).unwrap();
    prune::forget(
        &r,
        std::slice::from_ref(&b1.manifest),
        None,
        prune::OnHold::Refuse,
    )
    .unwrap();
    (dir, p, r, s1)
}

#[test]
fn a_gc_that_died_between_its_deletes_leaves_no_mark_for_good() {
    let (dir, _p, r, _) = forgotten_backup(12);
    let opts = GRACE_1S;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let g = gc::run(&r, &opts, &NoProgress).unwrap();
    assert!(g.packs_condemned >= 2 && g.packs_deleted == 0, "{g:?}");
    // The next gc dies after deleting a pack and its index, before its mark.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let dying: Arc<dyn ObjectStore> = Arc::new(Hooked::new(
        Arc::new(FileStore::new(dir.path())),
        |c| match c {
            Call::Before(Op::Delete(key)) if key.starts_with("trash/") => {
                Err(common::store_failure("delete", key, "killed"))
            }
            _ => Ok(()),
        },
    ));
    let rd = Repository::open(dying, b"test key").unwrap();
    let err = gc::run(&rd, &opts, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("killed"), "{err}");
    let names = |prefix: &str| -> Vec<String> {
        let mut v: Vec<String> = r
            .store()
            .list(prefix)
            .unwrap()
            .into_iter()
            // (An index object's key is `ix/<time>-<pack>-<size>`.)
            .filter_map(|o| {
                let name = o.key.rsplit('/').next()?;
                Some(name.split('-').nth(1).unwrap_or(name).to_string())
            })
            .collect();
        v.sort();
        v
    };
    let (packs, indexes) = (names("packs/"), names("ix/"));
    let stray: Vec<String> = names("trash/")
        .into_iter()
        .filter(|m| !packs.contains(m) && !indexes.contains(m))
        .collect();
    assert_eq!(stray.len(), 1, "one pack went, its mark stayed");
    // The next gc removes the stray mark (no visit reached it before: gc visits
    // indexed packs) and finishes the rest.
    let g = gc::run(&r, &opts, &NoProgress).unwrap();
    assert!(g.stray_marks_deleted >= 1, "{g:?}");
    assert!(names("trash/").is_empty(), "{:?}", names("trash/"));
    assert!(names("packs/").is_empty() && names("ix/").is_empty());
}

#[test]
fn interrupted_backup_resumes_without_reuploading() {
    let dir = tempfile::tempdir().unwrap();
    let p = pool();
    repo(dir.path(), 64 << 10);
    let mut rng = Rng(3);
    p.create_volume("v", 16 * MIB).unwrap();
    write(&p, "v", 0, 12 * MIB as usize, &mut rng);
    let s = snap(&p, "v", "s");
    // Four packs and their indexes get stored, then pack puts fail.
    let flaky: Arc<dyn ObjectStore> = Arc::new(faulty(dir.path(), 4, false).0);
    let r1 = Repository::open(flaky, b"test key").unwrap();
    let err = backup_snapshot(&p, &r1, &s, false, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("connection refused"), "{err}");
    let (h, _) = manifest::list(&r1).unwrap();
    assert!(h.is_empty(), "no manifest for a failed backup");
    let stored_before: u64 = r1.store().list("ix/").unwrap().len() as u64;
    assert!(stored_before >= 3);

    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(dir.path()));
    let r2 = Repository::open(store, b"test key").unwrap();
    let b = backup_snapshot(&p, &r2, &s, false, &NoProgress).unwrap();
    assert!(b.stats.chunks_reused >= stored_before * 10, "{:?}", b.stats);
    assert_eq!(b.stats.chunks_new + b.stats.chunks_reused, 12 * 16);
    restored_equals(&p, &r2, &s, "r");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random writes and snapshots, each backed up (full or incremental, random chunk
    /// size); every backup restores to exactly its snapshot.
    #[test]
    fn every_backup_restores_exactly(
        seed in 1u64..u64::MAX,
        chunk_shift in 12u32..18,
        steps in proptest::collection::vec((0u64..(6 << 20), 1usize..300_000, any::<bool>()), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = pool();
        let r = repo(dir.path(), 1 << chunk_shift);
        let mut rng = Rng(seed);
        p.create_volume("v", 6 * MIB + 8192).unwrap();
        let mut snaps = Vec::new();
        for (i, (off, len, full)) in steps.into_iter().enumerate() {
            let len = len.min((6 * MIB + 8192 - off) as usize);
            write(&p, "v", off, len, &mut rng);
            let s = snap(&p, "v", &format!("s{i}"));
            backup_snapshot(&p, &r, &s, full, &NoProgress).unwrap();
            snaps.push(s);
        }
        for (i, s) in snaps.iter().enumerate() {
            restored_equals(&p, &r, s, &format!("r{i}"));
        }
    }
}

#[test]
fn lazy_restore_serves_exact_data_eio_during_outage_and_keeps_writes() {
    use snapblk_backup::lazy::{LazyExports, Restores};
    use snapblk_backup::volume::restore_lazy;
    use snapblk_core::{ExportProvider, PoolExports};

    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let p = pool();
    let r = repo(dir.path(), 64 << 10);
    let mut rng = Rng(5);
    p.create_volume("v", 24 * MIB).unwrap();
    write(&p, "v", 0, 20 * MIB as usize, &mut rng);
    let s = snap(&p, "v", "s");
    backup_snapshot(&p, &r, &s, false, &NoProgress).unwrap();
    let want = image(&p, &s);

    let (store, outage) = faulty(dir.path(), u64::MAX, true);
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let r2 = Repository::open(store, b"test key").unwrap();
    let restores = Arc::new(Restores::default());
    let hyd = restore_lazy(&p, &r2, &s, None, "lazy", &restores, state.path()).unwrap();
    let exports = LazyExports {
        inner: Arc::new(PoolExports(Arc::clone(&p))),
        restores: Arc::clone(&restores),
        pool: Arc::clone(&p),
    };
    let e = exports.open("lazy").unwrap();
    // The store is down: reads fail with EIO, never zeros.
    let mut buf = vec![0u8; 128 << 10];
    let err = e.read(5 * MIB, &mut buf).unwrap_err();
    assert_eq!(err.errno(), libc_eio(), "{err}");
    assert_eq!(
        e.block_status(0, 24 * MIB).unwrap(),
        vec![(24 * MIB, 0)],
        "unhydrated is data"
    );
    // Back up: reads return the backed-up bytes, a write in the middle of a cell sticks.
    outage.store(false, Ordering::SeqCst);
    e.read(5 * MIB, &mut buf).unwrap();
    assert!(buf[..] == want[5 * MIB as usize..5 * MIB as usize + buf.len()]);
    e.write(7 * MIB + 4096, &[0xab; 4096], false).unwrap();
    e.flush().unwrap();
    for _ in 0..600 {
        if hyd.is_complete() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(hyd.is_complete(), "{:?}", hyd.status());
    let mut got = image(&p, "lazy");
    assert!(got[7 * MIB as usize + 4096..7 * MIB as usize + 8192]
        .iter()
        .all(|b| *b == 0xab));
    got[7 * MIB as usize + 4096..7 * MIB as usize + 8192]
        .copy_from_slice(&want[7 * MIB as usize + 4096..7 * MIB as usize + 8192]);
    assert!(got == want, "hydrated volume differs from the snapshot");
    assert!(
        std::fs::read_dir(state.path()).unwrap().next().is_none(),
        "state files removed"
    );
}

fn libc_eio() -> i32 {
    5
}

/// Garbage collection's first phase only marks; a backup then stores marked chunks again
/// rather than referencing them, so deleting the marked packs later loses nothing.
#[test]
fn gc_marks_first_and_backups_avoid_marked_chunks() {
    let (_dir, p, r, _) = forgotten_backup(9);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let opts = GRACE_1S;
    let g = gc::run(&r, &opts, &NoProgress).unwrap();
    assert!(g.packs_condemned > 0 && g.packs_deleted == 0, "{g:?}");
    // Same data again: the marked chunks are not reused.
    let s2 = snap(&p, "v", "s2");
    let b2 = backup_snapshot(&p, &r, &s2, true, &NoProgress).unwrap();
    assert_eq!(b2.stats.chunks_reused, 0, "{:?}", b2.stats);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let g2 = gc::run(&r, &opts, &NoProgress).unwrap();
    assert_eq!(g2.packs_deleted, g.packs_condemned, "{g2:?}");
    restored_equals(&p, &r, &s2, "r");
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());
}
