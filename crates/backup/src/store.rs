//! The object store a repository lives in: flat keys (with `/` separators) to immutable
//! byte objects. Implementations: [`crate::file::FileStore`] and `snapblk_s3::S3Store`.
//! All methods may be called concurrently from several threads.

/// One stored object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store's root (the same form `get` takes).
    pub key: String,
    pub size: u64,
    /// Last modification, seconds since the Unix epoch (0 if unknown).
    pub modified: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{store}: object {key} does not exist")]
    NotFound { store: String, key: String },
    #[error("{store}: object {key} is larger than the {max} bytes such an object may hold")]
    TooLarge {
        store: String,
        key: String,
        max: u64,
    },
    #[error("{store}: {op} {key} failed: {detail}")]
    Failed {
        store: String,
        op: &'static str,
        key: String,
        detail: String,
    },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// Largest buffer reserved up front for an object whose size the store reports; larger
/// objects grow as their bytes arrive.
pub const MAX_PREALLOC: u64 = 16 << 20;

pub trait ObjectStore: Send + Sync {
    /// Where this store is, for messages (`s3://bucket/prefix`, `file:///path`).
    fn describe(&self) -> String;
    /// The whole object; `StoreError::NotFound` if there is none, `StoreError::TooLarge`
    /// if it holds more than `max` bytes (checked before and while reading: no buffer is
    /// ever sized by what the store claims beyond `max`).
    fn get(&self, key: &str, max: u64) -> Result<Vec<u8>, StoreError>;
    /// `len` bytes at `offset`; fewer only if the object ends first. A store that answers
    /// with more than `len` bytes is an error, not a larger buffer.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError>;
    /// [`ObjectStore::get_range`] into `out`, replacing what it held: a store that can
    /// fills the caller's buffer, so a download thread reuses one buffer for every request
    /// (its memory then stays put over a long job). The default allocates a new one.
    fn get_range_into(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        *out = self.get_range(key, offset, len)?;
        Ok(())
    }
    /// Stores `data` under `key`, replacing any object there. Atomic: readers see the old
    /// object or the whole new one.
    fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError>;
    /// [`ObjectStore::put`] of a buffer the caller gives up: a store that sends from an
    /// owned buffer (S3) takes it without copying, so an upload of a pack holds its bytes
    /// once, not twice, while in flight.
    fn put_owned(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        self.put(key, &data)
    }
    /// [`ObjectStore::put`] of the `len` bytes of the file at `path` (a spooled pack,
    /// `crate::spool`): a store that streams a body from a file (S3) never holds it in
    /// memory. The default reads it whole, refusing a file of another length.
    fn put_file(&self, key: &str, path: &std::path::Path, len: u64) -> Result<(), StoreError> {
        let failed = |detail: String| StoreError::Failed {
            store: self.describe(),
            op: "put",
            key: key.to_string(),
            detail,
        };
        let data =
            std::fs::read(path).map_err(|e| failed(format!("reading {}: {e}", path.display())))?;
        if data.len() as u64 != len {
            return Err(failed(format!(
                "{} holds {} bytes, not {len}",
                path.display(),
                data.len()
            )));
        }
        self.put_owned(key, data)
    }
    /// Stores `data` only if `key` does not exist yet; returns false if it did.
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool, StoreError>;
    /// Every object whose key starts with `prefix`, in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;
    /// The objects of [`ObjectStore::list`] whose key sorts after `after` (byte order),
    /// in no particular order. A store that lists in key order sends only those (S3's
    /// `StartAfter`: one page per 1,000 keys after `after`, whatever sorts before); the
    /// default filters a whole listing.
    fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let mut all = self.list(prefix)?;
        all.retain(|o| o.key.as_str() > after);
        Ok(all)
    }
    /// Whether `key` exists (S3: a HEAD). The default asks for its first byte.
    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.get_range(key, 0, 1) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
    /// Deletes `key`; deleting a missing object is not an error.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
}
