//! Table frames (table format 2; docs/design.md §12 "Segmented tables"): a backup's cell
//! table cut into frames of [`SEG`] cells, each stored, sealed and read on its own, so no
//! job holds a whole table of a large volume. This module is the frame's codec and the
//! rules that tie frames to their backup and position; the jobs do not write frames yet
//! (they still write format-1 tables: see the design's plan).
//!
//! Plaintext of frame `k` (zstd-compressed, then sealed under the AAD [`aad`]): `SBTF`,
//! version u8 = 1, first cell u64 LE (= k x SEG), span u32 LE (cells the frame covers:
//! SEG, less in the last frame), count u32 LE, then `count` entries of cell index u64 LE
//! and chunk id (32 bytes), strictly increasing and inside `first..first + span`. Cells
//! not listed read as zeros. A table of `cells` cells has [`count`]`(cells)` frames, at
//! least one, so every table has a last frame (whose AAD says so: a table cut short is
//! noticed).
//!
//! Decoding is bounded like format 1's: nothing read sizes an allocation beyond the
//! frame's span, which the caller derives from the authenticated header, never from the
//! frame.

use std::ops::Range;

use crate::crypto::ChunkId;
use crate::table::T_ENTRY;

/// Cells per frame: 4 GiB of volume at 64 KiB chunks, 2.5 MiB of entries at most.
pub const SEG: u64 = 65_536;
const F_MAGIC: &[u8; 4] = b"SBTF";
/// Bytes of the fixed part before the entries.
pub const F_HEAD: usize = 21;

/// Frames in a table of `cells` cells (at least one).
pub fn count(cells: u64) -> u64 {
    cells.div_ceil(SEG).max(1)
}

/// The cells frame `k` of a table of `cells` cells covers (empty for an empty image).
pub fn range(cells: u64, k: u64) -> Range<u64> {
    let first = k.saturating_mul(SEG).min(cells);
    first..first.saturating_add(SEG).min(cells)
}

/// The object holding frame `k` of backup `backup`.
pub fn key(backup: &str, k: u64) -> String {
    format!("tables/{backup}/{k}")
}

/// What frame `k` of backup `backup` is sealed under: a frame opens only as that frame
/// of that backup, and only the last frame says it is last.
pub fn aad(backup: &str, k: u64, last: bool) -> String {
    format!("snapblk table {backup} {k} {}", u8::from(last))
}

/// The entries of one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub first: u64,
    pub span: u32,
    /// (cell index, chunk), strictly increasing, inside `first..first + span`.
    pub cells: Vec<(u64, ChunkId)>,
}

impl Frame {
    /// Bytes of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        F_HEAD + self.cells.len() * T_ENTRY as usize
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        write(&mut out, self.first, self.span, &self.cells).expect("writing to a Vec");
        out
    }

    /// Decodes frame `k` of a table of `cells` cells: its first cell and span must be
    /// those of that position, its entries in order inside it, nothing after them.
    pub fn decode(b: &[u8], cells: u64, k: u64) -> Result<Frame, String> {
        let want = range(cells, k);
        if k >= count(cells) {
            return Err(format!("frame {k} of a table of {} frames", count(cells)));
        }
        if b.len() < F_HEAD || &b[..4] != F_MAGIC {
            return Err(format!("frame {k}: not a table frame"));
        }
        if b[4] != 1 {
            return Err(format!("frame {k}: version {}", b[4]));
        }
        let u64at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (first, span, n) = (u64at(5), u32at(13), u32at(17));
        if first != want.start || u64::from(span) != want.end - want.start {
            return Err(format!(
                "frame {k} covers cells {first}..{} where cells {}..{} belong",
                first.saturating_add(u64::from(span)),
                want.start,
                want.end
            ));
        }
        // The span bounds the count (one entry per cell at most), and the bytes present
        // must match it exactly: nothing read sizes an allocation beyond them.
        let body = &b[F_HEAD..];
        if n > span || body.len() as u64 != u64::from(n) * T_ENTRY {
            return Err(format!(
                "frame {k}: {n} entries declared in {} bytes for a span of {span} cells",
                body.len()
            ));
        }
        let mut out = Vec::with_capacity(n as usize);
        let mut prev: Option<u64> = None;
        for e in body.chunks_exact(T_ENTRY as usize) {
            let mut a = [0u8; 8];
            a.copy_from_slice(&e[..8]);
            let c = u64::from_le_bytes(a);
            if !want.contains(&c) || prev.is_some_and(|p| c <= p) {
                return Err(format!(
                    "frame {k}: cell {c} out of order or outside {}..{}",
                    want.start, want.end
                ));
            }
            prev = Some(c);
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[8..]);
            out.push((c, ChunkId(id)));
        }
        Ok(Frame {
            first,
            span,
            cells: out,
        })
    }
}

