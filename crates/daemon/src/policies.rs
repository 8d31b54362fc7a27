//! Wiring of protection policies (logic: crates/policy): the pool as a `PolicyPool`, the
//! daemon's scheduler thread, and the policy and job commands.
//!
//! Threading: one `Manager` behind a mutex; the scheduler thread holds it while a due
//! snapshot job runs (milliseconds), commands hold it for their duration. Backup, gc and
//! verify jobs run on a thread of their own without it (started and finished under it),
//! and so does `jobs run` of one: a backup of hours never stalls snapshots or commands.
//! The thread sleeps until the next due job, at most a minute (the wall clock may jump),
//! or until a command changes the policies.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde_json::{json, Value};
use snapblk_backup::verify::{self, ReadData};
use snapblk_backup::{catalog, gc, prune, volume, NoProgress};
use snapblk_control::{reply, Command, Reply};
use snapblk_core::Pool;
use snapblk_policy::{
    BackupDone, BackupItem, BackupRule, CopyDone, Guard, Manager, Medium, NamedRepo, Policy,
    PolicyPool, RepoTarget, RunRecord, Started, Task, TaskResult, Watch,
};

use crate::alerts::{AlertConfig, Alerts};
use crate::error::{DaemonError, Result};
use crate::repos::RepoOpen;

/// The pool as the policy manager sees it.
pub struct PoolPolicies(pub Arc<Pool>);

