//! Issue 13, acceptance 1: the scheduler against a clock the test drives — a week of hourly,
//! daily and weekly schedules across a DST change, with the daemon down for two days in the
//! middle (a run interrupted, missed elapses caught up once), and the retention of the
//! hourly snapshots compared with an independent reference. Runs in well under a second.

use std::collections::{BTreeMap, BTreeSet};

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use proptest::prelude::*;
use snapblk_policy::{
    apply_retention, CalendarEvent, Item, JobSpec, JobState, Keep, Outcome, Scheduler,
};

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn spec(expr: &str, persistent: bool, delay: u32) -> JobSpec {
    JobSpec {
        schedule: CalendarEvent::parse(expr).unwrap(),
        persistent,
        random_delay_secs: delay,
        timezone: None,
    }
}

#[derive(Debug, Clone)]
struct Run {
    job: String,
    elapse: Timestamp,
    start: Timestamp,
    end: Option<Timestamp>,
}

/// Job name → (spec, run duration).
fn jobs() -> Vec<(&'static str, JobSpec, SignedDuration)> {
    vec![
        (
            "hourly-snap",
            spec("hourly", true, 0),
            SignedDuration::from_secs(70),
        ),
        (
            "daily-backup",
            spec("*-*-* 02:00", true, 600),
            SignedDuration::from_mins(50),
        ),
        (
            "weekly-verify",
            spec("Sun 03:00", true, 0),
            SignedDuration::from_hours(3),
        ),
        (
            "half-past",
            spec("*:30", false, 0),
            SignedDuration::from_secs(30),
        ),
    ]
}

struct Sim {
    sched: Scheduler,
    /// What the daemon persisted per job.
    saved: BTreeMap<String, JobState>,
    runs: Vec<Run>,
    running: BTreeMap<String, (usize, Timestamp)>,
}

impl Sim {
    fn boot(tz: &TimeZone, saved: BTreeMap<String, JobState>, now: Timestamp) -> Sim {
        let mut sched = Scheduler::new(tz.clone());
        let mut out = BTreeMap::new();
        for (name, spec, _) in jobs() {
            let st = saved.get(name).cloned().unwrap_or_default();
            out.insert(name.to_string(), sched.add(name, spec, st, now));
        }
        Sim {
            sched,
            saved: out,
            runs: Vec::new(),
            running: BTreeMap::new(),
        }
    }

