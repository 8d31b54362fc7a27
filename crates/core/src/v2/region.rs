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

pub const REGION_BLOCKS: u64 = 4096;

/// The bitmap as plain words (bit `i` of word `w` is block `64 w + i`): set, clear, encode
/// and decode work a word at a time — they run for every region a group commit touches.
pub struct Regions {
    words: Vec<u64>,
    blocks: u64,
    dirty: BTreeSet<u64>,
}

/// Calls `f(word index, mask)` for the words covering blocks `[pba, pba + len)`.
fn spans(pba: u64, len: u64, mut f: impl FnMut(usize, u64) -> Result<(), u64>) -> Result<(), u64> {
    let mut b = pba;
    let end = pba + len;
    while b < end {
        let w = (b / 64) as usize;
        let lo = b % 64;
        let n = (end - b).min(64 - lo);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << lo
        };
        f(w, mask)?;
        b += n;
    }
    Ok(())
}

impl Regions {
    pub fn new(blocks: u64) -> Regions {
        Regions {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            dirty: BTreeSet::new(),
        }
    }
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    pub fn regions(&self) -> u64 {
        self.blocks.div_ceil(REGION_BLOCKS)
    }
    pub fn is_set(&self, pba: u64) -> bool {
        pba < self.blocks && self.words[(pba / 64) as usize] & (1 << (pba % 64)) != 0
    }
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros() as u64;
                    w &= w - 1;
                    i as u64 * 64 + b
                })
            })
        })
    }

    fn check_run(&self, pba: u64, len: u64) -> Result<(), String> {
        if pba.checked_add(len).is_none_or(|end| end > self.blocks) {
            return Err(format!(
                "blocks {pba}+{len} beyond the data device ({} blocks)",
                self.blocks
            ));
        }
        Ok(())
    }

    /// Marks `pba..pba+len` referenced; a block already referenced is an error (a double
    /// allocation would give one block two owners).
    pub fn set(&mut self, pba: u64, len: u64) -> Result<(), String> {
        self.check_run(pba, len)?;
        let words = &self.words;
        spans(pba, len, |w, m| match words[w] & m {
            0 => Ok(()),
            hit => Err(w as u64 * 64 + u64::from(hit.trailing_zeros())),
        })
        .map_err(|b| format!("block {b} allocated twice"))?;
        let _ = spans(pba, len, |w, m| {
            self.words[w] |= m;
            Ok(())
        });
        self.mark(pba, len);
        Ok(())
    }

    /// Marks `pba..pba+len` free; a block not referenced is an error (a double free).
    pub fn clear(&mut self, pba: u64, len: u64) -> Result<(), String> {
        self.check_run(pba, len)?;
        let words = &self.words;
        spans(pba, len, |w, m| match !words[w] & m {
            0 => Ok(()),
            miss => Err(w as u64 * 64 + u64::from(miss.trailing_zeros())),
        })
        .map_err(|b| format!("block {b} freed twice"))?;
        let _ = spans(pba, len, |w, m| {
            self.words[w] &= !m;
            Ok(())
        });
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

    /// (first word, words, blocks) of region `n`.
    fn span(&self, n: u64) -> (usize, usize, u64) {
        let start = (n * REGION_BLOCKS).min(self.blocks);
        let end = ((n + 1) * REGION_BLOCKS).min(self.blocks);
        let w0 = (start / 64) as usize;
        ((w0), (end - start).div_ceil(64) as usize, end - start)
    }

    pub fn encode(&self, n: u64) -> Vec<u8> {
        let (w0, nw, len) = self.span(n);
        let words = &self.words[w0..w0 + nw];
        if words.iter().all(|w| *w == 0) {
            return vec![0];
        }
        let full = (0..nw).all(|i| {
            let bits = (len - i as u64 * 64).min(64);
            let want = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            words[i] == want
        });
        if full {
            return vec![1];
        }
        let mut out = Vec::with_capacity(1 + nw * 8);
        out.push(2);
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(1 + len.div_ceil(8) as usize);
        out
    }

    pub fn decode(&mut self, n: u64, value: &[u8]) -> Result<(), String> {
        if n >= self.regions() {
            return Err(format!("region {n} beyond the data device"));
        }
        let (w0, nw, len) = self.span(n);
        let mut bytes = vec![0u8; nw * 8];
        match value {
            [0] => {}
            [1] => {
                for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
                    let bits = (len - i as u64 * 64).min(64);
                    let w = if bits == 64 {
                        u64::MAX
                    } else {
                        (1u64 << bits) - 1
                    };
                    chunk.copy_from_slice(&w.to_le_bytes());
                }
            }
            [2, rest @ ..] if rest.len() as u64 == len.div_ceil(8) => {
                bytes[..rest.len()].copy_from_slice(rest);
            }
            _ => return Err(format!("region {n}: bad record of {} bytes", value.len())),
        }
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let mut w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let bits = (len - i as u64 * 64).min(64);
            if bits < 64 {
                w &= (1u64 << bits) - 1;
            }
            self.words[w0 + i] = w;
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
