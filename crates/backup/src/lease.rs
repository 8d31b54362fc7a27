//! Leases: lock objects that let jobs of any length run safely beside garbage collection
//! (docs/design.md §12 "Leases").
//!
//! Every job that reads packs or commits references (backup, full and lazy restore,
//! verify) holds a *shared* lease; gc holds the *exclusive* one. A lease is a sealed object
//! `locks/<random id>` = {kind, job, host, pid, started, refreshed, ttl}, refreshed by a
//! thread every `ttl / 6` and deleted when dropped. Invariants:
//! - A lease is *live* until `refreshed + ttl` (by the reader's clock); after that it is
//!   stale and gc deletes it. A job whose lease could not be refreshed for `ttl / 2` must
//!   not commit (`check`): gc may already be ignoring it. The other half of `ttl` covers
//!   clock skew between hosts.
//! - gc never condemns a pack written after, nor deletes a pack condemned after, the
//!   `started` time of the oldest live shared lease: whatever such a job loaded (an index
//!   listing the pack, a table naming its chunks) stays readable for as long as it runs.
//! - After writing its exclusive lease, a gc lists the locks and gives up (deleting its
//!   own) if any other live exclusive lease exists. With read-after-write listings (S3
//!   has them), of two gc runs started together at least one sees the other: two gc runs
//!   never overlap (both may give up; run again).
//! - A job that starts after gc listed the leases is not covered by gc's cut-off; only the
//!   grace period protects what it writes and reuses. A gc whose grace period is no longer
//!   than the clock slack takes a *sole* exclusive lease instead: a shared lease taker that
//!   finds a live sole lease after writing its own deletes its own and waits for the sole
//!   one to go. Of a gc and a job starting together, the gc sees the job (its cut-off
//!   covers it) or the job sees the gc (it waits), by the same read-after-write argument.
//!
//! Threading: `Lease` is Send + Sync; its refresher thread only writes its own object.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::crypto::random_bytes;
use crate::error::{BackupError, Result};
use crate::repo::{now, Repository};

pub const LOCKS: &str = "locks/";
/// Default lease lifetime without a refresh.
pub const DEFAULT_TTL: u64 = 30 * 60;
/// Largest sealed lock object read.
const MAX_LOCK_BYTES: u64 = 64 << 10;
/// The longest a shared lease taker waits for a sole gc to end.
const SOLE_WAIT: Duration = Duration::from_secs(30 * 60);
/// How often a waiting taker lists the locks again.
const SOLE_POLL: Duration = Duration::from_millis(500);
/// Largest difference, in seconds, allowed between a lease taker's clock and the store's.
/// gc compares lease start times (their hosts' clocks) with pack and mark times (the
/// store's) less 60 s (`gc::CLOCK_SLACK`), and readers judge other hosts' leases live by
/// their own clock: two hosts each within 30 s of the store are within 60 s of each other.
pub const MAX_CLOCK_SKEW: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Shared,
    Exclusive,
}

/// The stored lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub kind: Kind,
    /// What holds it: "backup vol@snap", "restore ...", "gc", ...
    pub job: String,
    pub host: String,
    pub pid: u32,
    /// Unix seconds (the holder's clock).
    pub started: u64,
    pub refreshed: u64,
    pub ttl: u64,
    /// An exclusive lease that also keeps new shared leases out while it lives (a gc with
    /// no grace period to speak of). Absent in leases of older versions: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sole: bool,
}

impl Record {
    pub fn live_at(&self, t: u64) -> bool {
        t <= self.refreshed.saturating_add(self.ttl)
    }
}

/// A live sole lease other than `except`, if any.
fn live_sole(repo: &Repository, except: &str) -> Result<Option<Record>> {
    Ok(live_sole_in(&listed(repo)?, except))
}

/// A live sole lease of `leases` other than `except`, if any.
fn live_sole_in(leases: &[Listed], except: &str) -> Option<Record> {
    let t = now();
    leases
        .iter()
        .find(|l| l.id != except && l.record.sole && l.record.live_at(t))
        .map(|l| l.record.clone())
}

