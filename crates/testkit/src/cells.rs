//! What a block may read as after a simulated power cut, for the power-loss tests.
//!
//! Every written block holds `pattern(tag)` for a tag unique to that write (0: zeros). A
//! [`Cell`] tracks, per block, the value the last flush (or FUA write) guaranteed and every
//! value written since; [`observe`] reads a block and names the tag it holds, accepting a
//! failed read (EIO from its checksum) only where the cut really lost the data block.

use std::collections::BTreeSet;

use crate::model::ModelPool;
use snapblk_core::device::BLOCK_SIZE;

const BS: u64 = BLOCK_SIZE as u64;

/// A block that fails to read (EIO): an unflushed write that did not fully reach the disk
/// before the cut, caught by its checksum. It stays so until it is written again.
pub const BAD: u64 = u64::MAX;

/// The contents written for `tag` (0: zeros). Tags are unique per written block.
pub fn pattern(tag: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0; BLOCK_SIZE];
    }
    let mut v = Vec::with_capacity(BLOCK_SIZE);
    let mut x = tag;
    while v.len() < BLOCK_SIZE {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.extend_from_slice(&(x ^ tag).to_le_bytes());
    }
    v
}

/// What a block may read as: `allowed` holds the value guaranteed by the last flush (or FUA)
/// and every value written since; `latest` is the last one.
#[derive(Clone, Debug)]
pub struct Cell {
    pub latest: u64,
    pub allowed: Vec<u64>,
}

impl Cell {
    pub fn exact(tag: u64) -> Cell {
        Cell {
            latest: tag,
            allowed: vec![tag],
        }
    }
    pub fn set(&mut self, tag: u64, durable: bool) {
        self.latest = tag;
        if durable {
            self.allowed = vec![tag];
        } else if !self.allowed.contains(&tag) {
            self.allowed.push(tag);
        }
    }
    pub fn settle(&mut self) {
        *self = Cell::exact(self.latest);
    }
}

pub fn read_block<P: ModelPool + ?Sized>(
    pool: &P,
    target: &str,
    b: u64,
) -> Result<Vec<u8>, String> {
    let t = pool.resolve_target(target).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; BLOCK_SIZE];
    pool.read(&t, b * BS, &mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// What one block reads as: the tag whose pattern it holds, or `BAD` when the read fails.
/// A failed read is accepted only for a block with unflushed writes whose data block is one
/// the cut really dropped or tore (`lost`): EIO anywhere else means flushed data was
/// overwritten, e.g. by a block reused before the metadata freeing it was durable.
pub fn observe<P: ModelPool + ?Sized>(
    pool: &P,
    target: &str,
    b: u64,
    allowed: &[u64],
    lost: &BTreeSet<usize>,
) -> Result<u64, String> {
    match read_block(pool, target, b) {
        Ok(data) => allowed
            .iter()
            .copied()
            .find(|&t| t != BAD && pattern(t) == data)
            .ok_or_else(|| {
                format!("{target} block {b}: unexpected contents (allowed {allowed:?})")
            }),
        Err(e) => {
            let t = pool.resolve_target(target).map_err(|e| e.to_string())?;
            let at = pool.block_location(&t, b).map_err(|e| e.to_string())?;
            let unflushed = allowed.len() > 1 || allowed.contains(&BAD);
            match at {
                Some(off) if unflushed && lost.contains(&(off as usize)) => Ok(BAD),
                _ => Err(format!(
                    "{target} block {b}: unreadable (allowed {allowed:?}, data at {at:?}, not a \
                     block the power cut lost): {e}"
                )),
            }
        }
    }
}
