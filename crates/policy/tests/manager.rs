//! The manager against an in-memory pool and a driven clock: a day of hourly snapshots
//! with retention, manual snapshots left alone, a failing volume reported without
//! stopping the others, a restart that keeps history, a run interrupted by a stop.

use std::cell::RefCell;
use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use snapblk_policy::{Keep, Manager, Outcome, Policy, PolicyPool, SnapshotRule};

#[derive(Default)]
struct MemPool {
    /// Hooks run: (argv joined, phase); argv[0] == "fail" fails.
    hooks: RefCell<Vec<(String, String)>>,
    groups: RefCell<BTreeMap<String, Vec<String>>>,
    snaps: RefCell<BTreeMap<String, BTreeMap<String, Timestamp>>>,
    records: RefCell<BTreeMap<String, Vec<u8>>>,
    now: RefCell<Option<Timestamp>>,
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
        self.snaps
            .borrow_mut()
            .get_mut(vol)
            .and_then(|v| v.remove(name))
            .map(|_| ())
            .ok_or_else(|| format!("snapshot {vol}@{name} not found"))
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
        for (job, r) in m.tick(now, &clock(now)) {
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
        let runs = m.tick(t, &move || t);
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
