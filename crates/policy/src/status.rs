//! The 3-2-1 report (`snapblk status`): per volume, how many copies of its data exist, on
//! how many kinds of media, whether one is off site, and whether each backup target is
//! within its recovery point objective.
//!
//! What counts (computed from what the jobs recorded, so it costs no repository request
//! and answers while a repository is unreachable — `backup verify` is the deep check):
//! * a **copy** is the live volume, or a repository one of the volume's policies backs up
//!   to whose newest backup of the volume (the backup job's recorded base) is within the
//!   target's RPO and whose last scheduled verify, if any, did not fail;
//! * a **medium** is a device: the pool's (its metadata and data devices count as one) or
//!   a repository's (a `file://` repository on the pool's own device is no second medium;
//!   the daemon resolves partitions to their disk); an S3 repository is its own medium and
//!   **off site**;
//! * the verdict: `violated` if a target has no backup within its RPO or its repository's
//!   last verify failed; else `at_risk` if there are fewer than 3 copies, fewer than 2
//!   media, no off-site copy, the volume has no policy, or its snapshot job's last run
//!   failed; else `compliant`. Exit codes 0/1/2 follow (as sanoid's `--monitor-*`).

use std::collections::BTreeSet;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Where a repository's data lives, as the daemon resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Medium {
    /// The device (`disk 8:0`), or the object store (`s3 BUCKET`).
    pub id: String,
    pub off_site: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Compliant,
    AtRisk,
    Violated,
}

impl Verdict {
    /// The monitoring exit code: 0 ok, 1 warning, 2 critical.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Compliant => 0,
            Verdict::AtRisk => 1,
            Verdict::Violated => 2,
        }
    }
}

/// One backup target of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub policy: String,
    pub repository: String,
    pub url: String,
    /// The newest snapshot whose data the repository holds (backed up, or unchanged
    /// since) and when it was taken.
    pub newest: Option<String>,
    pub newest_time: Option<Timestamp>,
    pub age_secs: Option<u64>,
    pub rpo_secs: u64,
    pub within_rpo: bool,
    pub medium: Medium,
    /// On a device holding the pool: not a second medium.
    pub same_medium_as_pool: bool,
    /// The repository's last scheduled verify: when it ended and whether it passed.
    pub last_verify: Option<Timestamp>,
    pub verify_ok: Option<bool>,
    /// The backup job's last error, if its last run failed.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub volume: String,
    pub policies: Vec<String>,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub copies: u32,
    pub media: u32,
    pub off_site: bool,
    pub targets: Vec<TargetStatus>,
}

/// Counts copies and media of one volume and decides its verdict. `snapshot_errors`: the
/// last failures of its policies' snapshot jobs.
pub fn assess(
    volume: &str,
    policies: Vec<String>,
    targets: Vec<TargetStatus>,
    snapshot_errors: &[String],
) -> VolumeStatus {
    let mut reasons = Vec::new();
    let mut violated = false;
    if policies.is_empty() {
        reasons.push("no protection policy covers it".to_string());
    }
    for e in snapshot_errors {
        reasons.push(format!("the last snapshot run failed: {e}"));
    }
    // A repository named by two policies is one copy.
    let mut good: BTreeSet<&str> = BTreeSet::new();
    let mut media: BTreeSet<&str> = BTreeSet::new();
    let mut off_site = false;
    for t in &targets {
        let verified = t.verify_ok != Some(false);
        if !t.within_rpo {
            violated = true;
            reasons.push(match (&t.newest, t.age_secs) {
                (Some(n), Some(age)) => format!(
                    "{}: newest backup {n} is {} old, over its RPO of {}{}",
                    t.repository,
                    span(age),
                    span(t.rpo_secs),
                    t.last_error
                        .as_deref()
                        .map(|e| format!(" (last run: {e})"))
                        .unwrap_or_default()
                ),
                _ => format!(
                    "{}: never backed up{}",
                    t.repository,
                    t.last_error
                        .as_deref()
                        .map(|e| format!(" (last run: {e})"))
                        .unwrap_or_default()
                ),
            });
        }
        if !verified {
            violated = true;
            reasons.push(format!("{}: its last verify failed", t.repository));
        }
        if t.within_rpo && verified {
            good.insert(&t.repository);
            if !t.same_medium_as_pool {
                media.insert(&t.medium.id);
            }
            off_site |= t.medium.off_site;
        }
    }
    let copies = 1 + good.len() as u32;
    let n_media = 1 + media.len() as u32;
    if copies < 3 {
        let noun = if copies == 1 { "copy" } else { "copies" };
        reasons.push(format!("{copies} {noun} (3 wanted)"));
    }
    if n_media < 2 {
        reasons.push(format!("{n_media} medium (2 wanted)"));
        for t in targets.iter().filter(|t| t.same_medium_as_pool) {
            reasons.push(format!(
                "{} is on the pool's own device: not a second medium",
                t.repository
            ));
        }
    }
    if !off_site {
        reasons.push("no off-site copy".into());
    }
    let verdict = if violated {
        Verdict::Violated
    } else if reasons.is_empty() {
        Verdict::Compliant
    } else {
        Verdict::AtRisk
    };
    VolumeStatus {
        volume: volume.to_string(),
        policies,
        verdict,
        reasons,
        copies,
        media: n_media,
        off_site,
        targets,
    }
}

