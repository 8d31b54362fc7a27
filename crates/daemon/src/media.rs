//! Which medium (device) holds a path, for the 3-2-1 report: a path's filesystem device,
//! resolved from a partition to its whole disk (two partitions of one disk are one
//! medium). Filesystems without a block device (tmpfs, NFS, FUSE) are their own medium,
//! named by their anonymous device number.
//!
//! The pool's paths are recorded once per process when it opens its pool
//! ([`set_pool_paths`]): a process opens one pool.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static POOL_PATHS: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// Records the pool's metadata directory and data path (first call wins).
pub fn set_pool_paths(meta: &Path, data: &Path) {
    let _ = POOL_PATHS.set(vec![meta.to_path_buf(), data.to_path_buf()]);
}

/// The media holding the pool.
pub fn pool_media() -> Vec<String> {
    let mut out: Vec<String> = POOL_PATHS
        .get()
        .map(|p| p.iter().filter_map(|p| medium_of(p)).collect())
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// [`medium_of`], given up after `limit` (a hung NFS or USB mount must not stall the
/// scheduler that asks): `None` then.
pub fn medium_of_within(path: &Path, limit: std::time::Duration) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::Builder::new()
        .name("stat".into())
        .spawn(move || {
            let _ = tx.send(medium_of(&p));
        })
        .ok()?;
    rx.recv_timeout(limit).ok().flatten()
}

/// `(major, minor)` of a Linux `dev_t` (glibc's encoding).
fn split(dev: u64) -> (u64, u64) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    (major, minor)
}

/// The medium holding `path` (or, if it does not exist yet, its nearest existing parent);
/// a block device is its own medium.
pub fn medium_of(path: &Path) -> Option<String> {
    let mut p = path;
    let meta = loop {
        match std::fs::metadata(p) {
            Ok(m) => break m,
            Err(_) => p = p.parent()?,
        }
    };
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let (major, minor) = split(dev);
    if major == 0 {
        return Some(format!("fs 0:{minor}"));
    }
    Some(whole_disk(major, minor))
}

/// `disk M:m` of the disk holding block device `major:minor` (itself unless a partition).
fn whole_disk(major: u64, minor: u64) -> String {
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        if let Ok(real) = std::fs::canonicalize(&sys) {
            if let Some(parent) = real.parent() {
                if let Ok(d) = std::fs::read_to_string(parent.join("dev")) {
                    return format!("disk {}", d.trim());
                }
            }
        }
    }
    format!("disk {major}:{minor}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_split_and_missing_paths_resolve_to_a_parent() {
        assert_eq!(split(0x0801), (8, 1));
        assert_eq!(split((259u64 << 8) | 3), (259, 3));
        let here = medium_of(Path::new("/tmp")).unwrap();
        assert_eq!(
            medium_of(Path::new("/tmp/does/not/exist/yet")).unwrap(),
            here
        );
        // /proc is its own (virtual) filesystem.
        assert!(medium_of(Path::new("/proc")).unwrap().starts_with("fs 0:"));
    }
}
