//! Backup targets of a policy and the repository jobs: what they are, and what one run of
//! them does against a [`PolicyPool`].
//!
//! * A **repository** is registered once by name (`snapblk repo add NAME URL ...`, the
//!   record `repository/NAME`): its URL, where the daemon reads its key (a file; the key
//!   is never stored in the pool), its S3 endpoint, and its own maintenance: a gc schedule
//!   and a verify schedule whose runs re-read a rotating part of the data, so every pack is
//!   read once every `read_data_runs` runs (restic's `--read-data-subset`, made periodic).
//! * A policy's **backup rule** names a repository, a schedule and a retention. Each run
//!   backs up, per volume of the policy, the newest snapshot the policy took (so a backup
//!   is always of a snapshot the admin can see and roll back to locally), unless that
//!   snapshot is already stored there, or — unless `always` — its data equals that of the
//!   last snapshot backed up there (no new backup of an unchanged volume). It then applies
//!   the rule's retention to this pool's backups of that volume in that repository whose
//!   snapshot names the policy made; other backups (other pools, other policies, taken by
//!   hand) are never touched.
//! * The newest snapshot backed up per volume and target is the next incremental's base:
//!   the snapshot job's retention keeps it (as syncoid holds the last synced snapshot), so
//!   a daily backup of hourly snapshots never has to re-read the whole volume.
//!
//! Threading: [`run`] takes no lock of the manager; the daemon runs it on a worker thread
//! and hands the result back to [`crate::Manager::finish`].

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::calendar::CalendarEvent;
use crate::manager::PolicyPool;
use crate::policy::{parse_snapshot_name, valid_name};
use crate::retention::{apply, Item, Keep};

/// Most runs a verify rotation may span.
pub const MAX_VERIFY_RUNS: u32 = 10_000;
/// Default grace of a scheduled gc (seconds): what the manual `backup gc` defaults to.
pub const DEFAULT_GC_GRACE: u64 = 86_400;

fn yes() -> bool {
    true
}
fn default_grace() -> u64 {
    DEFAULT_GC_GRACE
}

/// A scheduled garbage collection of a repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRule {
    pub schedule: CalendarEvent,
    /// Packs condemned are deleted only after this many seconds.
    #[serde(default = "default_grace")]
    pub grace_secs: u64,
}

/// A scheduled verify of a repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRule {
    pub schedule: CalendarEvent,
    /// 0: check structure only (every backup's chunks indexed, in existing packs);
    /// N: also download and authenticate 1/N of the packs each run, a different part each
    /// time, so every pack is read once every N runs.
    #[serde(default)]
    pub read_data_runs: u32,
}

/// A scheduled copy into a repository of this pool's backups in another (registered) one
/// (`backup copy`, as PBS sync jobs pull): the job `copy:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRule {
    /// The registered repository copied from.
    pub from: String,
    pub schedule: CalendarEvent,
    /// The destination's own retention of this pool's backups in it, per volume (the
    /// newest always stays); empty: keep every copy. Source backups it would not keep are
    /// not copied (so a later run does not copy again what it pruned).
    #[serde(default, skip_serializing_if = "Keep::is_empty")]
    pub keep: Keep,
}

impl CopyRule {
    /// How long after a backup reaches the source its copy may take at most: twice the
    /// interval between the schedule's next two elapses.
    pub fn lag(&self, now: Timestamp, tz: &TimeZone) -> u64 {
        twice_interval(&self.schedule, now, tz)
    }
}

fn twice_interval(schedule: &CalendarEvent, now: Timestamp, tz: &TimeZone) -> u64 {
    let a = schedule.next_after(now, tz);
    let b = a.and_then(|a| schedule.next_after(a, tz));
    match (a, b) {
        (Some(a), Some(b)) => (2 * (b.as_second() - a.as_second()).max(30)).unsigned_abs(),
        _ => 86_400,
    }
}

/// A repository the daemon backs up to, registered by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoTarget {
    /// `s3://BUCKET/PREFIX` or `file:///PATH`.
    pub url: String,
    /// File holding the repository key (read by the daemon at each run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Or a file whose first line is the passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc: Option<GcRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyRule>,
}

