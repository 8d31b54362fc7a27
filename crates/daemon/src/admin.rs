//! The management command set, executed the same way whether it came over the control
//! socket (daemon) or from the CLI on a directly opened pool.

use std::sync::Arc;

use snapblk_backup::{volume, Progress};
use snapblk_core::keys::Filling;
use snapblk_core::names::parse_snap_ref;
use snapblk_core::Pool;

use crate::devices::{self, Devices};
use crate::error::{DaemonError, Result};
use crate::repos::RepoOpen;
pub use snapblk_control::Command;
use snapblk_control::{reply, Reply};
use snapblk_metrics::Outcome;

/// Executes `cmd`; `devices` is the daemon's ublk registry (None in direct mode);
/// long commands report to `progress`.
pub fn execute(
    pool: &Arc<Pool>,
    devices: Option<&Devices>,
    cmd: &Command,
    progress: &dyn Progress,
) -> Result<Reply> {
    if let Some(vol) = touched_volume(cmd) {
        let deleting = matches!(cmd, Command::VolumeDelete { .. });
        check_whole(pool, &vol, deleting)?;
        if let Some(d) = devices {
            d.check_not_restoring(&vol, deleting)?;
        }
    }
    Ok(match cmd {
        Command::Backup {
            snapshot,
            repo,
            full,
        } => {
            let t0 = std::time::Instant::now();
            let r = repo.open().and_then(|r| {
                Ok(volume::backup_snapshot(
                    pool, &r, snapshot, *full, progress,
                )?)
            });
            if let Some(m) = devices.and_then(|d| d.metrics.get()) {
                if let Ok(s) = &r {
                    let created = u64::from(!s.already_stored);
                    m.jobs.backed_up(&repo.url, created, s.stats.bytes_uploaded);
                }
                m.jobs
                    .finished("backup", Outcome::of(r.is_ok()), t0.elapsed().as_secs_f64());
            }
            Reply::Backup(r?)
        }
        Command::Restore {
            repo,
            backup,
            name,
            lazy: false,
            from,
        } => {
            let t0 = std::time::Instant::now();
            let r = repo.open().and_then(|r| {
                Ok(volume::restore_volume(
                    pool,
                    &r,
                    backup,
                    from.as_deref(),
                    name,
                    progress,
                )?)
            });
            if let Some(m) = devices.and_then(|d| d.metrics.get()) {
                if let Ok(s) = &r {
                    m.jobs.restored(s.bytes_written);
                }
                m.jobs.finished(
                    "restore",
                    Outcome::of(r.is_ok()),
                    t0.elapsed().as_secs_f64(),
                );
            }
            Reply::Restore(r?)
        }
        Command::Restore {
            repo,
            backup,
            name,
            lazy: true,
            from,
        } => {
            let d = devices.ok_or_else(|| {
                DaemonError::NeedsDaemon(
                    "a lazy restore needs the daemon (it serves the volume while it hydrates)"
                        .into(),
                )
            })?;
            let t0 = std::time::Instant::now();
            let h = volume::restore_lazy(
                pool,
                &repo.open()?,
                backup,
                from.as_deref(),
                name,
                &d.restores,
                &d.restore_dir,
            )?;
            let mut v = h.status();
            v.ready_seconds = Some(t0.elapsed().as_secs_f64());
            Reply::Restoring(v)
        }
        Command::RestoreStatus => Reply::Restores(devices::need(devices)?.restores.status()),
        Command::RestoreCancel { volume } => {
            if !devices::need(devices)?.restores.cancel(volume) {
                return Err(snapblk_core::Error::not_found("lazy restore", volume).into());
            }
            Reply::Cancelled(reply::Cancelled {
                cancelled: volume.clone(),
            })
        }
        Command::Attach {
            target,
            read_only,
            queues,
            depth,
        } => Reply::Device(devices::need(devices)?.attach(target, *read_only, *queues, *depth)?),
        Command::Detach { what } => Reply::Device(devices::need(devices)?.detach(what)?),
        Command::List => Reply::Devices(devices::need(devices)?.list()),
        Command::PoolInfo => Reply::Pool(pool.info()),
        Command::PoolCompact => Reply::Pool(pool.compact_metadata()?),
        Command::PoolCheck => Reply::Check(pool.check()?),
        Command::PoolScrub => {
            let started = std::sync::atomic::AtomicBool::new(false);
            let last = std::sync::atomic::AtomicU64::new(0);
            Reply::Scrub(pool.scrub(&|done, total| {
                use std::sync::atomic::Ordering;
                if !started.swap(true, Ordering::Relaxed) {
                    progress.start("scrub", total);
                }
                progress.advance(done - last.swap(done, Ordering::Relaxed));
            })?)
        }
        Command::PolicySet { .. }
        | Command::PolicyList
        | Command::PolicyShow { .. }
        | Command::PolicyDelete { .. }
        | Command::PolicyPlan { .. }
        | Command::Jobs
        | Command::JobRun { .. }
        | Command::PolicyBackupSet { .. }
        | Command::PolicyBackupDelete { .. }
        | Command::RepoSet { .. }
        | Command::RepoList
        | Command::Status { .. }
        | Command::NotifySet { .. }
        | Command::NotifyShow
        | Command::NotifyTest
        | Command::SpaceGuard { .. }
        | Command::BackupsChanged { .. }
        | Command::RepoDelete { .. } => match devices.and_then(|d| d.policies.get()) {
            Some(service) => service.execute(cmd)?,
            // Direct mode: the pool's policies, for this one command.
            None => crate::policies::PolicyService::open(Arc::clone(pool))?.execute(cmd)?,
        },
        Command::VolumeCreate { name, size } => Reply::Volume(pool.create_volume(name, *size)?),
        Command::VolumeList => Reply::Volumes(pool.list_volumes()),
        Command::VolumeSetDefault { name, clear } => {
            if name.is_some() || *clear {
                pool.set_default_volume(name.as_deref())?;
            }
            Reply::DefaultVolume(reply::DefaultVolume {
                default_volume: pool.default_volume()?,
            })
        }
        Command::VolumeInfo { name } => Reply::Volume(pool.volume_info(name)?),
        Command::VolumeResize { name, size, force } => Reply::Resized(reply::Resized {
            volume: pool.resize_volume(name, *size, *force)?,
            devices: devices.map(|d| d.resized(name, *size)).unwrap_or_default(),
        }),
        Command::VolumeRename { old, new } => Reply::Volume(pool.rename_volume(old, new)?),
        Command::VolumeDelete { name, recursive } => {
            let id = pool.volume_info(name)?.id;
            pool.delete_volume(name, *recursive)?;
            if let Some(d) = devices {
                d.forget_restore(name, id);
            }
            Reply::Deleted(reply::Deleted {
                deleted: name.clone(),
            })
        }
        Command::SnapshotCreate {
            snapshot,
            group: true,
        } => {
            let (g, s) = parse_snap_ref(snapshot)?;
            for member in pool.group(g)? {
                check_whole(pool, &member, false)?;
                if let Some(d) = devices {
                    d.check_not_restoring(&member, false)?;
                }
            }
            let t0 = std::time::Instant::now();
            let infos = pool.create_group_snapshot(g, s)?;
            Reply::GroupSnapshot(reply::GroupSnapshot {
                group: g.to_string(),
                snapshots: infos,
                create_micros: t0.elapsed().as_micros() as u64,
            })
        }
        Command::GroupSet { name, volumes } => {
            let check = |s: &crate::policies::PolicyService| s.check_group(name, volumes);
            match devices.and_then(|d| d.policies.get()) {
                Some(service) => check(service)?,
                None => check(&*crate::policies::PolicyService::open(Arc::clone(pool))?)?,
            }
            pool.set_group(name, volumes)?;
            Reply::GroupSet(reply::GroupSet {
                group: name.clone(),
                volumes: volumes.clone(),
            })
        }
        Command::GroupList => Reply::Groups(
            pool.groups()?
                .into_iter()
                .map(|(name, volumes)| reply::Group { name, volumes })
                .collect(),
        ),
        Command::GroupDelete { name } => {
            pool.delete_group(name)?;
            Reply::Deleted(reply::Deleted {
                deleted: name.clone(),
            })
        }
        Command::SnapshotCreate {
            snapshot,
            group: false,
        } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            let t0 = std::time::Instant::now();
            let info = pool.create_snapshot(v, s)?;
            Reply::Snapshot(reply::Snapshot {
                snapshot: info,
                create_micros: Some(t0.elapsed().as_micros() as u64),
            })
        }
        Command::SnapshotList { volume } => {
            Reply::Snapshots(pool.list_snapshots(volume.as_deref())?)
        }
        Command::SnapshotInfo { snapshot } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            Reply::Snapshot(reply::Snapshot {
                snapshot: pool.snapshot_info(v, s)?,
                create_micros: None,
            })
        }
        Command::SnapshotDelete { snapshot } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            pool.delete_snapshot(v, s)?;
            Reply::Deleted(reply::Deleted {
                deleted: snapshot.clone(),
            })
        }
        Command::SnapshotProtect { snapshot, protect } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            pool.set_snapshot_protected(v, s, *protect)?;
            Reply::Snapshot(reply::Snapshot {
                snapshot: pool.snapshot_summary(v, s)?,
                create_micros: None,
            })
        }
        Command::VolumeSetQuota { name, quota } => Reply::Volume(pool.set_quota(name, *quota)?),
        Command::Clone { snapshot, name } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            Reply::Volume(pool.clone_snapshot(v, s, name)?)
        }
        Command::Rollback { snapshot } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            Reply::Volume(pool.rollback(v, s)?)
        }
        Command::Diff { from, to } => {
            let a = pool.resolve_target(from)?;
            let b = pool.resolve_target(to)?;
            let ranges = pool.diff(&a, &b)?;
            let bytes: u64 = ranges.iter().map(|r| r.length).sum();
            Reply::Diff(reply::Diff {
                from: from.clone(),
                to: to.clone(),
                changed_bytes: bytes,
                ranges,
            })
        }
    })
}

