//! The manager against an in-memory pool and a driven clock: a day of hourly snapshots
//! with retention, manual snapshots left alone, a failing volume reported without
//! stopping the others, a restart that keeps history, a run interrupted by a stop.

use std::cell::RefCell;
use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use snapblk_policy::{
    BackupDone, BackupItem, Keep, Manager, NamedRepo, Outcome, Policy, PolicyPool, SnapshotRule,
};

#[derive(Default)]
struct MemPool {
    /// Hooks run: (argv joined, phase); argv[0] == "fail" fails.
    hooks: RefCell<Vec<(String, String)>>,
    groups: RefCell<BTreeMap<String, Vec<String>>>,
    snaps: RefCell<BTreeMap<String, BTreeMap<String, Timestamp>>>,
    records: RefCell<BTreeMap<String, Vec<u8>>>,
    now: RefCell<Option<Timestamp>>,
    /// Each volume's data, as a version number bumped by a "write".
    data: RefCell<BTreeMap<String, u64>>,
    /// The data version each snapshot froze.
    frozen: RefCell<BTreeMap<(String, String), u64>>,
    /// Backups per repository name; (repository, vol@snap) failing.
    stored: RefCell<BTreeMap<String, Vec<BackupItem>>>,
    fail_backup: RefCell<Option<String>>,
    /// Backups read (vol@snap -> repo), gc and verify calls.
    calls: RefCell<Vec<String>>,
    /// Protected snapshots (vol, name): deleting one is refused.
    held: RefCell<Vec<(String, String)>>,
    /// Snapshots in use (vol, name): deleting one is refused, but they are not protected.
    busy: RefCell<Vec<(String, String)>>,
}

