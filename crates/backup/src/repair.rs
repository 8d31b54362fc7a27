//! `repo repair`: makes the pack indexes agree with the packs, and says what could not be
//! recovered.
//!
//! - A pack without an `index/` object gets one again, read from the pack's own trailer
//!   (the same index, stored inside every pack) and sealed under the pack's name; a pack
//!   whose trailer does not open is reported (its chunks cannot be located).
//! - An index whose pack is gone is removed, so nothing dedups against chunks that are not
//!   stored; every backup that references a chunk no remaining pack holds is reported
//!   with how many chunks it misses (its restore would fail; back up again).
//!
//! Reads every pack that lacks an index and every manifest table; writes only `index/`.

use std::collections::{HashMap, HashSet};

use crate::catalog::Catalogs;
use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::index::{self, ChunkIndex, Purpose};
use crate::lease::Lease;
use crate::manifest;
use crate::pack::{encode_index, index_aad, index_from_pack, MAX_PACK_OBJECT};
use crate::repo::{self, Repository};

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub packs: u64,
    pub indexes: u64,
    /// Packs whose index was rebuilt from their trailer.
    pub indexes_rebuilt: Vec<String>,
    /// Indexes removed because their pack is gone.
    pub indexes_removed: Vec<String>,
    /// Packs that lack an index and whose trailer cannot be read: (pack, why).
    pub packs_unreadable: Vec<(String, String)>,
    /// Backups referencing chunks no pack holds: (vol@snap (id), chunks missing).
    pub backups_damaged: Vec<(String, u64)>,
    pub dry_run: bool,
}

impl Report {
    /// Whether everything the repository references is stored and located.
    pub fn is_clean(&self) -> bool {
        self.packs_unreadable.is_empty() && self.backups_damaged.is_empty()
    }
}

fn ids_under(repo: &Repository, prefix: &str) -> Result<HashSet<String>> {
    Ok(repo
        .store()
        .list(prefix)?
        .into_iter()
        .filter_map(|o| o.key.rsplit('/').next().map(str::to_string))
        .collect())
}

pub fn run(repo: &Repository, dry_run: bool) -> Result<Report> {
    let store = repo.store();
    // Shared, as a backup's: a rebuilt format-5 index object is stamped by it, and gc
    // keeps what this run's listing saw while it lives.
    let lease = if dry_run {
        None
    } else {
        Some(Lease::shared(repo, "repair")?)
    };
    let packs = ids_under(repo, repo::PACKS)?;
    let listed = index::list_indexes(repo)?;
    let indexes: HashSet<String> = listed.iter().map(|i| i.id.clone()).collect();
    let mut rep = Report {
        packs: packs.len() as u64,
        indexes: indexes.len() as u64,
        dry_run,
        ..Default::default()
    };
    let mut sorted: Vec<&String> = packs.difference(&indexes).collect();
    sorted.sort();
    for id in sorted {
        let key = repo::pack_key(id);
        let rebuilt = store
            .get(&key, MAX_PACK_OBJECT)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                let entries = index_from_pack(repo.keys(), id, &bytes)?;
                // Sealed under the pack's name (a format-1 trailer is not).
                let sealed = repo.keys().seal(&encode_index(&entries), &index_aad(id));
                Ok((sealed, bytes.len() as u64))
            });
        match rebuilt {
            Ok((index, size)) => {
                if !dry_run {
                    index::put_index(repo, lease.as_ref(), id, size, &index)?;
                }
                rep.indexes_rebuilt.push(id.clone());
            }
            Err(why) => rep.packs_unreadable.push((id.clone(), why)),
        }
    }
    let mut gone: Vec<&String> = indexes.difference(&packs).collect();
    gone.sort();
    for id in gone {
        if let (false, Some(i)) = (dry_run, index::find(&listed, id)) {
            store.delete(&i.key())?;
        }
        rep.indexes_removed.push(id.clone());
    }
    // What every backup needs, against what the (repaired) indexes locate in existing packs.
    let stored: HashSet<ChunkId> = if dry_run {
        let ix = ChunkIndex::load(repo, Purpose::Read)?;
        ix.packs
            .iter()
            .filter(|p| packs.contains(&p.id) && !rep.packs_unreadable.iter().any(|u| u.0 == p.id))
            .flat_map(|p| p.entries.iter().map(|e| e.id))
            .collect()
    } else {
        ChunkIndex::load(repo, Purpose::Read)?
            .map
            .keys()
            .copied()
            .collect()
    };
    let headers = Catalogs::load(repo)?.headers();
    let mut damaged: HashMap<String, u64> = HashMap::new();
    for h in &headers {
        let t = match manifest::read_table(repo, h) {
            Ok(t) => t,
            Err(BackupError::Lost { backup, .. }) => {
                damaged.insert(backup, h.cells);
                continue;
            }
            Err(e) => return Err(e),
        };
        let missing = t
            .cells
            .iter()
            .map(|(_, c)| c)
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|c| !stored.contains(c))
            .count() as u64;
        if missing > 0 {
            damaged.insert(format!("{} ({})", h.name(), h.id), missing);
        }
    }
    rep.backups_damaged = damaged.into_iter().collect();
    rep.backups_damaged.sort();
    Ok(rep)
}
