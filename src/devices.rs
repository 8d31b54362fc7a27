//! ublk devices owned by the daemon: attach, detach, list, and detach-all at shutdown.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use snapblk_core::export::ReadOnly;
use snapblk_core::{Export, Pool, VolumeHandle};

pub struct Devices {
    pool: Arc<Pool>,
    list: Mutex<Vec<snapblk_ublk::Device>>,
}

fn describe(d: &snapblk_ublk::Device) -> Value {
    json!({ "id": d.id, "path": d.path, "export": d.export, "read_only": d.read_only })
}

impl Devices {
    pub fn new(pool: Arc<Pool>) -> Self {
        Devices {
            pool,
            list: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<snapblk_ublk::Device>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn attach(&self, target: &str, read_only: bool, queues: u16, depth: u16) -> Result<Value> {
        let handle: Arc<dyn Export> = Arc::new(VolumeHandle::open(&self.pool, target)?);
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
        let dev = snapblk_ublk::attach(export, self.pool.uuid(), opts)?;
        let v = describe(&dev);
        self.lock().push(dev);
        Ok(v)
    }

    /// Detaches by export name (`vol`, `vol@snap`) or device path (`/dev/ublkbN`).
    pub fn detach(&self, what: &str) -> Result<Value> {
        let dev = {
            let mut list = self.lock();
            let i = list
                .iter()
                .position(|d| d.path == what || d.export == what)
                .ok_or_else(|| anyhow!("nothing attached as '{what}'"))?;
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
            let r = VolumeHandle::open(&self.pool, &o.export)
                .map_err(anyhow::Error::from)
                .and_then(|h| {
                    let h: Arc<dyn Export> = Arc::new(h);
                    let export: Arc<dyn Export> = if o.read_only && !h.read_only() {
                        Arc::new(ReadOnly(h))
                    } else {
                        h
                    };
                    Ok(snapblk_ublk::recover(export, self.pool.uuid(), o.id)?)
                });
            match r {
                Ok(dev) => {
                    eprintln!("snapblk daemon: recovered {} ({})", dev.path, dev.export);
                    self.lock().push(dev);
                }
                Err(e) => eprintln!(
                    "snapblk daemon: cannot recover ublk device {} ({}): {e:#}",
                    o.id, o.export
                ),
            }
        }
    }

    pub fn list(&self) -> Value {
        Value::Array(self.lock().iter().map(describe).collect())
    }

    /// Detaches everything (daemon shutdown); in-flight I/O drains first.
    pub fn detach_all(&self) {
        let all: Vec<_> = std::mem::take(&mut *self.lock());
        for d in all {
            let path = d.path.clone();
            if let Err(e) = d.detach() {
                eprintln!("snapblk daemon: detaching {path}: {e}");
            }
        }
    }
}

/// Refuses device commands outside the daemon.
pub fn need(devices: Option<&Devices>) -> Result<&Devices> {
    match devices {
        Some(d) => Ok(d),
        None => bail!("ublk devices are owned by the daemon: start `snapblk daemon` first"),
    }
}
