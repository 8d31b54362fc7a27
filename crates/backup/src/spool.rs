//! Packs built in a file: a backup's packer appends each sealed chunk to a temporary
//! file and the uploader sends the file ([`crate::store::ObjectStore::put_file`]), so a
//! pack waiting or in flight costs page cache the kernel may write back, not the job's
//! memory, whatever the pack size (restic spools its packs the same way). Before, each
//! pack stayed in RAM from its first chunk to the end of its upload: six 8 MiB packs at
//! once when the link was slow (packer, channel, four uploaders), twelve with the copy
//! the S3 client took, and a 256 MiB pack size would have held 1.5 GiB.
//!
//! The bytes are the same as [`crate::pack::PackBuilder`]'s: blobs, sealed index, index
//! length, magic; the id is the BLAKE3 hash of the blob section, computed as it is
//! written. The file is unlinked when its [`SpooledPack`] is dropped (uploaded or not);
//! one left by a killed job is swept with its scratch directory.
//!
//! Threading: a builder is one thread's; a finished pack moves to an uploader.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::crypto::{ChunkId, Keys};
use crate::error::{BackupError, Result};
use crate::pack::{encode_index, index_aad, PackEntry, MAGIC};

/// Bytes buffered before a write to the file.
const WRITE_BUFFER: usize = 1 << 20;

/// A pack being written to a file in `dir`.
pub struct SpoolBuilder {
    dir: PathBuf,
    out: Option<BufWriter<NamedTempFile>>,
    hasher: blake3::Hasher,
    len: u64,
    entries: Vec<PackEntry>,
}

/// A finished pack in its file, ready to upload.
pub struct SpooledPack {
    pub id: String,
    /// The pack's whole bytes (removed when this is dropped).
    pub file: NamedTempFile,
    /// Length of the file.
    pub len: u64,
    /// The sealed index (stored again as `index/<id>`).
    pub index: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

impl SpoolBuilder {
    /// A builder whose packs go to files in `dir` (a job's scratch directory).
    pub fn new(dir: &Path) -> SpoolBuilder {
        SpoolBuilder {
            dir: dir.to_path_buf(),
            out: None,
            hasher: blake3::Hasher::new(),
            len: 0,
            entries: Vec::new(),
        }
    }

    fn err(&self, e: std::io::Error) -> BackupError {
        BackupError::LocalState {
            what: "a pack being written before its upload".into(),
            path: self.dir.display().to_string(),
            detail: e.to_string(),
        }
    }

    /// Appends one sealed chunk.
    pub fn add(&mut self, id: ChunkId, sealed: &[u8]) -> Result<()> {
        if self.out.is_none() {
            let f = NamedTempFile::with_prefix_in("pack-", &self.dir).map_err(|e| self.err(e))?;
            self.out = Some(BufWriter::with_capacity(WRITE_BUFFER, f));
        }
        let offset = u32::try_from(self.len).map_err(|_| {
            self.err(std::io::Error::other(
                "a pack's blob section reached 4 GiB (offsets are u32)",
            ))
        })?;
        if let Some(out) = &mut self.out {
            if let Err(e) = out.write_all(sealed) {
                return Err(self.err(e));
            }
        }
        self.hasher.update(sealed);
        self.entries.push(PackEntry {
            id,
            offset,
            len: sealed.len() as u32,
        });
        self.len += sealed.len() as u64;
        Ok(())
    }

    /// Bytes of blobs so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Closes the pack: its index and trailer appended, the file flushed (to the page
    /// cache; a pack is durable once stored, not before). `None` if it holds nothing.
    pub fn finish(&mut self, keys: &Keys) -> Result<Option<SpooledPack>> {
        let Some(mut out) = self.out.take() else {
            return Ok(None);
        };
        let entries = std::mem::take(&mut self.entries);
        let blobs = std::mem::replace(&mut self.len, 0);
        let id = std::mem::replace(&mut self.hasher, blake3::Hasher::new())
            .finalize()
            .to_hex()
            .to_string();
        let index = keys.seal(&encode_index(&entries), &index_aad(&id));
        let mut tail = index.clone();
        tail.extend_from_slice(&(index.len() as u32).to_le_bytes());
        tail.extend_from_slice(MAGIC);
        out.write_all(&tail).map_err(|e| self.err(e))?;
        let file = out.into_inner().map_err(|e| self.err(e.into_error()))?;
        Ok(Some(SpooledPack {
            id,
            file,
            len: blobs + tail.len() as u64,
            index,
            entries,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random_bytes;
    use crate::pack::PackBuilder;

    #[test]
    fn spooled_pack_is_the_in_memory_pack() {
        let k = Keys::from_master(&random_bytes());
        let dir = tempfile::tempdir().unwrap();
        let mut s = SpoolBuilder::new(dir.path());
        assert!(s.finish(&k).unwrap().is_none());
        let mut m = PackBuilder::default();
        for i in 0..40u8 {
            let (id, sealed) = crate::chunk::encode(&k, 1, &[i; 70_000]);
            s.add(id, &sealed).unwrap();
            m.add(id, &sealed);
        }
        assert_eq!(s.len(), m.len() as u64);
        let sp = s.finish(&k).unwrap().unwrap();
        let mp = m.finish(&k);
        let bytes = std::fs::read(sp.file.path()).unwrap();
        assert_eq!(sp.id, mp.id);
        assert_eq!(sp.entries, mp.entries);
        assert_eq!(sp.len, bytes.len() as u64);
        // The sealed index differs only by its random nonce: both open to the same
        // entries under the pack's name, from the trailer and from `index`.
        assert!(crate::pack::names(&sp.id, &bytes));
        let from_trailer = crate::pack::index_from_pack(&k, &sp.id, &bytes).unwrap();
        assert_eq!(from_trailer, mp.entries);
        assert_eq!(crate::pack::trailer(&bytes).unwrap(), &sp.index[..]);
        // The builder starts over: a second pack in a new file.
        let (id, sealed) = crate::chunk::encode(&k, 1, b"after");
        s.add(id, &sealed).unwrap();
        let second = s.finish(&k).unwrap().unwrap();
        assert_ne!(second.file.path(), sp.file.path());
        assert_eq!(second.entries[0].offset, 0);
        let path = sp.file.path().to_path_buf();
        drop(sp);
        assert!(!path.exists(), "a dropped pack's file is removed");
    }
}
