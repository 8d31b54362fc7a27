//! The backup manager's core: policies, their jobs and what the jobs do, against a pool
//! seen through [`PolicyPool`] (the daemon adapts its pool; tests use an in-memory one).
//!
//! Records kept with the pool: `policy/NAME` (the [`Policy`], JSON), `repository/NAME` (a
//! [`RepoTarget`]) and `job/NAME` (a [`JobRecord`]: scheduler state plus the last
//! [`HISTORY`] runs). Job names are `snapshot:POLICY`, `backup:POLICY:REPO`, `gc:REPO` and
//! `verify:REPO`. A job's record is written when it starts (so a daemon stop mid-run is
//! reported `interrupted` at the next start) and when it ends.
//!
//! A snapshot job takes one snapshot per volume of its policy, named by
//! [`snapshot_name`], then applies the policy's retention to the snapshots of that volume
//! whose names the policy made (never any other) and deletes what it does not keep. A volume
//! that fails does not stop the others; the run fails naming every volume that failed.
//!
//! Backup, gc and verify jobs (crate::backups) can run for hours: [`Manager::tick`] and
//! [`Manager::start_now`] only start them (persisting "running") and return a [`Task`],
//! which the caller runs with [`crate::backups::run`] without the manager and hands back to
//! [`Manager::finish`]. Snapshot jobs take milliseconds and run inside `tick`.
//!
//! Threading: a `Manager` is owned by one thread at a time (the daemon wraps it in a mutex);
//! snapshot jobs run inside [`Manager::tick`] / [`Manager::run_now`] on the caller's thread.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::backups::{
    self, BackupDone, BackupItem, CopyDone, NamedRepo, RepoTarget, Task, TaskResult, Work,
};
use crate::policy::{parse_snapshot_name, snapshot_name, valid_name, OnPreFailure, Policy};
use crate::retention::{apply, Item, Verdict};
use crate::scheduler::{JobSpec, JobState, JobView, Outcome, Scheduler};
use crate::status::{assess, Medium, TargetStatus, VolumeStatus};

mod coverage;

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
    /// `vol`'s protected snapshots (`snapshot protect`): never deleted by retention or the
    /// space guard.
    fn protected(&self, vol: &str) -> Result<Vec<String>, String>;
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
    /// Whether `vol@from` and `vol@to` hold different data.
    fn changed(&self, vol: &str, from: &str, to: &str) -> Result<bool, String>;
    /// Backs up `vol@snap` into `repo` (incrementally where it can).
    fn backup(&self, repo: &NamedRepo, vol: &str, snap: &str) -> Result<BackupDone, String>;
    /// This pool's backups in `repo`.
    fn backups(&self, repo: &NamedRepo) -> Result<Vec<BackupItem>, String>;
    /// Removes this pool's backups `ids` from `repo` (gc frees their data); returns the
    /// ids removed (a backup an unfinished lazy restore holds is kept).
    fn forget(&self, repo: &NamedRepo, ids: &[String]) -> Result<Vec<String>, String>;
    /// Garbage-collects `repo`; returns its report in one line.
    fn gc(&self, repo: &NamedRepo, grace_secs: u64) -> Result<String, String>;
    /// Verifies `repo`, reading packs `part.0` of `part.1` (`part.1` = 0: structure only);
    /// an error if it found problems.
    fn verify(&self, repo: &NamedRepo, part: (u32, u32)) -> Result<String, String>;
    /// Copies this pool's backups in `from` that `to` lacks, except the source backups
    /// `skip` names (by id).
    fn copy(&self, from: &NamedRepo, to: &NamedRepo, skip: &[String]) -> Result<CopyDone, String>;
    /// The pool's volumes.
    fn volumes(&self) -> Result<Vec<String>, String>;
    /// The media (device ids, as [`Medium::id`]) holding the pool.
    fn pool_media(&self) -> Vec<String>;
    /// Where `repo` keeps its data.
    fn medium(&self, repo: &RepoTarget) -> Medium;
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
    /// Backup jobs: volumes not backed up, and why (already stored, unchanged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_uploaded: u64,
    /// Gc and verify jobs: their report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// What is persisted per job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobRecord {
    pub state: JobState,
    pub history: Vec<RunRecord>,
    /// Backup jobs: per volume, the newest snapshot backed up (the next run's incremental
    /// base, which the snapshot job's retention keeps).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub bases: BTreeMap<String, String>,
    /// Backup jobs: per volume, the newest snapshot whose data the repository holds
    /// (backed up, or unchanged since the last backup); the 3-2-1 report's age.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub covered: BTreeMap<String, String>,
}

/// A job as listed: scheduler view plus its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    #[serde(flatten)]
    pub view: JobView,
    pub policy: String,
    /// The repository a backup, gc or verify job works on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub repository: String,
    pub history: Vec<RunRecord>,
}