impl PolicyPool for &MemPool {
    fn snapshots(&self, vol: &str) -> Result<Vec<(String, Timestamp)>, String> {
        let s = self.snaps.borrow();
        let v = s
            .get(vol)
            .ok_or_else(|| format!("volume '{vol}' not found"))?;
        Ok(v.iter().map(|(n, t)| (n.clone(), *t)).collect())
    }
    fn create_snapshot(&self, vol: &str, name: &str) -> Result<(), String> {
        let mut s = self.snaps.borrow_mut();
        let v = s
            .get_mut(vol)
            .ok_or_else(|| format!("volume '{vol}' not found"))?;
        if v.contains_key(name) {
            return Err(format!("snapshot {vol}@{name} exists"));
        }
        v.insert(name.into(), self.now.borrow().expect("clock set"));
        let d = self.data.borrow().get(vol).copied().unwrap_or(0);
        self.frozen
            .borrow_mut()
            .insert((vol.to_string(), name.to_string()), d);
        Ok(())
    }
    fn group_members(&self, group: &str) -> Result<Vec<String>, String> {
        self.groups
            .borrow()
            .get(group)
            .cloned()
            .ok_or_else(|| format!("group '{group}' not found"))
    }
    fn create_group_snapshot(&self, group: &str, name: &str) -> Result<(), String> {
        let members = self.group_members(group)?;
        let mut s = self.snaps.borrow_mut();
        if members
            .iter()
            .any(|m| s.get(m).is_none_or(|v| v.contains_key(name)))
        {
            return Err(format!("group {group}: a member is missing or has {name}"));
        }
        for m in members {
            s.get_mut(&m)
                .unwrap()
                .insert(name.into(), self.now.borrow().unwrap());
        }
        Ok(())
    }
    fn delete_snapshot(&self, vol: &str, name: &str) -> Result<(), String> {
        if self
            .held
            .borrow()
            .contains(&(vol.to_string(), name.to_string()))
        {
            return Err(format!("snapshot {vol}@{name} is protected"));
        }
        if self
            .busy
            .borrow()
            .contains(&(vol.to_string(), name.to_string()))
        {
            return Err(format!("snapshot {vol}@{name} is in use"));
        }
        self.snaps
            .borrow_mut()
            .get_mut(vol)
            .and_then(|v| v.remove(name))
            .map(|_| ())
            .ok_or_else(|| format!("snapshot {vol}@{name} not found"))
    }
    fn protected(&self, vol: &str) -> Result<Vec<String>, String> {
        Ok(self
            .held
            .borrow()
            .iter()
            .filter(|(v, _)| v == vol)
            .map(|(_, n)| n.clone())
            .collect())
    }
    fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        Ok(self
            .records
            .borrow()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn run_hook(
        &self,
        argv: &[String],
        env: &[(&str, String)],
        _timeout: std::time::Duration,
    ) -> Result<(), String> {
        let phase = env
            .iter()
            .find(|(k, _)| *k == "SNAPBLK_PHASE")
            .unwrap()
            .1
            .clone();
        self.hooks.borrow_mut().push((argv.join(" "), phase));
        if argv[0] == "fail" {
            return Err("exit status: 1: quiesce failed".into());
        }
        Ok(())
    }
    fn changed(&self, vol: &str, from: &str, to: &str) -> Result<bool, String> {
        let f = self.frozen.borrow();
        let get = |s: &str| {
            f.get(&(vol.to_string(), s.to_string()))
                .copied()
                .ok_or_else(|| format!("{vol}@{s} not found"))
        };
        Ok(get(from)? != get(to)?)
    }
    fn backup(&self, repo: &NamedRepo, vol: &str, snap: &str) -> Result<BackupDone, String> {
        let what = format!("{vol}@{snap}");
        if self.fail_backup.borrow().as_deref() == Some(&format!("{}:{what}", repo.name)) {
            return Err("connection refused".into());
        }
        let created = *self
            .snaps
            .borrow()
            .get(vol)
            .and_then(|s| s.get(snap))
            .ok_or_else(|| format!("{what} not found"))?;
        self.calls
            .borrow_mut()
            .push(format!("backup {what} -> {}", repo.name));
        let mut st = self.stored.borrow_mut();
        let list = st.entry(repo.name.clone()).or_default();
        let id = format!("{}-{what}", repo.name);
        list.push(BackupItem {
            id: id.clone(),
            volume: vol.into(),
            snapshot: snap.into(),
            created,
        });
        Ok(BackupDone {
            id,
            already_stored: false,
            bytes_uploaded: 1000,
        })
    }
    fn backups(&self, repo: &NamedRepo) -> Result<Vec<BackupItem>, String> {
        Ok(self
            .stored
            .borrow()
            .get(&repo.name)
            .cloned()
            .unwrap_or_default())
    }
    fn forget(&self, repo: &NamedRepo, ids: &[String]) -> Result<Vec<String>, String> {
        let mut st = self.stored.borrow_mut();
        let list = st.get_mut(&repo.name).ok_or("no such repository")?;
        let removed = list
            .iter()
            .filter(|b| ids.contains(&b.id))
            .map(|b| b.id.clone())
            .collect();
        list.retain(|b| !ids.contains(&b.id));
        Ok(removed)
    }
    fn gc(&self, repo: &NamedRepo, grace_secs: u64) -> Result<String, String> {
        self.calls
            .borrow_mut()
            .push(format!("gc {} {grace_secs}", repo.name));
        Ok("gc: 0 packs".into())
    }
    fn verify(&self, repo: &NamedRepo, part: (u32, u32)) -> Result<String, String> {
        self.calls
            .borrow_mut()
            .push(format!("verify {} {}/{}", repo.name, part.0, part.1));
        Ok("no problems".into())
    }
    fn copy(
        &self,
        from: &NamedRepo,
        to: &NamedRepo,
        skip: &[String],
    ) -> Result<snapblk_policy::CopyDone, String> {
        let mut st = self.stored.borrow_mut();
        let src = st.get(&from.name).cloned().unwrap_or_default();
        let dst = st.entry(to.name.clone()).or_default();
        let mut done = snapblk_policy::CopyDone::default();
        for b in src {
            if skip.contains(&b.id) {
                continue;
            }
            if !dst
                .iter()
                .any(|d| d.volume == b.volume && d.snapshot == b.snapshot)
            {
                done.copied.push(format!("{}@{}", b.volume, b.snapshot));
                dst.push(BackupItem {
                    id: format!("{}-{}@{}", to.name, b.volume, b.snapshot),
                    ..b
                });
            }
        }
        for d in dst.iter() {
            let e = done.covered.entry(d.volume.clone()).or_default();
            if d.snapshot > *e {
                *e = d.snapshot.clone();
            }
        }
        Ok(done)
    }
    fn volumes(&self) -> Result<Vec<String>, String> {
        Ok(self.snaps.borrow().keys().cloned().collect())
    }
    fn pool_media(&self) -> Vec<String> {
        vec!["disk pool".into()]
    }
    fn medium(&self, repo: &snapblk_policy::RepoTarget) -> snapblk_policy::Medium {
        let id = if repo.url.starts_with("file:///pool") {
            "disk pool".to_string()
        } else {
            format!("at {}", repo.url)
        };
        snapblk_policy::Medium {
            id,
            off_site: repo.off_site(),
        }
    }
    fn put_record(&self, name: &str, value: Option<Vec<u8>>) -> Result<(), String> {
        let mut r = self.records.borrow_mut();
        match value {
            Some(v) => r.insert(name.into(), v),
            None => r.remove(name),
        };
        Ok(())
    }
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn policy(vols: &[&str], schedule: &str, keep: Keep) -> Policy {
    Policy {
        volumes: vols.iter().map(|v| v.to_string()).collect(),
        groups: Vec::new(),
        snapshots: Some(SnapshotRule {
            schedule: schedule.parse().unwrap(),
            keep,
            prefix: "auto".into(),
            persistent: true,
            random_delay_secs: 0,
            hooks: Default::default(),
        }),
        timezone: None,
        backups: Vec::new(),
    }
}

#[test]
fn a_day_of_hourly_snapshots_with_retention_restart_and_failures() {
    let pool = MemPool::default();
    for v in ["a", "b"] {
        pool.snaps.borrow_mut().insert(v.into(), BTreeMap::new());
    }
    pool.snaps
        .borrow_mut()
        .get_mut("a")
        .unwrap()
        .insert("before-upgrade".into(), ts("2026-11-30T00:00:00Z"));
    let t0 = ts("2026-12-01T00:30:00Z");
    let clock = |t: Timestamp| move || t;
    let mut m = Manager::open(&pool, TimeZone::UTC, t0).unwrap();
    let keep = Keep {
        last: 2,
        hourly: 5,
        ..Keep::default()
    };
    // "c" does not exist: its failure must not stop a and b.
    m.set_policy("vms", policy(&["a", "c", "b"], "hourly", keep), t0)
        .unwrap();
    assert!(m
        .set_policy("bad name", policy(&["a"], "hourly", keep), t0)
        .is_err());
    // Another policy on volume a with the same prefix would prune this one's snapshots.
    let e = m
        .set_policy("other", policy(&["a"], "daily", keep), t0)
        .unwrap_err();
    assert!(
        e.contains("policy 'vms' already names snapshots of volume a"),
        "{e}"
    );
    let mut own = policy(&["a"], "daily", keep);
    own.snapshots.as_mut().unwrap().prefix = String::new();
    m.set_policy("other", own, t0).unwrap();
    assert_eq!(
        m.policies()["other"].snapshots.as_ref().unwrap().prefix,
        "other"
    );
    m.delete_policy("other").unwrap();

    let mut now = t0;
    let end = ts("2026-12-02T00:30:00Z");
    let mut runs = 0;
    while now < end {
        *pool.now.borrow_mut() = Some(now);
        let (runs_now, tasks) = m.tick(now, &clock(now));
        assert!(tasks.is_empty());
        for (job, r) in runs_now {
            assert_eq!(job, "snapshot:vms");
            runs += 1;
            match &r.outcome {
                Outcome::Failed { error } => assert!(error.contains("volume c"), "{error}"),
                o => panic!("volume c is missing, yet {o:?}"),
            }
            assert_eq!(r.created.len(), 2);
        }
        now = now.checked_add(10.minutes()).unwrap();
    }
    assert_eq!(runs, 24);
    for v in ["a", "b"] {
        let names: Vec<String> = pool.snaps.borrow()[v].keys().cloned().collect();
        let autos: Vec<&String> = names.iter().filter(|n| n.starts_with("auto-")).collect();
        assert_eq!(autos.len(), 5, "{v}: {names:?}");
        assert_eq!(autos.last().unwrap().as_str(), "auto-20261202-000000");
    }
    assert!(pool.snaps.borrow()["a"].contains_key("before-upgrade"));

    // Restart: the history and the schedule continue; the dry run agrees with the state.
    let mut m = Manager::open(&pool, TimeZone::UTC, end).unwrap();
    let jobs = m.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].history.len(), 24);
    assert_eq!(jobs[0].view.state.failures, 24);
    assert_eq!(jobs[0].view.next_run, Some(ts("2026-12-02T01:00:00Z")));
    let plan = m.prune_plan("vms").unwrap();
    assert!(plan
        .iter()
        .filter(|p| p.volume != "c")
        .all(|p| p.verdicts.iter().all(|v| v.keep())
            && p.verdicts.len() == 5
            && p.error.is_none()));
    let c = plan.iter().find(|p| p.volume == "c").unwrap();
    assert!(c.error.as_deref().unwrap().contains("not found"));
    // A manual run does not move the schedule.
    *pool.now.borrow_mut() = Some(ts("2026-12-02T00:40:00Z"));
    let t = ts("2026-12-02T00:40:00Z");
    m.set_policy("vms", policy(&["a", "b"], "hourly", keep), t)
        .unwrap();
    let r = m.run_now("snapshot:vms", t, &clock(t)).unwrap();
    assert_eq!(r.outcome, Outcome::Ok);
    assert!(r.manual);
    assert_eq!(m.next_wakeup(), Some(ts("2026-12-02T01:00:00Z")));
}

