//! Index generations (repository format 5; docs/design.md §12 "Index generations"): a
//! job's listings do not grow with the packs stored, gc's generation and deletions keep
//! every job's view right when gc dies between them, a rolled-back generation is refused,
//! and `repo upgrade` from format 4 waits for running jobs and keeps every backup.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapblk_backup::file::FileStore;
use snapblk_backup::generation::{self, Generation};
use snapblk_backup::lease::Lease;
use snapblk_backup::pack::PackBuilder;
use snapblk_backup::repo::{self, InitOptions};
use snapblk_backup::store::ObjectStore;
use snapblk_backup::volume::{backup_snapshot, restore_volume};
use snapblk_backup::{gc, index, prune, verify, BackupError, NoProgress, Repository};
use snapblk_core::Pool;

mod common;
use common::{image, put, random_bytes, same, Call, Hooked, Op, MIB};

fn init(dir: &std::path::Path, version: u32) -> Repository {
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(dir));
    let opts = InitOptions {
        chunk_size: 64 << 10,
        pack_size: 1 << 20,
        version,
        ..Default::default()
    };
    Repository::init(store, b"k", &opts).unwrap()
}

/// The repository in `dir` through a store counting LIST pages (one per 1,000 keys
/// returned, at least one per request, as S3 pages them).
fn counted(dir: &std::path::Path, pages: Arc<AtomicU64>) -> Repository {
    let store = Hooked::new(Arc::new(FileStore::new(dir)), move |c| {
        if let Call::Listed(_, v) = c {
            pages.fetch_add(v.len().div_ceil(1000).max(1) as u64, Ordering::SeqCst);
        }
        Ok(())
    });
    Repository::open(Arc::new(store), b"k").unwrap()
}

