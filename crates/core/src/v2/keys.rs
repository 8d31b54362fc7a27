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
/// `b`+block: owned blocks whose CRCs checksum block `block` holds (format2.md §9b).
pub const K_SUM_COUNT: u8 = b'b';
/// In the store's *derived* key space (not the map's): `e`+L+E+page, the content of a
/// page at retained epoch E (format2.md §8c).
pub const K_CONTENT: u8 = b'e';
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
/// Derived key of the content of page `p` of `l` at retained epoch `e`.
pub fn content(l: LineageId, e: Epoch, p: PageNo) -> Vec<u8> {
    key(K_CONTENT, &[l.0, e.0, p.0])
}
/// Derived keys of every page of `l` at `e`.
pub fn contents_at(l: LineageId, e: Epoch) -> (Vec<u8>, Vec<u8>) {
    (key(K_CONTENT, &[l.0, e.0]), end_key(K_CONTENT, l.0, e.0))
}
/// Every derived content key.
pub fn all_contents() -> (Vec<u8>, Vec<u8>) {
    (vec![K_CONTENT], vec![K_CONTENT + 1])
}
pub fn sum_count(at: u64) -> Vec<u8> {
    key(K_SUM_COUNT, &[at])
}
pub fn sum_counts() -> (Vec<u8>, Vec<u8>) {
    (vec![K_SUM_COUNT], vec![K_SUM_COUNT + 1])
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