impl PolicyPool for PoolPolicies {
    fn snapshots(&self, vol: &str) -> Result<Vec<(String, Timestamp)>, String> {
        let snaps = self
            .0
            .list_snapshots(Some(vol))
            .map_err(|e| e.to_string())?;
        Ok(snaps
            .into_iter()
            .map(|s| {
                let t = Timestamp::from_second(s.created as i64).unwrap_or(Timestamp::UNIX_EPOCH);
                (s.name, t)
            })
            .collect())
    }
    fn create_snapshot(&self, vol: &str, name: &str) -> Result<(), String> {
        self.0
            .create_snapshot(vol, name)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn group_members(&self, group: &str) -> Result<Vec<String>, String> {
        self.0.group(group).map_err(|e| e.to_string())
    }
    fn create_group_snapshot(&self, group: &str, name: &str) -> Result<(), String> {
        self.0
            .create_group_snapshot(group, name)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn delete_snapshot(&self, vol: &str, name: &str) -> Result<(), String> {
        self.0.delete_snapshot(vol, name).map_err(|e| e.to_string())
    }
    fn protected(&self, vol: &str) -> Result<Vec<String>, String> {
        Ok(self
            .0
            .list_snapshots(Some(vol))
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|s| s.protected)
            .map(|s| s.name)
            .collect())
    }
    fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        self.0.records(prefix).map_err(|e| e.to_string())
    }
    fn put_record(&self, name: &str, value: Option<Vec<u8>>) -> Result<(), String> {
        self.0.put_record(name, value).map_err(|e| e.to_string())
    }
    fn run_hook(
        &self,
        argv: &[String],
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Result<(), String> {
        run_hook(argv, env, timeout)
    }
    fn changed(&self, vol: &str, from: &str, to: &str) -> Result<bool, String> {
        let p = &self.0;
        let target = |s: &str| p.resolve_target(&format!("{vol}@{s}"));
        let d = p
            .diff(
                &target(from).map_err(|e| e.to_string())?,
                &target(to).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
        Ok(!d.is_empty())
    }
    fn backup(&self, repo: &NamedRepo, vol: &str, snap: &str) -> Result<BackupDone, String> {
        let r = open_registered(repo)?;
        let s = volume::backup_snapshot(&self.0, &r, &format!("{vol}@{snap}"), false, &NoProgress)
            .map_err(|e| e.to_string())?;
        Ok(BackupDone {
            id: s.manifest,
            already_stored: s.already_stored,
            bytes_uploaded: s.stats.bytes_uploaded,
        })
    }
    fn backups(&self, repo: &NamedRepo) -> Result<Vec<BackupItem>, String> {
        let r = open_registered(repo)?;
        let listed = catalog::load_pool(&r, self.0.uuid()).map_err(|e| e.to_string())?;
        Ok(listed
            .map(|l| l.catalog.backups)
            .unwrap_or_default()
            .into_iter()
            .map(|h| BackupItem {
                created: Timestamp::from_second(h.created as i64).unwrap_or(Timestamp::UNIX_EPOCH),
                id: h.id,
                volume: h.volume,
                snapshot: h.snapshot,
            })
            .collect())
    }
    fn forget(&self, repo: &NamedRepo, ids: &[String]) -> Result<Vec<String>, String> {
        let r = open_registered(repo)?;
        prune::forget(&r, ids, Some(self.0.uuid()), prune::OnHold::Skip)
            .map(|gone| gone.into_iter().map(|h| h.id).collect())
            .map_err(|e| e.to_string())
    }
    fn gc(&self, repo: &NamedRepo, grace_secs: u64) -> Result<String, String> {
        let r = open_registered(repo)?;
        let opts = gc::Options {
            grace_secs,
            max_unused: DEFAULT_MAX_UNUSED,
            dry_run: false,
        };
        let rep = gc::run(&r, &opts, &NoProgress).map_err(|e| e.to_string())?;
        Ok(gc_text(&rep))
    }
    fn verify(&self, repo: &NamedRepo, part: (u32, u32)) -> Result<String, String> {
        let r = open_registered(repo)?;
        let read = match part {
            (_, 0) => ReadData::None,
            (_, 1) => ReadData::All,
            (k, n) => ReadData::Part(k, n),
        };
        let rep = verify::run_with(&r, read, r.parallelism().downloads, &NoProgress)
            .map_err(|e| e.to_string())?;
        let text = format!(
            "{} backups, {} chunks, read {} bytes of {} packs (part {} of {})",
            rep.manifests,
            rep.chunks,
            rep.bytes_read,
            rep.packs,
            part.0 + 1,
            part.1.max(1)
        );
        if rep.is_clean() {
            Ok(text)
        } else {
            let problems: Vec<String> = rep
                .problems
                .iter()
                .take(5)
                .map(|p| format!("{}: {}", p.object, p.detail))
                .collect();
            Err(format!(
                "{} problems found ({text}): {}",
                rep.problems.len(),
                problems.join("; ")
            ))
        }
    }
    fn copy(&self, from: &NamedRepo, to: &NamedRepo, skip: &[String]) -> Result<CopyDone, String> {
        let (src, dst) = (open_registered(from)?, open_registered(to)?);
        let uuid = self.0.uuid();
        let mut done = CopyDone::default();
        if catalog::load_pool(&src, uuid)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            let out =
                snapblk_backup::copy::run_except(&src, &dst, Some(uuid), None, skip, &NoProgress)
                    .map_err(|e| e.to_string())?;
            for c in out.iter().filter(|c| !c.summary.already_stored) {
                done.copied.push(c.backup.clone());
                done.bytes_uploaded += c.summary.stats.bytes_uploaded;
            }
        }
        let mut held = catalog::load_pool(&dst, uuid)
            .map_err(|e| e.to_string())?
            .map(|l| l.catalog.backups)
            .unwrap_or_default();
        snapblk_backup::manifest::sort(&mut held);
        let mut newest: Vec<(String, u64, String)> = Vec::new();
        for h in held {
            match newest.iter_mut().find(|(v, _, _)| *v == h.volume) {
                Some(e) if e.1 <= h.created => *e = (h.volume, h.created, h.snapshot),
                Some(_) => {}
                None => newest.push((h.volume, h.created, h.snapshot)),
            }
        }
        done.covered = newest.into_iter().map(|(v, _, s)| (v, s)).collect();
        Ok(done)
    }
    fn volumes(&self) -> Result<Vec<String>, String> {
        Ok(self.0.list_volumes().into_iter().map(|v| v.name).collect())
    }
    fn pool_media(&self) -> Vec<String> {
        crate::media::pool_media()
    }
    fn medium(&self, repo: &RepoTarget) -> Medium {
        if let Some(rest) = repo.url.strip_prefix("s3://") {
            let bucket = rest.split('/').next().unwrap_or(rest);
            let at = repo.endpoint.as_deref().unwrap_or("aws");
            return Medium {
                id: format!("s3 {at}/{bucket}"),
                off_site: true,
            };
        }
        let path = repo.url.strip_prefix("file://").unwrap_or(&repo.url);
        Medium {
            id: crate::media::medium_of_within(std::path::Path::new(path), Duration::from_secs(2))
                .unwrap_or_else(|| format!("unknown ({path} did not answer)")),
            off_site: false,
        }
    }
}

/// Fraction of unreferenced bytes above which a scheduled gc repacks a pack (the
/// `backup gc --max-unused` default, 10%).
const DEFAULT_MAX_UNUSED: f64 = 0.10;

/// Opens a registered repository, reading its key now.
fn open_registered(repo: &NamedRepo) -> Result<snapblk_backup::Repository, String> {
    crate::repos::registered_spec(&repo.target)
        .and_then(|s| s.open())
        .map_err(|e| e.to_string())
}

/// The last 2 KiB a hook wrote to a pipe (read to the end, so it never blocks on a full
/// pipe; memory stays bounded).
fn tail_of(mut r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut keep: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            keep.extend_from_slice(&buf[..n]);
            if keep.len() > 2048 {
                keep.drain(..keep.len() - 2048);
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&keep).trim().to_string());
    });
    rx
}

