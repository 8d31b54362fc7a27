//! A manifest's cell table and its encoding.
//!
//! Plaintext (zstd-compressed before sealing): `SBMT`, version u8 = 1, image size u64 LE,
//! chunk size u32 LE, count u64 LE, then `count` entries of cell index u64 LE and chunk id
//! (32 bytes), cell indexes strictly increasing and below the image's cell count. Cells not
//! listed read as zeros.
//!
//! Decoding is streaming and bounded: one parser ([`TableReader`]) reads entries from any
//! `Read` (a zstd decoder over the opened object, or a byte slice) and never sizes an
//! allocation by a count it has read; memory grows with the entries actually decoded.
//! Writing refuses a table the reader would refuse ([`MAX_ENTRIES`]), so every table written
//! can be read back.

use std::io::Read;

use crate::crypto::ChunkId;

pub(crate) const T_MAGIC: &[u8; 4] = b"SBMT";
/// Bytes of the fixed part before the entries.
pub const T_HEAD: u64 = 25;
/// Bytes of one entry.
pub const T_ENTRY: u64 = 40;
/// Most entries a table may hold: 2^40 bytes of image in 4 KiB cells. One limit for
/// writers and readers.
pub const MAX_ENTRIES: u64 = 1 << 28;
/// Entries reserved at a time while decoding (a count read from stored bytes never sizes
/// an allocation beyond this).
const RESERVE_STEP: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub size: u64,
    pub chunk_size: u32,
    /// (cell index, chunk), strictly increasing by cell.
    pub cells: Vec<(u64, ChunkId)>,
}

/// The fixed part of an encoded table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableHead {
    pub size: u64,
    pub chunk_size: u32,
    pub count: u64,
}

impl Table {
    pub fn cell_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size))
    }

    /// Bytes of cell `cell` (the last cell may be short).
    pub fn cell_len(&self, cell: u64) -> u64 {
        let cs = u64::from(self.chunk_size);
        (self.size - cell * cs).min(cs)
    }

    /// Whether `data`, the verified chunk `id`, fits cell `cell` (its length: the last
    /// cell may be short); else why not.
    pub fn check_cell(&self, cell: u64, id: &ChunkId, data: &[u8]) -> Result<(), String> {
        let len = self.cell_len(cell);
        if data.len() as u64 == len {
            return Ok(());
        }
        Err(format!(
            "cell {cell} is {len} bytes but chunk {} holds {}",
            id.hex(),
            data.len()
        ))
    }

    /// Bytes of the encoded table.
    pub fn encoded_len(count: u64) -> u64 {
        T_HEAD + count * T_ENTRY
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Table::encoded_len(self.cells.len() as u64) as usize);
        self.write_to(&mut out)
            .expect("writing into a Vec does not fail");
        out
    }

    /// Writes the encoding to `w` a buffer at a time (hashing or compressing a table
    /// needs no second copy of it).
    pub fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut head = Vec::with_capacity(T_HEAD as usize);
        head.extend_from_slice(T_MAGIC);
        head.push(1);
        head.extend_from_slice(&self.size.to_le_bytes());
        head.extend_from_slice(&self.chunk_size.to_le_bytes());
        head.extend_from_slice(&(self.cells.len() as u64).to_le_bytes());
        w.write_all(&head)?;
        let mut buf = Vec::with_capacity(1024 * T_ENTRY as usize);
        for part in self.cells.chunks(1024) {
            buf.clear();
            for (c, id) in part {
                buf.extend_from_slice(&c.to_le_bytes());
                buf.extend_from_slice(&id.0);
            }
            w.write_all(&buf)?;
        }
        Ok(())
    }

    /// Decodes a whole table held in memory (the same parser as streaming reads).
    pub fn decode(b: &[u8]) -> Result<Table, String> {
        let mut r = TableReader::new(b)?;
        let t = r.read_all()?;
        r.finish()?;
        Ok(t)
    }
}

/// Streams a table out of `R`: the head first, then entries checked one by one.
pub struct TableReader<R: Read> {
    inner: R,
    pub head: TableHead,
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<(), String> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => format!("ends inside {what}"),
        _ => format!("reading {what}: {e}"),
    })
}

