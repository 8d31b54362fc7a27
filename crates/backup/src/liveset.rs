//! The set of chunk ids the backups reference, as gc needs it: a Bloom filter, so its
//! memory follows the repository's chunk count at a fixed 3 bytes each (24 bits, 16
//! probes), not the references (every backup of a chain names most of the same chunks
//! again) nor a set of 32-byte ids (~50 bytes each in a hash set, with the map of every
//! chunk's location beside it: ~200 bytes per chunk before). Blocked: an id's probes all
//! fall in one 64-byte block, one cache miss per insert or query (a gc inserts every
//! cell of every backup it keeps).
//!
//! It answers "maybe referenced" for every id inserted (no false negatives: gc never
//! deletes a referenced chunk through it) and, for an id never inserted, wrongly "maybe"
//! with a small probability (about 6 in 100,000 when the filter holds as many ids as it
//! was sized for; negligible for small repositories, which get at least 2 MiB). A wrong
//! "maybe" only keeps a dead chunk (and perhaps its pack, or a repack of it) one gc
//! longer: each run draws a new random seed, so the same dead chunk is kept again only
//! with that small probability again.
//!
//! Threading: built on one thread, then read through `&self`.

use crate::crypto::{random_bytes, ChunkId};

/// Bits per chunk the filter is sized for, and probes per id (the optimum for 24 bits is
/// 24 ln 2 ~ 16).
const BITS_PER_ID: u64 = 24;
const PROBES: u64 = 16;
/// Bits of one block (a cache line).
const BLOCK_BITS: u64 = 512;
/// Fewest and most bits: small repositories get a filter far larger than they need (the
/// chance of a wrong "maybe" is then negligible), and none takes more than 1 GiB (beyond
/// ~350 M chunks wrong answers grow more frequent: still never a deleted live chunk).
const MIN_BITS: u64 = 1 << 24;
const MAX_BITS: u64 = 1 << 33;

pub struct LiveSet {
    words: Vec<u64>,
    bits: u64,
    /// Probes per id: [`PROBES`], fewer when the size cap leaves less than
    /// [`BITS_PER_ID`] per id (the optimum, bits per id x ln 2).
    probes: u64,
    seed: [u64; 2],
    inserted: u64,
}

/// A 64-bit finaliser (splitmix64's): spreads a seeded id word over every bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(id: &ChunkId, i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&id.0[i * 8..i * 8 + 8]);
    u64::from_le_bytes(a)
}

/// The probe positions of `id` in a filter of `bits` bits: a block chosen by one seeded
/// word of the id (itself a keyed hash), positions in it drawn from a splitmix64 sequence
/// started at another. (Not double hashing: within a 512-bit block its arithmetic
/// progressions overlap, and the filter claimed ~1 in 1,000 absent ids.)
fn probes(seed: [u64; 2], bits: u64, k: u64, id: &ChunkId) -> impl Iterator<Item = usize> {
    let block = mix(word(id, 0) ^ seed[0]) % (bits / BLOCK_BITS) * BLOCK_BITS;
    let start = word(id, 1) ^ seed[1];
    (1..=k).map(move |i| {
        let x = mix(start.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        (block + x % BLOCK_BITS) as usize
    })
}

/// Probes for `ids` ids in `bits` bits: bits per id x ln 2, at most [`PROBES`].
fn probe_count(bits: u64, ids: u64) -> u64 {
    let per_id = bits as f64 / ids.max(1) as f64;
    ((per_id * std::f64::consts::LN_2).round() as u64).clamp(1, PROBES)
}

impl LiveSet {
    /// A filter for about `ids` distinct ids.
    pub fn with_capacity(ids: u64) -> LiveSet {
        let bits = ids
            .saturating_mul(BITS_PER_ID)
            .clamp(MIN_BITS, MAX_BITS)
            .next_multiple_of(BLOCK_BITS);
        let s: [u8; 16] = random_bytes();
        let mut seed = [0u64; 2];
        for (w, c) in seed.iter_mut().zip(s.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            *w = u64::from_le_bytes(a);
        }
        LiveSet {
            words: vec![0; (bits / 64) as usize],
            bits,
            probes: probe_count(bits, ids),
            seed,
            inserted: 0,
        }
    }

    pub fn insert(&mut self, id: &ChunkId) {
        for b in probes(self.seed, self.bits, self.probes, id) {
            self.words[b / 64] |= 1 << (b % 64);
        }
        self.inserted += 1;
    }

    /// False only if `id` was never inserted.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        probes(self.seed, self.bits, self.probes, id)
            .all(|b| self.words[b / 64] & (1 << (b % 64)) != 0)
    }

    /// Insertions made (references, not distinct ids).
    pub fn insertions(&self) -> u64 {
        self.inserted
    }

    /// Bytes the filter holds.
    pub fn bytes(&self) -> u64 {
        self.bits / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    #[test]
    fn never_misses_an_inserted_id_and_rarely_claims_another() {
        let n = 1_000_000u64;
        let mut s = LiveSet::with_capacity(n);
        assert_eq!(s.bytes(), n * BITS_PER_ID / 8);
        for i in 0..n {
            s.insert(&id(i));
        }
        assert!(
            (0..n).all(|i| s.may_contain(&id(i))),
            "an inserted id was missed"
        );
        let wrong = (n..3 * n).filter(|&i| s.may_contain(&id(i))).count();
        // A blocked filter of 24 bits and 16 probes per id: measured ~6 in 100,000.
        assert!(wrong < 300, "{wrong} of {} absent ids claimed", 2 * n);
    }

    #[test]
    fn small_filters_are_exact_in_practice_and_seeds_differ() {
        let mut a = LiveSet::with_capacity(10);
        let b = LiveSet::with_capacity(10);
        assert_eq!(a.bytes(), MIN_BITS / 8);
        assert_eq!(a.probes, PROBES);
        assert_ne!(a.seed, b.seed);
        // At the size cap, fewer probes: 8 bits per id for 2^30 ids, 6 probes.
        assert_eq!(probe_count(MAX_BITS, 1 << 30), 6);
        assert_eq!(probe_count(24 << 20, 1 << 20), PROBES);
        for i in 0..2_000 {
            a.insert(&id(i));
        }
        let wrong = (2_000..1_002_000)
            .filter(|&i| a.may_contain(&id(i)))
            .count();
        assert_eq!(wrong, 0, "absent ids claimed");
        assert_eq!(a.insertions(), 2_000);
    }
}
