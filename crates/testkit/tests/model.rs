//! The model test bodies, run against both metadata stores and both data devices.

use std::sync::Arc;

use proptest::prelude::*;
use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::uring::{DataCache, UringFile};
use snapblk_core::device::DataDevice;
use snapblk_core::MetaStore;
use snapblk_core::{MemStore, Pool1};
use snapblk_rocks::RocksStore;
use snapblk_testkit::model::{self, op_strategy, run_with, Op};
use snapblk_testkit::{mem_env, FactoryEnv, PoolEnv};

fn rocks_env(dir: &std::path::Path) -> impl PoolEnv {
    let meta = dir.join("meta");
    let data = dir.join("data");
    std::fs::create_dir_all(&meta).unwrap();
    UringFile::create_file(&data, model::device_bytes()).unwrap();
    let mut first = true;
    // Each case starts in the daemon's default `data_cache` mode (reads through the page
    // cache) and every reopen moves to the next (O_DIRECT, then everything through it),
    // as an admin changing the setting across restarts would.
    let modes = [DataCache::Reads, DataCache::None, DataCache::Host];
    let mut opens = 0usize;
    FactoryEnv {
        make_store: move || -> Arc<dyn MetaStore> {
            let s = RocksStore::open(&meta, first).unwrap();
            first = false;
            Arc::new(s)
        },
        make_dev: move || -> Arc<dyn DataDevice> {
            let mode = modes[opens % modes.len()];
            opens += 1;
            let dev = UringFile::open_cached(&data, mode).unwrap();
            // Where the file system refuses O_DIRECT every mode is Host.
            assert!(dev.data_cache() == mode || !dev.is_direct());
            Arc::new(dev)
        },
        formatted: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn model_memstore(ops in prop::collection::vec(op_strategy(), 1..60)) {
        let mut env = mem_env(model::device_bytes());
        model::run(&mut env, &ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn model_rocksdb_uring(ops in prop::collection::vec(op_strategy(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut env = rocks_env(dir.path());
        model::run(&mut env, &ops);
    }
}

/// A fixed scenario that touches every operation, on both backends.
fn scripted() -> Vec<Op> {
    use Op::*;
    vec![
        Create,
        Write {
            vol: 0,
            sector: 0,
            sectors: 128,
            seed: 1,
            zeros: false,
            fua: false,
        },
        Snapshot { vol: 0 },
        Write {
            vol: 0,
            sector: 3,
            sectors: 5,
            seed: 2,
            zeros: false,
            fua: true,
        },
        Zero {
            vol: 0,
            sector: 8,
            sectors: 40,
        },
        Snapshot { vol: 0 },
        Clone { snap: 0 },
        Write {
            vol: 1,
            sector: 60,
            sectors: 9,
            seed: 3,
            zeros: false,
            fua: false,
        },
        Reopen,
        Rollback { snap: 0 },
        DeleteSnapshot { snap: 0 },
        Reclaim,
        Write {
            vol: 0,
            sector: 0,
            sectors: 16,
            seed: 4,
            zeros: true,
            fua: false,
        },
        Resize { vol: 1, blocks: 3 },
        Resize { vol: 1, blocks: 20 },
        Rename { vol: 0 },
        Reopen,
        DeleteVolume {
            vol: 0,
            recursive: true,
        },
        Reclaim,
        Sync,
    ]
}

#[test]
fn scripted_memstore() {
    model::run(&mut mem_env(model::device_bytes()), &scripted());
}

#[test]
fn scripted_rocksdb_uring() {
    let dir = tempfile::tempdir().unwrap();
    model::run(&mut rocks_env(dir.path()), &scripted());
}

/// The format-1 pool (kept for `pool upgrade`) against the same model.
#[test]
fn model_format1_memstore() {
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::new());
    let dev: Arc<dyn DataDevice> = Arc::new(MemDevice::new(model::device_bytes()));
    let mut formatted = false;
    let mut open = move || {
        if !formatted {
            Pool1::format(&*store, &*dev).expect("format");
            formatted = true;
        }
        Pool1::open(Arc::clone(&store), Arc::clone(&dev)).expect("open")
    };
    run_with(&mut open, &scripted());
}
