//! The request mapping of the ublk frontend, without a kernel: `execute` against a real
//! volume of an in-memory pool.

use std::sync::Arc;

use libublk::sys;
use snapblk_core::device::mem::MemDevice;
use snapblk_core::{Export, MemStore, Pool, VolumeHandle};
use snapblk_ublk::execute;

fn volume() -> (Arc<Pool>, Arc<dyn Export>) {
    let store = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new(64 << 20));
    Pool::format(&*store, &*dev).unwrap();
    let pool = Pool::open(store, dev).unwrap();
    pool.create_volume("v", 8 << 20).unwrap();
    let h: Arc<dyn Export> = Arc::new(VolumeHandle::open(&pool, "v").unwrap());
    (pool, h)
}

#[test]
fn read_write_flush_discard_zeroes() {
    let (_pool, v) = volume();
    let mut buf = vec![0x5au8; 1 << 20];
    assert_eq!(
        execute(
            &*v,
            sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA,
            8,
            16,
            &mut buf
        ),
        8192
    );
    let mut out = vec![0u8; 1 << 20];
    assert_eq!(execute(&*v, sys::UBLK_IO_OP_READ, 8, 16, &mut out), 8192);
    assert!(out[..8192].iter().all(|&b| b == 0x5a));
    // FLUSH comes with start_sector u64::MAX and no length.
    assert_eq!(
        execute(&*v, sys::UBLK_IO_OP_FLUSH, u64::MAX, 0, &mut out),
        0
    );
    assert_eq!(execute(&*v, sys::UBLK_IO_OP_DISCARD, 8, 8, &mut out), 0);
    assert_eq!(
        execute(&*v, sys::UBLK_IO_OP_WRITE_ZEROES, 16, 8, &mut out),
        0
    );
    assert_eq!(execute(&*v, sys::UBLK_IO_OP_READ, 8, 16, &mut out), 8192);
    assert!(out[..8192].iter().all(|&b| b == 0));
}

#[test]
fn bad_requests_get_errors_not_panics() {
    let (_pool, v) = volume();
    let mut buf = vec![0u8; 4096];
    // Longer than the I/O buffer.
    assert_eq!(
        execute(&*v, sys::UBLK_IO_OP_READ, 0, 16, &mut buf),
        -libc::EINVAL
    );
    // Past the end of the volume, and a sector number that overflows a byte offset.
    assert_eq!(
        execute(&*v, sys::UBLK_IO_OP_READ, 8 << 11, 8, &mut buf),
        -libc::EINVAL
    );
    assert_eq!(
        execute(&*v, sys::UBLK_IO_OP_WRITE, u64::MAX / 256, 8, &mut buf),
        -libc::EINVAL
    );
    // Unknown op (a zone operation).
    assert_eq!(
        execute(&*v, sys::UBLK_IO_OP_ZONE_OPEN, 0, 0, &mut buf),
        -libc::EINVAL
    );
}

#[test]
fn read_only_snapshot_refuses_writes() {
    let (pool, _v) = volume();
    pool.create_snapshot("v", "s").unwrap();
    let s: Arc<dyn Export> = Arc::new(VolumeHandle::open(&pool, "v@s").unwrap());
    let mut buf = vec![1u8; 4096];
    assert_eq!(
        execute(&*s, sys::UBLK_IO_OP_WRITE, 0, 8, &mut buf),
        -libc::EPERM
    );
    assert_eq!(
        execute(&*s, sys::UBLK_IO_OP_DISCARD, 0, 8, &mut buf),
        -libc::EPERM
    );
    assert_eq!(execute(&*s, sys::UBLK_IO_OP_READ, 0, 8, &mut buf), 4096);
}
