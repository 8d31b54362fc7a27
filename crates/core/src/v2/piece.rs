//! A piece: part of an extent inside one page — `len` blocks at page offset `off`, stored
//! at data blocks `pba..pba + len`, born in epoch `birth`, with one CRC32C per block: held
//! inline, or (flag `CSUM`, format2.md §9b) in slots `slot..slot + len` of a checksum block
//! on the data device.
//!
//! Encoding (format2.md §2): `u8 off | u8 len-1 | u8 flags | 6 B pba | varint birth |
//! len × u32 crc` — with `CSUM`: `… | varint birth | 6 B block | u16 slot | u32 crc of the
//! block`. Decoding checks every field; it never panics on bad bytes.

use super::ids::Epoch;
use super::{varint, PAGE_BLOCKS};

/// Data blocks are addressed with 48 bits in pieces (1 EiB of 4 KiB blocks).
pub const MAX_PBA: u64 = 1 << 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PieceFlags(u8);

impl PieceFlags {
    /// Inherited from the base lineage by copy-up: not owned, never freed by this lineage.
    pub const BASE: PieceFlags = PieceFlags(1);
    pub const OWN: PieceFlags = PieceFlags(0);
    /// The CRCs are in a checksum block (format2.md §9b), not in the piece.
    const CSUM: u8 = 2;
    pub fn is_base(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn bits(self) -> u8 {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub off: u8,
    pub len: u8,
    pub pba: u64,
    pub birth: Epoch,
    pub flags: PieceFlags,
    pub sums: Sums,
}

/// One CRC32C per block. Inline for short pieces (most of a random-write page): a page
/// decode then allocates once, not once per piece.
pub type Crcs = smallvec::SmallVec<[u32; 4]>;

/// CRCs per checksum block: 4 KiB of u32 (format2.md §9b).
pub const SUM_SLOTS: usize = 1024;

/// Where a checksum block is and what it holds: `slot..slot + len` of block `at` are the
/// piece's CRCs; `crc` is the CRC32C of the whole 4 KiB block (checked on every load).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SumRef {
    pub at: u64,
    pub slot: u16,
    pub crc: u32,
}

/// Where a piece's per-block CRCs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sums {
    Inline(Crcs),
    Block(SumRef),
}

/// The checksum of one block: its value, or where to find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sum {
    Crc(u32),
    /// Slot `slot` of the checksum block (`SumRef::slot` is that block's slot here).
    Slot(SumRef),
}

impl Sums {
    fn slice(&self, skip: usize, n: usize) -> Sums {
        match self {
            Sums::Inline(c) => Sums::Inline(Crcs::from_slice(&c[skip..skip + n])),
            Sums::Block(r) => Sums::Block(SumRef {
                slot: r.slot + skip as u16,
                ..*r
            }),
        }
    }
    /// Whether `next` (of a piece `len` blocks after this one's start) continues these.
    fn joins(&self, len: u8, next: &Sums) -> bool {
        match (self, next) {
            (Sums::Inline(_), Sums::Inline(_)) => true,
            (Sums::Block(a), Sums::Block(b)) => {
                a.at == b.at && a.crc == b.crc && a.slot + u16::from(len) == b.slot
            }
            _ => false,
        }
    }
    /// Appends the CRCs of a piece that `joins` this one.
    pub fn append(&mut self, next: Sums) {
        if let (Sums::Inline(a), Sums::Inline(b)) = (self, next) {
            a.extend(b);
        }
    }
    /// The inline CRCs, if they are inline.
    pub fn inline(&self) -> Option<&[u32]> {
        match self {
            Sums::Inline(c) => Some(c),
            Sums::Block(_) => None,
        }
    }
    pub fn block(&self) -> Option<SumRef> {
        match self {
            Sums::Block(r) => Some(*r),
            Sums::Inline(_) => None,
        }
    }
    /// The checksum of block `i` (`i` < the piece's length).
    pub fn get(&self, i: usize) -> Sum {
        match self {
            Sums::Inline(c) => Sum::Crc(c[i]),
            Sums::Block(r) => Sum::Slot(SumRef {
                slot: r.slot + i as u16,
                ..*r
            }),
        }
    }
}

