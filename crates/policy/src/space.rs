//! The pool space guard (snapper's space-aware cleanup, for a thin pool): when free space
//! falls under a threshold, delete the oldest snapshots the policies made that nothing
//! needs, until free space is back at a target; when nothing deletable is left, say so.
//!
//! What it may delete ([`Manager::space_candidates`]): a snapshot named by a policy's
//! snapshot rule (its prefix and time shape) on a volume the policy covers, unless it is
//! * protected (`snapshot protect`; the pool refuses to delete it anyway),
//! * a backup job's next incremental base, or being backed up now,
//! * the newest such snapshot of that policy on that volume: the local restore point the
//!   policy's schedule rests on. Deleting it would leave the volume without the copy the
//!   policy promises, so the guard stops and alerts instead ([`Event::SpaceExhausted`]).
//!
//! Hand-made snapshots are never touched. Oldest first (by the time in the name) across
//! all policies and volumes. After each delete the pool's reclaim runs to completion and
//! the pool syncs ([`PoolSpace::settle`]), so free space is measured, not estimated.
//!
//! Two callers run passes: the daemon's guard thread every few seconds (`urgent` false:
//! only under the threshold) and a write that found the pool full (through the core's
//! `SpaceRelief`; `urgent`: delete at least one snapshot if any may go). Passes are
//! serialised by [`Guard`]; a caller that waited for another's pass counts its deletions
//! as progress. The manager mutex is held only to choose and delete one snapshot (ms), never
//! across reclaim.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::manager::{Manager, PolicyPool};
use crate::policy::parse_snapshot_name;

/// The pool record holding the guard's settings.
pub const GUARD_RECORD: &str = "space_guard";

/// The guard's settings (`snapblk pool guard --min-free P [--target-free Q]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuardConfig {
    /// Delete snapshots when free space is under this percentage of the pool.
    pub min_free_percent: f64,
    /// ... until free space is at least this percentage (≥ `min_free_percent`).
    pub target_free_percent: f64,
}

impl GuardConfig {
    /// Checks the percentages; `target` defaults to `min` + 5 (at most 100).
    pub fn new(min: f64, target: Option<f64>) -> Result<GuardConfig, String> {
        if !(min > 0.0 && min < 100.0) {
            return Err(format!(
                "--min-free {min}: a percentage above 0 and below 100"
            ));
        }
        let target = target.unwrap_or((min + 5.0).min(100.0));
        if !(target >= min && target <= 100.0) {
            return Err(format!(
                "--target-free {target}: a percentage from --min-free ({min}) to 100"
            ));
        }
        Ok(GuardConfig {
            min_free_percent: min,
            target_free_percent: target,
        })
    }
}

/// A snapshot the guard may delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub volume: String,
    pub snapshot: String,
    pub policy: String,
    pub time: Timestamp,
}

/// The pool's space as the guard needs it (the daemon adapts its pool).
pub trait PoolSpace {
    /// (free bytes, capacity bytes).
    fn space(&self) -> (u64, u64);
    /// Runs reclaim until nothing is queued and syncs, so what deletes freed is free.
    fn settle(&self) -> Result<(), String>;
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    pub deleted: Vec<Candidate>,
    /// Whether space was freed for the caller (by this pass or one it waited for).
    pub progressed: bool,
    pub events: Vec<Event>,
    /// What went wrong (a delete or reclaim that failed ends the pass).
    pub errors: Vec<String>,
}

#[derive(Default)]
struct State {
    config: Option<GuardConfig>,
    /// Snapshots deleted by all passes so far (a waiting caller compares).
    deletions: u64,
    /// Under the threshold with nothing left to delete (announced once).
    exhausted: bool,
}

