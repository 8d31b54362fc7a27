//! Read pins: what keeps a data block that a reader found in the mapping from being handed
//! out again before the reader has finished reading it, without ever making a reader wait.
//!
//! A freed block is not reusable at once: it is tagged with the sync generation current
//! when its free was committed, and a later `sync` returns frees up to some generation to
//! the allocator (design §6). A reader takes a [`ReadPin`] *before* it looks up the mapping;
//! the pin records the generation at that moment, `G`. Any block the reader then finds is
//! freed, if at all, by a commit ordered after the lookup, and every free is tagged after
//! its commit (`defer_frees` runs after the store batch, under the tree write lock), so the
//! tag is `>= G`. The order holds both for lookups under the tree read lock (plan_read:
//! commits hold the write side) and for scrub's direct store scans (a scan sees the store
//! as of its start, so an entry it sees was removed by a later commit). Hence a sync may return
//! every free tagged below the oldest pinned generation, and no other: [`Pins::release_bound`].
//!
//! Why not a lock: a reader that holds the pin across asynchronous data I/O (a ublk queue
//! task awaiting its io_uring) must never block the thread that completes that I/O. With a
//! reader-writer lock, a sync waiting for the exclusive side would make the next reader on
//! the same thread wait forever for the first one to finish. Here nobody waits: a sync that
//! finds old pins releases less, and a later sync releases the rest.
//!
//! Threading: the pin table is one mutex held for a few instructions; the generation is
//! read under it, so a pin and a sync's bound are ordered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub(crate) struct Pins {
    /// Generation -> number of live pins taken in it.
    active: Mutex<BTreeMap<u64, usize>>,
}

/// Held by a reader from before its mapping lookup to the end of its data I/O.
pub struct ReadPin<'a> {
    pins: &'a Pins,
    generation: u64,
}

impl Pins {
    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, usize>> {
        // The table holds plain counters updated in one step; a panic elsewhere cannot
        // leave it half-updated.
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins the current value of `generation`.
    pub(crate) fn pin<'a>(&'a self, generation: &AtomicU64) -> ReadPin<'a> {
        let mut t = self.table();
        let g = generation.load(Ordering::Acquire);
        *t.entry(g).or_insert(0) += 1;
        ReadPin {
            pins: self,
            generation: g,
        }
    }

    /// The highest generation whose frees a sync that closed generation `closed` may
    /// return to the allocator: `closed`, or less while older pins are live; `None` if
    /// nothing may be returned yet.
    pub(crate) fn release_bound(&self, closed: u64) -> Option<u64> {
        match self.table().keys().next() {
            Some(&oldest) if oldest <= closed => oldest.checked_sub(1),
            _ => Some(closed),
        }
    }

    /// Live pins (tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.table().values().sum()
    }
}

impl Drop for ReadPin<'_> {
    fn drop(&mut self) {
        let mut t = self.pins.table();
        if let Some(n) = t.get_mut(&self.generation) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.generation);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_stops_below_the_oldest_pin() {
        let pins = Pins::default();
        let gen = AtomicU64::new(5);
        assert_eq!(pins.release_bound(4), Some(4));
        let a = pins.pin(&gen);
        gen.store(6, Ordering::Release);
        let b = pins.pin(&gen);
        assert_eq!(pins.live(), 2);
        // A sync that closed generation 5 must keep frees tagged 5 (a reader pinned 5).
        assert_eq!(pins.release_bound(5), Some(4));
        drop(a);
        // Pins newer than the closed generation do not hold anything back.
        assert_eq!(pins.release_bound(5), Some(5));
        drop(b);
        assert_eq!(pins.live(), 0);
        let z = AtomicU64::new(0);
        let c = pins.pin(&z);
        assert_eq!(pins.release_bound(3), None);
        drop(c);
        assert_eq!(pins.release_bound(3), Some(3));
    }
}
