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
//! A second tier (format2.md §8c), when the store keeps derived entries
//! (`MetaStore::derived`): what misses RAM is looked up in the store under `e`+L+E+page,
//! and what a read resolved is put there too, so snapshot reads beyond the RAM tier cost
//! one point lookup like a live page. The store bounds that space itself and may lose
//! entries at a crash; the same argument keeps them fresh, given two more facts: a read
//! only resolves (L, e) after e's retention was durable (snapshot and clone creation
//! commit durably before the catalog shows them), so no crash can give e back to new
//! writes; and at open, [`ContentCache::sweep`] drops every entry whose (L, e) the pool
//! does not retain, which also removes entries left by another history of the store
//! (metadata copied back from an older state: its later epochs are not retained there).
//! An entry that fails to decode is a miss, counted and logged once.
//!
//! Threading: any number of readers; each call holds one shard's mutex for a hash lookup
//! and, on insert, the evictions it causes — never across store or device I/O. The
//! second tier's gets and puts run on the reader's thread, outside any lock.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use super::ids::{Epoch, LineageId, PageNo};
use super::keys;
use super::piece::MAX_PBA;
use super::read::{Block, Content};
use super::PAGE_BLOCKS;
use crate::error::StoreError;
use crate::meta::MetaStore;

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

    /// The stored form: `u8 version=1 | u8 runs | runs × (u8 off | u8 len | 6 B pba LE) |
    /// one u32 LE CRC per block of the runs, in order`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 8 * self.runs.len() + 4 * self.crcs.len());
        out.push(1);
        out.push(self.runs.len() as u8);
        for r in self.runs.iter() {
            out.push(r.off);
            out.push(r.len);
            out.extend_from_slice(&r.pba.to_le_bytes()[..6]);
        }
        for c in self.crcs.iter() {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    /// Decodes [`Packed::encode`]'s form, checking every field (runs inside the page, in
    /// order, not overlapping, addresses in range, one CRC per block): never panics.
    pub fn decode(b: &[u8]) -> Result<Packed, &'static str> {
        let [version, n, rest @ ..] = b else {
            return Err("truncated header");
        };
        if *version != 1 {
            return Err("unknown version");
        }
        let n = usize::from(*n);
        if n > PAGE_BLOCKS as usize || rest.len() < 8 * n {
            return Err("run count");
        }
        let (head, tail) = rest.split_at(8 * n);
        let mut runs = Vec::with_capacity(n);
        let mut end = 0u64;
        let mut blocks = 0usize;
        for r in head.chunks_exact(8) {
            let (off, len) = (r[0], r[1]);
            let mut pba = [0u8; 8];
            pba[..6].copy_from_slice(&r[2..8]);
            let pba = u64::from_le_bytes(pba);
            if len == 0
                || u64::from(off) < end
                || u64::from(off) + u64::from(len) > PAGE_BLOCKS
                || pba + u64::from(len) > MAX_PBA
            {
                return Err("run out of order or out of range");
            }
            end = u64::from(off) + u64::from(len);
            blocks += usize::from(len);
            runs.push(Run { off, len, pba });
        }
        if tail.len() != 4 * blocks {
            return Err("checksum count");
        }
        let crcs = tail
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Packed {
            runs: runs.into_boxed_slice(),
            crcs,
        })
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
    /// Lookups answered from RAM.
    pub hits: u64,
    /// Lookups RAM did not answer (the store tier may have).
    pub misses: u64,
    pub entries: u64,
    pub bytes: u64,
    /// Of the misses, those the store's derived entries answered.
    pub stored_hits: u64,
    /// Store tier errors (a failed get or put, an entry that did not decode): each was
    /// taken as a miss.
    pub stored_errors: u64,
    /// Bytes the store's derived entries occupy (approximate; 0 without a store tier).
    pub stored_bytes: u64,
}

pub struct ContentCache {
    shards: Box<[Mutex<Shard>]>,
    shard_cap: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    /// The second tier: a store that keeps derived entries.
    store: Option<Arc<dyn MetaStore>>,
    stored_hits: AtomicU64,
    stored_errors: AtomicU64,
    logged: AtomicBool,
}

