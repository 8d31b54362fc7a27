//! The repository's `config` object: plain JSON (it must be readable before any key is
//! known), holding the format version, chunking and packing parameters and the wrapped
//! master key slots. Everything else in a repository is sealed.
//!
//! Format 2 authenticates the config: `mac` is a keyed BLAKE3 hash, under a key derived
//! from the master key, of the config's JSON without `mac`. It can only be checked once a
//! key slot is open, so everything a slot costs to open is bounded first (`parse`: at most
//! `MAX_KEY_SLOTS` slots; `crypto::unwrap_master`: Argon2 cost). A config that fails its
//! mac (altered chunk size, added slots, ...) is refused. Format 1 (no mac) is refused
//! with a pointer to `snapblk repo upgrade`, which authenticates it. Format 3 adds
//! catalogs (`crate::catalog`); format 2 is refused until `repo upgrade` writes them.
//! Format 4 stores new backups' tables as frames (`crate::frame`); a format-3 repository
//! is used as it is (whole tables) until `repo upgrade` raises it, which an older
//! snapblk then refuses — so every host sharing it is upgraded first.
//! Format 5 keys index objects by time (`ix/`) and lists them through index generations
//! gc writes (`crate::generation`); a format-3 or -4 repository is used as it is (whole
//! listings of `index/` and `packs/`) until `repo upgrade` raises it.

use serde::{Deserialize, Serialize};

use crate::crypto::KeySlot;
use crate::error::{BackupError, Result};

pub const FORMAT: &str = "snapblk-backup";
pub const VERSION: u32 = 5;
/// The first format whose index objects are keyed by time (`ix/`) and listed through
/// generations gc writes (docs/design.md §12 "Index generations").
pub const VERSION_GENERATIONS: u32 = 5;
/// The first format whose new tables are written as frames.
pub const VERSION_FRAMES: u32 = 4;
/// The format before frames: read and written as it is (whole tables).
pub const VERSION_WHOLE_TABLES: u32 = 3;
/// The format before catalogs (backups listed by their headers alone); `repo upgrade`
/// writes the catalogs.
pub const VERSION_NO_CATALOGS: u32 = 2;
/// The format before configs were authenticated; `repo upgrade` converts it.
pub const VERSION_UNAUTHENTICATED: u32 = 1;
/// Key slots a config may hold (each costs an Argon2 run to try).
pub const MAX_KEY_SLOTS: usize = 16;
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;
pub const DEFAULT_PACK_SIZE: u32 = 8 << 20;
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
pub const MAX_PACK_SIZE: u32 = 256 << 20;
/// Largest `config` object read (a few KiB of JSON with a handful of key slots).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
    /// Random id of this repository.
    pub id: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Image cell (and chunk) size in bytes: a power of two, 4 KiB .. 4 MiB.
    pub chunk_size: u32,
    /// Target size of a pack object in bytes.
    pub pack_size: u32,
    /// "zstd".
    pub compression: String,
    pub zstd_level: i32,
    /// "xchacha20poly1305".
    pub cipher: String,
    /// "blake3-keyed".
    pub chunk_hash: String,
    /// Wrapped copies of the master key (at least one).
    pub keys: Vec<KeySlot>,
    /// Hex keyed BLAKE3 of this config without `mac` (format 2; see the module doc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl RepoConfig {
    /// Parses and checks a config object's bytes.
    pub fn parse(bytes: &[u8]) -> Result<RepoConfig> {
        let c: RepoConfig = serde_json::from_slice(bytes)
            .map_err(|e| BackupError::corrupt("config", format!("not a repository config: {e}")))?;
        if c.format != FORMAT {
            return Err(BackupError::corrupt(
                "config",
                format!("format is {:?}, not {FORMAT:?}", c.format),
            ));
        }
        if !(VERSION_UNAUTHENTICATED..=VERSION).contains(&c.version) {
            return Err(BackupError::Unsupported(format!(
                "repository format version {} (this snapblk reads version {VERSION})",
                c.version
            )));
        }
        if c.keys.len() > MAX_KEY_SLOTS {
            return Err(BackupError::corrupt(
                "config",
                format!("{} key slots (at most {MAX_KEY_SLOTS})", c.keys.len()),
            ));
        }
        check_chunk_size(c.chunk_size)?;
        if !(1 << 20..=MAX_PACK_SIZE).contains(&c.pack_size) {
            return Err(BackupError::corrupt(
                "config",
                format!("pack size {} is outside 1 MiB .. 256 MiB", c.pack_size),
            ));
        }
        if c.compression != "zstd"
            || c.cipher != "xchacha20poly1305"
            || c.chunk_hash != "blake3-keyed"
        {
            return Err(BackupError::Unsupported(format!(
                "compression {:?}, cipher {:?}, chunk hash {:?}",
                c.compression, c.cipher, c.chunk_hash
            )));
        }
        if !(-7..=22).contains(&c.zstd_level) {
            return Err(BackupError::corrupt(
                "config",
                format!("zstd level {}", c.zstd_level),
            ));
        }
        if c.keys.is_empty() {
            return Err(BackupError::corrupt("config", "no key slots"));
        }
        Ok(c)
    }
}

impl RepoConfig {
    /// The bytes the mac covers: this config's JSON with `mac` left out.
    pub fn mac_input(&self) -> Vec<u8> {
        let unsigned = RepoConfig {
            mac: None,
            ..self.clone()
        };
        // Plain struct of strings and numbers: serializing cannot fail.
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }
}

pub fn check_chunk_size(size: u32) -> Result<()> {
    if !size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(BackupError::invalid(
            "chunk size",
            format!("{size} is not a power of two between 4 KiB and 4 MiB"),
        ));
    }
    Ok(())
}
