//! Helpers shared by the backup engine's integration tests: an in-memory pool, reproducible
//! random contents, and reading a volume or snapshot whole.
#![allow(dead_code)] // each test binary uses its own subset

use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::{Export, MemStore, Pool, VolumeHandle};

pub const MIB: u64 = 1 << 20;

/// A formatted pool in memory with a data device of `device_bytes`.
pub fn pool(device_bytes: u64) -> Arc<Pool> {
    let store = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new(device_bytes));
    Pool::format(&*store, &*dev).unwrap();
    Pool::open(store, dev).unwrap()
}

/// `len` bytes that never repeat a chunk (xorshift from `seed`): incompressible, no dedup.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` at `off` of volume `vol`.
pub fn put(pool: &Arc<Pool>, vol: &str, off: u64, data: &[u8]) {
    VolumeHandle::open(pool, vol)
        .unwrap()
        .write(off, data, false)
        .unwrap();
}

/// The whole contents of a volume or `vol@snap`.
pub fn image(pool: &Arc<Pool>, name: &str) -> Vec<u8> {
    let h = VolumeHandle::open(pool, name).unwrap();
    let mut b = vec![0u8; h.size().unwrap() as usize];
    for (i, c) in b.chunks_mut(MIB as usize).enumerate() {
        h.read(i as u64 * MIB, c).unwrap();
    }
    b
}
