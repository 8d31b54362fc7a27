//! A protection policy as the admin writes it (`snapblk policy set`, stored with the pool)
//! and the names of the snapshots it takes.
//!
//! A policy has local snapshots (a schedule, a retention, the volumes it applies to) and
//! backup targets (crate::backups: each a registered repository, a schedule, a retention).
//! Snapshots a policy takes are named `PREFIX-YYYYMMDD-HHMMSS` (UTC, so names sort by time
//! and are the same whatever the host's zone); the prefix is the policy's name unless given,
//! and no two policies covering one volume may share it. Retention only ever considers
//! snapshots with that exact shape of name on the policy's volumes, so snapshots taken by
//! hand or by another policy are never deleted by it (sanoid's `autosnap_` rule).

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::backups::BackupRule;
use crate::calendar::CalendarEvent;
use crate::retention::Keep;

/// Most volumes one policy may name.
pub const MAX_VOLUMES: usize = 1024;
/// Most backup targets of one policy.
pub const MAX_TARGETS: usize = 16;

/// A policy's local snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRule {
    pub schedule: CalendarEvent,
    #[serde(default)]
    pub keep: Keep,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Catch up once after downtime (systemd's `Persistent=`).
    #[serde(default = "yes")]
    pub persistent: bool,
    #[serde(default)]
    pub random_delay_secs: u32,
    #[serde(default)]
    pub hooks: Hooks,
}

/// What a failing pre hook does to the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPreFailure {
    /// No snapshot is taken; the run fails.
    #[default]
    Abort,
    /// Snapshots are taken anyway (crash-consistent, as AWS DLM allows); the run says so.
    Continue,
}

/// Commands run around a policy's snapshots (e.g. quiesce a database, then resume it).
/// Each is an argv (no shell), run with `SNAPBLK_POLICY`, `SNAPBLK_PHASE` (pre/post),
/// `SNAPBLK_SNAPSHOT` (the name being taken) and `SNAPBLK_VOLUMES` in its environment, and
/// killed after `timeout_secs`. The post hook runs whenever the pre hook ran (or there is
/// none), even if a snapshot failed, so what the pre hook paused is resumed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hooks {
    pub pre: Vec<String>,
    pub post: Vec<String>,
    /// Seconds each hook may run (0: 60).
    pub timeout_secs: u32,
    pub on_pre_failure: OnPreFailure,
}

impl Hooks {
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(if self.timeout_secs == 0 {
            60
        } else {
            self.timeout_secs
        }))
    }
}

/// Empty: [`crate::Manager::set_policy`] makes it the policy's name.
fn default_prefix() -> String {
    String::new()
}
fn yes() -> bool {
    true
}

/// A protection policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Consistency groups: each is snapshotted as one cut (all members in one commit).
    #[serde(default)]
    pub groups: Vec<String>,
    pub snapshots: Option<SnapshotRule>,
    /// The IANA time zone its schedules and retention periods are read in (e.g.
    /// `Europe/Berlin`; None: the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Where its snapshots are backed up, each target on its own schedule and retention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<BackupRule>,
}

impl Policy {
    /// Checks what the pool cannot: bounds, names, the prefix's shape.
    pub fn validate(&self) -> Result<(), String> {
        if self.volumes.is_empty() && self.groups.is_empty() {
            return Err("a policy needs at least one volume or group".into());
        }
        if self.volumes.len() + self.groups.len() > MAX_VOLUMES {
            return Err(format!("more than {MAX_VOLUMES} volumes and groups"));
        }
        for v in &self.volumes {
            valid_name("volume", v)?;
        }
        for g in &self.groups {
            valid_name("group", g)?;
        }
        if let Some(s) = &self.snapshots {
            valid_name("snapshot prefix", &s.prefix)?;
            if s.prefix.len() > 64 {
                return Err("snapshot prefix longer than 64 bytes".into());
            }
            if s.random_delay_secs > 86_400 {
                return Err("random delay longer than a day".into());
            }
            if s.hooks.timeout_secs > 86_400 {
                return Err("hook timeout longer than a day".into());
            }
            for h in [&s.hooks.pre, &s.hooks.post] {
                if h.len() > 256 || h.iter().any(|a| a.len() > 4096 || a.contains('\0')) {
                    return Err("a hook's argv is too long or holds a NUL byte".into());
                }
                if h.first().is_some_and(|c| c.is_empty()) {
                    return Err("a hook's command is empty".into());
                }
            }
        } else {
            return Err("the policy does nothing: give it a snapshot schedule".into());
        }
        if let Some(z) = &self.timezone {
            if z.len() > 64 || jiff::tz::TimeZone::get(z).is_err() {
                return Err(format!(
                    "time zone {:?} is not known (an IANA name such as Europe/Berlin)",
                    z
                ));
            }
        }
        if self.backups.len() > MAX_TARGETS {
            return Err(format!("more than {MAX_TARGETS} backup targets"));
        }
        for (i, b) in self.backups.iter().enumerate() {
            b.validate()?;
            if self.backups[..i]
                .iter()
                .any(|o| o.repository == b.repository)
            {
                return Err(format!(
                    "two backup targets name repository '{}'",
                    b.repository
                ));
            }
        }
        Ok(())
    }
}