/// The guard: its settings and the state passes share.
#[derive(Default)]
pub struct Guard {
    state: Mutex<State>,
    /// One pass at a time.
    pass: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn percent(free: u64, cap: u64) -> f64 {
    if cap == 0 {
        100.0
    } else {
        free as f64 * 100.0 / cap as f64
    }
}

/// Waits at most `limit` for `m` (a pre-snapshot hook may hold the manager for its
/// timeout while it freezes a filesystem whose writes wait on us).
fn lock_within<'a, T>(m: &'a Mutex<T>, limit: Duration) -> Option<MutexGuard<'a, T>> {
    let start = Instant::now();
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {
                if start.elapsed() >= limit {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl Guard {
    pub fn new(config: Option<GuardConfig>) -> Guard {
        Guard {
            state: Mutex::new(State {
                config,
                ..State::default()
            }),
            pass: Mutex::new(()),
        }
    }
    pub fn config(&self) -> Option<GuardConfig> {
        lock(&self.state).config
    }
    pub fn set_config(&self, c: Option<GuardConfig>) {
        let mut s = lock(&self.state);
        s.config = c;
        s.exhausted = false;
    }

    /// One pass: nothing if the guard is off, or free space is at or above the threshold
    /// (and the caller is not a write that found the pool full); else deletes candidates
    /// oldest first until free space reaches the target or none is left.
    pub fn pass<P: PolicyPool>(
        &self,
        mgr: &Mutex<Manager<P>>,
        space: &dyn PoolSpace,
        urgent: bool,
        now: Timestamp,
    ) -> Pass {
        let seen = lock(&self.state).deletions;
        let mut out = Pass::default();
        // Another pass may be running (its reclaim can take a while): a writer waits for it
        // at most as long as for the manager, then counts what it freed.
        let Some(_one) = lock_within(&self.pass, Duration::from_secs(30)) else {
            out.progressed = lock(&self.state).deletions != seen;
            return out;
        };
        let Some(cfg) = self.config() else {
            return out;
        };
        if urgent && lock(&self.state).deletions != seen {
            // Another pass freed space while we waited for it.
            out.progressed = true;
            return out;
        }
        let (free, cap) = space.space();
        let start_pct = percent(free, cap);
        if start_pct >= cfg.min_free_percent && !urgent {
            return self.recovered(out, start_pct, cfg, now);
        }
        let mut pct = start_pct;
        // Snapshots the pool refused to delete in this pass (in use, just gone): skipped.
        let mut refused: Vec<(String, String)> = Vec::new();
        loop {
            if pct >= cfg.target_free_percent && !(urgent && out.deleted.is_empty()) {
                break;
            }
            let Some(m) = lock_within(mgr, Duration::from_secs(30)) else {
                break;
            };
            let next = m
                .space_candidates()
                .into_iter()
                .find(|c| !refused.contains(&(c.volume.clone(), c.snapshot.clone())));
            let Some(c) = next else {
                drop(m);
                let mut s = lock(&self.state);
                if pct < cfg.min_free_percent && !s.exhausted {
                    s.exhausted = true;
                    out.events.push(Event::SpaceExhausted {
                        free_percent: pct,
                        min_free_percent: cfg.min_free_percent,
                        time: now,
                    });
                }
                break;
            };
            let r = m.delete_snapshot(&c.volume, &c.snapshot);
            drop(m);
            if let Err(e) = r {
                out.errors.push(e);
                refused.push((c.volume, c.snapshot));
                continue;
            }
            lock(&self.state).deletions += 1;
            out.deleted.push(c);
            out.progressed = true;
            if let Err(e) = space.settle() {
                out.errors.push(format!("reclaim after a delete: {e}"));
                break;
            }
            let (free, cap) = space.space();
            pct = percent(free, cap);
        }
        if !out.deleted.is_empty() {
            out.events.push(Event::SnapshotsDeletedForSpace {
                snapshots: out
                    .deleted
                    .iter()
                    .map(|c| format!("{}@{}", c.volume, c.snapshot))
                    .collect(),
                free_percent_before: start_pct,
                free_percent: pct,
                time: now,
            });
        }
        if pct >= cfg.min_free_percent {
            return self.recovered(out, pct, cfg, now);
        }
        out
    }

    fn recovered(&self, mut out: Pass, pct: f64, cfg: GuardConfig, now: Timestamp) -> Pass {
        let mut s = lock(&self.state);
        if s.exhausted {
            s.exhausted = false;
            out.events.push(Event::SpaceRecovered {
                free_percent: pct,
                min_free_percent: cfg.min_free_percent,
                time: now,
            });
        }
        out
    }
}

impl<P: PolicyPool> Manager<P> {
    /// The snapshots the space guard may delete, oldest first (see the module doc).
    pub fn space_candidates(&self) -> Vec<Candidate> {
        let mut out = Vec::new();
        for (pname, p) in self.policies() {
            let Some(rule) = &p.snapshots else { continue };
            for vol in self.volumes_of(p) {
                let Ok(snaps) = self.pool().snapshots(&vol) else {
                    continue;
                };
                let protected = self.pool().protected(&vol).unwrap_or_default();
                let bases = self.bases_of(pname, &vol);
                let mut mine: Vec<(Timestamp, String)> = snaps
                    .into_iter()
                    .filter_map(|(n, _)| parse_snapshot_name(&rule.prefix, &n).map(|t| (t, n)))
                    .collect();
                mine.sort();
                mine.pop(); // the newest stays
                for (time, snapshot) in mine {
                    if protected.contains(&snapshot) || bases.contains(&snapshot.as_str()) {
                        continue;
                    }
                    out.push(Candidate {
                        volume: vol.clone(),
                        snapshot,
                        policy: pname.clone(),
                        time,
                    });
                }
            }
        }
        out.sort_by(|a, b| (a.time, &a.volume, &a.snapshot).cmp(&(b.time, &b.volume, &b.snapshot)));
        out.dedup_by(|a, b| a.volume == b.volume && a.snapshot == b.snapshot);
        out
    }

    /// Deletes `vol@snap` for the space guard.
    pub fn delete_snapshot(&self, vol: &str, snap: &str) -> Result<(), String> {
        self.pool().delete_snapshot(vol, snap)
    }
}
