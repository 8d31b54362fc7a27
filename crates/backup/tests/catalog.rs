//! Rollback and deletion of backups by someone with write access to the store but not the
//! key (issue 11), against the catalogs of repository format 3 (docs/design.md §12):
//! * the newest backups deleted: restore fails naming the backup, never picks an older one;
//! * a pruned backup put back: never restored; verify tells it from evidence;
//! * newest catalog generations deleted, or replaced by a writer that never saw them: a
//!   host that saw them refuses (rolled back); a host that did not still finds the
//!   orphaned headers and `verify` reports them;
//! * a generation copied over another name does not open;
//! * a format-1/2 repository is catalogued by `upgrade` and keeps its backups.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{image, put, random_bytes, MIB};
use snapblk_backup::catalog::{self, Catalogs};
use snapblk_backup::file::FileStore;
use snapblk_backup::marks::Marks;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::store::ObjectStore;
use snapblk_backup::volume::{backup_snapshot, restore_volume};
use snapblk_backup::{gc, prune, verify, BackupError, NoProgress, Repository};
use snapblk_core::Pool;

fn store(dir: &Path) -> Arc<dyn ObjectStore> {
    Arc::new(FileStore::new(dir))
}

fn init(dir: &Path) -> Repository {
    let opts = InitOptions {
        chunk_size: 64 << 10,
        pack_size: 1 << 20,
        ..Default::default()
    };
    Repository::init(store(dir), b"k", &opts).unwrap()
}

/// The repository in `dir` as a host whose marks live in `state` sees it.
fn host(dir: &Path, state: Option<&Path>) -> Repository {
    Repository::open(store(dir), b"k")
        .unwrap()
        .with_marks(state.map(Marks::new))
}

/// Writes fresh data into `v`, snapshots it as `s` (deleting an older `s` first, so one
/// name is backed up more than once) and backs it up. Returns the backup's id.
fn backup(p: &Arc<Pool>, r: &Repository, s: &str, seed: u64) -> String {
    put(p, "v", 0, &random_bytes(MIB as usize, seed));
    let _ = p.delete_snapshot("v", s);
    p.create_snapshot("v", s).unwrap();
    backup_snapshot(p, r, &format!("v@{s}"), false, &NoProgress)
        .unwrap()
        .manifest
}

fn setup() -> (tempfile::TempDir, Arc<Pool>) {
    let d = tempfile::tempdir().unwrap();
    let p = common::pool(256 * MIB);
    p.create_volume("v", 4 * MIB).unwrap();
    (d, p)
}

fn catalog_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for pool in std::fs::read_dir(dir.join("catalogs")).unwrap() {
        for g in std::fs::read_dir(pool.unwrap().path()).unwrap() {
            out.push(g.unwrap().path());
        }
    }
    out.sort();
    out
}

/// Deleting the newest backup of a name must not make `restore v@s` quietly restore an
/// older backup of that name. (On format 2 the restore succeeded with the older data.)
#[test]
fn deleting_the_newest_backup_fails_the_restore_instead_of_picking_an_older_one() {
    let (d, p) = setup();
    let r = init(d.path());
    backup(&p, &r, "s", 1);
    let want = image(&p, "v@s");
    let newest = backup(&p, &r, "s", 2);
    let want2 = image(&p, "v@s");
    assert_ne!(want, want2);
    // The attacker removes every object named after the newest backup.
    // (Its table is a directory of frames in format 4.)
    let table = d.path().join("tables").join(&newest);
    assert!(table.is_dir(), "a format-4 table is not framed");
    std::fs::remove_dir_all(&table).unwrap();
    std::fs::remove_file(d.path().join("manifests").join(&newest)).unwrap();
    let e = restore_volume(&p, &r, "v@s", None, "r", &NoProgress).unwrap_err();
    assert!(e.to_string().contains("is gone"), "{e}");
    assert!(
        p.volume_info("r").is_err(),
        "no partly restored volume is left"
    );
    let rep = verify::run(&r, false, 2, &NoProgress).unwrap();
    assert!(
        !rep.is_clean(),
        "verify must report the lost backup: {rep:?}"
    );
    assert!(rep.problems.iter().any(|x| x.affects == ["v@s"]));
    // gc will not free data while a listed backup is unaccounted for; forgetting it is
    // an explicit decision, after which the older backup is the one restored.
    assert!(gc::run(&r, &gc::Options::default(), &NoProgress).is_err());
    prune::forget(
        &r,
        std::slice::from_ref(&newest),
        None,
        prune::OnHold::Refuse,
    )
    .unwrap();
    restore_volume(&p, &r, "v@s", None, "r", &NoProgress).unwrap();
    assert!(image(&p, "r") == want);
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());
}