impl ContentCache {
    /// A cache of at most `capacity` bytes of RAM (0, or too little for an entry per
    /// shard: a RAM tier that holds nothing and takes no lock), with `store`'s derived
    /// entries as its second tier when it keeps them.
    pub fn with_store(capacity: usize, store: Option<Arc<dyn MetaStore>>) -> ContentCache {
        let mut c = ContentCache::new(capacity);
        c.store = store.filter(|s| s.derived());
        c
    }

    /// A RAM-only cache of at most `capacity` bytes.
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
            store: None,
            stored_hits: AtomicU64::new(0),
            stored_errors: AtomicU64::new(0),
            logged: AtomicBool::new(false),
        }
    }

    /// Whether either tier keeps anything.
    pub fn enabled(&self) -> bool {
        self.in_ram() || self.store.is_some()
    }

    fn in_ram(&self) -> bool {
        !self.shards.is_empty()
    }

    /// Counts a store-tier failure, logging the first (a broken tier costs speed only).
    fn stored_failed(&self, what: &str) {
        self.stored_errors.fetch_add(1, Ordering::Relaxed);
        if !self.logged.swap(true, Ordering::Relaxed) {
            log::warn!("snapshot content cache on the metadata store: {what} (taken as a miss; later errors are only counted)");
        }
    }

    /// The store tier's entry for `(l, e, p)`, if it has a good one.
    fn stored_get(
        &self,
        store: &dyn MetaStore,
        l: LineageId,
        e: Epoch,
        p: PageNo,
    ) -> Option<Packed> {
        let key = keys::content(l, e, p);
        match store.derived_get(&key) {
            Ok(Some(v)) => match Packed::decode(&v) {
                Ok(packed) => Some(packed),
                Err(why) => {
                    self.stored_failed(&format!(
                        "entry {} does not decode: {why}",
                        super::read::hex(&key)
                    ));
                    None
                }
            },
            Ok(None) => None,
            Err(err) => {
                self.stored_failed(&format!("get {}: {err}", super::read::hex(&key)));
                None
            }
        }
    }

    /// Compares every store-tier entry at an epoch `retained` holds with the content the
    /// map gives there (`read`), one entry at a time; `mismatch` is asked before an entry
    /// that differs is reported (a reader racing a delete may have put one for an epoch
    /// released since: never read again, not an error). Returns how many were compared
    /// and what is wrong (`pool check`: a wrong entry would be served to reads).
    pub fn verify(
        &self,
        retained: &dyn Fn(LineageId, Epoch) -> bool,
        read: &mut dyn FnMut(LineageId, Epoch, PageNo) -> crate::error::Result<Content>,
        still_retained: &mut dyn FnMut(LineageId, Epoch) -> bool,
    ) -> crate::error::Result<(u64, Vec<String>)> {
        let Some(store) = &self.store else {
            return Ok((0, Vec::new()));
        };
        let (from, to) = keys::all_contents();
        let mut bad = Vec::new();
        let mut n = 0u64;
        store.derived_scan(&from, &to, &mut |k, v| {
            let Some([l, e, p]) = keys::fields::<3>(k, keys::K_CONTENT) else {
                return ControlFlow::Continue(());
            };
            let (l, e, p) = (LineageId(l), Epoch(e), PageNo(p));
            if !retained(l, e) {
                return ControlFlow::Continue(());
            }
            n += 1;
            let what = format!("kept snapshot content of lineage {l} epoch {e} page {p}");
            let wrong = match (Packed::decode(v), read(l, e, p)) {
                (Err(why), _) => Some(format!("{what} does not decode: {why}")),
                (_, Err(err)) => Some(format!("{what}: reading the map there: {err}")),
                (Ok(got), Ok(want)) => {
                    (got.unpack() != want).then(|| format!("{what} differs from the map"))
                }
            };
            if let Some(w) = wrong {
                if still_retained(l, e) {
                    bad.push(w);
                }
            }
            if bad.len() > 100 {
                bad.push("... (more not listed)".into());
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        Ok((n, bad))
    }

    /// Drops every store-tier entry whose (lineage, epoch) `retained` does not hold: one
    /// scan step per distinct (lineage, epoch) found, then one durable batch of range
    /// deletes (run at open, module doc). Returns how many (lineage, epoch)s went.
    pub fn sweep(&self, retained: &dyn Fn(LineageId, Epoch) -> bool) -> Result<u64, StoreError> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let (mut from, to) = keys::all_contents();
        let mut drop = Vec::new();
        loop {
            let mut first = None;
            store.derived_scan(&from, &to, &mut |k, _| {
                first = Some(k.to_vec());
                ControlFlow::Break(())
            })?;
            let Some(k) = first else {
                break;
            };
            let (a, b) = match keys::fields::<3>(&k, keys::K_CONTENT) {
                Some([l, e, _]) => {
                    let (l, e) = (LineageId(l), Epoch(e));
                    let (a, b) = keys::contents_at(l, e);
                    if retained(l, e) {
                        from = b;
                        continue;
                    }
                    (a, b)
                }
                // Not a key this version writes: drop it alone.
                None => {
                    let mut b = k.clone();
                    b.push(0);
                    (k, b)
                }
            };
            from = b.clone();
            drop.push((a, b));
        }
        if !drop.is_empty() {
            store.derived_delete_ranges(&drop)?;
        }
        Ok(drop.len() as u64)
    }

    /// Forgets the store tier's entries for good and stops using it (a failed sweep).
    pub fn forget_stored(&mut self) {
        if let Some(store) = self.store.take() {
            store.derived_forget();
        }
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
    ///
    /// What RAM misses is looked up in the store tier (not by bulk reads, which would
    /// only fill the store's block cache) and, when found, kept in RAM.
    pub fn get(&self, l: LineageId, e: Epoch, p: PageNo) -> Option<Content> {
        if !self.enabled() {
            return None;
        }
        let k = (l, e, p);
        let hit = if self.in_ram() {
            self.shard(&k).lru.get(&k).cloned()
        } else {
            None
        };
        let bulk = crate::meta::is_bulk();
        if !bulk {
            let n = if hit.is_some() {
                &self.hits
            } else {
                &self.misses
            };
            n.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(v) = hit {
            return Some(v.unpack());
        }
        let store = self.store.as_deref().filter(|_| !bulk)?;
        let packed = self.stored_get(store, l, e, p)?;
        self.stored_hits.fetch_add(1, Ordering::Relaxed);
        let c = packed.unpack();
        self.remember(k, packed);
        Some(c)
    }

    /// Remembers `c` as the content of page `p` of `l` at retained epoch `e` — unless
    /// this thread reads in bulk (`meta::bulk_reads`: a backup reading a whole snapshot),
    /// whose one pass would only evict what repeated reads use.
    /// Both tiers get it.
    pub fn insert(&self, l: LineageId, e: Epoch, p: PageNo, c: &Content) {
        if !self.enabled() || crate::meta::is_bulk() {
            return;
        }
        let v = Packed::pack(c);
        if let Some(store) = &self.store {
            let key = keys::content(l, e, p);
            if let Err(err) = store.derived_put(&key, &v.encode()) {
                self.stored_failed(&format!("put {}: {err}", super::read::hex(&key)));
            }
        }
        self.remember((l, e, p), v);
    }

    /// Keeps `v` in RAM, evicting least recently used entries past the capacity.
    fn remember(&self, k: Key, v: Packed) {
        let w = v.weight();
        if !self.in_ram() || w > self.shard_cap {
            return;
        }
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
            stored_hits: self.stored_hits.load(Ordering::Relaxed),
            stored_errors: self.stored_errors.load(Ordering::Relaxed),
            stored_bytes: self.store.as_ref().map_or(0, |s| s.derived_size()),
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
            let stored = Packed::pack(&c).encode();
            prop_assert_eq!(Packed::decode(&stored).unwrap().unpack(), c);
        }

        /// Stored entries come back from disk: any bytes decode to an error or to a
        /// content whose runs stay inside the page, never a panic.
        #[test]
        fn decoding_any_bytes_is_safe(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(p) = Packed::decode(&b) {
                let _ = p.unpack();
                prop_assert_eq!(p.encode(), b);
            }
        }
    }

    #[test]
    fn decode_refuses_damaged_entries() {
        let c = content(&[(3, 100, 7), (4, 101, 8), (9, 5, 9)]);
        let good = Packed::pack(&c).encode();
        assert!(Packed::decode(&good).is_ok());
        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(Packed::decode(&bad), Err("unknown version"));
        assert_eq!(
            Packed::decode(&good[..good.len() - 1]),
            Err("checksum count")
        );
        let mut overlap = good.clone();
        overlap[2 + 8] = 3; // the second run starts inside the first
        assert!(Packed::decode(&overlap).is_err());
        let mut past = good.clone();
        past[2 + 8] = 63; // 63 + 1 fits; make its length cross the page
        past[2 + 9] = 2;
        assert!(Packed::decode(&past).is_err());
        assert!(Packed::decode(&[]).is_err());
    }

    fn tiered(ram: usize) -> (Arc<crate::meta::MemStore>, ContentCache) {
        let store = Arc::new(crate::meta::MemStore::new());
        let dynamic: Arc<dyn MetaStore> = store.clone();
        (store, ContentCache::with_store(ram, Some(dynamic)))
    }

    #[test]
    fn the_store_tier_answers_what_ram_does_not_hold() {
        let (store, cache) = tiered(0);
        assert!(cache.enabled());
        let a = content(&[(1, 10, 1), (2, 11, 2)]);
        cache.insert(LineageId(1), Epoch(2), PageNo(3), &a);
        assert_eq!(cache.get(LineageId(1), Epoch(2), PageNo(3)), Some(a));
        assert_eq!(cache.get(LineageId(1), Epoch(3), PageNo(3)), None);
        let st = cache.stats();
        assert_eq!(
            (st.hits, st.misses, st.stored_hits, st.stored_errors),
            (0, 2, 1, 0)
        );
        assert!(st.stored_bytes > 0);
        // A cache opened later on the same store (a restarted daemon) finds it.
        let dynamic: Arc<dyn MetaStore> = store.clone();
        let again = ContentCache::with_store(1 << 20, Some(dynamic));
        assert_eq!(again.get(LineageId(1), Epoch(2), PageNo(3)), Some(a));
        // ... and keeps it in RAM from then on.
        assert_eq!(again.get(LineageId(1), Epoch(2), PageNo(3)), Some(a));
        let st = again.stats();
        assert_eq!((st.hits, st.misses, st.stored_hits), (1, 1, 1));
        // Bulk reads neither use nor fill the store tier.
        let b = content(&[(5, 50, 5)]);
        crate::meta::bulk_reads(|| cache.insert(LineageId(1), Epoch(2), PageNo(4), &b));
        assert_eq!(
            store
                .derived_get(&keys::content(LineageId(1), Epoch(2), PageNo(4)))
                .unwrap(),
            None
        );
        assert_eq!(
            crate::meta::bulk_reads(|| cache.get(LineageId(1), Epoch(2), PageNo(3))),
            None
        );
    }

    #[test]
    fn a_damaged_stored_entry_is_a_counted_miss() {
        let (store, cache) = tiered(0);
        let k = keys::content(LineageId(1), Epoch(2), PageNo(3));
        store
            .derived_put(&k, &[1, 1, 0, 70, 0, 0, 0, 0, 0, 0])
            .unwrap();
        assert_eq!(cache.get(LineageId(1), Epoch(2), PageNo(3)), None);
        assert_eq!(cache.stats().stored_errors, 1);
    }

    #[test]
    fn sweep_drops_the_epochs_not_retained_and_only_those() {
        let (store, cache) = tiered(0);
        let a = content(&[(1, 10, 1)]);
        for (l, e) in [(1, 2), (1, 5), (1, 9), (2, 1), (4, 4)] {
            for p in 0..3 {
                cache.insert(LineageId(l), Epoch(e), PageNo(p), &a);
            }
        }
        // A key this version never writes goes too.
        store.derived_put(&[keys::K_CONTENT, 1, 2], b"x").unwrap();
        let keep = |l: LineageId, e: Epoch| matches!((l.0, e.0), (1, 5) | (4, 4));
        assert_eq!(cache.sweep(&keep).unwrap(), 4);
        let mut left = Vec::new();
        let (a0, b0) = keys::all_contents();
        store
            .derived_scan(&a0, &b0, &mut |k, _| {
                left.push(keys::fields::<3>(k, keys::K_CONTENT).unwrap());
                ControlFlow::Continue(())
            })
            .unwrap();
        let want: Vec<[u64; 3]> = [(1, 5), (4, 4)]
            .iter()
            .flat_map(|&(l, e)| (0..3).map(move |p| [l, e, p]))
            .collect();
        assert_eq!(left, want);
        assert_eq!(cache.sweep(&keep).unwrap(), 0);
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
