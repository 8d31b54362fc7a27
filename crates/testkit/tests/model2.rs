//! The pool model (testkit/src/model.rs) on metadata format 2 (`Pool2`): the same random
//! sequences and the same byte-for-byte checks as the format-1 pool, plus `pool check`'s
//! format-2 invariants (leaks included) after every step.

use std::sync::Arc;

use proptest::prelude::*;
use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::DataDevice;
use snapblk_core::pool2::Pool2;
use snapblk_core::{MemStore, MetaStore};
use snapblk_testkit::model::{device_bytes, op_strategy, run_with, Op};

fn mem_open() -> impl FnMut() -> Arc<Pool2> {
    let store: Arc<dyn MetaStore> = Arc::new(MemStore::new());
    let dev: Arc<dyn DataDevice> = Arc::new(MemDevice::new(device_bytes()));
    let mut formatted = false;
    move || {
        if !formatted {
            Pool2::format(&*store, &*dev).expect("format");
            formatted = true;
        }
        Pool2::open(Arc::clone(&store), Arc::clone(&dev)).expect("open")
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn model2_memstore(ops in prop::collection::vec(op_strategy(), 1..60)) {
        run_with(&mut mem_open(), &ops);
    }
}

#[test]
fn model2_scripted() {
    use Op::*;
    let ops = vec![
        Create,
        Write {
            vol: 0,
            sector: 0,
            sectors: 24,
            seed: 1,
            zeros: false,
            fua: false,
        },
        Snapshot { vol: 0 },
        Write {
            vol: 0,
            sector: 3,
            sectors: 9,
            seed: 2,
            zeros: false,
            fua: true,
        },
        Clone { snap: 0 },
        Write {
            vol: 1,
            sector: 7,
            sectors: 20,
            seed: 3,
            zeros: false,
            fua: false,
        },
        Trim {
            vol: 1,
            sector: 0,
            sectors: 40,
        },
        Snapshot { vol: 1 },
        Rollback { snap: 0 },
        DeleteSnapshot { snap: 0 },
        Zero {
            vol: 1,
            sector: 1,
            sectors: 30,
        },
        Resize { vol: 1, blocks: 5 },
        Resize { vol: 1, blocks: 30 },
        Reclaim,
        Reopen,
        DeleteVolume {
            vol: 0,
            recursive: true,
        },
        Reclaim,
        Sync,
    ];
    run_with(&mut mem_open(), &ops);
}