/// `90061` -> `1d 1h 1m` (largest two units).
pub fn span(secs: u64) -> String {
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut left = secs;
    for (n, u) in units {
        if left >= n && parts.len() < 2 {
            parts.push(format!("{}{u}", left / n));
            left %= n;
        } else if !parts.is_empty() {
            break;
        }
    }
    if parts.is_empty() {
        "0s".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(repo: &str, fresh: bool, medium: &str, off: bool, same: bool) -> TargetStatus {
        TargetStatus {
            policy: "p".into(),
            repository: repo.into(),
            url: String::new(),
            newest: Some("p-20261201-000000".into()),
            newest_time: None,
            age_secs: Some(if fresh { 60 } else { 7200 }),
            rpo_secs: 3600,
            within_rpo: fresh,
            medium: Medium {
                id: medium.into(),
                off_site: off,
            },
            same_medium_as_pool: same,
            last_verify: None,
            verify_ok: None,
            last_error: None,
        }
    }

    #[test]
    fn three_two_one() {
        let p = || vec!["p".to_string()];
        let ok = assess(
            "v",
            p(),
            vec![
                target("usb", true, "disk 8:16", false, false),
                target("s3", true, "s3 b", true, false),
            ],
            &[],
        );
        assert_eq!(
            (ok.verdict, ok.copies, ok.media),
            (Verdict::Compliant, 3, 3)
        );
        // A repository on the pool's disk is a copy but not a medium.
        let same = assess(
            "v",
            p(),
            vec![
                target("local", true, "disk 8:0", false, true),
                target("s3", true, "s3 b", true, false),
            ],
            &[],
        );
        assert_eq!(
            (same.verdict, same.copies, same.media),
            (Verdict::Compliant, 3, 2)
        );
        let same = assess(
            "v",
            p(),
            vec![
                target("local", true, "disk 8:0", false, true),
                target("local2", true, "disk 8:0", false, true),
            ],
            &[],
        );
        assert_eq!(same.verdict, Verdict::AtRisk);
        assert!(same.reasons.iter().any(|r| r.contains("1 medium")));
        assert!(same
            .reasons
            .iter()
            .any(|r| r.contains("local is on the pool's own device")));
        assert!(same.reasons.iter().any(|r| r.contains("no off-site")));
        // Past the RPO: violated, saying by how much.
        let late = assess(
            "v",
            p(),
            vec![
                target("usb", true, "disk 8:16", false, false),
                target("s3", false, "s3 b", true, false),
            ],
            &[],
        );
        assert_eq!((late.verdict, late.copies), (Verdict::Violated, 2));
        assert!(
            late.reasons
                .iter()
                .any(|r| r.contains("s3: newest backup") && r.contains("2h")),
            "{:?}",
            late.reasons
        );
        // A failed verify does not count as a copy.
        let mut t = target("s3", true, "s3 b", true, false);
        t.verify_ok = Some(false);
        let bad = assess("v", p(), vec![t], &[]);
        assert_eq!((bad.verdict, bad.copies), (Verdict::Violated, 1));
        let none = assess("v", Vec::new(), Vec::new(), &[]);
        assert_eq!(none.verdict, Verdict::AtRisk);
        assert_eq!(Verdict::Violated.exit_code(), 2);
        assert_eq!(span(90_061), "1d 1h");
        assert_eq!(span(59), "59s");
    }
}
