//! The block allocator: a bitmap of the data device's blocks, derived from the extent map at
//! open (docs/design.md §3), with first-fit allocation (lowest free blocks first, found from a
//! low-water hint) so that freed blocks are reused before untouched ones: a data *file* then
//! stays dense, and rewrites land in already-allocated file extents instead of sparse holes
//! that the host filesystem must allocate (and journal) on every write. Sequential writes
//! into free space still get contiguous runs. Deferred frees (§5): a freed block returns to
//! use only after the metadata change that freed it is durable.
//!
//! Threading: not synchronised; the pool keeps it in a Mutex.

use bitvec::prelude::*;

/// A run of contiguous blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
}

pub struct Allocator {
    used: BitVec<u64, Lsb0>,
    free: u64,
    /// No block below this index is free.
    low: usize,
    /// (sync generation, pba) of blocks freed by not-yet-durable metadata changes.
    pending: Vec<(u64, u64)>,
}

impl Allocator {
    pub fn new(blocks: u64) -> Self {
        Allocator {
            used: bitvec![u64, Lsb0; 0; blocks as usize],
            free: blocks,
            low: 0,
            pending: Vec::new(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.used.len() as u64
    }
    /// Blocks available for allocation now.
    pub fn free(&self) -> u64 {
        self.free
    }
    /// Blocks freed but waiting for a metadata sync.
    pub fn pending(&self) -> u64 {
        self.pending.len() as u64
    }
    pub fn is_used(&self, pba: u64) -> bool {
        self.used.get(pba as usize).is_some_and(|b| *b)
    }
    /// A copy of the state `pool check` compares against: (used bitmap, free, pending).
    pub(crate) fn snapshot(&self) -> (BitVec<u64, Lsb0>, u64, u64) {
        (self.used.clone(), self.free, self.pending())
    }

    /// Marks `pba` used while loading; false if out of range or already used (corruption).
    pub fn mark_used(&mut self, pba: u64) -> bool {
        match self.used.get_mut(pba as usize) {
            Some(mut b) if !*b => {
                b.set(true);
                self.free -= 1;
                true
            }
            _ => false,
        }
    }

    /// Allocates `n` blocks, lowest free blocks first; all or nothing.
    pub fn alloc(&mut self, n: u64) -> Option<Vec<Run>> {
        if n == 0 {
            return Some(Vec::new());
        }
        if self.free < n {
            return None;
        }
        let total = self.used.len();
        let mut runs = Vec::new();
        let mut need = n as usize;
        let mut pos = self.low.min(total);
        let mut first_free = None;
        while need > 0 {
            // free >= n guarantees enough zeros at or above `low`.
            let start = pos + self.used[pos..].first_zero()?;
            first_free.get_or_insert(start);
            let limit = (start + need).min(total);
            let len = self.used[start..limit].first_one().unwrap_or(limit - start);
            self.used[start..start + len].fill(true);
            runs.push(Run {
                start: start as u64,
                len: len as u64,
            });
            need -= len;
            pos = start + len;
        }
        // Everything below the first free block we found was in use, and it is now too.
        self.low = first_free.unwrap_or(self.low);
        self.free -= n;
        Some(runs)
    }

    /// Returns a block that no durable metadata references (an allocation whose commit
    /// failed) straight to the free set.
    pub fn free_now(&mut self, pba: u64) {
        if let Some(mut b) = self.used.get_mut(pba as usize) {
            if *b {
                b.set(false);
                self.free += 1;
                self.low = self.low.min(pba as usize);
            }
        }
    }

    /// Frees `pba` once a metadata sync of generation `generation` or later has completed.
    pub fn free_deferred(&mut self, generation: u64, pba: u64) {
        self.pending.push((generation, pba));
    }

    /// Releases every pending free of generation <= `generation`.
    pub fn release_through(&mut self, generation: u64) -> u64 {
        let mut released = 0;
        let mut keep = Vec::new();
        for (g, pba) in std::mem::take(&mut self.pending) {
            if g <= generation {
                self.free_now(pba);
                released += 1;
            } else {
                keep.push((g, pba));
            }
        }
        self.pending = keep;
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_reuses_low_blocks() {
        let mut a = Allocator::new(16);
        assert_eq!(a.alloc(4).unwrap(), vec![Run { start: 0, len: 4 }]);
        assert_eq!(a.alloc(4).unwrap(), vec![Run { start: 4, len: 4 }]);
        a.free_now(1);
        a.free_now(2);
        assert_eq!(a.free(), 10);
        assert_eq!(
            a.alloc(9).unwrap(),
            vec![Run { start: 1, len: 2 }, Run { start: 8, len: 7 }]
        );
        assert_eq!(a.free(), 1);
        assert!(a.alloc(2).is_none());
        assert_eq!(a.alloc(1).unwrap(), vec![Run { start: 15, len: 1 }]);
        assert!(a.alloc(1).is_none());
        a.free_now(3);
        assert_eq!(a.alloc(1).unwrap(), vec![Run { start: 3, len: 1 }]);
    }

    #[test]
    fn mark_used_then_alloc_skips_used() {
        let mut a = Allocator::new(8);
        assert!(a.mark_used(0) && a.mark_used(2));
        assert_eq!(
            a.alloc(3).unwrap(),
            vec![Run { start: 1, len: 1 }, Run { start: 3, len: 2 }]
        );
    }

    #[test]
    fn deferred_frees_wait_for_generation() {
        let mut a = Allocator::new(4);
        a.alloc(4).unwrap();
        a.free_deferred(1, 0);
        a.free_deferred(2, 1);
        assert_eq!(a.free(), 0);
        assert_eq!(a.pending(), 2);
        assert_eq!(a.release_through(1), 1);
        assert_eq!(a.free(), 1);
        assert_eq!(a.release_through(5), 1);
        assert_eq!(a.free(), 2);
        assert!(!a.mark_used(99));
        assert!(a.mark_used(0));
        assert!(!a.mark_used(0));
    }
}
