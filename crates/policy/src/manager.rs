//! The backup manager's core: policies, their jobs and what the jobs do, against a pool
//! seen through [`PolicyPool`] (the daemon adapts its pool; tests use an in-memory one).
//!
//! Records kept with the pool: `policy/NAME` (the [`Policy`], JSON) and `job/NAME` (a
//! [`JobRecord`]: scheduler state plus the last [`HISTORY`] runs). Job names are
//! `snapshot:POLICY`. A job's record is written when it starts (so a daemon stop mid-run is
//! reported `interrupted` at the next start) and when it ends.
//!
//! A snapshot job takes one snapshot per volume of its policy, named by
//! [`snapshot_name`], then applies the policy's retention to the snapshots of that volume
//! whose names the policy made (never any other) and deletes what it does not keep. A volume
//! that fails does not stop the others; the run fails naming every volume that failed.
//!
//! Threading: a `Manager` is owned by one thread at a time (the daemon wraps it in a mutex);
//! jobs run inside [`Manager::tick`] / [`Manager::run_now`] on the caller's thread.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::policy::{parse_snapshot_name, snapshot_name, valid_name, OnPreFailure, Policy};
use crate::retention::{apply, Item, Verdict};
use crate::scheduler::{JobSpec, JobState, JobView, Outcome, Scheduler};

/// Runs kept in a job's history.
pub const HISTORY: usize = 50;

/// What the manager needs of a pool. Errors are messages naming what they concern.
pub trait PolicyPool {
    /// `vol`'s snapshots: (name, creation time).
    fn snapshots(&self, vol: &str) -> Result<Vec<(String, Timestamp)>, String>;
    fn create_snapshot(&self, vol: &str, name: &str) -> Result<(), String>;
    /// The volumes of consistency group `group`.
    fn group_members(&self, group: &str) -> Result<Vec<String>, String>;
    /// Snapshots every member of `group` as `name`, as one cut (all or nothing).
    fn create_group_snapshot(&self, group: &str, name: &str) -> Result<(), String>;
    fn delete_snapshot(&self, vol: &str, name: &str) -> Result<(), String>;
    /// Records whose names start with `prefix`.
    fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String>;
    fn put_record(&self, name: &str, value: Option<Vec<u8>>) -> Result<(), String>;
    /// Runs a policy hook (argv, extra environment) and waits at most `timeout`; an error
    /// says how it failed (exit status and the end of its output, or the timeout).
    fn run_hook(
        &self,
        argv: &[String],
        env: &[(&str, String)],
        timeout: std::time::Duration,
    ) -> Result<(), String>;
}

/// One finished run, as `snapblk jobs` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub start: Timestamp,
    pub end: Timestamp,
    pub manual: bool,
    pub outcome: Outcome,
    /// What the run did: snapshots taken and deleted.
    pub created: Vec<String>,
    pub deleted: Vec<String>,
    /// What went wrong without failing the run (a pre hook failing under `continue`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What is persisted per job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobRecord {
    pub state: JobState,
    pub history: Vec<RunRecord>,
}

/// A job as listed: scheduler view plus its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobInfo {
    #[serde(flatten)]
    pub view: JobView,
    pub policy: String,
    pub history: Vec<RunRecord>,
}

/// Retention's decisions for one volume of a policy (dry run or done).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumePlan {
    pub volume: String,
    pub verdicts: Vec<Verdict>,
    /// Why this volume could not be planned (e.g. it does not exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct Manager<P: PolicyPool> {
    pool: P,
    tz: TimeZone,
    sched: Scheduler,
    policies: BTreeMap<String, Policy>,
    history: BTreeMap<String, Vec<RunRecord>>,
}

