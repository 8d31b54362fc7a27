//! Consistency check of format-2 metadata on one store view (format2.md §7): encodings,
//! I1 (no owned block twice), disjoint piece lifetimes per block, I2 (garbage only where a
//! queued job will find it), I4 exactly (allocated ⇔ referenced: a leak is an error), I5,
//! and the lineage graph (bases exist, holds match the clones that use them, a closed
//! lineage nothing retains has its destroy queued), and every read checkpoint: at a retained
//! epoch equal to the content its dead records give there, else queued for deletion.
//!
//! Cost: one pass over the metadata, plus one get per page with dead records and per
//! change-index entry. Memory: two bits per data block plus one page's pieces.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use super::engine::{decode_sum_count, load, X_DEAD};
use super::ids::{Epoch, LineageId, PageNo};
use super::jobs::{Job, JobKind};
use super::keys;
use super::lineage::Lineage;
use super::piece::Piece;
use super::read::{self, Raw, RawContent};
use super::region::Regions;
use super::sums::SumBlocks;
use super::PAGE_BLOCKS;
use crate::error::{Error, Result};
use crate::meta::{try_scan, MetaRead};

/// At most this many errors are listed; the count is kept.
const MAX_LISTED: usize = 100;

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub errors: Vec<String>,
    pub error_count: u64,
    /// Catalog objects (filled by the pool's check).
    pub volumes: u64,
    pub snapshots: u64,
    pub lineages: u64,
    pub pages: u64,
    pub dead_records: u64,
    pub checkpoints: u64,
    pub index_entries: u64,
    pub owned_blocks: u64,
    pub pending_jobs: u64,
    /// Snapshot contents kept on the metadata disk (format2.md §8c) compared with the map.
    #[serde(default)]
    pub kept_contents: u64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.error_count == 0
    }
    /// Adds an error found by a caller's own checks (the pool's catalog).
    pub fn add_error(&mut self, e: String) {
        self.err(e);
    }
    fn err(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_LISTED {
            self.errors.push(e);
        }
    }
}

struct Ctx<'a> {
    lineages: &'a BTreeMap<LineageId, Lineage>,
    jobs: &'a [Job],
    owned: Regions,
    based: Regions,
    /// Owned live blocks born in their open lineage's current epoch.
    born: BTreeMap<LineageId, u64>,
    /// Owned blocks per lineage (live pages and dead records).
    owned_by: BTreeMap<LineageId, u64>,
    /// Owned blocks per checksum block naming it (format2.md §9b).
    sum_counts: BTreeMap<u64, u64>,
    /// Every checksum block any piece names (owned, inherited or in a checkpoint).
    sum_named: BTreeSet<u64>,
    report: Report,
}

impl Ctx<'_> {
    fn covered(&self, l: LineageId, w: Epoch) -> bool {
        self.jobs.iter().any(|j| j.covers(l, w))
    }

    fn pieces(&mut self, what: &str, l: LineageId, pieces: &[Piece]) {
        for x in pieces {
            if let Some(r) = x.sums.block() {
                self.sum_named.insert(r.at);
            }
            if let Some(at) = x.counted_in() {
                *self.sum_counts.entry(at).or_default() += u64::from(x.len);
            }
            if x.owned() {
                self.report.owned_blocks += u64::from(x.len);
                *self.owned_by.entry(l).or_default() += u64::from(x.len);
                if let Err(e) = self.owned.set(x.pba, u64::from(x.len)) {
                    self.report.err(format!("{what} of lineage {l}: {e}"));
                }
                continue;
            }
            // Several clones may inherit one block: only "is it owned somewhere" matters.
            for b in x.pba..x.pba + u64::from(x.len) {
                if !self.based.is_set(b) && self.based.set(b, 1).is_err() {
                    self.report.err(format!(
                        "{what} of lineage {l}: block {b} beyond the device"
                    ));
                }
            }
        }
    }

    /// No two pieces of one block may both be visible at a retained epoch (I3). Deaths of
    /// merged dead records are the top of their retained interval, not the epoch of the
    /// kill, so lifetimes may overlap where no retained epoch lies.
    fn timelines(&mut self, l: LineageId, p: PageNo, live: &[Piece], dead: &[(Epoch, Piece)]) {
        let Some(lin) = self.lineages.get(&l) else {
            return;
        };
        let until = lin.live_until();
        let mut spans: Vec<Vec<(Epoch, Epoch)>> = vec![Vec::new(); PAGE_BLOCKS as usize];
        for x in live {
            for i in x.start()..x.end() {
                spans[i as usize].push((x.birth, until));
            }
        }
        let mut errors = Vec::new();
        for (d, x) in dead {
            if x.birth >= *d {
                errors.push(format!(
                    "lineage {l} page {p}: dead piece born at {} dies at {d}",
                    x.birth
                ));
            }
            for i in x.start()..x.end() {
                spans[i as usize].push((x.birth, *d));
            }
        }
        for (i, s) in spans.iter_mut().enumerate() {
            s.sort();
            // Sweep by birth against the span that lives longest so far: if a later span
            // shares a retained epoch with any earlier one, it shares it with that one.
            let mut widest: Option<(Epoch, Epoch)> = None;
            for &(b, d) in s.iter() {
                if let Some((wb, wd)) = widest {
                    if lin.retained.any_in(b, d.min(wd)) {
                        errors.push(format!(
                            "lineage {l} page {p} block {i}: pieces [{wb}, {wd}) and [{b}, {d}) both visible at a retained epoch"
                        ));
                    }
                }
                if widest.is_none_or(|(_, wd)| d > wd) {
                    widest = Some((b, d));
                }
            }
        }
        for e in errors {
            self.report.err(e);
        }
    }
}

