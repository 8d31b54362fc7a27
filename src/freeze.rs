//! Freezing a mounted filesystem around a snapshot (FIFREEZE/FITHAW, as `fsfreeze` does).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

// _IOWR('X', 119, int) and _IOWR('X', 120, int) from <linux/fs.h>.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A frozen filesystem; thawed when dropped.
pub struct Frozen {
    dir: File,
    path: PathBuf,
}

pub fn freeze(mountpoint: &Path) -> Result<Frozen> {
    let dir = File::open(mountpoint)
        .with_context(|| format!("opening mount point {}", mountpoint.display()))?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE takes a pointer to an int the kernel ignores; `dir` is an open fd and
    // `arg` outlives the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, &mut arg) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("freezing the filesystem at {}", mountpoint.display()));
    }
    Ok(Frozen {
        dir,
        path: mountpoint.to_path_buf(),
    })
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let mut arg: libc::c_int = 0;
        // SAFETY: as in `freeze`, with FITHAW.
        let rc = unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW as _, &mut arg) };
        if rc != 0 {
            eprintln!(
                "warning: thawing {} failed: {}; run `fsfreeze -u {}`",
                self.path.display(),
                std::io::Error::last_os_error(),
                self.path.display()
            );
        }
    }
}
