//! Leases keep gc, prune, backup and restore safe together (issue 12, docs/design.md §12
//! "Leases"):
//! * two gc runs never overlap: of two started together, at least one refuses;
//! * the lease of a process that died stops protecting anything once it expires, and gc
//!   removes it;
//! * a full restore and a backup each run across prune + gc with no grace period (a grace
//!   period far shorter than the job) and complete exactly;
//! * a backup that starts while a gc with no grace period runs (after the gc listed the
//!   leases) waits for it: nothing it writes is taken for an orphan.
//!
//! (The lazy restore's case is in tests/lazy.rs.)

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{image, put, random_bytes, Call, Hooked, Op, MIB};
use snapblk_backup::file::FileStore;
use snapblk_backup::lease::{self, Lease};
use snapblk_backup::repo::InitOptions;
use snapblk_backup::volume::{backup_snapshot, restore_volume};
use snapblk_backup::{
    gc, prune, verify, BackupError, NoProgress, ObjectStore, Progress, Repository,
};
use snapblk_core::Pool;

fn init(dir: &Path) -> Repository {
    init_on(Arc::new(FileStore::new(dir)))
}

fn init_on(store: Arc<dyn ObjectStore>) -> Repository {
    let opts = InitOptions {
        chunk_size: 64 << 10,
        pack_size: 1 << 20,
        ..Default::default()
    };
    Repository::init(store, b"k", &opts).unwrap()
}

type Hook = Box<dyn FnOnce() + Send>;

/// A directory store that runs the hook in `slot` (once) when `prefix` is listed: before
/// the listing (`after` false) or after it, before the caller sees it.
fn on_list(
    dir: &Path,
    prefix: &'static str,
    after: bool,
    slot: &Arc<Mutex<Option<Hook>>>,
) -> Hooked {
    let slot = Arc::clone(slot);
    Hooked::new(Arc::new(FileStore::new(dir)), move |c| {
        match c {
            Call::Before(Op::List(p)) if !after && p == prefix => {}
            Call::After(Op::List(p)) if after && p == prefix => {}
            _ => return Ok(()),
        }
        let hook = slot.lock().unwrap().take();
        if let Some(h) = hook {
            h();
        }
        Ok(())
    })
}

const NOW: gc::Options = gc::Options {
    grace_secs: 0,
    max_unused: 0.0,
    dry_run: false,
};

fn keep_last(n: u32) -> prune::Policy {
    prune::Policy {
        keep_last: n,
        ..Default::default()
    }
}

/// Runs `f` once, the first time the job reports progress (in the job's own thread);
/// the job's other threads wait in their next report until `f` is done, so most of the
/// job runs after it.
struct Midway<F: Fn() + Send + Sync> {
    done: Mutex<bool>,
    f: F,
}

impl<F: Fn() + Send + Sync> Progress for Midway<F> {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {
        let mut done = self.done.lock().unwrap();
        if !*done {
            (self.f)();
            *done = true;
        }
    }
}

fn midway<F: Fn() + Send + Sync>(f: F) -> Midway<F> {
    Midway {
        done: Mutex::new(false),
        f,
    }
}

/// `vol` gets `mib` MiB of fresh data and the snapshot `s`.
fn fill(p: &Arc<Pool>, vol: &str, s: &str, mib: u64, seed: u64) -> String {
    put(p, vol, 0, &random_bytes((mib * MIB) as usize, seed));
    p.create_snapshot(vol, s).unwrap();
    format!("{vol}@{s}")
}

/// A directory store whose clock (the times its listings give) runs `offset` seconds off
/// this host's.
fn skewed(dir: &Path, offset: i64) -> Repository {
    let store = Hooked::new(Arc::new(FileStore::new(dir)), move |c| {
        if let Call::Listed(_, objects) = c {
            for o in objects.iter_mut() {
                o.modified = o.modified.saturating_add_signed(offset);
            }
        }
        Ok(())
    });
    Repository::open(Arc::new(store), b"k").unwrap()
}