impl RepoTarget {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("s3://") || self.url.starts_with("file:///")) {
            return Err(format!(
                "{:?}: use s3://BUCKET/PREFIX or file:///PATH",
                self.url
            ));
        }
        if self.url.len() > 1024 {
            return Err("repository URL longer than 1024 bytes".into());
        }
        match (&self.key_file, &self.passphrase_file) {
            (Some(_), Some(_)) => {
                return Err("give a key file or a passphrase file, not both".into())
            }
            (None, None) => {
                return Err(
                    "a scheduled job needs the key: give a key file or a passphrase file".into(),
                )
            }
            (Some(f), None) | (None, Some(f)) if !f.starts_with('/') || f.len() > 4096 => {
                return Err(format!("{f:?}: the key's file needs an absolute path"));
            }
            _ => {}
        }
        if let Some(g) = &self.gc {
            if g.grace_secs > 365 * 86_400 {
                return Err("gc grace longer than a year".into());
            }
        }
        if let Some(c) = &self.copy {
            valid_name("repository", &c.from)?;
        }
        if let Some(v) = &self.verify {
            if v.read_data_runs > MAX_VERIFY_RUNS {
                return Err(format!(
                    "a verify rotation spans at most {MAX_VERIFY_RUNS} runs"
                ));
            }
        }
        Ok(())
    }

    /// Whether the repository is off site: in an object store, not a local path.
    pub fn off_site(&self) -> bool {
        self.url.starts_with("s3://")
    }
}

/// A repository with its name, as jobs carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedRepo {
    pub name: String,
    #[serde(flatten)]
    pub target: RepoTarget,
}

/// One backup target of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRule {
    /// A registered repository's name.
    pub repository: String,
    pub schedule: CalendarEvent,
    #[serde(default)]
    pub keep: Keep,
    #[serde(default = "yes")]
    pub persistent: bool,
    #[serde(default)]
    pub random_delay_secs: u32,
    /// Back up a new snapshot even when its data equals the last one backed up.
    #[serde(default)]
    pub always: bool,
    /// Recovery point objective in seconds: `snapblk status` reports a volume whose newest
    /// backup here is older as violated (0: twice the schedule's interval).
    #[serde(default)]
    pub rpo_secs: u64,
}

impl BackupRule {
    pub fn validate(&self) -> Result<(), String> {
        valid_name("repository", &self.repository)?;
        if self.random_delay_secs > 86_400 {
            return Err("random delay longer than a day".into());
        }
        if self.rpo_secs > 10 * 365 * 86_400 {
            return Err("RPO longer than ten years".into());
        }
        Ok(())
    }

    /// The RPO in force: as given, else twice the interval between the schedule's next
    /// two elapses after `now` (at least a minute).
    pub fn rpo(&self, now: Timestamp, tz: &TimeZone) -> u64 {
        if self.rpo_secs > 0 {
            return self.rpo_secs;
        }
        twice_interval(&self.schedule, now, tz)
    }
}

/// One of this pool's backups in a repository, as the jobs see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupItem {
    pub id: String,
    pub volume: String,
    pub snapshot: String,
    /// When its snapshot was taken.
    pub created: Timestamp,
}

/// What a copy did: backups copied (`vol@snap`), and per volume the newest snapshot whose
/// backup the destination now holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyDone {
    pub copied: Vec<String>,
    pub bytes_uploaded: u64,
    pub covered: BTreeMap<String, String>,
}

/// What a backup stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupDone {
    pub id: String,
    /// The repository held this snapshot already.
    pub already_stored: bool,
    pub bytes_uploaded: u64,
}

/// What a long job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Work {
    Backup {
        policy: String,
        /// The policy's time zone (retention periods), None: the caller's.
        timezone: Option<String>,
        rule: Box<BackupRule>,
        repo: NamedRepo,
        /// The policy's snapshot prefix.
        prefix: String,
        /// Volumes and groups (members resolved when the run starts).
        volumes: Vec<String>,
        groups: Vec<String>,
        /// Per volume, the snapshot to back up: the newest the policy had taken when the
        /// run started (the manager protects it from snapshot retention meanwhile).
        pinned: BTreeMap<String, String>,
    },
    Gc {
        repo: NamedRepo,
        grace_secs: u64,
    },
    Verify {
        repo: NamedRepo,
        /// Packs `k` of `n` (`n` = 0: structure only).
        part: (u32, u32),
    },
    Copy {
        from: Box<NamedRepo>,
        to: Box<NamedRepo>,
        /// The destination's retention (empty: keep every copy).
        keep: Keep,
    },
}

/// A long job's run, started by the manager (its start is persisted) and finished by
/// [`crate::Manager::finish`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    pub job: String,
    pub start: Timestamp,
    pub manual: bool,
    pub work: Work,
}

/// What a long job's run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskResult {
    pub errors: Vec<String>,
    /// Backups made (`vol@snap`).
    pub created: Vec<String>,
    /// Backups removed by retention (`vol@snap`).
    pub deleted: Vec<String>,
    /// Volumes not backed up and why (unchanged, already stored).
    pub skipped: Vec<String>,
    pub bytes_uploaded: u64,
    /// A gc's or verify's report, in one line.
    pub detail: Option<String>,
    /// Per volume, the newest snapshot now backed up by this job (the next base).
    pub bases: BTreeMap<String, String>,
    /// Per volume, the newest snapshot whose data the repository now holds: the one
    /// backed up, or a newer one found unchanged since (the 3-2-1 report's age).
    pub covered: BTreeMap<String, String>,
}