    fn tick(&mut self, now: Timestamp) {
        let durations: BTreeMap<&str, SignedDuration> =
            jobs().into_iter().map(|(n, _, d)| (n, d)).collect();
        let done: Vec<String> = self
            .running
            .iter()
            .filter(|(_, (_, end))| *end <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in done {
            let (i, _) = self.running.remove(&name).unwrap();
            self.runs[i].end = Some(now);
            let st = self.sched.finished(&name, now, Outcome::Ok).unwrap();
            self.saved.insert(name, st);
        }
        for s in self.sched.poll(now) {
            assert!(
                !self.running.contains_key(&s.job),
                "{} started twice",
                s.job
            );
            self.runs.push(Run {
                job: s.job.clone(),
                elapse: s.elapse,
                start: now,
                end: None,
            });
            let end = now.checked_add(durations[s.job.as_str()]).unwrap();
            self.running
                .insert(s.job.clone(), (self.runs.len() - 1, end));
            let st = self
                .sched
                .jobs()
                .into_iter()
                .find(|j| j.name == s.job)
                .unwrap()
                .state;
            self.saved.insert(s.job, st);
        }
        if let Some(w) = self.sched.next_wakeup() {
            assert!(w > now, "next wakeup {w} not after {now}");
        }
    }
}

#[test]
fn a_week_of_schedules_with_downtime_and_catch_up() {
    let tz = TimeZone::get("Europe/Berlin").unwrap();
    let begin = ts("2026-03-25T23:00:00Z"); // Thu 00:00 CET
    let down = ts("2026-03-28T01:20:00Z"); // Sat 02:20 CET: the daily backup is running
    let up = ts("2026-03-30T01:40:00Z"); // Mon 03:40 CEST (DST began Sunday 02:00)
    let end = ts("2026-04-01T22:00:00Z"); // Thu 00:00 CEST
    let step = 20.seconds();

    let mut sim = Sim::boot(&tz, BTreeMap::new(), begin);
    let mut now = begin;
    while now < down {
        sim.tick(now);
        now = now.checked_add(step).unwrap();
    }
    // Power off: running jobs never finish; their persisted state says running.
    let interrupted: Vec<String> = sim.running.keys().cloned().collect();
    assert_eq!(
        interrupted,
        ["daily-backup"],
        "the daily backup runs at shutdown"
    );
    let mut runs = sim.runs.clone();
    let saved = sim.saved.clone();

    let mut sim = Sim::boot(&tz, saved, up);
    let st = &sim.saved["daily-backup"];
    assert_eq!(st.last_outcome, Some(Outcome::Interrupted));
    assert_eq!(st.failures, 1);
    let mut now = up;
    while now < end {
        sim.tick(now);
        now = now.checked_add(step).unwrap();
    }
    runs.extend(sim.runs.iter().cloned());

    let by_job = |j: &str| -> Vec<&Run> { runs.iter().filter(|r| r.job == j).collect() };
    // No job overlaps itself.
    for (name, _, _) in jobs() {
        let rs = by_job(name);
        for w in rs.windows(2) {
            if let Some(e) = w[0].end {
                assert!(w[1].start >= e, "{name} overlaps: {:?}", w);
            }
        }
    }
    // Catch-up at boot: exactly the persistent jobs that missed an elapse, once each.
    let at_up: BTreeSet<&str> = runs
        .iter()
        .filter(|r| r.start == up)
        .map(|r| r.job.as_str())
        .collect();
    assert_eq!(
        at_up,
        BTreeSet::from(["hourly-snap", "daily-backup", "weekly-verify"]),
        "catch-up runs at boot"
    );
    // Hourly: every whole hour while up, plus the one catch-up.
    let hourly = by_job("hourly-snap");
    let mut want = Vec::new();
    let mut h = begin;
    while h < end {
        if (h > begin && h < down) || h > up {
            want.push(h);
        }
        h = h.checked_add(1.hour()).unwrap();
    }
    let got: Vec<Timestamp> = hourly
        .iter()
        .filter(|r| r.start != up)
        .map(|r| r.elapse)
        .collect();
    assert_eq!(got, want);
    for r in hourly.iter().filter(|r| r.start != up) {
        assert!(r.start >= r.elapse && r.start < r.elapse.checked_add(step).unwrap());
    }
    // Daily: 02:00 local (+ up to 10 min) on Thu, Fri, Sat before the outage, then Tue and
    // Wed after it, plus the catch-up; the delay is within bounds and differs between days.
    let daily = by_job("daily-backup");
    let local: Vec<String> = daily
        .iter()
        .filter(|r| r.start != up)
        .map(|r| {
            r.elapse
                .to_zoned(tz.clone())
                .strftime("%a %H:%M")
                .to_string()
        })
        .collect();
    assert_eq!(
        local,
        [
            "Thu 02:00",
            "Fri 02:00",
            "Sat 02:00",
            "Tue 02:00",
            "Wed 02:00"
        ]
    );
    let delays: BTreeSet<i64> = daily
        .iter()
        .filter(|r| r.start != up)
        .map(|r| r.start.duration_since(r.elapse).as_secs())
        .collect();
    assert!(delays.iter().all(|d| (0..=620).contains(d)), "{delays:?}");
    assert!(
        delays.len() > 1,
        "the random delay never varies: {delays:?}"
    );
    // Weekly: only the catch-up (Sunday 03:00 fell in the outage).
    assert_eq!(by_job("weekly-verify").len(), 1);
    // Not persistent: no catch-up; first run after boot at the next :30.
    let half = by_job("half-past");
    let first_after = half.iter().find(|r| r.start >= up).unwrap();
    assert_eq!(first_after.elapse, ts("2026-03-30T02:30:00Z"));

    // Retention of the hourly snapshots against a reference that groups by formatted keys.
    let items: Vec<Item> = hourly
        .iter()
        .map(|r| Item {
            name: r.start.to_string(),
            time: r.start,
            protected: false,
        })
        .collect();
    let keep = Keep {
        last: 3,
        hourly: 24,
        daily: 7,
        weekly: 4,
        monthly: 2,
        yearly: 1,
    };
    let got: BTreeSet<String> = apply_retention(&items, &keep, &tz)
        .into_iter()
        .filter(|v| v.keep())
        .map(|v| v.name)
        .collect();
    let mut sorted: Vec<&Item> = items.iter().collect();
    sorted.sort_by_key(|i| std::cmp::Reverse(i.time));
    let mut want: BTreeSet<String> = sorted.iter().take(3).map(|i| i.name.clone()).collect();
    for (fmt, n) in [
        ("%Y-%m-%d %H", 24),
        ("%Y-%m-%d", 7),
        ("%G-W%V", 4),
        ("%Y-%m", 2),
        ("%Y", 1),
    ] {
        let mut seen: Vec<String> = Vec::new();
        for i in &sorted {
            let key = i.time.to_zoned(tz.clone()).strftime(fmt).to_string();
            if !seen.contains(&key) && seen.len() < n {
                seen.push(key);
                want.insert(i.name.clone());
            }
        }
    }
    assert_eq!(got, want);
}

#[test]
fn a_manual_run_does_not_move_the_schedule_and_never_overlaps() {
    let mut s = Scheduler::new(TimeZone::UTC);
    let t0 = ts("2026-12-01T10:10:00Z");
    s.add("j", spec("hourly", true, 0), JobState::default(), t0);
    let r = s.run_now("j", t0).unwrap();
    assert!(r.manual);
    assert!(
        s.run_now("j", t0).is_err(),
        "a second manual run while running"
    );
    assert!(s.poll(ts("2026-12-01T10:30:00Z")).is_empty());
    s.finished(
        "j",
        ts("2026-12-01T10:40:00Z"),
        Outcome::Failed { error: "x".into() },
    )
    .unwrap();
    assert_eq!(s.next_wakeup(), Some(ts("2026-12-01T11:00:00Z")));
    let st = s.jobs()[0].state.clone();
    assert_eq!((st.runs, st.failures, st.last_elapse), (1, 1, None));
    // A manual run spanning an elapse: the elapse is skipped, not made up afterwards.
    s.run_now("j", ts("2026-12-01T10:50:00Z")).unwrap();
    s.finished("j", ts("2026-12-01T11:20:00Z"), Outcome::Ok)
        .unwrap();
    assert_eq!(s.next_wakeup(), Some(ts("2026-12-01T12:00:00Z")));
}

/// A field list of one of the forms the parser accepts, with its members (`*` and `A/S`
/// run to `max`, the field's real end; other values stay in `lo..=hi`).
fn field(lo: i64, hi: i64, max: i64) -> impl Strategy<Value = (String, BTreeSet<i64>)> {
    prop_oneof![
        Just(("*".to_string(), (lo..=max).collect())),
        (lo..=hi).prop_map(|a| (a.to_string(), BTreeSet::from([a]))),
        (lo..=hi, lo..=hi).prop_map(|(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            (format!("{a}..{b}"), (a..=b).collect())
        }),
        (lo..=hi, 1..10i64).prop_map(move |(a, s)| {
            (format!("{a}/{s}"), (a..=max).step_by(s as usize).collect())
        }),
        (lo..=hi, lo..=hi).prop_map(|(a, b)| (format!("{a},{b}"), BTreeSet::from([a, b]))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    /// next_after agrees with a minute-by-minute search (UTC, any month, so a match is
    /// always within ~40 days unless the day list is impossible for the month).
    #[test]
    fn next_after_matches_a_brute_force_search(
        wd in 1u8..128,
        days in field(1, 28, 31),
        hours in field(0, 23, 23),
        minutes in field(0, 59, 59),
        start in 1_767_225_600i64..1_798_761_600, // 2026
    ) {
        let names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        let wds: Vec<&str> = (0..7).filter(|i| wd & (1 << i) != 0).map(|i| names[i]).collect();
        let expr = format!("{} *-*-{} {}:{}", wds.join(","), days.0, hours.0, minutes.0);
        let ev = CalendarEvent::parse(&expr).unwrap();
        let after = Timestamp::from_second(start).unwrap();
        let got = ev.next_after(after, &TimeZone::UTC).unwrap();
        let mut t = Timestamp::from_second(start - start.rem_euclid(60) + 60).unwrap();
        let want = loop {
            let dt = TimeZone::UTC.to_datetime(t);
            let w = dt.weekday().to_monday_zero_offset();
            if wd & (1 << w) != 0
                && days.1.contains(&i64::from(dt.day()))
                && hours.1.contains(&i64::from(dt.hour()))
                && minutes.1.contains(&i64::from(dt.minute()))
            {
                break t;
            }
            t = t.checked_add(1.minute()).unwrap();
        };
        prop_assert_eq!(got, want, "{}", expr);
    }
}