#[test]
fn a_run_cut_by_a_stop_is_reported_interrupted() {
    let pool = MemPool::default();
    pool.snaps.borrow_mut().insert("a".into(), BTreeMap::new());
    let t0 = ts("2026-12-01T00:00:00Z");
    let mut m = Manager::open(&pool, TimeZone::UTC, t0).unwrap();
    m.set_policy("p", policy(&["a"], "hourly", Keep::default()), t0)
        .unwrap();
    // The daemon persisted "running" at a start and then died: simulate that record.
    let key = "job/snapshot:p".to_string();
    let mut rec: serde_json::Value = serde_json::from_slice(&pool.records.borrow()[&key]).unwrap();
    rec["state"]["running_since"] = serde_json::json!("2026-12-01T01:00:00Z");
    rec["state"]["last_start"] = serde_json::json!("2026-12-01T01:00:00Z");
    pool.records
        .borrow_mut()
        .insert(key.clone(), serde_json::to_vec(&rec).unwrap());
    let m = Manager::open(&pool, TimeZone::UTC, ts("2026-12-01T03:10:00Z")).unwrap();
    let j = &m.jobs()[0];
    assert_eq!(j.view.state.last_outcome, Some(Outcome::Interrupted));
    assert_eq!(j.history.last().unwrap().outcome, Outcome::Interrupted);
    // Missed elapses (02:00, 03:00) while down: one catch-up run, due now.
    assert_eq!(m.next_wakeup(), Some(ts("2026-12-01T03:10:00Z")));
    // And the interruption is persisted, not only in memory.
    let again = Manager::open(&pool, TimeZone::UTC, ts("2026-12-01T03:11:00Z")).unwrap();
    assert_eq!(again.jobs()[0].view.state.failures, 1);
}

#[test]
fn a_second_run_in_the_same_second_reuses_its_snapshot() {
    let pool = MemPool::default();
    pool.snaps.borrow_mut().insert("a".into(), BTreeMap::new());
    let t = ts("2026-12-01T10:00:00Z");
    *pool.now.borrow_mut() = Some(t);
    let mut m = Manager::open(&pool, TimeZone::UTC, t).unwrap();
    m.set_policy("p", policy(&["a"], "hourly", Keep::default()), t)
        .unwrap();
    let clock = move || t;
    assert_eq!(m.run_now("snapshot:p", t, &clock).unwrap().created.len(), 1);
    let again = m.run_now("snapshot:p", t, &clock).unwrap();
    assert_eq!((again.outcome, again.created.len()), (Outcome::Ok, 0));
    assert_eq!(pool.snaps.borrow()["a"].len(), 1);
}

#[test]
fn a_policy_on_a_group_snapshots_all_members_at_once_and_prunes_each() {
    let pool = MemPool::default();
    for v in ["db", "logs"] {
        pool.snaps.borrow_mut().insert(v.into(), BTreeMap::new());
    }
    pool.groups
        .borrow_mut()
        .insert("app".into(), vec!["db".into(), "logs".into()]);
    let t0 = ts("2026-12-01T00:00:00Z");
    let mut m = Manager::open(&pool, TimeZone::UTC, t0).unwrap();
    let mut p = policy(
        &[],
        "hourly",
        Keep {
            last: 2,
            ..Keep::default()
        },
    );
    p.groups = vec!["app".into()];
    m.set_policy("app", p, t0).unwrap();
    for h in 1..=5 {
        let t = t0.checked_add(h.hours()).unwrap();
        *pool.now.borrow_mut() = Some(t);
        let (runs, _) = m.tick(t, &move || t);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].1.outcome, Outcome::Ok, "{:?}", runs[0].1);
        assert_eq!(runs[0].1.created.len(), 2);
    }
    let s = pool.snaps.borrow();
    assert_eq!(
        s["db"].keys().collect::<Vec<_>>(),
        s["logs"].keys().collect::<Vec<_>>()
    );
    assert_eq!(s["db"].len(), 2);
    let plan = m.prune_plan("app").unwrap();
    assert_eq!(plan.len(), 2);
    let mut q = policy(&[], "hourly", Keep::default());
    q.groups = vec!["nope".into()];
    let t = ts("2026-12-01T06:00:00Z");
    m.set_policy("bad", q, t).unwrap();
    let r = m.run_now("snapshot:bad", t, &move || t).unwrap();
    assert!(matches!(r.outcome, Outcome::Failed { ref error } if error.contains("group nope")));
}

#[test]
fn hooks_run_around_the_snapshots_and_a_failing_pre_hook_aborts_or_warns() {
    use snapblk_policy::{Hooks, OnPreFailure};
    let pool = MemPool::default();
    pool.snaps.borrow_mut().insert("a".into(), BTreeMap::new());
    let t = ts("2026-12-01T10:00:00Z");
    *pool.now.borrow_mut() = Some(t);
    let mut m = Manager::open(&pool, TimeZone::UTC, t).unwrap();
    let clock = move || t;
    let with_hooks = |pre: &str, on: OnPreFailure| {
        let mut p = policy(&["a"], "hourly", Keep::default());
        p.snapshots.as_mut().unwrap().hooks = Hooks {
            pre: vec![pre.into(), "x".into()],
            post: vec!["resume".into()],
            timeout_secs: 5,
            on_pre_failure: on,
        };
        p
    };
    m.set_policy("p", with_hooks("quiesce", OnPreFailure::Abort), t)
        .unwrap();
    let r = m.run_now("snapshot:p", t, &clock).unwrap();
    assert_eq!((r.outcome.clone(), r.created.len()), (Outcome::Ok, 1));
    assert_eq!(
        *pool.hooks.borrow(),
        [
            ("quiesce x".to_string(), "pre".to_string()),
            ("resume".into(), "post".into())
        ]
    );
    // Abort: no snapshot, no post hook (nothing was paused), the run fails saying why.
    pool.hooks.borrow_mut().clear();
    pool.snaps.borrow_mut().get_mut("a").unwrap().clear();
    m.set_policy("p", with_hooks("fail", OnPreFailure::Abort), t)
        .unwrap();
    let r = m.run_now("snapshot:p", t, &clock).unwrap();
    assert!(
        matches!(r.outcome, Outcome::Failed { ref error } if error.contains("pre hook") && error.contains("quiesce failed"))
    );
    assert!(r.created.is_empty() && pool.snaps.borrow()["a"].is_empty());
    assert_eq!(pool.hooks.borrow().len(), 1);
    // Continue: the snapshot is taken crash-consistent; the run is ok with a warning.
    m.set_policy("p", with_hooks("fail", OnPreFailure::Continue), t)
        .unwrap();
    let r = m.run_now("snapshot:p", t, &clock).unwrap();
    assert_eq!((r.outcome.clone(), r.created.len()), (Outcome::Ok, 1));
    assert!(
        r.warnings[0].contains("crash-consistent"),
        "{:?}",
        r.warnings
    );
}