/// A pruned backup whose header and table are put back is not a backup again.
#[test]
fn a_pruned_backup_put_back_is_never_restored() {
    let (d, p) = setup();
    let r = init(d.path());
    let old = backup(&p, &r, "a", 1);
    backup(&p, &r, "b", 2);
    // The header, and the table's frames (a directory in format 4).
    let mut files = vec![d.path().join("manifests").join(&old)];
    for e in std::fs::read_dir(d.path().join("tables").join(&old)).unwrap() {
        files.push(e.unwrap().path());
    }
    let saved: Vec<(std::path::PathBuf, Vec<u8>)> = files
        .into_iter()
        .map(|f| {
            let b = std::fs::read(&f).unwrap();
            (f, b)
        })
        .collect();
    let policy = prune::Policy {
        keep_last: 1,
        ..Default::default()
    };
    let out = prune::run(&r, &policy, &Default::default(), false).unwrap();
    assert_eq!(out.removed.len(), 1);
    for (f, b) in &saved {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b).unwrap();
    }
    assert!(matches!(
        restore_volume(&p, &r, "v@a", None, "r", &NoProgress),
        Err(BackupError::NoSuchBackup(_))
    ));
    assert!(Catalogs::load(&r).unwrap().headers().len() == 1);
    // Recognised as a removed backup's leftover (not evidence), and gc deletes it.
    let rep = verify::run(&r, false, 2, &NoProgress).unwrap();
    assert!(rep.is_clean() && rep.leftovers == 1, "{rep:?}");
    let g = gc::run(
        &r,
        &gc::Options {
            grace_secs: 0,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    assert_eq!(g.leftovers_deleted.len(), 1, "{g:?}");
    assert!(!d.path().join("manifests").join(&old).exists());
    let frames_left =
        std::fs::read_dir(d.path().join("tables").join(&old)).map_or(0, |r| r.count());
    assert_eq!(frames_left, 0, "the leftover's frames were kept");
}

/// Newest catalog generations deleted: every host that saw them refuses to work from the
/// older one; a host that never saw them finds the orphaned header as evidence.
#[test]
fn deleting_newest_catalog_generations_is_a_rollback() {
    let (d, p) = setup();
    let state = tempfile::tempdir().unwrap();
    drop(init(d.path()));
    let r = host(d.path(), Some(state.path()));
    backup(&p, &r, "a", 1);
    backup(&p, &r, "b", 2);
    let files = catalog_files(d.path());
    assert_eq!(files.len(), 2);
    std::fs::remove_file(files.last().unwrap()).unwrap();

    let e = Catalogs::load(&r).unwrap_err();
    assert!(matches!(e, BackupError::RolledBack { .. }), "{e}");
    assert!(e.to_string().contains("rolled back"), "{e}");
    for e in [
        restore_volume(&p, &r, "v@a", None, "r", &NoProgress).unwrap_err(),
        verify::run(&r, false, 2, &NoProgress).unwrap_err(),
        gc::run(&r, &gc::Options::default(), &NoProgress).unwrap_err(),
    ] {
        assert!(matches!(e, BackupError::RolledBack { .. }), "{e}");
    }
    // A backup from this host neither builds on nor writes over the rolled-back catalog.
    p.create_snapshot("v", "c").unwrap();
    let e = backup_snapshot(&p, &r, "v@c", false, &NoProgress).unwrap_err();
    assert!(matches!(e, BackupError::RolledBack { .. }), "{e}");
    // Every catalog gone is a rollback too.
    for f in catalog_files(d.path()) {
        std::fs::remove_file(f).unwrap();
    }
    assert!(matches!(
        Catalogs::load(&r),
        Err(BackupError::RolledBack { .. })
    ));

    // A new host has no marks: it cannot tell, but verify finds the headers no catalog
    // lists and nobody removed, and gc keeps their data.
    let fresh = host(d.path(), None);
    let rep = verify::run(&fresh, false, 2, &NoProgress).unwrap();
    assert_eq!(rep.uncatalogued.len(), 2, "{rep:?}");
    assert!(!rep.is_clean());
    let g = gc::run(
        &fresh,
        &gc::Options {
            grace_secs: 0,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    assert_eq!((g.uncatalogued.len(), g.packs_deleted), (2, 0), "{g:?}");
}

/// A generation rewritten by a writer that never saw the deleted one (a new host, a prune
/// from another machine) is not the generation this host saw.
#[test]
fn a_replaced_generation_is_noticed() {
    let (d, p) = setup();
    let state = tempfile::tempdir().unwrap();
    drop(init(d.path()));
    let a = host(d.path(), Some(state.path()));
    backup(&p, &a, "a", 1);
    backup(&p, &a, "b", 2); // host A saw generation 2
    std::fs::remove_file(catalog_files(d.path()).last().unwrap()).unwrap();
    // Host B, with no marks, writes generation 2 (and then 3) from generation 1.
    let b = host(d.path(), None);
    let pool = p.uuid().to_string();
    let one = Catalogs::load(&b).unwrap().headers();
    let ids: std::collections::HashSet<&str> = one.iter().map(|h| h.id.as_str()).collect();
    catalog::update(&b, &pool, catalog::Change::Remove(&ids)).unwrap();
    let e = Catalogs::load(&a).unwrap_err();
    assert!(e.to_string().contains("does not descend"), "{e}");
    backup(&p, &b, "c", 3); // generation 3
    let e = Catalogs::load(&a).unwrap_err();
    assert!(e.to_string().contains("does not descend"), "{e}");
}

/// A generation copied over another generation's or pool's name does not open.
#[test]
fn catalog_objects_are_bound_to_their_names() {
    let (d, p) = setup();
    let r = init(d.path());
    backup(&p, &r, "a", 1);
    backup(&p, &r, "b", 2);
    let files = catalog_files(d.path());
    std::fs::copy(&files[0], &files[1]).unwrap();
    let e = Catalogs::load(&r).unwrap_err();
    assert!(e.to_string().contains("fails authentication"), "{e}");
    // Under another pool's name.
    let other = files[0].parent().unwrap().with_file_name("0000-other-pool");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&files[0], other.join(files[0].file_name().unwrap())).unwrap();
    std::fs::remove_file(&files[1]).unwrap();
    let e = Catalogs::load(&r).unwrap_err();
    assert!(e.to_string().contains("fails authentication"), "{e}");
}

/// `repo upgrade` catalogues the backups of a repository written before catalogs.
#[test]
fn upgrade_catalogues_existing_backups() {
    let (d, p) = setup();
    // Written as format 3 (whose index objects are `index/<pack>`, as format 1's).
    let opts = InitOptions {
        chunk_size: 64 << 10,
        pack_size: 1 << 20,
        version: 3,
        ..Default::default()
    };
    let r = Repository::init(store(d.path()), b"k", &opts).unwrap();
    backup(&p, &r, "a", 1);
    let want = image(&p, "v@a");
    backup(&p, &r, "b", 2);
    // As a format-1 repository would be: no catalogs, an unauthenticated config.
    std::fs::remove_dir_all(d.path().join("catalogs")).unwrap();
    let cfg = d.path().join("config");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["version"] = 1.into();
    v.as_object_mut().unwrap().remove("mac");
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(Repository::open(store(d.path()), b"k")
        .err()
        .unwrap()
        .to_string()
        .contains("repo upgrade"));
    let up = Repository::upgrade(store(d.path()), b"k").unwrap();
    assert_eq!(up.config().version, snapblk_backup::config::VERSION);
    assert_eq!(Catalogs::load(&up).unwrap().headers().len(), 2);
    // Idempotent.
    Repository::upgrade(store(d.path()), b"k").unwrap();
    assert_eq!(catalog_files(d.path()).len(), 1);
    let r = host(d.path(), None);
    restore_volume(&p, &r, "v@a", None, "r", &NoProgress).unwrap();
    assert!(image(&p, "r") == want);
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());
}

/// Catalog generations kept are bounded; each names its predecessors' hashes.
#[test]
fn old_generations_are_dropped() {
    let (d, p) = setup();
    let r = init(d.path());
    for i in 0..12 {
        backup(&p, &r, &format!("s{i}"), i + 1);
    }
    assert_eq!(
        catalog_files(d.path()).len() as u64,
        catalog::KEEP_GENERATIONS
    );
    let c = Catalogs::load(&r).unwrap();
    let l = c.pools.values().next().unwrap();
    assert_eq!(l.catalog.generation, 12);
    assert_eq!(l.catalog.previous.len(), 11);
    assert_eq!(l.catalog.backups.len(), 12);
}

/// Several pools (hosts) share one repository: their backups of the same names stay apart;
/// each restores its own by default, a new host must say whose it wants, and prune touches
/// only the pool it is told to.
#[test]
fn pools_back_up_at_once_and_each_restores_its_own() {
    let d = tempfile::tempdir().unwrap();
    drop(init(d.path()));
    let pools: Vec<Arc<Pool>> = (0..3).map(|_| common::pool(256 * MIB)).collect();
    let threads: Vec<_> = pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (p, dir) = (Arc::clone(p), d.path().to_path_buf());
            std::thread::spawn(move || {
                let r = host(&dir, None);
                p.create_volume("v", 4 * MIB).unwrap();
                backup(&p, &r, "s", 10 + i as u64);
                backup(&p, &r, "t", 20 + i as u64);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let r = host(d.path(), None);
    let c = Catalogs::load(&r).unwrap();
    assert_eq!(c.pools.len(), 3);
    assert_eq!(c.headers().len(), 6);
    for (i, p) in pools.iter().enumerate() {
        restore_volume(p, &r, "v@s", None, "r", &NoProgress).unwrap();
        assert!(
            image(p, "r") == image(p, "v@s"),
            "pool {i} restored another's v@s"
        );
    }
    // A new host: whose v@s? It must choose.
    let fresh = common::pool(256 * MIB);
    let e = restore_volume(&fresh, &r, "v@s", None, "r", &NoProgress).unwrap_err();
    assert!(e.to_string().contains("several pools"), "{e}");
    let from = pools[1].uuid().to_string();
    restore_volume(&fresh, &r, "v@s", Some(&from), "r", &NoProgress).unwrap();
    assert!(image(&fresh, "r") == image(&pools[1], "v@s"));
    // Prune: refused without a scope, then only pool 0's older backup goes.
    let policy = prune::Policy {
        keep_last: 1,
        ..Default::default()
    };
    let e = prune::run(&r, &policy, &Default::default(), false).unwrap_err();
    assert!(e.to_string().contains("--all-pools"), "{e}");
    let scope = prune::Scope {
        from: Some(pools[0].uuid().to_string()),
        all_pools: false,
    };
    let out = prune::run(&r, &policy, &scope, false).unwrap();
    assert_eq!(out.removed.len(), 1, "{out:?}");
    let left = Catalogs::load(&r).unwrap().headers();
    assert_eq!(left.len(), 5);
    assert!(left
        .iter()
        .all(|h| h.pool != pools[0].uuid() || h.snapshot == "t"));
}