fn key(id: &str) -> String {
    format!("{LOCKS}{id}")
}
fn aad(id: &str) -> Vec<u8> {
    format!("snapblk lock {id}").into_bytes()
}

fn write(repo: &Repository, id: &str, r: &Record) -> Result<()> {
    let json = serde_json::to_vec(r).map_err(|e| BackupError::invalid("lease", e.to_string()))?;
    repo.store()
        .put(&key(id), &repo.keys().seal(&json, &aad(id)))?;
    Ok(())
}

/// Every lease stored, by id. Objects that do not open are skipped with a warning (a lock
/// that is not ours cannot protect anything, and must not block gc forever).
pub fn list(repo: &Repository) -> Result<Vec<(String, Record)>> {
    Ok(listed(repo)?
        .into_iter()
        .map(|l| (l.id, l.record))
        .collect())
}

/// A lease as listed: its id, its record and when the store last wrote its object (the
/// store's clock, Unix seconds; 0 if the store gives no times).
struct Listed {
    id: String,
    record: Record,
    stamped: u64,
}

/// As [`list`], with each object's modification time.
fn listed(repo: &Repository) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for o in repo.store().list(LOCKS)? {
        let Some(id) = o.key.strip_prefix(LOCKS) else {
            continue;
        };
        let sealed = match repo.store().get(&o.key, MAX_LOCK_BYTES) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue, // released meanwhile
            Err(e) => return Err(e.into()),
        };
        match repo
            .keys()
            .open(&sealed, &aad(id))
            .and_then(|p| serde_json::from_slice::<Record>(&p).ok())
        {
            Some(record) => out.push(Listed {
                id: id.to_string(),
                record,
                stamped: o.modified,
            }),
            None => log::warn!(
                "{}: {} is not a lease of this repository",
                repo.describe(),
                o.key
            ),
        }
    }
    Ok(out)
}

/// A lease held by this process, refreshed until dropped.
pub struct Lease {
    repo: Repository,
    id: String,
    record: Record,
    /// Unix seconds of the last successful write.
    last_ok: Arc<AtomicU64>,
    /// This host's clock just before and just after the first write of the lease object.
    written: (u64, u64),
    /// When `record.started` was read: [`Lease::stamp`] counts from it.
    origin: std::time::Instant,
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("record", &self.record)
            .finish()
    }
}

impl Lease {
    /// Takes a shared lease for `job`, first waiting (up to 30 min) for a live sole
    /// lease to go: such a gc may have listed the leases before ours was written.
    pub fn shared(repo: &Repository, job: impl Into<String>) -> Result<Lease> {
        let job = job.into();
        let deadline = std::time::Instant::now() + SOLE_WAIT;
        loop {
            let lease = Lease::take(repo, Kind::Shared, job.clone(), false)?;
            let leases = listed(repo)?;
            lease.check_clock(&leases)?;
            if live_sole_in(&leases, &lease.id).is_none() {
                lease.check_format()?;
                return Ok(lease);
            }
            drop(lease);
            while let Some(r) = live_sole(repo, "")? {
                if std::time::Instant::now() >= deadline {
                    return Err(BackupError::Busy(format!(
                        "{job}: waited {} s for {} (host {}, pid {}, since {}) to release {}",
                        SOLE_WAIT.as_secs(),
                        r.job,
                        r.host,
                        r.pid,
                        r.started,
                        repo.describe()
                    )));
                }
                std::thread::sleep(SOLE_POLL);
            }
        }
    }

    /// Takes the exclusive lease for `job`; fails naming the holder if another live
    /// exclusive lease exists.
    pub fn exclusive(repo: &Repository, job: impl Into<String>) -> Result<Lease> {
        Lease::exclusive_with(repo, job, false)
    }