fn repo(url: &str) -> snapblk_policy::RepoTarget {
    serde_json::from_value(serde_json::json!({ "url": url, "key_file": "/etc/snapblk/k" })).unwrap()
}

/// Runs what is due at `t`: snapshot jobs inside the manager, long jobs as the daemon
/// does (outside it), returning every run by job.
fn step(
    m: &mut Manager<&MemPool>,
    pool: &MemPool,
    t: Timestamp,
) -> Vec<(String, snapblk_policy::RunRecord)> {
    *pool.now.borrow_mut() = Some(t);
    let (mut runs, tasks) = m.tick(t, &move || t);
    for task in tasks {
        let r = snapblk_policy::backups::run(&pool, &task, &TimeZone::UTC);
        runs.push((task.job.clone(), m.finish(&task, r, t)));
    }
    runs
}

#[test]
fn a_week_of_hourly_snapshots_backed_up_daily_and_weekly_with_retention_and_maintenance() {
    let pool = MemPool::default();
    for v in ["a", "b"] {
        pool.snaps.borrow_mut().insert(v.into(), BTreeMap::new());
    }
    let t0 = ts("2026-11-30T00:30:00Z"); // a Monday
    let mut m = Manager::open(&pool, TimeZone::UTC, t0).unwrap();
    let mut p = policy(
        &["a", "b"],
        "hourly",
        Keep {
            hourly: 3,
            ..Keep::default()
        },
    );
    p.backups = serde_json::from_value(serde_json::json!([
        { "repository": "usb", "schedule": "*-*-* 02:30", "keep": { "daily": 3 } },
        { "repository": "s3", "schedule": "Sun 03:30", "keep": { "weekly": 2 } }
    ]))
    .unwrap();
    // Targets must be registered repositories.
    let e = m.set_policy("vms", p.clone(), t0).unwrap_err();
    assert!(e.contains("repository 'usb' is not registered"), "{e}");
    m.set_repo("usb", repo("file:///mnt/usb/repo"), t0).unwrap();
    let mut s3 = repo("s3://bucket/snapblk");
    s3.gc = Some(serde_json::from_value(serde_json::json!({ "schedule": "Sat 05:00" })).unwrap());
    s3.verify = Some(
        serde_json::from_value(
            serde_json::json!({ "schedule": "*-*-* 06:00", "read_data_runs": 3 }),
        )
        .unwrap(),
    );
    m.set_repo("s3", s3, t0).unwrap();
    assert!(m.set_repo("bad", repo("http://x"), t0).is_err());
    m.set_policy("vms", p, t0).unwrap();
    let e = m.delete_repo("usb").unwrap_err();
    assert!(e.contains("policy 'vms' backs up there"), "{e}");

    let mut now = t0;
    let end = ts("2026-12-14T00:00:00Z"); // two weeks
    let mut by_job: BTreeMap<String, Vec<snapblk_policy::RunRecord>> = BTreeMap::new();
    while now < end {
        // Volume a is written every 10 minutes; b never after its first hour.
        *pool.data.borrow_mut().entry("a".into()).or_default() += 1;
        if now < ts("2026-11-30T01:00:00Z") {
            *pool.data.borrow_mut().entry("b".into()).or_default() += 1;
        }
        for (job, r) in step(&mut m, &pool, now) {
            assert_eq!(r.outcome, Outcome::Ok, "{job}: {r:?}");
            by_job.entry(job).or_default().push(r);
        }
        now = now.checked_add(10.minutes()).unwrap();
    }
    let usb = &by_job["backup:vms:usb"];
    assert_eq!(usb.len(), 14, "one run a day");
    // a changes between runs: a new backup every day; b only the first time.
    assert!(usb
        .iter()
        .all(|r| r.created.iter().any(|c| c.starts_with("a@"))));
    assert_eq!(
        usb.iter()
            .flat_map(|r| r.created.iter())
            .filter(|c| c.starts_with("b@"))
            .count(),
        1
    );
    assert!(usb[1..].iter().all(|r| r
        .skipped
        .iter()
        .any(|s| s.starts_with("b@") && s.contains("unchanged since"))));
    // The newest hourly snapshot at 02:30 is 02:00.
    assert_eq!(usb[0].created[0], "a@auto-20261130-020000");
    // Retention per target and volume: 3 daily backups of a, b's single one.
    let stored = pool.stored.borrow();
    let names = |r: &str, v: &str| -> Vec<String> {
        stored[r]
            .iter()
            .filter(|b| b.volume == v)
            .map(|b| b.snapshot.clone())
            .collect()
    };
    assert_eq!(
        names("usb", "a"),
        [
            "auto-20261211-020000",
            "auto-20261212-020000",
            "auto-20261213-020000"
        ]
    );
    assert_eq!(names("usb", "b"), ["auto-20261130-020000"]);
    assert_eq!(by_job["backup:vms:s3"].len(), 2, "Sundays");
    assert_eq!(names("s3", "a").len(), 2);
    // The snapshot retention (3 hourly) keeps each target's last base, so the next
    // backup is incremental: b's first snapshot is still there two weeks on.
    let snaps = pool.snaps.borrow();
    assert!(snaps["b"].contains_key("auto-20261130-020000"));
    assert!(snaps["a"].contains_key("auto-20261213-020000"));
    assert!(snaps["a"].contains_key("auto-20261213-030000"), "s3's base");
    assert_eq!(snaps["a"].len(), 3 + 2, "3 hourly + the two bases");
    drop((stored, snaps));
    // Maintenance: gc on Saturdays, verify every day reading a third of the packs in
    // turn.
    let calls = pool.calls.borrow();
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("gc s3 86400"))
            .count(),
        2
    );
    let verifies: Vec<&String> = calls.iter().filter(|c| c.starts_with("verify")).collect();
    assert_eq!(verifies.len(), 14);
    assert_eq!(
        verifies[..4],
        [
            "verify s3 0/3",
            "verify s3 1/3",
            "verify s3 2/3",
            "verify s3 0/3"
        ]
    );
    drop(calls);
    // b never changed: its base stays its one backup, but the repository holds its data as
    // of the newest snapshot found unchanged (what the 3-2-1 report ages).
    let rec: serde_json::Value =
        serde_json::from_slice(&pool.records.borrow()["job/backup:vms:usb"]).unwrap();
    assert_eq!(rec["bases"]["b"], "auto-20261130-020000");
    assert_eq!(rec["covered"]["b"], "auto-20261213-020000");

    // A failing target fails its run, names the volume, and leaves the other volume done.
    let t = ts("2026-12-14T00:10:00Z");
    *pool.data.borrow_mut().get_mut("b").unwrap() += 1;
    step(&mut m, &pool, t);
    *pool.fail_backup.borrow_mut() = Some("usb:a@auto-20261214-001000".into());
    let r = m.run_now("backup:vms:usb", t, &move || t).unwrap();
    assert!(
        matches!(&r.outcome, Outcome::Failed { error } if error.contains("volume a: connection refused")),
        "{r:?}"
    );
    assert_eq!(r.created, ["b@auto-20261214-001000"]);
    // Restart: history and bases persist.
    let m2 = Manager::open(&pool, TimeZone::UTC, t).unwrap();
    let j = m2
        .jobs()
        .into_iter()
        .find(|j| j.view.name == "backup:vms:usb")
        .unwrap();
    assert_eq!(j.history.len(), 15);
    assert_eq!(j.repository, "usb");
    let rec: serde_json::Value =
        serde_json::from_slice(&pool.records.borrow()["job/backup:vms:usb"]).unwrap();
    assert_eq!(rec["bases"]["b"], "auto-20261214-001000");

    // The 3-2-1 report: b has fresh backups on two other media, one off site.
    use snapblk_policy::Compliance;
    let st = m2.status(t, None).unwrap();
    let b = st.iter().find(|s| s.volume == "b").unwrap();
    assert_eq!(
        (b.verdict, b.copies, b.media, b.off_site),
        (Compliance::Compliant, 3, 3, true),
        "{b:?}"
    );
    // a's last usb run failed, but its newest backup (yesterday 02:00) is within the
    // daily schedule's RPO (2 days): still compliant.
    let a = st.iter().find(|s| s.volume == "a").unwrap();
    assert_eq!(a.verdict, Compliance::Compliant, "{a:?}");
    // Three days without backups: usb is past its RPO (violated), s3's weekly one is not.
    let later = ts("2026-12-17T00:00:00Z");
    let st = m2.status(later, Some("a")).unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(
        (st[0].verdict, st[0].copies),
        (Compliance::Violated, 2),
        "{:?}",
        st[0]
    );
    assert!(st[0]
        .reasons
        .iter()
        .any(|r| r.starts_with("usb: newest backup a") || r.contains("usb: newest backup")));
    assert!(m2.status(later, Some("nope")).is_err());
}