/// Refuses to snapshot, roll back, rename or resize a volume whose restore has not
/// finished (it is marked incomplete in the pool, so this holds in direct mode too, with
/// the daemon stopped); deleting it is how an interrupted restore is abandoned.
fn check_whole(pool: &Pool, vol: &str, deleting: bool) -> Result<()> {
    let Ok(info) = pool.volume_info(vol) else {
        return Ok(()); // the command itself reports a missing volume
    };
    match info.incomplete {
        Some(_) if deleting => Ok(()),
        Some(m) => Err(DaemonError::InUse(format!(
            "volume {vol} is not whole: {m}; {}",
            match m.by {
                Filling::LazyRestore =>
                    "wait until `snapblk restore-status` shows it complete (resume an interrupted one with `snapblk restore ... --lazy`), or delete it",
                Filling::FullRestore => "delete it and restore again",
            }
        ))),
        None => Ok(()),
    }
}

/// The volume a command snapshots, clones from, reshapes or removes: such commands must
/// wait until a lazy restore into it completes.
fn touched_volume(cmd: &Command) -> Option<String> {
    let vol_of = |s: &str| parse_snap_ref(s).map(|(v, _)| v.to_string()).ok();
    match cmd {
        Command::SnapshotCreate {
            snapshot,
            group: false,
        }
        | Command::Rollback { snapshot } => vol_of(snapshot),
        Command::VolumeResize { name, .. } | Command::VolumeDelete { name, .. } => {
            Some(name.clone())
        }
        Command::VolumeRename { old, .. } => Some(old.clone()),
        _ => None,
    }
}

/// Whether a command changes the pool (direct mode then lets reclaim finish before exit).
pub fn mutates(cmd: &Command) -> bool {
    !matches!(
        cmd,
        Command::PoolInfo
            | Command::PoolCompact
            | Command::PoolCheck
            | Command::PoolScrub
            | Command::VolumeList
            | Command::VolumeInfo { .. }
            | Command::SnapshotList { .. }
            | Command::SnapshotInfo { .. }
            | Command::Diff { .. }
            | Command::List
            | Command::RestoreStatus
            | Command::PolicyList
            | Command::PolicyShow { .. }
            | Command::PolicyPlan { .. }
            | Command::Jobs
            | Command::GroupList
            | Command::VolumeSetDefault {
                name: None,
                clear: false
            }
    )
}
