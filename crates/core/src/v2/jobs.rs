//! Reclaim jobs (format2.md §3.4): `q`+seq items created in the batch of the operation that
//! makes data garbage, run by the engine's owner in small steps, one job at a time, in queue
//! order. Every step judges pieces against the lineage's *current* retained set, so a job
//! racing a new snapshot or a new clone cannot free what they keep; each step carries its
//! cursor and its frees in one batch and is idempotent when re-run after a crash.

use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use super::engine::{Group, Meta2, X_DEAD};
use super::ids::{Epoch, LineageId, PageNo};
use super::keys;
use super::read;
use crate::error::{Error, Result};
use crate::meta::{try_scan, BatchOp};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Re-judge the change-index entries of epochs `[lo, hi]`, from `cursor` on.
    Drop {
        lo: Epoch,
        hi: Epoch,
        cursor: (Epoch, PageNo),
    },
    /// Free everything of a closed lineage nothing retains, then release its base.
    Destroy,
}

impl JobKind {
    pub fn drop(lo: Epoch, hi: Epoch) -> JobKind {
        JobKind::Drop {
            lo,
            hi,
            cursor: (lo, PageNo(0)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    #[serde(skip)]
    pub seq: u64,
    pub lineage: LineageId,
    pub kind: JobKind,
}

impl Job {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("job serialises")
    }
    pub fn decode(seq: u64, v: &[u8]) -> Result<Job, String> {
        let mut j: Job = serde_json::from_slice(v).map_err(|e| format!("job {seq}: {e}"))?;
        j.seq = seq;
        Ok(j)
    }
    /// Whether this job will judge a piece of `lineage` found at change-index epoch `w`.
    pub fn covers(&self, lineage: LineageId, w: Epoch) -> bool {
        self.lineage == lineage
            && match self.kind {
                JobKind::Drop { lo, hi, .. } => lo <= w && w <= hi,
                JobKind::Destroy => true,
            }
    }
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

impl Meta2 {
    /// Runs one step (≤ `budget` pages or keys) of the oldest job into `g`; returns whether
    /// job work remains. The caller commits `g`.
    pub fn reclaim_step(&mut self, g: &mut Group, budget: usize) -> Result<bool> {
        let Some(job) = self.jobs.front().cloned() else {
            return Ok(false);
        };
        let done = match job.kind {
            JobKind::Drop { lo, hi, cursor } => self.drop_step(g, &job, lo, hi, cursor, budget),
            JobKind::Destroy => self.destroy_step(g, &job, budget),
        };
        let done = self.stop_on_error(done)?;
        if done {
            self.jobs.pop_front();
            g.jobs_done(job.seq);
        }
        g.set_durable();
        Ok(!self.jobs.is_empty())
    }

    fn drop_step(
        &mut self,
        g: &mut Group,
        job: &Job,
        lo: Epoch,
        hi: Epoch,
        cursor: (Epoch, PageNo),
        budget: usize,
    ) -> Result<bool> {
        let l = job.lineage;
        let Ok(lin) = self.lineage(l).cloned() else {
            return Ok(true);
        };
        let mut entries = Vec::new();
        let (a, b) = keys::index_range(l, cursor.0, cursor.1, hi);
        try_scan(&**self.store(), &a, &b, |k, v| {
            let [_, w, p] = keys::fields::<3>(k, keys::K_INDEX)
                .ok_or_else(|| corrupt(format!("index key {}", read::hex(k))))?;
            let flags = *v
                .first()
                .ok_or_else(|| corrupt(format!("index key {} empty", read::hex(k))))?;
            entries.push((Epoch(w), PageNo(p), flags));
            Ok::<_, Error>(if entries.len() >= budget {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
        let r = lin.retained.clone();
        for &(w, p, f) in &entries {
            let mut flags = f;
            if f & X_DEAD != 0 {
                let d = self.dead_mut(g, l, p, w)?;
                let rec = d.value.take();
                d.dirty = true;
                let mut kept = Vec::new();
                for piece in rec.map(|r| r.pieces).unwrap_or_default() {
                    if r.any_in(piece.birth, w) {
                        kept.push(piece);
                    } else {
                        self.free_piece(g, &piece)?;
                    }
                }
                let d = self.dead_mut(g, l, p, w)?;
                if kept.is_empty() {
                    flags &= !X_DEAD;
                } else {
                    d.value = Some(super::page::DeadRecord { pieces: kept });
                }
            }
            if let Some(ec) = lin.closed {
                let c = self.page_mut(g, l, p)?;
                if let Some(mut page) = c.value.take() {
                    let (kept, garbage): (Vec<_>, Vec<_>) =
                        page.pieces.into_iter().partition(|x| r.any_in(x.birth, ec));
                    let changed = !garbage.is_empty();
                    page.pieces = kept;
                    let keep = !page.pieces.is_empty() || lin.base.is_some();
                    let c = self.page_mut(g, l, p)?;
                    c.value = keep.then_some(page);
                    c.dirty |= changed || !keep;
                    for x in &garbage {
                        self.free_piece(g, x)?;
                    }
                }
            }
            if r.min().is_none_or(|m| w <= m) {
                Meta2::set_index(g, l, w, p, None);
            } else if flags != f {
                Meta2::set_index(g, l, w, p, Some(flags));
            }
        }
        if entries.len() < budget {
            return Ok(true);
        }
        let &(w, p, _) = entries.last().expect("budget > 0");
        let next = match p.0.checked_add(1) {
            Some(n) => (w, PageNo(n)),
            None => (w.next(), PageNo(0)),
        };
        let updated = Job {
            kind: JobKind::Drop {
                lo,
                hi,
                cursor: next,
            },
            ..job.clone()
        };
        g.job_update(job.seq, updated.encode());
        if let Some(front) = self.jobs.front_mut() {
            *front = updated;
        }
        Ok(false)
    }

    fn destroy_step(&mut self, g: &mut Group, job: &Job, budget: usize) -> Result<bool> {
        let l = job.lineage;
        let Ok(lin) = self.lineage(l).cloned() else {
            return Ok(true);
        };
        if lin.closed.is_none() || !lin.retained.is_empty() {
            return Err(corrupt(format!(
                "destroy of lineage {l}, which is open or retained"
            )));
        }
        // Live pages, then dead records: each owned block is in exactly one (I1).
        let mut found = 0;
        for (a, b) in [keys::all_pages(l), keys::deads(l)] {
            let mut batch = Vec::new();
            try_scan(&**self.store(), &a, &b, |k, v| {
                batch.push((k.to_vec(), v.to_vec()));
                Ok::<_, Error>(if batch.len() >= budget {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                })
            })?;
            for (k, v) in batch {
                let pieces = if k[0] == keys::K_PAGE {
                    read::decode_page(&k, &v)?.pieces
                } else {
                    // Its index entry goes in the same batch, so I5 holds between steps.
                    let [_, p, d] = keys::fields::<3>(&k, keys::K_DEAD)
                        .ok_or_else(|| corrupt(format!("dead key {}", read::hex(&k))))?;
                    g.extra(BatchOp::Delete(keys::index(l, Epoch(d), PageNo(p))));
                    read::decode_dead(&k, &v)?.pieces
                };
                for x in &pieces {
                    self.free_piece(g, x)?;
                }
                g.extra(BatchOp::Delete(k));
                found += 1;
            }
            if found > 0 {
                return Ok(false);
            }
        }
        let (a, b) = keys::all_index(l);
        g.extra(BatchOp::DeleteRange(a, b));
        self.lineages.remove(&l);
        g.lineage_gone(l);
        if let Some((lb, eb)) = lin.base {
            let base = self
                .lineages
                .get_mut(&lb)
                .ok_or_else(|| corrupt(format!("lineage {l}'s base {lb} has no record")))?;
            g.lineage_changed(lb);
            if base.retained.remove_hold(eb).map_err(corrupt)? {
                self.released(g, lb, eb)?;
            }
        }
        Ok(true)
    }
}