/// Volume a, repository usb, and policy p (hourly snapshots, prefix auto, keeping all)
/// backing up to usb as `target` says; the clock at `t0`.
fn backing_up_to_usb(
    pool: &MemPool,
    t0: Timestamp,
    target: serde_json::Value,
) -> (Manager<&MemPool>, Policy) {
    pool.snaps.borrow_mut().insert("a".into(), BTreeMap::new());
    *pool.now.borrow_mut() = Some(t0);
    let mut m = Manager::open(pool, TimeZone::UTC, t0).unwrap();
    m.set_repo("usb", repo("file:///mnt/usb"), t0).unwrap();
    let mut p = policy(&["a"], "hourly", Keep::default());
    p.backups = serde_json::from_value(serde_json::json!([target])).unwrap();
    m.set_policy("p", p.clone(), t0).unwrap();
    (m, p)
}

#[test]
fn a_long_job_cut_by_a_stop_is_reported_interrupted() {
    let pool = MemPool::default();
    let t0 = ts("2026-12-01T00:00:00Z");
    let (mut m, _) = backing_up_to_usb(
        &pool,
        t0,
        serde_json::json!({ "repository": "usb", "schedule": "daily" }),
    );
    // Started (persisted running), then the daemon died before finish.
    let t = ts("2026-12-01T00:30:00Z");
    *pool.now.borrow_mut() = Some(t);
    let started = m.start_now("backup:p:usb", t, &move || t).unwrap();
    assert!(matches!(started, snapblk_policy::Started::Task(_)));
    let m = Manager::open(&pool, TimeZone::UTC, ts("2026-12-01T01:00:00Z")).unwrap();
    let j = m
        .jobs()
        .into_iter()
        .find(|j| j.view.name == "backup:p:usb")
        .unwrap();
    assert_eq!(j.history.last().unwrap().outcome, Outcome::Interrupted);
    // No snapshot yet: the run fails saying so, it does not pass silently.
    let mut m = m;
    let r = m.run_now("backup:p:usb", t, &move || t).unwrap();
    assert!(
        matches!(&r.outcome, Outcome::Failed { error } if error.contains("no snapshot named auto-")),
        "{r:?}"
    );
}

#[test]
fn notifications_are_transitions_only() {
    use snapblk_policy::{Event, Watch};
    let pool = MemPool::default();
    let t0 = ts("2026-12-01T00:00:00Z");
    let (mut m, _) = backing_up_to_usb(
        &pool,
        t0,
        serde_json::json!({ "repository": "usb", "schedule": "hourly", "rpo_secs": 3600 }),
    );
    m.run_now("snapshot:p", t0, &move || t0).unwrap();
    let mut w = Watch::new(&m.jobs());
    // Never backed up: violated, once.
    let ev = w.status(&m.status(t0, None).unwrap(), t0);
    assert!(
        matches!(&ev[..], [Event::RpoViolated { volume, .. }] if volume == "a"),
        "{ev:?}"
    );
    assert!(w.status(&m.status(t0, None).unwrap(), t0).is_empty());
    *pool.fail_backup.borrow_mut() = Some("usb:a@auto-20261201-000000".into());
    for i in 0..3 {
        m.run_now("backup:p:usb", t0, &move || t0).unwrap();
        let ev = w.jobs(&m.jobs(), t0);
        if i == 0 {
            assert!(
                matches!(&ev[..], [Event::JobFailed { job, error, .. }]
                if job == "backup:p:usb" && error.contains("connection refused")),
                "{ev:?}"
            );
        } else {
            assert!(ev.is_empty(), "a failure repeating is not news: {ev:?}");
        }
    }
    *pool.fail_backup.borrow_mut() = None;
    m.run_now("backup:p:usb", t0, &move || t0).unwrap();
    let ev = w.jobs(&m.jobs(), t0);
    assert!(
        matches!(&ev[..], [Event::JobRecovered { job, .. }] if job == "backup:p:usb"),
        "{ev:?}"
    );
    let ev = w.status(&m.status(t0, None).unwrap(), t0);
    assert!(
        matches!(&ev[..], [Event::RpoRecovered { volume, .. }] if volume == "a"),
        "{ev:?}"
    );
    // An hour and a half later, with no backup since: violated again.
    let later = ts("2026-12-01T01:30:00Z");
    let ev = w.status(&m.status(later, None).unwrap(), later);
    assert!(matches!(&ev[..], [Event::RpoViolated { .. }]), "{ev:?}");
    // A restart does not repeat what the jobs' records already say.
    let m2 = Manager::open(&pool, TimeZone::UTC, later).unwrap();
    let mut w2 = Watch::new(&m2.jobs());
    assert!(w2.jobs(&m2.jobs(), later).is_empty());
}