/// Policy, volume and prefix names: what the pool accepts in names (letters, digits, `.`,
/// `_`, `+`, `-`, starting with a letter or digit), at most 128 bytes.
pub fn valid_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} '{}': use 1-128 of letters, digits, '.', '_', '+', '-', starting with a letter or digit",
            s.escape_debug()
        ))
    }
}

/// The name of the snapshot a policy takes at `t`.
pub fn snapshot_name(prefix: &str, t: Timestamp) -> String {
    format!(
        "{prefix}-{}",
        t.to_zoned(TimeZone::UTC).strftime("%Y%m%d-%H%M%S")
    )
}

/// When a snapshot named by [`snapshot_name`] with `prefix` was taken; `None` for any other
/// name (so retention leaves it alone).
pub fn parse_snapshot_name(prefix: &str, name: &str) -> Option<Timestamp> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    // ASCII first: the slicing below is by byte.
    if !rest.is_ascii() || rest.len() != 15 || rest.as_bytes()[8] != b'-' {
        return None;
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let (d, t) = (&rest[..8], &rest[9..]);
    if !digits(d) || !digits(t) {
        return None;
    }
    let n = |s: &str| s.parse::<i16>().ok();
    let dt = DateTime::new(
        n(&d[..4])?,
        n(&d[4..6])? as i8,
        n(&d[6..8])? as i8,
        n(&t[..2])? as i8,
        n(&t[2..4])? as i8,
        n(&t[4..6])? as i8,
        0,
    )
    .ok()?;
    TimeZone::UTC.to_timestamp(dt).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_round_trip_and_others_are_ignored() {
        let t: Timestamp = "2026-12-01T14:05:09Z".parse().unwrap();
        let n = snapshot_name("auto", t);
        assert_eq!(n, "auto-20261201-140509");
        assert_eq!(parse_snapshot_name("auto", &n), Some(t));
        for other in [
            "auto-20261201-14050",
            "auto-20261301-140509",
            "auto-2026120x-140509",
            "autox-20261201-140509",
            "hourly-20261201-140509",
            "auto-20261201-140509-1",
            "auto-2026120é-14050",
            "manual",
        ] {
            assert_eq!(parse_snapshot_name("auto", other), None, "{other}");
        }
    }

    #[test]
    fn policies_are_validated() {
        let p: Policy = serde_json::from_str(
            r#"{"volumes":["vm1"],"snapshots":{"schedule":"hourly","keep":{"hourly":24}}}"#,
        )
        .unwrap();
        // No prefix given: empty until the manager makes it the policy's name.
        assert_eq!(p.snapshots.as_ref().unwrap().prefix, "");
        assert!(p.validate().is_err());
        let mut p = p;
        p.snapshots.as_mut().unwrap().prefix = "vm1-hourly".into();
        p.validate().unwrap();
        assert!(serde_json::from_str::<Policy>(
            r#"{"volumes":["a"],"snapshots":{"schedule":"bogus"}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Policy>(r#"{"volumes":["a"],"extra":1}"#).is_err());
        let mut q = p.clone();
        q.volumes = vec!["a@b".into()];
        assert!(q.validate().is_err());
        q.volumes.clear();
        assert!(q.validate().is_err());
    }
}
