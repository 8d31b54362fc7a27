//! A bounded cache of page contents at retained epochs (format2.md §8b): what a read of a
//! snapshot, or of the base a clone's unwritten page inherits, resolved from the store.
//!
//! Why an entry never goes stale: the content of page p of lineage L at epoch e does not
//! change while e is retained (I3; writes are born after e, jobs only move or merge dead
//! pieces without changing what e sees), and a read may only ask for (L, e) after it
//! resolved a target that retains e in the catalog — a snapshot at e, or a clone whose
//! base is (L, e). Epochs never return to a lineage's retained set and lineage ids are never
//! reused, so an entry of a released epoch is never asked for again; it only waits for
//! eviction. Data blocks an entry names stay unreused while a reader uses them: the read
//! takes its pin before it resolves the target (as for a read from the store).
//!
//! Entries are packed (runs of contiguous blocks plus one CRC per block: ~450 bytes with
//! their overhead for a sequentially written page) and weighed in bytes (an estimate of
//! what they hold in RAM); the cache holds at most its capacity,
//! evicting least recently used entries shard by shard. Capacity 0 disables it.
//!
//! Threading: any number of readers; each call holds one shard's mutex for a hash lookup
//! and, on insert, the evictions it causes — never across store or device I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use super::ids::{Epoch, LineageId, PageNo};
use super::read::{Block, Content};
use super::PAGE_BLOCKS;

const SHARDS: usize = 16;
/// Bytes an entry costs besides its runs and CRCs, estimated: the LRU node (key, value
/// pointer, links), its hash slot at the map's load factor, the Arc header and the two
/// boxed slices with their allocator headers.
const ENTRY_OVERHEAD: usize = 176;
// A run's offset and length are u8.
const _: () = assert!(PAGE_BLOCKS <= 255);
/// A shard smaller than this could not hold one page with 64 scattered blocks.
const MIN_SHARD: usize = 2048;

type Key = (LineageId, Epoch, PageNo);

/// One run of blocks contiguous on the device: page slots `off..off+len` at `pba..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    off: u8,
    len: u8,
    pba: u64,
}

/// A page's content, packed: its runs in slot order and the CRC of every mapped block.
#[derive(Debug, PartialEq, Eq)]
pub struct Packed {
    runs: Box<[Run]>,
    crcs: Box<[u32]>,
}

impl Packed {
    pub fn pack(c: &Content) -> Packed {
        let mut runs: Vec<Run> = Vec::new();
        let mut crcs = Vec::new();
        for (i, s) in c.iter().enumerate() {
            let Some(b) = s else { continue };
            crcs.push(b.crc);
            if let Some(r) = runs.last_mut() {
                if usize::from(r.off) + usize::from(r.len) == i && r.pba + u64::from(r.len) == b.pba
                {
                    r.len += 1;
                    continue;
                }
            }
            runs.push(Run {
                off: i as u8,
                len: 1,
                pba: b.pba,
            });
        }
        Packed {
            runs: runs.into_boxed_slice(),
            crcs: crcs.into_boxed_slice(),
        }
    }

    pub fn unpack(&self) -> Content {
        let mut c: Content = [None; PAGE_BLOCKS as usize];
        let mut crcs = self.crcs.iter();
        for r in self.runs.iter() {
            for i in 0..u64::from(r.len) {
                // Packed only by `pack`: one CRC per block of its runs, slots < 64.
                let crc = crcs.next().copied().unwrap_or_default();
                c[usize::from(r.off) + i as usize] = Some(Block {
                    pba: r.pba + i,
                    crc,
                });
            }
        }
        c
    }

    fn weight(&self) -> usize {
        ENTRY_OVERHEAD
            + self.runs.len() * std::mem::size_of::<Run>()
            + self.crcs.len() * std::mem::size_of::<u32>()
    }
}

struct Shard {
    lru: LruCache<Key, Arc<Packed>>,
    bytes: usize,
}

/// Hits and misses (of lookups: a clone's read that misses at its snapshot and at its
/// base counts two) and what the cache holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
    pub bytes: u64,
}

