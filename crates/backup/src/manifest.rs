//! Manifests: what a backed-up snapshot is made of.
//!
//! A manifest is two sealed objects with the same random id: `tables/<id>` (the cell table)
//! and `manifests/<id>` (the header), written in that order; the header is the commit
//! point. The header's `digest` is the BLAKE3 hash of the encoded table, and each chunk id
//! is a keyed hash of the cell's bytes, so header + table + chunks pin down the image byte
//! for byte.
//!
//! Table plaintext (zstd-compressed before sealing): `SBMT`, version u8 = 1, image size
//! u64 LE, chunk size u32 LE, count u64 LE, then `count` entries of cell index u64 LE and
//! chunk id (32 bytes), cell indexes strictly increasing and below the image's cell count.
//! Cells not listed read as zeros.

use serde::{Deserialize, Serialize};

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::repo::{self, Repository};

const T_MAGIC: &[u8; 4] = b"SBMT";
const T_ENTRY: usize = 40;
/// A table never holds more entries than 2^40 bytes / 4 KiB cells; reject more at parse.
const MAX_ENTRIES: u64 = 1 << 28;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupStats {
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Uncompressed bytes of chunks new to the repository.
    pub bytes_new: u64,
    /// Bytes of pack objects uploaded (compressed, sealed, with pack overhead).
    pub bytes_uploaded: u64,
    pub chunks_new: u64,
    /// Cells that matched a chunk already stored.
    pub chunks_reused: u64,
    pub packs: u64,
    pub seconds: f64,
}

/// The sealed header object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Header {
    /// Random id: names this header and its table.
    pub id: String,
    pub volume: String,
    pub snapshot: String,
    /// The snapshot's id in its pool and the pool's uuid (to find incremental bases).
    pub snapshot_id: u64,
    pub pool: String,
    /// When the snapshot was taken and when it was backed up (Unix seconds).
    pub created: u64,
    pub backed_up: u64,
    pub size: u64,
    pub chunk_size: u32,
    /// Cells holding data and their bytes (cells are `chunk_size`, the last may be short).
    pub cells: u64,
    pub stored_bytes: u64,
    /// Hex BLAKE3 of the encoded table.
    pub digest: String,
    /// Manifest this backup was taken incrementally against.
    pub base: Option<String>,
    pub stats: BackupStats,
}

impl Header {
    pub fn name(&self) -> String {
        format!("{}@{}", self.volume, self.snapshot)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub size: u64,
    pub chunk_size: u32,
    /// (cell index, chunk), strictly increasing by cell.
    pub cells: Vec<(u64, ChunkId)>,
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

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(25 + self.cells.len() * T_ENTRY);
        out.extend_from_slice(T_MAGIC);
        out.push(1);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&(self.cells.len() as u64).to_le_bytes());
        for (c, id) in &self.cells {
            out.extend_from_slice(&c.to_le_bytes());
            out.extend_from_slice(&id.0);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Table, String> {
        if b.len() < 25 || &b[..4] != T_MAGIC {
            return Err("not a manifest table".into());
        }
        if b[4] != 1 {
            return Err(format!("table version {}", b[4]));
        }
        let u64at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let size = u64at(5);
        let chunk_size = u32::from_le_bytes([b[13], b[14], b[15], b[16]]);
        crate::config::check_chunk_size(chunk_size).map_err(|e| e.to_string())?;
        let n = u64at(17);
        if n > MAX_ENTRIES || (b.len() - 25) as u64 != n * T_ENTRY as u64 {
            return Err(format!("{n} entries do not match {} bytes", b.len() - 25));
        }
        let t = Table {
            size,
            chunk_size,
            cells: Vec::new(),
        };
        let count = t.cell_count();
        let mut cells = Vec::with_capacity(n as usize);
        let mut prev: Option<u64> = None;
        for e in b[25..].chunks_exact(T_ENTRY) {
            let mut a = [0u8; 8];
            a.copy_from_slice(&e[..8]);
            let c = u64::from_le_bytes(a);
            if c >= count || prev.is_some_and(|p| c <= p) {
                return Err(format!(
                    "cell {c} out of order or beyond the image's {count} cells"
                ));
            }
            prev = Some(c);
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[8..]);
            cells.push((c, ChunkId(id)));
        }
        Ok(Table { cells, ..t })
    }
}