#[test]
fn a_host_whose_clock_is_off_the_stores_takes_no_lease() {
    let d = tempfile::tempdir().unwrap();
    init(d.path());
    // Within the allowed skew either way: leases are taken.
    for off in [-25, 25] {
        let r = skewed(d.path(), off);
        drop(Lease::shared(&r, "backup").unwrap());
        drop(Lease::exclusive(&r, "gc").unwrap());
    }
    // Past it: refused, naming the clock, and no lease is left behind.
    for (off, word) in [(-120, "ahead of"), (120, "behind")] {
        let r = skewed(d.path(), off);
        for taken in [Lease::shared(&r, "backup"), Lease::exclusive(&r, "gc")] {
            match taken {
                Err(e @ BackupError::ClockSkew { .. }) => {
                    let m = e.to_string();
                    assert!(m.contains(word) && m.contains("NTP"), "{m}");
                }
                other => panic!("a lease was taken {off} s off the store's clock: {other:?}"),
            }
        }
        assert!(lease::list(&r).unwrap().is_empty());
        // gc takes its lease first: it refuses too.
        assert!(matches!(
            gc::run(&r, &NOW, &NoProgress),
            Err(BackupError::ClockSkew { .. })
        ));
    }
}

#[test]
fn two_gc_runs_never_overlap() {
    let d = tempfile::tempdir().unwrap();
    let r = init(d.path());
    // One holds the repository: the next refuses, naming it.
    let held = Lease::exclusive(&r, "gc").unwrap();
    match gc::run(&r, &NOW, &NoProgress) {
        Err(BackupError::Busy(m)) => assert!(m.contains("gc") && m.contains("pid"), "{m}"),
        other => panic!("a second gc ran: {other:?}"),
    }
    drop(held);
    gc::run(&r, &NOW, &NoProgress).unwrap();
    // Many started together: never two holders at once.
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let won = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (r, inside, most, won, go) = (
                r.clone(),
                Arc::clone(&inside),
                Arc::clone(&most),
                Arc::clone(&won),
                Arc::clone(&go),
            );
            std::thread::spawn(move || {
                go.wait();
                if let Ok(l) = Lease::exclusive(&r, "gc") {
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    won.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(300));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(l);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        most.load(Ordering::SeqCst) <= 1,
        "two gc leases were held at once"
    );
    assert!(lease::list(&r).unwrap().is_empty(), "leases left behind");
}

#[test]
fn the_lease_of_a_dead_process_expires_and_is_broken() {
    let d = tempfile::tempdir().unwrap();
    let r = init(d.path()).with_lease_ttl(6);
    // A gc and a restore that were killed: their leases stay, unrefreshed.
    Lease::exclusive(&r, "gc").unwrap().abandon();
    Lease::shared(&r, "restore v@s").unwrap().abandon();
    assert!(matches!(
        gc::run(&r, &NOW, &NoProgress),
        Err(BackupError::Busy(_))
    ));
    std::thread::sleep(Duration::from_secs(7));
    let g = gc::run(&r, &NOW, &NoProgress).unwrap();
    assert_eq!(g.leases_broken.len(), 2, "{g:?}");
    assert_eq!(g.cutoff, None, "an expired lease still held gc back");
    assert!(lease::list(&r).unwrap().is_empty());
    // A live lease is refreshed and is never broken.
    let live = Lease::shared(&r, "backup v@s").unwrap();
    std::thread::sleep(Duration::from_secs(8));
    live.check().unwrap();
    let g = gc::run(&r, &NOW, &NoProgress).unwrap();
    assert!(g.leases_broken.is_empty() && g.cutoff.is_some(), "{g:?}");
}

/// A full restore of a backup that prune removes and gc (no grace period) collects while
/// the restore runs: its lease keeps the packs; the restore completes exactly.
#[test]
fn a_full_restore_outlives_prune_and_gc() {
    let d = tempfile::tempdir().unwrap();
    let r = init(d.path());
    let p = common::pool(512 * MIB);
    p.create_volume("v", 32 * MIB).unwrap();
    let old = fill(&p, "v", "old", 16, 1);
    backup_snapshot(&p, &r, &old, false, &NoProgress).unwrap();
    let new = fill(&p, "v", "new", 16, 2);
    backup_snapshot(&p, &r, &new, true, &NoProgress).unwrap();
    let collected = Mutex::new(Vec::new());
    let cycles = midway(|| {
        for _ in 0..3 {
            prune::run(&r, &keep_last(1), &Default::default(), false).unwrap();
            collected
                .lock()
                .unwrap()
                .push(gc::run(&r, &NOW, &NoProgress).unwrap());
        }
    });
    restore_volume(&p, &r, &old, None, "r", &cycles).unwrap();
    let runs = collected.lock().unwrap();
    assert!(
        runs.len() == 3 && runs.iter().all(|g| g.cutoff.is_some()),
        "{runs:?}"
    );
    assert!(image(&p, &old) == image(&p, "r"));
    // Once nothing runs, the removed backup's data goes.
    let g = gc::run(&r, &NOW, &NoProgress).unwrap();
    assert!(g.packs_deleted > 0, "{g:?}");
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());
}