pub struct ContentCache {
    shards: Box<[Mutex<Shard>]>,
    shard_cap: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ContentCache {
    /// A cache of at most `capacity` bytes (0, or too little for an entry per shard: a
    /// cache that holds nothing and takes no lock).
    pub fn new(capacity: usize) -> ContentCache {
        let n = if capacity / SHARDS < MIN_SHARD {
            0
        } else {
            SHARDS
        };
        ContentCache {
            shards: (0..n)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: LruCache::unbounded(),
                        bytes: 0,
                    })
                })
                .collect(),
            shard_cap: capacity / SHARDS,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    fn shard(&self, k: &Key) -> MutexGuard<'_, Shard> {
        let h = (k.2 .0 ^ k.0 .0.rotate_left(40) ^ k.1 .0.rotate_left(20))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let i = (h >> 32) as usize % self.shards.len();
        // Poisoning: a panic mid-update of an in-memory cache; its entries are each whole.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached content of page `p` of `l` at retained epoch `e`. Bulk reads are not
    /// counted in the hits and misses (a backup's one pass would drown the hit rate of
    /// the reads the cache is for).
    pub fn get(&self, l: LineageId, e: Epoch, p: PageNo) -> Option<Content> {
        if !self.enabled() {
            return None;
        }
        let k = (l, e, p);
        let hit = self.shard(&k).lru.get(&k).cloned();
        if !crate::meta::is_bulk() {
            let n = if hit.is_some() {
                &self.hits
            } else {
                &self.misses
            };
            n.fetch_add(1, Ordering::Relaxed);
        }
        hit.map(|v| v.unpack())
    }

    /// Remembers `c` as the content of page `p` of `l` at retained epoch `e` — unless
    /// this thread reads in bulk (`meta::bulk_reads`: a backup reading a whole snapshot),
    /// whose one pass would only evict what repeated reads use.
    pub fn insert(&self, l: LineageId, e: Epoch, p: PageNo, c: &Content) {
        if !self.enabled() || crate::meta::is_bulk() {
            return;
        }
        let v = Packed::pack(c);
        let w = v.weight();
        if w > self.shard_cap {
            return;
        }
        let k = (l, e, p);
        let mut s = self.shard(&k);
        if let Some((_, old)) = s.lru.push(k, Arc::new(v)) {
            s.bytes -= old.weight();
        }
        s.bytes += w;
        while s.bytes > self.shard_cap {
            match s.lru.pop_lru() {
                Some((_, old)) => s.bytes -= old.weight(),
                None => break,
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        let mut st = CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            ..Default::default()
        };
        for s in self.shards.iter() {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            st.entries += s.lru.len() as u64;
            st.bytes += s.bytes as u64;
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn content(slots: &[(usize, u64, u32)]) -> Content {
        let mut c: Content = [None; PAGE_BLOCKS as usize];
        for &(i, pba, crc) in slots {
            c[i] = Some(Block { pba, crc });
        }
        c
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trips(
            slots in proptest::collection::vec(
                proptest::option::of((0u64..40, any::<u32>())), 64)
        ) {
            let mut c: Content = [None; PAGE_BLOCKS as usize];
            for (i, s) in slots.iter().enumerate() {
                c[i] = s.map(|(pba, crc)| Block { pba: pba + i as u64 / 3, crc });
            }
            prop_assert_eq!(Packed::pack(&c).unpack(), c);
        }
    }

    #[test]
    fn contiguous_blocks_pack_into_one_run() {
        let c = content(
            &(0..64)
                .map(|i| (i, 1000 + i as u64, i as u32))
                .collect::<Vec<_>>(),
        );
        let p = Packed::pack(&c);
        assert_eq!(p.runs.len(), 1);
        assert_eq!(p.crcs.len(), 64);
        assert_eq!(p.weight(), ENTRY_OVERHEAD + 16 + 256);
    }

    #[test]
    fn stays_within_capacity_and_evicts_least_recently_used() {
        let one = content(&[(0, 7, 1)]);
        let w = Packed::pack(&one).weight();
        // Room for 20 entries per shard.
        let cache = ContentCache::new(SHARDS * 20 * w);
        for p in 0..10_000u64 {
            cache.insert(LineageId(1), Epoch(3), PageNo(p), &one);
            let st = cache.stats();
            assert!(st.bytes <= (SHARDS * 20 * w) as u64, "{st:?}");
        }
        let st = cache.stats();
        assert_eq!(st.entries, (SHARDS * 20) as u64);
        // The newest entries are the ones kept.
        assert_eq!(cache.get(LineageId(1), Epoch(3), PageNo(9_999)), Some(one));
        assert_eq!(cache.get(LineageId(1), Epoch(3), PageNo(0)), None);
        let st = cache.stats();
        assert_eq!((st.hits, st.misses), (1, 1));
    }

    #[test]
    fn keys_do_not_mix_lineages_epochs_or_pages() {
        let cache = ContentCache::new(1 << 20);
        let a = content(&[(1, 10, 1)]);
        let b = content(&[(2, 20, 2)]);
        cache.insert(LineageId(1), Epoch(2), PageNo(3), &a);
        cache.insert(LineageId(2), Epoch(1), PageNo(3), &b);
        assert_eq!(cache.get(LineageId(1), Epoch(2), PageNo(3)), Some(a));
        assert_eq!(cache.get(LineageId(2), Epoch(1), PageNo(3)), Some(b));
        assert_eq!(cache.get(LineageId(1), Epoch(1), PageNo(3)), None);
        assert_eq!(cache.get(LineageId(1), Epoch(2), PageNo(2)), None);
    }

    #[test]
    fn capacity_zero_or_tiny_holds_nothing() {
        for cap in [0, SHARDS * MIN_SHARD - 1] {
            let cache = ContentCache::new(cap);
            assert!(!cache.enabled());
            cache.insert(LineageId(1), Epoch(1), PageNo(1), &content(&[(0, 1, 1)]));
            assert_eq!(cache.get(LineageId(1), Epoch(1), PageNo(1)), None);
            assert_eq!(cache.stats(), CacheStats::default());
        }
    }

    #[test]
    fn bulk_reads_do_not_fill_it() {
        let cache = ContentCache::new(1 << 20);
        let a = content(&[(1, 10, 1)]);
        crate::meta::bulk_reads(|| cache.insert(LineageId(1), Epoch(2), PageNo(3), &a));
        assert_eq!(cache.get(LineageId(1), Epoch(2), PageNo(3)), None);
        cache.insert(LineageId(1), Epoch(2), PageNo(3), &a);
        let hit = crate::meta::bulk_reads(|| cache.get(LineageId(1), Epoch(2), PageNo(3)));
        assert_eq!(hit, Some(a), "bulk reads still use what is there");
        let st = cache.stats();
        assert_eq!((st.hits, st.misses), (0, 1), "bulk lookups are not counted");
    }
}
