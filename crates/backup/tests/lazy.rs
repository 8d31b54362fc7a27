//! Lazy restore never serves wrong data and never loses an acknowledged write:
//! * a volume marked incomplete opens only through its running restore (never as a plain
//!   volume before the restore is registered, nor after it was interrupted);
//! * two starts of one restore never both run;
//! * a FUA write (or a write then FLUSH) to a cell the client just hydrated survives a
//!   restart after a power cut, and a plain acknowledged write survives a kill without a
//!   reboot (the `.hot` bitmap) — the resumed restore never hydrates such a cell again;
//! * completion clears the mark, removes the state and releases the volume (it can be
//!   deleted at once).
//!
//! The repository sits behind a gate that refuses large ranged GETs, which holds the
//! background hydration back (it fetches whole packs' worth at a time) while client reads
//! (one chunk each) go through: the cells a test touches are hydrated by the client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snapblk_backup::file::FileStore;
use snapblk_backup::lazy::{Hydration, LazyExports, Restores};
use snapblk_backup::repo::InitOptions;
use snapblk_backup::volume::{backup_snapshot, restore_lazy};
use snapblk_backup::{prune, NoProgress, Repository};
use snapblk_core::keys::{Filling, Incomplete};
use snapblk_core::{ExportProvider, Pool, PoolExports};

mod common;
use common::{random_bytes, Call, Hooked, Op, MIB};

const CELL: u64 = 64 << 10;

/// The repository's store behind a gate: ranged GETs longer than `max_range` fail (the
/// background's batches); every ranged GET is counted in `gets`.
fn gated(dir: &std::path::Path, max_range: &Arc<AtomicU64>, gets: &Arc<AtomicU64>) -> Hooked {
    let (max, n) = (Arc::clone(max_range), Arc::clone(gets));
    Hooked::new(Arc::new(FileStore::new(dir)), move |c| match c {
        Call::Before(Op::GetRange { key, len, .. }) => {
            n.fetch_add(1, Ordering::SeqCst);
            if len > max.load(Ordering::SeqCst) {
                return Err(common::store_failure("get", key, "gate closed (test)"));
            }
            Ok(())
        }
        _ => Ok(()),
    })
}

/// A store that runs `hook` before each put, and after each create-only put, of a key
/// under `prefix`.
fn on_put(
    dir: &std::path::Path,
    prefix: &'static str,
    hook: impl Fn() + Send + Sync + 'static,
) -> Hooked {
    Hooked::new(Arc::new(FileStore::new(dir)), move |c| {
        match c {
            Call::Before(Op::Put(k)) | Call::After(Op::PutNew(k)) if k.starts_with(prefix) => {
                hook()
            }
            _ => {}
        }
        Ok(())
    })
}

struct Setup {
    pool: Arc<Pool>,
    dir: tempfile::TempDir,
    state: tempfile::TempDir,
    want: Vec<u8>,
}

