//! Format-2 keys (format2.md §2): one lowercase byte, then big-endian u64 fields, so that a
//! lineage's pages, a page's dead records by death, and the change index by epoch are each
//! one contiguous, ordered key range.

use super::ids::{Epoch, LineageId, PageNo};

pub const K_NEXT: u8 = b'g';
pub const K_LINEAGE: u8 = b'l';
pub const K_PAGE: u8 = b'p';
pub const K_DEAD: u8 = b'd';
pub const K_INDEX: u8 = b'x';
pub const K_REGION: u8 = b'r';
pub const K_JOB: u8 = b'q';
pub const K_COUNTER: u8 = b'k';
/// Suffix of a read checkpoint's key: `dead(L, page, E) + 'c'` sorts after the dead record
/// of E and before that of E + 1, so one ordered scan of a page's dead records meets the
/// checkpoints among them (format2.md §8a).
pub const CHECKPOINT_SUFFIX: u8 = b'c';

fn key(prefix: u8, fields: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 * fields.len());
    k.push(prefix);
    for f in fields {
        k.extend_from_slice(&f.to_be_bytes());
    }
    k
}

/// The fields of a key built by `key`, if it has that prefix and length.
pub fn fields<const N: usize>(k: &[u8], prefix: u8) -> Option<[u64; N]> {
    if k.len() != 1 + 8 * N || k[0] != prefix {
        return None;
    }
    let mut out = [0u64; N];
    for (i, f) in out.iter_mut().enumerate() {
        let b = &k[1 + 8 * i..9 + 8 * i];
        *f = u64::from_be_bytes(b.try_into().ok()?);
    }
    Some(out)
}

/// Length of a read group: the prefix byte, the lineage and the page.
pub const GROUP_LEN: usize = 17;

/// The read group of `k`: a page's record, its dead records and its checkpoints share their
/// first [`GROUP_LEN`] bytes (`p`/`d` + lineage + page), and a read of one page at any
/// epoch looks up nothing else of that lineage (format2.md §8a). `None` for every other
/// key. A store may index keys by group (RocksDB: prefix bloom filters,
/// `MetaStore::reader`).
pub fn read_group(k: &[u8]) -> Option<&[u8]> {
    match k.first() {
        Some(&K_PAGE) | Some(&K_DEAD) if k.len() >= GROUP_LEN => Some(&k[..GROUP_LEN]),
        _ => None,
    }
}

/// Whether `[from, to)` stays in `from`'s read group (`false` when `from` is in none): `to`
/// is at most the group's successor as a [`GROUP_LEN`]-byte number. Shorter keys between
/// the two (a prefix of that successor) may lie in the range; format 2 stores no `p` or
/// `d` key shorter than [`GROUP_LEN`], so none is ever there.
pub fn within_group(from: &[u8], to: &[u8]) -> bool {
    let Some(g) = read_group(from) else {
        return false;
    };
    let mut after = g.to_vec();
    for b in after.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return to <= after.as_slice();
        }
    }
    true
}

/// Whether `[from, to)` may hold keys of read groups (it meets the `p` or `d` key range).
pub fn may_hold_groups(from: &[u8], to: &[u8]) -> bool {
    [K_PAGE, K_DEAD]
        .iter()
        .any(|&k| from < [k + 1].as_slice() && to > [k].as_slice())
}

pub fn next_ids() -> Vec<u8> {
    vec![K_NEXT]
}
pub fn lineage(l: LineageId) -> Vec<u8> {
    key(K_LINEAGE, &[l.0])
}
pub fn lineages() -> (Vec<u8>, Vec<u8>) {
    (vec![K_LINEAGE], vec![K_LINEAGE + 1])
}
pub fn page(l: LineageId, p: PageNo) -> Vec<u8> {
    key(K_PAGE, &[l.0, p.0])
}
/// Pages `[from, to)` of `l`.
pub fn pages(l: LineageId, from: PageNo, to: PageNo) -> (Vec<u8>, Vec<u8>) {
    (key(K_PAGE, &[l.0, from.0]), key(K_PAGE, &[l.0, to.0]))
}
/// Every page of `l`.
pub fn all_pages(l: LineageId) -> (Vec<u8>, Vec<u8>) {
    (key(K_PAGE, &[l.0]), end_key(K_PAGE, l.0, u64::MAX))
}
/// Every change-index entry of `l`.
pub fn all_index(l: LineageId) -> (Vec<u8>, Vec<u8>) {
    (key(K_INDEX, &[l.0]), end_key(K_INDEX, l.0, u64::MAX))
}
pub fn dead(l: LineageId, p: PageNo, death: Epoch) -> Vec<u8> {
    key(K_DEAD, &[l.0, p.0, death.0])
}
/// The read checkpoint of page `p` of `l` at retained epoch `e`: its content at `e`.
pub fn checkpoint(l: LineageId, p: PageNo, e: Epoch) -> Vec<u8> {
    let mut k = dead(l, p, e);
    k.push(CHECKPOINT_SUFFIX);
    k
}