/// Retention's decisions for one volume of a policy (dry run or done).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    repos: BTreeMap<String, RepoTarget>,
    history: BTreeMap<String, Vec<RunRecord>>,
    /// Backup jobs' bases and coverage (see [`JobRecord::bases`], [`JobRecord::covered`]).
    bases: BTreeMap<String, BTreeMap<String, String>>,
    covered: BTreeMap<String, BTreeMap<String, String>>,
    /// Running backup jobs: per volume, the snapshot the run backs up (protected from
    /// snapshot retention until the run ends and its bases are recorded).
    pinned: BTreeMap<String, BTreeMap<String, String>>,
}

/// A run just started: done already (snapshot jobs), or to be run without the manager.
#[derive(Debug)]
pub enum Started {
    Done(RunRecord),
    Task(Box<Task>),
}

/// What one snapshot step of a job covers.
#[derive(Clone, Copy)]
enum Unit<'a> {
    /// A consistency group: all members in one cut.
    Group(&'a str),
    Volume(&'a str),
}

/// A job's name, parsed (policy and repository names hold no `:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobName<'a> {
    Snapshot(&'a str),
    Backup(&'a str, &'a str),
    Gc(&'a str),
    Verify(&'a str),
    Copy(&'a str),
}

fn parse_job(job: &str) -> Option<JobName<'_>> {
    let (kind, rest) = job.split_once(':')?;
    Some(match kind {
        "snapshot" => JobName::Snapshot(rest),
        "backup" => {
            let (p, r) = rest.split_once(':')?;
            JobName::Backup(p, r)
        }
        "gc" => JobName::Gc(rest),
        "verify" => JobName::Verify(rest),
        "copy" => JobName::Copy(rest),
        _ => return None,
    })
}

fn snapshot_job(policy: &str) -> String {
    format!("snapshot:{policy}")
}
fn backup_job(policy: &str, repo: &str) -> String {
    format!("backup:{policy}:{repo}")
}

/// The policy a job belongs to (`None` for repository jobs).
fn policy_of(job: &str) -> Option<&str> {
    match parse_job(job)? {
        JobName::Snapshot(p) | JobName::Backup(p, _) => Some(p),
        _ => None,
    }
}

/// The repository a job works on.
fn repo_of(job: &str) -> Option<&str> {
    match parse_job(job)? {
        JobName::Backup(_, r) | JobName::Gc(r) | JobName::Verify(r) | JobName::Copy(r) => Some(r),
        JobName::Snapshot(_) => None,
    }
}

/// The jobs of policy `name` and when they run.
fn policy_jobs(name: &str, p: &Policy) -> Vec<(String, JobSpec)> {
    let mut out = Vec::new();
    if let Some(s) = &p.snapshots {
        out.push((
            snapshot_job(name),
            JobSpec {
                schedule: s.schedule.clone(),
                persistent: s.persistent,
                random_delay_secs: s.random_delay_secs,
                timezone: p.timezone.clone(),
            },
        ));
    }
    for b in &p.backups {
        out.push((
            backup_job(name, &b.repository),
            JobSpec {
                schedule: b.schedule.clone(),
                persistent: b.persistent,
                random_delay_secs: b.random_delay_secs,
                timezone: p.timezone.clone(),
            },
        ));
    }
    out
}

/// The maintenance jobs of repository `name`.
fn repo_jobs(name: &str, r: &RepoTarget) -> Vec<(String, JobSpec)> {
    let spec = |schedule: &crate::CalendarEvent| JobSpec {
        schedule: schedule.clone(),
        persistent: true,
        random_delay_secs: 0,
        timezone: None,
    };
    let mut out = Vec::new();
    if let Some(g) = &r.gc {
        out.push((format!("gc:{name}"), spec(&g.schedule)));
    }
    if let Some(v) = &r.verify {
        out.push((format!("verify:{name}"), spec(&v.schedule)));
    }
    if let Some(c) = &r.copy {
        out.push((format!("copy:{name}"), spec(&c.schedule)));
    }
    out
}

impl<P: PolicyPool> Manager<P> {
    /// Loads every repository, policy and job record of `pool`. A record that does not
    /// decode is an error naming it (the daemon reports it rather than dropping a policy
    /// silently).
    pub fn open(pool: P, tz: TimeZone, now: Timestamp) -> Result<Manager<P>, String> {
        let mut m = Manager {
            pool,
            sched: Scheduler::new(tz.clone()),
            tz,
            policies: BTreeMap::new(),
            repos: BTreeMap::new(),
            history: BTreeMap::new(),
            bases: BTreeMap::new(),
            covered: BTreeMap::new(),
            pinned: BTreeMap::new(),
        };
        let mut jobs: BTreeMap<String, JobRecord> = BTreeMap::new();
        for (name, v) in m.pool.records("job/")? {
            let rec: JobRecord =
                serde_json::from_slice(&v).map_err(|e| format!("record {name}: {e}"))?;
            jobs.insert(name["job/".len()..].to_string(), rec);
        }
        for (name, v) in m.pool.records("repository/")? {
            let rname = name["repository/".len()..].to_string();
            let r: RepoTarget =
                serde_json::from_slice(&v).map_err(|e| format!("repository {rname}: {e}"))?;
            for (job, spec) in repo_jobs(&rname, &r) {
                let rec = jobs.remove(&job).unwrap_or_default();
                m.add_job(&job, spec, rec, now)?;
            }
            m.repos.insert(rname, r);
        }
        for (name, v) in m.pool.records("policy/")? {
            let pname = name["policy/".len()..].to_string();
            let p: Policy =
                serde_json::from_slice(&v).map_err(|e| format!("policy {pname}: {e}"))?;
            for (job, spec) in policy_jobs(&pname, &p) {
                let rec = jobs.remove(&job).unwrap_or_default();
                m.add_job(&job, spec, rec, now)?;
            }
            m.policies.insert(pname, p);
        }
        Ok(m)
    }

    fn add_job(
        &mut self,
        job: &str,
        spec: JobSpec,
        rec: JobRecord,
        now: Timestamp,
    ) -> Result<(), String> {
        let had_run = rec.state.running_since.is_some();
        let before = rec.state.clone();
        let state = self.sched.add(job, spec, rec.state, now);
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
                skipped: Vec::new(),
                bytes_uploaded: 0,
                detail: None,
            });
            trim(&mut history);
        }
        self.history.insert(job.to_string(), history);
        if !rec.bases.is_empty() {
            self.bases.insert(job.to_string(), rec.bases);
        }
        if !rec.covered.is_empty() {
            self.covered.insert(job.to_string(), rec.covered);
        }
        // Opening the pool's policies writes only what changed (a new job, an interrupted
        // run), so read-only commands stay read-only.
        if changed || had_run {
            self.save(job, state)?;
        }
        Ok(())
    }

    fn save(&self, job: &str, state: JobState) -> Result<(), String> {
        let rec = JobRecord {
            state,
            history: self.history.get(job).cloned().unwrap_or_default(),
            bases: self.bases.get(job).cloned().unwrap_or_default(),
            covered: self.covered.get(job).cloned().unwrap_or_default(),
        };
        let v = serde_json::to_vec(&rec).map_err(|e| e.to_string())?;
        self.pool.put_record(&format!("job/{job}"), Some(v))
    }

    /// How many jobs run now.
    pub fn running_jobs(&self) -> usize {
        self.sched.jobs().iter().filter(|j| j.running).count()
    }

    fn running(&self, job: &str) -> bool {
        self.sched.jobs().iter().any(|j| j.name == job && j.running)
    }

    /// Makes `new` the jobs that `old` were: jobs in both keep their state, history and
    /// bases; jobs only in `old` go (their records too).
    fn replace_jobs(
        &mut self,
        old: &[String],
        new: Vec<(String, JobSpec)>,
        now: Timestamp,
    ) -> Result<(), String> {
        self.check_removable(old, &new)?;
        let views = self.sched.jobs();
        for job in old {
            if !new.iter().any(|(n, _)| n == job) {
                self.sched.remove(job);
                self.history.remove(job);
                self.bases.remove(job);
                self.covered.remove(job);
                self.pool.put_record(&format!("job/{job}"), None)?;
            }
        }
        for (job, spec) in new {
            // A job running now (a backup outside the manager) keeps running: only its
            // schedule changes, so it is neither started twice nor recorded interrupted.
            if views.iter().any(|j| j.name == job && j.running) {
                self.sched.respec(&job, spec, now);
                continue;
            }
            let state = views
                .iter()
                .find(|j| j.name == job)
                .map(|j| j.state.clone())
                .unwrap_or_default();
            let rec = JobRecord {
                state,
                history: self.history.get(&job).cloned().unwrap_or_default(),
                bases: self.bases.get(&job).cloned().unwrap_or_default(),
                covered: self.covered.get(&job).cloned().unwrap_or_default(),
            };
            self.sched.remove(&job);
            self.add_job(&job, spec, rec, now)?;
        }
        Ok(())
    }

    /// A running job may change its schedule but not go away: its run would finish
    /// against a job re-added meanwhile (two runs at once, results crossed).
    fn check_removable(&self, old: &[String], new: &[(String, JobSpec)]) -> Result<(), String> {
        match old
            .iter()
            .find(|j| !new.iter().any(|(n, _)| n == *j) && self.running(j))
        {
            Some(j) => Err(format!(
                "job {j} is running: wait for it to end (snapblk jobs) and try again"
            )),
            None => Ok(()),
        }
    }

    /// Jobs whose names `f` selects.
    fn jobs_where(&self, f: impl Fn(&str) -> bool) -> Vec<String> {
        self.sched
            .jobs()
            .into_iter()
            .map(|j| j.name)
            .filter(|n| f(n))
            .collect()
    }

    /// Creates or replaces policy `name` (its jobs keep their state and history).
    pub fn set_policy(&mut self, name: &str, mut p: Policy, now: Timestamp) -> Result<(), String> {
        valid_name("policy name", name)?;
        if let Some(s) = p.snapshots.as_mut() {
            if s.prefix.is_empty() {
                s.prefix = name.to_string();
            }
        }
        p.validate()?;
        for b in &p.backups {
            let Some(r) = self.repos.get(&b.repository) else {
                return Err(format!(
                    "repository '{}' is not registered (snapblk repo add {} URL --key-file FILE)",
                    b.repository, b.repository
                ));
            };
            if r.copy.as_ref().is_some_and(|c| !c.keep.is_empty()) {
                return Err(format!(
                    "repository '{}' prunes the copies it receives by its own retention, which would also prune this policy's backups there: back up to its source instead, or register it without --keep-*",
                    b.repository
                ));
            }
        }
        self.check_prefix_unique(name, &p)?;
        let old = self.jobs_where(|j| policy_of(j) == Some(name));
        let new = policy_jobs(name, &p);
        self.check_removable(&old, &new)?;
        let v = serde_json::to_vec(&p).map_err(|e| e.to_string())?;
        self.pool.put_record(&format!("policy/{name}"), Some(v))?;
        self.replace_jobs(&old, new, now)?;
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

    /// Whether group `group` may get `members`: no two policies sharing a snapshot prefix
    /// may then cover one volume (their retentions would delete each other's snapshots and
    /// forget each other's backups).
    pub fn check_group(&self, group: &str, members: &[String]) -> Result<(), String> {
        let vols = |q: &Policy| -> Vec<String> {
            let mut v = q.volumes.clone();
            for g in &q.groups {
                if g == group {
                    v.extend(members.iter().cloned());
                } else {
                    v.extend(self.pool.group_members(g).unwrap_or_default());
                }
            }
            v
        };
        let prefix = |q: &Policy| q.snapshots.as_ref().map(|s| s.prefix.clone());
        let list: Vec<(&String, &Policy)> = self.policies.iter().collect();
        for (i, (a, p)) in list.iter().enumerate() {
            for (b, q) in &list[i + 1..] {
                if prefix(p).is_none() || prefix(p) != prefix(q) {
                    continue;
                }
                let vq = vols(q);
                if let Some(v) = vols(p).iter().find(|v| vq.contains(v)) {
                    return Err(format!(
                        "policies '{a}' and '{b}' would both name snapshots of volume {v} '{}-…'; give one another --prefix first",
                        prefix(p).unwrap_or_default()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Deletes policy `name` and its jobs (its snapshots and backups stay).
    pub fn delete_policy(&mut self, name: &str) -> Result<(), String> {
        if !self.policies.contains_key(name) {
            return Err(format!("policy '{name}' does not exist"));
        }
        let jobs = self.jobs_where(|j| policy_of(j) == Some(name));
        if let Some(j) = jobs.iter().find(|j| self.running(j)) {
            return Err(format!("policy '{name}': its job {j} is running"));
        }
        self.pool.put_record(&format!("policy/{name}"), None)?;
        self.replace_jobs(&jobs, Vec::new(), Timestamp::UNIX_EPOCH)?;
        self.policies.remove(name);
        Ok(())
    }

    /// Registers (or replaces) repository `name` with its maintenance schedules.
    pub fn set_repo(&mut self, name: &str, r: RepoTarget, now: Timestamp) -> Result<(), String> {
        valid_name("repository name", name)?;
        r.validate()?;
        if let Some(c) = &r.copy {
            if c.from == name {
                return Err(format!("repository '{name}' cannot copy from itself"));
            }
            if !self.repos.contains_key(&c.from) {
                return Err(format!("repository '{}' is not registered", c.from));
            }
            if !c.keep.is_empty() {
                if let Some((p, _)) = self
                    .policies
                    .iter()
                    .find(|(_, p)| p.backups.iter().any(|b| b.repository == name))
                {
                    return Err(format!(
                        "policy '{p}' backs up to '{name}': a copy retention there would prune its backups too (one retention per repository)"
                    ));
                }
            }
        }
        let old = self.jobs_where(|j| {
            matches!(parse_job(j), Some(JobName::Gc(n) | JobName::Verify(n) | JobName::Copy(n)) if n == name)
        });
        let new = repo_jobs(name, &r);
        self.check_removable(&old, &new)?;
        let v = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
        self.pool
            .put_record(&format!("repository/{name}"), Some(v))?;
        if self.repos.get(name).is_some_and(|o| o.url != r.url) {
            // Another repository under this name: what the jobs recorded of the old one
            // (bases, what it holds) says nothing of the new one.
            for job in self.jobs_where(|j| repo_of(j) == Some(name)) {
                self.bases.remove(&job);
                self.covered.remove(&job);
                if let Some(v) = self.sched.jobs().into_iter().find(|v| v.name == job) {
                    self.save(&job, v.state)?;
                }
            }
        }
        self.replace_jobs(&old, new, now)?;
        self.repos.insert(name.to_string(), r);
        Ok(())
    }

    /// Unregisters repository `name` (its backups stay in it); refused while a policy
    /// backs up there or one of its jobs runs.
    pub fn delete_repo(&mut self, name: &str) -> Result<(), String> {
        if !self.repos.contains_key(name) {
            return Err(format!("repository '{name}' is not registered"));
        }
        if let Some((p, _)) = self
            .policies
            .iter()
            .find(|(_, p)| p.backups.iter().any(|b| b.repository == name))
        {
            return Err(format!(
                "repository '{name}': policy '{p}' backs up there (remove that target first)"
            ));
        }
        if let Some((d, _)) = self
            .repos
            .iter()
            .find(|(_, r)| r.copy.as_ref().is_some_and(|c| c.from == name))
        {
            return Err(format!("repository '{name}': '{d}' copies from it"));
        }
        let jobs = self.jobs_where(|j| repo_of(j) == Some(name));
        if let Some(j) = jobs.iter().find(|j| self.running(j)) {
            return Err(format!("repository '{name}': its job {j} is running"));
        }
        self.pool.put_record(&format!("repository/{name}"), None)?;
        self.replace_jobs(&jobs, Vec::new(), Timestamp::UNIX_EPOCH)?;
        self.repos.remove(name);
        Ok(())
    }

    pub fn pool(&self) -> &P {
        &self.pool
    }

    pub fn policies(&self) -> &BTreeMap<String, Policy> {
        &self.policies
    }

    pub fn repos(&self) -> &BTreeMap<String, RepoTarget> {
        &self.repos
    }

    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    /// The zone policy `p`'s schedules and retention periods are read in.
    fn tz_of(&self, p: &Policy) -> TimeZone {
        crate::scheduler::zone(p.timezone.as_deref(), &self.tz)
    }

    pub fn jobs(&self) -> Vec<JobInfo> {
        self.sched
            .jobs()
            .into_iter()
            .map(|view| JobInfo {
                policy: policy_of(&view.name).unwrap_or("").to_string(),
                repository: repo_of(&view.name).unwrap_or("").to_string(),
                history: self.history.get(&view.name).cloned().unwrap_or_default(),
                view,
            })
            .collect()
    }

    pub fn next_wakeup(&self) -> Option<Timestamp> {
        self.sched.next_wakeup()
    }

    /// Runs every snapshot job due at `now` (`clock` gives the time as runs end) and starts
    /// every other due job. Returns the finished runs and the tasks to run
    /// ([`crate::backups::run`], then [`Manager::finish`]).
    pub fn tick(
        &mut self,
        now: Timestamp,
        clock: &dyn Fn() -> Timestamp,
    ) -> (Vec<(String, RunRecord)>, Vec<Task>) {
        let mut done = Vec::new();
        let mut tasks = Vec::new();
        for start in self.sched.poll(now) {
            match self.begin(&start.job, now, false, clock) {
                Some(Started::Done(r)) => done.push((start.job, r)),
                Some(Started::Task(t)) => tasks.push(*t),
                None => {}
            }
        }
        (done, tasks)
    }

    /// Starts job `job` now, outside its schedule: a snapshot job runs to its end here;
    /// any other comes back as a task for the caller to run without the manager.
    pub fn start_now(
        &mut self,
        job: &str,
        now: Timestamp,
        clock: &dyn Fn() -> Timestamp,
    ) -> Result<Started, String> {
        self.sched.run_now(job, now).map_err(|e| e.to_string())?;
        self.begin(job, now, true, clock)
            .ok_or_else(|| format!("job '{job}' has no policy"))
    }

    /// Runs job `job` now, outside its schedule, to its end (a long job too: the caller
    /// holds the manager meanwhile — the CLI's direct mode and tests).
    pub fn run_now(
        &mut self,
        job: &str,
        now: Timestamp,
        clock: &dyn Fn() -> Timestamp,
    ) -> Result<RunRecord, String> {
        match self.start_now(job, now, clock)? {
            Started::Done(r) => Ok(r),
            Started::Task(t) => {
                let r = backups::run(&self.pool, &t, &self.tz);
                Ok(self.finish(&t, r, clock()))
            }
        }
    }

    /// Persists "running" for `job`, then runs it (snapshot) or returns its task.
    fn begin(
        &mut self,
        job: &str,
        now: Timestamp,
        manual: bool,
        clock: &dyn Fn() -> Timestamp,
    ) -> Option<Started> {
        let state = self.sched.jobs().into_iter().find(|j| j.name == job)?.state;
        // Persist "running" first: a stop from here on is reported as interrupted.
        let saved = self.save(job, state.clone());
        let task = match parse_job(job) {
            Some(JobName::Snapshot(_)) => {
                return self
                    .run_snapshots(job, now, manual, clock, saved.err())
                    .map(Started::Done)
            }
            _ => self.task_for(job, &state, now, manual),
        };
        Some(match (task, saved) {
            (Ok(t), Ok(())) => {
                if let Work::Backup { pinned, .. } = &t.work {
                    self.pinned.insert(job.to_string(), pinned.clone());
                }
                Started::Task(Box::new(t))
            }
            // Not started: a run whose start could not be recorded could be lost.
            (Ok(_), Err(e)) => Started::Done(self.record(
                job,
                now,
                manual,
                TaskResult::failed(format!("saving job state: {e}")),
                clock(),
            )),
            (Err(e), _) => {
                Started::Done(self.record(job, now, manual, TaskResult::failed(e), clock()))
            }
        })
    }

    /// What a long job's run is to do, from its policy and repository as they are now.
    fn task_for(
        &self,
        job: &str,
        state: &JobState,
        now: Timestamp,
        manual: bool,
    ) -> Result<Task, String> {
        let repo = |name: &str| -> Result<NamedRepo, String> {
            let target = self
                .repos
                .get(name)
                .ok_or_else(|| format!("repository '{name}' is not registered"))?;
            Ok(NamedRepo {
                name: name.to_string(),
                target: target.clone(),
            })
        };
        let work = match parse_job(job) {
            Some(JobName::Backup(p, r)) => {
                let policy = self.policies.get(p).ok_or("its policy is gone")?;
                let rule = policy
                    .backups
                    .iter()
                    .find(|b| b.repository == r)
                    .ok_or("its backup target is gone")?;
                let prefix = policy
                    .snapshots
                    .as_ref()
                    .map(|s| s.prefix.clone())
                    .unwrap_or_default();
                Work::Backup {
                    policy: p.to_string(),
                    timezone: policy.timezone.clone(),
                    rule: Box::new(rule.clone()),
                    repo: repo(r)?,
                    pinned: self.newest_snapshots(policy, &prefix),
                    prefix,
                    volumes: policy.volumes.clone(),
                    groups: policy.groups.clone(),
                }
            }
            Some(JobName::Gc(r)) => {
                let named = repo(r)?;
                let grace_secs = named.target.gc.as_ref().ok_or("no gc schedule")?.grace_secs;
                Work::Gc {
                    repo: named,
                    grace_secs,
                }
            }
            Some(JobName::Copy(r)) => {
                let to = repo(r)?;
                let rule = to.target.copy.clone().ok_or("no copy schedule")?;
                Work::Copy {
                    from: Box::new(repo(&rule.from)?),
                    to: Box::new(to),
                    keep: rule.keep,
                }
            }
            Some(JobName::Verify(r)) => {
                let named = repo(r)?;
                let n = named
                    .target
                    .verify
                    .as_ref()
                    .ok_or("no verify schedule")?
                    .read_data_runs;
                // Runs so far pick the part: every pack is read once every n runs.
                let k = if n == 0 {
                    0
                } else {
                    (state.runs % u64::from(n)) as u32
                };
                Work::Verify {
                    repo: named,
                    part: (k, n),
                }
            }
            _ => return Err(format!("job '{job}' is not a known kind")),
        };
        Ok(Task {
            job: job.to_string(),
            start: now,
            manual,
            work,
        })
    }

    /// Records the end of a long job's run (from [`Manager::tick`] or
    /// [`Manager::start_now`]).
    pub fn finish(&mut self, task: &Task, r: TaskResult, end: Timestamp) -> RunRecord {
        self.record(&task.job, task.start, task.manual, r, end)
    }

    fn record(
        &mut self,
        job: &str,
        start: Timestamp,
        manual: bool,
        r: TaskResult,
        end: Timestamp,
    ) -> RunRecord {
        let outcome = if r.errors.is_empty() {
            Outcome::Ok
        } else {
            Outcome::Failed {
                error: r.errors.join("; "),
            }
        };
        let end = end.max(start);
        self.pinned.remove(job);
        let state = self.sched.finished(job, end, outcome.clone()).ok();
        let rec = RunRecord {
            start,
            end,
            manual,
            outcome,
            created: r.created,
            deleted: r.deleted,
            warnings: Vec::new(),
            skipped: r.skipped,
            bytes_uploaded: r.bytes_uploaded,
            detail: r.detail,
        };
        let Some(state) = state else {
            // Its job was removed (its policy or target deleted) while it ran: the run
            // is reported to whoever waits for it, but leaves no bases behind.
            return rec;
        };
        if !r.bases.is_empty() {
            self.bases
                .entry(job.to_string())
                .or_default()
                .extend(r.bases);
        }
        if !r.covered.is_empty() {
            self.covered
                .entry(job.to_string())
                .or_default()
                .extend(r.covered);
        }
        self.push_history(job, rec.clone());
        // A failure to save shows at the next save; the run happened.
        let _ = self.save(job, state);
        rec
    }

    fn push_history(&mut self, job: &str, rec: RunRecord) {
        let history = self.history.entry(job.to_string()).or_default();
        history.push(rec);
        trim(history);
    }

    fn run_snapshots(
        &mut self,
        job: &str,
        now: Timestamp,
        manual: bool,
        clock: &dyn Fn() -> Timestamp,
        save_error: Option<String>,
    ) -> Option<RunRecord> {
        let mut errors: Vec<String> = Vec::new();
        if let Some(e) = save_error {
            errors.push(format!("saving job state: {e}"));
        }
        let pname = policy_of(job).unwrap_or("").to_string();
        let policy = self.policies.get(&pname).cloned();
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
                        ("SNAPBLK_POLICY", pname.clone()),
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
                        if let Err(e) =
                            self.snapshot_unit(&pname, p, unit, now, &mut created, &mut deleted)
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
            skipped: Vec::new(),
            bytes_uploaded: 0,
            detail: None,
        };
        self.push_history(job, rec.clone());
        // A failure to save is in the log of the caller's next save; the run happened.
        let _ = self.save(job, state);
        Some(rec)
    }

    /// Snapshots `unit` (a group as one cut, or one volume) as this second's name, then
    /// applies retention to each of its volumes. A run in the same second as the previous
    /// one (a manual run right after a scheduled one) finds this second's snapshot already
    /// taken on every volume: that is the snapshot.
    fn snapshot_unit(
        &self,
        pname: &str,
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
            if let Err(e) = self.prune_volume(pname, p, m, deleted) {
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
    fn prune_volume(
        &self,
        pname: &str,
        p: &Policy,
        vol: &str,
        deleted: &mut Vec<String>,
    ) -> Result<(), String> {
        let plan = self.plan_volume(pname, p, vol)?;
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

    /// Snapshots of `vol` that policy `pname`'s backup jobs need: each one's next base, and
    /// what a running one is backing up.
    pub(crate) fn bases_of(&self, pname: &str, vol: &str) -> Vec<&str> {
        self.bases
            .iter()
            .chain(self.pinned.iter())
            .filter(|(job, _)| matches!(parse_job(job), Some(JobName::Backup(p, _)) if p == pname))
            .filter_map(|(_, b)| b.get(vol).map(String::as_str))
            .collect()
    }

    /// The volumes `p` covers now: its groups' members (a group that does not resolve
    /// counts none) and its volumes.
    pub(crate) fn volumes_of(&self, p: &Policy) -> Vec<String> {
        let mut vols: Vec<String> = p
            .groups
            .iter()
            .flat_map(|g| self.pool.group_members(g).unwrap_or_default())
            .collect();
        vols.extend(p.volumes.iter().cloned());
        vols.sort();
        vols.dedup();
        vols
    }

    /// Per volume of `p` (groups resolved now; a group that does not resolve is reported
    /// by the run), its newest snapshot named with `prefix`.
    fn newest_snapshots(&self, p: &Policy, prefix: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for v in self.volumes_of(p) {
            let newest = self
                .pool
                .snapshots(&v)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(n, _)| parse_snapshot_name(prefix, &n).map(|t| (t, n)))
                .max();
            if let Some((_, n)) = newest {
                out.insert(v, n);
            }
        }
        out
    }

    fn plan_volume(&self, pname: &str, p: &Policy, vol: &str) -> Result<VolumePlan, String> {
        let Some(rule) = &p.snapshots else {
            return Ok(VolumePlan {
                volume: vol.to_string(),
                verdicts: Vec::new(),
                error: None,
            });
        };
        let bases = self.bases_of(pname, vol);
        let held = self.pool.protected(vol)?;
        let items: Vec<Item> = self
            .pool
            .snapshots(vol)?
            .into_iter()
            .filter_map(|(name, _)| {
                // The time in the name, not the record's: a restored or copied pool keeps it.
                parse_snapshot_name(&rule.prefix, &name).map(|time| Item {
                    protected: bases.contains(&name.as_str()) || held.contains(&name),
                    name,
                    time,
                })
            })
            .collect();
        Ok(VolumePlan {
            volume: vol.to_string(),
            verdicts: apply(&items, &rule.keep, &self.tz_of(p)),
            error: None,
        })
    }

    /// The 3-2-1 report of every volume (or of `only`), from what the jobs recorded.
    pub fn status(&self, now: Timestamp, only: Option<&str>) -> Result<Vec<VolumeStatus>, String> {
        let mut vols = self.pool.volumes()?;
        if let Some(v) = only {
            if !vols.iter().any(|x| x == v) {
                return Err(format!("volume '{v}' not found"));
            }
            vols.retain(|x| x == v);
        }
        let pool_media = self.pool.pool_media();
        let views = self.sched.jobs();
        let last_error = |job: &str| -> Option<String> {
            views
                .iter()
                .find(|j| j.name == job)
                .and_then(|j| match &j.state.last_outcome {
                    Some(Outcome::Failed { error }) => Some(error.clone()),
                    Some(Outcome::Interrupted) => Some("interrupted".into()),
                    _ => None,
                })
        };
        let members: BTreeMap<&str, Vec<String>> = self
            .policies
            .values()
            .flat_map(|p| p.groups.iter())
            .map(|g| (g.as_str(), self.pool.group_members(g).unwrap_or_default()))
            .collect();
        let mut media: BTreeMap<String, Medium> = BTreeMap::new();
        let mut out = Vec::new();
        for vol in &vols {
            let covering: Vec<(&String, &Policy)> = self
                .policies
                .iter()
                .filter(|(_, p)| {
                    p.volumes.contains(vol)
                        || p.groups
                            .iter()
                            .any(|g| members.get(g.as_str()).is_some_and(|m| m.contains(vol)))
                })
                .collect();
            let mut targets = Vec::new();
            let mut snapshot_errors = Vec::new();
            for (pname, p) in &covering {
                if let Some(e) = last_error(&snapshot_job(pname)) {
                    snapshot_errors.push(format!("{pname}: {e}"));
                }
                let prefix = p.snapshots.as_ref().map_or("", |s| s.prefix.as_str());
                for rule in &p.backups {
                    // The target, and every repository that copies from it (its copies
                    // lag by up to twice the copy's interval).
                    let tz = self.tz_of(p);
                    let rpo = rule.rpo(now, &tz);
                    let mut dests = vec![(
                        rule.repository.clone(),
                        backup_job(pname, &rule.repository),
                        rpo,
                    )];
                    for (dname, d) in &self.repos {
                        if let Some(c) = d.copy.as_ref().filter(|c| c.from == rule.repository) {
                            dests.push((
                                dname.clone(),
                                format!("copy:{dname}"),
                                rpo + c.lag(now, &tz),
                            ));
                        }
                    }
                    for (rname, job, rpo_secs) in dests {
                        let newest = (self.covered.get(&job).and_then(|b| b.get(vol)))
                            .or_else(|| self.bases.get(&job).and_then(|b| b.get(vol)))
                            .cloned();
                        let newest_time = newest
                            .as_deref()
                            .and_then(|n| parse_snapshot_name(prefix, n));
                        let age_secs = newest_time
                            .map(|t| (now.as_second() - t.as_second()).max(0).unsigned_abs());
                        let repo = self.repos.get(&rname);
                        let medium = match repo {
                            Some(r) => media
                                .entry(rname.clone())
                                .or_insert_with(|| self.pool.medium(r))
                                .clone(),
                            None => Medium {
                                id: "unregistered".into(),
                                off_site: false,
                            },
                        };
                        let verify = views.iter().find(|j| j.name == format!("verify:{rname}"));
                        targets.push(TargetStatus {
                            policy: pname.to_string(),
                            url: repo.map(|r| r.url.clone()).unwrap_or_default(),
                            repository: rname,
                            within_rpo: age_secs.is_some_and(|a| a <= rpo_secs),
                            newest,
                            newest_time,
                            age_secs,
                            rpo_secs,
                            same_medium_as_pool: pool_media.contains(&medium.id),
                            medium,
                            last_verify: verify.and_then(|j| j.state.last_end),
                            verify_ok: verify.and_then(|j| {
                                j.state
                                    .last_outcome
                                    .as_ref()
                                    .map(|o| !matches!(o, Outcome::Failed { .. }))
                            }),
                            last_error: last_error(&job),
                        });
                    }
                }
            }
            let names = covering.iter().map(|(n, _)| n.to_string()).collect();
            out.push(assess(vol, names, targets, &snapshot_errors));
        }
        Ok(out)
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
                self.plan_volume(name, p, v).unwrap_or_else(|e| VolumePlan {
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
