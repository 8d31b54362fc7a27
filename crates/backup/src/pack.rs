//! Packs: many sealed chunks in one object, to keep object counts and S3 requests low.
//!
//! Pack layout: `chunk blob*`, then the sealed pack index, then the index's length (u32 LE)
//! and the magic `SBPK`. The same sealed index is also stored as `index/<pack id>`, so a
//! repository's chunk map loads without reading packs, and can be rebuilt from packs
//! alone. A pack's id is the BLAKE3 hash of its blob section (everything before the
//! index), and the index is sealed with its pack's id in the associated data, so an index
//! moved to another pack's name does not open (format 2). Packs written by format 1 are
//! named by the hash of all their bytes and their trailer index is sealed with a constant
//! associated data; `repo upgrade` re-seals their `index/` objects, and only repairing a
//! format-1 pack from its trailer still accepts the constant.
//!
//! Index plaintext: `SBIX`, version u8 = 1, count u32 LE, then per chunk: id (32 bytes),
//! offset u32 LE, length u32 LE (of the sealed blob within the pack).

use crate::config::{MAX_CHUNK_SIZE, MAX_PACK_SIZE};
use crate::crypto::{ChunkId, Keys};

/// The associated data of format-1 pack indexes (not bound to a pack).
pub const LEGACY_INDEX_AAD: &[u8] = b"snapblk pack index";

/// The associated data of the index of pack `id`.
pub fn index_aad(id: &str) -> Vec<u8> {
    format!("snapblk pack index {id}").into_bytes()
}
pub(crate) const MAGIC: &[u8; 4] = b"SBPK";
const IX_MAGIC: &[u8; 4] = b"SBIX";
const ENTRY: usize = 40;
/// Largest pack (or pack index) object read: a pack closes once it reaches the configured
/// pack size, so it holds at most that plus one chunk blob, then its index, whose entries
/// (40 bytes each) cannot outnumber the blobs (each at least as long as an entry).
pub const MAX_PACK_OBJECT: u64 = 2 * (MAX_PACK_SIZE as u64 + MAX_CHUNK_SIZE as u64 + 4096) + 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub offset: u32,
    pub len: u32,
}

pub fn encode_index(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + entries.len() * ENTRY);
    out.extend_from_slice(IX_MAGIC);
    out.push(1);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    out
}

/// Parses an index plaintext; checks every entry lies within a pack of `pack_len` bytes
/// (when known).
pub fn decode_index(b: &[u8], pack_len: Option<u64>) -> Result<Vec<PackEntry>, String> {
    if b.len() < 9 || &b[..4] != IX_MAGIC {
        return Err("not a pack index".into());
    }
    if b[4] != 1 {
        return Err(format!("pack index version {}", b[4]));
    }
    let n = u32::from_le_bytes([b[5], b[6], b[7], b[8]]) as usize;
    let body = &b[9..];
    if body.len() != n.checked_mul(ENTRY).ok_or("entry count overflows")? {
        return Err(format!(
            "{n} entries need {} bytes, found {}",
            n * ENTRY,
            body.len()
        ));
    }
    let mut out = Vec::with_capacity(n);
    for e in body.chunks_exact(ENTRY) {
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[..32]);
        let offset = u32::from_le_bytes([e[32], e[33], e[34], e[35]]);
        let len = u32::from_le_bytes([e[36], e[37], e[38], e[39]]);
        if let Some(pl) = pack_len {
            if u64::from(offset) + u64::from(len) > pl {
                return Err(format!(
                    "entry {} ends past the pack's {pl} bytes",
                    hex::encode(id)
                ));
            }
        }
        out.push(PackEntry {
            id: ChunkId(id),
            offset,
            len,
        });
    }
    Ok(out)
}

