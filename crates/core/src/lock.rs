//! The exclusive pool lock: an `flock` on `<meta>/snapblk.lock`, whose content names the
//! holder so that a refused opener can say who holds the pool.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct PoolLock {
    _file: File,
    path: PathBuf,
}

impl PoolLock {
    /// Takes the lock or fails with `Error::Busy` naming the holder.
    pub fn acquire(meta_dir: &Path, holder: &str) -> Result<PoolLock> {
        let path = meta_dir.join("snapblk.lock");
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::device(format!("opening lock file {}", path.display()), e))?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut who = String::new();
            let _ = f.read_to_string(&mut who);
            let who = who.trim();
            return Err(Error::Busy(format!(
                "pool {} is locked by {}",
                meta_dir.display(),
                if who.is_empty() {
                    "another process"
                } else {
                    who
                }
            )));
        }
        let _ = f.set_len(0);
        let _ = f.seek(SeekFrom::Start(0));
        let _ = write!(f, "pid {} ({holder})", std::process::id());
        let _ = f.flush();
        Ok(PoolLock { _file: f, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_name() {
        let d = tempfile::tempdir().unwrap();
        let l = PoolLock::acquire(d.path(), "snapblk daemon").unwrap();
        let e = PoolLock::acquire(d.path(), "other")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("snapblk daemon") && e.contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(l);
        PoolLock::acquire(d.path(), "other").unwrap();
    }
}
