//! Which pool a metadata store and a data device hold, and whether they belong together:
//! the superblock (`S`) and the device header, checked the same way by both metadata
//! formats and `pool upgrade`.

use crate::device::{
    AlignedBuf, DataDevice, DeviceHeader, ReadSeg, WriteSeg, BLOCK_SIZE, BLOCK_SIZE_U64,
};
use crate::error::{Error, Result};
use crate::keys::{self, SuperRecord};
use crate::meta::MetaStore;

pub fn uuid_bytes(s: &str) -> Result<[u8; 16]> {
    uuid::Uuid::parse_str(s)
        .map(|u| *u.as_bytes())
        .map_err(|e| Error::Corrupt(format!("pool uuid '{s}': {e}")))
}

pub fn read_header(dev: &dyn DataDevice) -> Result<DeviceHeader> {
    let mut buf = AlignedBuf::zeroed(BLOCK_SIZE);
    dev.read(&mut [ReadSeg {
        offset: 0,
        buf: &mut buf,
    }])
    .map_err(|e| Error::device("reading header", e))?;
    DeviceHeader::decode(&buf, "data device")
}

/// Writes the header durably (FUA, then a device sync).
pub fn write_header(dev: &dyn DataDevice, h: &DeviceHeader) -> Result<()> {
    let mut buf = AlignedBuf::zeroed(BLOCK_SIZE);
    buf.copy_from_slice(&h.encode());
    dev.write(
        &[WriteSeg {
            offset: 0,
            buf: &buf,
        }],
        true,
    )
    .map_err(|e| Error::device("writing header", e))?;
    dev.sync().map_err(|e| Error::device("sync", e))
}

/// Reads the superblock and the device header and checks that they describe one pool of
/// metadata format `version` that fits the device.
pub fn check(store: &dyn MetaStore, dev: &dyn DataDevice, version: u32) -> Result<SuperRecord> {
    let key = keys::super_key();
    let raw = store.get(&key)?.ok_or_else(|| {
        Error::not_found(
            "pool",
            "no pool superblock in the metadata store (not formatted?)",
        )
    })?;
    let sup: SuperRecord = keys::decode_record("superblock", &key, &raw)?;
    if sup.format_version != version {
        let how = if sup.format_version == 1 && version == 2 {
            ". Stop the daemon and run `snapblk pool upgrade` (offline; it converts the \
             metadata in place and can be resumed)"
        } else {
            ""
        };
        return Err(Error::invalid(
            "pool",
            format!(
                "pool {} uses metadata format {}; this snapblk reads format {version}{how}",
                sup.pool_uuid, sup.format_version
            ),
        ));
    }
    if sup.block_size as usize != BLOCK_SIZE {
        return Err(Error::invalid(
            "pool",
            format!("block size {} is not supported", sup.block_size),
        ));
    }
    let h = read_header(dev)?;
    if h.pool_uuid != uuid_bytes(&sup.pool_uuid)? {
        return Err(Error::invalid(
            "data device",
            format!(
                "it belongs to pool {}, but the metadata is pool {}",
                uuid::Uuid::from_bytes(h.pool_uuid),
                sup.pool_uuid
            ),
        ));
    }
    if h.format_version != version {
        return Err(Error::invalid(
            "data device",
            format!(
                "format version {} is not supported (this snapblk reads version {version})",
                h.format_version
            ),
        ));
    }
    if h.block_size as usize != BLOCK_SIZE {
        return Err(Error::invalid(
            "data device",
            format!("block size {} is not supported", h.block_size),
        ));
    }
    if h.data_start != sup.data_start || !sup.data_start.is_multiple_of(BLOCK_SIZE_U64) {
        return Err(Error::Corrupt(format!(
            "data start differs: device header says {}, metadata says {}",
            h.data_start, sup.data_start
        )));
    }
    let need = sup
        .data_blocks
        .checked_mul(BLOCK_SIZE_U64)
        .and_then(|b| b.checked_add(sup.data_start))
        .ok_or_else(|| {
            Error::Corrupt(format!(
                "superblock data size {} blocks overflows",
                sup.data_blocks
            ))
        })?;
    if dev.len() < need {
        return Err(Error::invalid(
            "data device",
            format!(
                "{} bytes, smaller than the {need} bytes the pool was formatted with",
                dev.len()
            ),
        ));
    }
    Ok(sup)
}
