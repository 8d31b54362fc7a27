//! On-disk metadata as read at open: a valid pool's metadata store (volumes, snapshots, a
//! clone, mapped and zero blocks) is damaged by the fuzz input (keys deleted, values
//! overwritten or truncated, arbitrary keys inserted), then opened, checked offline and
//! online, read, diffed and reclaimed. Every decoder must return a typed error naming the
//! key instead of panicking, and a damaged tree (parent loops, dangling layers) must not
//! hang or crash the pool. The base pool has a consolidated piece (checksum block).
#![no_main]

use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::DataDevice;
use snapblk_core::{MemStore, MetaStore, Pool, WriteBatch};

type Kv = Vec<(Vec<u8>, Vec<u8>)>;

/// A small pool with every kind of record, as (key, value) pairs, and its data device.
fn base() -> &'static (Kv, Arc<MemDevice>) {
    static B: OnceLock<(Kv, Arc<MemDevice>)> = OnceLock::new();
    B.get_or_init(|| {
        let store = Arc::new(MemStore::new());
        let dev = Arc::new(MemDevice::new((1 << 20) + (2 << 20)));
        Pool::format(&*store, &*dev).expect("format");
        // Checksums of 16 blocks moved into a checksum block (format2.md §9b), so that
        // consolidated pieces and their count record are among the records damaged.
        let opts = snapblk_core::pool2::OpenOptions {
            consolidate: Some(16),
            ..Default::default()
        };
        let pool = Pool::open_with(store.clone(), dev.clone(), &opts).expect("open");
        pool.create_volume("a", 256 << 10).expect("volume");
        let id = pool.volume_id("a").expect("id");
        pool.write(id, 0, &[1u8; 16384], false).expect("write");
        pool.write(id, 131072, &[3u8; 65536], false).expect("write");
        let t0 = std::time::Instant::now();
        while pool.checksum_stats().blocks_moved < 16 && t0.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        pool.create_snapshot("a", "s1").expect("snapshot");
        pool.write(id, 8192, &[2u8; 8192], false).expect("write");
        pool.zero(id, 65536, 65536, false).expect("zero");
        pool.create_snapshot("a", "s2").expect("snapshot");
        pool.clone_snapshot("a", "s1", "b").expect("clone");
        pool.delete_snapshot("a", "s2").expect("delete");
        pool.sync().expect("sync");
        let mut kv = Vec::new();
        store
            .scan(&[], &[0xff; 32], &mut |k, v| {
                kv.push((k.to_vec(), v.to_vec()));
                ControlFlow::Continue(())
            })
            .expect("scan");
        (kv, dev)
    })
}

/// Applies the damage the input describes: 4-byte steps (op, index, offset, byte) and, for
/// inserts, the rest of the input as one raw key/value.
fn damage(kv: &mut Kv, data: &[u8]) {
    let mut steps = data.chunks_exact(4);
    for s in &mut steps {
        if kv.is_empty() {
            return;
        }
        let i = s[1] as usize % kv.len();
        let (op, off, byte) = (s[0] % 5, s[2] as usize, s[3]);
        match op {
            0 => {
                kv.remove(i);
            }
            1 => {
                let v = &mut kv[i].1;
                if !v.is_empty() {
                    let n = v.len();
                    v[off % n] = byte;
                }
            }
            2 => {
                let v = &mut kv[i].1;
                let n = off.min(v.len());
                v.truncate(n);
            }
            3 => {
                let k = &mut kv[i].0;
                if !k.is_empty() {
                    let n = k.len();
                    k[off % n] = byte;
                }
            }
            _ => {
                let rest = steps.remainder();
                let split = off.min(rest.len());
                kv.push((rest[..split].to_vec(), rest[split..].to_vec()));
                return;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (kv, dev) = base();
    let mut kv = kv.clone();
    damage(&mut kv, data);
    let store = Arc::new(MemStore::new());
    let mut b = WriteBatch::new();
    for (k, v) in kv {
        b.put(k, v);
    }
    store.commit(b, true).expect("commit");
    let _ = snapblk_core::v2::check::check(&*store, 512, &snapblk_core::v2::sums::NoSumBlocks);
    let dev: Arc<dyn DataDevice> = dev.clone();
    let Ok(pool) = Pool::open(store, dev) else {
        return;
    };
    let _ = pool.check();
    for v in pool.list_volumes() {
        if let Ok(t) = pool.resolve_target(&v.name) {
            let mut buf = vec![0u8; 16384];
            let _ = pool.read(&t, 0, &mut buf);
            let _ = pool.block_status(&t, 0, v.size.min(1 << 20));
        }
    }
    if let Ok(snaps) = pool.list_snapshots(None) {
        let targets: Vec<_> = snaps
            .iter()
            .filter_map(|s| pool.resolve_target(&format!("{}@{}", s.volume, s.name)).ok())
            .collect();
        if let (Some(a), Some(b)) = (targets.first(), targets.last()) {
            let _ = pool.diff(a, b);
        }
    }
    let _ = pool.reclaim_all();
    let _ = pool.check();
});
