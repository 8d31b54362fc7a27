//! Jobs: backups, copies, restores, gc and verify runs, whether by hand (through the
//! daemon) or scheduled by a policy.
//!
//! Series: `snapblk_jobs_total{kind, outcome}`, `snapblk_job_duration_seconds{kind}`
//! (histogram), `snapblk_backup_uploaded_bytes_total{repository}`,
//! `snapblk_backups_created_total{repository}`, `snapblk_restored_bytes_total`,
//! `snapblk_policy_snapshots_{created,deleted}_total` (snapshot jobs and their retention).

use prometheus::{exponential_buckets, HistogramOpts, HistogramVec, IntCounter};
use prometheus::{IntCounterVec, Opts, Registry};

use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
}

impl Outcome {
    pub fn of(ok: bool) -> Outcome {
        if ok {
            Outcome::Ok
        } else {
            Outcome::Failed
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
        }
    }
}

pub struct JobMetrics {
    runs: IntCounterVec,
    duration: HistogramVec,
    uploaded: IntCounterVec,
    created: IntCounterVec,
    restored: IntCounter,
    snapshots_created: IntCounter,
    snapshots_deleted: IntCounter,
}

impl JobMetrics {
    pub(crate) fn new(registry: &Registry) -> Result<JobMetrics> {
        let runs = IntCounterVec::new(
            Opts::new(
                "snapblk_jobs_total",
                "Jobs that ended, by kind (snapshot, backup, copy, restore, gc, verify) and outcome.",
            ),
            &["kind", "outcome"],
        )?;
        // 0.1 s .. ~7 h, x4 per bucket.
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "snapblk_job_duration_seconds",
                "How long jobs ran, by kind.",
            )
            .buckets(exponential_buckets(0.1, 4.0, 13)?),
            &["kind"],
        )?;
        let uploaded = IntCounterVec::new(
            Opts::new(
                "snapblk_backup_uploaded_bytes_total",
                "Bytes of packs uploaded by backups and copies, by repository.",
            ),
            &["repository"],
        )?;
        let created = IntCounterVec::new(
            Opts::new(
                "snapblk_backups_created_total",
                "Backups committed, by repository.",
            ),
            &["repository"],
        )?;
        let restored = IntCounter::new(
            "snapblk_restored_bytes_total",
            "Bytes of volumes restored from backups (full restores).",
        )?;
        let snapshots_created = IntCounter::new(
            "snapblk_policy_snapshots_created_total",
            "Snapshots taken by policies' snapshot jobs.",
        )?;
        let snapshots_deleted = IntCounter::new(
            "snapblk_policy_snapshots_deleted_total",
            "Snapshots deleted by policies' retention.",
        )?;
        registry.register(Box::new(snapshots_created.clone()))?;
        registry.register(Box::new(snapshots_deleted.clone()))?;
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(uploaded.clone()))?;
        registry.register(Box::new(created.clone()))?;
        registry.register(Box::new(restored.clone()))?;
        Ok(JobMetrics {
            runs,
            duration,
            uploaded,
            created,
            restored,
            snapshots_created,
            snapshots_deleted,
        })
    }

    /// A job of `kind` ended after `secs`.
    pub fn finished(&self, kind: &str, outcome: Outcome, secs: f64) {
        self.runs.with_label_values(&[kind, outcome.as_str()]).inc();
        self.duration.with_label_values(&[kind]).observe(secs);
    }

    /// A backup or copy to `repository` committed `created` backups, uploading `bytes`.
    pub fn backed_up(&self, repository: &str, created: u64, bytes: u64) {
        self.uploaded.with_label_values(&[repository]).inc_by(bytes);
        self.created
            .with_label_values(&[repository])
            .inc_by(created);
    }

    /// A snapshot job took `created` snapshots and its retention deleted `deleted`.
    pub fn snapshots(&self, created: u64, deleted: u64) {
        self.snapshots_created.inc_by(created);
        self.snapshots_deleted.inc_by(deleted);
    }

    /// A full restore wrote `bytes`.
    pub fn restored(&self, bytes: u64) {
        self.restored.inc_by(bytes);
    }
}
