//! The block allocator: a bitmap of the data device's blocks, derived from the extent map at
//! open (docs/design.md §3), with first-fit allocation (lowest free blocks first, found from a
//! low-water hint) so that freed blocks are reused before untouched ones: a data *file* then
//! stays dense, and rewrites land in already-allocated file extents instead of sparse holes
//! that the host filesystem must allocate (and journal) on every write. Sequential writes
//! into free space still get contiguous runs. Deferred frees (§5): a freed block returns to
//! use only after the metadata change that freed it is durable.
//!
//! **Streams** (format2.md §5, [`Allocator::alloc_for`]): a writer that names its stream (a
//! volume) continues where its last allocation ended, in the free blocks of that chunk,
//! and otherwise starts in a *chunk* (4096 blocks, 16 MiB) that nothing uses, so volumes
//! written at the same time do not interleave their data in request-sized pieces: on an
//! HDD each volume's sequentially written data stays in 16 MiB runs or longer. Only when no
//! chunk is wholly free does it fall back to first fit (holes left by frees). A count of
//! used blocks per chunk finds a free chunk without reading the bitmap. Allocations of
//! fewer than [`STREAM_MIN`] blocks (4K random writes) take holes first fit as before:
//! they are scattered by nature, and on an image file holes are blocks the host file
//! system has allocated already (measured: 4K random overwrites into fresh chunks of a
//! sparse image ran ~25% slower).
//!
//! Threading: not synchronised; the pool keeps it in a Mutex.

use std::collections::HashMap;

use bitvec::prelude::*;

/// Blocks per chunk: the unit a stream starts in.
pub const CHUNK: usize = 4096;
/// Smallest allocation that goes to its stream (64 KiB); smaller ones fill holes.
pub const STREAM_MIN: u64 = 16;
/// Streams whose position is remembered; past it the map starts over (a position is only
/// a hint).
const MAX_STREAMS: usize = 65_536;

/// Appends `len` blocks at `start` to `runs`, extending the last run when contiguous.
fn push(runs: &mut Vec<Run>, start: usize, len: usize) {
    match runs.last_mut() {
        Some(r) if r.start + r.len == start as u64 => r.len += len as u64,
        _ => runs.push(Run {
            start: start as u64,
            len: len as u64,
        }),
    }
}

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
    /// Used blocks per chunk.
    chunk_used: Vec<u16>,
    /// No chunk below this one is wholly free.
    fresh: usize,
    /// Where each stream's next allocation would continue.
    streams: HashMap<u64, u64>,
}

impl Allocator {
    pub fn new(blocks: u64) -> Self {
        Allocator {
            used: bitvec![u64, Lsb0; 0; blocks as usize],
            free: blocks,
            low: 0,
            pending: Vec::new(),
            chunk_used: vec![0; (blocks as usize).div_ceil(CHUNK)],
            fresh: 0,
            streams: HashMap::new(),
        }
    }

    fn count(&mut self, start: usize, len: usize, used: bool) {
        let mut pos = start;
        while pos < start + len {
            let c = pos / CHUNK;
            let n = ((c + 1) * CHUNK).min(start + len) - pos;
            if used {
                self.chunk_used[c] += n as u16;
            } else {
                self.chunk_used[c] -= n as u16;
                if self.chunk_used[c] == 0 {
                    self.fresh = self.fresh.min(c);
                }
            }
            pos += n;
        }
    }

    /// Takes the free blocks from `start` on, up to `max` of them and up to the first used
    /// one; returns how many.
    fn take_from(&mut self, start: usize, max: usize) -> usize {
        let total = self.used.len();
        if start >= total || self.used[start] {
            return 0;
        }
        let limit = (start + max).min(total);
        let len = self.used[start..limit].first_one().unwrap_or(limit - start);
        self.used[start..start + len].fill(true);
        self.count(start, len, true);
        self.free -= len as u64;
        len
    }

    /// The first wholly free chunk, if any.
    fn free_chunk(&mut self) -> Option<usize> {
        let c = self.chunk_used[self.fresh..].iter().position(|&n| n == 0)? + self.fresh;
        self.fresh = c;
        Some(c)
    }

    /// Allocates `n` blocks for `stream` (module doc): continuing its last allocation
    /// while the blocks there are free, then from wholly free chunks, then first fit; all
    /// or nothing. Fewer than [`STREAM_MIN`]: first fit.
    pub fn alloc_for(&mut self, stream: u64, n: u64) -> Option<Vec<Run>> {
        if n < STREAM_MIN {
            return self.alloc(n);
        }
        self.alloc_streamed(stream, n)
    }

