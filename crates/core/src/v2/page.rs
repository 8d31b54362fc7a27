//! Sorted, disjoint piece lists — a live page or a dead record — and their encodings.
//!
//! `page: u8 version=2 | varint x_epoch | varint dead_run | varint n | n × piece` (version 1
//! has no `dead_run`); `dead` and read checkpoints: `u8 version=1 | varint n | n × piece`
//! (format2.md §2). Decoders check order, overlap and counts before trusting them.

use std::ops::ControlFlow;

use super::ids::Epoch;
use super::piece::{Piece, PieceView};
use super::{varint, PAGE_BLOCKS};

const VERSION: u8 = 1;
/// Live pages since read checkpoints (format2.md §8a) carry `dead_run`.
const PAGE_VERSION: u8 = 2;

/// Removes page offsets `[from, to)` from `list`; returns the removed parts in order.
pub fn cut(list: &mut Vec<Piece>, from: u64, to: u64) -> Vec<Piece> {
    let mut removed = Vec::new();
    if from >= to {
        return removed;
    }
    let mut out = Vec::with_capacity(list.len() + 1);
    for p in list.drain(..) {
        if p.end() <= from || p.start() >= to {
            out.push(p);
            continue;
        }
        if p.start() < from {
            out.push(p.slice(p.start(), from));
        }
        removed.push(p.slice(from, to));
        if p.end() > to {
            out.push(p.slice(to, p.end()));
        }
    }
    *list = out;
    removed
}

/// Inserts `piece` into `list`, whose range it must not overlap (else `Err`); merges it with
/// neighbours it continues.
pub fn insert(list: &mut Vec<Piece>, piece: Piece) -> Result<(), &'static str> {
    let i = list.partition_point(|p| p.start() < piece.start());
    if i > 0 && list[i - 1].end() > piece.start() {
        return Err("piece overlaps its predecessor");
    }
    if i < list.len() && list[i].start() < piece.end() {
        return Err("piece overlaps its successor");
    }
    list.insert(i, piece);
    // Merge with the successor, then with the predecessor.
    if i + 1 < list.len() && list[i].joins(&list[i + 1]) {
        let next = list.remove(i + 1);
        list[i].len += next.len;
        list[i].sums.append(next.sums);
    }
    if i > 0 && list[i - 1].joins(&list[i]) {
        let cur = list.remove(i);
        list[i - 1].len += cur.len;
        list[i - 1].sums.append(cur.sums);
    }
    Ok(())
}

fn encode_list(out: &mut Vec<u8>, list: &[Piece]) {
    varint::put(out, list.len() as u64);
    for p in list {
        p.encode(out);
    }
}

fn decode_list(buf: &mut &[u8]) -> Result<Vec<Piece>, String> {
    let mut list: Vec<Piece> = Vec::new();
    visit_list(buf, |p| {
        list.push(p.to_piece());
        ControlFlow::Continue(())
    })?;
    Ok(list)
}

/// Decodes a piece list, handing each piece to `f` in order without allocating; checks the
/// count, order, overlap and trailing bytes (an error may come after some pieces were seen).
/// When `f` breaks, the list is left there: the pieces after it are neither decoded nor
/// checked (a read past the slots it wants; `check` decodes every record whole).
fn visit_list<'a>(
    buf: &mut &'a [u8],
    mut f: impl FnMut(&PieceView<'a>) -> ControlFlow<()>,
) -> Result<(), String> {
    let n = varint::take(buf).ok_or("piece count truncated")?;
    if n > PAGE_BLOCKS {
        return Err(format!("{n} pieces in one page"));
    }
    let mut prev_end = 0u64;
    for i in 0..n {
        let p = PieceView::decode(buf)?;
        if i > 0 && prev_end > p.start() {
            return Err("pieces out of order or overlapping".into());
        }
        prev_end = p.end();
        if f(&p).is_break() {
            return Ok(());
        }
    }
    if !buf.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(())
}

