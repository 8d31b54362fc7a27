//! Backing up a pool's snapshots and restoring into its volumes: chooses the incremental
//! base, gathers the snapshot's allocated ranges, and restores into a new volume (deleted
//! again if the restore fails). Runs wherever the pool is open (the daemon, or the CLI in
//! direct mode).

use std::sync::Arc;

use snapblk_core::device::BLOCK_SIZE_U64;
use snapblk_core::keys::{Filling, Incomplete};
use snapblk_core::names::parse_snap_ref;
use snapblk_core::{Export, Pool, VolumeHandle};

use crate::backup::Base;
use crate::catalog::{self, Catalogs};
use crate::error::{BackupError, Result};
use crate::lazy::{Hydration, Restores, State};
use crate::manifest::Header;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::{backup, restore};

/// NBD_STATE_HOLE in block status flags.
const HOLE: u32 = 1;
/// Block-status query length (the pool answers in pieces).
const STATUS_STEP: u64 = 1 << 30;
/// How many recent candidate bases are compared by diff size.
const MAX_BASE_CANDIDATES: usize = 8;

/// Byte ranges of `src` holding data.
pub fn allocated(src: &dyn Export) -> Result<Vec<(u64, u64)>> {
    let size = src.size()?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    while off < size {
        let len = STATUS_STEP.min(size - off);
        let runs = src.block_status(off, len)?;
        if runs.is_empty() {
            return Err(BackupError::invalid(
                "block status",
                format!("nothing at offset {off}"),
            ));
        }
        for (n, flags) in runs {
            let n = n.min(size - off);
            if flags & HOLE == 0 {
                match out.last_mut() {
                    Some(r) if r.0 + r.1 == off => r.1 += n,
                    _ => out.push((off, n)),
                }
            }
            off += n;
            if n == 0 {
                return Err(BackupError::invalid(
                    "block status",
                    format!("empty run at offset {off}"),
                ));
            }
        }
    }
    Ok(out)
}

/// The backup in `repo` of a snapshot still in this pool that differs least from `snap`.
fn choose_base(pool: &Pool, repo: &Repository, snap: &str) -> Result<Option<Base>> {
    let headers = catalog::load_pool(repo, pool.uuid())?.map_or(Vec::new(), |c| c.catalog.backups);
    let target = pool.resolve_target(snap)?;
    let mut cands: Vec<(&Header, String)> = headers
        .iter()
        .filter(|h| h.chunk_size == repo.config().chunk_size)
        .filter_map(|h| pool.snapshot_by_id(h.snapshot_id).map(|n| (h, n)))
        .collect();
    cands.sort_by_key(|(h, _)| std::cmp::Reverse((h.created, h.snapshot_id, h.backed_up)));
    let mut best: Option<(u64, Base)> = None;
    for (h, name) in cands.into_iter().take(MAX_BASE_CANDIDATES) {
        let ranges: Vec<(u64, u64)> = pool
            .diff(&pool.resolve_target(&name)?, &target)?
            .into_iter()
            .map(|r| (r.offset, r.length))
            .collect();
        let changed: u64 = ranges.iter().map(|r| r.1).sum();
        if best.as_ref().is_none_or(|b| changed < b.0) {
            best = Some((changed, (h.clone(), ranges)));
        }
    }
    Ok(best.map(|(_, b)| b))
}

/// Backs up `vol@snap` of `pool`; incrementally unless `full` or no base is found.
pub fn backup_snapshot(
    pool: &Arc<Pool>,
    repo: &Repository,
    snapshot: &str,
    full: bool,
    progress: &dyn Progress,
) -> Result<backup::Summary> {
    let (v, s) = parse_snap_ref(snapshot)?;
    let info = pool.snapshot_summary(v, s)?;
    let source: Arc<dyn Export> = Arc::new(VolumeHandle::open(pool, snapshot)?);
    // Choosing the base (diffs) and listing what the snapshot holds read its whole map
    // once: in bulk, like the readers' reads, so they do not fill the pool's block cache
    // with it (the pool's store grew by ~20 MiB during a backup of 16 GiB).
    let (base, allocated) = snapblk_core::meta::bulk_reads(|| -> Result<_> {
        let base = if full {
            None
        } else {
            choose_base(pool, repo, snapshot)?
        };
        Ok((base, allocated(&*source)?))
    })?;
    let job = backup::Job {
        allocated,
        source,
        volume: v.to_string(),
        snapshot: s.to_string(),
        snapshot_id: info.id,
        pool: pool.uuid().to_string(),
        created: info.created,
        base,
        readers: repo.parallelism().readers,
        uploaders: repo.parallelism().uploaders,
        host: None,
        compact: true,
    };
    backup::run(repo, job, progress)
}

