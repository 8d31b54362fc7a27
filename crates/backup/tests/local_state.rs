//! This host's own state beside the object cache (the local chunk index, jobs' table
//! copies) is a cache: when it cannot be written, backups and restores still run, each
//! with a temporary index of its own; and what jobs leave behind is cleaned up.

mod common;

use std::sync::Arc;

use common::{put, random_bytes, same, MIB};
use snapblk_backup::cache::ObjectCache;
use snapblk_backup::file::FileStore;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::store::ObjectStore;
use snapblk_backup::volume::{backup_snapshot, restore_volume};
use snapblk_backup::{NoProgress, Repository};

/// A repository of 64 KiB chunks with an object cache: (its directories, the cache, it).
fn repo() -> ([tempfile::TempDir; 2], ObjectCache, Repository) {
    let d = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(d.path()));
    let opts = InitOptions {
        chunk_size: 64 << 10,
        pack_size: 1 << 20,
        ..Default::default()
    };
    let cache = ObjectCache::new(state.path().join("cache"));
    let r = Repository::init(store, b"k", &opts)
        .unwrap()
        .with_cache(Some(cache.clone()));
    ([d, state], cache, r)
}

/// A full backup, an incremental that must dedup, and a restore that must match.
fn backup_twice_and_restore(r: &Repository) -> Arc<snapblk_core::Pool> {
    let p = common::pool(64 * MIB);
    p.create_volume("v", 8 * MIB).unwrap();
    put(&p, "v", 0, &random_bytes(4 * MIB as usize, 1));
    p.create_snapshot("v", "a").unwrap();
    backup_snapshot(&p, r, "v@a", false, &NoProgress).unwrap();
    put(&p, "v", MIB, &random_bytes(MIB as usize, 2));
    p.create_snapshot("v", "b").unwrap();
    let b = backup_snapshot(&p, r, "v@b", false, &NoProgress).unwrap();
    assert_eq!(
        b.stats.chunks_new, 16,
        "the incremental did not dedup: {b:?}"
    );
    restore_volume(&p, r, "v@b", None, "rb", &NoProgress).unwrap();
    assert!(same(&p, "v@b", "rb"), "restored image differs");
    p
}

#[test]
fn an_unusable_cache_directory_falls_back_to_a_temporary_index() {
    let (_dirs, cache, r) = repo();
    // A file where the index's directory belongs: it cannot be created.
    let dir = cache.chunk_index_dir(&r);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    std::fs::write(&dir, b"in the way").unwrap();
    backup_twice_and_restore(&r);
    // The table copies of the restore are gone with it.
    let jobs = cache.scratch_dir(&r);
    let left = std::fs::read_dir(&jobs).map_or(0, |e| e.count());
    assert_eq!(left, 0, "a table copy was left in {}", jobs.display());
}

/// Where jobs keep their private files (the new table's frames, a base table's copy,
/// the chunks a backup stored) cannot be created: backups and restores still run, with
/// those files in the system's temporary directory (before the fallback, every backup
/// of a format-4 repository failed on such a host).
#[test]
fn an_unusable_scratch_directory_falls_back_to_the_temporary_directory() {
    let (_dirs, cache, r) = repo();
    let r = r.with_batch(16);
    let jobs = cache.scratch_dir(&r);
    std::fs::create_dir_all(jobs.parent().unwrap()).unwrap();
    std::fs::write(&jobs, b"in the way").unwrap();
    backup_twice_and_restore(&r);
}
