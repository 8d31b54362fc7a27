//! snapblk-metrics: what the daemon exposes to Prometheus (docs/design.md §14 "Metrics").
//!
//! - [`io`]: one [`IoMeter`](snapblk_core::export::IoMeter) per export and frontend;
//!   frontends (NBD, ublk) report every request they complete: counts, bytes, errors and
//!   a latency histogram, labelled `volume` (the export name: `vol` or `vol@snap`), `op`,
//!   `frontend`.
//! - [`state`]: gauges read at scrape time from the pool (space, metadata, reclaim backlog,
//!   per-volume size/used/snapshots), the process (RSS) and a [`Sources`] the daemon
//!   provides (backup ages per volume and repository, lazy restores, running jobs).
//! - [`jobs`]: counters and durations of backups, restores and other jobs, by outcome.
//! - [`http`]: `GET /metrics` on the address the admin chose (opt-in, `metrics_listen`).
//!
//! Names follow Prometheus conventions: the `snapblk_` prefix, base units in the name
//! (`_bytes`, `_seconds`), `_total` on counters; the text format is 0.0.4 (what
//! `promtool check metrics` reads).
//!
//! Threading: every type here is Send + Sync. Recording is lock-free (atomics of the
//! prometheus crate; label children are resolved once per export, not per request). A
//! scrape takes the `state` mutex (one scrape refreshes the gauges at a time) and the
//! pool's catalog read lock for as long as listing the volumes takes.

pub mod http;
pub mod io;
pub mod jobs;
pub mod state;

use std::sync::Arc;

use prometheus::{Encoder, Registry, TextEncoder};
use snapblk_core::Pool;

pub use io::IoMetrics;
pub use jobs::{JobMetrics, Outcome};
pub use state::{BackupAge, LazyProgress, Sources};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("metrics endpoint {addr}: {msg}")]
    Listen { addr: String, msg: String },
}

pub type Result<T, E = MetricsError> = std::result::Result<T, E>;

/// Every metric of one daemon.
pub struct Metrics {
    registry: Registry,
    pub io: IoMetrics,
    pub jobs: JobMetrics,
    state: state::State,
}

impl Metrics {
    pub fn new(pool: Arc<Pool>, sources: Arc<dyn Sources>) -> Result<Arc<Metrics>> {
        let registry = Registry::new();
        let io = IoMetrics::new(&registry)?;
        let jobs = JobMetrics::new(&registry)?;
        let state = state::State::new(&registry, pool, sources)?;
        Ok(Arc::new(Metrics {
            registry,
            io,
            jobs,
            state,
        }))
    }

    /// The text exposition (format 0.0.4) with the gauges refreshed now.
    pub fn render(&self) -> String {
        self.state.refresh();
        let families = self.registry.gather();
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            log::warn!("metrics: encoding: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