fn header_aad(id: &str) -> Vec<u8> {
    format!("snapblk manifest {id}").into_bytes()
}
fn table_aad(id: &str) -> Vec<u8> {
    format!("snapblk table {id}").into_bytes()
}

/// Writes the table then the header (the commit point).
pub fn write(repo: &Repository, header: &Header, table: &Table) -> Result<()> {
    let enc = table.encode();
    let z = zstd::bulk::compress(&enc, 3).map_err(BackupError::Io)?;
    let keys = repo.keys();
    repo.store().put(
        &repo::table_key(&header.id),
        &keys.seal(&z, &table_aad(&header.id)),
    )?;
    let h =
        serde_json::to_vec(header).map_err(|e| BackupError::invalid("manifest", e.to_string()))?;
    repo.store().put(
        &repo::manifest_key(&header.id),
        &keys.seal(&h, &header_aad(&header.id)),
    )?;
    Ok(())
}

pub fn digest(table: &Table) -> String {
    blake3::hash(&table.encode()).to_hex().to_string()
}

pub fn read_header(repo: &Repository, id: &str) -> Result<Header> {
    let key = repo::manifest_key(id);
    let sealed = repo.store().get(&key)?;
    let plain = repo
        .keys()
        .open(&sealed, &header_aad(id))
        .ok_or_else(|| BackupError::corrupt(&key, "fails authentication (altered or misplaced)"))?;
    let h: Header = serde_json::from_slice(&plain)
        .map_err(|e| BackupError::corrupt(&key, format!("bad header: {e}")))?;
    if h.id != id {
        return Err(BackupError::corrupt(&key, format!("names itself {}", h.id)));
    }
    Ok(h)
}

pub fn read_table(repo: &Repository, h: &Header) -> Result<Table> {
    let key = repo::table_key(&h.id);
    let sealed = repo.store().get(&key)?;
    let z = repo
        .keys()
        .open(&sealed, &table_aad(&h.id))
        .ok_or_else(|| BackupError::corrupt(&key, "fails authentication (altered or misplaced)"))?;
    let limit = 25 + (MAX_ENTRIES as usize) * T_ENTRY;
    let plain = zstd::bulk::decompress(&z, limit)
        .map_err(|e| BackupError::corrupt(&key, format!("does not decompress: {e}")))?;
    if blake3::hash(&plain).to_hex().as_str() != h.digest {
        return Err(BackupError::corrupt(
            &key,
            "does not match the digest in its manifest",
        ));
    }
    let t = Table::decode(&plain).map_err(|d| BackupError::corrupt(&key, d))?;
    if t.size != h.size || t.chunk_size != h.chunk_size {
        return Err(BackupError::corrupt(
            &key,
            "size or chunk size differs from its manifest",
        ));
    }
    Ok(t)
}

/// Every committed manifest header, oldest backup first. Headers that fail to read are
/// returned separately (id, error) so listing still works around damage.
/// Manifest ids whose header could not be read, with why.
pub type Unreadable = Vec<(String, BackupError)>;

pub fn list(repo: &Repository) -> Result<(Vec<Header>, Unreadable)> {
    let ids: Vec<String> = repo
        .store()
        .list(repo::MANIFESTS)?
        .into_iter()
        .filter_map(|o| o.key.strip_prefix(repo::MANIFESTS).map(str::to_string))
        .collect();
    let got = crate::par::map(&ids, crate::index::FETCH_THREADS, |id| {
        Ok::<_, BackupError>(read_header(repo, id))
    })?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (id, r) in ids.into_iter().zip(got) {
        match r {
            Ok(h) => ok.push(h),
            Err(e) => bad.push((id, e)),
        }
    }
    ok.sort_by(|a, b| {
        (a.backed_up, a.created, a.snapshot_id, &a.id).cmp(&(
            b.backed_up,
            b.created,
            b.snapshot_id,
            &b.id,
        ))
    });
    Ok((ok, bad))
}

/// Finds the newest backup of `vol@snap` (or the manifest whose id is `name`).
pub fn find<'a>(headers: &'a [Header], name: &str) -> Option<&'a Header> {
    headers
        .iter()
        .rev()
        .find(|h| h.name() == name || h.id == name)
}

/// Deletes a manifest: header first (it disappears from listings), then its table.
pub fn delete(repo: &Repository, id: &str) -> Result<()> {
    repo.store().delete(&repo::manifest_key(id))?;
    repo.store().delete(&repo::table_key(id))?;
    Ok(())
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
}