/// Runs a hook: no shell, stdin from /dev/null, killed after `timeout`.
fn run_hook(argv: &[String], env: &[(&str, String)], timeout: Duration) -> Result<(), String> {
    use std::process::{Command as Proc, Stdio};
    let (cmd, args) = argv.split_first().ok_or("empty hook")?;
    let mut child = Proc::new(cmd)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {cmd}: {e}"))?;
    let out = child.stdout.take().map(tail_of);
    let err = child.stderr.take().map(tail_of);
    let t0 = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if t0.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd} killed after {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {cmd}: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    // A child the hook left running may hold the pipes open: wait for them a little only.
    let text = |rx: Option<std::sync::mpsc::Receiver<String>>| {
        rx.and_then(|r| r.recv_timeout(Duration::from_secs(1)).ok())
            .unwrap_or_default()
    };
    let (o, e) = (text(out), text(err));
    let said = if e.is_empty() { o } else { e };
    Err(format!(
        "{cmd} {status}{}",
        if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        }
    ))
}

pub struct PolicyService {
    pub(crate) m: Mutex<Manager<PoolPolicies>>,
    /// The space guard (src/guard.rs); its passes take `m` briefly.
    pub(crate) guard: Guard,
    wake: Condvar,
    stopping: Mutex<bool>,
    alerts: Alerts,
    /// What the last notification check saw (lock order: after the manager).
    watch: Mutex<Watch>,
    pool_uuid: String,
    pool: Arc<Pool>,
    /// Where finished jobs are counted (set once by the daemon).
    pub metrics: std::sync::OnceLock<Arc<snapblk_metrics::Metrics>>,
}

/// The pool record holding where notifications go.
const NOTIFY_RECORD: &str = "notify";

/// Longest the scheduler sleeps: a volume passing its RPO with no job due is noticed
/// (and notified) within this.
const MAX_SLEEP_MS: u64 = 30_000;

fn now() -> Timestamp {
    Timestamp::now()
}

fn log_run(job: &str, r: &RunRecord) {
    match &r.outcome {
        snapblk_policy::Outcome::Ok => log::info!(
            "job {job}: created {}, deleted {}{}",
            if r.created.is_empty() {
                "nothing".to_string()
            } else {
                r.created.join(" ")
            },
            if r.deleted.is_empty() {
                "nothing".to_string()
            } else {
                r.deleted.join(" ")
            },
            r.detail
                .as_deref()
                .map(|d| format!("; {d}"))
                .unwrap_or_default()
        ),
        o => log::warn!("job {job}: {o:?}"),
    }
}

