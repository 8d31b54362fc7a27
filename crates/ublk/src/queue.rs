//! One ublk queue: one thread, one io_uring and one async task per tag, as libublk intends.
//!
//! Each tag's task fetches a request, serves it, commits the result (which fetches the
//! next request) and so on until the queue goes down. Whole-block reads and writes of an
//! export that offers [`DirectIo`] are planned in the pool, and their data-device I/O is
//! submitted on this queue's own io_uring (the ring that carries the ublk commands): no
//! thread hop, and while one task awaits its data, or its write's metadata commit (woken
//! by the committer through an eventfd on this ring), the other tags' tasks go on. FLUSH,
//! DISCARD and WRITE_ZEROES, which can block for long, run on the queue's helper thread
//! while the task awaits them on the ring (offload.rs). The rest (requests not aligned to
//! 4 KiB, exports without direct I/O such as lazy restores) runs synchronously through the
//! `Export` API on this thread (`request::execute`).
//!
//! Threading: everything here runs on the queue thread; tasks are `!Send`. What a task
//! holds across an `.await` never blocks another task: a read plan holds a pin, not a lock
//! (snapblk-core `pool/pins.rs`), and a write plan holds only blocks nobody else sees (a
//! write awaiting its commit holds nothing: the committer settles its blocks).
//! Rare steps block the queue thread: a read whose page-cache copy fails its checksum is
//! read again from the device synchronously (`DirectIo::finish_read`); a write whose
//! eventfd cannot be made commits synchronously (`finish_write`); and the mapping lookup
//! of a read runs inline (µs).
//!
//! Invariants: every request is completed exactly once. A task never returns while an SQE
//! it submitted is in flight (data, or the eventfd read of wakeup.rs; it awaits every one,
//! also after errors). Should the executor be dropped with tasks still pending (the event
//! loop failed), their I/O buffers are leaked rather than freed under the kernel's feet
//! (`ManuallyDrop`), and so is the export of a write awaiting its commit (`KeepAlive`).

use std::mem::ManuallyDrop;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError};
use smol::future::FutureExt;
use snapblk_core::device::BLOCK_SIZE_U64;
use snapblk_core::export::{DirectIo, IoKind};
use snapblk_core::pool::plan::DeviceSeg;
use snapblk_core::Export;

use crate::offload::Offload;
use crate::request::execute;
use crate::wakeup::Wakeup;
use crate::IoStats;

pub(crate) fn queue_main(qid: u16, dev: &UblkDev, export: &Arc<dyn Export>, stats: &Arc<IoStats>) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("ublk queue {qid}: cannot set up the queue: {e}");
            // Without this the device's start would wait forever for this queue's buffers;
            // reported as an mlock failure, it makes the start (and the attach) fail now.
            dev.notify_buffer_registration_complete(true);
            return;
        }
    };
    let buf_bytes = dev.dev_info.max_io_buf_bytes as usize;
    let offload = Rc::new(Offload::start(qid));
    let exe = smol::LocalExecutor::new();
    let tasks: Vec<_> = queue
        .tags()
        .map(|tag| {
            let q = Rc::clone(&queue);
            let export = Arc::clone(export);
            let stats = Arc::clone(stats);
            let offload = Rc::clone(&offload);
            exe.spawn(async move {
                let mut buf = ManuallyDrop::new(IoBuf::<u8>::new(buf_bytes));
                let ctx = Ctx {
                    export: &export,
                    stats: &stats,
                    offload: &offload,
                };
                match serve_tag(&q, tag, &ctx, &mut buf).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => log::error!("ublk queue {qid} tag {tag}: {e}"),
                }
                // serve_tag has returned, so none of its SQEs is in flight: free the buffer.
                drop(ManuallyDrop::into_inner(buf));
            })
        })
        .collect();
    smol::block_on(exe.run(async {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&queue, Some(20), run_ops, done).await {
            log::error!("ublk queue {qid}: {e}");
        }
    }));
}

