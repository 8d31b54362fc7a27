//! Tables in frames (repository format 4, docs/design.md §12 "Segmented tables"):
//! * a table of several frames restores and verifies; each frame is its own object;
//! * a frame moved to another position or another backup, or missing, fails the read
//!   naming the object, never restores other data;
//! * a format-3 repository keeps writing whole tables (hosts with an older snapblk still
//!   read it) until `repo upgrade`, after which new tables are framed and old ones still
//!   read; prune deletes both kinds.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{image, put, random_bytes, MIB};
use snapblk_backup::config::{VERSION, VERSION_WHOLE_TABLES};
use snapblk_backup::file::FileStore;
use snapblk_backup::frame::SEG;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::store::ObjectStore;
use snapblk_backup::volume::{backup_snapshot, restore_volume};
use snapblk_backup::{prune, verify, NoProgress, Repository};
use snapblk_core::Pool;

const CHUNK: u64 = 4 << 10;

fn store(dir: &Path) -> Arc<dyn ObjectStore> {
    Arc::new(FileStore::new(dir))
}

fn init(dir: &Path, version: u32) -> Repository {
    let opts = InitOptions {
        chunk_size: CHUNK as u32,
        pack_size: 1 << 20,
        version,
        ..Default::default()
    };
    Repository::init(store(dir), b"k", &opts).unwrap()
}

fn frames_of(dir: &Path, id: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("tables").join(id))
        .map(|r| r.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort_by_key(|p| {
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .parse::<u64>()
            .unwrap()
    });
    v
}

/// A volume spanning two whole frames and part of a third, with data in each.
fn volume(p: &Arc<Pool>, name: &str, seed: u64) {
    let size = 2 * SEG * CHUNK + 8 * MIB;
    if p.volume_info(name).is_err() {
        p.create_volume(name, size).unwrap();
    }
    for (i, off) in [0, SEG * CHUNK - CHUNK, SEG * CHUNK + 3 * MIB, size - MIB]
        .into_iter()
        .enumerate()
    {
        put(
            p,
            name,
            off,
            &random_bytes(MIB as usize, seed * 10 + i as u64),
        );
    }
}

fn restore_fails(p: &Arc<Pool>, r: &Repository, snap: &str, want: &str) {
    let _ = p.delete_volume("bad", true);
    let e = restore_volume(p, r, snap, None, "bad", &NoProgress).unwrap_err();
    assert!(e.to_string().contains(want), "{snap}: {e}");
    assert!(p.volume_info("bad").is_err(), "a partial restore was left");
}

#[test]
fn frames_restore_and_are_bound_to_their_backup_and_position() {
    let d = tempfile::tempdir().unwrap();
    let r = init(d.path(), VERSION);
    let p = common::pool(256 * MIB);
    volume(&p, "v", 1);
    p.create_snapshot("v", "a").unwrap();
    volume(&p, "v", 2);
    p.create_snapshot("v", "b").unwrap();
    let a = backup_snapshot(&p, &r, "v@a", false, &NoProgress)
        .unwrap()
        .manifest;
    let b = backup_snapshot(&p, &r, "v@b", false, &NoProgress)
        .unwrap()
        .manifest;
    let (fa, fb) = (frames_of(d.path(), &a), frames_of(d.path(), &b));
    assert_eq!(fa.len(), 3, "{fa:?}");
    assert_eq!(fb.len(), 3, "{fb:?}");
    assert!(!d.path().join("tables").join(&a).is_file());
    restore_volume(&p, &r, "v@a", None, "ra", &NoProgress).unwrap();
    assert!(
        image(&p, "ra") == image(&p, "v@a"),
        "restored image differs"
    );
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());

    let saved: Vec<Vec<u8>> = fa.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let put_back = || {
        for (f, b) in fa.iter().zip(&saved) {
            std::fs::write(f, b).unwrap();
        }
    };
    // Two frames of one table swapped.
    std::fs::write(&fa[0], &saved[1]).unwrap();
    std::fs::write(&fa[1], &saved[0]).unwrap();
    restore_fails(&p, &r, "v@a", "fails authentication");
    put_back();
    // Another backup's frame at the same position.
    std::fs::copy(&fb[1], &fa[1]).unwrap();
    restore_fails(&p, &r, "v@a", "fails authentication");
    put_back();
    // A frame gone (the last; then a middle one): the backup is lost, said so.
    std::fs::remove_file(&fa[2]).unwrap();
    restore_fails(&p, &r, "v@a", "is gone");
    put_back();
    std::fs::remove_file(&fa[1]).unwrap();
    restore_fails(&p, &r, "v@a", "is gone");
    put_back();
    let _ = p.delete_volume("ra", true);
    restore_volume(&p, &r, "v@a", None, "ra", &NoProgress).unwrap();
    assert!(
        image(&p, "ra") == image(&p, "v@a"),
        "restored image differs"
    );

    // Forgetting a backup deletes every frame.
    prune::forget(&r, std::slice::from_ref(&a), None, prune::OnHold::Refuse).unwrap();
    assert!(frames_of(d.path(), &a).is_empty(), "frames were left");
    assert_eq!(frames_of(d.path(), &b).len(), 3);
}