impl PolicyService {
    /// Loads the pool's policies and job states (an interrupted run is recorded as such).
    pub fn open(pool: Arc<Pool>) -> Result<Arc<PolicyService>> {
        let config = match pool
            .records(NOTIFY_RECORD)?
            .into_iter()
            .find(|(k, _)| k == NOTIFY_RECORD)
        {
            Some((_, v)) => serde_json::from_slice(&v)
                .map_err(|e| DaemonError::Invalid(format!("pool record {NOTIFY_RECORD}: {e}")))?,
            None => AlertConfig::default(),
        };
        let pool_uuid = pool.uuid().to_string();
        let shared = Arc::clone(&pool);
        let m = Manager::open(PoolPolicies(pool), TimeZone::system(), now())
            .map_err(|e| DaemonError::Policy(format!("loading protection policies: {e}")))?;
        let watch = Watch::new(&m.jobs());
        let guard = Guard::new(crate::guard::load_config(&m.pool().0)?);
        Ok(Arc::new(PolicyService {
            m: Mutex::new(m),
            guard,
            wake: Condvar::new(),
            stopping: Mutex::new(false),
            alerts: Alerts::start(config),
            watch: Mutex::new(watch),
            pool_uuid: pool_uuid.clone(),
            pool: shared,
            metrics: std::sync::OnceLock::new(),
        }))
    }

    /// Notifies what changed since the last check: jobs failing or recovering, volumes
    /// entering or leaving `violated`.
    fn check(&self, m: &Manager<PoolPolicies>) {
        let t = now();
        let mut w = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        let mut events = w.jobs(&m.jobs(), t);
        match m.status(t, None) {
            Ok(st) => events.extend(w.status(&st, t)),
            Err(e) => log::warn!("checking protection status: {e}"),
        }
        drop(w);
        self.send_events(events.into_iter().map(|e| json!(e)).collect());
    }

    /// Sends events (JSON objects) to the notifications, with the pool and host.
    pub(crate) fn send_events(&self, events: Vec<Value>) {
        if events.is_empty() {
            return;
        }
        let pool = self.pool_uuid.clone();
        let host = snapblk_backup::catalog::host_name();
        for mut v in events {
            v["pool"] = json!(pool);
            v["host"] = json!(host);
            self.alerts.send(v);
        }
    }

    /// The pool (without the manager mutex: the space relief must not wait for it).
    pub(crate) fn pool(&self) -> Arc<Pool> {
        Arc::clone(&self.pool)
    }

    pub(crate) fn stopping(&self) -> bool {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Backups at `url` changed by hand: corrects what the jobs recorded of each registered
    /// repository there (the repository is read without the manager mutex).
    fn backups_changed(&self, url: &str) -> Result<Reply> {
        let repos: Vec<NamedRepo> = {
            let m = self.lock();
            m.repos_at(url)
                .into_iter()
                .filter_map(|name| {
                    let target = m.repos().get(&name)?.clone();
                    Some(NamedRepo { name, target })
                })
                .collect()
        };
        let pool = PoolPolicies(self.pool());
        let mut updated = Vec::new();
        for r in &repos {
            let items = pool.backups(r).map_err(DaemonError::Policy)?;
            let mut m = self.lock();
            updated.extend(
                m.backups_changed(&r.name, &items)
                    .map_err(DaemonError::Policy)?,
            );
            self.check(&m);
        }
        Ok(Reply::BackupsChanged(reply::BackupsChanged {
            repositories: repos.iter().map(|r| r.name.clone()).collect(),
            jobs_updated: updated,
        }))
    }

    /// What the space guard would delete next, oldest first.
    pub(crate) fn candidates(&self) -> Vec<snapblk_policy::Candidate> {
        self.lock().space_candidates()
    }

    fn lock(&self) -> MutexGuard<'_, Manager<PoolPolicies>> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the scheduler thread.
    pub fn start(self: &Arc<Self>) -> Result<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("policies".into())
            .spawn(move || me.run())
            .map_err(DaemonError::io("starting the policy scheduler thread"))?;
        Ok(())
    }

    fn run(self: &Arc<Self>) {
        loop {
            let (next, tasks) = {
                let mut m = self.lock();
                let (done, tasks) = m.tick(now(), &now);
                for (job, r) in done {
                    log_run(&job, &r);
                    if let Some(metrics) = self.metrics.get() {
                        count_snapshot_run(metrics, &r);
                    }
                }
                self.check(&m);
                (m.next_wakeup(), tasks)
            };
            for task in tasks {
                self.spawn_task(task);
            }
            let wait = next
                .map(|t| {
                    t.duration_since(now())
                        .as_millis()
                        .clamp(0, i128::from(MAX_SLEEP_MS)) as u64
                })
                .unwrap_or(MAX_SLEEP_MS);
            let stop = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
            let (stop, _) = self
                .wake
                .wait_timeout(stop, Duration::from_millis(wait.max(10)))
                .unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
        }
    }