    /// [`Allocator::alloc_for`] at any size: what keeps small allocations of one kind
    /// together (checksum blocks, one at a time, in their own chunks).
    pub fn alloc_streamed(&mut self, stream: u64, n: u64) -> Option<Vec<Run>> {
        if self.free < n {
            return None;
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut need = n as usize;
        if let Some(&at) = self.streams.get(&stream) {
            // The rest of the stream's chunk, past what others took meanwhile.
            // (`at` is one past the stream's last block: its chunk is that block's.)
            let mut pos = at as usize;
            let end = ((pos.saturating_sub(1) / CHUNK + 1) * CHUNK).min(self.used.len());
            while need > 0 && pos < end {
                let Some(off) = self.used[pos..end].first_zero() else {
                    break;
                };
                let got = self.take_from(pos + off, need.min(end - pos - off));
                push(&mut runs, pos + off, got);
                need -= got;
                pos += off + got;
            }
        }
        while need > 0 {
            let Some(c) = self.free_chunk() else { break };
            let got = self.take_from(c * CHUNK, need);
            push(&mut runs, c * CHUNK, got);
            need -= got;
        }
        if need > 0 {
            // No chunk wholly free: fill holes, lowest first (enough are free: checked).
            match self.alloc(need as u64) {
                Some(more) => {
                    for r in more {
                        push(&mut runs, r.start as usize, r.len as usize);
                    }
                }
                None => {
                    for r in runs {
                        for pba in r.start..r.start + r.len {
                            self.free_now(pba);
                        }
                    }
                    return None;
                }
            }
        }
        runs.retain(|r| r.len > 0);
        if self.streams.len() >= MAX_STREAMS {
            self.streams.clear();
        }
        if let Some(last) = runs.last() {
            self.streams.insert(stream, last.start + last.len);
        }
        Some(runs)
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
        if self.used.get(pba as usize).is_none_or(|b| *b) {
            return false;
        }
        self.used.set(pba as usize, true);
        self.free -= 1;
        self.count(pba as usize, 1, true);
        true
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
            self.count(start, len, true);
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
        if self.used.get(pba as usize).is_some_and(|b| *b) {
            self.used.set(pba as usize, false);
            self.free += 1;
            self.low = self.low.min(pba as usize);
            self.count(pba as usize, 1, false);
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

    fn blocks(runs: &[Run]) -> Vec<u64> {
        runs.iter().flat_map(|r| r.start..r.start + r.len).collect()
    }

    #[test]
    fn streams_written_together_stay_in_their_own_chunks() {
        let mut a = Allocator::new(CHUNK as u64 * 8);
        let mut of: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..32 {
            for (s, mine) in of.iter_mut().enumerate() {
                mine.extend(blocks(&a.alloc_for(s as u64, 256).unwrap()));
            }
        }
        for mine in &of {
            let runs = mine.windows(2).filter(|w| w[1] != w[0] + 1).count() + 1;
            assert_eq!(runs, 2, "8192 blocks in two whole chunks");
            assert!(mine
                .iter()
                .all(|b| b % CHUNK as u64 == 0 || mine.contains(&(b - 1))));
        }
        // Plain first fit interleaves them in 256-block pieces.
        let mut b = Allocator::new(CHUNK as u64 * 8);
        let first: Vec<u64> = (0..32)
            .flat_map(|_| {
                let x = blocks(&b.alloc(256).unwrap());
                b.alloc(256).unwrap();
                x
            })
            .collect();
        assert_eq!(
            first.windows(2).filter(|w| w[1] != w[0] + 1).count() + 1,
            32
        );
    }

    #[test]
    fn a_stream_fills_holes_when_no_chunk_is_free_and_is_all_or_nothing() {
        let mut a = Allocator::new(CHUNK as u64 * 2);
        a.alloc_for(1, CHUNK as u64 * 2).unwrap();
        let holes: Vec<u64> = (5..10).chain(700..705).chain(5000..5010).collect();
        for &pba in &holes {
            a.free_now(pba);
        }
        assert!(a.alloc_for(2, 21).is_none());
        assert_eq!(a.free(), 20);
        assert_eq!(blocks(&a.alloc_for(2, 20).unwrap()), holes);
        // A chunk freed whole is a stream's again.
        for pba in CHUNK as u64..2 * CHUNK as u64 {
            a.free_now(pba);
        }
        for k in 0..2 {
            assert_eq!(
                a.alloc_for(3, 16).unwrap(),
                vec![Run {
                    start: CHUNK as u64 + 16 * k,
                    len: 16
                }]
            );
        }
    }

    #[test]
    fn small_allocations_fill_holes_first() {
        let mut a = Allocator::new(CHUNK as u64 * 2);
        a.alloc_for(1, 64).unwrap();
        a.free_now(10);
        // A 4K write takes the hole, not the stream's next block.
        assert_eq!(blocks(&a.alloc_for(1, 1).unwrap()), vec![10]);
        assert_eq!(blocks(&a.alloc_for(1, 1).unwrap()), vec![64]);
        assert_eq!(
            a.alloc_for(1, 16).unwrap(),
            vec![Run { start: 65, len: 16 }]
        );
    }

    proptest::proptest! {
        /// Any mix of stream and plain allocations and frees: no block is handed out
        /// twice, every run is free before and used after, and the counts agree with
        /// the bitmap.
        #[test]
        fn allocations_match_a_model(
            ops in proptest::collection::vec((0u8..4, 0u64..3, 1u64..3000), 1..80)
        ) {
            let total = CHUNK as u64 * 3 + 100;
            let mut a = Allocator::new(total);
            let mut used = std::collections::BTreeSet::new();
            for (op, stream, n) in ops {
                match op {
                    0 | 1 => {
                        let free_before = a.free();
                        let got = if op == 0 { a.alloc_for(stream, n) } else { a.alloc(n) };
                        match got {
                            None => proptest::prop_assert!(free_before < n),
                            Some(runs) => {
                                let bs = blocks(&runs);
                                proptest::prop_assert_eq!(bs.len() as u64, n);
                                for b in bs {
                                    proptest::prop_assert!(b < total && used.insert(b));
                                }
                            }
                        }
                    }
                    _ => {
                        // Free the n-th used block, if any.
                        if let Some(&b) = used.iter().nth((n as usize) % used.len().max(1)) {
                            used.remove(&b);
                            a.free_now(b);
                        }
                    }
                }
                proptest::prop_assert_eq!(a.free(), total - used.len() as u64);
                for (c, &n) in a.chunk_used.iter().enumerate() {
                    let lo = (c * CHUNK) as u64;
                    let want = used.range(lo..lo + CHUNK as u64).count();
                    proptest::prop_assert_eq!(usize::from(n), want);
                }
            }
        }
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