#[test]
fn a_scheduled_copy_is_a_copy_for_the_3_2_1_report() {
    use snapblk_policy::Compliance;
    let pool = MemPool::default();
    pool.snaps.borrow_mut().insert("a".into(), BTreeMap::new());
    let t0 = ts("2026-12-01T00:30:00Z");
    let mut m = Manager::open(&pool, TimeZone::UTC, t0).unwrap();
    m.set_repo("usb", repo("file:///mnt/usb"), t0).unwrap();
    let mut off = repo("s3://bucket/x");
    off.copy = Some(
        serde_json::from_value(serde_json::json!({ "from": "usb", "schedule": "*-*-* 04:00" }))
            .unwrap(),
    );
    let mut bad = off.clone();
    bad.copy.as_mut().unwrap().from = "nope".into();
    assert!(m
        .set_repo("offsite", bad, t0)
        .unwrap_err()
        .contains("'nope' is not registered"));
    m.set_repo("offsite", off, t0).unwrap();
    let p = hourly_to_usb_daily(5);
    m.set_policy("p", p, t0).unwrap();
    let mut now = t0;
    // Before any copy: two copies only, no off site.
    while now < ts("2026-12-01T03:00:00Z") {
        *pool.data.borrow_mut().entry("a".into()).or_default() += 1;
        step(&mut m, &pool, now);
        now = now.checked_add(10.minutes()).unwrap();
    }
    let st = m.status(now, None).unwrap();
    assert_eq!(
        st[0].verdict,
        Compliance::Violated,
        "offsite never had a copy: {st:?}"
    );
    while now < ts("2026-12-03T05:00:00Z") {
        *pool.data.borrow_mut().entry("a".into()).or_default() += 1;
        for (job, r) in step(&mut m, &pool, now) {
            assert_eq!(r.outcome, Outcome::Ok, "{job}");
        }
        now = now.checked_add(10.minutes()).unwrap();
    }
    let names = |r: &str| -> Vec<String> {
        pool.stored.borrow()[r]
            .iter()
            .map(|b| b.snapshot.clone())
            .collect()
    };
    assert_eq!(names("usb"), names("offsite"));
    assert_eq!(names("offsite").len(), 3);
    let st = m.status(now, None).unwrap();
    let a = &st[0];
    assert_eq!(
        (a.verdict, a.copies, a.off_site),
        (Compliance::Compliant, 3, true),
        "{a:?}"
    );
    assert!(a
        .targets
        .iter()
        .any(|t| t.repository == "offsite" && t.newest.as_deref() == Some("auto-20261203-020000")));
    assert!(m
        .delete_repo("usb")
        .unwrap_err()
        .contains("policy 'p' backs up there"));
    m.delete_policy("p").unwrap();
    assert!(m
        .delete_repo("usb")
        .unwrap_err()
        .contains("'offsite' copies from it"));
}

#[test]
fn changing_a_policy_while_its_backup_runs_neither_restarts_nor_interrupts_it() {
    let pool = MemPool::default();
    let t0 = ts("2026-12-01T00:00:00Z");
    let (mut m, mut p) = backing_up_to_usb(
        &pool,
        t0,
        serde_json::json!({ "repository": "usb", "schedule": "*:0/10" }),
    );
    m.run_now("snapshot:p", t0, &move || t0).unwrap();
    let t1 = ts("2026-12-01T00:10:00Z");
    let (_, tasks) = m.tick(t1, &move || t1);
    assert_eq!(tasks.len(), 1);
    // While the task runs (outside the manager), the admin changes the policy.
    p.backups[0].schedule = "*:0/5".parse().unwrap();
    m.set_policy("p", p.clone(), t1).unwrap();
    let t2 = ts("2026-12-01T00:20:00Z");
    let (_, again) = m.tick(t2, &move || t2);
    assert!(again.is_empty(), "started twice: {again:?}");
    let r = snapblk_policy::backups::run(&&pool, &tasks[0], &TimeZone::UTC);
    let rec = m.finish(&tasks[0], r, t2);
    assert_eq!(rec.outcome, Outcome::Ok);
    let j = m
        .jobs()
        .into_iter()
        .find(|j| j.view.name == "backup:p:usb")
        .unwrap();
    assert_eq!(j.history.len(), 1, "{:?}", j.history);
    assert!(!j.view.running);
    assert_eq!(
        j.view.next_run,
        Some(ts("2026-12-01T00:25:00Z")),
        "the new schedule"
    );
    // A target cannot be removed while its run goes on (re-added, two runs would cross);
    // the policy is left as it was.
    let t3 = ts("2026-12-01T00:22:00Z");
    *pool.now.borrow_mut() = Some(t3);
    m.run_now("snapshot:p", t3, &move || t3).unwrap();
    let (_, tasks) = m.tick(ts("2026-12-01T00:25:00Z"), &move || t2);
    assert_eq!(tasks.len(), 1);
    let mut q = p.clone();
    q.backups.clear();
    let e = m.set_policy("p", q.clone(), t2).unwrap_err();
    assert!(e.contains("job backup:p:usb is running"), "{e}");
    assert_eq!(m.policies()["p"].backups.len(), 1);
    assert!(m.delete_policy("p").is_err());
    // What the run backs up is protected from snapshot retention while it runs.
    let pinned = match &tasks[0].work {
        snapblk_policy::Work::Backup { pinned, .. } => pinned.clone(),
        w => panic!("{w:?}"),
    };
    assert_eq!(pinned["a"], "auto-20261201-002200");
    let plan = m.prune_plan("p").unwrap();
    assert!(plan[0]
        .verdicts
        .iter()
        .any(|v| v.name == "auto-20261201-002200"
            && v.reasons.contains(&snapblk_policy::Reason::Protected)));
    let r = snapblk_policy::backups::run(&&pool, &tasks[0], &TimeZone::UTC);
    m.finish(&tasks[0], r, t2);
    m.set_policy("p", q, t2).unwrap();
    assert!(!pool.records.borrow().contains_key("job/backup:p:usb"));
    assert!(m.jobs().iter().all(|j| j.view.name != "backup:p:usb"));
}

#[test]
fn a_policy_reads_its_schedule_and_retention_in_its_own_time_zone() {
    let pool = MemPool::default();
    pool.snaps.borrow_mut().insert("a".into(), BTreeMap::new());
    let t0 = ts("2026-12-01T00:00:00Z");
    let mut m = Manager::open(&pool, TimeZone::UTC, t0).unwrap();
    let mut p = policy(
        &["a"],
        "*-*-* 02:00",
        Keep {
            daily: 2,
            ..Keep::default()
        },
    );
    p.timezone = Some("Nowhere/Atlantis".into());
    let e = m.set_policy("ny", p.clone(), t0).unwrap_err();
    assert!(e.contains("is not known"), "{e}");
    p.timezone = Some("America/New_York".into());
    m.set_policy("ny", p, t0).unwrap();
    // 02:00 in New York in December is 07:00 UTC, on a host whose zone is UTC.
    assert_eq!(m.next_wakeup(), Some(ts("2026-12-01T07:00:00Z")));
    // Days are New York's: 12-01 07:00Z and 12-02 03:00Z are both its 1st, 12-02 06:00Z
    // (01:00 there) its 2nd; read in UTC, 03:00Z would go instead of 07:00Z.
    for t in [
        "2026-12-01T07:00:00Z",
        "2026-12-02T03:00:00Z",
        "2026-12-02T06:00:00Z",
    ] {
        let t = ts(t);
        *pool.now.borrow_mut() = Some(t);
        m.run_now("snapshot:ny", t, &move || t).unwrap();
    }
    let kept: Vec<String> = pool.snaps.borrow()["a"].keys().cloned().collect();
    assert_eq!(kept, ["auto-20261202-030000", "auto-20261202-060000"]);
}