impl TaskResult {
    pub fn failed(error: String) -> TaskResult {
        TaskResult {
            errors: vec![error],
            ..TaskResult::default()
        }
    }
}

/// Runs `task` against `pool` (no manager lock held).
pub fn run<P: PolicyPool>(pool: &P, task: &Task, tz: &TimeZone) -> TaskResult {
    let mut r = TaskResult::default();
    match &task.work {
        Work::Backup {
            rule,
            repo,
            prefix,
            volumes,
            groups,
            pinned,
            timezone,
            ..
        } => {
            let tz = &crate::scheduler::zone(timezone.as_deref(), tz);
            let mut vols: Vec<String> = Vec::new();
            for g in groups {
                match pool.group_members(g) {
                    Ok(m) => vols.extend(m),
                    Err(e) => r.errors.push(format!("group {g}: {e}")),
                }
            }
            vols.extend(volumes.iter().cloned());
            let mut seen = std::collections::BTreeSet::new();
            vols.retain(|v| seen.insert(v.clone()));
            let stored = match pool.backups(repo) {
                Ok(b) => b,
                Err(e) => {
                    r.errors.push(format!("repository {}: {e}", repo.name));
                    return r;
                }
            };
            for v in &vols {
                let want = pinned.get(v).map(String::as_str);
                if let Err(e) =
                    backup_volume(pool, rule, repo, prefix, v, want, &stored, tz, &mut r)
                {
                    r.errors.push(format!("volume {v}: {e}"));
                }
            }
        }
        Work::Gc { repo, grace_secs } => match pool.gc(repo, *grace_secs) {
            Ok(d) => r.detail = Some(d),
            Err(e) => r.errors.push(format!("repository {}: {e}", repo.name)),
        },
        Work::Copy { from, to, keep } => {
            if let Err(e) = copy_with_retention(pool, from, to, keep, tz, &mut r) {
                r.errors
                    .push(format!("copy {} -> {}: {e}", from.name, to.name));
            }
        }
        Work::Verify { repo, part } => match pool.verify(repo, *part) {
            Ok(d) => r.detail = Some(d),
            Err(e) => r.errors.push(format!("repository {}: {e}", repo.name)),
        },
    }
    r
}

/// Backs up `vol`'s newest policy snapshot to `repo` (unless stored or unchanged), then
/// applies the rule's retention to this pool's policy backups of `vol` there.
#[allow(clippy::too_many_arguments)]
fn backup_volume<P: PolicyPool>(
    pool: &P,
    rule: &BackupRule,
    repo: &NamedRepo,
    prefix: &str,
    vol: &str,
    want: Option<&str>,
    stored: &[BackupItem],
    tz: &TimeZone,
    r: &mut TaskResult,
) -> Result<(), String> {
    let mut snaps: Vec<(String, Timestamp)> = pool
        .snapshots(vol)?
        .into_iter()
        .filter_map(|(n, _)| parse_snapshot_name(prefix, &n).map(|t| (n, t)))
        .collect();
    snaps.sort_by_key(|(n, t)| (*t, n.clone()));
    // The snapshot pinned when the run started, if it still exists; else the newest.
    let pick = want
        .and_then(|w| snaps.iter().find(|(n, _)| n == w))
        .or(snaps.last())
        .cloned();
    let Some((newest, _)) = pick else {
        return Err(format!(
            "no snapshot named {prefix}-… yet (the policy's snapshot job takes them)"
        ));
    };
    // This volume's policy backups here, oldest first.
    let mut mine: Vec<BackupItem> = stored
        .iter()
        .filter(|b| b.volume == vol && parse_snapshot_name(prefix, &b.snapshot).is_some())
        .cloned()
        .collect();
    mine.sort_by_key(|b| (b.created, b.snapshot.clone()));
    if mine.iter().any(|b| b.snapshot == newest) {
        r.skipped.push(format!("{vol}@{newest}: already stored"));
        r.covered.insert(vol.to_string(), newest.clone());
    } else {
        let last = mine
            .last()
            .filter(|b| snaps.iter().any(|(n, _)| *n == b.snapshot));
        let unchanged = match last {
            Some(b) if !rule.always => !pool.changed(vol, &b.snapshot, &newest)?,
            _ => false,
        };
        if let (true, Some(b)) = (unchanged, last) {
            r.skipped.push(format!(
                "{vol}@{newest}: unchanged since {vol}@{}",
                b.snapshot
            ));
            r.covered.insert(vol.to_string(), newest.clone());
        } else {
            let done = pool.backup(repo, vol, &newest)?;
            r.covered.insert(vol.to_string(), newest.clone());
            r.bytes_uploaded += done.bytes_uploaded;
            if done.already_stored {
                r.skipped.push(format!("{vol}@{newest}: already stored"));
            } else {
                r.created.push(format!("{vol}@{newest}"));
            }
            let created = parse_snapshot_name(prefix, &newest).unwrap_or(Timestamp::UNIX_EPOCH);
            mine.push(BackupItem {
                id: done.id,
                volume: vol.to_string(),
                snapshot: newest.clone(),
                created,
            });
        }
    }
    if let Some(b) = mine.last() {
        r.bases.insert(vol.to_string(), b.snapshot.clone());
    }
    let items: Vec<Item> = mine
        .iter()
        .map(|b| Item {
            name: b.id.clone(),
            // The time in the snapshot's name: what the policy's schedule made it for.
            time: parse_snapshot_name(prefix, &b.snapshot).unwrap_or(b.created),
            // The newest backup is never removed by retention.
            protected: std::ptr::eq(b, mine.last().expect("not empty here")),
        })
        .collect();
    let gone: Vec<&BackupItem> = apply(&items, &rule.keep, tz)
        .iter()
        .filter(|v| !v.keep())
        .filter_map(|v| mine.iter().find(|b| b.id == v.name))
        .collect();
    if !gone.is_empty() {
        let ids: Vec<String> = gone.iter().map(|b| b.id.clone()).collect();
        let removed = pool.forget(repo, &ids)?;
        r.deleted.extend(
            gone.iter()
                .filter(|b| removed.contains(&b.id))
                .map(|b| format!("{vol}@{}", b.snapshot)),
        );
    }
    Ok(())
}

