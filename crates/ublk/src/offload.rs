//! Requests that can block for long run on a helper thread per queue, so that the queue's
//! other tags go on meanwhile: FLUSH (an `fdatasync` of the data device and a sync of the
//! metadata store, milliseconds on a disk) and DISCARD / WRITE_ZEROES (up to 1 GiB of
//! mapping changes each), which carry no data; and a WRITE the direct path found the pool
//! full for, with a copy of its data: it waits there for the space guard to free blocks
//! (the queue thread must not wait: its reads' pins would keep freed blocks from
//! returning). The task awaits the helper's result through a [`Wakeup`] (an eventfd read
//! on the queue's own io_uring). If the helper cannot take a job (it failed to start or
//! ended), the request runs on the queue thread.
//!
//! Threading: one helper per queue, ending when the queue's `Offload` is dropped (after
//! the queue's tasks have finished).

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use libublk::io::UblkQueue;
use snapblk_core::Export;

use crate::request::execute;
use crate::wakeup::Wakeup;

struct Job {
    export: Arc<dyn Export>,
    op_flags: u32,
    sector: u64,
    sectors: u32,
    /// A WRITE's data (empty for the others).
    data: Vec<u8>,
    done: Arc<Wakeup<i32>>,
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
                    job.done.complete(r);
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
        let Some(done) = Wakeup::new() else {
            return inline(&mut data);
        };
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
        done.wait(q).await.unwrap_or(-libc::EIO)
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
