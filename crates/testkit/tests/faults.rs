//! A data device that fails: reads and writes in a chosen byte range return EIO. The error
//! reaches the caller as EIO, the metadata stays consistent (`check` clean), other volumes
//! keep working, and once the device recovers everything written before reads back.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::{DataDevice, ReadSeg, WriteSeg, DATA_START};
use snapblk_core::{MemStore, Pool, Target};

/// Fails reads touching `[lo, hi)` (byte offsets) while `hi > lo`, and every write while
/// `fail_writes` is non-zero.
struct Faulty {
    inner: MemDevice,
    lo: AtomicU64,
    hi: AtomicU64,
    fail_writes: AtomicU64,
}

impl Faulty {
    fn hit(&self, off: u64, len: usize) -> bool {
        let (lo, hi) = (
            self.lo.load(Ordering::SeqCst),
            self.hi.load(Ordering::SeqCst),
        );
        off < hi && off + len as u64 > lo
    }
    fn set(&self, lo: u64, hi: u64) {
        self.lo.store(lo, Ordering::SeqCst);
        self.hi.store(hi, Ordering::SeqCst);
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(5)
}

impl DataDevice for Faulty {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read(&self, segs: &mut [ReadSeg<'_>]) -> io::Result<()> {
        if segs.iter().any(|s| self.hit(s.offset, s.buf.len())) {
            return Err(eio());
        }
        self.inner.read(segs)
    }
    fn write(&self, segs: &[WriteSeg<'_>], fua: bool) -> io::Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) > 0 {
            return Err(eio());
        }
        self.inner.write(segs, fua)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
}

#[test]
fn device_errors_are_eio_and_leave_metadata_consistent() {
    let dev = Arc::new(Faulty {
        inner: MemDevice::new(64 << 20),
        lo: AtomicU64::new(0),
        hi: AtomicU64::new(0),
        fail_writes: AtomicU64::new(0),
    });
    let store = Arc::new(MemStore::new());
    Pool::format(&*store, &*dev).unwrap();
    let pool = Pool::open(store, dev.clone()).unwrap();
    pool.create_volume("a", 4 << 20).unwrap();
    pool.create_volume("b", 4 << 20).unwrap();
    let (a, b) = (pool.volume_id("a").unwrap(), pool.volume_id("b").unwrap());
    pool.write(a, 0, &vec![0xaa; 1 << 20], false).unwrap();
    pool.write(b, 0, &vec![0xbb; 1 << 20], false).unwrap();
    pool.sync().unwrap();

    // Reads of a's blocks fail with EIO; b is still served.
    dev.set(DATA_START, DATA_START + (1 << 20));
    let mut buf = vec![0u8; 65536];
    let e = pool.read(&Target::Volume(a), 0, &mut buf).unwrap_err();
    assert_eq!(e.errno(), 5, "{e}");
    pool.read(&Target::Volume(b), 0, &mut buf).unwrap();
    assert!(buf.iter().all(|x| *x == 0xbb));
    dev.set(0, 0);

    // Writes fail with EIO; nothing half-done is left in the metadata.
    dev.fail_writes.store(1, Ordering::SeqCst);
    let e = pool.write(a, 8192, &vec![0xcc; 65536], false).unwrap_err();
    assert_eq!(e.errno(), 5, "{e}");
    let e = pool.write(b, 2 << 20, &vec![0xcc; 4096], true).unwrap_err();
    assert_eq!(e.errno(), 5, "{e}");
    dev.fail_writes.store(0, Ordering::SeqCst);
    let rep = pool.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");

    // The device is back: old data intact, new writes work, nothing leaked.
    pool.read(&Target::Volume(a), 0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|x| *x == 0xaa),
        "a failed write must not change data"
    );
    pool.write(a, 8192, &vec![0xdd; 65536], false).unwrap();
    pool.read(&Target::Volume(a), 8192, &mut buf).unwrap();
    assert!(buf.iter().all(|x| *x == 0xdd));
    pool.delete_volume("a", false).unwrap();
    pool.delete_volume("b", false).unwrap();
    pool.reclaim_all().unwrap();
    pool.sync().unwrap();
    let rep = pool.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    let info = pool.info();
    assert_eq!(info.used, 0, "blocks of failed writes leaked: {info:?}");
}