    /// Runs a long job's task on a thread of its own, then records its end.
    /// (Called without the manager held.)
    fn spawn_task(self: &Arc<Self>, task: Task) {
        let me = Arc::clone(self);
        let t = task.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("job {}", task.job))
            .spawn(move || {
                let r = me.run_task(&t);
                log_run(&t.job, &r);
            });
        if let Err(e) = spawned {
            // Never left "running": the job fails now and runs again at its next elapse.
            let r = self.lock().finish(
                &task,
                TaskResult::failed(format!("starting its thread: {e}")),
                now(),
            );
            log_run(&task.job, &r);
        }
    }

    /// Runs `task` without the manager, then records its end under it.
    fn run_task(&self, task: &Task) -> RunRecord {
        let (pool, tz) = {
            let m = self.lock();
            (PoolPolicies(Arc::clone(&m.pool().0)), m.tz().clone())
        };
        // A panic in a job is a bug, but it must not leave the job "running" for good.
        let started = std::time::Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            snapblk_policy::backups::run(&pool, task, &tz)
        }))
        .unwrap_or_else(|_| {
            TaskResult::failed("the job panicked (a bug: see the daemon log)".into())
        });
        if let Some(metrics) = self.metrics.get() {
            count_task(metrics, task, &r, started.elapsed().as_secs_f64());
        }
        let mut m = self.lock();
        let rec = m.finish(task, r, now());
        self.check(&m);
        rec
    }

    /// Backup ages per volume and repository (as `snapblk status` reports them), for the
    /// metrics endpoint.
    pub fn backup_ages(&self) -> Vec<snapblk_metrics::BackupAge> {
        self.lock()
            .status(now(), None)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|v| {
                let volume = v.volume;
                v.targets.into_iter().filter_map(move |t| {
                    Some(snapblk_metrics::BackupAge {
                        volume: volume.clone(),
                        repository: t.repository,
                        age_secs: t.age_secs?,
                    })
                })
            })
            .collect()
    }

    /// How many policy jobs run now.
    pub fn running_jobs(&self) -> usize {
        self.lock().running_jobs()
    }

    /// Stops the scheduler thread after the job it runs, if any.
    pub fn stop(&self) {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
        drop(self.lock()); // waits for a running job
    }

    /// Whether group `name` may get `members` (see `Manager::check_group`).
    pub fn check_group(&self, name: &str, members: &[String]) -> Result<()> {
        self.lock()
            .check_group(name, members)
            .map_err(DaemonError::Policy)
    }

    /// Executes a policy or job command.
    pub fn execute(&self, cmd: &Command) -> Result<Reply> {
        if let Command::SpaceGuard {
            min_free,
            target_free,
            off,
        } = cmd
        {
            return self.guard_command(*min_free, *target_free, *off);
        }
        if let Command::BackupsChanged { url } = cmd {
            return self.backups_changed(url);
        }
        let mut m = self.lock();
        let v = match cmd {
            Command::PolicySet { name, policy } => {
                let mut p: Policy = serde_json::from_value(policy.clone())
                    .map_err(|e| DaemonError::Invalid(format!("policy {name}: {e}")))?;
                // `policy set` without targets keeps those `policy backup-to` added.
                if policy.get("backups").is_none() {
                    if let Some(old) = m.policies().get(name) {
                        p.backups = old.backups.clone();
                    }
                }
                m.set_policy(name, p, now()).map_err(DaemonError::Policy)?;
                named_policy(&m, name)
            }
            Command::PolicyList => Reply::Policies(
                m.policies()
                    .iter()
                    .map(|(n, p)| reply::NamedPolicy {
                        name: n.clone(),
                        policy: Some(p.clone()),
                    })
                    .collect(),
            ),
            Command::PolicyShow { name } => {
                let p = m.policies().get(name).ok_or_else(|| {
                    DaemonError::NotFound(format!("policy '{name}' does not exist"))
                })?;
                let jobs: Vec<_> = m.jobs().into_iter().filter(|j| &j.policy == name).collect();
                Reply::PolicyDetail(reply::PolicyDetail {
                    name: name.clone(),
                    policy: p.clone(),
                    jobs,
                })
            }
            Command::PolicyBackupSet { policy, rule } => {
                let rule: BackupRule = serde_json::from_value(rule.clone()).map_err(|e| {
                    DaemonError::Invalid(format!("policy {policy}: backup target: {e}"))
                })?;
                let mut p = m.policies().get(policy).cloned().ok_or_else(|| {
                    DaemonError::NotFound(format!("policy '{policy}' does not exist"))
                })?;
                match p
                    .backups
                    .iter_mut()
                    .find(|b| b.repository == rule.repository)
                {
                    Some(b) => *b = rule,
                    None => p.backups.push(rule),
                }
                m.set_policy(policy, p, now())
                    .map_err(DaemonError::Policy)?;
                named_policy(&m, policy)
            }
            Command::PolicyBackupDelete { policy, repository } => {
                let mut p = m.policies().get(policy).cloned().ok_or_else(|| {
                    DaemonError::NotFound(format!("policy '{policy}' does not exist"))
                })?;
                let before = p.backups.len();
                p.backups.retain(|b| &b.repository != repository);
                if p.backups.len() == before {
                    return Err(DaemonError::NotFound(format!(
                        "policy '{policy}' does not back up to repository '{repository}'"
                    )));
                }
                m.set_policy(policy, p, now())
                    .map_err(DaemonError::Policy)?;
                named_policy(&m, policy)
            }
            Command::PolicyDelete { name } => {
                m.delete_policy(name).map_err(DaemonError::Policy)?;
                Reply::Deleted(reply::Deleted {
                    deleted: name.clone(),
                })
            }
            Command::PolicyPlan { name } => {
                Reply::Plan(m.prune_plan(name).map_err(DaemonError::Policy)?)
            }
            Command::Jobs => Reply::Jobs(m.jobs()),
            Command::JobRun { name } => match m.start_now(name, now(), &now) {
                Ok(Started::Done(r)) => {
                    if let Some(metrics) = self.metrics.get() {
                        count_snapshot_run(metrics, &r);
                    }
                    Reply::Run(r)
                }
                Ok(Started::Task(t)) => {
                    drop(m);
                    let r = self.run_task(&t);
                    self.wake.notify_all();
                    return Ok(Reply::Run(r));
                }
                Err(e) => return Err(DaemonError::Policy(e)),
            },
            Command::RepoSet { name, repo } => {
                let r: RepoTarget = serde_json::from_value(repo.clone())
                    .map_err(|e| DaemonError::Invalid(format!("repository {name}: {e}")))?;
                m.set_repo(name, r, now()).map_err(DaemonError::Policy)?;
                Reply::Repo(reply::NamedRepo {
                    name: name.clone(),
                    repository: m.repos().get(name).cloned(),
                })
            }
            Command::Status { volume } => {
                let st = m
                    .status(now(), volume.as_deref())
                    .map_err(DaemonError::Policy)?;
                let worst = st
                    .iter()
                    .map(|v| v.verdict)
                    .max()
                    .unwrap_or(snapblk_policy::Compliance::Compliant);
                Reply::Protection(reply::Protection {
                    verdict: worst,
                    exit_code: worst.exit_code(),
                    volumes: st,
                })
            }
            Command::NotifySet { webhook, command } => {
                let mut c = self.alerts.config();
                let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
                if let Some(w) = webhook {
                    c.webhook = opt(w);
                }
                if let Some(x) = command {
                    c.command = opt(x);
                }
                c.validate().map_err(DaemonError::Policy)?;
                m.pool().0.put_record(
                    NOTIFY_RECORD,
                    Some(serde_json::to_vec(&c).map_err(invalid)?),
                )?;
                self.alerts.set_config(c.clone());
                Reply::Notify(c)
            }
            Command::NotifyShow => Reply::Notify(self.alerts.config()),
            Command::NotifyTest => {
                let c = self.alerts.config();
                if c.webhook.is_none() && c.command.is_none() {
                    return Err(DaemonError::Invalid(
                        "no webhook or command set (snapblk notify set)".into(),
                    ));
                }
                let ev = json!({
                    "event": "test",
                    "time": now(),
                    "pool": m.pool().0.uuid(),
                    "host": snapblk_backup::catalog::host_name(),
                });
                drop(m);
                crate::alerts::deliver(&c, &ev).map_err(DaemonError::Policy)?;
                return Ok(Reply::NotifyTested(reply::NotifyTested { delivered: ev }));
            }
            Command::RepoList => Reply::Repos(
                m.repos()
                    .iter()
                    .map(|(n, r)| reply::NamedRepo {
                        name: n.clone(),
                        repository: Some(r.clone()),
                    })
                    .collect(),
            ),
            Command::RepoDelete { name } => {
                m.delete_repo(name).map_err(DaemonError::Policy)?;
                Reply::Deleted(reply::Deleted {
                    deleted: name.clone(),
                })
            }
            _ => return Err(DaemonError::Invalid("not a policy command".into())),
        };
        drop(m);
        self.wake.notify_all();
        Ok(v)
    }
}