/// Adds `n` one-chunk packs with their index objects straight into the repository's
/// directory (what `n` backups of one new chunk each would leave), as the repository's
/// format names them.
fn add_tiny_packs(dir: &std::path::Path, r: &Repository, n: usize, seed: u64) {
    // Written an hour ago: before the cut of the generation the next gc writes (a job
    // lists the index objects of the last 15 minutes before it, whatever they are).
    let t0 = (repo::now() - 3600) * 1000;
    for i in 0..n {
        let data = random_bytes(64, (seed * 1_000_000 + i as u64) * 2 + 1);
        let mut b = PackBuilder::default();
        b.add(r.keys().chunk_id(&data), &r.keys().seal(&data, b"tiny"));
        let p = b.finish(r.keys());
        let size = p.bytes.len() as u64;
        let index_key = if r.config().version >= 5 {
            index::ix_key(t0 + i as u64, &p.id, size)
        } else {
            repo::index_key(&p.id)
        };
        for (key, bytes) in [(repo::pack_key(&p.id), &p.bytes), (index_key, &p.index)] {
            let path = dir.join(key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }
}

/// LIST pages of a 1% incremental backup of `v` (one 64 KiB chunk of a 4 MiB volume
/// changed) into the repository in `dir`.
fn backup_pages(p: &Arc<Pool>, dir: &std::path::Path, snap: &str, seed: u64) -> u64 {
    put(p, "v", 64 << 10, &random_bytes(64 << 10, seed));
    p.create_snapshot("v", snap).unwrap();
    let pages = Arc::new(AtomicU64::new(0));
    let r = counted(dir, Arc::clone(&pages));
    backup_snapshot(p, &r, &format!("v@{snap}"), false, &NoProgress).unwrap();
    pages.load(Ordering::SeqCst)
}

/// The pages of a backup with 1,000 and then 5,000 packs stored (each count followed by
/// a gc, as a repository that is collected regularly).
fn pages_at_1000_and_5000(version: u32) -> (u64, u64) {
    let d = tempfile::tempdir().unwrap();
    let r = init(d.path(), version);
    let p = common::pool(64 * MIB);
    p.create_volume("v", 4 * MIB).unwrap();
    put(&p, "v", 0, &random_bytes(4 * MIB as usize, 1));
    p.create_snapshot("v", "base").unwrap();
    backup_snapshot(&p, &r, "v@base", false, &NoProgress).unwrap();
    add_tiny_packs(d.path(), &r, 1_000, 1);
    gc::run(&r, &gc::Options::default(), &NoProgress).unwrap();
    let at_1000 = backup_pages(&p, d.path(), "a", 3);
    add_tiny_packs(d.path(), &r, 4_000, 2);
    gc::run(&r, &gc::Options::default(), &NoProgress).unwrap();
    let at_5000 = backup_pages(&p, d.path(), "b", 5);
    restore_volume(&p, &r, "v@b", None, "rb", &NoProgress).unwrap();
    assert!(same(&p, "v@b", "rb"));
    (at_1000, at_5000)
}

/// The tests' first item (design.md): a backup's LIST pages are the same with 1,000 and
/// 5,000 packs stored. Format 4, which lists `index/` and `packs/` whole at each of its
/// index loads, is measured alongside: its count grows (so this test fails on the code
/// before format 5).
#[test]
fn a_backups_listings_do_not_grow_with_the_packs_stored() {
    let (v5_1000, v5_5000) = pages_at_1000_and_5000(5);
    let (v4_1000, v4_5000) = pages_at_1000_and_5000(4);
    eprintln!(
        "LIST pages of a backup: format 5 {v5_1000} -> {v5_5000}, format 4 {v4_1000} -> {v4_5000}"
    );
    assert_eq!(v5_1000, v5_5000, "format 5 lists more with more packs");
    assert!(v4_5000 >= v4_1000 + 8, "format 4: {v4_1000} -> {v4_5000}");
}

fn backed_up_pool(r: &Repository) -> (Arc<Pool>, Vec<String>) {
    let p = common::pool(64 * MIB);
    p.create_volume("v", 4 * MIB).unwrap();
    let mut names = Vec::new();
    for (k, s) in ["a", "b"].iter().enumerate() {
        // (Odd seeds: random_bytes sets the lowest bit.)
        put(
            &p,
            "v",
            0,
            &random_bytes(2 * MIB as usize, 21 + 2 * k as u64),
        );
        p.create_snapshot("v", s).unwrap();
        let b = backup_snapshot(&p, r, &format!("v@{s}"), false, &NoProgress).unwrap();
        names.push(b.manifest);
    }
    (p, names)
}

/// Restores `v@<s>` as `r<s>` and checks it holds the snapshot's bytes.
fn restores_exactly(p: &Arc<Pool>, r: &Repository, s: &str) {
    let (snap, into) = (format!("v@{s}"), format!("r{s}"));
    restore_volume(p, r, &snap, None, &into, &NoProgress).unwrap();
    assert!(same(p, &snap, &into), "{into} differs from {snap}");
}

const NOW: gc::Options = gc::Options {
    grace_secs: 0,
    max_unused: 0.0,
    dry_run: false,
};

/// gc writes its generation before any deletion; killed right after it (at its first
/// pack delete), it leaves packs the generation no longer names but that still exist:
/// jobs ignore them (a new backup stores its chunks again), every backup restores, and
/// the next gc deletes them.
#[test]
fn a_gc_killed_between_its_generation_and_its_deletes_leaves_every_job_right() {
    let d = tempfile::tempdir().unwrap();
    let r = init(d.path(), 5);
    let (p, ids) = backed_up_pool(&r);
    prune::forget(&r, &ids[..1], None, prune::OnHold::Refuse).unwrap();
    let heads = || generation::list(&r).unwrap().0.len();
    let before = heads();
    let ops: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&ops);
    let dying = Hooked::new(Arc::new(FileStore::new(d.path())), move |c| match c {
        Call::Before(Op::PutNew(k)) if k.starts_with("gen/") => {
            log.lock().unwrap().push(format!("head {k}"));
            Ok(())
        }
        Call::Before(Op::Delete(k)) if k.starts_with("packs/") => {
            log.lock().unwrap().push(format!("delete {k}"));
            Err(common::store_failure("delete", k, "killed"))
        }
        _ => Ok(()),
    });
    let rd = Repository::open(Arc::new(dying), b"k").unwrap();
    let e = gc::run(&rd, &NOW, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("killed"), "{e}");
    let ops = ops.lock().unwrap().clone();
    assert!(
        ops.first().is_some_and(|o| o.starts_with("head gen/")),
        "the generation is stored before any pack is deleted: {ops:?}"
    );
    assert_eq!(heads(), before + 1);
    // The first backup's packs exist, unnamed by the newest generation.
    let listing = index::Listing::view(&r).unwrap();
    let full = index::Listing::take(&r).unwrap();
    assert!(
        full.indexes.len() > listing.indexes.len(),
        "gc deleted before its generation?"
    );
    // Jobs go on: the same data backed up again is stored again, everything restores.
    put(&p, "v", 0, &random_bytes(2 * MIB as usize, 21));
    p.create_snapshot("v", "c").unwrap();
    let c = backup_snapshot(&p, &r, "v@c", false, &NoProgress).unwrap();
    assert!(
        c.stats.chunks_new > 0,
        "deduplicated against packs gc is deleting"
    );
    for s in ["b", "c"] {
        restores_exactly(&p, &r, s);
    }
    // The next gc finishes.
    let g = gc::run(&r, &NOW, &NoProgress).unwrap();
    assert!(g.packs_deleted > 0, "{g:?}");
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());
    let after = index::Listing::take(&r).unwrap();
    assert_eq!(
        after.indexes.len(),
        index::Listing::view(&r).unwrap().indexes.len()
    );
}