/// Accumulates sealed chunks into one pack.
#[derive(Default)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A finished pack, ready to upload.
pub struct Pack {
    pub id: String,
    pub bytes: Vec<u8>,
    /// The sealed index (stored again as `index/<id>`).
    pub index: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn add(&mut self, id: ChunkId, sealed: &[u8]) {
        self.entries.push(PackEntry {
            id,
            offset: self.buf.len() as u32,
            len: sealed.len() as u32,
        });
        self.buf.extend_from_slice(sealed);
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn finish(self, keys: &Keys) -> Pack {
        let id = blake3::hash(&self.buf).to_hex().to_string();
        let index = keys.seal(&encode_index(&self.entries), &index_aad(&id));
        let mut bytes = self.buf;
        bytes.extend_from_slice(&index);
        bytes.extend_from_slice(&(index.len() as u32).to_le_bytes());
        bytes.extend_from_slice(MAGIC);
        Pack {
            id,
            bytes,
            index,
            entries: self.entries,
        }
    }
}

/// The sealed index stored at the end of a whole pack's bytes.
pub fn trailer(pack: &[u8]) -> Result<&[u8], String> {
    let n = pack.len();
    if n < 8 || &pack[n - 4..] != MAGIC {
        return Err("no pack trailer".into());
    }
    let il = u32::from_le_bytes([pack[n - 8], pack[n - 7], pack[n - 6], pack[n - 5]]) as usize;
    let start = (n - 8)
        .checked_sub(il)
        .ok_or("index length exceeds the pack")?;
    Ok(&pack[start..n - 8])
}

/// Whether `id` names `pack`'s bytes: the hash of its blob section (format 2) or of all
/// of it (format 1).
pub fn names(id: &str, pack: &[u8]) -> bool {
    let blobs = trailer(pack).map_or(pack.len(), |t| pack.len() - 8 - t.len());
    blake3::hash(&pack[..blobs]).to_hex().as_str() == id
        || blake3::hash(pack).to_hex().as_str() == id
}

/// Reads the index from the whole bytes of pack `id` (to rebuild a lost `index/` object):
/// the trailer must open under the pack's name, or be a format-1 trailer of a pack that
/// hashes to `id`.
pub fn index_from_pack(keys: &Keys, id: &str, pack: &[u8]) -> Result<Vec<PackEntry>, String> {
    let sealed = trailer(pack)?;
    let start = pack.len() - 8 - sealed.len();
    let plain = keys
        .open(sealed, &index_aad(id))
        .or_else(|| {
            (blake3::hash(pack).to_hex().as_str() == id)
                .then(|| keys.open(sealed, LEGACY_INDEX_AAD))
                .flatten()
        })
        .ok_or("pack index fails authentication (altered, or not this pack's)")?;
    decode_index(&plain, Some(start as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random_bytes;

    #[test]
    fn pack_round_trip_and_trailer() {
        let k = Keys::from_master(&random_bytes());
        let mut b = PackBuilder::default();
        for i in 0..5u8 {
            let (id, sealed) = crate::chunk::encode(&k, 1, &[i; 4096]);
            b.add(id, &sealed);
        }
        let p = b.finish(&k);
        assert!(names(&p.id, &p.bytes));
        let from_trailer = index_from_pack(&k, &p.id, &p.bytes).unwrap();
        assert_eq!(from_trailer, p.entries);
        assert!(
            index_from_pack(&k, &"0".repeat(64), &p.bytes).is_err(),
            "a pack's index opens only under its own name"
        );
        assert!(k.open(&p.index, LEGACY_INDEX_AAD).is_none());
        let sep = decode_index(
            &k.open(&p.index, &index_aad(&p.id)).unwrap(),
            Some(p.bytes.len() as u64),
        )
        .unwrap();
        assert_eq!(sep, p.entries);
        for e in &p.entries {
            let blob = &p.bytes[e.offset as usize..(e.offset + e.len) as usize];
            crate::chunk::decode(&k, &e.id, blob, 4096).unwrap();
        }
        assert!(decode_index(b"SBIX\x01\xff\xff\xff\xff", None).is_err());
    }
}
