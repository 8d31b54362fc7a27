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
//! The shares are gathered frame by frame, as restores locate chunks (each frame's kept
//! chunks located on their own, [`crate::chunks::Chunks::locations`]); a chunk kept in
//! several frames counts once per frame. Memory: a count per referenced pack (~100
//! bytes each), plus one frame's locations at a time. Requests: none beyond the job's
//! listing (the local chunk index answers).

use std::collections::{HashMap, HashSet};

use crate::chunks::Locations;

/// What to store again: the kept chunks located in `packs`.
#[derive(Debug, Default)]
pub struct Plan {
    /// The sparse packs to empty (by name).
    pub packs: HashSet<String>,
    /// Packs the backup would reference without compaction, and expected with it.
    pub packs_before: usize,
    pub packs_after: usize,
    /// Stored bytes of the chunks to move.
    pub bytes: u64,
}

/// Each referenced pack's share of a backup's kept bytes, gathered frame by frame.
#[derive(Debug, Default)]
pub struct Shares {
    packs: HashMap<String, u64>,
}

impl Shares {
    /// Adds one frame's kept chunks, as located for that frame.
    pub fn add(&mut self, locs: &Locations) {
        for id in locs.ids() {
            if let Some(l) = locs.get(id) {
                *self.packs.entry(locs.pack_id(&l).to_string()).or_default() += u64::from(l.len);
            }
        }
    }
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

/// Plans the compaction of a backup whose kept chunks lie as `shares` says and which
/// stores about `new_bytes` anew; `None` when its packs are compact enough.
pub fn plan(shares: Shares, new_bytes: u64, pack_size: u64) -> Option<Plan> {
    let mut names: Vec<(String, u64)> = shares.packs.into_iter().collect();
    if names.is_empty() {
        return None;
    }
    // Numbered in name order, so ties in `choose` fall the same way on every run.
    names.sort_unstable();
    let list: Vec<(u32, u64)> = names
        .iter()
        .enumerate()
        .map(|(i, (_, b))| (i as u32, *b))
        .collect();
    let (chosen, after) = choose(&list, new_bytes, pack_size);
    if chosen.is_empty() {
        return None;
    }
    Some(Plan {
        bytes: chosen.iter().map(|&i| list[i as usize].1).sum(),
        packs: chosen
            .iter()
            .map(|&i| names[i as usize].0.clone())
            .collect(),
        packs_before: list.len() + new_bytes.div_ceil(pack_size.max(1)) as usize,
        packs_after: after,
    })
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
