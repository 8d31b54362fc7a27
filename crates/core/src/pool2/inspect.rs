//! Format-2 diff, scrub and a snapshot's exclusive bytes (format2.md §7). All read the
//! store without locks; diff and exclusive bytes use one store view.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::sync::Arc;

use crate::device::{AlignedBuf, ReadSeg, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::error::{Error, Result};
use crate::meta::{try_scan, MetaRead};
use crate::pool::diff::DiffRange;
use crate::pool::scrub::{BadBlock, ScrubReport};
use crate::v2::read::{self, read_page_raw};
use crate::v2::sums::SumBlock;
use crate::v2::{keys, Epoch, LineageId, PageNo, Piece, PAGE_BLOCKS};

use super::catalog::{BaseMap, Source};
use super::{Pool2, Target};

/// The checksum block scrub read last: (block, its CRC, what reading it gave).
type LastSums = Option<(u64, u32, std::result::Result<Arc<SumBlock>, String>)>;

/// Largest single device read of scrub, in blocks.
const MAX_RUN: u64 = 64;
/// Keys scrubbed per pin and view.
const SCRUB_STEP: usize = 4096;

impl Pool2 {
    /// Byte ranges whose contents may differ between `a` and `b`; every range where they
    /// differ is included. Two points of one lineage cost the pages changed between them
    /// (from the change index); points of different lineages compare every page.
    pub fn diff(&self, a: &Target, b: &Target) -> Result<Vec<DiffRange>> {
        let (sa, sb, bases) = {
            let c = self.catalog_read();
            (c.source(a)?, c.source(b)?, BaseMap(c.bases.clone()))
        };
        let view = self.store().view()?;
        let min_blocks = sa.size.min(sb.size) / BLOCK_SIZE_U64;
        let pages: Vec<PageNo> = if sa.lineage == sb.lineage {
            changed_pages(&*view, &sa, &sb)?
        } else {
            (0..min_blocks.div_ceil(PAGE_BLOCKS)).map(PageNo).collect()
        };
        let mut lbas = Vec::new();
        for p in pages
            .into_iter()
            .filter(|p| p.0.saturating_mul(PAGE_BLOCKS) < min_blocks)
        {
            // Blocks, not checksums: a block's data is the same while anything names it.
            let ca = read_page_raw(&*view, &bases, sa.lineage, sa.at, p)?;
            let cb = read_page_raw(&*view, &bases, sb.lineage, sb.at, p)?;
            for k in 0..PAGE_BLOCKS as usize {
                let lba = p.0 * PAGE_BLOCKS + k as u64;
                if lba < min_blocks && ca[k].map(|b| b.pba) != cb[k].map(|b| b.pba) {
                    lbas.push(lba);
                }
            }
        }
        let mut out: Vec<DiffRange> = Vec::new();
        for lba in lbas {
            let off = lba * BLOCK_SIZE_U64;
            match out.last_mut() {
                Some(r) if r.offset + r.length == off => r.length += BLOCK_SIZE_U64,
                _ => out.push(DiffRange {
                    offset: off,
                    length: BLOCK_SIZE_U64,
                }),
            }
        }
        let (lo, hi) = (sa.size.min(sb.size), sa.size.max(sb.size));
        if hi > lo {
            match out.last_mut() {
                Some(r) if r.offset + r.length == lo => r.length += hi - lo,
                _ => out.push(DiffRange {
                    offset: lo,
                    length: hi - lo,
                }),
            }
        }
        Ok(out)
    }

    /// Bytes deleting `vol@snap` would free now (a dry run of its reclaim job).
    pub fn snapshot_exclusive(&self, vol: &str, snap: &str) -> Result<u64> {
        let (l, e) = {
            let c = self.catalog_read();
            let s = c.snapshot(c.volume_id(vol)?, snap)?;
            (s.lineage, s.epoch)
        };
        let view = self.store().view()?;
        let lineages = crate::v2::engine::load_lineages(&*view)?;
        let lin = lineages
            .get(&l)
            .ok_or_else(|| Error::Corrupt(format!("lineage {l} of {vol}@{snap} has no record")))?;
        Ok(crate::v2::jobs::exclusive_blocks(&*view, lin, e)? * BLOCK_SIZE_U64)
    }

    /// Verifies every stored data block once (live pages, then dead records);
    /// `progress(done_bytes, total_bytes)` as it goes.
    pub fn scrub(&self, progress: &dyn Fn(u64, u64)) -> Result<ScrubReport> {
        let (affects, lineages) = {
            let c = self.catalog_read();
            let mut affects: BTreeMap<LineageId, Vec<String>> = BTreeMap::new();
            for v in c.volumes.values() {
                affects.entry(v.lineage).or_default().push(v.name.clone());
            }
            for s in c.snapshots.values() {
                let v = c.volumes.get(&s.vol).map_or("?", |v| v.name.as_str());
                affects
                    .entry(s.lineage)
                    .or_default()
                    .push(format!("{v}@{}", s.name));
            }
            (affects, c.bases.len() as u64)
        };
        let total = (self.data_blocks() - self.free_blocks()) * BLOCK_SIZE_U64;
        let mut rep = ScrubReport {
            layers: lineages,
            ..Default::default()
        };
        progress(0, total);
        let mut last_sums: LastSums = None;
        for prefix in [keys::K_PAGE, keys::K_DEAD] {
            let mut from = vec![prefix];
            loop {
                // Pin before the view: no block the view shows is reused while we read.
                let _pin = self.pin_read();
                let view = self.store().view()?;
                let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                try_scan(&*view, &from, &[prefix + 1], |k, v| {
                    batch.push((k.to_vec(), v.to_vec()));
                    Ok::<_, Error>(if batch.len() >= SCRUB_STEP {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    })
                })?;
                for (k, v) in &batch {
                    let pieces = if prefix == keys::K_PAGE {
                        read::decode_page(k, v)?.pieces
                    } else if let Some(keys::DeadKey::Dead(..)) = keys::dead_key(k) {
                        read::decode_dead(k, v)?.pieces
                    } else {
                        // A read checkpoint owns nothing: its blocks are scrubbed where
                        // they are owned.
                        continue;
                    };
                    let l = LineageId(keys::fields::<2>(&k[..17], prefix).map_or(0, |f| f[0]));
                    let page = keys::fields::<2>(&k[..17], prefix).map_or(0, |f| f[1]);
                    for x in pieces.iter().filter(|x| x.owned()) {
                        self.scrub_piece(l, page, x, &affects, &mut last_sums, &mut rep);
                    }
                }
                progress(rep.bytes, total);
                match batch.last() {
                    Some((k, _)) if batch.len() >= SCRUB_STEP => {
                        from = k.clone();
                        from.push(0);
                    }
                    _ => break,
                }
            }
        }
        Ok(rep)
    }

    fn scrub_piece(
        &self,
        l: LineageId,
        page: u64,
        x: &Piece,
        affects: &BTreeMap<LineageId, Vec<String>>,
        last_sums: &mut LastSums,
        rep: &mut ScrubReport,
    ) {
        // CRCs in a checksum block are read from the media too (once while consecutive
        // pieces name it); if that block is bad, every block it covers is reported.
        let block = match x.sums.block() {
            None => None,
            Some(r) => {
                let fresh =
                    !matches!(last_sums, Some((at, crc, _)) if *at == r.at && *crc == r.crc);
                if fresh {
                    let got = self.sums.read_fresh(r).map_err(|e| e.to_string());
                    *last_sums = Some((r.at, r.crc, got));
                }
                match last_sums.as_ref().map(|(_, _, got)| got) {
                    Some(Ok(b)) => Some(Arc::clone(b)),
                    Some(Err(e)) => {
                        for i in 0..u64::from(x.len) {
                            self.scrub_bad(l, page, x, i, e.clone(), affects, rep);
                        }
                        rep.blocks += u64::from(x.len);
                        rep.bytes += u64::from(x.len) * BLOCK_SIZE_U64;
                        return;
                    }
                    None => None,
                }
            }
        };
        let mut k = 0u64;
        while k < u64::from(x.len) {
            let n = (u64::from(x.len) - k).min(MAX_RUN);
            let mut buf = AlignedBuf::zeroed((n * BLOCK_SIZE_U64) as usize);
            // Bulk: from the media, not a page-cache copy (device::uring).
            let read = crate::meta::bulk_reads(|| {
                self.device().read(&mut [ReadSeg {
                    offset: self.block_offset(x.pba + k),
                    buf: &mut buf,
                }])
            });
            for i in 0..n {
                let crc = crate::v2::sums::resolve(x.sums.get((k + i) as usize), block.as_deref());
                let detail = match (&read, crc) {
                    (Err(e), _) => Some(format!("read error: {e}")),
                    (_, Err(e)) => Some(e.to_string()),
                    (Ok(()), Ok(crc)) => {
                        let s = (i * BLOCK_SIZE_U64) as usize;
                        let got = crc32c::crc32c(&buf[s..s + BLOCK_SIZE]);
                        (got != crc).then(|| format!("stored crc32c {crc:08x}, data has {got:08x}"))
                    }
                };
                if let Some(detail) = detail {
                    self.scrub_bad(l, page, x, k + i, detail, affects, rep);
                }
            }
            rep.blocks += n;
            rep.bytes += n * BLOCK_SIZE_U64;
            k += n;
        }
    }

    /// Reports block `i` of piece `x` bad.
    #[allow(clippy::too_many_arguments)]
    fn scrub_bad(
        &self,
        l: LineageId,
        page: u64,
        x: &Piece,
        i: u64,
        detail: String,
        affects: &BTreeMap<LineageId, Vec<String>>,
        rep: &mut ScrubReport,
    ) {
        let lba = page
            .saturating_mul(PAGE_BLOCKS)
            .saturating_add(u64::from(x.off) + i);
        let pba = x.pba + i;
        log::error!("scrub: lineage {l} lba {lba} pba {pba}: {detail}");
        rep.bad.push(BadBlock {
            layer: l.0,
            lba,
            pba,
            detail,
            affects: affects.get(&l).cloned().unwrap_or_default(),
        });
    }
}

/// Pages that may differ between two points of one lineage: those its change index lists
/// between them (a snapshot in between keeps every such entry).
fn changed_pages<S: MetaRead + ?Sized>(view: &S, a: &Source, b: &Source) -> Result<Vec<PageNo>> {
    let (lo, hi) = match (a.at, b.at) {
        (Some(x), Some(y)) if x == y => return Ok(Vec::new()),
        (Some(x), Some(y)) => (x.min(y), x.max(y)),
        (Some(x), None) | (None, Some(x)) => (x, Epoch(u64::MAX - 1)),
        (None, None) => return Ok(Vec::new()),
    };
    let mut pages = BTreeSet::new();
    let (from, to) = keys::index_range(a.lineage, lo.next(), PageNo(0), hi);
    try_scan(view, &from, &to, |k, _| {
        if let Some([_, _, p]) = keys::fields::<3>(k, keys::K_INDEX) {
            pages.insert(PageNo(p));
        }
        Ok::<_, Error>(ControlFlow::Continue(()))
    })?;
    Ok(pages.into_iter().collect())
}
