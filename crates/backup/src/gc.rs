//! Garbage collection of chunks no backup references, safe while backups run.
//!
//! References come from every backup the catalogs list and from stored headers that no
//! catalog lists and none removed (evidence of a rollback: kept); headers of removed
//! backups and tables of backups that never committed are deleted (docs/design.md §12
//! "Catalogs").
//!
//! Two phases with a grace period (default one day, longer than any backup):
//! 1. A pack none of whose chunks is referenced, and which is itself older than the grace
//!    period (so it is not a running backup's fresh pack), is *condemned*: marked with
//!    `trash/<pack>`. Backups ignore chunks in condemned packs (they store them again), and
//!    a backup that reused such a chunk notices the mark before committing its manifest.
//! 2. A condemned pack whose mark is older than the grace period, and which still holds no
//!    referenced chunk, is deleted with its index. A condemned pack referenced again (by a
//!    backup that committed before seeing the mark) is un-marked.
//!
//! Packs whose unreferenced share exceeds `max_unused` are repacked: their live chunks'
//! sealed blobs are copied as they are into new packs, and the old pack is condemned.
//!
//! Memory (docs/design.md §12): the referenced chunks are a Bloom filter sized by the
//! local chunk index (3 bytes per chunk stored, crate::liveset), filled from local copies
//! of the pinning backups' tables a frame at a time; packs are visited a batch of index
//! objects at a time, and which copy of a chunk counts is looked up in the local index.
//! What stays per pack is its name and listing (~150 bytes). A dead chunk the filter
//! wrongly takes for referenced (about 6 in 100,000) stays until a later run.
//!
//! With a grace period of zero, both phases happen in one run. Running jobs' leases set a
//! cut-off; a grace period no longer than the clock slack cannot protect a job that starts
//! during the run, so such a gc takes a sole lease: new jobs wait for it (crate::lease).

use std::collections::{HashMap, HashSet};

use crate::catalog::Catalogs;
use crate::chunks::Chunks;
use crate::config::VERSION_GENERATIONS;
use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::gcgen;
use crate::hold;
use crate::index::{self, Listing, Purpose};
use crate::lease::{self, Lease};
use crate::liveset::LiveSet;
use crate::manifest;
use crate::pack::PackBuilder;
use crate::progress::Progress;
use crate::repo::{self, now, Repository};
use crate::tablecopy::TableCopy;

/// Clock difference allowed between hosts and the store, in seconds.
const CLOCK_SLACK: u64 = 60;

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub grace_secs: u64,
    /// Repack a pack when more than this share of its bytes is unreferenced (0.0 .. 1.0).
    pub max_unused: f64,
    pub dry_run: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            grace_secs: 86_400,
            max_unused: 0.1,
            dry_run: false,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub packs: u64,
    pub packs_condemned: u64,
    pub packs_deleted: u64,
    pub packs_rescued: u64,
    pub packs_repacked: u64,
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    pub bytes_repacked: u64,
    pub orphans_deleted: u64,
    /// Marks in `trash/` naming neither a pack nor an index (left by a gc that died
    /// between its deletes), removed.
    pub stray_marks_deleted: u64,
    /// Entries of packs kept because a backup may reference them (the copies readers
    /// pick; a chunk in two packs, one of them new since the listing, counts twice).
    pub chunks_referenced: u64,
    /// Headers of backups removed from their catalog, deleted (an interrupted prune).
    pub leftovers_deleted: Vec<String>,
    /// Headers no catalog lists and none removed (`vol@snap (id)`): kept, with their
    /// chunks; `backup verify` reports them.
    pub uncatalogued: Vec<String>,
    /// Tables of backups that never committed, deleted once older than the grace period.
    pub orphan_tables_deleted: u64,
    /// Leases of jobs that died (not refreshed within their lifetime), removed.
    pub leases_broken: Vec<String>,
    /// Start of the oldest job whose lease was live when gc listed the leases (less a
    /// minute): nothing newer was condemned or deleted.
    pub cutoff: Option<u64>,
    /// The index generation this run wrote (format 5).
    pub generation: Option<u64>,
}

/// How much earlier than gc's lease listing (or the oldest live job's start) a
/// generation's cut lies: index objects stamped after it are listed by every job, so
/// the slack covers hosts whose clocks differ (each within 30 s of the store's:
/// crate::lease, Clocks) with a wide margin (docs/design.md §12 "Index generations",
/// The cut).
pub const CUT_SLACK_MS: u64 = 15 * 60 * 1000;

