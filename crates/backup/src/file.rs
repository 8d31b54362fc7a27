//! `file:///path` repositories: one file per object under a directory (for a second local
//! disk). Objects are written to a temporary file, fsynced and renamed into place (then the
//! directory is fsynced), so a crash leaves either no object or the whole object.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::store::{ObjectMeta, ObjectStore, StoreError, MAX_PREALLOC};

pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// A store rooted at `root` (created on the first write if missing).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileStore { root: root.into() }
    }

    fn fail(&self, op: &'static str, key: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Failed {
            store: self.describe(),
            op,
            key: key.to_string(),
            detail: e.to_string(),
        }
    }

    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf, StoreError> {
        let ok = !key.is_empty()
            && !key.starts_with('/')
            && key
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with(".tmp"));
        if !ok {
            return Err(self.fail(op, key, "invalid object key"));
        }
        Ok(self.root.join(key))
    }

    fn write_tmp(&self, key: &str, path: &Path, data: &[u8]) -> Result<PathBuf, StoreError> {
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(|e| self.fail("put", key, e))?;
        let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(self.fail("put", key, e));
        }
        Ok(tmp)
    }

    fn sync_dir(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let dir = path.parent().unwrap_or(&self.root);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.fail("put", key, e))
    }
}

impl FileStore {
    /// Opens object `key` for reading; `NotFound` if there is none.
    fn open_object(&self, key: &str) -> Result<File, StoreError> {
        let path = self.path("get", key)?;
        File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            },
            _ => self.fail("get", key, e),
        })
    }
}

impl ObjectStore for FileStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn get(&self, key: &str, max: u64) -> Result<Vec<u8>, StoreError> {
        let f = self.open_object(key)?;
        let too_large = || StoreError::TooLarge {
            store: self.describe(),
            key: key.to_string(),
            max,
        };
        let len = f.metadata().map_err(|e| self.fail("get", key, e))?.len();
        if len > max {
            return Err(too_large());
        }
        let mut out = Vec::with_capacity(len.min(MAX_PREALLOC) as usize);
        f.take(max.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| self.fail("get", key, e))?;
        if out.len() as u64 > max {
            return Err(too_large());
        }
        Ok(out)
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.get_range_into(key, offset, len, &mut out)?;
        Ok(out)
    }

    fn get_range_into(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let mut f = self.open_object(key)?;
        out.clear();
        out.reserve(len.min(MAX_PREALLOC) as usize);
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.take(len).read_to_end(out))
            .map_err(|e| self.fail("get", key, e))?;
        Ok(())
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path("put", key)?;
        let tmp = self.write_tmp(key, &path, data)?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(self.fail("put", key, e));
        }
        self.sync_dir(key, &path)
    }

    /// Copies the file in the kernel (`copy_file_range`), never through memory.
    fn put_file(&self, key: &str, src: &Path, len: u64) -> Result<(), StoreError> {
        let path = self.path("put", key)?;
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(|e| self.fail("put", key, e))?;
        let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let res = (|| {
            let copied = fs::copy(src, &tmp)?;
            if copied != len {
                return Err(std::io::Error::other(format!(
                    "{} holds {copied} bytes, not {len}",
                    src.display()
                )));
            }
            File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(self.fail("put", key, e));
        }
        self.sync_dir(key, &path)
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool, StoreError> {
        let path = self.path("put", key)?;
        let tmp = self.write_tmp(key, &path, data)?;
        // link(2) fails with EEXIST instead of replacing: the atomic "if none match".
        let res = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match res {
            Ok(()) => self.sync_dir(key, &path).map(|_| true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.fail("put", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        // Walk the deepest directory the prefix names, then filter by the full prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path("list", dir_part)?
        };
        let mut out = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.fail("list", prefix, e)),
            };
            for ent in entries {
                let ent = ent.map_err(|e| self.fail("list", prefix, e))?;
                let name = ent.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp") {
                    continue;
                }
                let meta = ent.metadata().map_err(|e| self.fail("list", prefix, e))?;
                if meta.is_dir() {
                    stack.push(ent.path());
                    continue;
                }
                let Ok(rel) = ent.path().strip_prefix(&self.root).map(Path::to_path_buf) else {
                    continue;
                };
                let key = rel.to_string_lossy().into_owned();
                if key.starts_with(prefix) {
                    let modified = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs());
                    out.push(ObjectMeta {
                        key,
                        size: meta.len(),
                        modified,
                    });
                }
            }
        }
        Ok(out)
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path("head", key)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.fail("head", key, e)),
        }
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path("delete", key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.fail("delete", key, e)),
        }
    }
}
