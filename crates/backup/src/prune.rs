//! `backup prune`: retention policies over the backups of each volume, newest first, with
//! the usual meaning (as in restic or borg): keep the N newest; and for the N most recent
//! days / weeks / months that have backups, the newest backup of each. A backup kept by
//! any rule stays. Times are the snapshots' creation times, in UTC.

use std::collections::{BTreeMap, HashSet};

use crate::catalog::{self, Catalogs};
use crate::error::{BackupError, Result};
use crate::hold;
use crate::manifest::{self, Header};
use crate::repo::Repository;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// (year, month, day) of a day number since 1970-01-01 (Howard Hinnant's civil_from_days).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn year_month(days: i64) -> (i64, u32) {
    let (y, m, _) = civil_from_days(days);
    (y, m)
}

/// A backup's day, week or month number.
type BucketFn = fn(&Header) -> i64;

fn day(h: &Header) -> i64 {
    (h.created / 86_400) as i64
}

/// Weeks start on Monday; 1970-01-01 was a Thursday.
fn week(h: &Header) -> i64 {
    (day(h) + 3).div_euclid(7)
}

fn month(h: &Header) -> i64 {
    let (y, m) = year_month(day(h));
    y * 12 + i64::from(m)
}

/// Ids of the backups `policy` keeps among `headers`.
pub fn select(headers: &[Header], policy: &Policy) -> HashSet<String> {
    let mut groups: BTreeMap<(&str, &str), Vec<&Header>> = BTreeMap::new();
    for h in headers {
        groups
            .entry((h.pool.as_str(), h.volume.as_str()))
            .or_default()
            .push(h);
    }
    let mut keep = HashSet::new();
    for (_, mut hs) in groups {
        // Newest first; snapshot ids grow within a pool, so they order snapshots taken in
        // the same second.
        hs.sort_by(|a, b| {
            (b.created, b.snapshot_id, b.backed_up, &b.id).cmp(&(
                a.created,
                a.snapshot_id,
                a.backed_up,
                &a.id,
            ))
        });
        for h in hs.iter().take(policy.keep_last as usize) {
            keep.insert(h.id.clone());
        }
        let rules: [(u32, BucketFn); 3] = [
            (policy.keep_daily, day),
            (policy.keep_weekly, week),
            (policy.keep_monthly, month),
        ];
        for (n, bucket) in rules {
            let mut seen = HashSet::new();
            for h in &hs {
                if seen.len() >= n as usize {
                    break;
                }
                if seen.insert(bucket(h)) {
                    keep.insert(h.id.clone());
                }
            }
        }
    }
    keep
}

/// Whose backups a prune may remove.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// A pool uuid or the host name of a pool's backups.
    pub from: Option<String>,
    /// Every pool (the same policy for all hosts).
    pub all_pools: bool,
}

