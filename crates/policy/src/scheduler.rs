//! The job scheduler: which jobs are due, against a clock the caller passes in (the daemon
//! passes the wall clock; tests drive a simulated one through weeks in milliseconds).
//!
//! Semantics (those of systemd timers, which admins know):
//! * a job runs at each elapse of its calendar schedule, plus an optional random delay
//!   (deterministic per job and elapse, so hosts with the same policy spread out while a
//!   replay of the same clock gives the same times);
//! * one run of a job at a time: elapses that pass while it runs are not queued; the next
//!   elapse is computed from when the run ended (no pile-up after a slow run);
//! * `persistent` jobs (systemd's `Persistent=true`) whose elapse passed while the daemon
//!   was down run once, as soon as the scheduler learns of them, however many elapses were
//!   missed; other jobs wait for their next elapse;
//! * a job that was running when the daemon stopped is reported `interrupted` (a failure)
//!   when its state is loaded again — never silently lost;
//! * a manual run (`snapblk jobs run`) starts at once unless the job is running, and does
//!   not move the schedule (an elapse that passes during it is skipped, as above).
//!
//! Threading: a `Scheduler` is plain data owned by one thread; [`JobState`] is what the
//! caller persists after every start and end.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::calendar::CalendarEvent;

/// When a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub schedule: CalendarEvent,
    /// Run once at start-up if an elapse was missed while the daemon was down.
    #[serde(default = "yes")]
    pub persistent: bool,
    /// Up to this many seconds of delay after each elapse.
    #[serde(default)]
    pub random_delay_secs: u32,
    /// The IANA time zone the schedule is read in (None: the scheduler's, the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// The time zone `name` names, else `default` (names are checked when a policy is set).
pub fn zone(name: Option<&str>, default: &TimeZone) -> TimeZone {
    name.and_then(|n| TimeZone::get(n).ok())
        .unwrap_or_else(|| default.clone())
}

fn yes() -> bool {
    true
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Failed {
        error: String,
    },
    /// The daemon stopped while the job ran.
    Interrupted,
}

/// What the caller persists about a job (the pool keeps it, so history survives restarts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobState {
    /// When the scheduler first learnt of the job: a persistent job whose first elapse
    /// after this passed while the daemon was down catches up too.
    pub since: Option<Timestamp>,
    /// The schedule elapse the last timer-started run was for.
    pub last_elapse: Option<Timestamp>,
    pub last_start: Option<Timestamp>,
    pub last_end: Option<Timestamp>,
    pub last_outcome: Option<Outcome>,
    /// Set while a run is in progress (persisted at its start).
    pub running_since: Option<Timestamp>,
    pub runs: u64,
    pub failures: u64,
}

/// A run the caller must start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub job: String,
    /// The elapse it is for (`now` for a catch-up or manual run).
    pub elapse: Timestamp,
    pub manual: bool,
}

/// Why a job cannot be started or finished.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    #[error("job '{0}' does not exist")]
    NotFound(String),
    #[error("job '{0}' is already running")]
    Running(String),
    #[error("job '{0}' is not running")]
    NotRunning(String),
}

#[derive(Debug, Clone)]
struct Entry {
    spec: JobSpec,
    state: JobState,
    /// (elapse, when it is due = elapse + delay); `None` while running or never again.
    next: Option<(Timestamp, Timestamp)>,
}

/// A job as `snapblk jobs` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub name: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub next_run: Option<Timestamp>,
    pub running: bool,
}

#[derive(Debug, Clone)]
pub struct Scheduler {
    tz: TimeZone,
    jobs: BTreeMap<String, Entry>,
}

