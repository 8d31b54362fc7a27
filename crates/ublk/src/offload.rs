//! Requests that can block for long run on a helper thread per queue, so that the queue's
//! other tags go on meanwhile: FLUSH (an `fdatasync` of the data device and a sync of the
//! metadata store, milliseconds on a disk) and DISCARD / WRITE_ZEROES (up to 1 GiB of
//! mapping changes each), which carry no data; and a WRITE the direct path found the pool
//! full for, with a copy of its data: it waits there for the space guard to free blocks
//! (the queue thread must not wait: its reads' pins would keep freed blocks from
//! returning). The task awaits a read of an eventfd on the queue's own io_uring; the helper
//! stores the result and writes the eventfd.
//!
//! Invariants: a job's result is stored before its eventfd is written, so the task reads
//! it after its CQE. The 8-byte buffer the kernel reads the eventfd into is owned by the
//! awaiting task and freed only after that CQE; if the task is dropped first (the queue's
//! event loop failed), the buffer is leaked instead (`ManuallyDrop`). If the helper cannot
//! take a job (it failed to start or ended), the request runs on the queue thread.
//!
//! Threading: one helper per queue, ending when the queue's `Offload` is dropped (after
//! the queue's tasks have finished).

use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types};
use libublk::io::UblkQueue;
use snapblk_core::Export;

use crate::request::execute;

struct Job {
    export: Arc<dyn Export>,
    op_flags: u32,
    sector: u64,
    sectors: u32,
    /// A WRITE's data (empty for the others).
    data: Vec<u8>,
    done: Arc<Done>,
}

struct Done {
    result: Mutex<Option<i32>>,
    /// The eventfd; the helper writes it once the result is stored.
    event: File,
}

pub(crate) struct Offload {
    tx: Option<mpsc::Sender<Job>>,
    helper: Option<JoinHandle<()>>,
}

impl Offload {
    pub(crate) fn start(qid: u16) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let helper = std::thread::Builder::new()
            .name(format!("ublk-q{qid}-sync"))
            .spawn(move || {
                for mut job in rx {
                    let r = execute(
                        &*job.export,
                        job.op_flags,
                        job.sector,
                        job.sectors,
                        &mut job.data,
                    );
                    *job.done.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                    if let Err(e) = (&job.done.event).write_all(&1u64.to_ne_bytes()) {
                        // Cannot happen for an eventfd below its maximum; the task would
                        // wait forever, so make it loud.
                        log::error!("ublk: waking a queue task: {e}");
                    }
                }
            });
        match helper {
            Ok(h) => Offload {
                tx: Some(tx),
                helper: Some(h),
            },
            Err(e) => {
                log::warn!("ublk queue {qid}: no helper thread ({e}); slow requests run inline");
                Offload {
                    tx: None,
                    helper: None,
                }
            }
        }
    }

    /// Runs a request on the helper and awaits it (`data`: a WRITE's, else empty);
    /// returns what `execute` returns.
    pub(crate) async fn run(
        &self,
        q: &UblkQueue<'_>,
        export: &Arc<dyn Export>,
        op_flags: u32,
        sector: u64,
        sectors: u32,
        mut data: Vec<u8>,
    ) -> i32 {
        let inline = |data: &mut Vec<u8>| execute(&**export, op_flags, sector, sectors, data);
        let Some(tx) = &self.tx else {
            return inline(&mut data);
        };
        // SAFETY: eventfd(2) takes no pointers; a non-negative return is a new descriptor
        // that we own from here on (File closes it).
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return inline(&mut data);
        }
        // SAFETY: `fd` is a freshly created descriptor owned by nobody else.
        let event = unsafe { File::from_raw_fd(fd) };
        let done = Arc::new(Done {
            result: Mutex::new(None),
            event,
        });
        let job = Job {
            export: Arc::clone(export),
            op_flags,
            sector,
            sectors,
            data,
            done: Arc::clone(&done),
        };
        if let Err(mpsc::SendError(mut job)) = tx.send(job) {
            return inline(&mut job.data);
        }
        let mut counter = ManuallyDrop::new(Box::new([0u8; 8]));
        loop {
            let sqe = opcode::Read::new(
                types::Fd(done.event.as_raw_fd()),
                counter.as_mut_ptr(),
                counter.len() as u32,
            )
            .build();
            // The kernel writes `counter` until this completes; it is freed only below.
            let r = q.ublk_submit_sqe(sqe).await;
            if r == -libc::EINTR || r == -libc::EAGAIN {
                continue;
            }
            if r < 0 {
                // Cannot wait on the ring: wait for the helper's result here instead.
                log::warn!("ublk: reading a queue task's eventfd: error {r}");
                while done
                    .result
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_none()
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            break;
        }
        drop(ManuallyDrop::into_inner(counter));
        let r = *done.result.lock().unwrap_or_else(|p| p.into_inner());
        r.unwrap_or(-libc::EIO)
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.helper.take() {
            let _ = h.join();
        }
    }
}