/// What a copy destination's retention keeps of this pool's backups, per volume, over
/// what the source and the destination hold together (by snapshot; each volume's newest
/// always stays): (source backups not to copy, destination backups to forget).
pub fn copy_plan(
    src: &[BackupItem],
    dst: &[BackupItem],
    keep: &Keep,
    tz: &TimeZone,
) -> (Vec<String>, Vec<BackupItem>) {
    if keep.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let mut skip = Vec::new();
    let mut forget = Vec::new();
    let mut vols: Vec<&str> = src.iter().chain(dst).map(|b| b.volume.as_str()).collect();
    vols.sort_unstable();
    vols.dedup();
    for vol in vols {
        // One item per snapshot: the destination's copy if it has one.
        let mut all: Vec<&BackupItem> = dst.iter().filter(|b| b.volume == vol).collect();
        for b in src.iter().filter(|b| b.volume == vol) {
            if !all.iter().any(|d| d.snapshot == b.snapshot) {
                all.push(b);
            }
        }
        all.sort_by_key(|b| (b.created, b.snapshot.clone()));
        let Some(newest) = all.last().map(|b| b.snapshot.clone()) else {
            continue;
        };
        let items: Vec<Item> = all
            .iter()
            .map(|b| Item {
                name: b.snapshot.clone(),
                time: b.created,
                protected: b.snapshot == newest,
            })
            .collect();
        for v in apply(&items, keep, tz).iter().filter(|v| !v.keep()) {
            for b in src
                .iter()
                .filter(|b| b.volume == vol && b.snapshot == v.name)
            {
                skip.push(b.id.clone());
            }
            forget.extend(
                dst.iter()
                    .filter(|b| b.volume == vol && b.snapshot == v.name)
                    .cloned(),
            );
        }
    }
    (skip, forget)
}

/// Copies this pool's backups from `from` into `to`, except those the destination's
/// retention would not keep, then prunes the destination by that retention.
fn copy_with_retention<P: PolicyPool>(
    pool: &P,
    from: &NamedRepo,
    to: &NamedRepo,
    keep: &Keep,
    tz: &TimeZone,
    r: &mut TaskResult,
) -> Result<(), String> {
    let skip = if keep.is_empty() {
        Vec::new()
    } else {
        copy_plan(&pool.backups(from)?, &pool.backups(to)?, keep, tz).0
    };
    let c = pool.copy(from, to, &skip)?;
    r.created = c.copied;
    r.bytes_uploaded = c.bytes_uploaded;
    r.covered = c.covered;
    if !keep.is_empty() {
        // The destination as it is now (with the copies): the same plan prunes it.
        let (_, gone) = copy_plan(&pool.backups(from)?, &pool.backups(to)?, keep, tz);
        if !gone.is_empty() {
            let ids: Vec<String> = gone.iter().map(|b| b.id.clone()).collect();
            let removed = pool.forget(to, &ids)?;
            r.deleted.extend(
                gone.iter()
                    .filter(|b| removed.contains(&b.id))
                    .map(|b| format!("{}@{}", b.volume, b.snapshot)),
            );
        }
    }
    Ok(())
}