impl Scope {
    /// The pools in scope. Without `from` or `all_pools`, a repository holding several
    /// pools' backups is refused: hosts with different retention must not prune each
    /// other's backups.
    pub fn pools(&self, catalogs: &Catalogs) -> Result<HashSet<String>> {
        if let Some(f) = &self.from {
            let p = catalogs.pools_named(f);
            if p.is_empty() {
                return Err(BackupError::invalid(
                    format!("--from {f}"),
                    "names no pool or host that has backups in this repository",
                ));
            }
            return Ok(p.into_iter().map(str::to_string).collect());
        }
        if self.all_pools || catalogs.pools.len() <= 1 {
            return Ok(catalogs.pools.keys().cloned().collect());
        }
        Err(BackupError::invalid(
            "prune",
            format!(
                "the repository holds backups of {} pools ({}); prune one with --from HOST|POOL, or all with --all-pools (one policy for every host)",
                catalogs.pools.len(),
                catalogs
                    .pools
                    .keys()
                    .map(|p| format!("{p} on {}", catalogs.host_of(p)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub kept: Vec<String>,
    pub removed: Vec<String>,
    /// Backups the policy would remove but a lazy restore holds (crate::hold), each with
    /// who holds it.
    pub held: Vec<String>,
}

/// What `forget` does with a backup an unfinished lazy restore holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHold {
    /// Fail, naming the restore (an admin's `backup forget`).
    Refuse,
    /// Keep it and go on (retention).
    Skip,
    /// Remove it anyway (`--force`): the restore can then not be resumed.
    Ignore,
}

/// The live holds by backup id: "held by ..." for each.
fn holds_by_backup(repo: &Repository) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for h in hold::live(repo)? {
        out.entry(h.backup.clone()).or_insert_with(|| h.describe());
    }
    Ok(out)
}

/// Removes the backups `policy` does not keep: first from their pool's catalog (the commit
/// point: from then on they do not exist), then their headers and tables. Chunks go with
/// `gc`.
pub fn run(repo: &Repository, policy: &Policy, scope: &Scope, dry_run: bool) -> Result<Outcome> {
    if policy.is_empty() {
        return Err(BackupError::invalid(
            "prune",
            "no --keep-* rule given (refusing to remove every backup)",
        ));
    }
    let catalogs = Catalogs::load(repo)?;
    let pools = scope.pools(&catalogs)?;
    let headers: Vec<Header> = catalogs
        .headers()
        .into_iter()
        .filter(|h| pools.contains(&h.pool))
        .collect();
    let keep = select(&headers, policy);
    let held = holds_by_backup(repo)?;
    let mut out = Outcome {
        kept: Vec::new(),
        removed: Vec::new(),
        held: Vec::new(),
    };
    let mut remove: BTreeMap<&str, Vec<&Header>> = BTreeMap::new();
    for h in &headers {
        let label = format!("{} ({})", h.name(), h.id);
        if keep.contains(&h.id) {
            out.kept.push(label);
        } else if let Some(by) = held.get(&h.id) {
            out.held.push(format!("{label}: held by {by}"));
            out.kept.push(label);
        } else {
            remove.entry(&h.pool).or_default().push(h);
            out.removed.push(label);
        }
    }
    if !dry_run {
        for (pool, hs) in remove {
            for (h, by) in remove_listed(repo, pool, &hs)? {
                let label = format!("{} ({})", h.name(), h.id);
                out.removed.retain(|l| *l != label);
                out.held.push(format!("{label}: held by {by}"));
                out.kept.push(label);
            }
        }
        // Holds of abandoned restores lapse; their objects go with the prune that sees it.
        for h in hold::delete_lapsed(repo)? {
            log::info!(
                "{}: deleted the lapsed hold of {}",
                repo.describe(),
                h.describe()
            );
        }
    }
    Ok(out)
}

/// Drops the backups `hs` of `pool` from its catalog, then deletes their objects — except
/// those a hold placed meanwhile names: those are listed again (a restore that read the
/// catalog before our commit placed its hold before that read, so this second listing of
/// the holds sees it). Returns the backups put back, with their holders.
fn remove_listed<'a>(
    repo: &Repository,
    pool: &str,
    hs: &[&'a Header],
) -> Result<Vec<(&'a Header, String)>> {
    let ids: HashSet<&str> = hs.iter().map(|h| h.id.as_str()).collect();
    catalog::update(repo, pool, catalog::Change::Remove(&ids))?;
    let held = match holds_by_backup(repo) {
        Ok(h) => h,
        Err(e) => {
            // Unknown whether a restore placed a hold meanwhile: put every one back.
            let all: Vec<Header> = hs.iter().map(|h| (*h).clone()).collect();
            if let Err(r) = catalog::update(repo, pool, catalog::Change::Reinstate(&all)) {
                log::warn!(
                    "prune: putting back {} backups of pool {pool}: {r}",
                    all.len()
                );
            }
            return Err(e);
        }
    };
    let back: Vec<(&Header, String)> = hs
        .iter()
        .filter_map(|h| held.get(&h.id).map(|by| (*h, by.clone())))
        .collect();
    if !back.is_empty() {
        let headers: Vec<Header> = back.iter().map(|(h, _)| (*h).clone()).collect();
        catalog::update(repo, pool, catalog::Change::Reinstate(&headers))?;
    }
    for h in hs {
        if !held.contains_key(&h.id) {
            manifest::delete(repo, h)?;
        }
    }
    Ok(back)
}

/// `backup forget`: removes the named backups (`vol@snap` = the newest of that name, or a
/// manifest id; from the pool or host `from` names, needed when several pools have one of
/// that name), e.g. one whose objects were lost. Returns their labels.
pub fn forget(
    repo: &Repository,
    names: &[String],
    from: Option<&str>,
    on_hold: OnHold,
) -> Result<Vec<Header>> {
    let catalogs = Catalogs::load(repo)?;
    let chosen: Vec<Header> = names
        .iter()
        .map(|n| catalogs.choose(n, None, from))
        .collect::<Result<_>>()?;
    let held = match on_hold {
        OnHold::Ignore => BTreeMap::new(),
        _ => holds_by_backup(repo)?,
    };
    let mut remove: BTreeMap<&str, Vec<&Header>> = BTreeMap::new();
    let mut out = Vec::new();
    for h in &chosen {
        if let Some(by) = held.get(&h.id) {
            if on_hold == OnHold::Refuse {
                return Err(BackupError::Busy(format!(
                    "backup {} ({}) is held by {by}: resume that restore to its end, or pass --force (the restore can then not be resumed)",
                    h.name(),
                    h.id
                )));
            }
            log::info!("keeping {} ({}): held by {by}", h.name(), h.id);
            continue;
        }
        let ids = remove.entry(&h.pool).or_default();
        if !ids.iter().any(|x| x.id == h.id) {
            ids.push(h);
            out.push(h.clone());
        }
    }
    for (pool, hs) in remove {
        if on_hold == OnHold::Ignore {
            let ids: HashSet<&str> = hs.iter().map(|h| h.id.as_str()).collect();
            catalog::update(repo, pool, catalog::Change::Remove(&ids))?;
            for h in hs {
                manifest::delete(repo, h)?;
            }
            continue;
        }
        for (h, by) in remove_listed(repo, pool, &hs)? {
            out.retain(|x| x.id != h.id);
            log::info!(
                "kept {} ({}): a hold appeared meanwhile ({by})",
                h.name(),
                h.id
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(id: &str, vol: &str, created: u64) -> Header {
        Header {
            id: id.into(),
            volume: vol.into(),
            snapshot: id.into(),
            snapshot_id: 0,
            pool: "p".into(),
            created,
            backed_up: created,
            size: 0,
            chunk_size: 65536,
            cells: 0,
            stored_bytes: 0,
            digest: String::new(),
            base: None,
            stats: Default::default(),
            host: String::new(),
            framed: false,
        }
    }

    #[test]
    fn calendar() {
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(31), (1970, 2));
        assert_eq!(year_month(20_454), (2026, 1)); // 2026-01-01
        assert_eq!(year_month(20_513), (2026, 3)); // 2026-03-01
    }

    #[test]
    fn policies() {
        let d = 86_400;
        // Two backups a day for 10 days, on two volumes.
        let mut hs = Vec::new();
        for day in 0..10u64 {
            for k in 0..2u64 {
                hs.push(h(
                    &format!("a{day}-{k}"),
                    "a",
                    20_454 * d + day * d + k * 3600,
                ));
                hs.push(h(
                    &format!("b{day}-{k}"),
                    "b",
                    20_454 * d + day * d + k * 3600,
                ));
            }
        }
        let last = select(
            &hs,
            &Policy {
                keep_last: 3,
                ..Default::default()
            },
        );
        assert_eq!(last.len(), 6);
        assert!(last.contains("a9-1") && last.contains("a9-0") && last.contains("a8-1"));
        let daily = select(
            &hs,
            &Policy {
                keep_daily: 4,
                ..Default::default()
            },
        );
        let mut a: Vec<_> = daily
            .iter()
            .filter(|s| s.starts_with('a'))
            .cloned()
            .collect();
        a.sort();
        assert_eq!(a, ["a6-1", "a7-1", "a8-1", "a9-1"]);
        let monthly = select(
            &hs,
            &Policy {
                keep_monthly: 5,
                ..Default::default()
            },
        );
        assert_eq!(monthly.len(), 2, "one month of backups per volume");
        let both = select(
            &hs,
            &Policy {
                keep_last: 1,
                keep_weekly: 2,
                ..Default::default()
            },
        );
        // 2026-01-01 is a Thursday: days 0-3 in one week, 4-9 in the next.
        assert!(both.contains("a3-1") && both.contains("a9-1") && both.len() == 4);
    }
}
