//! What the daemon serves besides NBD: ublk devices (attach, detach, list, detach-all at
//! shutdown) and lazy restores in progress (whose volumes every frontend opens through
//! `exports`, so they hydrate on access).
//!
//! Threading: the device list is behind one mutex, held only to add, find or remove an
//! entry (never across a kernel call that waits for I/O: detach takes the device out
//! first).

use std::sync::{Arc, Mutex};

use snapblk_control::reply;
use std::path::PathBuf;

use snapblk_backup::lazy::{LazyExports, Restores, State};
use snapblk_core::export::{Metered, MeteredExports, ReadOnly};
use snapblk_core::keys::Filling;
use snapblk_core::{Export, ExportProvider, Pool, PoolExports};

use crate::error::{DaemonError, Result};

pub struct Devices {
    pool: Arc<Pool>,
    list: Mutex<Vec<snapblk_ublk::Device>>,
    /// Every volume and snapshot, with lazy restores wrapped (see snapblk_backup::lazy).
    pub exports: Arc<dyn ExportProvider>,
    pub restores: Arc<Restores>,
    /// Where lazy restores keep their state (`<meta>/restores`).
    pub restore_dir: PathBuf,
    /// The protection policies and their scheduler (set once by the daemon).
    pub policies: std::sync::OnceLock<Arc<crate::policies::PolicyService>>,
    /// Where frontends and jobs report (set once by the daemon, before any device).
    pub metrics: std::sync::OnceLock<Arc<snapblk_metrics::Metrics>>,
}

fn describe(d: &snapblk_ublk::Device) -> reply::Device {
    let (direct, via_api, failed) = d.stats.get();
    reply::Device {
        id: d.id,
        path: d.path.clone(),
        export: d.export.clone(),
        read_only: d.read_only,
        requests_direct: direct,
        requests_via_api: via_api,
        requests_failed: failed,
    }
}