/// A deterministic delay in `0..=max` seconds for this job and elapse (FNV-1a).
fn delay(job: &str, elapse: Timestamp, max: u32) -> SignedDuration {
    if max == 0 {
        return SignedDuration::ZERO;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job.bytes().chain(elapse.as_second().to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    SignedDuration::from_secs((h % (u64::from(max) + 1)) as i64)
}

impl Scheduler {
    pub fn new(tz: TimeZone) -> Scheduler {
        Scheduler {
            tz,
            jobs: BTreeMap::new(),
        }
    }

    fn due_after(
        &self,
        name: &str,
        spec: &JobSpec,
        t: Timestamp,
    ) -> Option<(Timestamp, Timestamp)> {
        let tz = zone(spec.timezone.as_deref(), &self.tz);
        let e = spec.schedule.next_after(t, &tz)?;
        let due = e.checked_add(delay(name, e, spec.random_delay_secs)).ok()?;
        Some((e, due))
    }

    /// Adds a job (or replaces its schedule) with the state the caller persisted, at `now`.
    /// Returns the state to persist (an interrupted run is recorded as such).
    pub fn add(
        &mut self,
        name: &str,
        spec: JobSpec,
        mut state: JobState,
        now: Timestamp,
    ) -> JobState {
        if let Some(since) = state.running_since.take() {
            // The daemon stopped during this run: it failed, and says so.
            state.last_outcome = Some(Outcome::Interrupted);
            state.last_end = Some(since.max(state.last_end.unwrap_or(since)));
            state.failures += 1;
        }
        state.since.get_or_insert(now);
        let next = match state.last_elapse.or(state.since) {
            Some(last) if spec.persistent => match spec
                .schedule
                .next_after(last, &zone(spec.timezone.as_deref(), &self.tz))
            {
                Some(e) if e <= now => Some((now, now)), // missed while down: once, now
                _ => self.due_after(name, &spec, now),
            },
            _ => self.due_after(name, &spec, now),
        };
        self.jobs.insert(
            name.to_string(),
            Entry {
                spec,
                state: state.clone(),
                next,
            },
        );
        state
    }

    /// Changes the schedule of job `name`, keeping its state: a running job stays running
    /// (its next run is computed from the new schedule when it ends). False if unknown.
    pub fn respec(&mut self, name: &str, spec: JobSpec, now: Timestamp) -> bool {
        let running = match self.jobs.get(name) {
            Some(e) => e.state.running_since.is_some(),
            None => return false,
        };
        let next = if running {
            None
        } else {
            self.due_after(name, &spec, now)
        };
        let e = self.jobs.get_mut(name).expect("checked above");
        e.spec = spec;
        e.next = next;
        true
    }

    pub fn remove(&mut self, name: &str) -> bool {
        self.jobs.remove(name).is_some()
    }

    fn start(e: &mut Entry, name: &str, elapse: Timestamp, now: Timestamp, manual: bool) -> Start {
        if !manual {
            e.state.last_elapse = Some(elapse);
        }
        e.state.last_start = Some(now);
        e.state.running_since = Some(now);
        e.next = None;
        Start {
            job: name.to_string(),
            elapse,
            manual,
        }
    }

    /// The runs due at `now`, marked running (persist their states before starting them).
    pub fn poll(&mut self, now: Timestamp) -> Vec<Start> {
        let mut out = Vec::new();
        for (name, e) in self.jobs.iter_mut() {
            if e.state.running_since.is_some() {
                continue;
            }
            if let Some((elapse, due)) = e.next {
                if due <= now {
                    out.push(Self::start(e, name, elapse, now, false));
                }
            }
        }
        out
    }

    /// Starts `name` now, outside its schedule.
    pub fn run_now(&mut self, name: &str, now: Timestamp) -> Result<Start, SchedError> {
        let e = self
            .jobs
            .get_mut(name)
            .ok_or_else(|| SchedError::NotFound(name.into()))?;
        if e.state.running_since.is_some() {
            return Err(SchedError::Running(name.into()));
        }
        let keep = e.next;
        let s = Self::start(e, name, now, now, true);
        e.next = keep;
        Ok(s)
    }

    /// Records the end of a run; returns the state to persist.
    pub fn finished(
        &mut self,
        name: &str,
        now: Timestamp,
        outcome: Outcome,
    ) -> Result<JobState, SchedError> {
        let (spec, manual_next) = {
            let e = self
                .jobs
                .get_mut(name)
                .ok_or_else(|| SchedError::NotFound(name.into()))?;
            if e.state.running_since.take().is_none() {
                return Err(SchedError::NotRunning(name.into()));
            }
            e.state.last_end = Some(now);
            e.state.runs += 1;
            if !matches!(outcome, Outcome::Ok) {
                e.state.failures += 1;
            }
            e.state.last_outcome = Some(outcome);
            (e.spec.clone(), e.next)
        };
        // A manual run kept the schedule; a timer run schedules from its end.
        let next = match manual_next {
            // An elapse that passed during a manual run is not made up afterwards.
            Some(n) if n.1 > now => Some(n),
            _ => {
                let from = self.jobs[name]
                    .state
                    .last_elapse
                    .map_or(now, |l| l.max(now));
                self.due_after(name, &spec, from)
            }
        };
        let e = self.jobs.get_mut(name).expect("checked above");
        e.next = next;
        Ok(e.state.clone())
    }

    /// When `poll` next has something to start (`None`: nothing scheduled).
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        self.jobs
            .values()
            .filter(|e| e.state.running_since.is_none())
            .filter_map(|e| e.next.map(|(_, due)| due))
            .min()
    }

    pub fn jobs(&self) -> Vec<JobView> {
        self.jobs
            .iter()
            .map(|(name, e)| JobView {
                name: name.clone(),
                spec: e.spec.clone(),
                state: e.state.clone(),
                next_run: e.next.map(|(_, due)| due),
                running: e.state.running_since.is_some(),
            })
            .collect()
    }
}