/// A backup that reuses chunks of a backup prune removes and gc collects meanwhile still
/// commits only what the repository holds: it restores exactly.
#[test]
fn a_backup_outlives_prune_and_gc() {
    let d = tempfile::tempdir().unwrap();
    let r = init(d.path());
    let p = common::pool(512 * MIB);
    p.create_volume("v", 32 * MIB).unwrap();
    let a = fill(&p, "v", "a", 16, 1);
    backup_snapshot(&p, &r, &a, false, &NoProgress).unwrap();
    // The same data again under another name (cells shared with v@a), plus new data.
    put(&p, "v", 24 * MIB, &random_bytes(4 * MIB as usize, 9));
    p.create_snapshot("v", "b").unwrap();
    p.create_volume("w", 4 * MIB).unwrap();
    let w = fill(&p, "w", "x", 4, 3);
    backup_snapshot(&p, &r, &w, false, &NoProgress).unwrap();
    let saw_lease = AtomicUsize::new(0);
    let cycles = midway(|| {
        for _ in 0..3 {
            // keep-last 1 per volume: v@a goes (w@x stays).
            prune::run(&r, &keep_last(1), &Default::default(), false).unwrap();
            if gc::run(&r, &NOW, &NoProgress).unwrap().cutoff.is_some() {
                saw_lease.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    // (Correctness here also rests on the backup's check before it commits: chunks of
    // packs condemned meanwhile are stored again. The lease spares that work.)
    backup_snapshot(&p, &r, "v@b", true, &cycles).unwrap();
    assert_eq!(saw_lease.load(Ordering::SeqCst), 3);
    restore_volume(&p, &r, "v@b", None, "rb", &NoProgress).unwrap();
    assert!(image(&p, "v@b") == image(&p, "rb"));
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());
}

/// A backup that starts while a gc with no grace period runs, after the gc listed the
/// leases (so the gc's cut-off does not cover it), waits for the gc to end: its table and
/// packs are never taken for a dead job's leftovers. (CI caught a scheduled gc with
/// `--gc-grace 0` deleting the table of a backup committed in that window.)
#[test]
fn a_backup_started_during_a_gc_with_no_grace_period_waits_for_it() {
    // gc lists tables/ after it listed the leases.
    backup_inside_gc("tables/", false);
}

/// A backup that commits (catalog entry and header) just after gc read the catalogs and
/// headers, and ends before gc lists the leases, is neither referenced nor leased in gc's
/// eyes unless gc reads what is referenced only after it listed the leases (it does now;
/// before, such a backup's table and packs were deleted).
#[test]
fn a_backup_committed_while_gc_reads_the_references_is_kept() {
    backup_inside_gc("manifests/", true);
}

/// Runs a small backup on its own thread when gc lists `prefix` (before or `after` the
/// listing), gives it 3 s, lets gc (no grace period) finish, and checks that the backup
/// waited for the gc and restores exactly.
fn backup_inside_gc(prefix: &'static str, after: bool) {
    let d = tempfile::tempdir().unwrap();
    let slot: Arc<Mutex<Option<Hook>>> = Arc::new(Mutex::new(None));
    let r = init_on(Arc::new(on_list(d.path(), prefix, after, &slot)));
    let p = common::pool(256 * MIB);
    p.create_volume("v", 16 * MIB).unwrap();
    let a = fill(&p, "v", "a", 4, 1);
    type Job = JoinHandle<snapblk_backup::Result<()>>;
    let job: Arc<Mutex<Option<(Job, bool)>>> = Arc::new(Mutex::new(None));
    {
        let (p, r, a, job) = (Arc::clone(&p), r.clone(), a.clone(), Arc::clone(&job));
        *slot.lock().unwrap() = Some(Box::new(move || {
            let (tx, rx) = mpsc::channel();
            let t = std::thread::spawn(move || {
                let res = backup_snapshot(&p, &r, &a, false, &NoProgress).map(|_| ());
                let _ = tx.send(());
                res
            });
            // The backup is small: unless it waits for the gc, it commits right away.
            let waited = rx.recv_timeout(Duration::from_secs(3)).is_err();
            *job.lock().unwrap() = Some((t, waited));
        }));
    }
    let g = gc::run(&r, &NOW, &NoProgress).unwrap();
    let (t, waited) = job
        .lock()
        .unwrap()
        .take()
        .expect("gc did not list the prefix");
    t.join().unwrap().unwrap();
    assert!(waited, "the backup ran inside the gc's run: {g:?}");
    assert_eq!(g.orphan_tables_deleted, 0, "{g:?}");
    assert!(lease::list(&r).unwrap().is_empty(), "leases left behind");
    restore_volume(&p, &r, &a, None, "r", &NoProgress).unwrap();
    assert!(image(&p, &a) == image(&p, "r"));
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());
}

/// A lease its holder could not refresh for half its life is lost for good: gc may have
/// broken it (and deleted what it protected) meanwhile, so a refresh that succeeds later
/// must not make `check` pass again (a frozen process resuming would otherwise put an
/// index object for a pack gc deleted, and commit against it). Fails on the old code,
/// whose next successful refresh revived the lease.
#[test]
fn a_lease_not_refreshed_for_half_its_life_stays_lost() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path());
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c = Arc::clone(&cut);
    let store = Hooked::new(
        Arc::new(FileStore::new(dir.path())),
        move |call| match call {
            Call::Before(Op::Put(k)) if k.starts_with("locks/") && c.load(Ordering::SeqCst) => {
                Err(common::store_failure("put", k, "unreachable"))
            }
            _ => Ok(()),
        },
    );
    let r = Repository::open(Arc::new(store), b"k")
        .unwrap()
        .with_lease_ttl(6);
    let l = Lease::shared(&r, "backup v@s").unwrap();
    l.check().unwrap();
    cut.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(4_500));
    assert!(l.check().is_err(), "not refreshed for 4.5 s of a 6 s lease");
    cut.store(false, Ordering::SeqCst);
    // Refreshes run every second: one would have succeeded by now.
    std::thread::sleep(Duration::from_millis(2_500));
    let e = l.check().unwrap_err();
    assert!(e.to_string().contains("not refreshed"), "{e}");
}