pub fn gc_text(r: &gc::Report) -> String {
    let mut t = format!(
        "gc: {} packs; {} condemned, {} deleted ({} chunks, {}), {} repacked ({}), {} orphans removed, {} rescued",
        r.packs,
        r.packs_condemned,
        r.packs_deleted,
        r.chunks_deleted,
        snapblk_control::human::format_size(r.bytes_deleted),
        r.packs_repacked,
        snapblk_control::human::format_size(r.bytes_repacked),
        r.orphans_deleted,
        r.packs_rescued
    );
    if r.stray_marks_deleted > 0 {
        t.push_str(&format!(
            "; {} marks of packs already gone removed",
            r.stray_marks_deleted
        ));
    }
    if r.orphan_tables_deleted > 0 || !r.leftovers_deleted.is_empty() {
        t.push_str(&format!(
            "; {} tables of unfinished backups and {} headers of removed backups deleted",
            r.orphan_tables_deleted,
            r.leftovers_deleted.len()
        ));
    }
    if let Some(c) = r.cutoff {
        t.push_str(&format!(
            "; jobs running since {}: nothing newer was collected",
            snapblk_control::human::format_time(c)
        ));
    }
    for l in &r.leases_broken {
        t.push_str(&format!(
            "\n  removed the expired lease of {l} (its process died)"
        ));
    }
    for u in &r.uncatalogued {
        t.push_str(&format!(
            "\n  kept {u}: in no catalog and never removed (a rolled-back catalog?); see `snapblk backup verify`"
        ));
    }
    t
}

