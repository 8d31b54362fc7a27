//! `MetaStore` conformance: the same checks on every implementation.

use snapblk_core::MemStore;
use snapblk_rocks::RocksStore;
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

#[test]
fn rocksdb_refuses_missing_dir() {
    let dir = tempfile::tempdir().unwrap();
    let e = RocksStore::open(&dir.path().join("nope"), false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("no snapblk metadata"), "{e}");
}