/// Restores the backup `backup_name` (`vol@snap` or id; from this pool unless `from`
/// names a pool or host, see `Catalogs::choose`) as the new volume `new_volume`.
pub fn restore_volume(
    pool: &Arc<Pool>,
    repo: &Repository,
    backup_name: &str,
    from: Option<&str>,
    new_volume: &str,
    progress: &dyn Progress,
) -> Result<restore::Summary> {
    let h = &Catalogs::load(repo)?.choose(backup_name, Some(pool.uuid()), from)?;
    let size = h.size.div_ceil(BLOCK_SIZE_U64) * BLOCK_SIZE_U64;
    // Marked incomplete from its first commit: if this process dies before the restore
    // ends, the volume says so instead of passing for a good copy.
    let mark = Incomplete {
        by: Filling::FullRestore,
        backup: h.name(),
        manifest: h.id.clone(),
        source: repo.describe(),
    };
    pool.create_volume_marked(new_volume, size, Some(&mark))?;
    let sink = VolumeHandle::open(pool, new_volume)?;
    let done =
        restore::run(repo, h, &sink, repo.parallelism().downloads, progress).and_then(|summary| {
            // restore::run flushed the data; only now is the volume whole.
            pool.set_volume_incomplete(new_volume, None)?;
            Ok(summary)
        });
    done.map_err(|e| {
        drop(sink);
        if let Err(d) = pool.delete_volume(new_volume, false) {
            log::warn!("removing the partly restored volume {new_volume}: {d}");
        }
        BackupError::RestoreFailed {
            volume: new_volume.to_string(),
            cause: Box::new(e),
        }
    })
}

/// Starts a lazy restore of `backup_name` as `new_volume`: the volume is usable as soon as
/// this returns; `restores` serves it while it hydrates. If `new_volume` is an interrupted
/// lazy restore of the same backup (its mark in the pool says so), it resumes.
pub fn restore_lazy(
    pool: &Arc<Pool>,
    repo: &Repository,
    backup_name: &str,
    from: Option<&str>,
    new_volume: &str,
    restores: &Arc<Restores>,
    state_dir: &std::path::Path,
) -> Result<Arc<Hydration>> {
    let _reserved = restores.reserve(new_volume)?;
    let h = &match Catalogs::load(repo)?.choose(backup_name, Some(pool.uuid()), from) {
        Ok(h) => h,
        Err(BackupError::NoSuchBackup(n)) => {
            // An interrupted restore of a backup no catalog lists any more (a prune cut
            // short between its commit and putting held backups back): its hold kept the
            // header, table and chunks, so it resumes from the header its mark names.
            match pool.volume_info(new_volume).ok().and_then(|v| v.incomplete) {
                Some(m) if m.by == Filling::LazyRestore && m.backup == backup_name => {
                    crate::manifest::read_header(repo, &m.manifest)?
                }
                _ => return Err(BackupError::NoSuchBackup(n)),
            }
        }
        Err(e) => return Err(e),
    };
    let mark = Incomplete {
        by: Filling::LazyRestore,
        backup: h.name(),
        manifest: h.id.clone(),
        source: repo.describe(),
    };
    let resume = match pool.volume_info(new_volume) {
        Ok(v) => match v.incomplete {
            Some(m) if m.by == Filling::LazyRestore && m.manifest == h.id => true,
            Some(m) if m.by == Filling::LazyRestore => {
                return Err(BackupError::invalid(
                    new_volume,
                    format!(
                        "is an interrupted lazy restore of {} ({}), not of {}",
                        m.backup, m.manifest, h.id
                    ),
                ))
            }
            _ => return Err(snapblk_core::Error::exists("volume", new_volume).into()),
        },
        Err(snapblk_core::Error::NotFound { .. }) => false,
        Err(e) => return Err(e.into()),
    };
    if !resume {
        // Marked in the commit that creates it: until the hydration below is registered,
        // nothing can open it (LazyExports) or reshape it (crates/daemon/src/admin.rs).
        let size = h.size.div_ceil(BLOCK_SIZE_U64) * BLOCK_SIZE_U64;
        pool.create_volume_marked(new_volume, size, Some(&mark))?;
    }
    let state = State {
        volume: new_volume.to_string(),
        volume_id: pool.volume_info(new_volume)?.id,
        manifest: h.id.clone(),
        backup: h.name(),
        target: repo.describe(),
        pool: pool.uuid().to_string(),
    };
    let again = state.clone();
    let sink: Arc<dyn Export> = Arc::new(VolumeHandle::open(pool, new_volume)?);
    let commit = {
        let (pool, name) = (Arc::clone(pool), new_volume.to_string());
        Box::new(move || pool.set_volume_incomplete(&name, None).map(|_| ()))
    };
    let release = {
        let r = Arc::downgrade(restores);
        Box::new(move |v: &str| {
            if let Some(r) = r.upgrade() {
                r.remove(v);
            }
        })
    };
    let started = Hydration::start(repo, h, !resume, sink, state, state_dir, commit, release)
        .and_then(|hyd| {
            restores.insert(Arc::clone(&hyd));
            hyd.spawn().map(|()| hyd)
        });
    match started {
        Ok(hyd) => Ok(hyd),
        Err(e) if !resume => {
            restores.remove(new_volume);
            if let Err(d) = pool.delete_volume(new_volume, false) {
                log::warn!("removing {new_volume} after a failed lazy restore: {d}");
            }
            let id = &again.volume_id;
            if let Err(d) = crate::hold::release(repo, &h.id, pool.uuid(), *id) {
                log::warn!("releasing the hold of the failed lazy restore of {new_volume}: {d}");
            }
            Err(BackupError::RestoreFailed {
                volume: new_volume.to_string(),
                cause: Box::new(e),
            })
        }
        Err(e) => {
            restores.remove(new_volume);
            restores.suspend_from(again, Some(repo.clone()));
            Err(e)
        }
    }
}