/// The live page of a lineage: its current content in 64 blocks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// The newest epoch whose change-index entry `x(L, epoch, page)` exists.
    pub x_epoch: Epoch,
    /// Dead records this page gained since its last read checkpoint (format2.md §8a).
    pub dead_run: u64,
    pub pieces: Vec<Piece>,
}

impl Page {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.pieces.len() * 20);
        out.push(PAGE_VERSION);
        varint::put(&mut out, self.x_epoch.0);
        varint::put(&mut out, self.dead_run);
        encode_list(&mut out, &self.pieces);
        out
    }
    pub fn decode(mut buf: &[u8]) -> Result<Page, String> {
        let (x_epoch, dead_run) = Self::header(&mut buf)?;
        let pieces = decode_list(&mut buf)?;
        Ok(Page {
            x_epoch,
            dead_run,
            pieces,
        })
    }
    /// The pieces of an encoded page in order, without decoding the rest (reads), until
    /// `f` breaks.
    pub fn visit<'a>(
        mut buf: &'a [u8],
        f: impl FnMut(&PieceView<'a>) -> ControlFlow<()>,
    ) -> Result<(), String> {
        Self::header(&mut buf)?;
        visit_list(&mut buf, f)
    }
    fn header(buf: &mut &[u8]) -> Result<(Epoch, u64), String> {
        let (&v, rest) = buf.split_first().ok_or("empty page value")?;
        if v != VERSION && v != PAGE_VERSION {
            return Err(format!("page version {v}"));
        }
        *buf = rest;
        let x_epoch = Epoch(varint::take(buf).ok_or("x epoch truncated")?);
        let dead_run = if v == PAGE_VERSION {
            varint::take(buf).ok_or("dead run truncated")?
        } else {
            0
        };
        Ok((x_epoch, dead_run))
    }
}

/// Pieces a write or trim in epoch `death` removed while a snapshot still needed them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeadRecord {
    pub pieces: Vec<Piece>,
}