fn setup() -> Setup {
    let pool = common::pool(256 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let r = Repository::init(
        Arc::new(FileStore::new(dir.path())),
        b"k",
        &InitOptions {
            chunk_size: CELL as u32,
            pack_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    pool.create_volume("v", 8 * MIB).unwrap();
    let data = random_bytes(8 * MIB as usize, 7);
    common::put(&pool, "v", 0, &data);
    pool.create_snapshot("v", "s").unwrap();
    backup_snapshot(&pool, &r, "v@s", false, &NoProgress).unwrap();
    Setup {
        pool,
        dir,
        state: tempfile::tempdir().unwrap(),
        want: data,
    }
}

impl Setup {
    /// The repository behind a gate (`open`: background hydration may run).
    fn repo(&self, open: bool) -> Repository {
        let max = Arc::new(AtomicU64::new(if open { u64::MAX } else { 2 * CELL }));
        let gate = gated(self.dir.path(), &max, &Arc::new(AtomicU64::new(0)));
        Repository::open(Arc::new(gate), b"k").unwrap()
    }

    fn exports(&self, restores: &Arc<Restores>) -> LazyExports {
        LazyExports {
            inner: Arc::new(PoolExports(Arc::clone(&self.pool))),
            restores: Arc::clone(restores),
            pool: Arc::clone(&self.pool),
        }
    }

    /// `restore --lazy` of v@s as lz through `restores` (`open`: see `repo`).
    fn restore(
        &self,
        restores: &Arc<Restores>,
        open: bool,
    ) -> snapblk_backup::Result<Arc<Hydration>> {
        restore_lazy(
            &self.pool,
            &self.repo(open),
            "v@s",
            None,
            "lz",
            restores,
            self.state.path(),
        )
    }

    fn start(&self, open: bool) -> (Arc<Restores>, Arc<Hydration>) {
        let restores = Arc::new(Restores::default());
        let h = self.restore(&restores, open).unwrap();
        (restores, h)
    }

    /// `restore --lazy` through a gate closed to large GETs and a counter of ranged GETs,
    /// its background thread stopped: every fetch after this is a client's (or its
    /// read-ahead's).
    /// Returns the gate's largest ranged GET allowed, the count of ranged GETs, the
    /// restores and the hydration.
    fn counted_restore(
        &self,
    ) -> (
        Arc<AtomicU64>,
        Arc<AtomicU64>,
        Arc<Restores>,
        Arc<Hydration>,
    ) {
        let gate = Arc::new(AtomicU64::new(2 * CELL));
        let gets = Arc::new(AtomicU64::new(0));
        let counted = gated(self.dir.path(), &gate, &gets);
        let restores = Arc::new(Restores::default());
        let r = Repository::open(Arc::new(counted), b"k").unwrap();
        let h = restore_lazy(
            &self.pool,
            &r,
            "v@s",
            None,
            "lz",
            &restores,
            self.state.path(),
        )
        .unwrap();
        h.stop_background();
        std::thread::sleep(Duration::from_millis(200));
        (gate, gets, restores, h)
    }

    /// Changes 1 MiB of v and backs up a new snapshot `n<round>` of it.
    fn newer_backup(&self, r: &Repository, round: u64) {
        common::put(&self.pool, "v", 0, &random_bytes(MIB as usize, 100 + round));
        let snap = format!("n{round}");
        self.pool.create_snapshot("v", &snap).unwrap();
        backup_snapshot(&self.pool, r, &format!("v@{snap}"), false, &NoProgress).unwrap();
    }

    fn image(&self, name: &str) -> Vec<u8> {
        common::image(&self.pool, name)
    }

    fn state_file(&self, ext: &str) -> std::path::PathBuf {
        let id = self.pool.volume_info("lz").unwrap().id;
        self.state.path().join(format!("{id}.{ext}"))
    }
}

/// gc with no grace period (deletes all it may at once).
fn gc_now() -> snapblk_backup::gc::Options {
    snapblk_backup::gc::Options {
        grace_secs: 0,
        max_unused: 0.0,
        dry_run: false,
    }
}

/// Retention that keeps the newest backup of each volume only.
fn keep_one() -> prune::Policy {
    prune::Policy {
        keep_last: 1,
        ..Default::default()
    }
}

fn wait_complete(h: &Hydration) {
    for _ in 0..600 {
        if h.is_complete() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("hydration did not complete: {:?}", h.status());
}

#[test]
fn a_marked_volume_opens_only_through_its_running_restore() {
    let s = setup();
    let restores = Arc::new(Restores::default());
    let exports = s.exports(&restores);
    for by in [Filling::LazyRestore, Filling::FullRestore] {
        let mark = Incomplete {
            by,
            backup: "v@s".into(),
            manifest: "m".into(),
            source: "file:///x".into(),
        };
        s.pool
            .create_volume_marked("half", 8 * MIB, Some(&mark))
            .unwrap();
        let err = exports.open("half").err().expect("a marked volume opened");
        assert!(err.to_string().contains("not whole"), "{err}");
        s.pool.delete_volume("half", false).unwrap();
    }
    // Its snapshots and ordinary volumes open as usual.
    assert!(exports.open("v").is_ok() && exports.open("v@s").is_ok());
}

#[test]
fn two_starts_of_one_restore_never_both_run() {
    let s = setup();
    let restores = Arc::new(Restores::default());
    let held = restores.reserve("lz").unwrap();
    let err = s
        .restore(&restores, true)
        .err()
        .expect("a second start ran");
    assert!(err.to_string().contains("starting"), "{err}");
    drop(held);
    let h = s.restore(&restores, true).unwrap();
    let again = s.restore(&restores, true);
    assert!(
        h.is_complete() || again.is_err(),
        "a running restore was started again"
    );
    wait_complete(&h);
}

/// Interrupts a restore after the client wrote `fua` (FUA) at cell 3 and `plain` (no
/// flush) at cell 5, each cell hydrated by that write; `reboot` drops the `.hot` file, as a
/// power cut would make it untrustworthy. Returns the image after the resumed restore.
fn interrupted_then_resumed(s: &Setup, reboot: bool) -> Vec<u8> {
    let (restores, h) = s.start(false);
    let exports = s.exports(&restores);
    let e = exports.open("lz").unwrap();
    e.write(3 * CELL + 4096, &[0xaa; 4096], true).unwrap();
    e.write(5 * CELL + 4096, &[0xbb; 4096], false).unwrap();
    assert!(!h.is_complete(), "the gate let the background finish");
    // The daemon dies: nothing else runs for this restore.
    h.stop();
    drop((e, exports, restores, h));
    if reboot {
        std::fs::remove_file(s.state_file("hot")).unwrap();
    }
    // Killed while rewriting its state files: their temporaries stay behind.
    for ext in ["tmp", "hot-tmp"] {
        std::fs::write(s.state_file(ext), b"partial").unwrap();
    }
    let (restores, h) = s.start(true);
    wait_complete(&h);
    assert!(restores.active("lz").is_none());
    let left: Vec<_> = std::fs::read_dir(s.state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "state files left: {left:?}");
    s.image("lz")
}

#[test]
fn a_fua_write_to_a_freshly_hydrated_cell_survives_a_power_cut() {
    let s = setup();
    let got = interrupted_then_resumed(&s, true);
    let at = (3 * CELL + 4096) as usize;
    assert!(
        got[at..at + 4096].iter().all(|b| *b == 0xaa),
        "the FUA write was undone by hydrating its cell again"
    );
    // The plain write was never flushed: after a power cut it may be gone, and then its
    // cell holds the backup's data, never anything else.
    let at = (5 * CELL + 4096) as usize;
    assert!(
        got[at..at + 4096].iter().all(|b| *b == 0xbb)
            || got[at..at + 4096] == s.want[at..at + 4096]
    );
}

#[test]
fn a_plain_write_survives_a_kill_without_reboot() {
    let s = setup();
    let mut got = interrupted_then_resumed(&s, false);
    for (cell, byte) in [(3, 0xaa), (5, 0xbb)] {
        let at = (cell * CELL + 4096) as usize;
        assert!(
            got[at..at + 4096].iter().all(|b| *b == byte),
            "an acknowledged write to cell {cell} was undone by the resumed restore"
        );
        got[at..at + 4096].copy_from_slice(&s.want[at..at + 4096]);
    }
    assert!(got == s.want, "every other byte is the backup's");
}

#[test]
fn completion_clears_the_mark_removes_the_state_and_releases_the_volume() {
    let s = setup();
    let (restores, h) = s.start(true);
    wait_complete(&h);
    drop(h);
    let info = s.pool.volume_info("lz").unwrap();
    assert_eq!(info.incomplete, None);
    assert!(
        std::fs::read_dir(s.state.path()).unwrap().next().is_none(),
        "state files left"
    );
    assert!(s.image("lz") == s.want);
    // The background thread releases the restore right after it completes.
    let released = (0..100).any(|_| {
        let ok = restores.active("lz").is_none() && s.pool.delete_volume("lz", false).is_ok();
        if !ok {
            std::thread::sleep(Duration::from_millis(20));
        }
        ok
    });
    assert!(
        released,
        "the finished restore still holds the volume: {:?}",
        restores.status()
    );
    let st = restores.status();
    assert!(
        st.len() == 1 && st[0].complete && st[0].cells_remaining == Some(0),
        "restore-status shows the finished restore: {st:?}"
    );
}

/// A client still connected when the restore completes does not keep the hydration (its
/// table and chunk locations) alive: it is freed, and the client's requests go straight
/// to the volume.
#[test]
fn a_finished_restore_is_freed_while_clients_stay_connected() {
    let s = setup();
    let (restores, h) = s.start(false);
    let e = s.exports(&restores).open("lz").unwrap();
    let mut b = vec![0u8; CELL as usize];
    e.read(0, &mut b).unwrap();
    assert!(b[..] == s.want[..CELL as usize]);
    let weak = Arc::downgrade(&h);
    drop(h);
    // The gate holds the background back; the client hydrates everything, then the
    // background thread finds nothing left and completes.
    hydrate_by_reading(&*e, &s.want);
    for _ in 0..300 {
        if weak.upgrade().is_none() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        weak.upgrade().is_none(),
        "the finished hydration is still held (by the connected client)"
    );
    e.read(CELL, &mut b).expect("reading after completion");
    assert!(b[..] == s.want[CELL as usize..2 * CELL as usize]);
}

/// Reads every cell through `e` (a client hydrating what the gate lets through: one cell
/// per request, back to front so no read-ahead asks for more).
fn hydrate_by_reading(e: &dyn snapblk_core::Export, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    for (i, c) in got.chunks_mut(CELL as usize).enumerate().rev() {
        e.read(i as u64 * CELL, c).unwrap();
    }
    assert!(got == want);
}

/// A lazy restore runs for as long as it takes: prune removing its backup and gc with no
/// grace period, several times over, while it has most cells still to fetch, cost it
/// nothing (its lease keeps the packs it reads).
#[test]
fn a_lazy_restore_outlives_prune_and_gc_cycles() {
    let s = setup();
    let (restores, h) = s.start(false);
    let exports = s.exports(&restores);
    let e = exports.open("lz").unwrap();
    let r = s.repo(true);
    let gc_now = gc_now();
    let keep_one = keep_one();
    for round in 0..3u64 {
        // A newer backup, so keep-last 1 removes v@s (in round 0) and its successors.
        s.newer_backup(&r, round);
        snapblk_backup::prune::run(&r, &keep_one, &Default::default(), false).unwrap();
        let g = snapblk_backup::gc::run(&r, &gc_now, &NoProgress).unwrap();
        assert!(
            g.cutoff.is_some(),
            "gc did not see the restore's lease: {g:?}"
        );
    }
    assert!(!h.is_complete(), "the gate let the background finish");
    let mut got = vec![0u8; 8 * MIB as usize];
    // Back to front: one cell per request, no read-ahead (the gate lets single cells by).
    for (i, c) in got.chunks_mut(CELL as usize).enumerate().rev() {
        e.read(i as u64 * CELL, c)
            .unwrap_or_else(|err| panic!("cell {i}: {err}"));
    }
    assert!(
        got == s.want,
        "the lazily restored volume differs from its backup"
    );
    h.stop();
}

/// An interrupted lazy restore (daemon stopped) holds no lease, but its hold keeps the
/// backup: prune (retention keeping one backup) and gc with no grace period, several
/// times over, then the restore resumes and completes exactly. Once complete the hold is
/// gone and the next prune removes the backup. `backup forget` refuses a held backup.
#[test]
fn an_interrupted_lazy_restore_resumes_after_prune_and_gc_cycles() {
    let s = setup();
    let (restores, h) = s.start(false);
    let e = s.exports(&restores).open("lz").unwrap();
    e.write(2 * CELL, &[0xcc; 4096], true).unwrap();
    assert!(!h.is_complete(), "the gate let the background finish");
    h.stop();
    drop((e, restores, h));
    let r = s.repo(true);
    // Its lease goes once the background thread sees the stop (it may be backing off).
    for _ in 0..1200 {
        if snapblk_backup::lease::list(&r).unwrap().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let gc_now = gc_now();
    let keep_one = keep_one();
    for round in 0..3u64 {
        s.newer_backup(&r, round);
        let out = prune::run(&r, &keep_one, &Default::default(), false).unwrap();
        assert!(
            out.held
                .iter()
                .any(|x| x.contains("v@s") && x.contains("lz")),
            "prune did not report the held backup: {out:?}"
        );
        let g = snapblk_backup::gc::run(&r, &gc_now, &NoProgress).unwrap();
        assert!(g.cutoff.is_none(), "no job runs, so no lease: {g:?}");
    }
    let err = prune::forget(&r, &["v@s".to_string()], None, prune::OnHold::Refuse)
        .expect_err("forget removed a held backup");
    assert!(
        err.to_string().contains("held by the lazy restore of lz"),
        "{err}"
    );
    // Retention (the policy manager) skips it without failing.
    assert!(
        prune::forget(&r, &["v@s".to_string()], None, prune::OnHold::Skip)
            .unwrap()
            .is_empty()
    );
    let (restores, h) = s.start(true);
    wait_complete(&h);
    assert!(restores.active("lz").is_none());
    let mut want = s.want.clone();
    want[2 * CELL as usize..2 * CELL as usize + 4096].fill(0xcc);
    assert!(s.image("lz") == want, "the resumed restore differs");
    assert!(
        snapblk_backup::hold::live(&r).unwrap().is_empty(),
        "the hold outlived its restore"
    );
    let out = prune::run(&r, &keep_one, &Default::default(), false).unwrap();
    assert!(
        out.held.is_empty() && out.removed.iter().any(|x| x.contains("v@s")),
        "{out:?}"
    );
}

/// A hold placed while a prune runs — after prune listed the holds, before its catalog
/// commit — still keeps the backup: prune lists the holds again after the commit and puts
/// the backup back before deleting anything. A lapsed hold keeps nothing and is deleted.
#[test]
fn a_hold_placed_during_a_prune_keeps_the_backup_and_a_lapsed_one_does_not() {
    let s = setup();
    let r = s.repo(true);
    common::put(&s.pool, "v", 0, &random_bytes(MIB as usize, 5));
    s.pool.create_snapshot("v", "t").unwrap();
    backup_snapshot(&s.pool, &r, "v@t", false, &NoProgress).unwrap();
    let cats = snapblk_backup::catalog::Catalogs::load(&r).unwrap();
    let old = cats.choose("v@s", None, None).unwrap();
    let keep_one = keep_one();
    // Right after prune's catalog commit (v@s removed), a restore places its hold and a
    // gc with no grace period runs: gc must not take the removed-but-held v@s's header
    // and table for leftovers of an interrupted prune.
    let placed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hooked = {
        let (dir, id, placed) = (
            s.dir.path().to_path_buf(),
            old.id.clone(),
            Arc::clone(&placed),
        );
        on_put(s.dir.path(), "catalogs/", move || {
            if !placed.swap(true, Ordering::SeqCst) {
                let r = Repository::open(Arc::new(FileStore::new(&dir)), b"k").unwrap();
                snapblk_backup::hold::place(&r, &id, "v@s", "p", "lz", 9).unwrap();
                let g = gc_now();
                let rep = snapblk_backup::gc::run(&r, &g, &NoProgress).unwrap();
                assert!(rep.leftovers_deleted.is_empty(), "{rep:?}");
            }
        })
    };
    let hr = Repository::open(Arc::new(hooked), b"k").unwrap();
    let out = prune::run(&hr, &keep_one, &Default::default(), false).unwrap();
    assert!(placed.load(Ordering::SeqCst), "the hook did not run");
    assert!(out.removed.is_empty() && out.held.len() == 1, "{out:?}");
    let cats = snapblk_backup::catalog::Catalogs::load(&r).unwrap();
    let back = cats
        .choose("v@s", None, None)
        .expect("the held backup was not put back");
    assert_eq!(back.id, old.id);
    snapblk_backup::manifest::read_table(&r, &back).expect("its table was deleted");
    // Lapsed: an abandoned restore's hold (placed and never renewed) keeps nothing.
    let k = format!("holds/{}/p-9", old.id);
    let mut hold = snapblk_backup::hold::list_all(&r).unwrap().remove(0).1;
    hold.expires = 1;
    let json = serde_json::to_vec(&hold).unwrap();
    let aad = format!("snapblk hold {k}");
    r.store()
        .put(&k, &r.keys().seal(&json, aad.as_bytes()))
        .unwrap();
    let out = prune::run(&r, &keep_one, &Default::default(), false).unwrap();
    assert!(out.held.is_empty() && out.removed.len() == 1, "{out:?}");
    assert!(
        snapblk_backup::hold::list_all(&r).unwrap().is_empty(),
        "the lapsed hold stayed"
    );
    // A hold that does not open (not sealed by this repository's key) keeps nothing.
    r.store().put("holds/x/forged", b"{}").unwrap();
    assert!(snapblk_backup::hold::live(&r).unwrap().is_empty());
}

/// A prune that removes the backup after `restore --lazy` chose it from the catalog but
/// before its hold was written: the restore fails at once, naming the cause, and leaves
/// neither a volume nor a hold (it never starts on a backup prune removed).
#[test]
fn a_backup_pruned_while_its_lazy_restore_starts_fails_that_restore_cleanly() {
    let s = setup();
    let plain = s.repo(true);
    common::put(&s.pool, "v", 0, &random_bytes(MIB as usize, 6));
    s.pool.create_snapshot("v", "t").unwrap();
    backup_snapshot(&s.pool, &plain, "v@t", false, &NoProgress).unwrap();
    let pruned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hooked = {
        let (dir, pruned) = (s.dir.path().to_path_buf(), Arc::clone(&pruned));
        on_put(s.dir.path(), "holds/", move || {
            if !pruned.swap(true, Ordering::SeqCst) {
                let r = Repository::open(Arc::new(FileStore::new(&dir)), b"k").unwrap();
                let keep_one = keep_one();
                let out = prune::run(&r, &keep_one, &Default::default(), false).unwrap();
                assert_eq!(out.removed.len(), 1, "{out:?}");
            }
        })
    };
    let r = Repository::open(Arc::new(hooked), b"k").unwrap();
    let restores = Arc::new(Restores::default());
    let Err(err) = restore_lazy(&s.pool, &r, "v@s", None, "lz", &restores, s.state.path()) else {
        panic!("a lazy restore started on a pruned backup");
    };
    assert!(pruned.load(Ordering::SeqCst), "the hook did not run");
    assert!(
        err.to_string()
            .contains("removed (pruned or forgotten) while the restore started"),
        "{err}"
    );
    assert!(s.pool.volume_info("lz").is_err(), "the volume was left");
    assert!(
        snapblk_backup::hold::live(&plain).unwrap().is_empty(),
        "the hold was left"
    );
}

/// A sequential reader of an unhydrated range gets ranged GETs of many cells (misses
/// batched, read-ahead after a miss that continues the previous one), not a GET per
/// cell; and when read-ahead fails (the gate refuses its large GETs) the reads still
/// succeed, one request's cells at a time.
#[test]
fn sequential_reads_of_unhydrated_cells_fetch_in_few_requests() {
    let s = setup();
    let (gate, gets, restores, _h) = s.counted_restore();
    let e = s.exports(&restores).open("lz").unwrap();
    // Gate closed to large GETs: read-ahead fails, 64 KiB reads still succeed.
    let mut got = vec![0u8; 8 * MIB as usize];
    for (i, c) in got[..MIB as usize].chunks_mut(CELL as usize).enumerate() {
        e.read(i as u64 * CELL, c)
            .unwrap_or_else(|err| panic!("cell {i} with read-ahead refused: {err}"));
    }
    // Gate open: 1 MiB sequential reads of the other 7 MiB (112 cells).
    gate.store(u64::MAX, Ordering::SeqCst);
    gets.store(0, Ordering::SeqCst);
    for (i, c) in got.chunks_mut(MIB as usize).enumerate().skip(1) {
        e.read(i as u64 * MIB, c)
            .unwrap_or_else(|err| panic!("MiB {i}: {err}"));
    }
    let n = gets.load(Ordering::SeqCst);
    assert!(
        got == s.want,
        "the lazily restored volume differs from its backup"
    );
    assert!(
        n <= 16,
        "reading 112 unhydrated cells sequentially took {n} ranged GETs (one per cell: 112)"
    );
}

/// A sequential reader whose reads hit (their cells hydrated earlier) still gets the
/// cells past it fetched in the background: after reads of MiB 1, MiB 0, then MiB 1 again
/// (continuing the previous read; all three hydrate nothing past MiB 2), the rest of the
/// volume hydrates with no further request and the background thread off, in a few
/// ranged GETs. Without the read-ahead those cells stay unhydrated.
#[test]
fn a_sequential_reader_gets_the_cells_ahead_fetched_in_the_background() {
    let s = setup();
    let (gate, gets, restores, h) = s.counted_restore();
    gate.store(u64::MAX, Ordering::SeqCst);
    let e = s.exports(&restores).open("lz").unwrap();
    let mut buf = vec![0u8; MIB as usize];
    e.read(MIB, &mut buf).unwrap();
    e.read(0, &mut buf).unwrap();
    assert_eq!(h.status().cells_remaining, Some(128 - 32));
    gets.store(0, Ordering::SeqCst);
    e.read(MIB, &mut buf).unwrap();
    for _ in 0..500 {
        if h.status().cells_remaining == Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        h.status().cells_remaining,
        Some(0),
        "the cells ahead of a sequential reader were not fetched"
    );
    let n = gets.load(Ordering::SeqCst);
    assert!(n <= 16, "96 cells ahead took {n} ranged GETs");
    let mut got = vec![0u8; 8 * MIB as usize];
    e.read(0, &mut got).unwrap();
    assert!(
        got == s.want,
        "the lazily restored volume differs from its backup"
    );
}

/// TRIM and WRITE_ZEROES of unhydrated cells download nothing for the cells they cover
/// whole (those then read as zeros); a cell covered in part is fetched first, so its other
/// bytes stay the backup's.
#[test]
fn trimming_unhydrated_cells_downloads_nothing() {
    let s = setup();
    let (gate, gets, restores, _h) = s.counted_restore();
    let e = s.exports(&restores).open("lz").unwrap();
    gate.store(0, Ordering::SeqCst); // nothing may be fetched now
    gets.store(0, Ordering::SeqCst);
    e.trim(CELL, 4 * CELL, false)
        .expect("trim of 4 whole unhydrated cells");
    e.write_zeroes(8 * CELL, 2 * CELL, true, false)
        .expect("write_zeroes (FUA) of 2 whole unhydrated cells");
    assert_eq!(
        gets.load(Ordering::SeqCst),
        0,
        "whole cells were downloaded"
    );
    let mut b = vec![0u8; CELL as usize];
    for c in (8..10).chain([1]) {
        e.read(c * CELL, &mut b)
            .unwrap_or_else(|err| panic!("reading zeroed cell {c}: {err}"));
        assert!(b.iter().all(|x| *x == 0), "cell {c} does not read as zeros");
    }
    // Part of a cell: its data is fetched first, the rest of it is the backup's.
    gate.store(u64::MAX, Ordering::SeqCst);
    e.write_zeroes(20 * CELL + 4096, 8192, false, false)
        .expect("write_zeroes of part of a cell");
    assert!(
        gets.load(Ordering::SeqCst) >= 1,
        "the partly zeroed cell was not fetched"
    );
    e.read(20 * CELL, &mut b).unwrap();
    let want = &s.want[20 * CELL as usize..21 * CELL as usize];
    assert!(
        b[..4096] == want[..4096] && b[12288..] == want[12288..],
        "the rest of the cell was lost"
    );
    assert!(
        b[4096..12288].iter().all(|x| *x == 0),
        "the zeroed part is not zeros"
    );

    // A refused request marks nothing: a fast zeroing the pool cannot do (a partial
    // block), and a trim running past the end of the volume, each covering whole cells.
    let cell = |c: u64| &s.want[(c * CELL) as usize..((c + 1) * CELL) as usize];
    e.write_zeroes(40 * CELL + 512, 2 * CELL, false, true)
        .expect_err("a fast zeroing of a partial block is refused by the pool");
    let size = 8 * MIB;
    e.trim(size - 2 * CELL, 4 * CELL, false)
        .expect_err("a trim past the end of the volume is refused");
    for c in [41, size / CELL - 2, size / CELL - 1] {
        e.read(c * CELL, &mut b).unwrap();
        assert!(
            b[..] == *cell(c),
            "cell {c} lost its data to a request that was refused"
        );
    }
}

#[test]
fn a_cancelled_restore_lets_go_of_its_volume_and_can_be_deleted() {
    let s = setup();
    // Gate closed: the restore cannot finish on its own.
    let (restores, h) = s.start(false);
    assert!(!h.is_complete());
    assert!(restores.cancel("lz"));
    assert!(!restores.cancel("lz"), "cancelled twice");
    assert!(restores.active("lz").is_none());
    assert!(
        restores.suspended("lz").is_some(),
        "an interrupted restore: resumable"
    );
    drop(h);
    // The background thread drops its handle on the volume once it sees the stop.
    let mut deleted = false;
    for _ in 0..100 {
        if s.pool.delete_volume("lz", false).is_ok() {
            deleted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(deleted, "the cancelled restore still holds its volume");
    // Cancelled: still resumable, so its hold stays until the volume is deleted and the
    // restore forgotten (what `umount` of a backup's mount and `volume delete` do).
    let r = s.repo(true);
    assert_eq!(snapblk_backup::hold::live(&r).unwrap().len(), 1);
    restores.forget("lz");
    assert!(
        snapblk_backup::hold::live(&r).unwrap().is_empty(),
        "an abandoned restore's hold stayed"
    );
    assert!(!restores.cancel("nothing"));
}
