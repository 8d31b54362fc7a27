//! Holds: a backup an unfinished lazy restore still needs is kept by prune and forget
//! (docs/design.md §12 "Holds"), as `zfs hold` keeps a snapshot.
//!
//! A running lazy restore is safe beside gc through its lease, but a lease ends with the
//! process. An *interrupted* one (daemon stopped or crashed, restore cancelled) resumes
//! from the backup's table, so the backup must outlive the interruption: retention must not
//! remove it meanwhile. A hold is a sealed object `holds/<backup id>/<pool uuid>-<volume id>`
//! = {backup, name, pool, host, volume, placed, expires}. Invariants:
//! - The restore places (or renews) its hold before it reads the backup's table, on every
//!   start and resume, renews it daily while it runs, and deletes it once hydration is
//!   complete and durable.
//! - `prune` and `forget` never remove a backup with a live hold (forget refuses, or with
//!   `--force` removes it anyway). Prune lists the holds again *after* its catalog commit
//!   and puts back any removed backup a hold placed meanwhile names, before deleting its
//!   table: a restore that read the catalog before the commit had placed its hold before
//!   that read, so the second listing sees it (read-after-write listing).
//! - A hold lapses `HOLD_TTL` after its last renewal (an abandoned restore, a destroyed
//!   pool): prune then ignores it and deletes it. Holds that do not open are ignored (a
//!   forged hold cannot keep anything).
//!
//! Threading: plain functions over the repository; callers serialise their own holds.

use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};
use crate::repo::{now, Repository};

pub const HOLDS: &str = "holds/";
/// A hold not renewed for this long has lapsed (30 days).
pub const HOLD_TTL: u64 = 30 * 24 * 3600;
/// How often a running restore renews its hold.
pub const RENEW_EVERY: u64 = 24 * 3600;
/// How long after lapsing a hold is deleted.
const LAPSED_GRACE: u64 = 24 * 3600;
/// Largest sealed hold object read.
const MAX_HOLD_BYTES: u64 = 64 << 10;
/// Most holds read by one listing (each one GET).
const MAX_HOLDS: usize = 100_000;

/// A stored hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The held backup's manifest id and `vol@snap`.
    pub backup: String,
    pub name: String,
    /// Who holds it: the restoring pool's uuid and host, the volume being restored.
    pub pool: String,
    pub host: String,
    pub volume: String,
    pub volume_id: u64,
    /// Unix seconds (the holder's clock).
    pub placed: u64,
    pub expires: u64,
}

impl Hold {
    pub fn live_at(&self, t: u64) -> bool {
        t <= self.expires
    }
    /// "the lazy restore of VOLUME on host H (pool P), renewed T".
    pub fn describe(&self) -> String {
        format!(
            "the lazy restore of {} on host {} (pool {}), placed at {} and lapsing at {}",
            self.volume, self.host, self.pool, self.placed, self.expires
        )
    }
}

fn key(backup: &str, pool: &str, volume_id: u64) -> String {
    format!("{HOLDS}{backup}/{pool}-{volume_id}")
}
fn aad(key: &str) -> Vec<u8> {
    format!("snapblk hold {key}").into_bytes()
}

/// Places or renews the hold of the lazy restore of `volume` (id `volume_id`, in pool
/// `pool`) on backup `backup` (`name` = vol@snap).
pub fn place(
    repo: &Repository,
    backup: &str,
    name: &str,
    pool: &str,
    volume: &str,
    volume_id: u64,
) -> Result<Hold> {
    let t = now();
    let h = Hold {
        backup: backup.to_string(),
        name: name.to_string(),
        pool: pool.to_string(),
        host: crate::catalog::host_name(),
        volume: volume.to_string(),
        volume_id,
        placed: t,
        expires: t.saturating_add(HOLD_TTL),
    };
    let k = key(backup, pool, volume_id);
    let json = serde_json::to_vec(&h).map_err(|e| BackupError::invalid("hold", e.to_string()))?;
    repo.store().put(&k, &repo.keys().seal(&json, &aad(&k)))?;
    Ok(h)
}

/// Deletes the hold placed by [`place`] with the same arguments (gone already: fine).
pub fn release(repo: &Repository, backup: &str, pool: &str, volume_id: u64) -> Result<()> {
    match repo.store().delete(&key(backup, pool, volume_id)) {
        Err(e) if !e.is_not_found() => Err(e.into()),
        _ => Ok(()),
    }
}

/// Reads and opens the hold at `k`: None if it is gone or is not a hold of this
/// repository (too large, not sealed by its key, or naming another key).
fn read(repo: &Repository, k: &str) -> Result<Option<Hold>> {
    let sealed = match repo.store().get(k, MAX_HOLD_BYTES) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None), // released meanwhile
        Err(crate::store::StoreError::TooLarge { .. }) => {
            log::warn!(
                "{}: {k} is not a hold of this repository (too large; ignored)",
                repo.describe()
            );
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let opened = repo
        .keys()
        .open(&sealed, &aad(k))
        .and_then(|p| serde_json::from_slice::<Hold>(&p).ok())
        .filter(|h| k == key(&h.backup, &h.pool, h.volume_id));
    if opened.is_none() {
        log::warn!(
            "{}: {k} is not a hold of this repository (ignored)",
            repo.describe()
        );
    }
    Ok(opened)
}

/// Every hold that opens, live or lapsed, with its key. More than `MAX_HOLDS` objects
/// under `holds/` is an error (refusing beats dropping real holds from the count).
pub fn list_all(repo: &Repository) -> Result<Vec<(String, Hold)>> {
    let listed = repo.store().list(HOLDS)?;
    if listed.len() > MAX_HOLDS {
        return Err(BackupError::invalid(
            format!("{}{HOLDS}", repo.describe()),
            format!(
                "{} objects, more than the {MAX_HOLDS} holds a repository may have: remove what is not a hold there",
                listed.len()
            ),
        ));
    }
    let mut out = Vec::new();
    for o in listed {
        if let Some(h) = read(repo, &o.key)? {
            out.push((o.key, h));
        }
    }
    Ok(out)
}

/// The live holds, each with the backup id it keeps.
pub fn live(repo: &Repository) -> Result<Vec<Hold>> {
    let t = now();
    Ok(list_all(repo)?
        .into_iter()
        .filter(|(_, h)| h.live_at(t))
        .map(|(_, h)| h)
        .collect())
}

/// Deletes holds lapsed for more than a day; returns them. Each is read again just
/// before its delete, so a restore that renewed it meanwhile (same key) keeps it, but for
/// the moment between that read and the delete: its next daily renewal puts it back.
pub fn delete_lapsed(repo: &Repository) -> Result<Vec<Hold>> {
    let mut out = Vec::new();
    for (k, h) in list_all(repo)? {
        if h.live_at(now().saturating_sub(LAPSED_GRACE)) {
            continue;
        }
        match read(repo, &k)? {
            Some(again) if again.live_at(now().saturating_sub(LAPSED_GRACE)) => continue,
            None => continue,
            Some(_) => {}
        }
        match repo.store().delete(&k) {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => out.push(h),
        }
    }
    Ok(out)
}