/// What every task of a queue shares.
struct Ctx<'a> {
    export: &'a Arc<dyn Export>,
    stats: &'a IoStats,
    offload: &'a Offload,
}

async fn serve_tag(
    q: &UblkQueue<'_>,
    tag: u16,
    ctx: &Ctx<'_>,
    buf: &mut IoBuf<u8>,
) -> Result<(), UblkError> {
    let mut fetched = q
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(buf))
        .await?;
    loop {
        // Anything but OK is the kernel refusing our command: the descriptor is stale, so
        // serving it again would repeat the previous request. End this tag.
        if fetched != sys::UBLK_IO_RES_OK as i32 {
            log::error!("ublk tag {tag}: the kernel answered {fetched} to fetch/commit");
            return Err(UblkError::OtherError(fetched));
        }
        let iod = q.get_iod(tag);
        let (op_flags, sector, sectors) = (iod.op_flags, iod.start_sector, iod.nr_sectors);
        let arrived = std::time::Instant::now();
        let request = serve(q, ctx, op_flags, sector, sectors, buf.as_mut_slice());
        // A bug that panics fails this request with EIO instead of leaving it uncompleted
        // (the device could then never be deleted). The buffer outlives the panic.
        let (direct, res) = match AssertUnwindSafe(request).catch_unwind().await {
            Ok(r) => r,
            Err(_) => {
                log::error!(
                    "ublk tag {tag}: panic while serving op {op_flags:#x}; failed with EIO"
                );
                (false, -libc::EIO)
            }
        };
        ctx.stats.count(direct, res);
        if let (Some(m), Some(kind)) = (ctx.export.meter(), io_kind(op_flags)) {
            let bytes = match kind {
                IoKind::Flush => 0,
                _ => u64::from(sectors) * 512,
            };
            m.record(kind, bytes, arrived.elapsed(), res >= 0);
        }
        fetched = q
            .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// What a request is, for the export's meter (`None`: an op we do not serve).
fn io_kind(op_flags: u32) -> Option<IoKind> {
    match op_flags & 0xff {
        sys::UBLK_IO_OP_READ => Some(IoKind::Read),
        sys::UBLK_IO_OP_WRITE => Some(IoKind::Write),
        sys::UBLK_IO_OP_FLUSH => Some(IoKind::Flush),
        sys::UBLK_IO_OP_DISCARD => Some(IoKind::Trim),
        sys::UBLK_IO_OP_WRITE_ZEROES => Some(IoKind::WriteZeroes),
        _ => None,
    }
}

/// A read or write that can take the direct path: whole blocks that fit the buffer.
fn direct_range(op: u32, sector: u64, sectors: u32, buf_len: usize) -> Option<(u64, usize)> {
    if op != sys::UBLK_IO_OP_READ && op != sys::UBLK_IO_OP_WRITE {
        return None;
    }
    let off = sector.checked_mul(512)?;
    let len = usize::try_from(u64::from(sectors) * 512).ok()?;
    let whole = off.is_multiple_of(BLOCK_SIZE_U64) && (len as u64).is_multiple_of(BLOCK_SIZE_U64);
    (whole && len > 0 && len <= buf_len).then_some((off, len))
}

/// Serves one request; returns whether it took the direct path, and bytes done or a
/// negative errno.
async fn serve(
    q: &UblkQueue<'_>,
    ctx: &Ctx<'_>,
    op_flags: u32,
    sector: u64,
    sectors: u32,
    buf: &mut [u8],
) -> (bool, i32) {
    let op = op_flags & 0xff;
    let export = &**ctx.export;
    if matches!(
        op,
        sys::UBLK_IO_OP_FLUSH | sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES
    ) {
        let res = ctx
            .offload
            .run(q, ctx.export, op_flags, sector, sectors, Vec::new())
            .await;
        return (false, res);
    }
    let direct = export
        .direct()
        .and_then(|d| direct_range(op, sector, sectors, buf.len()).map(|r| (d, r)));
    let Some((d, (off, len))) = direct else {
        return (false, execute(export, op_flags, sector, sectors, buf));
    };
    let buf = &mut buf[..len];
    let r = if op == sys::UBLK_IO_OP_READ {
        direct_read(q, d, off, buf).await
    } else {
        let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
        direct_write(q, ctx.export, d, off, buf, fua).await
    };
    let res = match r {
        Ok(()) => len as i32,
        Err(snapblk_core::Error::NoSpace { .. }) if op == sys::UBLK_IO_OP_WRITE => {
            // The pool is full: the write waits for the space guard on the helper thread,
            // not here (this thread's reads hold pins that keep freed blocks from returning).
            let data = buf.to_vec();
            let res = ctx
                .offload
                .run(q, ctx.export, op_flags, sector, sectors, data)
                .await;
            return (false, res);
        }
        Err(e) => {
            log::warn!("ublk {}: op {op} at {off}+{len}: {e}", export.name());
            -e.errno()
        }
    };
    (true, res)
}

async fn direct_read(
    q: &UblkQueue<'_>,
    d: &dyn DirectIo,
    off: u64,
    buf: &mut [u8],
) -> snapblk_core::Result<()> {
    let plan = d.plan_read(off, buf.len())?;
    for z in &plan.zeros {
        if let Some(b) = buf.get_mut(z.clone()) {
            b.fill(0);
        }
    }
    transfer(q, d.data_read_fd(), buf, &plan.segs, Dir::Read)
        .await
        .map_err(|e| snapblk_core::Error::device("read", e))?;
    d.finish_read(plan, buf)
}

async fn direct_write(
    q: &UblkQueue<'_>,
    export: &Arc<dyn Export>,
    d: &dyn DirectIo,
    off: u64,
    buf: &mut [u8],
    fua: bool,
) -> snapblk_core::Result<()> {
    let plan = d.plan_write(off, buf, fua)?;
    let io = transfer(q, d.data_fd(), buf, &plan.segs, Dir::Write { fua }).await;
    // The commit completes on the pool's committer thread; the other tags go on meanwhile
    // (and their writes may join this one's group).
    let Some(done) = Wakeup::new() else {
        return d.finish_write(plan, io);
    };
    let answer = Answer(Some(Arc::clone(&done)));
    // Should this future be dropped before the answer (the queue's event loop failed),
    // the export is kept alive for good rather than possibly left for the committer to
    // drop last, on its own thread.
    let keep = KeepAlive(Some(Arc::clone(export)));
    d.finish_write_then(plan, io, Box::new(move |r| answer.give(r)));
    let r = done.wait(q).await;
    keep.release();
    r.unwrap_or_else(|| {
        Err(snapblk_core::Error::device(
            "write",
            std::io::Error::other("commit result lost"),
        ))
    })
}

/// A direct write's answer: given once with the commit's outcome, or, if the callback
/// holding it is dropped uncalled (a committer that panicked or stopped), as an error,
/// so the tag never waits forever.
struct Answer(Option<Arc<Wakeup<snapblk_core::Result<()>>>>);

impl Answer {
    fn give(mut self, r: snapblk_core::Result<()>) {
        if let Some(w) = self.0.take() {
            w.complete(r);
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.complete(Err(snapblk_core::Error::Busy(
                "the write's commit was abandoned".into(),
            )));
        }
    }
}

/// Holds an export across an await; forgets it (a leak) if dropped before `release`.
struct KeepAlive(Option<Arc<dyn Export>>);

impl KeepAlive {
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        if let Some(e) = self.0.take() {
            std::mem::forget(e);
        }
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write { fua: bool },
}

/// Moves every segment completely on the queue's ring (see transfer.rs).
async fn transfer(
    q: &UblkQueue<'_>,
    fd: i32,
    buf: &mut [u8],
    segs: &[DeviceSeg],
    dir: Dir,
) -> std::io::Result<()> {
    let len = buf.len();
    let base = buf.as_mut_ptr();
    let submit = |s: DeviceSeg| {
        assert!(
            s.buf_offset
                .checked_add(s.len)
                .is_some_and(|end| end <= len),
            "segment outside the request buffer"
        );
        // SAFETY: the segment lies inside `0..len` (asserted above; `transfer::run` checks
        // every segment before submitting any, so this never fires mid-round), so the
        // pointer stays inside `buf`. `buf` stays mutably borrowed by this function until
        // `run` returns, and `run` awaits every future it created first, so the kernel is
        // done with the memory before anyone else can touch it.
        let ptr = unsafe { base.add(s.buf_offset) };
        let n = s.len as u32; // run checks that every length fits in u32
        let sqe = match dir {
            Dir::Read => opcode::Read::new(types::Fd(fd), ptr, n)
                .offset(s.dev_offset)
                .build(),
            Dir::Write { fua } => {
                let w = opcode::Write::new(types::Fd(fd), ptr, n).offset(s.dev_offset);
                if fua { w.rw_flags(libc::RWF_DSYNC) } else { w }.build()
            }
        };
        q.ublk_submit_sqe(sqe)
    };
    crate::transfer::run(len, segs, submit).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_block_reads_and_writes_go_direct() {
        let r = sys::UBLK_IO_OP_READ;
        let w = sys::UBLK_IO_OP_WRITE;
        assert_eq!(direct_range(r, 8, 8, 1 << 20), Some((4096, 4096)));
        assert_eq!(direct_range(w, 0, 2048, 1 << 20), Some((0, 1 << 20)));
        // Not 4 KiB aligned, empty, larger than the buffer, other ops, offset overflow.
        assert_eq!(direct_range(r, 1, 8, 1 << 20), None);
        assert_eq!(direct_range(w, 8, 1, 1 << 20), None);
        assert_eq!(direct_range(r, 8, 0, 1 << 20), None);
        assert_eq!(direct_range(r, 0, 4096, 1 << 20), None);
        assert_eq!(direct_range(sys::UBLK_IO_OP_FLUSH, 0, 8, 1 << 20), None);
        assert_eq!(direct_range(sys::UBLK_IO_OP_DISCARD, 0, 8, 1 << 20), None);
        assert_eq!(direct_range(r, u64::MAX / 256, 8, 1 << 20), None);
    }

    /// A direct write's answer is given once: with the outcome, or as an error when the
    /// callback holding it is dropped uncalled; either way the eventfd is written.
    #[test]
    fn a_write_answer_is_given_once_even_if_dropped() {
        use std::io::Read;
        use std::os::fd::{AsRawFd, FromRawFd};
        let counter = |w: &Wakeup<snapblk_core::Result<()>>| {
            // SAFETY: dup(2) of a descriptor `w` owns; the new one is ours (File closes it).
            let fd = unsafe { libc::dup(w.event_fd().as_raw_fd()) };
            assert!(fd >= 0);
            // SAFETY: `fd` was just created and is owned by nobody else.
            let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
            let mut b = [0u8; 8];
            f.read_exact(&mut b).expect("eventfd read");
            u64::from_ne_bytes(b)
        };
        let given = Wakeup::new().expect("eventfd");
        Answer(Some(Arc::clone(&given))).give(Ok(()));
        assert_eq!(counter(&given), 1);
        assert!(matches!(given.take(), Some(Ok(()))));
        let dropped = Wakeup::new().expect("eventfd");
        let answer = Answer(Some(Arc::clone(&dropped)));
        let then: Box<dyn FnOnce(snapblk_core::Result<()>) + Send> =
            Box::new(move |r| answer.give(r));
        drop(then);
        assert_eq!(counter(&dropped), 1);
        assert!(matches!(dropped.take(), Some(Err(_))));
    }
}
