//! `pool compact` on a RocksDB store: after a volume of 4K random writes is deleted and
//! reclaimed, the table files still hold its pages and the deletions of them until a
//! compaction reaches them; `Pool2::compact_metadata` rewrites them, so the size it reports
//! is what the pool's metadata takes. What stays must read back unchanged and check clean.
//! Checked that it bites: a compact that only flushed the memtables left 167 KB for 78 KB
//! of live entries (the deleted volume's pages stay in older table files), 46 KB compacted.

use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::pool2::Pool2;
use snapblk_core::Target;
use snapblk_rocks::{Memory, RocksStore};
use snapblk_testkit::powerloss::Rng;

const BS: u64 = 4096;
const VOL: u64 = 32 << 20;

#[test]
fn compaction_leaves_only_the_live_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open_with(dir.path(), true, Memory::ONE_SHOT).unwrap());
    let dev = Arc::new(MemDevice::new(256 << 20));
    Pool2::format(&*store, &*dev).unwrap();
    let pool = Pool2::open(store, dev).unwrap();
    pool.start_background();
    let mut rng = Rng(11);
    for name in ["gone", "kept"] {
        pool.create_volume(name, VOL).unwrap();
        let id = pool.volume_id(name).unwrap();
        let block: Vec<u8> = (0..BS).map(|i| (i as u8) ^ name.len() as u8).collect();
        for _ in 0..VOL / BS {
            pool.write(id, rng.below(VOL / BS) * BS, &block, false)
                .unwrap();
        }
    }
    let kept = pool.volume_id("kept").unwrap();
    let mut before = vec![0u8; VOL as usize];
    pool.read(&Target::Volume(kept), 0, &mut before).unwrap();
    pool.delete_volume("gone", false).unwrap();
    pool.reclaim_all().unwrap();
    pool.sync().unwrap();
    let full = pool.info().metadata_size;
    let compacted = pool.compact_metadata().unwrap().metadata_size;
    // The live entries' bytes, keys and values, before the table files compress them.
    let mut live = 0u64;
    pool.store()
        .scan(&[], &[0xff; 16], &mut |k, v| {
            live += (k.len() + v.len()) as u64;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    eprintln!("metadata before compaction {full} bytes, after {compacted}; live entries {live}");
    assert!(compacted > 0);
    assert!(
        compacted <= live + (16 << 10),
        "compaction left {compacted} bytes for {live} bytes of live entries ({full} before)"
    );
    let mut after = vec![0u8; VOL as usize];
    pool.read(&Target::Volume(kept), 0, &mut after).unwrap();
    assert!(after == before, "the kept volume changed across compaction");
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
}
