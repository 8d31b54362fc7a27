//! `MetaStore` conformance: the same checks on every implementation.

use std::ops::ControlFlow;

use snapblk_core::{MemStore, MetaStore, WriteBatch};
use snapblk_rocks::{Memory, RocksStore};
use snapblk_testkit::conformance;

#[test]
fn memstore_conforms() {
    conformance::run_all(&MemStore::new());
}

/// The power-loss simulator's store too (its view of the current boot).
#[test]
fn simstore_conforms() {
    let m = snapblk_testkit::powerloss::PowerLoss::machine(1 << 20);
    conformance::run_all(&*m.store);
}

#[test]
fn rocksdb_conforms_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = RocksStore::open(dir.path(), true).unwrap();
        conformance::run_all(&s);
    }
    let s = RocksStore::open(dir.path(), false).unwrap();
    conformance::persisted(&s);
}

/// With 1 MiB memtables: readers see range deletes from table files and keep working
/// across memtable switches, flushes and compactions.
#[test]
fn rocksdb_small_memtables_conform() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open_with(dir.path(), true, Memory::ONE_SHOT).unwrap();
    conformance::run_all(&s);
}

/// Readers' iterators are kept (at most 8), let go once idle for a second when the store is
/// tidied, and a visitor calling back into the reader it scans gets an error.
#[test]
fn rocksdb_keeps_few_readers_and_lets_idle_ones_go() {
    let dir = tempfile::tempdir().unwrap();
    let s = RocksStore::open(dir.path(), true).unwrap();
    let mut b = WriteBatch::new();
    b.put(b"a".to_vec(), b"1".to_vec());
    b.put(b"b".to_vec(), b"2".to_vec());
    s.commit(b, false).unwrap();
    let many: Vec<_> = (0..12).map(|_| s.reader().unwrap()).collect();
    assert_eq!(s.kept_readers(), 0);
    drop(many);
    assert_eq!(s.kept_readers(), 8);
    {
        let r = s.reader().unwrap();
        assert_eq!(s.kept_readers(), 7, "a kept iterator is reused");
        let mut nested = None;
        r.scan(b"a", b"c", &mut |_, _| {
            nested = Some(r.get(b"b"));
            ControlFlow::Break(())
        })
        .unwrap();
        let e = nested.unwrap().unwrap_err();
        assert!(e.to_string().contains("inside its own scan"), "{e}");
        assert_eq!(r.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
    }
    s.tidy();
    assert_eq!(s.kept_readers(), 8, "not idle yet");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    s.tidy();
    assert_eq!(s.kept_readers(), 0);
}

#[test]
fn rocksdb_refuses_missing_dir() {
    let dir = tempfile::tempdir().unwrap();
    let e = RocksStore::open(&dir.path().join("nope"), false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("no snapblk metadata"), "{e}");
}
