//! Notification events: what changed that an admin must hear about — a job that starts
//! failing or recovers, a volume whose protection becomes violated or recovers.
//!
//! Only transitions are events (as monitoring systems alert): a job failing every minute
//! is one `job_failed`, then one `job_recovered`. [`Watch`] keeps the last state it saw;
//! it starts from the jobs' persisted outcomes, so a daemon restart does not repeat an old
//! failure, and from no verdicts, so a volume violated at start is announced once.
//! Delivery (webhook, command) is the daemon's (crates/daemon/src/alerts.rs).

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Serialize;

use crate::manager::JobInfo;
use crate::scheduler::Outcome;
use crate::status::{Verdict, VolumeStatus};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    JobFailed {
        job: String,
        error: String,
        time: Timestamp,
    },
    JobRecovered {
        job: String,
        time: Timestamp,
    },
    /// A volume's protection is violated (a target past its RPO, a failed verify).
    RpoViolated {
        volume: String,
        reasons: Vec<String>,
        time: Timestamp,
    },
    /// No longer violated.
    RpoRecovered {
        volume: String,
        verdict: Verdict,
        time: Timestamp,
    },
    /// The space guard deleted snapshots because the pool's free space fell under its
    /// threshold (or a write found it full).
    SnapshotsDeletedForSpace {
        snapshots: Vec<String>,
        free_percent_before: f64,
        free_percent: f64,
        time: Timestamp,
    },
    /// Free space is under the guard's threshold and nothing is left it may delete: what
    /// remains is protected, a backup base, each policy's newest snapshot or hand-made.
    SpaceExhausted {
        free_percent: f64,
        min_free_percent: f64,
        time: Timestamp,
    },
    /// Free space is back at or above the threshold after `SpaceExhausted`.
    SpaceRecovered {
        free_percent: f64,
        min_free_percent: f64,
        time: Timestamp,
    },
}

#[derive(Debug, Default)]
pub struct Watch {
    /// Per job: whether its last run failed.
    failing: BTreeMap<String, bool>,
    violated: BTreeMap<String, bool>,
}

impl Watch {
    /// Starts from the jobs' persisted outcomes (no event for a failure already known),
    /// except runs the last daemon stop interrupted: those are news, announced at the
    /// first check.
    pub fn new(jobs: &[JobInfo]) -> Watch {
        let mut w = Watch::default();
        for j in jobs {
            let interrupted = matches!(j.view.state.last_outcome, Some(Outcome::Interrupted));
            w.failing
                .insert(j.view.name.clone(), failed(j) && !interrupted);
        }
        w
    }

    /// Events for jobs whose last outcome changed between failing and not.
    pub fn jobs(&mut self, jobs: &[JobInfo], now: Timestamp) -> Vec<Event> {
        let mut out = Vec::new();
        for j in jobs {
            let now_failing = failed(j);
            let was = self.failing.insert(j.view.name.clone(), now_failing);
            match (was.unwrap_or(false), now_failing) {
                (false, true) => out.push(Event::JobFailed {
                    job: j.view.name.clone(),
                    error: match &j.view.state.last_outcome {
                        Some(Outcome::Failed { error }) => error.clone(),
                        _ => "interrupted by a daemon stop".into(),
                    },
                    time: j.view.state.last_end.unwrap_or(now),
                }),
                (true, false) => out.push(Event::JobRecovered {
                    job: j.view.name.clone(),
                    time: j.view.state.last_end.unwrap_or(now),
                }),
                _ => {}
            }
        }
        self.failing
            .retain(|name, _| jobs.iter().any(|j| &j.view.name == name));
        out
    }

    /// Events for volumes entering or leaving `violated`.
    pub fn status(&mut self, st: &[VolumeStatus], now: Timestamp) -> Vec<Event> {
        let mut out = Vec::new();
        for v in st {
            let bad = v.verdict == Verdict::Violated;
            let was = self.violated.insert(v.volume.clone(), bad);
            match (was.unwrap_or(false), bad) {
                (false, true) => out.push(Event::RpoViolated {
                    volume: v.volume.clone(),
                    reasons: v.reasons.clone(),
                    time: now,
                }),
                (true, false) => out.push(Event::RpoRecovered {
                    volume: v.volume.clone(),
                    verdict: v.verdict,
                    time: now,
                }),
                _ => {}
            }
        }
        self.violated
            .retain(|name, _| st.iter().any(|v| &v.volume == name));
        out
    }
}

fn failed(j: &JobInfo) -> bool {
    matches!(
        j.view.state.last_outcome,
        Some(Outcome::Failed { .. } | Outcome::Interrupted)
    )
}