impl Devices {
    pub fn new(pool: Arc<Pool>, restore_dir: PathBuf) -> Self {
        let restores = Arc::new(Restores::default());
        // Interrupted lazy restores are the volumes still marked as such in the pool;
        // state files of any other volume are left over from finished or deleted ones.
        let mut live = Vec::new();
        for v in pool.list_volumes() {
            let Some(m) = v.incomplete else { continue };
            if m.by != Filling::LazyRestore {
                continue;
            }
            log::warn!(
                "lazy restore of {} into {} was interrupted",
                m.backup,
                v.name
            );
            live.push(v.id);
            restores.suspend(State {
                volume: v.name,
                volume_id: v.id,
                manifest: m.manifest,
                backup: m.backup,
                target: m.source,
                pool: pool.uuid().to_string(),
            });
        }
        snapblk_backup::lazy::remove_stale(&restore_dir, &live);
        Devices {
            exports: Arc::new(LazyExports {
                inner: Arc::new(PoolExports(Arc::clone(&pool))),
                restores: Arc::clone(&restores),
                pool: Arc::clone(&pool),
            }),
            pool,
            list: Mutex::new(Vec::new()),
            restores,
            restore_dir,
            policies: std::sync::OnceLock::new(),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// `export`, reporting its requests served by `frontend` to the metrics (if set).
    fn metered(&self, export: Arc<dyn Export>, frontend: &str) -> Arc<dyn Export> {
        match self.metrics.get() {
            Some(m) => {
                let meter = m.io.meter(export.name(), frontend);
                Arc::new(Metered {
                    inner: export,
                    meter,
                })
            }
            None => export,
        }
    }

    /// What NBD serves: every export, metered as "nbd" once the metrics are set.
    pub fn nbd_exports(&self) -> Arc<dyn ExportProvider> {
        match self.metrics.get() {
            Some(m) => {
                let m = Arc::clone(m);
                Arc::new(MeteredExports {
                    inner: Arc::clone(&self.exports),
                    meter_for: Arc::new(move |name: &str| m.io.meter(name, "nbd")),
                })
            }
            None => Arc::clone(&self.exports),
        }
    }

    /// Refuses commands that would see a half-restored volume while its lazy restore runs
    /// (an interrupted one may be deleted: `deleting`).
    pub fn check_not_restoring(&self, volume: &str, deleting: bool) -> Result<()> {
        if self.restores.active(volume).is_some() {
            return Err(DaemonError::InUse(format!("volume {volume} is still being restored lazily (see `snapblk restore-status`); wait until it completes")));
        }
        if !deleting && self.restores.suspended(volume).is_some() {
            return Err(DaemonError::InUse(format!("volume {volume} is an interrupted lazy restore; resume it (`snapblk restore ... --lazy`) or delete it")));
        }
        Ok(())
    }

    /// After `volume` was deleted: forget its interrupted restore and remove its state.
    pub fn forget_restore(&self, volume: &str, id: u64) {
        if self.restores.suspended(volume).is_some() {
            self.restores.forget(volume);
            let live: Vec<u64> = self
                .pool
                .list_volumes()
                .into_iter()
                .filter(|v| v.id != id)
                .filter(|v| {
                    v.incomplete
                        .as_ref()
                        .is_some_and(|m| m.by == Filling::LazyRestore)
                })
                .map(|v| v.id)
                .collect();
            snapblk_backup::lazy::remove_stale(&self.restore_dir, &live);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<snapblk_ublk::Device>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn attach(
        &self,
        target: &str,
        read_only: bool,
        queues: u16,
        depth: u16,
    ) -> Result<reply::Device> {
        let handle = self.exports.open(target)?;
        let export: Arc<dyn Export> = if read_only && !handle.read_only() {
            Arc::new(ReadOnly(handle))
        } else {
            handle
        };
        let opts = snapblk_ublk::Options {
            queues,
            depth,
            ..Default::default()
        };
        let dev = snapblk_ublk::attach(self.metered(export, "ublk"), self.pool.uuid(), opts)?;
        let v = describe(&dev);
        self.lock().push(dev);
        Ok(v)
    }

    /// After `volume` changed size: tells the kernel about every device attached to it.
    /// Returns one entry per device (path, and the error if the kernel refused).
    pub fn resized(&self, volume: &str, size: u64) -> Vec<reply::DeviceResized> {
        self.lock()
            .iter()
            .filter(|d| d.export == volume)
            .map(|d| {
                let r = d.update_size(size);
                reply::DeviceResized {
                    path: d.path.clone(),
                    resized: r.is_ok(),
                    error: r.err().map(|e| e.to_string()),
                }
            })
            .collect()
    }

    /// Detaches by export name (`vol`, `vol@snap`) or device path (`/dev/ublkbN`).
    pub fn detach(&self, what: &str) -> Result<reply::Device> {
        let dev = {
            let mut list = self.lock();
            let i = list
                .iter()
                .position(|d| d.path == what || d.export == what)
                .ok_or_else(|| DaemonError::NotFound(format!("nothing attached as '{what}'")))?;
            list.remove(i)
        };
        let v = describe(&dev);
        dev.detach()?;
        Ok(v)
    }

    /// Takes over this pool's devices that a crashed daemon left quiesced (their filesystems
    /// stay mounted; I/O that waited continues).
    pub fn recover_all(&self) {
        for o in snapblk_ublk::orphans(self.pool.uuid()) {
            let r = self
                .exports
                .open(&o.export)
                .map_err(DaemonError::from)
                .and_then(|h| {
                    let export: Arc<dyn Export> = if o.read_only && !h.read_only() {
                        Arc::new(ReadOnly(h))
                    } else {
                        h
                    };
                    let export = self.metered(export, "ublk");
                    Ok(snapblk_ublk::recover(export, self.pool.uuid(), o.id)?)
                });
            match r {
                Ok(dev) => {
                    log::info!("snapblk daemon: recovered {} ({})", dev.path, dev.export);
                    self.lock().push(dev);
                }
                Err(e) => log::error!(
                    "snapblk daemon: cannot recover ublk device {} ({}): {e}",
                    o.id,
                    o.export
                ),
            }
        }
    }

    pub fn list(&self) -> Vec<reply::Device> {
        self.lock().iter().map(describe).collect()
    }

    /// How many devices are attached.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Detaches everything (daemon shutdown); in-flight I/O drains first.
    pub fn detach_all(&self) {
        let all: Vec<_> = std::mem::take(&mut *self.lock());
        for d in all {
            let path = d.path.clone();
            if let Err(e) = d.detach() {
                log::warn!("snapblk daemon: detaching {path}: {e}");
            }
        }
    }
}

/// Refuses device commands outside the daemon.
pub fn need(devices: Option<&Devices>) -> Result<&Devices> {
    match devices {
        Some(d) => Ok(d),
        None => Err(DaemonError::NeedsDaemon(
            "ublk devices are owned by the daemon: start `snapblk daemon` first".into(),
        )),
    }
}
