//! An index left behind after its pack is gone must not make later backups unrestorable,
//! and `repo repair` puts indexes and packs back in agreement, naming what is lost.

use std::path::Path;
use std::sync::Arc;

use snapblk_backup::file::FileStore;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::store::ObjectStore;
use snapblk_backup::volume::{backup_snapshot, restore_volume};
use snapblk_backup::{repair, verify, NoProgress, Repository};
use snapblk_core::Pool;

mod common;
use common::{image, pool, put, random_bytes, MIB};

/// Object files under `dir/sub`, sorted.
fn files(dir: &Path, sub: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join(sub)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn setup() -> (Arc<Pool>, tempfile::TempDir, Repository) {
    setup_as(snapblk_backup::config::VERSION)
}

/// A repository of format `version` holding one backup, `v@a`.
fn setup_as(version: u32) -> (Arc<Pool>, tempfile::TempDir, Repository) {
    let p = pool(256 * MIB);
    let d = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(d.path()));
    let r = Repository::init(
        store,
        b"k",
        &InitOptions {
            pack_size: 1 << 20,
            version,
            ..Default::default()
        },
    )
    .unwrap();
    p.create_volume("v", 8 * MIB).unwrap();
    put(&p, "v", 0, &random_bytes(8 * MIB as usize, 3));
    p.create_snapshot("v", "a").unwrap();
    backup_snapshot(&p, &r, "v@a", false, &NoProgress).unwrap();
    (p, d, r)
}

#[test]
fn a_backup_never_references_chunks_of_a_missing_pack() {
    let (p, d, r) = setup();
    let packs = files(d.path(), "packs");
    assert!(packs.len() > 2, "{packs:?}");
    std::fs::remove_file(&packs[1]).unwrap(); // its index stays behind
    p.create_snapshot("v", "b").unwrap();
    backup_snapshot(&p, &r, "v@b", false, &NoProgress).unwrap();
    restore_volume(&p, &r, "v@b", None, "rb", &NoProgress).expect("the new backup restores");
    assert!(image(&p, "v@b") == image(&p, "rb"));
}

#[test]
fn repair_rebuilds_lost_indexes_and_names_lost_chunks() {
    let (p, d, r) = setup();
    let indexes = files(d.path(), "ix");
    std::fs::remove_file(&indexes[0]).unwrap();
    let rep = repair::run(&r, false).unwrap();
    assert_eq!(rep.indexes_rebuilt.len(), 1, "{rep:?}");
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(files(d.path(), "ix").len(), indexes.len());
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());
    restore_volume(&p, &r, "v@a", None, "ra", &NoProgress).unwrap();
    assert!(image(&p, "v@a") == image(&p, "ra"));

    // A pack is lost for good: its index goes, the backup that needs it is named.
    let packs = files(d.path(), "packs");
    std::fs::remove_file(&packs[0]).unwrap();
    let dry = repair::run(&r, true).unwrap();
    assert_eq!(
        (dry.indexes_removed.len(), files(d.path(), "ix").len()),
        (1, indexes.len()),
        "a dry run changes nothing"
    );
    let rep = repair::run(&r, false).unwrap();
    assert_eq!(rep.indexes_removed.len(), 1, "{rep:?}");
    assert!(!rep.is_clean());
    assert_eq!(rep.backups_damaged.len(), 1, "{rep:?}");
    assert!(rep.backups_damaged[0].0.starts_with("v@a") && rep.backups_damaged[0].1 > 0);
    // A new backup stores the lost chunks again; then nothing is missing for it.
    p.create_snapshot("v", "c").unwrap();
    backup_snapshot(&p, &r, "v@c", false, &NoProgress).unwrap();
    restore_volume(&p, &r, "v@c", None, "rc", &NoProgress).unwrap();
    assert!(image(&p, "v@c") == image(&p, "rc"));
}

/// Pack indexes are bound to their pack's name: one copied over another's name fails to
/// open (before, it opened and sent reads to the wrong pack).
#[test]
fn a_pack_index_moved_to_another_name_does_not_open() {
    let (_p, d, r) = setup();
    let indexes = files(d.path(), "ix");
    assert!(indexes.len() >= 2);
    std::fs::copy(&indexes[0], &indexes[1]).unwrap();
    let e = verify::run(&r, false, 2, &NoProgress).expect_err("a moved index was accepted");
    assert!(e.to_string().contains("moved"), "{e}");
}

/// A format-1 repository (unauthenticated config, indexes sealed without their pack's
/// name) is refused until `upgrade`, which re-seals its indexes; then it restores.
#[test]
fn upgrade_binds_format_1_indexes_to_their_packs() {
    use snapblk_backup::pack::{index_aad, LEGACY_INDEX_AAD};
    // Written as format 3, whose index objects are `index/<pack>` as format 1's.
    let (p, d, r) = setup_as(3);
    for f in files(d.path(), "index") {
        let id = f.file_name().unwrap().to_str().unwrap().to_string();
        let plain = r
            .keys()
            .open(&std::fs::read(&f).unwrap(), &index_aad(&id))
            .unwrap();
        std::fs::write(&f, r.keys().seal(&plain, LEGACY_INDEX_AAD)).unwrap();
    }
    let cfg = d.path().join("config");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["version"] = 1.into();
    v.as_object_mut().unwrap().remove("mac");
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(d.path()));
    assert!(Repository::open(Arc::clone(&store), b"k").is_err());
    let up = Repository::upgrade(Arc::clone(&store), b"k").unwrap();
    assert_eq!(up.config().version, snapblk_backup::config::VERSION);
    assert!(verify::run(&up, true, 2, &NoProgress).unwrap().is_clean());
    restore_volume(&p, &up, "v@a", None, "ra", &NoProgress).unwrap();
    assert!(image(&p, "v@a") == image(&p, "ra"));
}
