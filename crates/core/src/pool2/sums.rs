//! Checksum blocks on the pool's data device (format2.md §9b): loaded through an LRU
//! ([`SumCache`]) by readers and the committer, each checked against the CRC32C its
//! references carry. A load is one 4 KiB read; loads of different blocks run concurrently
//! (the cache lock is never held across the read).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::device::{AlignedBuf, DataDevice, ReadSeg, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::error::{Error, Result};
use crate::v2::piece::SumRef;
use crate::v2::sums::{self, SumBlock, SumBlocks, SumCache};

/// Checksum blocks cached: 4096 × 4 KiB = 16 MiB of RAM for the CRCs of 16 GiB of data.
pub const SUM_CACHE_BLOCKS: usize = 4096;

pub struct DeviceSums {
    dev: Arc<dyn DataDevice>,
    data_start: u64,
    blocks: u64,
    cache: SumCache,
    loads: AtomicU64,
}

impl DeviceSums {
    pub fn new(dev: Arc<dyn DataDevice>, data_start: u64, blocks: u64) -> DeviceSums {
        DeviceSums {
            dev,
            data_start,
            blocks,
            cache: SumCache::new(SUM_CACHE_BLOCKS),
            loads: AtomicU64::new(0),
        }
    }
    /// Remembers a block just written, so the first reads after it need no device read.
    pub fn written(&self, r: SumRef, b: Arc<SumBlock>) {
        self.cache.put(r, b);
    }
    /// Device reads of checksum blocks so far (cache misses).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }
}

impl DeviceSums {
    /// Block `r` read from the media, not the cache (scrub).
    pub fn read_fresh(&self, r: SumRef) -> Result<Arc<SumBlock>> {
        crate::meta::bulk_reads(|| self.read(r)).map(Arc::new)
    }

    fn read(&self, r: SumRef) -> Result<SumBlock> {
        {
            if r.at >= self.blocks {
                return Err(Error::Corrupt(format!(
                    "checksum block {} beyond the data device ({} blocks)",
                    r.at, self.blocks
                )));
            }
            self.loads.fetch_add(1, Ordering::Relaxed);
            let mut buf = AlignedBuf::zeroed(BLOCK_SIZE);
            let offset = self
                .data_start
                .saturating_add(r.at.saturating_mul(BLOCK_SIZE_U64));
            self.dev
                .read(&mut [ReadSeg {
                    offset,
                    buf: &mut buf,
                }])
                .map_err(|e| Error::device(format!("reading checksum block {}", r.at), e))?;
            sums::decode(&buf, r)
        }
    }
}

impl SumBlocks for DeviceSums {
    fn load(&self, r: SumRef) -> Result<Arc<SumBlock>> {
        self.cache.get_or_load(r, || self.read(r))
    }
    fn with_block(&self, r: SumRef, f: &mut dyn FnMut(&SumBlock)) -> Result<()> {
        if !self.cache.with(r, f) {
            f(&*self.load(r)?);
        }
        Ok(())
    }
}
