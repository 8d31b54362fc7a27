//! Keeping what the jobs recorded true when backups are removed by hand. The 3-2-1 report
//! reads only what backup and copy jobs recorded (`covered`: per volume, the newest
//! snapshot whose data a repository holds); `snapblk backup forget` or `backup prune` run
//! by hand remove backups behind the jobs' backs. The CLI then tells the daemon
//! (`backups_changed`), which lists this pool's backups in that repository (one catalog
//! read) and corrects every record that named a backup no longer there.

use super::{parse_job, repo_of, JobName, Manager, PolicyPool};
use crate::backups::BackupItem;
use crate::policy::parse_snapshot_name;

impl<P: PolicyPool> Manager<P> {
    /// This pool's backups in registered repository `repo` are now `items`: a volume
    /// whose recorded coverage (and the backup it was found unchanged against) is gone
    /// falls back to its newest remaining backup the job could have made (for a backup
    /// job, named by its policy), or to none. Returns the jobs whose records changed.
    pub fn backups_changed(
        &mut self,
        repo: &str,
        items: &[BackupItem],
    ) -> Result<Vec<String>, String> {
        let jobs = self.jobs_where(|j| {
            repo_of(j) == Some(repo)
                && matches!(parse_job(j), Some(JobName::Backup(..) | JobName::Copy(_)))
        });
        let mut changed = Vec::new();
        for job in jobs {
            let prefix: Option<String> = match parse_job(&job) {
                Some(JobName::Backup(p, _)) => self
                    .policies
                    .get(p)
                    .and_then(|p| p.snapshots.as_ref())
                    .map(|r| r.prefix.clone()),
                _ => None,
            };
            let held =
                |vol: &str, snap: &str| items.iter().any(|b| b.volume == vol && b.snapshot == snap);
            let newest = |vol: &str| -> Option<String> {
                items
                    .iter()
                    .filter(|b| b.volume == vol)
                    .filter(|b| {
                        prefix
                            .as_deref()
                            .is_none_or(|p| parse_snapshot_name(p, &b.snapshot).is_some())
                    })
                    .max_by_key(|b| (b.created, b.snapshot.clone()))
                    .map(|b| b.snapshot.clone())
            };
            let mut covered = self.covered.get(&job).cloned().unwrap_or_default();
            let mut bases = self.bases.get(&job).cloned().unwrap_or_default();
            let mut touched = false;
            for (vol, snap) in covered.clone() {
                let base = bases.get(&vol).cloned();
                if held(&vol, &snap) || base.as_deref().is_some_and(|b| held(&vol, b)) {
                    continue;
                }
                touched = true;
                match newest(&vol) {
                    Some(n) => {
                        covered.insert(vol.clone(), n.clone());
                        if base.is_some() {
                            bases.insert(vol, n);
                        }
                    }
                    None => {
                        covered.remove(&vol);
                        bases.remove(&vol);
                    }
                }
            }
            if !touched {
                continue;
            }
            self.covered.insert(job.clone(), covered);
            self.bases.insert(job.clone(), bases);
            let state = self
                .sched
                .jobs()
                .into_iter()
                .find(|v| v.name == job)
                .map(|v| v.state)
                .unwrap_or_default();
            self.save(&job, state)?;
            changed.push(job);
        }
        Ok(changed)
    }

    /// The registered repositories stored at `url`.
    pub fn repos_at(&self, url: &str) -> Vec<String> {
        self.repos
            .iter()
            .filter(|(_, r)| r.url.trim_end_matches('/') == url.trim_end_matches('/'))
            .map(|(n, _)| n.clone())
            .collect()
    }
}
