//! The management command set, executed the same way whether it came over the control
//! socket (daemon) or from the CLI on a directly opened pool.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use snapblk_backup::{volume, Progress};
use snapblk_core::keys::Filling;
use snapblk_core::names::parse_snap_ref;
use snapblk_core::Pool;

use crate::devices::{self, Devices};
use crate::repos::RepoOpen;
pub use snapblk_control::Command;
use snapblk_metrics::Outcome;

fn to_value<T: Serialize>(v: T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Executes `cmd`; `devices` is the daemon's ublk registry (None in direct mode);
/// long commands report to `progress`.
pub fn execute(
    pool: &Arc<Pool>,
    devices: Option<&Devices>,
    cmd: &Command,
    progress: &dyn Progress,
) -> anyhow::Result<Value> {
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
            to_value(r?)
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
            to_value(r?)
        }
        Command::Restore {
            repo,
            backup,
            name,
            lazy: true,
            from,
        } => {
            let d = devices.ok_or_else(|| {
                anyhow::anyhow!(
                    "a lazy restore needs the daemon (it serves the volume while it hydrates)"
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
            v["ready_seconds"] = json!(t0.elapsed().as_secs_f64());
            v
        }
        Command::RestoreStatus => json!(devices::need(devices)?.restores.status()),
        Command::RestoreCancel { volume } => {
            if !devices::need(devices)?.restores.cancel(volume) {
                return Err(snapblk_core::Error::not_found("lazy restore", volume).into());
            }
            json!({ "cancelled": volume })
        }
        Command::Attach {
            target,
            read_only,
            queues,
            depth,
        } => devices::need(devices)?.attach(target, *read_only, *queues, *depth)?,
        Command::Detach { what } => devices::need(devices)?.detach(what)?,
        Command::List => devices::need(devices)?.list(),
        Command::PoolInfo => to_value(pool.info()),
        Command::PoolCheck => to_value(pool.check()?),
        Command::PoolScrub => {
            let started = std::sync::atomic::AtomicBool::new(false);
            let last = std::sync::atomic::AtomicU64::new(0);
            to_value(pool.scrub(&|done, total| {
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
        Command::VolumeCreate { name, size } => to_value(pool.create_volume(name, *size)?),
        Command::VolumeList => to_value(pool.list_volumes()),
        Command::VolumeSetDefault { name, clear } => {
            if name.is_some() || *clear {
                pool.set_default_volume(name.as_deref())?;
            }
            json!({ "default_volume": pool.default_volume()? })
        }
        Command::VolumeInfo { name } => to_value(pool.volume_info(name)?),
        Command::VolumeResize { name, size, force } => {
            let mut v = to_value(pool.resize_volume(name, *size, *force)?);
            if let Some(d) = devices {
                let devs = d.resized(name, *size);
                if !devs.is_empty() {
                    v["devices"] = json!(devs);
                }
            }
            v
        }
        Command::VolumeRename { old, new } => to_value(pool.rename_volume(old, new)?),
        Command::VolumeDelete { name, recursive } => {
            let id = pool.volume_info(name)?.id;
            pool.delete_volume(name, *recursive)?;
            if let Some(d) = devices {
                d.forget_restore(name, id);
            }
            json!({ "deleted": name })
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
            json!({ "group": g, "snapshots": to_value(infos), "create_micros": t0.elapsed().as_micros() as u64 })
        }
        Command::GroupSet { name, volumes } => {
            let check = |s: &crate::policies::PolicyService| s.check_group(name, volumes);
            match devices.and_then(|d| d.policies.get()) {
                Some(service) => check(service)?,
                None => check(&*crate::policies::PolicyService::open(Arc::clone(pool))?)?,
            }
            pool.set_group(name, volumes)?;
            json!({ "group": name, "volumes": volumes })
        }
        Command::GroupList => json!(pool
            .groups()?
            .into_iter()
            .map(|(name, volumes)| json!({ "name": name, "volumes": volumes }))
            .collect::<Vec<_>>()),
        Command::GroupDelete { name } => {
            pool.delete_group(name)?;
            json!({ "deleted": name })
        }
        Command::SnapshotCreate {
            snapshot,
            group: false,
        } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            let t0 = std::time::Instant::now();
            let info = pool.create_snapshot(v, s)?;
            let mut val = to_value(info);
            val["create_micros"] = json!(t0.elapsed().as_micros() as u64);
            val
        }
        Command::SnapshotList { volume } => to_value(pool.list_snapshots(volume.as_deref())?),
        Command::SnapshotInfo { snapshot } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            to_value(pool.snapshot_info(v, s)?)
        }
        Command::SnapshotDelete { snapshot } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            pool.delete_snapshot(v, s)?;
            json!({ "deleted": snapshot })
        }
        Command::SnapshotProtect { snapshot, protect } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            pool.set_snapshot_protected(v, s, *protect)?;
            to_value(pool.snapshot_summary(v, s)?)
        }
        Command::VolumeSetQuota { name, quota } => to_value(pool.set_quota(name, *quota)?),
        Command::Clone { snapshot, name } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            to_value(pool.clone_snapshot(v, s, name)?)
        }
        Command::Rollback { snapshot } => {
            let (v, s) = parse_snap_ref(snapshot)?;
            to_value(pool.rollback(v, s)?)
        }
        Command::Diff { from, to } => {
            let a = pool.resolve_target(from)?;
            let b = pool.resolve_target(to)?;
            let ranges = pool.diff(&a, &b)?;
            let bytes: u64 = ranges.iter().map(|r| r.length).sum();
            json!({ "from": from, "to": to, "changed_bytes": bytes, "ranges": to_value(ranges) })
        }
    })
}

/// Refuses to snapshot, roll back, rename or resize a volume whose restore has not
/// finished (it is marked incomplete in the pool, so this holds in direct mode too, with
/// the daemon stopped); deleting it is how an interrupted restore is abandoned.
fn check_whole(pool: &Pool, vol: &str, deleting: bool) -> anyhow::Result<()> {
    let Ok(info) = pool.volume_info(vol) else {
        return Ok(()); // the command itself reports a missing volume
    };
    match info.incomplete {
        Some(_) if deleting => Ok(()),
        Some(m) => anyhow::bail!(
            "volume {vol} is not whole: {m}; {}",
            match m.by {
                Filling::LazyRestore =>
                    "wait until `snapblk restore-status` shows it complete (resume an interrupted one with `snapblk restore ... --lazy`), or delete it",
                Filling::FullRestore => "delete it and restore again",
            }
        ),
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
