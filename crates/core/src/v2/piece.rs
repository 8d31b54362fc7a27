//! A piece: part of an extent inside one page — `len` blocks at page offset `off`, stored
//! at data blocks `pba..pba + len`, born in epoch `birth`, with one CRC32C per block.
//!
//! Encoding (format2.md §2): `u8 off | u8 len-1 | u8 flags | 6 B pba | varint birth |
//! len × u32 crc`. Decoding checks every field; it never panics on bad bytes.

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
    /// One CRC32C per block. Inline for short pieces (most of a random-write page): a
    /// page decode then allocates once, not once per piece.
    pub crcs: Crcs,
}

pub type Crcs = smallvec::SmallVec<[u32; 4]>;

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
            crcs: Crcs::from_slice(&self.crcs[skip..skip + n]),
        }
    }
    /// Whether `next` continues this piece in lba and pba with the same birth and flags.
    pub fn joins(&self, next: &Piece) -> bool {
        self.end() == next.start()
            && self.pba + u64::from(self.len) == next.pba
            && self.birth == next.birth
            && self.flags == next.flags
            && self.len as u64 + next.len as u64 <= PAGE_BLOCKS
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.off);
        out.push(self.len - 1);
        out.push(self.flags.0);
        out.extend_from_slice(&self.pba.to_le_bytes()[..6]);
        varint::put(out, self.birth.0);
        for c in &self.crcs {
            out.extend_from_slice(&c.to_le_bytes());
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
    crcs: &'a [u8],
}

impl<'a> PieceView<'a> {
    pub fn start(&self) -> u64 {
        u64::from(self.off)
    }
    pub fn end(&self) -> u64 {
        u64::from(self.off) + u64::from(self.len)
    }
    /// The checksum of block `i` of the piece (`i < len`).
    pub fn crc(&self, i: usize) -> u32 {
        let c = &self.crcs[4 * i..4 * i + 4];
        u32::from_le_bytes([c[0], c[1], c[2], c[3]])
    }
    pub fn to_piece(&self) -> Piece {
        Piece {
            off: self.off,
            len: self.len,
            pba: self.pba,
            birth: self.birth,
            flags: self.flags,
            crcs: (0..usize::from(self.len)).map(|i| self.crc(i)).collect(),
        }
    }

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
        if flags & !PieceFlags::BASE.0 != 0 {
            return Err("unknown piece flags");
        }
        let birth = Epoch(varint::take(buf).ok_or("piece birth truncated")?);
        let flags = PieceFlags(flags);
        if flags.is_base() != (birth == Epoch::ZERO) {
            return Err("piece birth and BASE flag disagree");
        }
        let n = 4 * usize::from(len);
        if buf.len() < n {
            return Err("piece checksums truncated");
        }
        let (crcs, rest) = buf.split_at(n);
        *buf = rest;
        Ok(PieceView {
            off,
            len: len as u8,
            pba: u64::from_le_bytes(pba),
            birth,
            flags,
            crcs,
        })
    }
}
