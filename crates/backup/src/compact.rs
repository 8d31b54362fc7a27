//! Compaction of a backup's packs: an incremental backup uploads only changed chunks, so
//! the chunks of the newest backup of a long chain end up spread over one pack per earlier
//! incremental, and its restore needs a ranged GET per pack. When the packs a backup would
//! reference exceed what its bytes need by half, the backup re-reads the chunks of its
//! sparsest packs from the snapshot (local reads, no GET) and stores them again in its own
//! new packs; every reader then prefers the new copies (the newest index wins:
//! `index::PackInfo::rank`), and gc collects the old ones once no other backup keeps them.
//!
//! Bound: with n packs referenced for R bytes in packs of P bytes (m = ⌈R/P⌉ at best),
//! compaction starts when n > 1.5·m + 1 and moves the sparsest packs' chunks — at most
//! 2·(P + new bytes) per backup — until n ≤ 1.25·m + 1 is expected. Above the trigger the
//! average pack holds < 2P/3 of this backup, so the budget empties at least 3 + 3·new/P
//! packs into ⌈(new + moved)/P⌉ new ones: the span stops growing with the chain.
//!
//! Memory: the kept cells' distinct chunk ids and their locations (44 bytes per chunk),
//! freed before the pipeline starts. Requests: one pass over the index objects (cached
//! locally) — the same a restore makes.

use std::collections::{HashMap, HashSet};

use crate::chunks::Locations;
use crate::crypto::ChunkId;
use crate::error::Result;
use crate::repo::Repository;

/// What to store again.
#[derive(Debug, Default)]
pub struct Plan {
    /// Kept cells to read again from the snapshot (sorted).
    pub cells: Vec<u64>,
    /// Their chunks, to store even though the repository holds them.
    pub ids: HashSet<ChunkId>,
    /// Packs the backup would reference without compaction, and expected with it.
    pub packs_before: usize,
    pub packs_after: usize,
    /// Stored bytes of the chunks moved.
    pub bytes: u64,
}

/// The packs to empty, given each referenced pack's share of this backup's bytes, the
/// bytes the backup stores anew and the pack size. Pure: the policy of the module doc.
pub fn choose(shares: &[(u32, u64)], new_bytes: u64, pack_size: u64) -> (Vec<u32>, usize) {
    let p = pack_size.max(1);
    let kept: u64 = shares.iter().map(|(_, b)| b).sum();
    let m = (kept + new_bytes).div_ceil(p).max(1) as f64;
    let span = |packs: usize, extra: u64| packs + (new_bytes + extra).div_ceil(p) as usize;
    let n = span(shares.len(), 0);
    if (n as f64) <= 1.5 * m + 1.0 {
        return (Vec::new(), n);
    }
    let budget = 2 * (p + new_bytes);
    let mut order: Vec<(u32, u64)> = shares.to_vec();
    order.sort_unstable_by_key(|&(pack, b)| (b, pack));
    let (mut chosen, mut moved) = (Vec::new(), 0u64);
    for (pack, b) in order {
        if moved + b > budget {
            break;
        }
        chosen.push(pack);
        moved += b;
        if (span(shares.len() - chosen.len(), moved) as f64) <= 1.25 * m + 1.0 {
            break;
        }
    }
    let after = span(shares.len() - chosen.len(), moved);
    (chosen, after)
}

/// The distinct chunks of `kept`, sorted: what [`plan`] needs located.
pub fn wanted(kept: &[(u64, ChunkId)]) -> Vec<ChunkId> {
    let mut ids: Vec<ChunkId> = kept.iter().map(|(_, id)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Plans the compaction of a backup keeping `kept` cells (sorted by cell), located by
/// `locs` (of [`wanted`]`(kept)`), and storing about `new_bytes` anew; `None` when its
/// packs are compact enough.
pub fn plan(
    repo: &Repository,
    kept: &[(u64, ChunkId)],
    locs: &Locations,
    new_bytes: u64,
) -> Result<Option<Plan>> {
    if kept.is_empty() {
        return Ok(None);
    }
    let mut shares: HashMap<u32, u64> = HashMap::new();
    for id in locs.ids() {
        if let Some(l) = locs.get(id) {
            *shares.entry(l.pack).or_default() += u64::from(l.len);
        }
    }
    let shares: Vec<(u32, u64)> = shares.into_iter().collect();
    let pack_size = u64::from(repo.config().pack_size);
    let (chosen, after) = choose(&shares, new_bytes, pack_size);
    if chosen.is_empty() {
        return Ok(None);
    }
    let chosen: HashSet<u32> = chosen.into_iter().collect();
    let mut out = Plan {
        packs_before: shares.len() + new_bytes.div_ceil(pack_size.max(1)) as usize,
        packs_after: after,
        ..Plan::default()
    };
    for (cell, id) in kept {
        let Some(l) = locs.get(id) else { continue };
        if chosen.contains(&l.pack) {
            out.cells.push(*cell);
            if out.ids.insert(*id) {
                out.bytes += u64::from(l.len);
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::choose;

    const P: u64 = 8 << 20;

    #[test]
    fn compact_packs_are_left_alone() {
        // 4 full packs for 32 MiB: nothing to do.
        let shares: Vec<(u32, u64)> = (0..4).map(|i| (i, P)).collect();
        assert!(choose(&shares, 1 << 20, P).0.is_empty());
    }

    #[test]
    fn a_long_chain_is_bounded_and_the_budget_holds() {
        // 4 full packs plus 60 incrementals' packs each still holding 256 KiB of it.
        let mut shares: Vec<(u32, u64)> = (0..4).map(|i| (i, P)).collect();
        shares.extend((4..64).map(|i| (i, 256 << 10)));
        let new = 512 << 10;
        let (chosen, after) = choose(&shares, new, P);
        let moved: u64 = chosen.iter().map(|c| shares[*c as usize].1).sum();
        assert!(moved <= 2 * (P + new), "moved {moved}");
        assert!(
            chosen.iter().all(|c| *c >= 4),
            "the sparsest go first: {chosen:?}"
        );
        assert!(after < 64 + 1 - chosen.len() + 2, "{after}");
        // Repeating backups converge: simulate the span over many rounds.
        let mut packs = shares;
        let mut next = 64u32;
        for _ in 0..200 {
            // Each backup adds one new pack with its 512 KiB ...
            packs.push((next, new));
            next += 1;
            let (chosen, _) = choose(&packs, 0, P);
            let moved: u64 = packs
                .iter()
                .filter(|(p, _)| chosen.contains(p))
                .map(|(_, b)| b)
                .sum();
            packs.retain(|(p, _)| !chosen.contains(p));
            if moved > 0 {
                packs.push((next, moved));
                next += 1;
            }
        }
        let total: u64 = packs.iter().map(|(_, b)| b).sum();
        let m = total.div_ceil(P) as usize;
        assert!(
            packs.len() as f64 <= 1.5 * m as f64 + 2.0,
            "{} packs for m = {m}",
            packs.len()
        );
    }
}
