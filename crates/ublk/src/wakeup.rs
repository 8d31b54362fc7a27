//! A result that another thread hands to a queue task: the other thread stores it and
//! writes an eventfd; the task awaits a read of that eventfd on the queue's own io_uring,
//! so the queue's other tags go on meanwhile. Used for requests run on the queue's helper
//! thread (offload.rs) and for direct writes, whose metadata commit completes on the
//! pool's committer thread (`DirectIo::finish_write_then`).
//!
//! Invariants: the result is stored before the eventfd is written, so the task finds it
//! after its CQE. The 8-byte buffer the kernel reads the eventfd into is owned by the
//! awaiting task and freed only after that CQE; if the task is dropped first (the queue's
//! event loop failed), the buffer is leaked instead (`ManuallyDrop`).
//!
//! Threading: `complete` may run on any thread and never blocks (an eventfd write below
//! the counter's maximum); `wait` runs on the queue thread.

use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use io_uring::{opcode, types};
use libublk::io::UblkQueue;

pub(crate) struct Wakeup<T> {
    result: Mutex<Option<T>>,
    /// The eventfd, written once the result is stored.
    event: File,
}

impl<T> Wakeup<T> {
    /// A new wakeup, or `None` if no eventfd could be made (the caller then waits some
    /// other way).
    pub(crate) fn new() -> Option<Arc<Self>> {
        // SAFETY: eventfd(2) takes no pointers; a non-negative return is a new descriptor
        // that we own from here on (File closes it).
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        Some(Arc::new(Wakeup {
            result: Mutex::new(None),
            // SAFETY: `fd` is a freshly created descriptor owned by nobody else.
            event: unsafe { File::from_raw_fd(fd) },
        }))
    }

    /// Stores the result and wakes the waiting task.
    pub(crate) fn complete(&self, r: T) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        if let Err(e) = (&self.event).write_all(&1u64.to_ne_bytes()) {
            // Cannot happen for an eventfd below its maximum; the task would wait
            // forever, so make it loud.
            log::error!("ublk: waking a queue task: {e}");
        }
    }

    #[cfg(test)]
    pub(crate) fn event_fd(&self) -> &File {
        &self.event
    }

    pub(crate) fn take(&self) -> Option<T> {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Awaits the result on the queue's ring (`None` only if the counter was read and no
    /// result was stored: not expected). If the eventfd cannot be read, polls for the
    /// result on this thread instead (blocking the queue until it comes).
    pub(crate) async fn wait(&self, q: &UblkQueue<'_>) -> Option<T> {
        let mut counter = ManuallyDrop::new(Box::new([0u8; 8]));
        loop {
            let sqe = opcode::Read::new(
                types::Fd(self.event.as_raw_fd()),
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
                // Cannot wait on the ring: wait for the result here instead.
                log::warn!("ublk: reading a queue task's eventfd: error {r}");
                drop(ManuallyDrop::into_inner(counter));
                loop {
                    if let Some(v) = self.take() {
                        return Some(v);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            break;
        }
        drop(ManuallyDrop::into_inner(counter));
        self.take()
    }
}