    /// Waits (up to 30 min, keeping this lease) until no other live shared lease is
    /// left: with a sole lease held, no new job starts meanwhile, so afterwards none runs
    /// (`repo upgrade`: format-4 jobs must not go on writing what the new format does
    /// not list).
    pub fn wait_for_shared(&self) -> Result<()> {
        // Past a dead job's lease lifetime too (its lease then counts as stale).
        let deadline = std::time::Instant::now() + SOLE_WAIT + Duration::from_secs(self.record.ttl);
        loop {
            let t = now();
            let running = listed(&self.repo)?
                .into_iter()
                .find(|l| l.id != self.id && l.record.kind == Kind::Shared && l.record.live_at(t));
            let Some(Listed { record: r, .. }) = running else {
                return Ok(());
            };
            self.check()?;
            if std::time::Instant::now() >= deadline {
                return Err(BackupError::Busy(format!(
                    "{}: waited {} s for {} (host {}, pid {}, since {}) to finish on {}",
                    self.record.job,
                    SOLE_WAIT.as_secs(),
                    r.job,
                    r.host,
                    r.pid,
                    r.started,
                    self.repo.describe()
                )));
            }
            std::thread::sleep(SOLE_POLL);
        }
    }

    /// The exclusive lease; `sole` also keeps new shared leases waiting while it lives.
    pub fn exclusive_with(repo: &Repository, job: impl Into<String>, sole: bool) -> Result<Lease> {
        let lease = Lease::take(repo, Kind::Exclusive, job.into(), sole)?;
        let leases = listed(repo)?;
        lease.check_clock(&leases)?;
        lease.check_format()?;
        let t = now();
        for Listed { id, record: r, .. } in leases {
            if id != lease.id && r.kind == Kind::Exclusive && r.live_at(t) {
                // Ours is dropped (deleted) on the way out.
                return Err(BackupError::Busy(format!(
                    "{} holds the repository at {} (host {}, pid {}, since {}); if it died, its lease expires {} s after its last refresh at {}",
                    r.job,
                    repo.describe(),
                    r.host,
                    r.pid,
                    r.started,
                    r.ttl,
                    r.refreshed
                )));
            }
        }
        Ok(lease)
    }

    /// Refuses to go on if the repository's format changed since `repo` was opened (a
    /// `repo upgrade` this job waited out): a job must not write or list by the old
    /// format's rules under the new one.
    fn check_format(&self) -> Result<()> {
        let bytes = self
            .repo
            .store()
            .get(crate::repo::CONFIG_KEY, crate::config::MAX_CONFIG_BYTES)?;
        let stored = crate::config::RepoConfig::parse(&bytes)?.version;
        let opened = self.repo.config().version;
        if stored != opened {
            return Err(BackupError::invalid(
                format!("{} on {}", self.record.job, self.repo.describe()),
                format!("the repository is format {stored} now, not {opened} as when this job opened it (upgraded meanwhile); run it again"),
            ));
        }
        Ok(())
    }

    fn take(repo: &Repository, kind: Kind, job: String, sole: bool) -> Result<Lease> {
        let origin = std::time::Instant::now();
        let t = now();
        let id = hex::encode(random_bytes::<16>());
        let ttl = repo.lease_ttl().max(6);
        let record = Record {
            kind,
            job,
            host: crate::catalog::host_name(),
            pid: std::process::id(),
            started: t,
            refreshed: t,
            ttl,
            sole,
        };
        write(repo, &id, &record)?;
        let written = (t, now());
        let last_ok = Arc::new(AtomicU64::new(t));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let (repo, id, record) = (repo.clone(), id.clone(), record.clone());
            let (last_ok, stop) = (Arc::clone(&last_ok), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("lease".into())
                .spawn(move || refresh(&repo, &id, record, &last_ok, &stop))?
        };
        Ok(Lease {
            repo: repo.clone(),
            id,
            record,
            last_ok,
            written,
            origin,
            stop,
            thread: Some(thread),
        })
    }