#[test]
fn a_group_change_that_would_make_two_policies_share_a_prefix_on_a_volume_is_refused() {
    let pool = MemPool::default();
    for v in ["a", "b"] {
        pool.snaps.borrow_mut().insert(v.into(), BTreeMap::new());
    }
    pool.groups
        .borrow_mut()
        .insert("g".into(), vec!["b".into()]);
    let t0 = ts("2026-12-01T00:00:00Z");
    let mut m = Manager::open(&pool, TimeZone::UTC, t0).unwrap();
    m.set_policy("one", policy(&["a"], "hourly", Keep::default()), t0)
        .unwrap();
    let mut two = policy(&[], "hourly", Keep::default());
    two.groups = vec!["g".into()];
    m.set_policy("two", two, t0).unwrap();
    // Both use prefix "auto": fine while they cover different volumes.
    m.check_group("g", &["b".into()]).unwrap();
    let e = m.check_group("g", &["b".into(), "a".into()]).unwrap_err();
    assert!(
        e.contains("policies 'one' and 'two' would both name snapshots of volume a"),
        "{e}"
    );
    m.check_group("other", &["a".into()]).unwrap();
}

/// The pool's space as a function of its snapshots: each holds `per_snap` of `cap`.
struct SnapSpace<'a> {
    pool: &'a MemPool,
    cap: std::cell::Cell<u64>,
    per_snap: u64,
}