#[test]
fn a_format_3_repository_keeps_whole_tables_until_upgraded() {
    let d = tempfile::tempdir().unwrap();
    let r = init(d.path(), VERSION_WHOLE_TABLES);
    assert_eq!(r.config().version, 3);
    let p = common::pool(256 * MIB);
    volume(&p, "v", 1);
    p.create_snapshot("v", "a").unwrap();
    let a = backup_snapshot(&p, &r, "v@a", false, &NoProgress)
        .unwrap()
        .manifest;
    assert!(
        d.path().join("tables").join(&a).is_file(),
        "format 3 framed"
    );
    // Opened again as it is: still format 3.
    let r = Repository::open(store(d.path()), b"k").unwrap();
    assert_eq!(r.config().version, 3);
    let up = Repository::upgrade(store(d.path()), b"k").unwrap();
    assert_eq!(up.config().version, VERSION);
    let r = Repository::open(store(d.path()), b"k").unwrap();
    assert_eq!(r.config().version, VERSION);
    // An incremental on the whole-table base: framed.
    volume(&p, "v", 2);
    p.create_snapshot("v", "b").unwrap();
    let b = backup_snapshot(&p, &r, "v@b", false, &NoProgress).unwrap();
    assert_eq!(b.base.as_deref(), Some(a.as_str()), "not incremental");
    assert_eq!(frames_of(d.path(), &b.manifest).len(), 3);
    for (snap, into) in [("v@a", "ra"), ("v@b", "rb")] {
        restore_volume(&p, &r, snap, None, into, &NoProgress).unwrap();
        assert!(image(&p, into) == image(&p, snap), "{snap}: image differs");
    }
    assert!(verify::run(&r, true, 2, &NoProgress).unwrap().is_clean());
    prune::forget(&r, std::slice::from_ref(&a), None, prune::OnHold::Refuse).unwrap();
    assert!(!d.path().join("tables").join(&a).exists());
    prune::forget(
        &r,
        std::slice::from_ref(&b.manifest),
        None,
        prune::OnHold::Refuse,
    )
    .unwrap();
    assert!(frames_of(d.path(), &b.manifest).is_empty());
}

/// A backup streams its image in batches of frames (docs/design.md §12): a chunk stored
/// by an earlier batch is not stored again by a later one (the job's own index), an
/// incremental across several batches keeps and reads exactly the right cells, and
/// both kinds of repository (framed, whole tables) give the same images.
#[test]
fn batches_dedup_against_each_other_and_incrementals_span_them() {
    let frame = SEG * CHUNK;
    for version in [VERSION, VERSION_WHOLE_TABLES] {
        let d = tempfile::tempdir().unwrap();
        // A batch is one frame here (each holds 256 cells of data, over the limit).
        let r = init(d.path(), version).with_batch(64);
        let p = common::pool(64 * MIB);
        p.create_volume("v", 3 * frame).unwrap();
        let same = random_bytes(MIB as usize, 7);
        put(&p, "v", 0, &same);
        put(&p, "v", frame + 8 * CHUNK, &random_bytes(MIB as usize, 3));
        put(&p, "v", 2 * frame + MIB, &same);
        p.create_snapshot("v", "a").unwrap();
        let a = backup_snapshot(&p, &r, "v@a", false, &NoProgress).unwrap();
        // The third frame's chunks are the first's: stored by the first batch only.
        assert_eq!(a.stats.chunks_new, 512, "{version}: {:?}", a.stats);
        assert_eq!(a.stats.chunks_reused, 256, "{version}: {:?}", a.stats);
        // Changes in the first and last frames, zeros over data in the middle one, the
        // image grown by a frame with data at its end.
        put(&p, "v", 100 * CHUNK, &random_bytes(3 * CHUNK as usize, 8));
        put(&p, "v", frame + 10 * CHUNK, &vec![0u8; 2 * CHUNK as usize]);
        put(&p, "v", 2 * frame + MIB + 5, &[1u8; 10]);
        p.resize_volume("v", 4 * frame, false).unwrap();
        put(&p, "v", 4 * frame - CHUNK, &random_bytes(CHUNK as usize, 9));
        p.create_snapshot("v", "b").unwrap();
        let b = backup_snapshot(&p, &r, "v@b", false, &NoProgress).unwrap();
        assert!(b.base.is_some(), "{version}: not incremental");
        // Read: 3 + 1 + 1 cells holding data (the zeroed ones are dropped).
        let s = &b.stats;
        assert_eq!(s.chunks_new + s.chunks_reused, 5, "{version}: {s:?}");
        for s in ["v@a", "v@b"] {
            let into = format!("r-{}", &s[2..]);
            restore_volume(&p, &r, s, None, &into, &NoProgress).unwrap();
            assert!(common::same(&p, s, &into), "{version}: {s} differs");
        }
    }
}