/// A job refuses a newest generation below the one its host saw (newer heads deleted)
/// or another head of the number it saw (replaced), as catalogs are refused.
#[test]
fn a_rolled_back_or_replaced_generation_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let r = init(d.path(), 5).with_marks(Some(snapblk_backup::marks::Marks::new(state.path())));
    let (p, _) = backed_up_pool(&r);
    gc::run(&r, &gc::Options::default(), &NoProgress).unwrap();
    let (heads, _) = generation::list(&r).unwrap();
    let newest = heads.last().unwrap().0;
    assert!(newest >= 2);
    index::Listing::view(&r).unwrap();
    // Rolled back: the newest head deleted.
    let head = d.path().join(generation::head_key(newest));
    let saved = std::fs::read(&head).unwrap();
    std::fs::remove_file(&head).unwrap();
    let e = index::Listing::view(&r).err().unwrap();
    assert!(matches!(e, BackupError::IndexRolledBack { .. }), "{e}");
    let e = restore_volume(&p, &r, "v@b", None, "rb", &NoProgress).unwrap_err();
    assert!(e.to_string().contains("rolled back"), "{e}");
    // Replaced: another generation of that number, however well sealed.
    let other = Generation {
        number: newest,
        ..Default::default()
    };
    generation::write(&r, &other, None).unwrap().unwrap();
    let e = index::Listing::view(&r).err().unwrap();
    assert!(e.to_string().contains("replaced"), "{e}");
    // Put back, it is accepted again.
    std::fs::write(&head, saved).unwrap();
    index::Listing::view(&r).unwrap();
    restore_volume(&p, &r, "v@b", None, "rb", &NoProgress).unwrap();
}

/// `repo upgrade` of a format-4 repository waits for a job still running (its shared
/// lease), then writes the first generation: every backup restores, and new backups and
/// gc use format 5.
#[test]
fn upgrade_to_format_5_waits_for_running_jobs_and_keeps_every_backup() {
    let d = tempfile::tempdir().unwrap();
    let r = init(d.path(), 4);
    let (p, _) = backed_up_pool(&r);
    assert!(d.path().join("index").exists() && !d.path().join("ix").exists());
    let running = Lease::shared(&r, "backup v@x (format 4)").unwrap();
    let released = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&released);
    let job = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        flag.store(true, Ordering::SeqCst);
        drop(running);
    });
    let t0 = Instant::now();
    let up = Repository::upgrade(Arc::new(FileStore::new(d.path())), b"k").unwrap();
    assert!(released.load(Ordering::SeqCst), "upgraded while a job ran");
    assert!(t0.elapsed() >= Duration::from_secs(2));
    job.join().unwrap();
    assert_eq!(up.config().version, 5);
    assert_eq!(generation::list(&up).unwrap().0.len(), 1);
    let view = index::Listing::view(&up).unwrap();
    assert_eq!(
        view.indexes.len(),
        index::Listing::take(&up).unwrap().indexes.len()
    );
    assert!(
        view.unconfirmed.is_empty(),
        "every pack is in the first generation"
    );
    for s in ["a", "b"] {
        restores_exactly(&p, &up, s);
    }
    put(&p, "v", 0, &random_bytes(MIB as usize, 30));
    p.create_snapshot("v", "c").unwrap();
    backup_snapshot(&p, &up, "v@c", false, &NoProgress).unwrap();
    assert!(
        d.path().join("ix").exists(),
        "new index objects are format 5's"
    );
    gc::run(&up, &gc::Options::default(), &NoProgress).unwrap();
    assert!(verify::run(&up, true, 2, &NoProgress).unwrap().is_clean());
    restore_volume(&p, &up, "v@c", None, "rc", &NoProgress).unwrap();
    assert!(image(&p, "v@c") == image(&p, "rc"));
}

/// A host that saw format 5 refuses the repository when an older config is put back
/// (from a copy of the bucket, or by someone with write access): a format-4 gc would
/// delete packs without writing the generation format-5 jobs trust. Fails on the old
/// code, which used the older config as it found it.
#[test]
fn an_older_config_put_back_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let host = |r: Repository| r.with_marks(Some(snapblk_backup::marks::Marks::new(state.path())));
    let open = || host(Repository::open(Arc::new(FileStore::new(d.path())), b"k").unwrap());
    let r4 = host(init(d.path(), 4));
    let (p, _) = backed_up_pool(&r4);
    let old_config = std::fs::read(d.path().join("config")).unwrap();
    Repository::upgrade(Arc::new(FileStore::new(d.path())), b"k").unwrap();
    let r5 = open();
    assert_eq!(r5.config().version, 5);
    restores_exactly(&p, &r5, "b");
    std::fs::write(d.path().join("config"), &old_config).unwrap();
    let back = open();
    assert_eq!(back.config().version, 4);
    let e = restore_volume(&p, &back, "v@a", None, "ra", &NoProgress).unwrap_err();
    assert!(matches!(e, BackupError::FormatRolledBack { .. }), "{e}");
    assert!(e.to_string().contains("saw format 5"), "{e}");
    let e = gc::run(&back, &gc::Options::default(), &NoProgress).unwrap_err();
    assert!(matches!(e, BackupError::FormatRolledBack { .. }), "{e}");
}