/// Writes the encoding of a frame whose fields are `first`, `span` and `cells` to `w`
/// (as [`Frame::encode`], without building the frame: a writer of a whole table encodes
/// each frame from a slice of it). The caller keeps `cells` inside the frame, in order.
pub fn write(
    w: &mut impl std::io::Write,
    first: u64,
    span: u32,
    cells: &[(u64, ChunkId)],
) -> std::io::Result<()> {
    let mut head = [0u8; F_HEAD];
    head[..4].copy_from_slice(F_MAGIC);
    head[4] = 1;
    head[5..13].copy_from_slice(&first.to_le_bytes());
    head[13..17].copy_from_slice(&span.to_le_bytes());
    head[17..21].copy_from_slice(&(cells.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    for (c, id) in cells {
        w.write_all(&c.to_le_bytes())?;
        w.write_all(&id.0)?;
    }
    Ok(())
}

/// Cuts a table's entries, pushed in cell order, into its frames (empty frames included:
/// every position has one).
pub struct Splitter {
    cells: u64,
    /// The frame being filled.
    k: u64,
    cur: Vec<(u64, ChunkId)>,
}

impl Splitter {
    /// For a table of `cells` cells.
    pub fn new(cells: u64) -> Splitter {
        Splitter {
            cells,
            k: 0,
            cur: Vec::new(),
        }
    }

    fn close(&mut self) -> Frame {
        let r = range(self.cells, self.k);
        self.k += 1;
        Frame {
            first: r.start,
            span: (r.end - r.start) as u32,
            cells: std::mem::take(&mut self.cur),
        }
    }

    /// Adds the entry of `cell`, returning the frames it completed. Entries must come
    /// in strictly increasing cell order, inside the table.
    pub fn push(&mut self, cell: u64, id: ChunkId) -> Result<Vec<Frame>, String> {
        if cell >= self.cells || self.cur.last().is_some_and(|(p, _)| cell <= *p) {
            return Err(format!(
                "cell {cell} out of order or beyond the table's {} cells",
                self.cells
            ));
        }
        let mut done = Vec::new();
        while cell >= range(self.cells, self.k).end {
            done.push(self.close());
        }
        self.cur.push((cell, id));
        Ok(done)
    }

    /// The frames left, up to the last.
    pub fn finish(mut self) -> Vec<Frame> {
        let mut done = Vec::new();
        while self.k < count(self.cells) {
            done.push(self.close());
        }
        done
    }
}

/// The table digest of format 2: BLAKE3 over the frames' plaintexts in order.
#[derive(Default)]
pub struct Digest(blake3::Hasher);

impl Digest {
    pub fn add(&mut self, encoded_frame: &[u8]) {
        self.0.update(encoded_frame);
    }
    pub fn hex(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(c: u64) -> ChunkId {
        ChunkId([c as u8; 32])
    }

    fn split(cells: u64, entries: &[u64]) -> Vec<Frame> {
        let mut s = Splitter::new(cells);
        let mut frames = Vec::new();
        for &c in entries {
            frames.extend(s.push(c, id(c)).unwrap());
        }
        frames.extend(s.finish());
        frames
    }

    #[test]
    fn counts_and_ranges_cover_the_table_once() {
        assert_eq!(count(0), 1);
        assert_eq!(range(0, 0), 0..0);
        assert_eq!(count(1), 1);
        assert_eq!(count(SEG), 1);
        assert_eq!(count(SEG + 1), 2);
        assert_eq!(range(SEG + 1, 1), SEG..SEG + 1);
        // 1 TiB of 4 KiB cells: 4,096 frames, the last one whole.
        assert_eq!(count(1 << 28), 4096);
        assert_eq!(range(1 << 28, 4095).end, 1 << 28);
    }

    #[test]
    fn a_frame_opens_only_at_its_own_position() {
        let cells = 3 * SEG;
        let f = &split(cells, &[5, SEG + 7])[1];
        let b = f.encode();
        assert_eq!(Frame::decode(&b, cells, 1).unwrap(), *f);
        for (c, k) in [
            (cells, 0),
            (cells, 2),
            (cells, 3),
            (SEG + SEG / 2, 1),
            (SEG + 8, 1),
        ] {
            assert!(
                Frame::decode(&b, c, k).is_err(),
                "frame 1 read as {k} of {c}"
            );
        }
        // A frame does not name its table's size: a table cut short right after a whole
        // frame is caught by the AAD, where only the true last frame says it is last.
        assert_ne!(aad("b", 1, false), aad("b", 1, true));
        assert_ne!(aad("b", 1, false), aad("c", 1, false));
    }

    #[test]
    fn bad_frames_are_refused() {
        let cells = 2 * SEG;
        let f = &split(cells, &[1, 2, 3])[0];
        let good = f.encode();
        let mut trailing = good.clone();
        trailing.push(0);
        let mut unsorted = good.clone();
        unsorted[F_HEAD..F_HEAD + 8].copy_from_slice(&3u64.to_le_bytes());
        let mut huge = good.clone();
        huge[17..21].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut outside = good.clone();
        let at = F_HEAD + 2 * T_ENTRY as usize;
        outside[at..at + 8].copy_from_slice(&SEG.to_le_bytes());
        for (what, b) in [
            ("trailing bytes", trailing),
            ("out of order", unsorted),
            ("a count beyond its span", huge),
            ("a cell of the next frame", outside),
            ("truncated", good[..good.len() - 1].to_vec()),
        ] {
            assert!(Frame::decode(&b, cells, 0).is_err(), "{what} accepted");
        }
    }

    #[test]
    fn the_splitter_refuses_entries_out_of_order_or_outside() {
        let mut s = Splitter::new(10);
        s.push(3, id(3)).unwrap();
        assert!(s.push(3, id(3)).is_err());
        assert!(s.push(10, id(10)).is_err());
    }

    proptest! {
        #[test]
        fn frames_hold_exactly_the_table(
            cells in 0u64..(4 * SEG),
            picks in proptest::collection::btree_set(0u64..(4 * SEG), 0..200),
        ) {
            let entries: Vec<u64> = picks.into_iter().filter(|c| *c < cells).collect();
            let frames = split(cells, &entries);
            prop_assert_eq!(frames.len() as u64, count(cells));
            let mut back = Vec::new();
            for (k, f) in frames.iter().enumerate() {
                let d = Frame::decode(&f.encode(), cells, k as u64).unwrap();
                prop_assert_eq!(&d, f);
                back.extend(d.cells.iter().map(|(c, _)| *c));
            }
            prop_assert_eq!(back, entries);
        }

        #[test]
        fn frame_decode_never_panics(
            b in proptest::collection::vec(any::<u8>(), 0..200),
            cells in any::<u64>(),
            k in any::<u64>(),
        ) {
            let _ = Frame::decode(&b, cells, k);
        }
    }
}
