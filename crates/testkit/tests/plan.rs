//! The split block I/O API (`Pool::plan_read`, `plan_write`, `finish_write`): the caller
//! does the data-device I/O itself, as a ublk queue task will on its own ring.

use std::io;
use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::{AlignedBuf, ReadSeg, WriteSeg, BLOCK_SIZE};
use snapblk_core::{Error, MemStore, Pool};

fn pool() -> Arc<Pool> {
    let store = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new((1 << 20) + (16 << 20)));
    Pool::format(&*store, &*dev).expect("format");
    let p = Pool::open(store, dev).expect("open");
    p.create_volume("v", 1 << 20).expect("volume");
    p
}

fn pattern(seed: u8, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed.wrapping_add((i / 7) as u8) | 1;
    }
    b
}

/// Writes through a plan, doing the device I/O here.
fn planned_write(p: &Pool, offset: u64, data: &[u8], fail: bool) -> snapblk_core::Result<()> {
    let vol = p.volume_id("v")?;
    let plan = p.plan_write(vol, offset, data, false)?;
    let io = if fail {
        Err(io::Error::from_raw_os_error(5))
    } else {
        p.device().write(&plan.device_writes(data), false)
    };
    p.finish_write(plan, io)
}

/// Reads through a plan, doing the device I/O here.
fn planned_read(p: &Pool, target: &str, offset: u64, len: usize) -> snapblk_core::Result<Vec<u8>> {
    let t = p.resolve_target(target)?;
    let plan = p.plan_read(&t, offset, len)?;
    let mut buf = AlignedBuf::zeroed(len);
    buf.fill(0xEE); // whatever the plan does not fill must show
    for z in &plan.zeros {
        buf[z.clone()].fill(0);
    }
    p.device()
        .read(&mut plan.device_reads(&mut buf))
        .map_err(|e| Error::device("read", e))?;
    plan.finish(&buf)?;
    Ok(buf.to_vec())
}

#[test]
fn planned_io_matches_the_pool_and_zeros_are_planned() {
    let p = pool();
    let b = BLOCK_SIZE;
    // Blocks 1 and 3 hold data, block 2 is written as zeros (a hole), 0 and 4 never written.
    let mut data = pattern(3, 3 * b);
    data[b..2 * b].fill(0);
    planned_write(&p, b as u64, &data, false).expect("planned write");
    let t = p.resolve_target("v").expect("target");
    let plan = p.plan_read(&t, 0, 5 * b).expect("plan");
    assert_eq!(plan.zeros, vec![0..b, 2 * b..3 * b, 4 * b..5 * b]);
    assert_eq!(plan.segs.len(), 2, "{:?}", plan.segs);
    drop(plan);
    let mut via_pool = vec![0u8; 5 * b];
    p.read(&t, 0, &mut via_pool).expect("read");
    assert_eq!(
        planned_read(&p, "v", 0, 5 * b).expect("planned read"),
        via_pool
    );
    assert_eq!(&via_pool[b..4 * b], &data[..]);
    // A snapshot reads the same through a plan; the volume moves on.
    p.create_snapshot("v", "s").expect("snapshot");
    planned_write(&p, 0, &pattern(9, 2 * b), false).expect("write after snapshot");
    assert_eq!(
        planned_read(&p, "v@s", 0, 5 * b).expect("snapshot read"),
        via_pool
    );
    assert_eq!(
        &planned_read(&p, "v", 0, 2 * b).expect("read")[..],
        &pattern(9, 2 * b)[..]
    );
    assert!(p.check().expect("check").is_clean());
}

#[test]
fn a_failed_planned_write_changes_nothing_and_leaks_nothing() {
    let p = pool();
    let b = BLOCK_SIZE;
    planned_write(&p, 0, &pattern(1, 4 * b), false).expect("write");
    p.sync().expect("sync");
    let used = p.info().used;
    let err = planned_write(&p, 0, &pattern(2, 4 * b), true).unwrap_err();
    assert_eq!(err.errno(), 5, "{err}");
    assert_eq!(
        &planned_read(&p, "v", 0, 4 * b).expect("read")[..],
        &pattern(1, 4 * b)[..]
    );
    p.sync().expect("sync");
    assert_eq!(
        p.info().used,
        used,
        "the failed write's blocks were not returned"
    );
    assert!(p.check().expect("check").is_clean());
}