impl DeadRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.pieces.len() * 20);
        out.push(VERSION);
        encode_list(&mut out, &self.pieces);
        out
    }
    pub fn decode(mut buf: &[u8]) -> Result<DeadRecord, String> {
        Self::header(&mut buf)?;
        Ok(DeadRecord {
            pieces: decode_list(&mut buf)?,
        })
    }
    /// The pieces of an encoded dead record or read checkpoint in order, without
    /// allocating (reads), until `f` breaks.
    pub fn visit<'a>(
        mut buf: &'a [u8],
        f: impl FnMut(&PieceView<'a>) -> ControlFlow<()>,
    ) -> Result<(), String> {
        Self::header(&mut buf)?;
        visit_list(&mut buf, f)
    }
    fn header(buf: &mut &[u8]) -> Result<(), String> {
        let (&v, rest) = buf.split_first().ok_or("empty dead record")?;
        if v != VERSION {
            return Err(format!("dead record version {v}"));
        }
        *buf = rest;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::piece::{PieceFlags, SumRef, Sums};
    use super::*;
    use proptest::prelude::*;

    fn piece(off: u8, len: u8, pba: u64, birth: u64) -> Piece {
        Piece {
            off,
            len,
            pba,
            birth: Epoch(birth),
            flags: PieceFlags::OWN,
            sums: Sums::Inline((0..len as u32).map(|i| pba as u32 + i).collect()),
        }
    }

    fn summed(off: u8, len: u8, pba: u64, at: u64, slot: u16) -> Piece {
        Piece {
            sums: Sums::Block(SumRef {
                at,
                slot,
                crc: 0xfeed_beef,
            }),
            ..piece(off, len, pba, 1)
        }
    }

    #[test]
    fn checksum_block_pieces_cut_and_merge_by_slot() {
        let mut l = vec![summed(0, 64, 1000, 7, 100)];
        let removed = cut(&mut l, 10, 20);
        assert_eq!(removed, vec![summed(10, 10, 1010, 7, 110)]);
        assert_eq!(
            l,
            vec![summed(0, 10, 1000, 7, 100), summed(20, 44, 1020, 7, 120)]
        );
        insert(&mut l, summed(10, 10, 1010, 7, 110)).unwrap();
        assert_eq!(l, vec![summed(0, 64, 1000, 7, 100)]);
        // Contiguous data whose CRCs are elsewhere (another block, other slots, inline)
        // stays a separate piece.
        for other in [
            summed(10, 10, 1010, 8, 110),
            summed(10, 10, 1010, 7, 300),
            piece(10, 10, 1010, 1),
        ] {
            let mut l = vec![summed(0, 10, 1000, 7, 100), summed(20, 44, 1020, 7, 120)];
            insert(&mut l, other).unwrap();
            assert_eq!(l.len(), 3);
        }
        let p = Page {
            x_epoch: Epoch(2),
            dead_run: 0,
            pieces: vec![summed(0, 10, 1000, (1 << 48) - 1, 1014), piece(10, 2, 5, 1)],
        };
        assert_eq!(Page::decode(&p.encode()).unwrap(), p);
    }

    proptest! {
        /// Decoders never panic on arbitrary bytes, and what they accept re-encodes to the
        /// same bytes.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(p) = Page::decode(&bytes) {
                let again = Page::decode(&p.encode()).unwrap();
                prop_assert_eq!(again, p);
            }
            if let Ok(d) = DeadRecord::decode(&bytes) {
                prop_assert_eq!(DeadRecord::decode(&d.encode()).unwrap(), d);
            }
        }

        /// Any list of pieces, inline or in checksum blocks, round-trips.
        #[test]
        fn piece_lists_round_trip(spec in proptest::collection::vec(
            (1u8..8, any::<bool>(), 0u64..1 << 48, 0u16..1000), 0..8)) {
            let mut pieces = Vec::new();
            let mut off = 0u8;
            for (len, csum, pba, slot) in spec {
                let p = if csum { summed(off, len, pba, pba ^ 5, slot) } else { piece(off, len, pba, 3) };
                pieces.push(p);
                off += len;
            }
            let d = DeadRecord { pieces };
            prop_assert_eq!(DeadRecord::decode(&d.encode()).unwrap(), d);
        }
    }

    #[test]
    fn cut_and_insert_merge() {
        let mut l = vec![piece(0, 64, 1000, 1)];
        let removed = cut(&mut l, 10, 20);
        assert_eq!(removed, vec![piece(10, 10, 1010, 1)]);
        assert_eq!(l, vec![piece(0, 10, 1000, 1), piece(20, 44, 1020, 1)]);
        insert(&mut l, piece(10, 10, 1010, 1)).unwrap();
        assert_eq!(l, vec![piece(0, 64, 1000, 1)]);
        assert!(insert(&mut l, piece(5, 1, 7, 1)).is_err());
        let mut d = vec![];
        insert(&mut d, piece(30, 2, 500, 2)).unwrap();
        insert(&mut d, piece(10, 2, 600, 2)).unwrap();
        assert_eq!(d[0].off, 10);
    }

    #[test]
    fn encodings_round_trip() {
        let p = Page {
            x_epoch: Epoch(7),
            dead_run: 3,
            pieces: vec![piece(0, 3, 1 << 40, 300), piece(3, 61, 5, 1)],
        };
        assert_eq!(Page::decode(&p.encode()).unwrap(), p);
        // Version 1 (before read checkpoints) still decodes, with no dead run.
        let mut v1 = vec![1u8];
        varint::put(&mut v1, 7);
        encode_list(&mut v1, &p.pieces);
        let old = Page::decode(&v1).unwrap();
        assert_eq!(
            (old.x_epoch, old.dead_run, &old.pieces),
            (p.x_epoch, 0, &p.pieces)
        );
        let d = DeadRecord {
            pieces: vec![piece(60, 4, 9, 2)],
        };
        assert_eq!(DeadRecord::decode(&d.encode()).unwrap(), d);
    }
}