    /// Refuses to go on when this host's clock is more than [`MAX_CLOCK_SKEW`] off the
    /// store's, judged by the time the store gave this lease's object in `leases` (a
    /// listing taken after it was written, which every taker takes anyway): the lease
    /// protocol's safety argument assumes clocks within that (docs/design.md §12
    /// "Leases"). A store that gives no times, or a listing without the object, is not
    /// judged.
    fn check_clock(&self, leases: &[Listed]) -> Result<()> {
        let Some(stamped) = leases
            .iter()
            .find(|l| l.id == self.id)
            .map(|l| l.stamped)
            .filter(|&s| s > 0)
        else {
            return Ok(());
        };
        let (before, after) = self.written;
        // Stores keep whole seconds: one more of slack each way.
        let (ahead, seconds) = if stamped + MAX_CLOCK_SKEW + 1 < before {
            (true, before - stamped)
        } else if stamped > after + MAX_CLOCK_SKEW + 1 {
            (false, stamped - after)
        } else {
            return Ok(());
        };
        Err(BackupError::ClockSkew {
            host: self.record.host.clone(),
            store: self.repo.describe(),
            seconds,
            ahead,
        })
    }

    /// Stops refreshing and leaves the lease object behind, as a killed process would
    /// (tests; a real holder drops its lease).
    pub fn abandon(mut self) {
        self.stop_refresh();
        self.id.clear();
    }

    fn stop_refresh(&mut self) {
        {
            let (m, cv) = &*self.stop;
            *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// A time for an object this job writes now, in milliseconds since the Unix epoch: the
    /// lease's start plus the monotonic time elapsed since, so never before the start
    /// gc's cut-off is computed from, and never stepping back with the wall clock
    /// (format-5 index object keys, docs/design.md §12 "Index generations").
    pub fn stamp(&self) -> u64 {
        let elapsed = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.record
            .started
            .saturating_mul(1000)
            .saturating_add(elapsed)
    }

    /// Fails if the lease may have expired in gc's eyes (not refreshed for `ttl / 2`):
    /// a job must not commit references on it then.
    pub fn check(&self) -> Result<()> {
        let age = now().saturating_sub(self.last_ok.load(Ordering::Acquire));
        if age > self.record.ttl / 2 {
            return Err(BackupError::invalid(
                format!("lease {} on {}", self.id, self.repo.describe()),
                format!(
                    "not refreshed for {age} s (lifetime {} s): garbage collection may no longer protect this job; run it again",
                    self.record.ttl
                ),
            ));
        }
        Ok(())
    }
}

fn refresh(
    repo: &Repository,
    id: &str,
    mut record: Record,
    last_ok: &AtomicU64,
    stop: &(Mutex<bool>, Condvar),
) {
    let every = Duration::from_secs((record.ttl / 6).max(1));
    let (m, cv) = stop;
    let mut stopped = m.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        // Checked before waiting too: a stop that came before this thread first took the
        // lock must not wait out a whole period.
        if *stopped {
            return;
        }
        stopped = cv
            .wait_timeout(stopped, every)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if *stopped {
            return;
        }
        // Not refreshed for half its life (a frozen or suspended process, a store out of
        // reach): gc may have broken it and acted on that, so it is lost for good — a
        // rewrite now would let `check` pass again over what gc deleted meanwhile.
        let t = now();
        if t.saturating_sub(last_ok.load(Ordering::Acquire)) > record.ttl / 2 {
            last_ok.store(0, Ordering::Release);
            log::warn!(
                "lease {id} on {} lapsed (not refreshed for over {} s); the job stops",
                repo.describe(),
                record.ttl / 2
            );
            return;
        }
        record.refreshed = t;
        match write(repo, id, &record) {
            Ok(()) => last_ok.store(record.refreshed, Ordering::Release),
            Err(e) => log::warn!("refreshing lease {id} on {}: {e}", repo.describe()),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_refresh();
        if self.id.is_empty() {
            return; // abandoned
        }
        if let Err(e) = self.repo.store().delete(&key(&self.id)) {
            log::warn!(
                "releasing lease {} on {}: {e}",
                self.id,
                self.repo.describe()
            );
        }
    }
}

/// Deletes stale leases (their holders died); returns them.
pub fn break_stale(repo: &Repository, leases: &[(String, Record)]) -> Result<Vec<Record>> {
    let t = now();
    let mut out = Vec::new();
    for (id, r) in leases {
        if !r.live_at(t) {
            repo.store().delete(&key(id))?;
            out.push(r.clone());
        }
    }
    Ok(out)
}
