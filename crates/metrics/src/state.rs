//! Gauges read at scrape time: the pool, its volumes, the process, and what the daemon
//! knows of jobs ([`Sources`]).
//!
//! Pool: `snapblk_pool_{capacity,used,free,pending_free,metadata}_bytes`,
//! `snapblk_pool_reclaim_jobs` (reclaim backlog), `snapblk_pool_{volumes,snapshots,clones}`,
//! the snapshot content cache: `snapblk_snapshot_cache_{bytes,entries}` and the counters
//! `snapblk_snapshot_cache_{hits,misses}_total`; its store tier:
//! `snapblk_snapshot_cache_disk_bytes`, `snapblk_snapshot_cache_disk_{hits,errors}_total`.
//! Per volume (`volume`): `snapblk_volume_{size,used,written,snapshot,quota}_bytes`,
//! `snapblk_volume_snapshots`, `snapblk_volume_open_exports`. From [`Sources`]:
//! `snapblk_backup_age_seconds{volume, repository}`,
//! `snapblk_lazy_restore_{remaining,size}_bytes{volume}`, `snapblk_jobs_running`. Process:
//! `process_resident_memory_bytes`.
//!
//! Per-volume series are rebuilt at each scrape: a deleted volume's series disappear.

use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use snapblk_core::Pool;

use crate::Result;

/// The newest backup of `volume` in `repository` is `age_secs` old.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupAge {
    pub volume: String,
    pub repository: String,
    pub age_secs: u64,
}

/// A lazy restore in progress: `remaining` of `size` bytes not fetched yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyProgress {
    pub volume: String,
    pub size: u64,
    pub remaining: u64,
}

/// What the daemon knows beyond the pool; called at each scrape (keep it cheap).
pub trait Sources: Send + Sync {
    fn backup_ages(&self) -> Vec<BackupAge>;
    fn lazy_restores(&self) -> Vec<LazyProgress>;
    fn jobs_running(&self) -> usize;
}

/// No policies, no restores (tests, tools).
pub struct NoSources;

impl Sources for NoSources {
    fn backup_ages(&self) -> Vec<BackupAge> {
        Vec::new()
    }
    fn lazy_restores(&self) -> Vec<LazyProgress> {
        Vec::new()
    }
    fn jobs_running(&self) -> usize {
        0
    }
}

struct PoolGauges {
    capacity: IntGauge,
    used: IntGauge,
    free: IntGauge,
    pending_free: IntGauge,
    metadata: IntGauge,
    reclaim_jobs: IntGauge,
    volumes: IntGauge,
    snapshots: IntGauge,
    clones: IntGauge,
    cache_bytes: IntGauge,
    cache_entries: IntGauge,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    cache_disk_bytes: IntGauge,
    cache_disk_hits: IntCounter,
    cache_disk_errors: IntCounter,
    sum_blocks: IntCounter,
    sum_moved: IntCounter,
    sum_dropped: IntCounter,
    sum_loads: IntCounter,
    sum_swept: IntCounter,
    sum_sweeps: IntCounter,
}

struct VolumeGauges {
    size: IntGaugeVec,
    used: IntGaugeVec,
    written: IntGaugeVec,
    snapshot_bytes: IntGaugeVec,
    quota: IntGaugeVec,
    snapshots: IntGaugeVec,
    open: IntGaugeVec,
}

pub(crate) struct State {
    pool: Arc<Pool>,
    sources: Arc<dyn Sources>,
    p: PoolGauges,
    v: VolumeGauges,
    backup_age: IntGaugeVec,
    lazy_remaining: IntGaugeVec,
    lazy_size: IntGaugeVec,
    jobs_running: IntGauge,
    rss: IntGauge,
    /// One refresh at a time (a refresh resets, then fills, the per-volume series).
    refreshing: Mutex<()>,
}

