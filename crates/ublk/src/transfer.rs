//! Moving a request's data-device segments completely, whatever the device returns: short
//! transfers continue where they stopped, EAGAIN/EINTR are resubmitted, the first error
//! wins. How one piece is submitted is the caller's (queue.rs pushes an SQE onto the ublk
//! queue's ring), so this logic is tested without a kernel.
//!
//! Invariants the submitter relies on: `submit` is only called with segments inside
//! `0..buf_len` whose length fits in u32 (all checked before anything is submitted); every
//! future `submit` returned has been awaited when `run` returns, also after an error.

use std::collections::VecDeque;
use std::future::Future;
use std::io;

use snapblk_core::pool::plan::DeviceSeg;

/// Submissions of one piece (the first included) before a transfer that keeps coming back
/// short or interrupted counts as failed.
pub(crate) const ATTEMPTS: usize = 8;
/// Most segments of one request in flight at once: bounds what a fragmented request puts on
/// the queue's ring (its completion queue is sized for depth × (1 + WINDOW)).
pub(crate) const WINDOW: usize = 32;

/// Submits the segments in rounds of at most [`WINDOW`] (all of a round before awaiting
/// any) and awaits them; `submit` returns bytes moved or a negative errno.
pub(crate) async fn run<F, Fut>(buf_len: usize, segs: &[DeviceSeg], mut submit: F) -> io::Result<()>
where
    F: FnMut(DeviceSeg) -> Fut,
    Fut: Future<Output = i32>,
{
    let bad = segs.iter().any(|s| {
        u32::try_from(s.len).is_err()
            || s.buf_offset
                .checked_add(s.len)
                .is_none_or(|end| end > buf_len)
    });
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "data segment outside the request buffer",
        ));
    }
    // Each piece with the number of times it has been submitted.
    let mut queue: VecDeque<(DeviceSeg, usize)> =
        segs.iter().filter(|s| s.len > 0).map(|s| (*s, 0)).collect();
    while !queue.is_empty() {
        let round: Vec<(DeviceSeg, usize)> = queue.drain(..queue.len().min(WINDOW)).collect();
        let futures: Vec<Fut> = round.iter().map(|(s, _)| submit(*s)).collect();
        let mut failed = None;
        for ((s, tries), f) in round.into_iter().zip(futures) {
            let r = f.await;
            let rest = if r == -libc::EAGAIN || r == -libc::EINTR {
                Some(s)
            } else if r < 0 {
                failed.get_or_insert(io::Error::from_raw_os_error(-r));
                None
            } else if r == 0 {
                failed.get_or_insert(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the data device ended at byte {}", s.dev_offset),
                ));
                None
            } else if (r as usize) < s.len {
                let done = r as usize;
                Some(DeviceSeg {
                    dev_offset: s.dev_offset + done as u64,
                    buf_offset: s.buf_offset + done,
                    len: s.len - done,
                })
            } else {
                None
            };
            if let Some(rest) = rest {
                if tries + 1 >= ATTEMPTS {
                    failed.get_or_insert(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("data transfer still incomplete after {ATTEMPTS} submissions"),
                    ));
                } else {
                    queue.push_back((rest, tries + 1));
                }
            }
        }
        // Every future of the round has been awaited: nothing of ours is in flight.
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    fn seg(dev_offset: u64, buf_offset: usize, len: usize) -> DeviceSeg {
        DeviceSeg {
            dev_offset,
            buf_offset,
            len,
        }
    }

    struct Sim {
        result: io::Result<()>,
        submitted: Vec<DeviceSeg>,
        awaited: usize,
        max_in_flight: usize,
    }

    /// Runs a transfer whose submissions answer from `answers` (full length when empty).
    fn sim(buf_len: usize, segs: &[DeviceSeg], answers: Vec<i32>) -> Sim {
        let answers = RefCell::new(VecDeque::from(answers));
        let submitted = RefCell::new(Vec::new());
        let (awaited, in_flight, max) = (Cell::new(0), Cell::new(0usize), Cell::new(0));
        let result = smol::block_on(run(buf_len, segs, |s| {
            submitted.borrow_mut().push(s);
            in_flight.set(in_flight.get() + 1);
            max.set(max.get().max(in_flight.get()));
            let a = answers.borrow_mut().pop_front().unwrap_or(s.len as i32);
            let (awaited, in_flight) = (&awaited, &in_flight);
            async move {
                awaited.set(awaited.get() + 1);
                in_flight.set(in_flight.get() - 1);
                a
            }
        }));
        Sim {
            result,
            submitted: submitted.into_inner(),
            awaited: awaited.get(),
            max_in_flight: max.get(),
        }
    }

    fn simulate(
        buf_len: usize,
        segs: &[DeviceSeg],
        answers: Vec<i32>,
    ) -> (io::Result<()>, Vec<DeviceSeg>, usize) {
        let s = sim(buf_len, segs, answers);
        (s.result, s.submitted, s.awaited)
    }

    #[test]
    fn everything_moves_in_one_round() {
        let segs = [seg(4096, 0, 8192), seg(65536, 8192, 4096)];
        let (r, sub, awaited) = simulate(12288, &segs, vec![]);
        r.unwrap();
        assert_eq!(sub, segs);
        assert_eq!(awaited, 2);
    }

    #[test]
    fn a_short_transfer_continues_where_it_stopped() {
        let segs = [seg(4096, 0, 8192), seg(65536, 8192, 4096)];
        let (r, sub, _) = simulate(12288, &segs, vec![4096, 4096]);
        r.unwrap();
        assert_eq!(sub[2], seg(8192, 4096, 4096), "{sub:?}");
        assert_eq!(sub.len(), 3);
    }

    #[test]
    fn eagain_and_eintr_are_resubmitted() {
        let segs = [seg(0, 0, 4096)];
        let (r, sub, _) = simulate(4096, &segs, vec![-libc::EAGAIN, -libc::EINTR]);
        r.unwrap();
        assert_eq!(sub, vec![segs[0]; 3]);
    }

    #[test]
    fn an_error_fails_after_every_future_was_awaited() {
        let segs = [
            seg(0, 0, 4096),
            seg(8192, 4096, 4096),
            seg(16384, 8192, 4096),
        ];
        let (r, sub, awaited) = simulate(12288, &segs, vec![4096, -libc::EIO, -libc::ENOSPC]);
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(sub.len(), 3);
        assert_eq!(awaited, 3, "a future was left in flight");
    }

    #[test]
    fn end_of_device_is_an_error() {
        let (r, _, _) = simulate(4096, &[seg(0, 0, 4096)], vec![0]);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_transfer_that_never_finishes_gives_up() {
        let (r, sub, _) = simulate(4096, &[seg(0, 0, 4096)], vec![-libc::EAGAIN; 100]);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(sub.len(), ATTEMPTS);
    }

    #[test]
    fn segments_outside_the_buffer_submit_nothing() {
        for s in [seg(0, 4096, 4096), seg(0, usize::MAX, 2), seg(0, 0, 8192)] {
            let (r, sub, _) = simulate(4096, &[seg(0, 0, 4096), s], vec![]);
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
            assert!(sub.is_empty());
        }
    }

    #[test]
    fn a_fragmented_request_keeps_at_most_a_window_in_flight() {
        let segs: Vec<DeviceSeg> = (0..100)
            .map(|i| seg(i as u64 * 8192, i * 4096, 4096))
            .collect();
        let mut answers = vec![4096; 100];
        answers[50] = 2048; // one short piece comes back at the end
        let s = sim(100 * 4096, &segs, answers);
        s.result.unwrap();
        assert_eq!(s.max_in_flight, WINDOW);
        assert_eq!(s.submitted.len(), 101);
        assert_eq!(
            s.submitted[100],
            seg(50 * 8192 + 2048, 50 * 4096 + 2048, 2048)
        );
        assert_eq!(s.awaited, 101);
    }
}
