//! gc's side of index generations (format 5; docs/design.md §12 "Index generations"):
//! writing the next generation from gc's full listing, and retiring old ones.
//!
//! Called by gc after its repack puts and before any deletion, under its exclusive
//! lease (so no other writer of generations runs). The new generation names every pack
//! gc's listing found with both an index object and a pack object, minus the packs this
//! run deletes; packs written since (their index objects are stamped at or after the
//! cut) are listed by each job. A generation is deleted once its successor's head was
//! stored before the oldest live job started (no live job may be reading it; a job
//! that still meets a 404 loads again).

use std::collections::{HashMap, HashSet};

use crate::error::{BackupError, Result};
use crate::generation::{self, id_bytes, Generation, Pack, KEEP_DELETED_RUNS};
use crate::index::Listing;
use crate::repo::Repository;

/// What gc hands over.
pub struct Inputs<'a> {
    /// gc's listing of index objects, packs and marks.
    pub listing: &'a Listing,
    /// Pack objects listed: id -> (size, store time).
    pub objects: &'a HashMap<String, (u64, u64)>,
    /// Packs this run deletes (condemned ones and orphans).
    pub deleted: &'a [&'a str],
    /// The cut (milliseconds).
    pub cut_ms: u64,
    /// gc's clock (seconds) when it listed the leases.
    pub now: u64,
    /// Generations whose successor's head was stored before this (seconds) are deleted.
    pub retire_before: u64,
}

/// Writes the next generation; returns its number.
pub fn advance(repo: &Repository, inp: &Inputs<'_>) -> Result<u64> {
    let (heads, parts) = generation::list(repo)?;
    let prev = match heads.last() {
        Some(&(n, _)) => {
            let p = generation::read(repo, n)?;
            repo.check_index_generation(n, &p.head_hash)?;
            Some(p)
        }
        None => None,
    };
    let number = prev.as_ref().map_or(1, |p| p.generation.number + 1);
    let gone: HashSet<&str> = inp.deleted.iter().copied().collect();
    let mut packs: Vec<Pack> = inp
        .listing
        .indexes
        .iter()
        .filter(|i| !gone.contains(i.id.as_str()))
        .filter_map(|i| {
            let (size, _) = inp.objects.get(&i.id)?;
            Some(Pack {
                id: id_bytes(&i.id)?,
                stamp: i.stamp,
                modified: i.modified,
                // An `ix/` key names its size (jobs rebuild the key from this record).
                size: if i.stamp.is_some() { i.size } else { *size },
            })
        })
        .collect();
    packs.sort_unstable_by_key(|p| p.id);
    let mut deleted: Vec<([u8; 32], u64)> = inp
        .deleted
        .iter()
        .filter_map(|id| Some((id_bytes(id)?, number)))
        .collect();
    if let Some(p) = &prev {
        deleted.extend(
            p.generation
                .deleted
                .iter()
                .filter(|(_, by)| by.saturating_add(KEEP_DELETED_RUNS) > number),
        );
    }
    // Newest record of an id first, then one per id.
    deleted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    deleted.dedup_by_key(|d| d.0);
    let g = Generation {
        number,
        cut_ms: inp.cut_ms,
        created: inp.now,
        packs,
        deleted,
    };
    let prev_hash = prev.as_ref().map(|p| p.head_hash.as_str());
    let Some(hash) = generation::write(repo, &g, prev_hash)? else {
        return Err(BackupError::invalid(
            format!("index generation {number} of {}", repo.describe()),
            "was written by another gc meanwhile (gc runs hold an exclusive lease: is a host's clock or lease broken?)",
        ));
    };
    repo.check_index_generation(number, &hash)?;
    retire(repo, &heads, &parts, number, inp.retire_before)?;
    Ok(number)
}

/// Deletes generations older than `newest` whose successor was stored before `before`,
/// and parts no head names (left by a gc that died before its head).
fn retire(
    repo: &Repository,
    heads: &[(u64, u64)],
    parts: &std::collections::BTreeMap<u64, Vec<String>>,
    newest: u64,
    before: u64,
) -> Result<()> {
    let store = repo.store();
    let headed: HashSet<u64> = heads.iter().map(|h| h.0).chain([newest]).collect();
    for (i, &(n, _)) in heads.iter().enumerate() {
        // The new head's store time is now: never before `before`.
        let successor_stored = heads.get(i + 1).map_or(u64::MAX, |h| h.1);
        if successor_stored < before {
            for k in parts.get(&n).into_iter().flatten() {
                store.delete(k)?;
            }
            store.delete(&generation::head_key(n))?;
        }
    }
    for (n, keys) in parts {
        if !headed.contains(n) {
            for k in keys {
                store.delete(k)?;
            }
        }
    }
    Ok(())
}