impl State {
    pub(crate) fn new(
        registry: &Registry,
        pool: Arc<Pool>,
        sources: Arc<dyn Sources>,
    ) -> Result<State> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let vol = |name: &str, help: &str| vec(name, help, &["volume"]);
        let p = PoolGauges {
            capacity: gauge(
                "snapblk_pool_capacity_bytes",
                "Size of the pool's data device.",
            )?,
            used: gauge("snapblk_pool_used_bytes", "Data blocks in use, in bytes.")?,
            free: gauge(
                "snapblk_pool_free_bytes",
                "Data blocks free to allocate, in bytes.",
            )?,
            pending_free: gauge(
                "snapblk_pool_pending_free_bytes",
                "Bytes freed but not allocatable until the next sync.",
            )?,
            metadata: gauge(
                "snapblk_pool_metadata_bytes",
                "Size of the metadata store on disk.",
            )?,
            reclaim_jobs: gauge(
                "snapblk_pool_reclaim_jobs",
                "Reclaim jobs queued (deleted snapshots whose blocks are not all freed yet).",
            )?,
            volumes: gauge("snapblk_pool_volumes", "Volumes in the pool.")?,
            snapshots: gauge("snapblk_pool_snapshots", "Snapshots in the pool.")?,
            clones: gauge(
                "snapblk_pool_clones",
                "Volumes cloned from another volume's snapshot.",
            )?,
            cache_bytes: gauge(
                "snapblk_snapshot_cache_bytes",
                "RAM held by the cache of snapshot and clone-base page contents.",
            )?,
            cache_entries: gauge(
                "snapblk_snapshot_cache_entries",
                "Pages in the cache of snapshot and clone-base page contents.",
            )?,
            cache_hits: counter(
                "snapblk_snapshot_cache_hits_total",
                "Snapshot and clone-base page lookups answered from the cache.",
            )?,
            cache_misses: counter(
                "snapblk_snapshot_cache_misses_total",
                "Snapshot and clone-base page lookups the RAM cache did not answer.",
            )?,
            cache_disk_bytes: gauge(
                "snapblk_snapshot_cache_disk_bytes",
                "Metadata-disk bytes of snapshot and clone-base page contents kept past the RAM.",
            )?,
            cache_disk_hits: counter(
                "snapblk_snapshot_cache_disk_hits_total",
                "Of the RAM misses, lookups answered by the contents kept on the metadata disk.",
            )?,
            cache_disk_errors: counter(
                "snapblk_snapshot_cache_disk_errors_total",
                "Failed lookups or puts of contents kept on the metadata disk (taken as misses).",
            )?,
            sum_blocks: counter(
                "snapblk_checksum_blocks_written_total",
                "Checksum blocks written to the data device and named by the map (consolidation).",
            )?,
            sum_moved: counter(
                "snapblk_checksum_blocks_moved_total",
                "Data blocks whose CRCs moved from the metadata store into checksum blocks.",
            )?,
            sum_dropped: counter(
                "snapblk_checksum_offers_dropped_total",
                "Blocks of large writes left with inline CRCs because consolidation was behind.",
            )?,
            sum_loads: counter(
                "snapblk_checksum_block_loads_total",
                "Checksum blocks read from the data device (cache misses).",
            )?,
            sum_swept: counter(
                "snapblk_checksum_swept_blocks_total",
                "Blocks with inline CRCs that sweeps over the live pages offered for consolidation.",
            )?,
            sum_sweeps: counter(
                "snapblk_checksum_sweeps_total",
                "Sweeps over the live pages completed (one is due after start and after dropped offers).",
            )?,
        };
        let v = VolumeGauges {
            size: vol("snapblk_volume_size_bytes", "Volume size.")?,
            used: vol(
                "snapblk_volume_used_bytes",
                "Bytes the volume and its snapshots hold (what a quota limits).",
            )?,
            written: vol(
                "snapblk_volume_written_bytes",
                "Bytes written since the volume's last snapshot (held by the volume alone).",
            )?,
            snapshot_bytes: vol(
                "snapblk_volume_snapshot_bytes",
                "Bytes held by the volume's snapshots' own layers.",
            )?,
            quota: vol(
                "snapblk_volume_quota_bytes",
                "The volume's quota (only volumes that have one).",
            )?,
            snapshots: vol("snapblk_volume_snapshots", "Snapshots of the volume.")?,
            open: vol(
                "snapblk_volume_open_exports",
                "Open exports of the volume (NBD connections, ublk devices).",
            )?,
        };
        Ok(State {
            backup_age: vec(
                "snapblk_backup_age_seconds",
                "Age of the newest backup of a volume in a repository a policy backs it up to.",
                &["volume", "repository"],
            )?,
            lazy_remaining: vol(
                "snapblk_lazy_restore_remaining_bytes",
                "Bytes a lazy restore has not fetched yet.",
            )?,
            lazy_size: vol(
                "snapblk_lazy_restore_size_bytes",
                "Size of a volume being restored lazily.",
            )?,
            jobs_running: gauge("snapblk_jobs_running", "Policy jobs running now.")?,
            rss: gauge(
                "process_resident_memory_bytes",
                "Resident memory size of the daemon.",
            )?,
            pool,
            sources,
            p,
            v,
            refreshing: Mutex::new(()),
        })
    }

    pub(crate) fn refresh(&self) {
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let clamp = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        let info = self.pool.info();
        let p = &self.p;
        p.capacity.set(clamp(info.capacity));
        p.used.set(clamp(info.used));
        p.free.set(clamp(info.free));
        p.pending_free.set(clamp(info.pending_free));
        p.metadata.set(clamp(info.metadata_size));
        p.reclaim_jobs.set(clamp(info.reclaim_jobs));
        p.volumes.set(info.volumes as i64);
        p.snapshots.set(info.snapshots as i64);
        let cache = self.pool.content_cache_stats();
        p.cache_bytes.set(clamp(cache.bytes));
        p.cache_entries.set(clamp(cache.entries));
        // The pool counts from its open; the counters catch up (they only grow).
        p.cache_hits
            .inc_by(cache.hits.saturating_sub(p.cache_hits.get()));
        p.cache_misses
            .inc_by(cache.misses.saturating_sub(p.cache_misses.get()));
        p.cache_disk_bytes.set(clamp(cache.stored_bytes));
        p.cache_disk_hits
            .inc_by(cache.stored_hits.saturating_sub(p.cache_disk_hits.get()));
        p.cache_disk_errors.inc_by(
            cache
                .stored_errors
                .saturating_sub(p.cache_disk_errors.get()),
        );
        let sums = self.pool.checksum_stats();
        for (c, v) in [
            (&p.sum_blocks, sums.blocks_written),
            (&p.sum_moved, sums.blocks_moved),
            (&p.sum_dropped, sums.offers_dropped),
            (&p.sum_loads, sums.loads),
            (&p.sum_swept, sums.swept),
            (&p.sum_sweeps, sums.sweeps),
        ] {
            c.inc_by(v.saturating_sub(c.get()));
        }
        let vols = self.pool.list_volumes();
        p.clones
            .set(vols.iter().filter(|v| v.origin.is_some()).count() as i64);
        let v = &self.v;
        for g in [
            &v.size,
            &v.used,
            &v.written,
            &v.snapshot_bytes,
            &v.quota,
            &v.snapshots,
            &v.open,
        ] {
            g.reset();
        }
        for vol in &vols {
            let l = [vol.name.as_str()];
            v.size.with_label_values(&l).set(clamp(vol.size));
            v.used.with_label_values(&l).set(clamp(vol.used));
            v.written.with_label_values(&l).set(clamp(vol.written));
            v.snapshot_bytes
                .with_label_values(&l)
                .set(clamp(vol.snapshot_bytes));
            if let Some(q) = vol.quota {
                v.quota.with_label_values(&l).set(clamp(q));
            }
            v.snapshots.with_label_values(&l).set(vol.snapshots as i64);
            v.open.with_label_values(&l).set(vol.open as i64);
        }
        self.backup_age.reset();
        for a in self.sources.backup_ages() {
            self.backup_age
                .with_label_values(&[a.volume.as_str(), a.repository.as_str()])
                .set(clamp(a.age_secs));
        }
        self.lazy_remaining.reset();
        self.lazy_size.reset();
        for r in self.sources.lazy_restores() {
            let l = [r.volume.as_str()];
            self.lazy_remaining
                .with_label_values(&l)
                .set(clamp(r.remaining));
            self.lazy_size.with_label_values(&l).set(clamp(r.size));
        }
        self.jobs_running.set(self.sources.jobs_running() as i64);
        self.rss.set(clamp(rss_bytes()));
    }
}

/// Resident set size from /proc/self/statm (0 if it cannot be read).
fn rss_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages.saturating_mul(u64::try_from(page).unwrap_or(4096))
}