#[test]
fn a_flipped_bit_fails_the_planned_read() {
    let p = pool();
    planned_write(&p, 0, &pattern(5, BLOCK_SIZE), false).expect("write");
    let t = p.resolve_target("v").expect("target");
    let off = p.block_location(&t, 0).expect("locate").expect("mapped");
    let mut blk = AlignedBuf::zeroed(BLOCK_SIZE);
    p.device()
        .read(&mut [ReadSeg {
            offset: off,
            buf: &mut blk,
        }])
        .expect("raw read");
    blk[100] ^= 1;
    p.device()
        .write(
            &[WriteSeg {
                offset: off,
                buf: &blk,
            }],
            true,
        )
        .expect("raw write");
    let err = planned_read(&p, "v", 0, BLOCK_SIZE).unwrap_err();
    assert!(matches!(err, Error::Checksum(_)), "{err}");
}

#[test]
fn plans_take_whole_blocks_only() {
    let p = pool();
    let t = p.resolve_target("v").expect("target");
    assert!(matches!(
        p.plan_read(&t, 512, BLOCK_SIZE),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        p.plan_read(&t, 0, 100),
        Err(Error::Invalid { .. })
    ));
    let vol = p.volume_id("v").expect("id");
    assert!(matches!(
        p.plan_write(vol, 0, &[1u8; 512], false),
        Err(Error::Invalid { .. })
    ));
}

/// A read plan held across syncs (as a ublk task holds one across its awaited I/O) blocks
/// nobody, not even a sync on the same thread, and the blocks it names are not reused
/// while it lives, however full the pool gets.
#[test]
fn a_read_plan_held_across_sync_keeps_its_blocks() {
    let p = pool();
    let b = BLOCK_SIZE;
    let old = pattern(7, b);
    planned_write(&p, 0, &old, false).expect("write");
    p.sync().expect("sync");
    let t = p.resolve_target("v").expect("target");
    let plan = p.plan_read(&t, 0, b).expect("plan");
    // Overwrite the block the plan names; its old block is freed (pending).
    p.write(p.volume_id("v").expect("id"), 0, &pattern(8, b), false)
        .expect("overwrite");
    p.sync().expect("a sync on the reader's own thread returns");
    assert!(
        p.info().pending_free >= b as u64,
        "the pinned block was returned to the allocator: {:?}",
        p.info()
    );
    // Fill the pool: allocation syncs when it runs out, and must still skip the block.
    p.create_volume("fill", 64 << 20).expect("volume");
    let fill = p.volume_id("fill").expect("id");
    let mut off = 0u64;
    let mut seed = 0u8;
    loop {
        seed = seed.wrapping_add(1);
        match p.write(fill, off, &pattern(seed, 256 * 1024), false) {
            Ok(()) => off += 256 * 1024,
            Err(Error::NoSpace { .. }) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let mut buf = AlignedBuf::zeroed(b);
    p.device()
        .read(&mut plan.device_reads(&mut buf))
        .expect("read");
    plan.finish(&buf)
        .expect("the pinned block kept its data (checksum)");
    assert_eq!(&buf[..], &old[..]);
    // Once the reader is done, the next sync returns the block.
    p.sync().expect("sync");
    assert_eq!(p.info().pending_free, 0, "{:?}", p.info());
    assert!(p.info().free >= b as u64);
    assert!(p.check().expect("check").is_clean());
}

/// A frontend that gives up on a planned write (drops it unfinished) leaks nothing.
#[test]
fn a_dropped_write_plan_returns_its_blocks() {
    let p = pool();
    let free = p.info().free;
    let vol = p.volume_id("v").expect("id");
    let plan = p
        .plan_write(vol, 0, &pattern(4, 8 * BLOCK_SIZE), false)
        .expect("plan");
    assert_eq!(p.info().free, free - 8 * BLOCK_SIZE as u64);
    drop(plan);
    assert_eq!(p.info().free, free, "the plan's blocks were not returned");
    assert_eq!(
        &planned_read(&p, "v", 0, BLOCK_SIZE).expect("read")[..],
        &[0u8; BLOCK_SIZE][..]
    );
    assert!(p.check().expect("check").is_clean());
}
