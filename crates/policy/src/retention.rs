//! Retention: which snapshots (or backups) a policy keeps.
//!
//! The rules count as restic's `forget` does, and as Proxmox Backup Server names them:
//! `last` keeps the N newest; `hourly`, `daily`, `weekly`, `monthly`, `yearly` each keep the
//! newest item of each of the N most recent periods *that have an item* (periods without
//! one do not count), in the policy's time zone, weeks being ISO 8601 weeks (Monday first;
//! the week-based year, so 2026-12-31 is in week 53 of 2026 and 2027-01-04 in week 1 of
//! 2027). Rules are independent: an item is kept if any rule or its `protected` flag keeps
//! it, and every reason is reported, so `--dry-run` can say why. A policy with every count
//! at 0 keeps everything (no retention configured), never nothing.

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// How many of each kind a policy keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Keep {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Keep {
    pub fn is_empty(&self) -> bool {
        *self == Keep::default()
    }
}

/// Why an item is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Protected,
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    /// The policy keeps everything (all counts 0).
    NoRetention,
}

/// One snapshot or backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub time: Timestamp,
    pub protected: bool,
}

/// The decision for one item; `reasons` is empty for an item that goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub name: String,
    pub time: Timestamp,
    pub reasons: Vec<Reason>,
}

impl Verdict {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// The period of `t` for one rule, as a comparable key.
fn period(reason: Reason, t: Timestamp, tz: &TimeZone) -> (i32, i32, i32, i32) {
    let dt = tz.to_datetime(t);
    let (y, m, d, h) = (
        i32::from(dt.year()),
        i32::from(dt.month()),
        i32::from(dt.day()),
        i32::from(dt.hour()),
    );
    match reason {
        Reason::Hourly => (y, m, d, h),
        Reason::Daily => (y, m, d, 0),
        Reason::Weekly => {
            let w = dt.date().iso_week_date();
            (i32::from(w.year()), i32::from(w.week()), 0, 0)
        }
        Reason::Monthly => (y, m, 0, 0),
        Reason::Yearly => (y, 0, 0, 0),
        _ => (0, 0, 0, 0),
    }
}

/// Decides every item (any order in; verdicts newest first).
pub fn apply(items: &[Item], keep: &Keep, tz: &TimeZone) -> Vec<Verdict> {
    let mut order: Vec<&Item> = items.iter().collect();
    // Newest first; equal times by name so the result does not depend on the input order.
    order.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.name.cmp(&a.name)));
    let mut out: Vec<Verdict> = order
        .iter()
        .map(|i| Verdict {
            name: i.name.clone(),
            time: i.time,
            reasons: Vec::new(),
        })
        .collect();
    if keep.is_empty() {
        for v in &mut out {
            v.reasons.push(Reason::NoRetention);
        }
    }
    for (i, item) in order.iter().enumerate() {
        if item.protected {
            out[i].reasons.push(Reason::Protected);
        }
        if (i as u64) < u64::from(keep.last) {
            out[i].reasons.push(Reason::Last);
        }
    }
    for (reason, n) in [
        (Reason::Hourly, keep.hourly),
        (Reason::Daily, keep.daily),
        (Reason::Weekly, keep.weekly),
        (Reason::Monthly, keep.monthly),
        (Reason::Yearly, keep.yearly),
    ] {
        let mut kept = 0u32;
        let mut last = None;
        for (i, item) in order.iter().enumerate() {
            if kept >= n {
                break;
            }
            let p = period(reason, item.time, tz);
            if last != Some(p) {
                last = Some(p);
                out[i].reasons.push(reason);
                kept += 1;
            }
        }
    }
    for v in &mut out {
        v.reasons.sort();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, t: &str) -> Item {
        Item {
            name: name.into(),
            time: t.parse().unwrap(),
            protected: false,
        }
    }

    #[test]
    fn iso_weeks_cross_the_year() {
        let items = vec![
            item("a", "2026-12-28T10:00:00Z"), // Mon, 2026-W53
            item("b", "2027-01-03T10:00:00Z"), // Sun, 2026-W53 (same ISO week)
            item("c", "2027-01-04T10:00:00Z"), // Mon, 2027-W01
        ];
        let keep = Keep {
            weekly: 5,
            ..Keep::default()
        };
        let v = apply(&items, &keep, &TimeZone::UTC);
        let kept: Vec<&str> = v
            .iter()
            .filter(|v| v.keep())
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(kept, ["c", "b"]);
    }

    #[test]
    fn nothing_configured_keeps_everything_and_protected_always_stays() {
        let mut items = vec![
            item("a", "2026-01-01T00:00:00Z"),
            item("b", "2026-01-02T00:00:00Z"),
        ];
        assert!(apply(&items, &Keep::default(), &TimeZone::UTC)
            .iter()
            .all(|v| v.keep()));
        items[0].protected = true;
        let keep = Keep {
            last: 1,
            ..Keep::default()
        };
        let v = apply(&items, &keep, &TimeZone::UTC);
        assert_eq!(v[0].reasons, [Reason::Last]);
        assert_eq!(v[1].reasons, [Reason::Protected]);
    }

    #[test]
    fn periods_follow_the_time_zone() {
        // 23:30Z on the 1st is already the 2nd in Berlin: two days there, one in UTC.
        let items = vec![
            item("a", "2026-12-01T23:30:00Z"),
            item("b", "2026-12-01T12:00:00Z"),
        ];
        let keep = Keep {
            daily: 7,
            ..Keep::default()
        };
        assert_eq!(
            apply(&items, &keep, &TimeZone::UTC)
                .iter()
                .filter(|v| v.keep())
                .count(),
            1
        );
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        assert_eq!(
            apply(&items, &keep, &berlin)
                .iter()
                .filter(|v| v.keep())
                .count(),
            2
        );
    }
}
