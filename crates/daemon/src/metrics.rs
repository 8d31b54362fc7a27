//! Wires the metrics (crates/metrics) into the daemon: what the pool alone cannot tell
//! (backup ages, lazy restores, running jobs) comes from the devices and the policies.

use std::sync::Arc;

use snapblk_metrics::{BackupAge, LazyProgress, Metrics, Sources};

use crate::devices::Devices;
use crate::error::Result;

struct DaemonSources(Arc<Devices>);

impl Sources for DaemonSources {
    fn backup_ages(&self) -> Vec<BackupAge> {
        self.0
            .policies
            .get()
            .map(|p| p.backup_ages())
            .unwrap_or_default()
    }
    fn lazy_restores(&self) -> Vec<LazyProgress> {
        self.0
            .restores
            .progress()
            .into_iter()
            .map(|(volume, size, done)| LazyProgress {
                volume,
                size,
                remaining: size.saturating_sub(done),
            })
            .collect()
    }
    fn jobs_running(&self) -> usize {
        self.0.policies.get().map_or(0, |p| p.running_jobs())
    }
}

/// The daemon's metrics, set on `devices` (frontends opened from now on are metered).
pub fn install(devices: &Arc<Devices>, pool: &Arc<snapblk_core::Pool>) -> Result<Arc<Metrics>> {
    let m = Metrics::new(
        Arc::clone(pool),
        Arc::new(DaemonSources(Arc::clone(devices))),
    )?;
    let _ = devices.metrics.set(Arc::clone(&m));
    Ok(m)
}
