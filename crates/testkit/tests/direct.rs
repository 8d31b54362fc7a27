//! `Export::direct()` (the planned I/O a ublk queue does on its own ring): offered only
//! where the data device has a descriptor, validated exactly like `read`/`write`, refused
//! for writes on snapshots and read-only wrappers, and equivalent to the normal path.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::uring::{DataCache, UringFile};
use snapblk_core::device::{AlignedBuf, BLOCK_SIZE};
use snapblk_core::export::{Export, ReadOnly};
use snapblk_core::{Error, MemStore, Pool, VolumeHandle};

fn file_pool(dir: &tempfile::TempDir) -> Arc<Pool> {
    let path = dir.path().join("data");
    UringFile::create_file(&path, (1 << 20) + (32 << 20)).expect("create");
    // The daemon's default: reads through the page cache, writes O_DIRECT.
    let dev = Arc::new(UringFile::open_cached(&path, DataCache::Reads).expect("open"));
    let store = Arc::new(MemStore::new());
    Pool::format(&*store, &*dev).expect("format");
    let p = Pool::open(store, dev).expect("open pool");
    p.create_volume("v", 8 << 20).expect("volume");
    p
}

/// The data device, opened again through the descriptor the export hands out (a ublk
/// queue submits io_uring reads and writes on that descriptor itself).
fn device_file(fd: i32) -> std::fs::File {
    std::fs::File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .expect("reopen the data device")
}

/// Writes `data` at `offset` through the planned path, doing the device I/O here.
fn direct_write(e: &dyn Export, offset: u64, data: &[u8]) -> snapblk_core::Result<()> {
    let d = e.direct().expect("direct I/O offered");
    let plan = d.plan_write(offset, data, false)?;
    let f = device_file(d.data_fd());
    let io = plan
        .segs
        .iter()
        .try_for_each(|s| f.write_all_at(&data[s.buf_offset..s.buf_offset + s.len], s.dev_offset));
    d.finish_write(plan, io)
}

fn direct_read(e: &dyn Export, offset: u64, len: usize) -> snapblk_core::Result<Vec<u8>> {
    let d = e.direct().expect("direct I/O offered");
    let plan = d.plan_read(offset, len)?;
    let mut buf = AlignedBuf::zeroed(len);
    buf.fill(0xEE);
    for z in &plan.zeros {
        buf[z.clone()].fill(0);
    }
    let f = device_file(d.data_read_fd());
    for s in &plan.segs {
        f.read_exact_at(&mut buf[s.buf_offset..s.buf_offset + s.len], s.dev_offset)
            .expect("read");
    }
    d.finish_read(plan, &mut buf)?;
    Ok(buf.to_vec())
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 5) as u8) | 1)
        .collect()
}

#[test]
fn planned_io_through_a_volume_handle_matches_the_normal_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = file_pool(&dir);
    let h = VolumeHandle::open(&p, "v").expect("handle");
    let b = BLOCK_SIZE;
    let data = pattern(3, 4 * b);
    direct_write(&h, 2 * b as u64, &data).expect("direct write");
    let mut normal = vec![0u8; 6 * b];
    h.read(0, &mut normal).expect("read");
    assert_eq!(&normal[2 * b..], &data[..]);
    assert!(normal[..2 * b].iter().all(|&x| x == 0));
    h.write(0, &pattern(9, b), false).expect("normal write");
    let via_plan = direct_read(&h, 0, 6 * b).expect("direct read");
    assert_eq!(&via_plan[..b], &pattern(9, b)[..]);
    assert_eq!(&via_plan[2 * b..], &data[..]);
    assert!(p.check().expect("check").is_clean());
}

#[test]
fn planned_io_is_validated_like_read_and_write() {
    let dir = tempfile::tempdir().unwrap();
    let p = file_pool(&dir);
    let h = VolumeHandle::open(&p, "v").expect("handle");
    let d = h.direct().expect("direct");
    let size = 8u64 << 20;
    assert!(matches!(
        d.plan_read(size, BLOCK_SIZE),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        d.plan_write(size - BLOCK_SIZE as u64, &[1u8; 2 * BLOCK_SIZE], false),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        d.plan_read(0, 33 << 20),
        Err(Error::Invalid { .. }) | Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        d.plan_read(512, BLOCK_SIZE),
        Err(Error::Invalid { .. })
    ));
    // A failed validation allocated nothing.
    p.sync().expect("sync");
    assert_eq!(p.info().used, 0);
}

#[test]
fn snapshots_and_read_only_wrappers_read_directly_and_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = file_pool(&dir);
    let h: Arc<dyn Export> = Arc::new(VolumeHandle::open(&p, "v").expect("handle"));
    direct_write(&*h, 0, &pattern(5, BLOCK_SIZE)).expect("write");
    p.create_snapshot("v", "s").expect("snapshot");
    let snap = VolumeHandle::open(&p, "v@s").expect("snapshot handle");
    let ro = ReadOnly(Arc::clone(&h));
    for e in [&snap as &dyn Export, &ro] {
        assert_eq!(
            direct_read(e, 0, BLOCK_SIZE).expect("read"),
            pattern(5, BLOCK_SIZE)
        );
        let d = e.direct().expect("direct");
        assert!(matches!(
            d.plan_write(0, &[7u8; BLOCK_SIZE], false),
            Err(Error::ReadOnly(_))
        ));
    }
}

#[test]
fn devices_without_a_descriptor_offer_no_direct_io() {
    let store = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new((1 << 20) + (4 << 20)));
    Pool::format(&*store, &*dev).expect("format");
    let p = Pool::open(store, dev).expect("open");
    p.create_volume("v", 1 << 20).expect("volume");
    let h = VolumeHandle::open(&p, "v").expect("handle");
    assert!(h.direct().is_none());
    assert!(ReadOnly(Arc::new(h)).direct().is_none());
}