/// A read checkpoint `c(l, p, e)` owns nothing; at a retained `e` it must hold exactly the
/// content the dead records give there, else a queued job must be about to delete it.
fn check_checkpoint(
    c: &mut Ctx,
    view: &dyn MetaRead,
    sums: &dyn SumBlocks,
    k: &[u8],
    v: &[u8],
    (l, p, e): (LineageId, PageNo, Epoch),
) -> Result<()> {
    let rec = match read::decode_dead(k, v) {
        Ok(r) => r,
        Err(err) => {
            c.report.err(err.to_string());
            return Ok(());
        }
    };
    let Some(lin) = c.lineages.get(&l) else {
        c.report.err(format!(
            "read checkpoint of lineage {l}, which has no record"
        ));
        return Ok(());
    };
    if !lin.retained.contains(e) {
        if !c.covered(l, e) {
            c.report.err(format!(
                "lineage {l} page {p}: read checkpoint at {e}, which is not retained and no job will delete"
            ));
        }
        return Ok(());
    }
    let mut raw: RawContent = [None; PAGE_BLOCKS as usize];
    for x in &rec.pieces {
        if let Some(r) = x.sums.block() {
            c.sum_named.insert(r.at);
        }
        if x.birth > e {
            c.report.err(format!(
                "lineage {l} page {p}: read checkpoint at {e} holds a piece born at {}",
                x.birth
            ));
        }
        for i in 0..x.len as usize {
            raw[x.off as usize + i] = Some(Raw {
                pba: x.pba + i as u64,
                sum: x.sums.get(i),
            });
        }
    }
    let compared = read::read_page_exact(view, c.lineages, sums, l, Some(e), p)
        .and_then(|want| Ok(read::resolve(&raw, sums)? == want));
    let same = match compared {
        Ok(same) => same,
        Err(Error::Corrupt(why)) => {
            c.report.err(format!(
                "lineage {l} page {p}: read checkpoint at {e} not compared: {why}"
            ));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if !same {
        c.report.err(format!(
            "lineage {l} page {p}: read checkpoint at {e} differs from the content there"
        ));
    }
    Ok(())
}

/// Checks the format-2 metadata seen by `view` for a data device of `data_blocks` blocks.
///
/// `sums` loads checksum blocks, to compare read checkpoints with the content they cache.
pub fn check(view: &dyn MetaRead, data_blocks: u64, sums: &dyn SumBlocks) -> Result<Report> {
    let st = load(view, data_blocks)?;
    let jobs: Vec<Job> = st.jobs.iter().cloned().collect();
    let mut c = Ctx {
        lineages: &st.lineages,
        jobs: &jobs,
        owned: Regions::new(data_blocks),
        based: Regions::new(data_blocks),
        born: BTreeMap::new(),
        owned_by: BTreeMap::new(),
        sum_counts: BTreeMap::new(),
        sum_named: BTreeSet::new(),
        report: Report {
            lineages: st.lineages.len() as u64,
            pending_jobs: jobs.len() as u64,
            ..Report::default()
        },
    };
    check_lineages(&mut c);

    // Live pages.
    let (a, b) = ([keys::K_PAGE], [keys::K_PAGE + 1]);
    try_scan(view, &a, &b, |k, v| {
        c.report.pages += 1;
        let Some([l, p]) = keys::fields::<2>(k, keys::K_PAGE) else {
            c.report.err(format!("malformed page key {}", read::hex(k)));
            return Ok(ControlFlow::Continue(()));
        };
        let (l, p) = (LineageId(l), PageNo(p));
        let page = match read::decode_page(k, v) {
            Ok(pg) => pg,
            Err(e) => {
                c.report.err(e.to_string());
                return Ok(ControlFlow::Continue(()));
            }
        };
        let Some(lin) = c.lineages.get(&l) else {
            c.report
                .err(format!("page {p} of lineage {l}, which has no record"));
            return Ok(ControlFlow::Continue(()));
        };
        if let Some(ec) = lin.closed {
            for x in &page.pieces {
                if !lin.retained.any_in(x.birth, ec) && !c.covered(l, x.birth) {
                    c.report.err(format!(
                        "lineage {l} page {p}: live piece at {} born {} is garbage no job will free",
                        x.off, x.birth
                    ));
                }
            }
        }
        if lin.closed.is_none() {
            let n: u64 = page
                .pieces
                .iter()
                .filter(|x| x.owned() && x.birth == lin.epoch)
                .map(|x| u64::from(x.len))
                .sum();
            *c.born.entry(l).or_default() += n;
        }
        if page.pieces.is_empty() && lin.base.is_none() {
            c.report
                .err(format!("lineage {l} page {p}: empty page kept"));
        }
        c.pieces("page", l, &page.pieces);
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;

    // Dead records, grouped by page for the lifetime check.
    let mut current: Option<(LineageId, PageNo)> = None;
    let mut dead: Vec<(Epoch, Piece)> = Vec::new();
    let (a, b) = ([keys::K_DEAD], [keys::K_DEAD + 1]);
    let flush = |c: &mut Ctx,
                 cur: Option<(LineageId, PageNo)>,
                 dead: &mut Vec<(Epoch, Piece)>|
     -> Result<()> {
        if let Some((l, p)) = cur {
            let key = keys::page(l, p);
            let live = match view.get(&key)? {
                Some(v) => read::decode_page(&key, &v)
                    .map(|pg| pg.pieces)
                    .unwrap_or_default(),
                None => Vec::new(),
            };
            c.timelines(l, p, &live, dead);
        }
        dead.clear();
        Ok(())
    };
    try_scan(view, &a, &b, |k, v| {
        let (l, p, d) = match keys::dead_key(k) {
            Some(keys::DeadKey::Dead(l, p, d)) => (l, p, d),
            Some(keys::DeadKey::Checkpoint(l, p, e)) => {
                c.report.checkpoints += 1;
                check_checkpoint(&mut c, view, sums, k, v, (l, p, e))?;
                return Ok(ControlFlow::Continue(()));
            }
            None => {
                c.report
                    .err(format!("malformed dead-record key {}", read::hex(k)));
                return Ok(ControlFlow::Continue(()));
            }
        };
        c.report.dead_records += 1;
        if current != Some((l, p)) {
            flush(&mut c, current, &mut dead)?;
            current = Some((l, p));
        }
        let rec = match read::decode_dead(k, v) {
            Ok(r) => r,
            Err(e) => {
                c.report.err(e.to_string());
                return Ok(ControlFlow::Continue(()));
            }
        };
        if rec.pieces.is_empty() {
            c.report
                .err(format!("lineage {l} page {p}: empty dead record at {d}"));
        }
        match view.get(&keys::index(l, d, p))? {
            Some(f) if f.first().is_some_and(|f| f & X_DEAD != 0) => {}
            _ => c.report.err(format!(
                "lineage {l} page {p}: dead record at {d} without its DEAD index entry"
            )),
        }
        match c.lineages.get(&l) {
            None => c
                .report
                .err(format!("dead record of lineage {l}, which has no record")),
            Some(lin) => {
                for x in &rec.pieces {
                    if !lin.retained.any_in(x.birth, d) && !c.covered(l, d) {
                        c.report.err(format!(
                            "lineage {l} page {p}: dead piece [{}, {d}) is garbage no job will free",
                            x.birth
                        ));
                    }
                }
            }
        }
        c.pieces("dead record", l, &rec.pieces);
        dead.extend(rec.pieces.into_iter().map(|x| (d, x)));
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;
    flush(&mut c, current, &mut dead)?;

    // Change index.
    let (a, b) = ([keys::K_INDEX], [keys::K_INDEX + 1]);
    try_scan(view, &a, &b, |k, v| {
        c.report.index_entries += 1;
        let Some([l, w, p]) = keys::fields::<3>(k, keys::K_INDEX) else {
            c.report
                .err(format!("malformed index key {}", read::hex(k)));
            return Ok(ControlFlow::Continue(()));
        };
        let (l, w, p) = (LineageId(l), Epoch(w), PageNo(p));
        if !c.lineages.contains_key(&l) {
            c.report
                .err(format!("index entry of lineage {l}, which has no record"));
        }
        let dead = v.first().is_some_and(|f| f & X_DEAD != 0);
        if v.len() != 1 {
            c.report
                .err(format!("index entry {l}/{w}/{p}: {} bytes", v.len()));
        }
        if dead && view.get(&keys::dead(l, p, w))?.is_none() {
            c.report.err(format!(
                "lineage {l} page {p}: DEAD index entry at {w} without record"
            ));
        }
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;

    for lin in c.lineages.values().filter(|l| l.closed.is_none()) {
        let want = c.born.get(&lin.id).copied().unwrap_or(0);
        if lin.born_now != want {
            c.report.err(format!(
                "lineage {}: counter says {} blocks written since the last snapshot, pages hold {want}",
                lin.id, lin.born_now
            ));
        }
    }

    for lin in c.lineages.values() {
        let want = c.owned_by.get(&lin.id).copied().unwrap_or(0);
        if lin.owned != want && !st.legacy_owned.contains(&lin.id) {
            c.report.err(format!(
                "lineage {}: counter says it owns {} blocks, its pieces own {want}",
                lin.id, lin.owned
            ));
        }
    }

    // Checksum blocks: each counted exactly by the owned blocks naming it, and owned like
    // a data block (so I1 and I4 below include them).
    let mut stored = BTreeMap::new();
    let (a, b) = keys::sum_counts();
    try_scan(view, &a, &b, |k, v| {
        match (keys::fields::<1>(k, keys::K_SUM_COUNT), decode_sum_count(v)) {
            (Some([at]), Some(n)) => {
                stored.insert(at, n);
            }
            _ => c.report.err(format!(
                "malformed checksum-block count {} = {}",
                read::hex(k),
                read::hex(v)
            )),
        }
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;
    for (&at, &n) in &stored {
        let want = c.sum_counts.get(&at).copied().unwrap_or(0);
        if n != want {
            c.report.err(format!(
                "checksum block {at}: count says {n} blocks name it, pieces own {want}"
            ));
        }
        if let Err(e) = c.owned.set(at, 1) {
            c.report.err(format!("checksum block {at}: {e}"));
        }
    }
    for at in c.sum_named.iter().filter(|at| !stored.contains_key(at)) {
        c.report.err(format!(
            "checksum block {at} is named by a piece but has no count (freed)"
        ));
    }

    // I4: allocated ⇔ referenced; inherited blocks are owned somewhere.
    for pba in c.owned.iter_set() {
        if !st.regions.is_set(pba) {
            c.report.err(format!(
                "block {pba} is referenced but free in its region record"
            ));
        }
    }
    for pba in st.regions.iter_set() {
        if !c.owned.is_set(pba) {
            c.report.err(format!(
                "block {pba} is allocated but no piece owns it (leak)"
            ));
        }
    }
    let based: Vec<u64> = c.based.iter_set().filter(|b| !c.owned.is_set(*b)).collect();
    for pba in based {
        c.report.err(format!(
            "block {pba} is inherited by a clone but owned by no lineage"
        ));
    }
    Ok(c.report)
}

fn check_lineages(c: &mut Ctx) {
    let mut holds: BTreeMap<(LineageId, Epoch), u32> = BTreeMap::new();
    for lin in c.lineages.values() {
        if let Some((lb, eb)) = lin.base {
            *holds.entry((lb, eb)).or_default() += 1;
            if lb >= lin.id || !c.lineages.contains_key(&lb) {
                c.report.err(format!(
                    "lineage {} has base {lb}, which is missing or newer",
                    lin.id
                ));
            }
        }
    }
    for lin in c.lineages.values() {
        for (e, n) in lin.retained.counts() {
            let want = holds.get(&(lin.id, e)).copied().unwrap_or(0);
            if n.holds != want {
                c.report.err(format!(
                    "lineage {} epoch {e}: {} holds recorded, {want} lineages based on it",
                    lin.id, n.holds
                ));
            }
        }
        for ((lb, eb), _) in holds.range((lin.id, Epoch(0))..=(lin.id, Epoch(u64::MAX))) {
            if !lin.retained.contains(*eb) {
                c.report.err(format!(
                    "lineage {lb} epoch {eb} is a base but not retained"
                ));
            }
        }
        if lin.closed.is_some()
            && lin.retained.is_empty()
            && !c
                .jobs
                .iter()
                .any(|j| j.lineage == lin.id && j.kind == JobKind::Destroy)
        {
            c.report.err(format!(
                "closed lineage {} retains nothing and is not queued for destroy",
                lin.id
            ));
        }
    }
    for j in c.jobs {
        if !c.lineages.contains_key(&j.lineage) {
            c.report.err(format!(
                "job {} names lineage {}, which has no record",
                j.seq, j.lineage
            ));
        }
    }
}
