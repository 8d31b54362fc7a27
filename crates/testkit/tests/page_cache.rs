//! Reads through a host cache that writes bypass (`data_cache = "reads"`): the kernel keeps
//! that cache coherent with direct writes only as a best effort, so a read whose copy fails
//! its checksum drops the cached copy and reads the media again (`ReadPlan::finish_on`);
//! a device without such a cache reports the mismatch as before.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::{DataDevice, ReadSeg, WriteSeg, DATA_START};
use snapblk_core::pool2::Pool2;
use snapblk_core::{Error, MemStore, Target};

/// A device whose next `stale` non-bulk reads come back with a flipped byte, as a stale
/// page-cache copy would; bulk reads (the media) are right unless `bad_media` is set.
struct StaleCache {
    inner: MemDevice,
    cached: bool,
    bad_media: AtomicBool,
    stale: AtomicU32,
    forgot: AtomicU32,
    media_reads: AtomicU32,
}

impl DataDevice for StaleCache {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read(&self, segs: &mut [ReadSeg<'_>]) -> io::Result<()> {
        self.inner.read(segs)?;
        if snapblk_core::meta::is_bulk() {
            self.media_reads.fetch_add(1, Ordering::SeqCst);
            if self.bad_media.load(Ordering::SeqCst) {
                if let Some(s) = segs.first_mut() {
                    s.buf[200] ^= 0xff;
                }
            }
        } else if self
            .stale
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            if let Some(s) = segs.first_mut() {
                s.buf[100] ^= 0xff;
            }
        }
        Ok(())
    }
    fn write(&self, segs: &[WriteSeg<'_>], fua: bool) -> io::Result<()> {
        self.inner.write(segs, fua)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn reads_cached(&self) -> bool {
        self.cached
    }
    fn forget_cached(&self, _offset: u64, _len: u64) {
        self.forgot.fetch_add(1, Ordering::SeqCst);
    }
}

fn pool(cached: bool) -> (Arc<Pool2>, Arc<StaleCache>) {
    let store = Arc::new(MemStore::new());
    let dev = Arc::new(StaleCache {
        inner: MemDevice::new(DATA_START + (16 << 20)),
        cached,
        bad_media: AtomicBool::new(false),
        stale: AtomicU32::new(0),
        forgot: AtomicU32::new(0),
        media_reads: AtomicU32::new(0),
    });
    Pool2::format(&*store, &*dev).unwrap();
    let p = Pool2::open(store, dev.clone()).unwrap();
    p.create_volume("v", 4 << 20).unwrap();
    (p, dev)
}

fn pattern() -> Vec<u8> {
    (0..8192).map(|i| (i % 251) as u8).collect()
}

#[test]
fn a_stale_cached_copy_is_read_again_from_the_media() {
    let (p, dev) = pool(true);
    let id = p.volume_id("v").unwrap();
    p.write(id, 8192, &pattern(), false).unwrap();
    for aligned in [true, false] {
        dev.stale.store(1, Ordering::SeqCst);
        let (forgot, media) = (
            dev.forgot.load(Ordering::SeqCst),
            dev.media_reads.load(Ordering::SeqCst),
        );
        let mut out = snapblk_core::device::AlignedBuf::zeroed(8192);
        if aligned {
            // Whole blocks into an aligned buffer: the device reads straight into it.
            p.read(&Target::Volume(id), 8192, &mut out).unwrap();
        } else {
            // A sub-block read goes through read_blocks.
            p.read(&Target::Volume(id), 8192, &mut out[..8000]).unwrap();
            out[8000..].copy_from_slice(&pattern()[8000..]);
        }
        assert_eq!(&out[..], &pattern()[..], "aligned {aligned}");
        assert!(
            dev.forgot.load(Ordering::SeqCst) > forgot,
            "the stale copy was dropped"
        );
        assert!(
            dev.media_reads.load(Ordering::SeqCst) > media,
            "read from the media"
        );
    }
}

#[test]
fn without_such_a_cache_a_mismatch_is_an_error() {
    let (p, dev) = pool(false);
    let id = p.volume_id("v").unwrap();
    p.write(id, 8192, &pattern(), false).unwrap();
    dev.stale.store(1, Ordering::SeqCst);
    let mut out = snapblk_core::device::AlignedBuf::zeroed(8192);
    let r = p.read(&Target::Volume(id), 8192, &mut out);
    assert!(matches!(r, Err(Error::Checksum(_))), "{r:?}");
    assert_eq!(dev.media_reads.load(Ordering::SeqCst), 0);
}

#[test]
fn bad_media_behind_a_cache_is_still_an_error() {
    let (p, dev) = pool(true);
    let id = p.volume_id("v").unwrap();
    p.write(id, 8192, &pattern(), false).unwrap();
    dev.stale.store(1, Ordering::SeqCst);
    dev.bad_media.store(true, Ordering::SeqCst);
    let mut out = snapblk_core::device::AlignedBuf::zeroed(8192);
    let r = p.read(&Target::Volume(id), 8192, &mut out);
    assert!(matches!(r, Err(Error::Checksum(_))), "{r:?}");
    assert_eq!(dev.media_reads.load(Ordering::SeqCst), 1, "read again once");
    // A bulk read (a backup's) already reads the media: no second read.
    let r = snapblk_core::meta::bulk_reads(|| p.read(&Target::Volume(id), 8192, &mut out));
    assert!(matches!(r, Err(Error::Checksum(_))), "{r:?}");
    assert_eq!(dev.media_reads.load(Ordering::SeqCst), 2);
}
