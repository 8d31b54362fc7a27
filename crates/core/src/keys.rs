//! Key schema and record encodings of the metadata store (docs/design.md §3).
//!
//! Every decoder returns `Error::Corrupt` naming what was wrong; none panics on bad bytes.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Error, Result};

pub const FORMAT_VERSION: u32 = 1;

pub const K_SUPER: u8 = b'S';
pub const K_NEXT_ID: u8 = b'C';
pub const K_VOLUME: u8 = b'V';
pub const K_NAME: u8 = b'N';
pub const K_SNAPSHOT: u8 = b'P';
pub const K_LAYER: u8 = b'L';
pub const K_MAP: u8 = b'M';

pub type LayerId = u64;
pub type VolId = u64;

pub fn super_key() -> Vec<u8> {
    vec![K_SUPER]
}
pub fn next_id_key() -> Vec<u8> {
    vec![K_NEXT_ID]
}
fn prefixed_u64(p: u8, v: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(p);
    k.extend_from_slice(&v.to_be_bytes());
    k
}
pub fn volume_key(id: VolId) -> Vec<u8> {
    prefixed_u64(K_VOLUME, id)
}
pub fn name_key(name: &str) -> Vec<u8> {
    let mut k = vec![K_NAME];
    k.extend_from_slice(name.as_bytes());
    k
}
pub fn snapshot_key(vol: VolId, snap: &str) -> Vec<u8> {
    let mut k = prefixed_u64(K_SNAPSHOT, vol);
    k.extend_from_slice(snap.as_bytes());
    k
}
pub fn layer_key(id: LayerId) -> Vec<u8> {
    prefixed_u64(K_LAYER, id)
}
pub fn map_key(layer: LayerId, lba: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = K_MAP;
    k[1..9].copy_from_slice(&layer.to_be_bytes());
    k[9..17].copy_from_slice(&lba.to_be_bytes());
    k
}
/// The half-open key range holding `layer`'s entries for lbas in `[from, to)`.
pub fn map_range(layer: LayerId, from: u64, to: u64) -> ([u8; 17], [u8; 17]) {
    let end = if to == u64::MAX && layer == u64::MAX {
        // Not reachable with ids handed out by the pool; keep the range empty rather than wrap.
        map_key(layer, u64::MAX)
    } else if to == u64::MAX {
        map_key(layer + 1, 0)
    } else {
        map_key(layer, to)
    };
    (map_key(layer, from), end)
}
/// The whole key range of one prefix byte.
pub fn prefix_range(p: u8) -> (Vec<u8>, Vec<u8>) {
    (vec![p], vec![p + 1])
}

pub fn decode_map_key(k: &[u8]) -> Result<(LayerId, u64)> {
    if k.len() != 17 || k[0] != K_MAP {
        return Err(Error::Corrupt(format!("bad map key {}", hex(k))));
    }
    Ok((be_u64(&k[1..9]), be_u64(&k[9..17])))
}

pub fn decode_u64_suffix(k: &[u8], prefix: u8) -> Result<u64> {
    if k.len() < 9 || k[0] != prefix {
        return Err(Error::Corrupt(format!("bad key {}", hex(k))));
    }
    Ok(be_u64(&k[1..9]))
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A mapping entry: where a block's data lives, or that it reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapValue {
    Data { pba: u64, crc: u32 },
    Zero,
}

const ZERO_PBA: u64 = u64::MAX;

impl MapValue {
    pub fn encode(&self) -> [u8; 12] {
        let (pba, crc) = match *self {
            MapValue::Data { pba, crc } => (pba, crc),
            MapValue::Zero => (ZERO_PBA, 0),
        };
        let mut v = [0u8; 12];
        v[..8].copy_from_slice(&pba.to_le_bytes());
        v[8..].copy_from_slice(&crc.to_le_bytes());
        v
    }
    pub fn decode(v: &[u8]) -> Result<Self> {
        if v.len() != 12 {
            return Err(Error::Corrupt(format!(
                "map value of {} bytes, expected 12",
                v.len()
            )));
        }
        let mut p = [0u8; 8];
        p.copy_from_slice(&v[..8]);
        let mut c = [0u8; 4];
        c.copy_from_slice(&v[8..]);
        let pba = u64::from_le_bytes(p);
        Ok(if pba == ZERO_PBA {
            MapValue::Zero
        } else {
            MapValue::Data {
                pba,
                crc: u32::from_le_bytes(c),
            }
        })
    }
    pub fn pba(&self) -> Option<u64> {
        match *self {
            MapValue::Data { pba, .. } => Some(pba),
            MapValue::Zero => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SuperRecord {
    pub format_version: u32,
    pub pool_uuid: String,
    pub block_size: u32,
    pub data_start: u64,
    pub data_blocks: u64,
    pub created: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: VolId,
    pub name: String,
    pub size: u64,
    pub head: LayerId,
    pub created: u64,
    /// Set while something fills the volume that must finish before its contents are
    /// whole (a restore): says what, so a crash leaves it clearly marked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<Incomplete>,
}

/// What is filling a volume whose contents are not whole yet.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Filling {
    /// A full restore writes every cell, then clears the mark; interrupted, the volume is
    /// useless (delete it and restore again).
    FullRestore,
    /// A lazy restore serves the volume while it hydrates; only the daemon may open it, and
    /// an interrupted one resumes where it was.
    LazyRestore,
}

/// The mark on a volume being filled (see [`VolumeRecord::incomplete`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Incomplete {
    pub by: Filling,
    /// `vol@snap` as backed up, the manifest id, and the repository it comes from.
    pub backup: String,
    pub manifest: String,
    pub source: String,
}

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.by {
            Filling::FullRestore => "full restore",
            Filling::LazyRestore => "lazy restore",
        };
        write!(
            f,
            "{how} of {} ({}) from {} has not finished",
            self.backup, self.manifest, self.source
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub name: String,
    pub layer: LayerId,
    pub size: u64,
    pub created: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    pub id: LayerId,
    pub parent: Option<LayerId>,
    pub frozen: bool,
    pub created: u64,
}

pub fn encode_record<T: Serialize>(r: &T) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(r).unwrap_or_default()
}

pub fn decode_record<T: DeserializeOwned>(what: &str, key: &[u8], v: &[u8]) -> Result<T> {
    serde_json::from_slice(v)
        .map_err(|e| Error::Corrupt(format!("{what} record at key {}: {e}", hex(key))))
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn map_value_roundtrip() {
        for v in [
            MapValue::Zero,
            MapValue::Data {
                pba: 7,
                crc: 0xdead_beef,
            },
        ] {
            assert_eq!(MapValue::decode(&v.encode()).unwrap(), v);
        }
        assert!(MapValue::decode(&[1, 2, 3]).is_err());
    }

    #[test]
    fn map_keys_sort_numerically() {
        assert!(map_key(1, 255) < map_key(1, 256));
        assert!(map_key(1, u64::MAX) < map_key(2, 0));
        let (a, b) = map_range(3, 0, u64::MAX);
        assert!(a < map_key(3, 5) && map_key(3, u64::MAX - 1) < b);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = MapValue::decode(&bytes);
            let _ = decode_map_key(&bytes);
            let _ = decode_record::<VolumeRecord>("volume", b"k", &bytes);
            let _ = decode_u64_suffix(&bytes, K_VOLUME);
        }
    }
}