/// What a key in the dead-record range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadKey {
    /// `d(L, page, death)`.
    Dead(LineageId, PageNo, Epoch),
    /// `c(L, page, E)`.
    Checkpoint(LineageId, PageNo, Epoch),
}

/// Parses a key of the dead-record range (`None`: malformed).
pub fn dead_key(k: &[u8]) -> Option<DeadKey> {
    let (body, ckpt) = match k.split_last() {
        Some((&CHECKPOINT_SUFFIX, body)) if k.len() == 26 => (body, true),
        _ => (k, false),
    };
    let [l, p, e] = fields::<3>(body, K_DEAD)?;
    let (l, p, e) = (LineageId(l), PageNo(p), Epoch(e));
    Some(if ckpt {
        DeadKey::Checkpoint(l, p, e)
    } else {
        DeadKey::Dead(l, p, e)
    })
}

/// Dead records and checkpoints of page `p` from the checkpoint at `e` on: what a read of
/// epoch `e` needs, in the order it needs it.
pub fn reads_from(l: LineageId, p: PageNo, e: Epoch) -> (Vec<u8>, Vec<u8>) {
    (checkpoint(l, p, e), end_key(K_DEAD, l.0, p.0))
}
/// Dead records of page `p` with death ≥ `from`.
pub fn deads_from(l: LineageId, p: PageNo, from: Epoch) -> (Vec<u8>, Vec<u8>) {
    (key(K_DEAD, &[l.0, p.0, from.0]), end_key(K_DEAD, l.0, p.0))
}
/// Every dead record of `l`.
pub fn deads(l: LineageId) -> (Vec<u8>, Vec<u8>) {
    (key(K_DEAD, &[l.0]), end_key(K_DEAD, l.0, u64::MAX))
}
pub fn index(l: LineageId, w: Epoch, p: PageNo) -> Vec<u8> {
    key(K_INDEX, &[l.0, w.0, p.0])
}
/// Change-index entries of `l` for epochs `[lo, hi]`, from page `from_page` of `lo` on.
pub fn index_range(l: LineageId, lo: Epoch, from_page: PageNo, hi: Epoch) -> (Vec<u8>, Vec<u8>) {
    (
        key(K_INDEX, &[l.0, lo.0, from_page.0]),
        end_key(K_INDEX, l.0, hi.0),
    )
}
pub fn counter(l: LineageId) -> Vec<u8> {
    key(K_COUNTER, &[l.0])
}
pub fn counters() -> (Vec<u8>, Vec<u8>) {
    (vec![K_COUNTER], vec![K_COUNTER + 1])
}
pub fn region(n: u64) -> Vec<u8> {
    key(K_REGION, &[n])
}
pub fn regions() -> (Vec<u8>, Vec<u8>) {
    (vec![K_REGION], vec![K_REGION + 1])
}
pub fn job(seq: u64) -> Vec<u8> {
    key(K_JOB, &[seq])
}
pub fn jobs() -> (Vec<u8>, Vec<u8>) {
    (vec![K_JOB], vec![K_JOB + 1])
}