/// The cut of the generation a gc that listed `leases` at `t` writes.
fn cut_ms(t: u64, leases: &[(String, lease::Record)]) -> u64 {
    let oldest = leases
        .iter()
        .filter(|(_, r)| r.kind == lease::Kind::Shared && r.live_at(t))
        .map(|(_, r)| r.started)
        .min()
        .unwrap_or(t);
    t.min(oldest)
        .saturating_mul(1000)
        .saturating_sub(CUT_SLACK_MS)
}

pub fn run(repo: &Repository, opts: &Options, progress: &dyn Progress) -> Result<Report> {
    let store = repo.store();
    // Exclusive: no other gc runs; shared leases of running jobs set the cut-off. Taken,
    // and the leases listed, before anything referenced is read: a backup that commits
    // after the catalogs are loaded held its lease when the leases were listed (or, with
    // a sole lease, waits for this run).
    let lease = if opts.dry_run {
        None
    } else {
        let sole = opts.grace_secs <= CLOCK_SLACK;
        let job = if sole { "gc (no grace period)" } else { "gc" };
        Some(Lease::exclusive_with(repo, job, sole)?)
    };
    let leases = lease::list(repo)?;
    let t = now();
    let catalogs = Catalogs::load(repo)?;
    // Backups unfinished lazy restores hold: kept even if a prune just removed them (it
    // puts them back when it sees the hold; crate::hold).
    let held: HashSet<String> = hold::live(repo)?.into_iter().map(|h| h.backup).collect();
    let (stored, bad) = manifest::list(repo)?;
    if let Some((id, e)) = bad.first() {
        return Err(BackupError::invalid(
            "gc",
            format!("manifest {id} cannot be read ({e}); refusing to collect while its references are unknown"),
        ));
    }
    let mut rep = Report::default();
    if !opts.dry_run {
        rep.leases_broken = lease::break_stale(repo, &leases)?
            .into_iter()
            .map(|r| format!("{} (host {}, pid {})", r.job, r.host, r.pid))
            .collect();
    }
    // Nothing written or condemned after the oldest live job started is touched (less a
    // minute for clocks that differ between hosts and the store).
    let cutoff = leases
        .iter()
        .filter(|(id, r)| {
            r.kind == lease::Kind::Shared
                && r.live_at(t)
                && lease.as_ref().is_none_or(|l| l.id() != id)
        })
        .map(|(_, r)| r.started.saturating_sub(CLOCK_SLACK))
        .min()
        .unwrap_or(u64::MAX);
    rep.cutoff = (cutoff != u64::MAX).then_some(cutoff);
    let old = |since: u64| {
        since < cutoff && (opts.grace_secs == 0 || t.saturating_sub(since) >= opts.grace_secs)
    };
    // What pins chunks: every catalogued backup, every held one, and every stored header
    // no catalog lists that was not removed from one (evidence of a rolled-back catalog:
    // kept, with its chunks, for `backup verify` to report). Headers of removed backups
    // nothing holds are leftovers of an interrupted prune: deleted.
    let mut pinning = catalogs.headers();
    let mut headers: HashSet<String> = HashSet::new();
    for h in stored {
        headers.insert(h.id.clone());
        if catalogs.contains(&h.id) {
            continue;
        }
        if held.contains(&h.id) {
            pinning.push(h);
            continue;
        }
        if catalogs.removed(&h.pool, &h.id) {
            rep.leftovers_deleted
                .push(format!("{} ({})", h.name(), h.id));
            if !opts.dry_run {
                manifest::delete(repo, &h)?;
            }
        } else {
            rep.uncatalogued.push(format!("{} ({})", h.name(), h.id));
            pinning.push(h);
        }
    }
    // Jobs that start now only wait for a lease they see live: a gc whose refreshes
    // failed for half the lease lifetime deletes nothing more.
    let still_held = || lease.as_ref().map_or(Ok(()), |l| l.check());
    still_held()?;
    // Tables of backups that never committed (cut short before their catalog entry):
    // `tables/<id>`, or a frame `tables/<id>/<k>` (each judged by its own age).
    for o in store.list(repo::TABLES)? {
        let Some(id) = o.key.strip_prefix(repo::TABLES) else {
            continue;
        };
        let id = id.split('/').next().unwrap_or(id);
        if !catalogs.contains(id) && !headers.contains(id) && old(o.modified) {
            rep.orphan_tables_deleted += 1;
            if !opts.dry_run {
                store.delete(&o.key)?;
            }
        }
    }
    // Which chunks the pinning backups reference: a filter over the local chunk index's
    // size (crate::liveset: 3 bytes per chunk stored, never a miss; a dead chunk it
    // wrongly keeps goes at a later run, whose seed differs), filled a table frame at a
    // time from local copies. Which copy of a chunk counts is decided per pack below,
    // as every reader decides it (crate::index), from the local index.
    // One listing for every pack's standing: the copies of a chunk are ranked against
    // each other as of one moment (two listings could see the chosen copy's pack lose
    // rank in between, and no copy would be chosen).
    let listing = Listing::take(repo)?;
    let chunks = Chunks::from_listing(repo, &listing)?;
    let mut live = LiveSet::with_capacity(chunks.records());
    for h in &pinning {
        let copy = match TableCopy::take(repo, h) {
            Ok(c) => c,
            Err(e @ BackupError::Lost { .. }) => {
                return Err(BackupError::invalid(
                    "gc",
                    format!(
                        "{e}; refusing to collect until it is restored from elsewhere or forgotten"
                    ),
                ))
            }
            Err(e) => return Err(e),
        };
        for k in 0..copy.count() {
            for (_, id) in copy.frame(k)?.cells {
                live.insert(&id);
            }
        }
    }
    log::info!(
        "gc of {}: {} references from {} backups in a {} KiB filter",
        repo.describe(),
        live.insertions(),
        pinning.len(),
        live.bytes() / 1024
    );
    let marks: HashMap<String, u64> = store
        .list(repo::TRASH)?
        .into_iter()
        .filter_map(|o| Some((o.key.strip_prefix(repo::TRASH)?.to_string(), o.modified)))
        .collect();
    let objects: HashMap<String, (u64, u64)> = store
        .list(repo::PACKS)?
        .into_iter()
        .filter_map(|o| Some((o.key.rsplit('/').next()?.to_string(), (o.size, o.modified))))
        .collect();
    progress.start("gc", listing.indexes.len() as u64);
    // Packs to delete, decided during the visit and deleted only at the end, after the
    // repack puts and the generation that no longer names them (docs/design.md §12
    // "Index generations", gc's order).
    let mut doomed: Vec<String> = Vec::new();
    let mut delete_pack = |id: &str, rep: &mut Report, chunks: usize| -> Result<()> {
        rep.packs_deleted += 1;
        rep.chunks_deleted += chunks as u64;
        rep.bytes_deleted += objects.get(id).map_or(0, |o| o.0);
        doomed.push(id.to_string());
        Ok(())
    };
    let condemn = |id: &str, rep: &mut Report| -> Result<()> {
        rep.packs_condemned += 1;
        if !opts.dry_run {
            let mark = serde_json::json!({ "condemned": now() }).to_string();
            store.put(&repo::trash_key(id), mark.as_bytes())?;
        }
        Ok(())
    };
    // Every pack with an index, a batch of index objects at a time.
    let mut indexed: HashSet<String> = HashSet::new();
    index::visit_listed(repo, Purpose::Read, &listing, |info| {
        still_held()?;
        progress.advance(1);
        rep.packs += 1;
        indexed.insert(info.id.clone());
        // The entries restores read from this pack: referenced, and this pack's copy the
        // one readers pick (a pack this job's listing did not have: every referenced
        // entry, as only a pack newer than that listing can be, and gc keeps those).
        let known = chunks.knows(&info.id);
        let rank = info.rank();
        let mut keep: HashSet<ChunkId> = HashSet::new();
        for e in &info.entries {
            if live.may_contain(&e.id) && (!known || chunks.is_chosen(&e.id, &info.id, rank)?) {
                keep.insert(e.id);
            }
        }
        rep.chunks_referenced += keep.len() as u64;
        // (A pack object missing from the later listing of `packs/` counts as stored now,
        // not as ancient: too young to condemn.)
        let modified = objects.get(&info.id).map_or(t, |o| o.1);
        if info.condemned {
            if !keep.is_empty() {
                rep.packs_rescued += 1;
                if !opts.dry_run {
                    store.delete(&repo::trash_key(&info.id))?;
                }
            } else if old(marks.get(&info.id).copied().unwrap_or(t)) {
                // (A mark missing from the listing counts as made now, not as ancient.)
                delete_pack(&info.id, &mut rep, info.entries.len())?;
            }
            return Ok(());
        }
        if keep.is_empty() {
            if old(modified) {
                condemn(&info.id, &mut rep)?;
                if old(t) {
                    delete_pack(&info.id, &mut rep, info.entries.len())?;
                }
            }
            return Ok(());
        }
        let total: u64 = info.entries.iter().map(|e| u64::from(e.len)).sum();
        let live_bytes: u64 = info
            .entries
            .iter()
            .filter(|e| keep.contains(&e.id))
            .map(|e| u64::from(e.len))
            .sum();
        let unused = 1.0 - live_bytes as f64 / total.max(1) as f64;
        if unused <= opts.max_unused || !old(modified) {
            return Ok(());
        }
        rep.packs_repacked += 1;
        rep.bytes_repacked += live_bytes;
        if opts.dry_run {
            return Ok(());
        }
        let bytes = store.get(&repo::pack_key(&info.id), crate::pack::MAX_PACK_OBJECT)?;
        let mut b = PackBuilder::default();
        for e in info.entries.iter().filter(|e| keep.contains(&e.id)) {
            let blob = bytes
                .get(e.offset as usize..e.offset as usize + e.len as usize)
                .ok_or_else(|| {
                    BackupError::corrupt(repo::pack_key(&info.id), "shorter than its index")
                })?;
            b.add(e.id, blob);
        }
        let np = b.finish(repo.keys());
        let len = np.bytes.len() as u64;
        repo.paced(len + np.index.len() as u64, || {
            store.put_owned(&repo::pack_key(&np.id), np.bytes)?;
            index::put_index(repo, lease.as_ref(), &np.id, len, &np.index)
        })?;
        condemn(&info.id, &mut rep)?;
        if old(t) {
            let dead = info.entries.len() - keep.len();
            delete_pack(&info.id, &mut rep, dead)?;
        }
        Ok(())
    })?;
    // Packs without an index: a backup died between storing a pack and its index.
    let mut orphans: Vec<&String> = Vec::new();
    for (id, (size, modified)) in &objects {
        if !indexed.contains(id) && old(*modified) {
            rep.orphans_deleted += 1;
            rep.bytes_deleted += size;
            orphans.push(id);
        }
    }
    // Marks naming neither a pack nor an index: a gc that died between its three deletes
    // (pack, index, mark) left them, and no visit reaches them again (gc visits indexed
    // packs), so each stayed in every job's `trash/` listing for good. Only gc writes
    // marks, for indexed packs, and pack ids are hashes of sealed blobs with random
    // nonces: no pack appears under such a name later, and removing the mark changes
    // nothing any job decides (its pack is absent from every listing already).
    let stray: Vec<&String> = marks
        .keys()
        .filter(|id| !indexed.contains(*id) && !objects.contains_key(*id))
        .collect();
    rep.stray_marks_deleted = stray.len() as u64;
    if opts.dry_run {
        return Ok(rep);
    }
    if repo.config().version >= VERSION_GENERATIONS {
        still_held()?;
        let deleted: Vec<&str> = doomed
            .iter()
            .map(String::as_str)
            .chain(orphans.iter().map(|o| o.as_str()))
            .collect();
        let inputs = gcgen::Inputs {
            listing: &listing,
            objects: &objects,
            deleted: &deleted,
            cut_ms: cut_ms(t, &leases),
            now: t,
            retire_before: cutoff.min(t),
        };
        rep.generation = Some(gcgen::advance(repo, &inputs)?);
    }
    still_held()?;
    for id in &doomed {
        store.delete(&repo::pack_key(id))?;
        if let Some(i) = index::find(&listing.indexes, id) {
            store.delete(&i.key())?;
        }
        store.delete(&repo::trash_key(id))?;
    }
    for id in orphans {
        store.delete(&repo::pack_key(id))?;
    }
    for id in stray {
        store.delete(&repo::trash_key(id))?;
    }
    Ok(rep)
}
