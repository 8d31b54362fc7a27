//! Upload rate limit (`--limit-upload`): pack uploads are spaced so that, on average, no
//! more than the limit's bytes per second leave this process for the repository.
//!
//! Each upload reserves its bytes' share of a timeline shared by every uploader (and
//! every job using the same `Repository` handle): it starts no earlier than the end of the
//! previous reservation, and its uploader takes no other pack before its reservation
//! ends. A pack itself goes at link speed (granularity: one pack, a few MiB); the
//! average over any stretch of whole packs is at most the limit.
//!
//! Threading: `Pacer` is shared by reference; one mutex guards the timeline (held only
//! to compute a start time, never while sleeping).

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: u64,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(None),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Reserves the time `bytes` take at the limit: waits until the reservation starts
    /// (after every earlier one) and returns when it ends. The caller sends its bytes,
    /// then waits for the end with [`Pacer::until`], so a job takes at least its bytes'
    /// time at the limit, even a job of one pack.
    pub fn reserve(&self, bytes: u64) -> Instant {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + cost);
            start
        };
        Pacer::until(start);
        start + cost
    }

    /// Sleeps until `t`.
    pub fn until(t: Instant) {
        let now = Instant::now();
        if t > now {
            std::thread::sleep(t - now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_spaced_to_the_limit() {
        let p = Pacer::new(10 << 20); // 10 MiB/s
        let t0 = Instant::now();
        let mut end = t0;
        for _ in 0..4 {
            end = p.reserve(2 << 20); // 8 MiB in all: 0.8 s at the limit
        }
        Pacer::until(end);
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(790), "{el:?}");
        assert!(el < Duration::from_secs(3), "{el:?}");
    }
}