/// The first key after every key starting with `prefix, a, b` (exclusive upper bound).
fn end_key(prefix: u8, a: u64, b: u64) -> Vec<u8> {
    match b.checked_add(1) {
        Some(b1) => key(prefix, &[a, b1]),
        None => match a.checked_add(1) {
            Some(a1) => key(prefix, &[a1]),
            None => vec![prefix + 1],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page read's keys share one group; its ranges end within it, wider ones do not.
    #[test]
    fn a_page_read_stays_in_its_group() {
        for (l, p) in [
            (5, 3),
            (5, 0x1ff),
            (0xff, 0xff),
            (5, u64::MAX),
            (u64::MAX, u64::MAX),
            (0, 0),
        ] {
            let (l, p) = (LineageId(l), PageNo(p));
            let g = read_group(&page(l, p)).unwrap().to_vec();
            assert_eq!(g, page(l, p));
            for e in [0, 7, u64::MAX] {
                let dk = dead(l, p, Epoch(e));
                let dg = read_group(&dk).unwrap();
                assert_eq!(dg, read_group(&checkpoint(l, p, Epoch(e))).unwrap());
                assert_eq!(dg[0], K_DEAD);
                assert_eq!(dg[1..], g[1..]);
                let (from, to) = reads_from(l, p, Epoch(e));
                assert!(within_group(&from, &to), "{l:?} {p:?} {e}");
                let (from, to) = deads_from(l, p, Epoch(e));
                assert!(within_group(&from, &to));
            }
        }
        let l = LineageId(5);
        let (from, to) = pages(l, PageNo(3), PageNo(5));
        assert!(!within_group(&from, &to));
        let (from, to) = pages(l, PageNo(3), PageNo(4));
        assert!(within_group(&from, &to));
        let (from, to) = pages(l, PageNo(0x1ff), PageNo(0x200));
        assert!(within_group(&from, &to));
        let (from, to) = pages(l, PageNo(0x1ff), PageNo(0x201));
        assert!(!within_group(&from, &to));
        let (from, to) = all_pages(l);
        assert!(read_group(&from).is_none() && !within_group(&from, &to));
        assert!(read_group(&index(l, Epoch(1), PageNo(2))).is_none());
        assert!(read_group(&lineage(l)).is_none());
        assert!(may_hold_groups(b"c", b"q") && may_hold_groups(b"a", b"d\x00"));
        assert!(may_hold_groups(&page(l, PageNo(3)), b"z"));
        assert!(!may_hold_groups(b"a", b"d") && !may_hold_groups(b"e", b"p"));
        assert!(!may_hold_groups(b"q", b"z") && !may_hold_groups(b"Q", b"V"));
    }

    #[test]
    fn ranges_hold_their_keys_only() {
        let l = LineageId(5);
        let (a, b) = deads_from(l, PageNo(3), Epoch(4));
        assert!(dead(l, PageNo(3), Epoch(4)) >= a && dead(l, PageNo(3), Epoch(u64::MAX)) < b);
        assert!(dead(l, PageNo(4), Epoch(0)) >= b);
        assert!(dead(l, PageNo(3), Epoch(3)) < a);
        let (a, b) = index_range(l, Epoch(2), PageNo(0), Epoch(3));
        assert!(index(l, Epoch(3), PageNo(u64::MAX)) < b && index(l, Epoch(4), PageNo(0)) >= b);
        assert!(index(l, Epoch(2), PageNo(0)) >= a);
        let (a, b) = deads(l);
        assert!(
            dead(l, PageNo(u64::MAX), Epoch(u64::MAX)) < b
                && dead(LineageId(6), PageNo(0), Epoch(0)) >= b
        );
        assert!(dead(l, PageNo(0), Epoch(0)) >= a);
        assert_eq!(
            fields::<3>(&dead(l, PageNo(3), Epoch(9)), K_DEAD),
            Some([5, 3, 9])
        );
        // A checkpoint sorts between the dead records of its epoch and the next one.
        let c = checkpoint(l, PageNo(3), Epoch(9));
        assert!(dead(l, PageNo(3), Epoch(9)) < c && c < dead(l, PageNo(3), Epoch(10)));
        assert_eq!(
            dead_key(&c),
            Some(DeadKey::Checkpoint(l, PageNo(3), Epoch(9)))
        );
        assert_eq!(
            dead_key(&dead(l, PageNo(3), Epoch(9))),
            Some(DeadKey::Dead(l, PageNo(3), Epoch(9)))
        );
        assert_eq!(dead_key(&c[..24]), None);
        let (a, b) = reads_from(l, PageNo(3), Epoch(9));
        assert!(a == c && dead(l, PageNo(3), Epoch(9)) < a && dead(l, PageNo(3), Epoch(10)) < b);
        assert!(dead(l, PageNo(4), Epoch(0)) >= b);
    }
}