impl snapblk_policy::PoolSpace for SnapSpace<'_> {
    fn space(&self) -> (u64, u64) {
        let n: u64 = self
            .pool
            .snaps
            .borrow()
            .values()
            .map(|v| v.len() as u64)
            .sum();
        let cap = self.cap.get();
        (cap.saturating_sub(n * self.per_snap), cap)
    }
    fn settle(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The space guard deletes the oldest policy snapshots first, across volumes, until free
/// space is back at its target; never a protected, hand-made or policy-newest one; says
/// when nothing is left (once) and when space is back; a write finding the pool full gets
/// one more deleted even above the threshold; with the guard off nothing goes.
#[test]
fn the_space_guard_deletes_oldest_unprotected_policy_snapshots_only() {
    use snapblk_policy::{Event, Guard, GuardConfig};
    use std::sync::Mutex;
    let pool = MemPool::default();
    for v in ["a", "b"] {
        pool.snaps.borrow_mut().insert(v.into(), BTreeMap::new());
    }
    let t0 = ts("2026-12-01T00:30:00Z");
    pool.snaps
        .borrow_mut()
        .get_mut("a")
        .unwrap()
        .insert("manual".into(), ts("2026-11-01T00:00:00Z"));
    let mut m = Manager::open(&pool, TimeZone::UTC, t0).unwrap();
    m.set_policy("p", policy(&["a", "b"], "hourly", Keep::default()), t0)
        .unwrap();
    let mut now = t0;
    for _ in 0..10 {
        now += 1.hour();
        *pool.now.borrow_mut() = Some(now);
        m.tick(now, &|| now);
    }
    let names = |v: &str| -> Vec<String> { pool.snaps.borrow()[v].keys().cloned().collect() };
    let a = names("a");
    assert_eq!(a.len(), 11, "{a:?}");
    // a's second-oldest policy snapshot is protected.
    let held = a
        .iter()
        .filter(|n| n.starts_with("auto-"))
        .nth(1)
        .unwrap()
        .clone();
    pool.held.borrow_mut().push(("a".into(), held.clone()));
    let space = SnapSpace {
        pool: &pool,
        cap: std::cell::Cell::new(100),
        per_snap: 4,
    };
    let b = names("b");
    // a's oldest is in use (exported): the pool refuses it and the guard goes on.
    let pa0 = a.iter().find(|n| n.starts_with("auto-")).unwrap().clone();
    pool.busy.borrow_mut().push(("a".into(), pa0.clone()));
    let mgr = Mutex::new(m);
    // Off: nothing happens even when full.
    let off = Guard::new(None);
    assert!(!off.pass(&mgr, &space, true, now).progressed);
    // 21 snapshots hold 84%: 16% free, under 30%; the target 40% needs 6 to go.
    let guard = Guard::new(Some(GuardConfig::new(30.0, Some(40.0)).unwrap()));
    let pass = guard.pass(&mgr, &space, false, now);
    let gone: Vec<String> = pass
        .deleted
        .iter()
        .map(|c| format!("{}@{}", c.volume, c.snapshot))
        .collect();
    let pa: Vec<&String> = a.iter().filter(|n| n.starts_with("auto-")).collect();
    let want = vec![
        format!("b@{}", b[0]),
        format!("b@{}", b[1]),
        format!("a@{}", pa[2]),
        format!("b@{}", b[2]),
        format!("a@{}", pa[3]),
        format!("b@{}", b[3]),
    ];
    assert_eq!(
        gone, want,
        "oldest first, the protected and the busy one skipped"
    );
    assert_eq!(pass.errors.len(), 1, "{:?}", pass.errors);
    pool.busy.borrow_mut().clear();
    assert!(
        matches!(&pass.events[..], [Event::SnapshotsDeletedForSpace { snapshots, .. }] if snapshots.len() == 6)
    );
    assert_eq!(snapblk_policy::PoolSpace::space(&space).0, 40);
    // Above the threshold: a pass does nothing.
    assert!(guard.pass(&mgr, &space, false, now).deleted.is_empty());
    // A write that found the pool full gets one more deleted.
    let urgent = guard.pass(&mgr, &space, true, now);
    assert_eq!(urgent.deleted.len(), 1);
    // Demand more than can be had: everything deletable goes, then one alert.
    guard.set_config(Some(GuardConfig::new(90.0, None).unwrap()));
    let pass = guard.pass(&mgr, &space, false, now);
    assert!(!pass.deleted.is_empty());
    assert!(
        pass.events
            .iter()
            .any(|e| matches!(e, Event::SpaceExhausted { .. })),
        "{:?}",
        pass.events
    );
    let mut left_a = names("a");
    left_a.sort();
    let newest_a = pa.last().unwrap().to_string();
    let mut want_a = vec!["manual".to_string(), held.clone(), newest_a];
    want_a.sort();
    assert_eq!(left_a, want_a, "hand-made, protected and newest stay");
    assert_eq!(names("b"), vec![b.last().unwrap().clone()]);
    let again = guard.pass(&mgr, &space, false, now);
    assert!(
        again.events.is_empty(),
        "announced once: {:?}",
        again.events
    );
    assert!(
        !guard.pass(&mgr, &space, true, now).progressed,
        "nothing left"
    );
    // Space back (the pool grew): recovered, once.
    space.cap.set(1000);
    let back = guard.pass(&mgr, &space, false, now);
    assert!(
        matches!(&back.events[..], [Event::SpaceRecovered { .. }]),
        "{:?}",
        back.events
    );
    assert!(guard.pass(&mgr, &space, false, now).events.is_empty());
    assert!(GuardConfig::new(0.0, None).is_err());
    assert!(GuardConfig::new(20.0, Some(10.0)).is_err());
    assert!(GuardConfig::new(100.0, None).is_err());
}

/// A copy destination with its own retention keeps its last 2 copies per volume while the
/// source keeps 10 days, never copies again what it pruned, and refuses to share the
/// repository with a policy's direct backups (two retentions would prune each other's).
#[test]
fn a_copy_destination_prunes_by_its_own_retention_and_never_recopies() {
    let pool = MemPool::default();
    pool.snaps.borrow_mut().insert("a".into(), BTreeMap::new());
    let t0 = ts("2026-12-01T00:30:00Z");
    let mut m = Manager::open(&pool, TimeZone::UTC, t0).unwrap();
    m.set_repo("usb", repo("file:///mnt/usb"), t0).unwrap();
    let p = hourly_to_usb_daily(10);
    m.set_policy("p", p.clone(), t0).unwrap();
    let mut off = repo("s3://bucket/x");
    off.copy = Some(
        serde_json::from_value(serde_json::json!({
            "from": "usb", "schedule": "*-*-* 04:00", "keep": { "last": 2 }
        }))
        .unwrap(),
    );
    // A policy backing up to usb is fine; one backing up to offsite is refused.
    m.set_repo("offsite", off.clone(), t0).unwrap();
    let mut direct = p.clone();
    direct.backups[0].repository = "offsite".into();
    let e = m.set_policy("p", direct, t0).unwrap_err();
    assert!(e.contains("prunes the copies it receives"), "{e}");
    let mut copied: Vec<String> = Vec::new();
    let mut now = t0;
    while now < ts("2026-12-06T05:00:00Z") {
        *pool.data.borrow_mut().entry("a".into()).or_default() += 1;
        for (job, r) in step(&mut m, &pool, now) {
            assert_eq!(r.outcome, Outcome::Ok, "{job}");
            if job == "copy:offsite" {
                copied.extend(r.created.clone());
            }
        }
        now = now.checked_add(10.minutes()).unwrap();
    }
    let names = |r: &str| -> Vec<String> {
        let mut v: Vec<String> = pool.stored.borrow()[r]
            .iter()
            .map(|b| b.snapshot.clone())
            .collect();
        v.sort();
        v
    };
    let usb = names("usb");
    assert_eq!(usb.len(), 6, "{usb:?}");
    assert_eq!(names("offsite"), usb[usb.len() - 2..].to_vec());
    let mut once = copied.clone();
    once.sort();
    once.dedup();
    assert_eq!(
        once.len(),
        copied.len(),
        "copied again after pruning: {copied:?}"
    );
    assert_eq!(copied.len(), 6, "{copied:?}");
    // Registering a copy retention on a repository a policy backs up to is refused.
    let mut usb2 = repo("file:///mnt/usb");
    usb2.copy = Some(
        serde_json::from_value(serde_json::json!({
            "from": "offsite", "schedule": "daily", "keep": { "last": 1 }
        }))
        .unwrap(),
    );
    let e = m.set_repo("usb", usb2, now).unwrap_err();
    assert!(e.contains("policy 'p' backs up to 'usb'"), "{e}");
}

/// Backups removed by hand (`backup forget`): the report stops counting them once the
/// daemon is told, falling back to the newest backup still there, or to none; a record
/// still true is left alone.
#[test]
fn backups_forgotten_by_hand_stop_counting_for_the_report() {
    let pool = MemPool::default();
    let t0 = ts("2026-12-01T00:00:00Z");
    let (mut m, _) = backing_up_to_usb(
        &pool,
        t0,
        serde_json::json!({ "repository": "usb", "schedule": "*:30" }),
    );
    let mut now = t0;
    while now < ts("2026-12-01T03:00:00Z") {
        *pool.data.borrow_mut().entry("a".into()).or_default() += 1;
        step(&mut m, &pool, now);
        now = now.checked_add(10.minutes()).unwrap();
    }
    let newest = |m: &Manager<&MemPool>| -> Option<String> {
        let st = m.status(now, None).unwrap();
        st[0]
            .targets
            .iter()
            .find(|t| t.repository == "usb")
            .unwrap()
            .newest
            .clone()
    };
    let items = pool.stored.borrow()["usb"].clone();
    assert_eq!(items.len(), 2, "{items:?}");
    let last = items.iter().max_by_key(|b| b.created).unwrap().clone();
    assert_eq!(newest(&m).as_deref(), Some(last.snapshot.as_str()));
    // Nothing changed: nothing to correct.
    assert!(m.backups_changed("usb", &items).unwrap().is_empty());
    // The newest is forgotten by hand: the one before it counts.
    let left: Vec<_> = items.iter().filter(|b| b.id != last.id).cloned().collect();
    pool.stored.borrow_mut().insert("usb".into(), left.clone());
    assert_eq!(
        m.backups_changed("usb", &left).unwrap(),
        vec!["backup:p:usb".to_string()]
    );
    let prev = left.iter().max_by_key(|b| b.created).unwrap();
    assert_eq!(newest(&m).as_deref(), Some(prev.snapshot.as_str()));
    // Kept across a restart (the job record was rewritten).
    let m2 = Manager::open(&pool, TimeZone::UTC, now).unwrap();
    assert_eq!(newest(&m2).as_deref(), Some(prev.snapshot.as_str()));
    // All gone: never backed up, so violated.
    pool.stored.borrow_mut().insert("usb".into(), Vec::new());
    m.backups_changed("usb", &[]).unwrap();
    assert_eq!(newest(&m), None);
    assert_eq!(
        m.status(now, None).unwrap()[0].verdict,
        snapblk_policy::Compliance::Violated
    );
    assert_eq!(m.repos_at("file:///mnt/usb/"), vec!["usb".to_string()]);
}

/// Volume a snapshotted hourly (2 kept), backed up to "usb" daily at 02:30, `days` kept.
fn hourly_to_usb_daily(days: u32) -> Policy {
    let mut p = policy(
        &["a"],
        "hourly",
        Keep {
            hourly: 2,
            ..Keep::default()
        },
    );
    p.backups = serde_json::from_value(serde_json::json!([
        { "repository": "usb", "schedule": "*-*-* 02:30", "keep": { "daily": days } }
    ]))
    .unwrap();
    p
}
