//! The committed allocation bitmap and its region records `r`+n (format2.md §5).
//!
//! The bitmap holds exactly the owned blocks that committed pieces reference (invariant
//! I4): the engine sets bits for new pieces and clears them for freed ones in the group
//! that commits the change, and puts every region it changed in that group's batch. Opening
//! a pool reads D / 4096 records — nothing proportional to data written.
//!
//! Record: `u8 kind` — 0 all free, 1 all used, 2 followed by the region's bitmap (LSB first,
//! ⌈blocks / 8⌉ bytes; the last region may be short).

use std::collections::BTreeSet;

use bitvec::prelude::*;

pub const REGION_BLOCKS: u64 = 4096;

pub struct Regions {
    bits: BitVec<u64, Lsb0>,
    dirty: BTreeSet<u64>,
}

impl Regions {
    pub fn new(blocks: u64) -> Regions {
        Regions {
            bits: bitvec![u64, Lsb0; 0; blocks as usize],
            dirty: BTreeSet::new(),
        }
    }
    pub fn blocks(&self) -> u64 {
        self.bits.len() as u64
    }
    pub fn count(&self) -> u64 {
        self.bits.count_ones() as u64
    }
    pub fn regions(&self) -> u64 {
        self.blocks().div_ceil(REGION_BLOCKS)
    }
    pub fn is_set(&self, pba: u64) -> bool {
        self.bits.get(pba as usize).is_some_and(|b| *b)
    }
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter_ones().map(|i| i as u64)
    }

    fn check_run(&self, pba: u64, len: u64) -> Result<(), String> {
        if pba.checked_add(len).is_none_or(|end| end > self.blocks()) {
            return Err(format!(
                "blocks {pba}+{len} beyond the data device ({} blocks)",
                self.blocks()
            ));
        }
        Ok(())
    }

    /// Marks `pba..pba+len` referenced; a block already referenced is an error (a double
    /// allocation would give one block two owners).
    pub fn set(&mut self, pba: u64, len: u64) -> Result<(), String> {
        self.check_run(pba, len)?;
        let r = &mut self.bits[pba as usize..(pba + len) as usize];
        if let Some(i) = r.first_one() {
            return Err(format!("block {} allocated twice", pba + i as u64));
        }
        r.fill(true);
        self.mark(pba, len);
        Ok(())
    }

    /// Marks `pba..pba+len` free; a block not referenced is an error (a double free).
    pub fn clear(&mut self, pba: u64, len: u64) -> Result<(), String> {
        self.check_run(pba, len)?;
        let r = &mut self.bits[pba as usize..(pba + len) as usize];
        if let Some(i) = r.first_zero() {
            return Err(format!("block {} freed twice", pba + i as u64));
        }
        r.fill(false);
        self.mark(pba, len);
        Ok(())
    }

    fn mark(&mut self, pba: u64, len: u64) {
        if len > 0 {
            for n in pba / REGION_BLOCKS..=(pba + len - 1) / REGION_BLOCKS {
                self.dirty.insert(n);
            }
        }
    }

    /// Regions changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    fn span(&self, n: u64) -> std::ops::Range<usize> {
        let start = (n * REGION_BLOCKS).min(self.blocks());
        let end = ((n + 1) * REGION_BLOCKS).min(self.blocks());
        start as usize..end as usize
    }

    pub fn encode(&self, n: u64) -> Vec<u8> {
        let r = &self.bits[self.span(n)];
        if r.not_any() {
            return vec![0];
        }
        if r.all() {
            return vec![1];
        }
        let mut out = vec![0u8; 1 + r.len().div_ceil(8)];
        out[0] = 2;
        for i in r.iter_ones() {
            out[1 + i / 8] |= 1 << (i % 8);
        }
        out
    }

    pub fn decode(&mut self, n: u64, value: &[u8]) -> Result<(), String> {
        if n >= self.regions() {
            return Err(format!("region {n} beyond the data device"));
        }
        let span = self.span(n);
        let len = span.len();
        let r = &mut self.bits[span];
        match value {
            [0] => r.fill(false),
            [1] => r.fill(true),
            [2, bytes @ ..] if bytes.len() == len.div_ceil(8) => {
                for i in 0..len {
                    r.set(i, bytes[i / 8] & (1 << (i % 8)) != 0);
                }
            }
            _ => return Err(format!("region {n}: bad record of {} bytes", value.len())),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_encode() {
        let mut r = Regions::new(REGION_BLOCKS * 2 + 10);
        r.set(4090, 10).unwrap();
        assert!(r.set(4095, 1).is_err());
        assert_eq!(r.take_dirty(), vec![0, 1]);
        r.set(2 * REGION_BLOCKS, 10).unwrap();
        assert_eq!(r.encode(2), vec![1]);
        let mut s = Regions::new(REGION_BLOCKS * 2 + 10);
        for n in 0..3 {
            s.decode(n, &r.encode(n)).unwrap();
        }
        assert_eq!(
            s.iter_set().collect::<Vec<_>>(),
            r.iter_set().collect::<Vec<_>>()
        );
        r.clear(4090, 10).unwrap();
        assert!(r.clear(4090, 1).is_err());
        assert_eq!(r.encode(0), vec![0]);
        assert!(s.decode(0, &[2, 1]).is_err());
        assert!(s.decode(9, &[0]).is_err());
    }
}
