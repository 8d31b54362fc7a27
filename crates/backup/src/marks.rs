//! High-water marks: the highest catalog generation this host has seen of each pool of
//! each repository, kept in a local file so that a catalog going backwards (newer
//! generations deleted from the store) is noticed (docs/design.md §12 "Catalogs").
//!
//! File: `<dir>/<repository id>.json`, a JSON map pool -> {generation, hash of that
//! generation's sealed object}. Invariants: a mark only rises (read, merge by maximum, write a temp file, fsync, rename, fsync the
//! directory). Two processes raising marks at once may lose one rise: detection gets
//! weaker for a while, never a false alarm. A file that cannot be read or parsed is an
//! error (it could hide a rollback); one that cannot be written is logged.
//!
//! Threading: a process-wide mutex orders the read-merge-write of one process.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{BackupError, Result};

/// Largest marks file read (a few bytes per pool).
const MAX_FILE: u64 = 16 << 20;

static LOCK: Mutex<()> = Mutex::new(());

/// The newest generation of one pool's catalog this host has seen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    pub generation: u64,
    pub hash: String,
}

type MarkMap = BTreeMap<String, Mark>;

#[derive(Debug, Clone)]
pub struct Marks {
    dir: PathBuf,
}

impl Marks {
    pub fn new(dir: impl Into<PathBuf>) -> Marks {
        Marks { dir: dir.into() }
    }

    /// The default directory: `<state dir>/catalogs` ([`state_dir`]).
    pub fn default_dir() -> Option<PathBuf> {
        Some(state_dir()?.join("catalogs"))
    }

    pub fn file(&self, repo_id: &str) -> PathBuf {
        self.dir.join(format!("{repo_id}.json"))
    }

    /// The marks of repository `repo_id` (empty if this host never saw it).
    pub fn get(&self, repo_id: &str) -> Result<MarkMap> {
        read(&self.file(repo_id))
    }

    /// Raises the marks of `repo_id` to at least `seen`.
    pub fn raise(&self, repo_id: &str, seen: &MarkMap) -> Result<()> {
        let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.file(repo_id);
        let mut marks = read(&path)?;
        let mut changed = false;
        for (pool, s) in seen {
            if marks.get(pool).is_none_or(|m| s.generation > m.generation) {
                marks.insert(pool.clone(), s.clone());
                changed = true;
            }
        }
        if changed {
            write(&self.dir, &path, &marks)?;
        }
        Ok(())
    }
}

/// This host's snapblk state directory: `$SNAPBLK_STATE_DIR`, else `/var/lib/snapblk` for
/// root, else `$XDG_STATE_HOME/snapblk` or `~/.local/state/snapblk`.
pub fn state_dir() -> Option<PathBuf> {
    let base = if let Some(d) = std::env::var_os("SNAPBLK_STATE_DIR") {
        PathBuf::from(d)
    } else if is_root() {
        PathBuf::from("/var/lib/snapblk")
    } else if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        PathBuf::from(d).join("snapblk")
    } else {
        PathBuf::from(std::env::var_os("HOME")?).join(".local/state/snapblk")
    };
    Some(base)
}

fn is_root() -> bool {
    // The owner of /proc/self is this process's effective user.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn read(path: &Path) -> Result<MarkMap> {
    let bad =
        |d: String| BackupError::invalid(format!("catalog high-water marks {}", path.display()), d);
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE => Err(bad(format!("larger than {MAX_FILE} bytes"))),
        Ok(_) => {
            let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(bad(e.to_string())),
    }
}

fn write(dir: &Path, path: &Path, marks: &MarkMap) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(marks)
        .map_err(|e| BackupError::invalid("catalog marks", e.to_string()))?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_rise() {
        let d = tempfile::tempdir().unwrap();
        let m = Marks::new(d.path().join("catalogs"));
        let mk = |g: u64| Mark {
            generation: g,
            hash: format!("h{g}"),
        };
        assert!(m.get("r").unwrap().is_empty());
        m.raise(
            "r",
            &BTreeMap::from([("a".into(), mk(5)), ("b".into(), mk(2))]),
        )
        .unwrap();
        m.raise(
            "r",
            &BTreeMap::from([("a".into(), mk(3)), ("c".into(), mk(1))]),
        )
        .unwrap();
        assert_eq!(
            m.get("r").unwrap(),
            BTreeMap::from([
                ("a".into(), mk(5)),
                ("b".into(), mk(2)),
                ("c".into(), mk(1))
            ])
        );
        assert!(m.get("other").unwrap().is_empty());
        std::fs::write(m.file("r"), b"{not json").unwrap();
        assert!(
            m.get("r").is_err(),
            "a damaged marks file could hide a rollback"
        );
    }
}
