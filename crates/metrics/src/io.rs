//! Frontend I/O: what NBD and ublk clients asked for and how long it took.
//!
//! Series (labels `volume`, `op`, `frontend`): `snapblk_io_requests_total`,
//! `snapblk_io_errors_total`, `snapblk_io_bytes_total` (bytes the requests covered; for
//! trim and write-zeroes the range, not data moved) and the histogram
//! `snapblk_io_duration_seconds` (arrival to completion as the frontend saw it: queueing
//! in the daemon included, the client's network not).
//!
//! A volume's series stay until the daemon restarts, also after it is deleted (Prometheus
//! marks them stale when they stop changing; counters never go backwards while the daemon
//! runs).

use std::sync::Arc;
use std::time::Duration;

use prometheus::{exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter};
use prometheus::{IntCounterVec, Opts, Registry};
use snapblk_core::export::{IoKind, IoMeter};

use crate::Result;

const LABELS: [&str; 3] = ["volume", "op", "frontend"];

pub struct IoMetrics {
    requests: IntCounterVec,
    errors: IntCounterVec,
    bytes: IntCounterVec,
    duration: HistogramVec,
}

impl IoMetrics {
    pub(crate) fn new(registry: &Registry) -> Result<IoMetrics> {
        let counter = |name: &str, help: &str| -> Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &LABELS)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let requests = counter(
            "snapblk_io_requests_total",
            "Requests served by a frontend (NBD, ublk), by volume and operation.",
        )?;
        let errors = counter(
            "snapblk_io_errors_total",
            "Requests that ended in an error sent to the client.",
        )?;
        let bytes = counter(
            "snapblk_io_bytes_total",
            "Bytes covered by the requests served (for trim and write_zeroes, the range).",
        )?;
        // 50 us .. 7.5 s, x2.5 per bucket.
        let buckets = exponential_buckets(50e-6, 2.5, 14)?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "snapblk_io_duration_seconds",
                "Time from a request's arrival to its completion, as the frontend saw it.",
            )
            .buckets(buckets),
            &LABELS,
        )?;
        registry.register(Box::new(duration.clone()))?;
        Ok(IoMetrics {
            requests,
            errors,
            bytes,
            duration,
        })
    }

    /// The meter of export `volume` (`vol` or `vol@snap`) served by `frontend`.
    pub fn meter(&self, volume: &str, frontend: &str) -> Arc<dyn IoMeter> {
        let per_op = IoKind::ALL.map(|k| {
            let l = [volume, k.as_str(), frontend];
            OpSeries {
                requests: self.requests.with_label_values(&l),
                errors: self.errors.with_label_values(&l),
                bytes: self.bytes.with_label_values(&l),
                duration: self.duration.with_label_values(&l),
            }
        });
        Arc::new(ExportMeter { per_op })
    }
}

struct OpSeries {
    requests: IntCounter,
    errors: IntCounter,
    bytes: IntCounter,
    duration: Histogram,
}

/// One export's series, resolved once: recording touches only atomics.
struct ExportMeter {
    per_op: [OpSeries; 5],
}

impl IoMeter for ExportMeter {
    fn record(&self, kind: IoKind, bytes: u64, elapsed: Duration, ok: bool) {
        let s = &self.per_op[kind as usize];
        s.requests.inc();
        if ok {
            s.bytes.inc_by(bytes);
        } else {
            s.errors.inc();
        }
        s.duration.observe(elapsed.as_secs_f64());
    }
}