/// What one snapshot step of a job covers.
#[derive(Clone, Copy)]
enum Unit<'a> {
    /// A consistency group: all members in one cut.
    Group(&'a str),
    Volume(&'a str),
}

fn job_name(policy: &str) -> String {
    format!("snapshot:{policy}")
}
fn policy_of(job: &str) -> Option<&str> {
    job.strip_prefix("snapshot:")
}

impl<P: PolicyPool> Manager<P> {
    /// Loads every policy and job record of `pool`. A record that does not decode is an
    /// error naming it (the daemon reports it rather than dropping a policy silently).
    pub fn open(pool: P, tz: TimeZone, now: Timestamp) -> Result<Manager<P>, String> {
        let mut m = Manager {
            pool,
            sched: Scheduler::new(tz.clone()),
            tz,
            policies: BTreeMap::new(),
            history: BTreeMap::new(),
        };
        let mut jobs: BTreeMap<String, JobRecord> = BTreeMap::new();
        for (name, v) in m.pool.records("job/")? {
            let rec: JobRecord =
                serde_json::from_slice(&v).map_err(|e| format!("record {name}: {e}"))?;
            jobs.insert(name["job/".len()..].to_string(), rec);
        }
        for (name, v) in m.pool.records("policy/")? {
            let pname = name["policy/".len()..].to_string();
            let p: Policy =
                serde_json::from_slice(&v).map_err(|e| format!("policy {pname}: {e}"))?;
            let job = job_name(&pname);
            let rec = jobs.remove(&job).unwrap_or_default();
            m.add_job(&pname, &p, rec, now)?;
            m.policies.insert(pname, p);
        }
        Ok(m)
    }

    fn add_job(
        &mut self,
        pname: &str,
        p: &Policy,
        rec: JobRecord,
        now: Timestamp,
    ) -> Result<(), String> {
        let Some(s) = &p.snapshots else {
            return Ok(());
        };
        let job = job_name(pname);
        let spec = JobSpec {
            schedule: s.schedule.clone(),
            persistent: s.persistent,
            random_delay_secs: s.random_delay_secs,
        };
        let had_run = rec.state.running_since.is_some();
        let before = rec.state.clone();
        let state = self.sched.add(&job, spec, rec.state, now);
        let changed = state != before;
        let mut history = rec.history;
        if had_run {
            // Interrupted by a daemon stop: record it, so the history says so.
            let start = state.last_start.unwrap_or(now);
            history.push(RunRecord {
                start,
                end: state.last_end.unwrap_or(start),
                manual: false,
                outcome: Outcome::Interrupted,
                created: Vec::new(),
                deleted: Vec::new(),
                warnings: Vec::new(),
            });
            trim(&mut history);
        }
        self.history.insert(job.clone(), history.clone());
        // Opening the pool's policies writes only what changed (a new job, an interrupted
        // run), so read-only commands stay read-only.
        if changed || had_run {
            self.save(&job, state, history)?;
        }
        Ok(())
    }

    fn save(&self, job: &str, state: JobState, history: Vec<RunRecord>) -> Result<(), String> {
        let rec = JobRecord { state, history };
        let v = serde_json::to_vec(&rec).map_err(|e| e.to_string())?;
        self.pool.put_record(&format!("job/{job}"), Some(v))
    }

    /// Creates or replaces policy `name` (its job keeps its state and history).
    pub fn set_policy(&mut self, name: &str, mut p: Policy, now: Timestamp) -> Result<(), String> {
        valid_name("policy name", name)?;
        if let Some(s) = p.snapshots.as_mut() {
            if s.prefix.is_empty() {
                s.prefix = name.to_string();
            }
        }
        p.validate()?;
        self.check_prefix_unique(name, &p)?;
        let v = serde_json::to_vec(&p).map_err(|e| e.to_string())?;
        self.pool.put_record(&format!("policy/{name}"), Some(v))?;
        let job = job_name(name);
        let state = self
            .sched
            .jobs()
            .into_iter()
            .find(|j| j.name == job)
            .map(|j| j.state)
            .unwrap_or_default();
        let history = self.history.get(&job).cloned().unwrap_or_default();
        self.sched.remove(&job);
        self.add_job(name, &p, JobRecord { state, history }, now)?;
        self.policies.insert(name.to_string(), p);
        Ok(())
    }

    /// No other policy covering one of `p`'s volumes (directly or through a group) may name
    /// its snapshots with the same prefix: their retentions would delete each other's.
    fn check_prefix_unique(&self, name: &str, p: &Policy) -> Result<(), String> {
        let Some(prefix) = p.snapshots.as_ref().map(|s| &s.prefix) else {
            return Ok(());
        };
        let vols = |q: &Policy| -> Vec<String> {
            let mut v = q.volumes.clone();
            for g in &q.groups {
                // A group that does not resolve is reported when the job runs.
                v.extend(self.pool.group_members(g).unwrap_or_default());
            }
            v
        };
        let mine = vols(p);
        for (other, q) in &self.policies {
            if other == name || q.snapshots.as_ref().map(|s| &s.prefix) != Some(prefix) {
                continue;
            }
            if let Some(v) = vols(q).iter().find(|v| mine.contains(v)) {
                return Err(format!(
                    "policy '{other}' already names snapshots of volume {v} '{prefix}-…'; give this one another --prefix"
                ));
            }
        }
        Ok(())
    }

    /// Deletes policy `name` and its job (its snapshots stay).
    pub fn delete_policy(&mut self, name: &str) -> Result<(), String> {
        if !self.policies.contains_key(name) {
            return Err(format!("policy '{name}' does not exist"));
        }
        let job = job_name(name);
        if self.sched.jobs().iter().any(|j| j.name == job && j.running) {
            return Err(format!("policy '{name}': its job is running"));
        }
        self.pool.put_record(&format!("policy/{name}"), None)?;
        self.pool.put_record(&format!("job/{job}"), None)?;
        self.sched.remove(&job);
        self.history.remove(&job);
        self.policies.remove(name);
        Ok(())
    }

    pub fn policies(&self) -> &BTreeMap<String, Policy> {
        &self.policies
    }

    pub fn jobs(&self) -> Vec<JobInfo> {
        self.sched
            .jobs()
            .into_iter()
            .map(|view| JobInfo {
                policy: policy_of(&view.name).unwrap_or("").to_string(),
                history: self.history.get(&view.name).cloned().unwrap_or_default(),
                view,
            })
            .collect()
    }

    pub fn next_wakeup(&self) -> Option<Timestamp> {
        self.sched.next_wakeup()
    }

    /// Runs every job due at `now` (`clock` gives the time as runs end). Returns the runs.
    pub fn tick(
        &mut self,
        now: Timestamp,
        clock: &dyn Fn() -> Timestamp,
    ) -> Vec<(String, RunRecord)> {
        let mut out = Vec::new();
        for start in self.sched.poll(now) {
            if let Some(r) = self.run(&start.job, now, false, clock) {
                out.push((start.job, r));
            }
        }
        out
    }

    /// Runs job `job` now, outside its schedule.
    pub fn run_now(
        &mut self,
        job: &str,
        now: Timestamp,
        clock: &dyn Fn() -> Timestamp,
    ) -> Result<RunRecord, String> {
        self.sched.run_now(job, now).map_err(|e| e.to_string())?;
        self.run(job, now, true, clock)
            .ok_or_else(|| format!("job '{job}' has no policy"))
    }

    fn run(
        &mut self,
        job: &str,
        now: Timestamp,
        manual: bool,
        clock: &dyn Fn() -> Timestamp,
    ) -> Option<RunRecord> {
        let state = self.sched.jobs().into_iter().find(|j| j.name == job)?.state;
        let history = self.history.get(job).cloned().unwrap_or_default();
        // Persist "running" first: a stop from here on is reported as interrupted.
        let mut errors: Vec<String> = Vec::new();
        if let Err(e) = self.save(job, state, history) {
            errors.push(format!("saving job state: {e}"));
        }
        let policy = policy_of(job).and_then(|p| self.policies.get(p)).cloned();
        let (mut created, mut deleted, mut warnings) = (Vec::new(), Vec::new(), Vec::new());
        match &policy {
            Some(p) => {
                let hooks = p
                    .snapshots
                    .as_ref()
                    .map(|s| s.hooks.clone())
                    .unwrap_or_default();
                let prefix = p.snapshots.as_ref().map_or("", |s| s.prefix.as_str());
                let vols = [p.groups.clone(), p.volumes.clone()].concat().join(" ");
                let env = |phase: &str| {
                    vec![
                        ("SNAPBLK_POLICY", policy_of(job).unwrap_or("").to_string()),
                        ("SNAPBLK_PHASE", phase.to_string()),
                        ("SNAPBLK_SNAPSHOT", snapshot_name(prefix, now)),
                        ("SNAPBLK_VOLUMES", vols.clone()),
                    ]
                };
                let mut go = true;
                if !hooks.pre.is_empty() {
                    if let Err(e) = self.pool.run_hook(&hooks.pre, &env("pre"), hooks.timeout()) {
                        match hooks.on_pre_failure {
                            OnPreFailure::Abort => {
                                errors.push(format!("pre hook: {e}; no snapshot taken"));
                                go = false;
                            }
                            OnPreFailure::Continue => warnings
                                .push(format!("pre hook: {e}; snapshots taken crash-consistent")),
                        }
                    }
                }
                if go {
                    let units = (p
                        .groups
                        .iter()
                        .map(|g| (Unit::Group(g), format!("group {g}"))))
                    .chain(
                        p.volumes
                            .iter()
                            .map(|v| (Unit::Volume(v), format!("volume {v}"))),
                    );
                    for (unit, what) in units {
                        if let Err(e) = self.snapshot_unit(p, unit, now, &mut created, &mut deleted)
                        {
                            errors.push(format!("{what}: {e}"));
                        }
                    }
                    if !hooks.post.is_empty() {
                        if let Err(e) =
                            self.pool
                                .run_hook(&hooks.post, &env("post"), hooks.timeout())
                        {
                            errors.push(format!("post hook: {e}"));
                        }
                    }
                }
            }
            None => errors.push("its policy is gone".into()),
        }
        let outcome = if errors.is_empty() {
            Outcome::Ok
        } else {
            Outcome::Failed {
                error: errors.join("; "),
            }
        };
        let end = clock().max(now);
        let state = self.sched.finished(job, end, outcome.clone()).ok()?;
        let rec = RunRecord {
            start: now,
            end,
            manual,
            outcome,
            created,
            deleted,
            warnings,
        };
        let history = self.history.entry(job.to_string()).or_default();
        history.push(rec.clone());
        trim(history);
        let history = history.clone();
        // A failure to save is in the log of the caller's next save; the run happened.
        let _ = self.save(job, state, history);
        Some(rec)
    }

    /// Snapshots `unit` (a group as one cut, or one volume) as this second's name, then
    /// applies retention to each of its volumes. A run in the same second as the previous
    /// one (a manual run right after a scheduled one) finds this second's snapshot already
    /// taken on every volume: that is the snapshot.
    fn snapshot_unit(
        &self,
        p: &Policy,
        unit: Unit<'_>,
        now: Timestamp,
        created: &mut Vec<String>,
        deleted: &mut Vec<String>,
    ) -> Result<(), String> {
        let Some(rule) = &p.snapshots else {
            return Ok(());
        };
        let name = snapshot_name(&rule.prefix, now);
        let members = match unit {
            Unit::Group(g) => self.pool.group_members(g)?,
            Unit::Volume(v) => vec![v.to_string()],
        };
        let mut taken = 0;
        for m in &members {
            if self.pool.snapshots(m)?.iter().any(|(n, _)| *n == name) {
                taken += 1;
            }
        }
        if taken < members.len() {
            match unit {
                Unit::Group(g) => self.pool.create_group_snapshot(g, &name)?,
                Unit::Volume(v) => self.pool.create_snapshot(v, &name)?,
            }
            created.extend(members.iter().map(|m| format!("{m}@{name}")));
        }
        let mut errors = Vec::new();
        for m in &members {
            if let Err(e) = self.prune_volume(p, m, deleted) {
                errors.push(match unit {
                    Unit::Group(_) => format!("{m}: {e}"),
                    Unit::Volume(_) => e,
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Deletes what retention does not keep among `vol`'s snapshots of this policy.
    fn prune_volume(&self, p: &Policy, vol: &str, deleted: &mut Vec<String>) -> Result<(), String> {
        let plan = self.plan_volume(p, vol)?;
        let mut errors = Vec::new();
        for v in plan.verdicts.iter().filter(|v| !v.keep()) {
            match self.pool.delete_snapshot(vol, &v.name) {
                Ok(()) => deleted.push(format!("{vol}@{}", v.name)),
                Err(e) => errors.push(format!("deleting {vol}@{}: {e}", v.name)),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn plan_volume(&self, p: &Policy, vol: &str) -> Result<VolumePlan, String> {
        let Some(rule) = &p.snapshots else {
            return Ok(VolumePlan {
                volume: vol.to_string(),
                verdicts: Vec::new(),
                error: None,
            });
        };
        let items: Vec<Item> = self
            .pool
            .snapshots(vol)?
            .into_iter()
            .filter_map(|(name, _)| {
                // The time in the name, not the record's: a restored or copied pool keeps it.
                parse_snapshot_name(&rule.prefix, &name).map(|time| Item {
                    name,
                    time,
                    protected: false,
                })
            })
            .collect();
        Ok(VolumePlan {
            volume: vol.to_string(),
            verdicts: apply(&items, &rule.keep, &self.tz),
            error: None,
        })
    }

    /// What retention would keep and delete now, per volume of policy `name` (`--dry-run`).
    pub fn prune_plan(&self, name: &str) -> Result<Vec<VolumePlan>, String> {
        let p = self
            .policies
            .get(name)
            .ok_or_else(|| format!("policy '{name}' does not exist"))?;
        let mut vols: Vec<String> = Vec::new();
        for g in &p.groups {
            match self.pool.group_members(g) {
                Ok(m) => vols.extend(m),
                Err(e) => {
                    return Err(format!("group {g}: {e}"));
                }
            }
        }
        vols.extend(p.volumes.iter().cloned());
        Ok(vols
            .iter()
            .map(|v| {
                self.plan_volume(p, v).unwrap_or_else(|e| VolumePlan {
                    volume: v.clone(),
                    verdicts: Vec::new(),
                    error: Some(e),
                })
            })
            .collect())
    }
}

fn trim(h: &mut Vec<RunRecord>) {
    if h.len() > HISTORY {
        h.drain(..h.len() - HISTORY);
    }
}
