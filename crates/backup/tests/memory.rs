//! Memory of backup jobs is bounded by what they hold, never by a size read from stored
//! bytes: a counting global allocator records the largest single allocation while a
//! backup, an incremental backup, list, verify (with data), prune, gc, a full restore and
//! a lazy restore run on a small volume. Before the fix, reading a manifest table asked
//! for ~10 GiB in one allocation (zstd's one-shot decoder sized by the table entry limit),
//! which aborted every restore on hosts with less memory than that.
//!
//! Also: a full restore marks its volume incomplete until its data is flushed.
//!
//! This file is its own test binary, so the allocator sees only these tests; they run one
//! at a time (a lock) so the figures are theirs alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use snapblk_backup::file::FileStore;
use snapblk_backup::lazy::Restores;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::store::ObjectStore;
use snapblk_backup::volume::{backup_snapshot, restore_lazy, restore_volume};
use snapblk_backup::{gc, manifest, prune, verify, NoProgress, Progress, Repository};
use snapblk_core::Pool;

mod common;
use common::{image, pool, put, random_bytes, MIB};

struct Counting;

static LARGEST: AtomicU64 = AtomicU64::new(0);

fn note(size: usize) {
    LARGEST.fetch_max(size as u64, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; recording the size
// touches only an atomic and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated by `System` with layout `l` (every alloc above is).
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        // SAFETY: `p` came from `System` with layout `l`; the caller's contract holds.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

/// The largest buffer a job over this 32 MiB volume may need: a 16 MiB coalesced ranged
/// GET (restore), packs of 1 MiB, chunks of 64 KiB. Anything past this is sized by
/// something other than the data at hand.
const LIMIT: u64 = 24 * MIB;

/// Runs `f` and returns the largest single allocation it made.
fn largest_during(f: impl FnOnce()) -> u64 {
    LARGEST.store(0, Ordering::Relaxed);
    f();
    LARGEST.load(Ordering::Relaxed)
}

fn check(what: &str, largest: u64) {
    assert!(
        largest <= LIMIT,
        "{what} allocated {largest} bytes at once (limit {LIMIT}): a size read from stored bytes sized a buffer"
    );
}

#[test]
fn every_job_allocates_by_the_data_not_by_stored_sizes() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let p = pool(256 * MIB);
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(dir.path()));
    let opts = InitOptions {
        chunk_size: 64 << 10,
        pack_size: 1 << 20,
        ..Default::default()
    };
    let r = Repository::init(store, b"test key", &opts).unwrap();
    p.create_volume("v", 32 * MIB).unwrap();
    put(&p, "v", 0, &random_bytes(12 * MIB as usize, 1));
    p.create_snapshot("v", "a").unwrap();
    put(&p, "v", 20 * MIB, &random_bytes(2 * MIB as usize, 2));
    p.create_snapshot("v", "b").unwrap();

    check(
        "a full backup",
        largest_during(|| {
            backup_snapshot(&p, &r, "v@a", false, &NoProgress).unwrap();
        }),
    );
    check(
        "an incremental backup",
        largest_during(|| {
            let s = backup_snapshot(&p, &r, "v@b", false, &NoProgress).unwrap();
            assert!(s.base.is_some(), "incremental");
        }),
    );
    check(
        "list",
        largest_during(|| {
            let (h, bad) = manifest::list(&r).unwrap();
            assert_eq!((h.len(), bad.len()), (2, 0));
        }),
    );
    check(
        "verify --read-data",
        largest_during(|| {
            let rep = verify::run(&r, true, 2, &NoProgress).unwrap();
            assert!(rep.is_clean(), "{:?}", rep.problems);
        }),
    );
    check(
        "a full restore",
        largest_during(|| {
            restore_volume(&p, &r, "v@b", None, "full", &NoProgress).unwrap();
        }),
    );
    assert!(
        image(&p, "v@b") == image(&p, "full"),
        "restored image differs"
    );
    check(
        "a lazy restore",
        largest_during(|| {
            let restores = Arc::new(Restores::default());
            let h = restore_lazy(&p, &r, "v@a", None, "lazy", &restores, state.path()).unwrap();
            for _ in 0..600 {
                if h.is_complete() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(h.is_complete(), "{:?}", h.status());
        }),
    );
    assert!(
        image(&p, "v@a") == image(&p, "lazy"),
        "lazy restore differs"
    );
    check(
        "prune + gc",
        largest_during(|| {
            let policy = prune::Policy {
                keep_last: 1,
                ..Default::default()
            };
            prune::run(&r, &policy, &Default::default(), false).unwrap();
            let g = gc::Options {
                grace_secs: 0,
                max_unused: 0.0,
                dry_run: false,
            };
            gc::run(&r, &g, &NoProgress).unwrap();
        }),
    );
    restore_volume(&p, &r, "v@b", None, "after-gc", &NoProgress).unwrap();
    assert!(image(&p, "v@b") == image(&p, "after-gc"));
}

/// Checks, at the restore's first write, that the volume being filled says it is
/// incomplete.
struct Watch {
    pool: Arc<Pool>,
    volume: &'static str,
    seen: AtomicBool,
    marked: AtomicBool,
}

impl Progress for Watch {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {
        if !self.seen.swap(true, Ordering::SeqCst) {
            let info = self.pool.volume_info(self.volume).unwrap();
            self.marked
                .store(info.incomplete.is_some(), Ordering::SeqCst);
        }
    }
}

#[test]
fn a_full_restore_is_marked_incomplete_until_it_ends() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let p = pool(256 * MIB);
    let store: Arc<dyn ObjectStore> = Arc::new(FileStore::new(dir.path()));
    let r = Repository::init(store, b"test key", &InitOptions::default()).unwrap();
    p.create_volume("v", 8 * MIB).unwrap();
    put(&p, "v", 0, &random_bytes(4 * MIB as usize, 3));
    p.create_snapshot("v", "s").unwrap();
    backup_snapshot(&p, &r, "v@s", false, &NoProgress).unwrap();
    let w = Watch {
        pool: Arc::clone(&p),
        volume: "copy",
        seen: AtomicBool::new(false),
        marked: AtomicBool::new(false),
    };
    restore_volume(&p, &r, "v@s", None, "copy", &w).unwrap();
    assert!(
        w.seen.load(Ordering::SeqCst),
        "the restore reported progress"
    );
    assert!(
        w.marked.load(Ordering::SeqCst),
        "the volume was not marked incomplete while it filled"
    );
    let info = p.volume_info("copy").unwrap();
    assert_eq!(
        info.incomplete, None,
        "the mark is cleared once the restore ends"
    );
    assert!(image(&p, "v@s") == image(&p, "copy"));
}
