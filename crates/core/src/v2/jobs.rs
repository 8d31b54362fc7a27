//! Reclaim jobs (format2.md §3.4): `q`+seq items created in the batch of the operation that
//! makes data garbage, run by the engine's owner in small steps, one job at a time, in queue
//! order. Every step judges pieces against the lineage's *current* retained set, so a job
//! racing a new snapshot or a new clone cannot free what they keep; each step carries its
//! cursor and its frees in one batch and is idempotent when re-run after a crash.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use super::engine::{Group, Meta2, X_DEAD};
use super::ids::{Epoch, LineageId, PageNo};
use super::keys;
use super::lineage::Lineage;
use super::page::{self, DeadRecord};
use super::piece::Piece;
use super::read;
use super::retained::Retained;
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

/// The top of the retained interval holding death `d`: the oldest retained epoch ≥ `d`, or
/// `hi` (the job's end: the next retained epoch, the current epoch or the close epoch).
fn top_of(r: &Retained, d: Epoch, hi: Epoch) -> Epoch {
    let t = if r.contains(d) { Some(d) } else { r.after(d) };
    t.filter(|t| *t <= hi).unwrap_or(hi)
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
        }
        .and_then(|done| {
            crate::failpoint!("reclaim2.mid_step");
            Ok(done)
        });
        let done = self.stop_on_error(done)?;
        if done {
            self.jobs.pop_front();
            g.jobs_done(job.seq);
        }
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
        let mut settled = BTreeSet::new();
        for &(w, p, f) in &entries {
            if settled.insert(p) {
                self.settle_page(g, &lin, &r, lo, hi, p)?;
            }
            if g.index_decided(l, w, p) {
                continue;
            }
            // An entry settle_page did not rewrite: a page-changed marker (or a DEAD flag
            // whose record is gone). Keep one marker per retained interval, at its top.
            let top = top_of(&r, w, hi);
            if r.min().is_none_or(|m| w <= m) || top != w {
                Meta2::set_index(g, l, w, p, None);
                if r.min().is_some_and(|m| w > m) {
                    self.ensure_index(g, l, top, p)?;
                }
            } else if f & X_DEAD != 0 && !g.has_dead(l, p, w) {
                Meta2::set_index(g, l, w, p, Some(0));
            }
        }
        if entries.len() < budget {
            return Ok(true);
        }
        let Some(&(w, p, _)) = entries.last() else {
            return Ok(true);
        };
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

    /// Re-judges every dead record of page `p` with death in `[lo, hi]`: frees garbage
    /// pieces and merges the survivors of each retained interval into one record at the
    /// interval's top (any death in an interval with no retained epoch inside is seen by
    /// the same snapshots, and survivors of one interval never overlap: each is alive at the
    /// retained epoch below it). So a page keeps at most one record per retained snapshot
    /// above it, however many epochs passed (docs/format2-review2.md M1). For a closed
    /// lineage, also frees the live page's pieces no retained epoch sees.
    fn settle_page(
        &mut self,
        g: &mut Group,
        lin: &Lineage,
        r: &Retained,
        lo: Epoch,
        hi: Epoch,
        p: PageNo,
    ) -> Result<()> {
        let l = lin.id;
        let mut deaths = Vec::new();
        let (a, b) = (keys::dead(l, p, lo), keys::dead(l, p, hi.next()));
        try_scan(&**self.store(), &a, &b, |k, _| {
            match keys::dead_key(k) {
                Some(keys::DeadKey::Dead(_, _, d)) => deaths.push(d),
                // Records may move across e below: its checkpoint goes in the same batch
                // unless e is retained, which nothing moves across (read.rs).
                Some(keys::DeadKey::Checkpoint(_, _, e)) => {
                    if !r.contains(e) {
                        g.delete_checkpoint(l, p, e);
                    }
                }
                None => return Err(corrupt(format!("dead key {}", read::hex(k)))),
            }
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        // Checkpoints below every retained epoch are read by no one, and the change-index
        // entries that would lead their own jobs here may be deleted by this step (entries
        // at or below min R go): delete them now. Records there are garbage awaiting jobs,
        // so this scan is short.
        let floor = r.min().map_or(lo, |m| m.min(lo));
        let (a, b) = (keys::dead(l, p, Epoch::ZERO), keys::dead(l, p, floor));
        try_scan(&**self.store(), &a, &b, |k, _| {
            if let Some(keys::DeadKey::Checkpoint(_, _, e)) = keys::dead_key(k) {
                g.delete_checkpoint(l, p, e);
            }
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        let mut merged: BTreeMap<Epoch, Vec<Piece>> = BTreeMap::new();
        for &d in &deaths {
            let c = self.dead_mut(g, l, p, d)?;
            let rec = c.value.take();
            c.dirty = true;
            for piece in rec.map(|x| x.pieces).unwrap_or_default() {
                if r.any_in(piece.birth, d) {
                    merged.entry(top_of(r, d, hi)).or_default().push(piece);
                } else {
                    self.free_piece(g, l, &piece)?;
                }
            }
        }
        for &d in &deaths {
            if !merged.contains_key(&d) {
                let top = top_of(r, d, hi);
                let alive = r.min().is_some_and(|m| d > m);
                Meta2::set_index(g, l, d, p, (alive && top == d).then_some(0));
                if alive && top != d {
                    self.ensure_index(g, l, top, p)?;
                }
            }
        }
        for (t, pieces) in merged {
            let mut rec = DeadRecord::default();
            for piece in pieces {
                page::insert(&mut rec.pieces, piece).map_err(|e| {
                    corrupt(format!(
                        "merging dead records of lineage {l} page {p} into {t}: {e}"
                    ))
                })?;
            }
            let c = self.dead_mut(g, l, p, t)?;
            c.value = Some(rec);
            c.dirty = true;
            Meta2::set_index(g, l, t, p, Some(X_DEAD));
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
                    self.free_piece(g, l, x)?;
                }
            }
        }
        Ok(())
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
                    match keys::dead_key(&k) {
                        Some(keys::DeadKey::Dead(_, p, d)) => {
                            // Its index entry goes in the same batch, so I5 holds between steps.
                            g.extra(BatchOp::Delete(keys::index(l, d, p)));
                            read::decode_dead(&k, &v)?.pieces
                        }
                        // A read checkpoint owns nothing.
                        Some(keys::DeadKey::Checkpoint(..)) => Vec::new(),
                        None => return Err(corrupt(format!("dead key {}", read::hex(&k)))),
                    }
                };
                for x in &pieces {
                    self.free_piece(g, l, x)?;
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

/// Blocks deleting snapshot epoch `e` of `l` would free: the drop job of that delete,
/// judged on `view` without changing anything (format2.md §7). O(pages changed between
/// e's neighbours); 0 while another snapshot or a clone keeps `e`.
pub fn exclusive_blocks<S: crate::meta::MetaRead + ?Sized>(
    view: &S,
    lin: &Lineage,
    e: Epoch,
) -> Result<u64> {
    let l = lin.id;
    let mut r = lin.retained.clone();
    if !r.remove_snapshot(e).map_err(corrupt)? {
        return Ok(0);
    }
    let own = |pieces: &[Piece], keep: &dyn Fn(&Piece) -> bool| -> u64 {
        pieces
            .iter()
            .filter(|x| x.owned() && !keep(x))
            .map(|x| u64::from(x.len))
            .sum()
    };
    if lin.closed.is_some() && r.is_empty() {
        // Destroy: everything the lineage owns.
        let mut n = 0;
        for (a, b) in [keys::all_pages(l), keys::deads(l)] {
            try_scan(view, &a, &b, |k, v| {
                let pieces = if k[0] == keys::K_PAGE {
                    read::decode_page(k, v)?.pieces
                } else if let Some(keys::DeadKey::Dead(..)) = keys::dead_key(k) {
                    read::decode_dead(k, v)?.pieces
                } else {
                    Vec::new()
                };
                n += own(&pieces, &|_| false);
                Ok::<_, Error>(ControlFlow::Continue(()))
            })?;
        }
        return Ok(n);
    }
    let lo = r.before(e).map_or(Epoch::FIRST, |p| p.next());
    let hi = match lin.closed {
        None => r.after(e).map_or(lin.epoch, |n| n.min(lin.epoch)),
        Some(ec) => r.after(e).unwrap_or(ec),
    };
    let mut pages = BTreeSet::new();
    let (a, b) = keys::index_range(l, lo, PageNo(0), hi);
    try_scan(view, &a, &b, |k, _| {
        if let Some([_, _, p]) = keys::fields::<3>(k, keys::K_INDEX) {
            pages.insert(PageNo(p));
        }
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;
    let mut n = 0;
    for p in pages {
        let (a, b) = (keys::dead(l, p, lo), keys::dead(l, p, hi.next()));
        try_scan(view, &a, &b, |k, v| {
            let d = match keys::dead_key(k) {
                Some(keys::DeadKey::Dead(_, _, d)) => d,
                Some(keys::DeadKey::Checkpoint(..)) => return Ok(ControlFlow::Continue(())),
                None => return Err(corrupt(format!("dead key {}", read::hex(k)))),
            };
            let rec = read::decode_dead(k, v)?;
            n += own(&rec.pieces, &|x| r.any_in(x.birth, d));
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        if let Some(ec) = lin.closed {
            let key = keys::page(l, p);
            if let Some(v) = view.get(&key)? {
                let page = read::decode_page(&key, &v)?;
                n += own(&page.pieces, &|x| r.any_in(x.birth, ec));
            }
        }
    }
    Ok(n)
}
