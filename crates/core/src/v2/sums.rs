//! Checksum blocks (format2.md §9b): the CRC32Cs of consolidated data blocks, 1024 to a
//! 4 KiB block on the data device, so that the metadata store holds a 12-byte reference
//! per piece instead of 4 bytes per block.
//!
//! Invariants: a checksum block is written once, durably, before the batch that first
//! names it commits, and never rewritten; a reference carries the CRC32C of the whole
//! block, checked on every load, so a torn, stale or misdirected block is an error, never a
//! wrong checksum. Owners count: `b`+block holds how many owned blocks (in live pages and
//! dead records) name it; the block is freed with its count at 0 (I4 includes it while
//! counted).
//!
//! Readers resolve references through [`SumBlocks`], which is `Sync`: any reader thread and
//! the committer (copy-up) load blocks concurrently.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, RwLock};

use lru::LruCache;

use super::piece::{Sum, SumRef, SUM_SLOTS};
use crate::error::{Error, Result};

/// The CRCs of one checksum block, slot by slot.
pub type SumBlock = [u32; SUM_SLOTS];

/// Loads checksum blocks by reference.
pub trait SumBlocks: Send + Sync {
    /// The block `r` names, checked against `r.crc`.
    fn load(&self, r: SumRef) -> Result<Arc<SumBlock>>;
    /// Calls `f` with the block `r` names: what reads use (a cache may answer without
    /// handing out a reference).
    fn with_block(&self, r: SumRef, f: &mut dyn FnMut(&SumBlock)) -> Result<()> {
        let b = self.load(r)?;
        f(&b);
        Ok(())
    }
}

/// For readers with no data device (offline tools that never meet consolidated pieces):
/// a reference is an error naming the block.
pub struct NoSumBlocks;

impl SumBlocks for NoSumBlocks {
    fn load(&self, r: SumRef) -> Result<Arc<SumBlock>> {
        Err(Error::Corrupt(format!(
            "checksum block {} is referenced, but this reader has no data device",
            r.at
        )))
    }
}

/// The 4 KiB image of a checksum block (little-endian CRCs).
pub fn encode(sums: &SumBlock) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * SUM_SLOTS);
    for c in sums {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out
}

/// The CRCs of a 4 KiB block read from `r.at`, if its CRC32C is `r.crc`.
pub fn decode(buf: &[u8], r: SumRef) -> Result<SumBlock> {
    if buf.len() != 4 * SUM_SLOTS {
        return Err(Error::Corrupt(format!(
            "checksum block {}: {} bytes",
            r.at,
            buf.len()
        )));
    }
    let got = crc32c::crc32c(buf);
    if got != r.crc {
        return Err(Error::Corrupt(format!(
            "checksum block {}: crc32c {got:08x}, its references say {:08x}",
            r.at, r.crc
        )));
    }
    let mut out = [0u32; SUM_SLOTS];
    for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
        *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(out)
}

/// The CRC32C of a checksum block's image: what references to it carry.
pub fn block_crc(sums: &SumBlock) -> u32 {
    crc32c::crc32c(&encode(sums))
}

/// The CRC `sum` stands for; `block` is the loaded block of a `Sum::Slot`.
pub fn resolve(sum: Sum, block: Option<&SumBlock>) -> Result<u32> {
    match sum {
        Sum::Crc(c) => Ok(c),
        Sum::Slot(r) => block
            .and_then(|b| b.get(usize::from(r.slot)).copied())
            .ok_or_else(|| {
                Error::Corrupt(format!(
                    "checksum block {} slot {} not loaded",
                    r.at, r.slot
                ))
            }),
    }
}

/// Shards of [`SumCache`]: readers of different blocks take different locks.
const SHARDS: usize = 16;

type Shard = RwLock<LruCache<(u64, u32), Arc<SumBlock>>>;

/// Recently loaded checksum blocks, keyed by reference (block and CRC): 4 KiB of RAM holds
/// the checksums of 4 MiB of data. Readers share a shard's read lock (a hit does not
/// reorder the LRU: eviction is by insertion order, promoted only by a reload); a miss
/// loads outside every lock.
pub struct SumCache {
    shards: Box<[Shard]>,
}

impl SumCache {
    pub fn new(blocks: usize) -> SumCache {
        let per = NonZeroUsize::new(blocks.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        SumCache {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(LruCache::new(per)))
                .collect(),
        }
    }
    fn shard(&self, r: SumRef) -> &Shard {
        &self.shards[(r.at % SHARDS as u64) as usize]
    }
    /// Calls `f` with the cached block, if it is cached.
    pub fn with(&self, r: SumRef, f: &mut dyn FnMut(&SumBlock)) -> bool {
        let g = self.shard(r).read().unwrap_or_else(|p| p.into_inner());
        match g.peek(&(r.at, r.crc)) {
            Some(b) => {
                f(b);
                true
            }
            None => false,
        }
    }
    pub fn get(&self, r: SumRef) -> Option<Arc<SumBlock>> {
        let g = self.shard(r).read().unwrap_or_else(|p| p.into_inner());
        g.peek(&(r.at, r.crc)).cloned()
    }
    pub fn put(&self, r: SumRef, b: Arc<SumBlock>) {
        let mut g = self.shard(r).write().unwrap_or_else(|p| p.into_inner());
        g.put((r.at, r.crc), b);
    }
    /// The cached block, else `load`'s (then cached).
    pub fn get_or_load(
        &self,
        r: SumRef,
        load: impl FnOnce() -> Result<SumBlock>,
    ) -> Result<Arc<SumBlock>> {
        if let Some(b) = self.get(r) {
            return Ok(b);
        }
        let b = Arc::new(load()?);
        self.put(r, Arc::clone(&b));
        Ok(b)
    }
}

/// Checksum blocks held in memory: the pure engine's tests, and blocks not yet on a device.
#[derive(Default)]
pub struct MemSumBlocks {
    blocks: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
}

impl MemSumBlocks {
    /// Stores the image of block `at` (what a device write would do).
    pub fn write(&self, at: u64, image: Vec<u8>) {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(at, image);
    }
}

impl SumBlocks for MemSumBlocks {
    fn load(&self, r: SumRef) -> Result<Arc<SumBlock>> {
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let image = blocks
            .get(&r.at)
            .ok_or_else(|| Error::Corrupt(format!("checksum block {} was never written", r.at)))?;
        Ok(Arc::new(decode(image, r)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_loads_only_under_its_own_crc() {
        let mut sums = [0u32; SUM_SLOTS];
        sums[7] = 0xabcd;
        let r = SumRef {
            at: 9,
            slot: 7,
            crc: block_crc(&sums),
        };
        let mem = MemSumBlocks::default();
        assert!(mem.load(r).is_err(), "never written");
        mem.write(9, encode(&sums));
        let b = mem.load(r).unwrap();
        assert_eq!(resolve(Sum::Slot(r), Some(&b)).unwrap(), 0xabcd);
        assert_eq!(resolve(Sum::Crc(5), None).unwrap(), 5);
        assert!(resolve(Sum::Slot(r), None).is_err());
        // A stale or torn image is refused, not trusted.
        let mut torn = encode(&sums);
        torn[100] ^= 1;
        mem.write(9, torn);
        assert!(mem.load(r).is_err());
        assert!(NoSumBlocks.load(r).is_err());
        assert!(decode(&[0u8; 10], r).is_err());
    }
}
