//! Connection admission: at most `max` NBD connections are served at once (Unix socket and
//! TCP together). A connection over the cap is closed as soon as it is accepted, before a
//! thread or a buffer is spent on it, so a flood of clients cannot exhaust the daemon's
//! threads or memory: each admitted connection holds at most one reader thread, its
//! workers and `CONN_BUDGET` bytes of payload (server.rs), so the whole server holds at
//! most `max` times that. Idle clients are bounded in time too: a connection must finish
//! its handshake within the handshake timeout.
//!
//! Threading: any thread may call; counters are atomics, a [`Slot`] gives its place back
//! when dropped (at the end of the connection's thread, or at once if none could start).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::Mutex;

/// Connections served at once unless configured (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Refusals are logged at most this often (a flood must not flood the log too).
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Admission {
    max: AtomicUsize,
    active: AtomicUsize,
    refused: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot(Arc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(max: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max: AtomicUsize::new(max.max(1)),
            active: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            last_log: Mutex::new(None),
        })
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max.max(1), Ordering::Release);
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Connections refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }

    /// A place for a new connection, or `None` (counted and logged) when all are taken.
    pub fn try_enter(self: &Arc<Self>, peer: &str) -> Option<Slot> {
        let max = self.max();
        let mut cur = self.active.load(Ordering::Acquire);
        loop {
            if cur >= max {
                let n = self.refused.fetch_add(1, Ordering::AcqRel) + 1;
                self.log_refusal(peer, max, n);
                return None;
            }
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Slot(Arc::clone(self))),
                Err(now) => cur = now,
            }
        }
    }

    fn log_refusal(&self, peer: &str, max: usize, total: u64) {
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            log::warn!(
                "nbd: refusing a connection from {peer}: {max} connections are being served \
                 (--max-connections); {total} refused since start"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_and_given_back() {
        let a = Admission::new(2);
        let s1 = a.try_enter("t").expect("first");
        let s2 = a.try_enter("t").expect("second");
        assert!(a.try_enter("t").is_none(), "over the cap");
        assert_eq!((a.active(), a.refused()), (2, 1));
        drop(s1);
        let s3 = a.try_enter("t").expect("a freed place is reused");
        drop((s2, s3));
        assert_eq!(a.active(), 0);
    }

    #[test]
    fn concurrent_entries_never_exceed_the_cap() {
        let a = Admission::new(5);
        let peak = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|sc| {
            for _ in 0..8 {
                let (a, peak) = (Arc::clone(&a), Arc::clone(&peak));
                sc.spawn(move || {
                    for _ in 0..2000 {
                        if let Some(s) = a.try_enter("t") {
                            peak.fetch_max(a.active(), Ordering::AcqRel);
                            drop(s);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Acquire) <= 5);
        assert_eq!(a.active(), 0);
    }
}