impl<R: Read> TableReader<R> {
    /// Reads and checks the fixed part.
    pub fn new(mut inner: R) -> Result<Self, String> {
        let mut h = [0u8; T_HEAD as usize];
        read_exact_or(&mut inner, &mut h, "the table header").map_err(|e| {
            if e.starts_with("ends") {
                "not a manifest table (too short)".to_string()
            } else {
                e
            }
        })?;
        if &h[..4] != T_MAGIC {
            return Err("not a manifest table".into());
        }
        if h[4] != 1 {
            return Err(format!("table version {}", h[4]));
        }
        let u64at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let size = u64at(5);
        let chunk_size = u32::from_le_bytes([h[13], h[14], h[15], h[16]]);
        crate::config::check_chunk_size(chunk_size).map_err(|e| e.to_string())?;
        let count = u64at(17);
        let cells = size.div_ceil(u64::from(chunk_size));
        if count > MAX_ENTRIES || count > cells {
            return Err(format!(
                "{count} entries for an image of {cells} cells (at most {MAX_ENTRIES})"
            ));
        }
        Ok(TableReader {
            inner,
            head: TableHead {
                size,
                chunk_size,
                count,
            },
        })
    }

    /// Reads every entry, checking order and range.
    pub fn read_all(&mut self) -> Result<Table, String> {
        let count = self.head.count;
        let cells_in_image = self.head.size.div_ceil(u64::from(self.head.chunk_size));
        let mut cells: Vec<(u64, ChunkId)> = Vec::new();
        let mut prev: Option<u64> = None;
        let mut e = [0u8; T_ENTRY as usize];
        for i in 0..count {
            if cells.len() == cells.capacity() {
                let left = usize::try_from(count - i).unwrap_or(usize::MAX);
                cells.reserve_exact(cells.len().max(RESERVE_STEP).min(left));
            }
            read_exact_or(&mut self.inner, &mut e, &format!("entry {i} of {count}"))?;
            let mut a = [0u8; 8];
            a.copy_from_slice(&e[..8]);
            let c = u64::from_le_bytes(a);
            if c >= cells_in_image || prev.is_some_and(|p| c <= p) {
                return Err(format!(
                    "cell {c} out of order or beyond the image's {cells_in_image} cells"
                ));
            }
            prev = Some(c);
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[8..]);
            cells.push((c, ChunkId(id)));
        }
        Ok(Table {
            size: self.head.size,
            chunk_size: self.head.chunk_size,
            cells,
        })
    }

    /// Checks nothing follows the last entry; returns the reader.
    pub fn finish(mut self) -> Result<R, String> {
        let mut one = [0u8; 1];
        loop {
            match self.inner.read(&mut one) {
                Ok(0) => return Ok(self.inner),
                Ok(_) => {
                    return Err(format!(
                        "bytes follow the {} entries it declares",
                        self.head.count
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading past the entries: {e}")),
            }
        }
    }
}

/// Passes reads through while hashing them (BLAKE3 of the table as it streams).
pub struct Hashing<R> {
    pub inner: R,
    pub hasher: blake3::Hasher,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn table_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Table::decode(&b);
        }

        #[test]
        fn table_round_trip(cells in proptest::collection::btree_set(0u64..1000, 0..50)) {
            let t = Table {
                size: 1000 * 65536 - 4096,
                chunk_size: 65536,
                cells: cells.into_iter().map(|c| (c, ChunkId([c as u8; 32]))).collect(),
            };
            prop_assert_eq!(Table::decode(&t.encode()).unwrap(), t);
        }
    }

    #[test]
    fn a_huge_declared_count_allocates_nothing_up_front() {
        // 2^28 entries declared (a 1 TiB image of 4 KiB cells), 2 present: the reader fails
        // at the third entry without reserving 10 GiB first.
        let t = Table {
            size: 1 << 40,
            chunk_size: 4096,
            cells: vec![(0, ChunkId([1; 32])), (5, ChunkId([2; 32]))],
        };
        let mut b = t.encode();
        b[17..25].copy_from_slice(&MAX_ENTRIES.to_le_bytes());
        let err = Table::decode(&b).unwrap_err();
        assert!(err.contains("ends inside entry 2"), "{err}");
        b[17..25].copy_from_slice(&(MAX_ENTRIES + 1).to_le_bytes());
        assert!(Table::decode(&b).unwrap_err().contains("at most"));
    }

    #[test]
    fn trailing_bytes_and_disorder_are_refused() {
        let t = Table {
            size: 10 * 4096,
            chunk_size: 4096,
            cells: vec![(1, ChunkId([1; 32])), (3, ChunkId([2; 32]))],
        };
        let mut b = t.encode();
        b.push(0);
        assert!(Table::decode(&b).unwrap_err().contains("follow"));
        let mut b = t.encode();
        b[25 + 40..25 + 48].copy_from_slice(&1u64.to_le_bytes());
        assert!(Table::decode(&b).unwrap_err().contains("out of order"));
    }
}