fn invalid(e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Invalid(e.to_string())
}

/// `{name, policy}` after a change to the policy `name`.
fn named_policy(m: &Manager<PoolPolicies>, name: &str) -> Reply {
    Reply::Policy(reply::NamedPolicy {
        name: name.to_string(),
        policy: m.policies().get(name).cloned(),
    })
}

/// Counts a finished snapshot job (snapshots taken and retention's deletions).
fn count_snapshot_run(metrics: &snapblk_metrics::Metrics, r: &RunRecord) {
    let ok = matches!(r.outcome, snapblk_policy::Outcome::Ok);
    let secs = r.end.duration_since(r.start).as_secs_f64().max(0.0);
    metrics
        .jobs
        .finished("snapshot", snapblk_metrics::Outcome::of(ok), secs);
    metrics
        .jobs
        .snapshots(r.created.len() as u64, r.deleted.len() as u64);
}

/// Counts a finished policy job in the metrics.
fn count_task(metrics: &snapblk_metrics::Metrics, task: &Task, r: &TaskResult, secs: f64) {
    use snapblk_policy::backups::Work;
    let kind = match &task.work {
        Work::Backup { repo, .. } => {
            metrics
                .jobs
                .backed_up(&repo.name, r.created.len() as u64, r.bytes_uploaded);
            "backup"
        }
        Work::Copy { to, .. } => {
            metrics
                .jobs
                .backed_up(&to.name, r.created.len() as u64, r.bytes_uploaded);
            "copy"
        }
        Work::Gc { .. } => "gc",
        Work::Verify { .. } => "verify",
    };
    let outcome = snapblk_metrics::Outcome::of(r.errors.is_empty());
    metrics.jobs.finished(kind, outcome, secs);
}
