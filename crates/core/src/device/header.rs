//! The 4 KiB header at offset 0 of the data device (docs/design.md §4).

use crate::error::{Error, Result};

use super::BLOCK_SIZE;

pub const MAGIC: &[u8; 8] = b"SNAPBLK\0";
const CRC_AT: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHeader {
    pub format_version: u32,
    pub block_size: u32,
    pub pool_uuid: [u8; 16],
    pub data_start: u64,
    pub size_at_format: u64,
}

impl DeviceHeader {
    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        let mut b = [0u8; BLOCK_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..32].copy_from_slice(&self.pool_uuid);
        b[32..40].copy_from_slice(&self.data_start.to_le_bytes());
        b[40..48].copy_from_slice(&self.size_at_format.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks magic and checksum; `what` names the device in errors.
    pub fn decode(b: &[u8], what: &str) -> Result<Self> {
        if b.len() < CRC_AT + 4 {
            return Err(Error::Corrupt(format!("{what}: header too short")));
        }
        if &b[0..8] != MAGIC {
            return Err(Error::Corrupt(format!(
                "{what} is not a snapblk data device (no SNAPBLK header)"
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if crc32c::crc32c(&b[..CRC_AT]) != u32_at(CRC_AT) {
            return Err(Error::Corrupt(format!("{what}: header checksum mismatch")));
        }
        let mut pool_uuid = [0u8; 16];
        pool_uuid.copy_from_slice(&b[16..32]);
        Ok(DeviceHeader {
            format_version: u32_at(8),
            block_size: u32_at(12),
            pool_uuid,
            data_start: u64_at(32),
            size_at_format: u64_at(40),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let h = DeviceHeader {
            format_version: 1,
            block_size: 4096,
            pool_uuid: [7; 16],
            data_start: 1 << 20,
            size_at_format: 1 << 30,
        };
        let mut b = h.encode();
        assert_eq!(DeviceHeader::decode(&b, "dev").unwrap(), h);
        b[20] ^= 1;
        assert!(DeviceHeader::decode(&b, "dev")
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        assert!(DeviceHeader::decode(&[0u8; 4096], "dev").is_err());
        assert!(DeviceHeader::decode(&[], "dev").is_err());
    }
}