/// A job holding a repository opened before a `repo upgrade` (it waited out the
/// upgrade's sole lease) refuses to go on under the new format: the version is read
/// again once its lease is taken. Fails on the old code, which took the lease.
#[test]
fn a_job_that_waited_out_an_upgrade_reads_the_format_again() {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        chunk_size: 64 << 10,
        pack_size: 1 << 20,
        version: 4,
        ..Default::default()
    };
    let old = Repository::init(Arc::new(FileStore::new(dir.path())), b"k", &opts).unwrap();
    Lease::shared(&old, "backup before").unwrap();
    Repository::upgrade(Arc::new(FileStore::new(dir.path())), b"k").unwrap();
    let e = Lease::shared(&old, "backup v@s").unwrap_err();
    assert!(e.to_string().contains("upgraded meanwhile"), "{e}");
    let e = Lease::exclusive(&old, "gc").unwrap_err();
    assert!(e.to_string().contains("format 5 now, not 4"), "{e}");
    assert!(
        lease::list(&old).unwrap().is_empty(),
        "refused leases are dropped"
    );
    let p = common::pool(64 * MIB);
    p.create_volume("v", 4 * MIB).unwrap();
    put(&p, "v", 0, &random_bytes(MIB as usize, 5));
    p.create_snapshot("v", "s").unwrap();
    let e = backup_snapshot(&p, &old, "v@s", false, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("upgraded meanwhile"), "{e}");
}