impl Piece {
    pub fn start(&self) -> u64 {
        u64::from(self.off)
    }
    pub fn end(&self) -> u64 {
        u64::from(self.off) + u64::from(self.len)
    }
    pub fn owned(&self) -> bool {
        !self.flags.is_base()
    }
    /// The part of this piece covering page offsets `[from, to)` (clamped to the piece).
    pub fn slice(&self, from: u64, to: u64) -> Piece {
        let from = from.max(self.start());
        let to = to.min(self.end()).max(from);
        let skip = (from - self.start()) as usize;
        let n = (to - from) as usize;
        Piece {
            off: from as u8,
            len: n as u8,
            pba: self.pba + skip as u64,
            birth: self.birth,
            flags: self.flags,
            sums: self.sums.slice(skip, n),
        }
    }
    /// Whether `next` continues this piece in lba and pba with the same birth and flags.
    pub fn joins(&self, next: &Piece) -> bool {
        self.end() == next.start()
            && self.pba + u64::from(self.len) == next.pba
            && self.birth == next.birth
            && self.flags == next.flags
            && self.len as u64 + next.len as u64 <= PAGE_BLOCKS
            && self.sums.joins(self.len, &next.sums)
    }
    /// Whether the owner's blocks are counted by checksum block `at` (format2.md §9b).
    pub fn counted_in(&self) -> Option<u64> {
        self.sums.block().filter(|_| self.owned()).map(|r| r.at)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.off);
        out.push(self.len - 1);
        let csum = match self.sums {
            Sums::Block(_) => PieceFlags::CSUM,
            Sums::Inline(_) => 0,
        };
        out.push(self.flags.0 | csum);
        out.extend_from_slice(&self.pba.to_le_bytes()[..6]);
        varint::put(out, self.birth.0);
        match &self.sums {
            Sums::Inline(c) => {
                for c in c {
                    out.extend_from_slice(&c.to_le_bytes());
                }
            }
            Sums::Block(r) => {
                out.extend_from_slice(&r.at.to_le_bytes()[..6]);
                out.extend_from_slice(&r.slot.to_le_bytes());
                out.extend_from_slice(&r.crc.to_le_bytes());
            }
        }
    }

    /// Decodes one piece from the front of `buf`, or says what is wrong with it.
    pub fn decode(buf: &mut &[u8]) -> Result<Piece, &'static str> {
        PieceView::decode(buf).map(|v| v.to_piece())
    }
}

/// A decoded piece whose checksums stay in the encoded buffer: reads visit pieces this way
/// without allocating (format2.md §2 encoding; the same checks as [`Piece::decode`]).
#[derive(Debug, Clone, Copy)]
pub struct PieceView<'a> {
    pub off: u8,
    pub len: u8,
    pub pba: u64,
    pub birth: Epoch,
    pub flags: PieceFlags,
    sums: ViewSums<'a>,
}

#[derive(Debug, Clone, Copy)]
enum ViewSums<'a> {
    Inline(&'a [u8]),
    Block(SumRef),
}

impl<'a> PieceView<'a> {
    pub fn start(&self) -> u64 {
        u64::from(self.off)
    }
    pub fn end(&self) -> u64 {
        u64::from(self.off) + u64::from(self.len)
    }
    /// The checksum of block `i` of the piece (`i < len`).
    pub fn sum(&self, i: usize) -> Sum {
        match self.sums {
            ViewSums::Inline(c) => {
                let c = &c[4 * i..4 * i + 4];
                Sum::Crc(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            }
            ViewSums::Block(r) => Sum::Slot(SumRef {
                slot: r.slot + i as u16,
                ..r
            }),
        }
    }
    /// The checksum block holding this piece's CRCs, if it has one.
    pub fn sum_block(&self) -> Option<SumRef> {
        match self.sums {
            ViewSums::Block(r) => Some(r),
            ViewSums::Inline(_) => None,
        }
    }
    pub fn to_piece(&self) -> Piece {
        let sums = match self.sums {
            ViewSums::Block(r) => Sums::Block(r),
            ViewSums::Inline(c) => Sums::Inline(
                c.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
        };
        Piece {
            off: self.off,
            len: self.len,
            pba: self.pba,
            birth: self.birth,
            flags: self.flags,
            sums,
        }
    }

    #[inline]
    pub fn decode(buf: &mut &'a [u8]) -> Result<PieceView<'a>, &'static str> {
        if buf.len() < 9 {
            return Err("piece header truncated");
        }
        let off = buf[0];
        let len = u16::from(buf[1]) + 1;
        let flags = buf[2];
        let mut pba = [0u8; 8];
        pba[..6].copy_from_slice(&buf[3..9]);
        *buf = &buf[9..];
        if u64::from(off) + u64::from(len) > PAGE_BLOCKS {
            return Err("piece crosses its page");
        }
        if flags & !(PieceFlags::BASE.0 | PieceFlags::CSUM) != 0 {
            return Err("unknown piece flags");
        }
        let birth = Epoch(varint::take(buf).ok_or("piece birth truncated")?);
        let csum = flags & PieceFlags::CSUM != 0;
        let flags = PieceFlags(flags & PieceFlags::BASE.0);
        if flags.is_base() != (birth == Epoch::ZERO) {
            return Err("piece birth and BASE flag disagree");
        }
        let sums = if csum {
            if buf.len() < 12 {
                return Err("piece checksum block truncated");
            }
            let mut at = [0u8; 8];
            at[..6].copy_from_slice(&buf[..6]);
            let slot = u16::from_le_bytes([buf[6], buf[7]]);
            let crc = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
            *buf = &buf[12..];
            if usize::from(slot) + usize::from(len) > SUM_SLOTS {
                return Err("piece checksum slots beyond their block");
            }
            ViewSums::Block(SumRef {
                at: u64::from_le_bytes(at),
                slot,
                crc,
            })
        } else {
            let n = 4 * usize::from(len);
            if buf.len() < n {
                return Err("piece checksums truncated");
            }
            let (crcs, rest) = buf.split_at(n);
            *buf = rest;
            ViewSums::Inline(crcs)
        };
        Ok(PieceView {
            off,
            len: len as u8,
            pba: u64::from_le_bytes(pba),
            birth,
            flags,
            sums,
        })
    }
}
