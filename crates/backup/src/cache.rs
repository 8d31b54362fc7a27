//! A local cache of immutable repository objects (pack indexes, backup tables), so repeat
//! jobs do not download them again (docs/design.md §12 "Local cache").
//!
//! Invariants:
//! - Only objects whose name fixes their contents are cached: `index/<pack id>` (sealed
//!   under the pack's id; the pack id is the hash of the pack's blobs) and `tables/<id>`
//!   (pinned by the digest in its catalogued header). A cached copy is authenticated
//!   exactly like a downloaded one by whoever reads it; one that fails is dropped and the
//!   object fetched again, so the cache can make a job faster, never wrong.
//! - Files are written to a temporary name and renamed: a reader sees a whole object or
//!   none. Failing to write the cache is logged, never an error.
//! - Layout: `<dir>/<repository id>/<key>` with the key's `/` kept (`index/<64 hex>`).
//!   Keys are checked to be plain (`[0-9a-z]` segments) before they name a file.
//!
//! Threading: any number of threads and processes may read and fill it at once.

use std::path::PathBuf;

use crate::error::Result;
use crate::repo::Repository;

#[derive(Debug, Clone)]
pub struct ObjectCache {
    dir: PathBuf,
}

/// A key safe to use as a relative path: `kind/name` or `kind/name/part` (a table's
/// frame), each lowercase alphanumeric.
fn plain(key: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 128
            && p.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    };
    let parts: Vec<&str> = key.split('/').collect();
    (2..=3).contains(&parts.len()) && parts.iter().all(|p| ok(p))
}

impl ObjectCache {
    pub fn new(dir: impl Into<PathBuf>) -> ObjectCache {
        ObjectCache { dir: dir.into() }
    }

    fn path(&self, repo: &Repository, key: &str) -> Option<PathBuf> {
        plain(key).then(|| self.dir.join(&repo.config().id).join(key))
    }

    /// Where `repo`'s local chunk index lives (crate::localindex): beside its cached
    /// objects (`chunk-index` is not a kind of object, so no key names it).
    pub fn chunk_index_dir(&self, repo: &Repository) -> PathBuf {
        self.dir.join(&repo.config().id).join("chunk-index")
    }

    /// Where jobs keep private copies of what they read (crate::tablecopy): removed by the
    /// job; what a killed one left is removed by the next ([`ObjectCache::sweep_scratch`]).
    pub fn scratch_dir(&self, repo: &Repository) -> PathBuf {
        self.dir.join(&repo.config().id).join("jobs")
    }

    /// Removes the entries of the scratch directory named `<prefix><pid>-...` whose
    /// process is gone (a job killed before it cleaned up).
    pub fn sweep_scratch(&self, repo: &Repository, prefix: &str) {
        let Ok(entries) = std::fs::read_dir(self.scratch_dir(repo)) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(prefix)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// The cached copy of `key`, if any (at most `max` bytes).
    pub fn get(&self, repo: &Repository, key: &str, max: u64) -> Option<Vec<u8>> {
        let p = self.path(repo, key)?;
        let m = std::fs::metadata(&p).ok()?;
        if m.len() > max {
            return None;
        }
        std::fs::read(&p).ok()
    }

    pub fn put(&self, repo: &Repository, key: &str, data: &[u8]) {
        let Some(p) = self.path(repo, key) else {
            return;
        };
        let tmp = p.with_extension(format!("tmp.{}", std::process::id()));
        let done = p
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, data))
            .and_then(|()| std::fs::rename(&tmp, &p));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&tmp);
            log::warn!("caching {key}: {e}");
        }
    }

    pub fn remove(&self, repo: &Repository, key: &str) {
        if let Some(p) = self.path(repo, key) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Drops cached objects of kind `kind` (e.g. "index") whose names `keep` rejects
    /// (objects gone from the store).
    pub fn retain(&self, repo: &Repository, kind: &str, keep: impl Fn(&str) -> bool) {
        let d = self.dir.join(&repo.config().id).join(kind);
        let Ok(entries) = std::fs::read_dir(&d) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !keep(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// `key` from the cache if it is there and `open` accepts it, else from the store (then
/// cached). `open` authenticates and decodes.
pub fn get_with<T>(
    repo: &Repository,
    key: &str,
    max: u64,
    open: impl Fn(&[u8]) -> Result<T>,
) -> Result<T> {
    get_as(repo, key, key, max, open)
}

/// As [`get_with`] for an object cached under another name than its store key (a
/// format-5 index object, `ix/<t>-<id>`, is cached as `index/<id>`).
pub fn get_as<T>(
    repo: &Repository,
    cached_as: &str,
    key: &str,
    max: u64,
    open: impl Fn(&[u8]) -> Result<T>,
) -> Result<T> {
    if let Some(c) = repo.cache() {
        if let Some(bytes) = c.get(repo, cached_as, max) {
            match open(&bytes) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    log::warn!("cached {cached_as} is unusable ({e}); fetching it again");
                    c.remove(repo, cached_as);
                }
            }
        }
    }
    let bytes = repo.store().get(key, max)?;
    let v = open(&bytes)?;
    if let Some(c) = repo.cache() {
        c.put(repo, cached_as, &bytes);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::plain;

    #[test]
    fn only_plain_keys_name_files() {
        assert!(plain("index/0a1b"));
        assert!(plain("tables/5f3e"));
        assert!(plain("tables/5f3e/17"));
        for bad in [
            "index/../x",
            "index",
            "index/a/b/c",
            "index/a/",
            "/etc/x",
            "index/A",
            "index/",
        ] {
            assert!(!plain(bad), "{bad}");
        }
    }
}
