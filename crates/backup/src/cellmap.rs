//! A lazy restore's map of its backup's table (docs/design.md §12): for each table
//! position (the cells holding data, in cell order) its cell, chunk and location, in a
//! private unnamed file on local disk read with `pread`; in RAM only a bitmap over the
//! cells of each table frame holding data (1 bit per cell, 2 bytes per 64 cells of
//! running counts; a frame without data costs 32 bytes) that turns a byte range into its
//! positions, and the names of the packs the locations point into. For a 1 TiB volume of
//! 64 KiB cells: ~2.5 MiB of RAM and 832 MiB of file, where the table and its locations in
//! RAM took ~1.3 GiB.
//!
//! Built at every start of the restore, a resume included (gc may have repacked chunks
//! while it was interrupted: the restore's hold keeps the backup, not its packs' layout),
//! from a local copy of the table taken under the job's lease, frame by frame, each
//! frame's chunks located in the local chunk index: memory while building follows a
//! frame. Locations follow the restore's rule (`Chunks::locations`, per frame, as a full
//! restore reads them). Every chunk must be located, or the build fails naming the first
//! missing, before the restore serves anything.
//!
//! The file is this process's own (unnamed: it disappears with the process), so it is
//! trusted as memory is; every chunk fetched through it is still verified against its id.
//!
//! Threading: built once; reads take `&self` and may run on any thread.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::chunks::Chunks;
use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::frame;
use crate::index::Loc;
use crate::manifest::Header;
use crate::repo::Repository;
use crate::restore::PackNames;
use crate::tablecopy::{self, TableCopy};

/// Bytes of one record: cell u64 LE, chunk id 32, pack number, offset, length u32 LE.
const RECORD: usize = 52;

/// One table position: its cell, chunk and where the chunk is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub cell: u64,
    pub id: ChunkId,
    pub loc: Loc,
}

pub(crate) struct CellMap {
    file: File,
    size: u64,
    chunk_size: u64,
    entries: usize,
    /// Per table frame: which of its cells hold data (are table positions).
    frames: Vec<FrameBits>,
    packs: Vec<String>,
}

/// Frame `k`'s cells holding data: bit i of word w is cell k x SEG + 64 w + i.
struct FrameBits {
    /// Positions before the frame.
    before: usize,
    /// None: no cell of the frame holds data.
    words: Option<Box<[u64]>>,
    /// Positions in the frame before each word.
    counts: Option<Box<[u16]>>,
}

/// Words of a frame's bitmap.
const FRAME_WORDS: usize = (frame::SEG / 64) as usize;

impl FrameBits {
    /// The bits of a frame whose cells holding data are `cells` (from an authenticated
    /// frame: inside its span, in order), after `before` positions.
    fn of(before: usize, cells: impl Iterator<Item = u64>) -> FrameBits {
        let mut words: Option<Box<[u64]>> = None;
        for c in cells {
            let w = words.get_or_insert_with(|| vec![0u64; FRAME_WORDS].into_boxed_slice());
            let i = (c % frame::SEG) as usize;
            w[i / 64] |= 1 << (i % 64);
        }
        let counts = words.as_ref().map(|words| {
            let mut n = 0u16;
            words
                .iter()
                .map(|w| {
                    let at = n;
                    // At most 65,536 - 64 cells before a word: fits; the sum after the
                    // last word is not used.
                    n = n.wrapping_add(w.count_ones() as u16);
                    at
                })
                .collect()
        });
        FrameBits {
            before,
            words,
            counts,
        }
    }
}

fn local(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = what.to_string();
    let path = path.display().to_string();
    move |e| BackupError::LocalState {
        what,
        path,
        detail: e.to_string(),
    }
}

impl CellMap {
    /// Builds the map of `h`'s table in an unnamed file in `dir`.
    pub(crate) fn build(repo: &Repository, h: &Header, dir: &Path) -> Result<CellMap> {
        let t0 = std::time::Instant::now();
        // The table's copy and the chunk index's catch-up are independent requests (a
        // first read waits for both): side by side.
        let (copy, chunks) = std::thread::scope(|s| {
            let index = s.spawn(|| Chunks::load(repo).map(|c| (c, t0.elapsed())));
            let copy = TableCopy::take(repo, h).map(|c| (c, t0.elapsed()));
            let index = index
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (copy, index)
        });
        let ((copy, t_copy), (chunks, t_index)) = (copy?, chunks?);
        let t_ready = t0.elapsed();
        let chunk_size = u64::from(h.chunk_size);
        let what = format!("the map of the lazy restore of {}", h.name());
        let file = tempfile::tempfile_in(dir).map_err(local(&what, dir))?;
        let mut w = BufWriter::with_capacity(1 << 20, &file);
        let mut frames: Vec<FrameBits> = Vec::with_capacity(copy.count() as usize);
        let mut packs: Vec<String> = Vec::new();
        let mut numbers: HashMap<String, u32> = HashMap::new();
        let mut entries = 0usize;
        let mut rec = [0u8; RECORD];
        for k in 0..copy.count() {
            let t = copy.frame(k)?;
            let locs = chunks.locations(tablecopy::distinct(&t.cells))?;
            if let Some(id) = locs.first_missing() {
                return Err(BackupError::MissingChunk(id.hex()));
            }
            // This frame's pack numbers -> the map's.
            let to_map: Vec<u32> = locs
                .packs()
                .iter()
                .map(|(name, _)| {
                    *numbers.entry(name.clone()).or_insert_with(|| {
                        packs.push(name.clone());
                        (packs.len() - 1) as u32
                    })
                })
                .collect();
            frames.push(FrameBits::of(entries, t.cells.iter().map(|(c, _)| *c)));
            for (c, id) in &t.cells {
                let l = locs
                    .get(id)
                    .ok_or_else(|| BackupError::MissingChunk(id.hex()))?;
                rec[..8].copy_from_slice(&c.to_le_bytes());
                rec[8..40].copy_from_slice(&id.0);
                rec[40..44].copy_from_slice(&to_map[l.pack as usize].to_le_bytes());
                rec[44..48].copy_from_slice(&l.offset.to_le_bytes());
                rec[48..52].copy_from_slice(&l.len.to_le_bytes());
                w.write_all(&rec).map_err(local(&what, dir))?;
                entries += 1;
            }
        }
        w.flush().map_err(local(&what, dir))?;
        drop(w);
        // What a lazy restore's first read waits for, by step.
        log::info!(
            "{what}: {entries} cells in {} ms (table copy {} ms beside the chunk index {} ms, then locating {} ms)",
            t0.elapsed().as_millis(),
            t_copy.as_millis(),
            t_index.as_millis(),
            (t0.elapsed() - t_ready).as_millis()
        );
        Ok(CellMap {
            file,
            size: h.size,
            chunk_size,
            entries,
            frames,
            packs,
        })
    }

    /// Table positions.
    pub(crate) fn len(&self) -> usize {
        self.entries
    }

    pub(crate) fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Bytes of the restored image.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of cell `cell` (the last may be short).
    pub(crate) fn cell_len(&self, cell: u64) -> u64 {
        (self.size - cell * self.chunk_size).min(self.chunk_size)
    }

    /// Positions of the cells below `cell`.
    fn rank(&self, cell: u64) -> usize {
        let Some(f) = self.frames.get((cell / frame::SEG) as usize) else {
            return self.entries;
        };
        let i = (cell % frame::SEG) as usize;
        match (&f.words, &f.counts) {
            (Some(words), Some(counts)) => {
                let below = words[i / 64] & ((1u64 << (i % 64)) - 1);
                f.before + usize::from(counts[i / 64]) + below.count_ones() as usize
            }
            _ => f.before,
        }
    }

    /// Table positions of the cells overlapping `[off, off + len)`.
    pub(crate) fn positions(&self, off: u64, len: u64) -> Range<usize> {
        if len == 0 {
            return 0..0;
        }
        let first = off / self.chunk_size;
        let end = (off.saturating_add(len) - 1) / self.chunk_size + 1;
        let a = self.rank(first);
        a..self.rank(end).max(a)
    }

    /// The cell of each position in `r`, in order (from the bitmap: no file read).
    pub(crate) fn cells(&self, r: Range<usize>) -> Vec<(usize, u64)> {
        let mut out = Vec::with_capacity(r.len());
        self.visit_cells(r, |p, c| out.push((p, c)));
        out
    }

    /// Calls `f` with each position in `r` and its cell, in order.
    pub(crate) fn visit_cells(&self, r: Range<usize>, mut f: impl FnMut(usize, u64)) {
        if r.is_empty() || r.start >= self.entries {
            return;
        }
        // The frame holding position r.start: the last whose count before it is <= it
        // (frames without data hold none, so the last such one holding data).
        let first = self
            .frames
            .partition_point(|b| b.before <= r.start)
            .saturating_sub(1);
        for (k, fb) in self.frames.iter().enumerate().skip(first) {
            let Some(words) = &fb.words else { continue };
            let mut p = fb.before;
            if p >= r.end {
                return;
            }
            for (w, word) in words.iter().enumerate() {
                let mut word = *word;
                while word != 0 && p < r.end {
                    let bit = u64::from(word.trailing_zeros());
                    if p >= r.start {
                        f(p, k as u64 * frame::SEG + w as u64 * 64 + bit);
                    }
                    p += 1;
                    word &= word - 1;
                }
            }
        }
    }

    /// The entries at `positions` (ascending), read in runs of adjacent positions.
    pub(crate) fn entries(&self, positions: &[usize]) -> Result<Vec<(usize, Entry)>> {
        let mut out = Vec::with_capacity(positions.len());
        let mut buf = Vec::new();
        let mut i = 0;
        while i < positions.len() {
            let mut j = i + 1;
            while j < positions.len() && positions[j] == positions[j - 1] + 1 && j - i < 4096 {
                j += 1;
            }
            let first = positions[i];
            buf.resize((j - i) * RECORD, 0);
            self.file
                .read_exact_at(&mut buf, (first * RECORD) as u64)
                .map_err(|e| BackupError::LocalState {
                    what: "the lazy restore's map".into(),
                    path: "(unnamed file)".into(),
                    detail: e.to_string(),
                })?;
            for (k, r) in buf.chunks_exact(RECORD).enumerate() {
                let u = |a: usize| u32::from_le_bytes([r[a], r[a + 1], r[a + 2], r[a + 3]]);
                let mut cell = [0u8; 8];
                cell.copy_from_slice(&r[..8]);
                let mut id = [0u8; 32];
                id.copy_from_slice(&r[8..40]);
                out.push((
                    first + k,
                    Entry {
                        cell: u64::from_le_bytes(cell),
                        id: ChunkId(id),
                        loc: Loc {
                            pack: u(40),
                            offset: u(44),
                            len: u(48),
                        },
                    },
                ));
            }
            i = j;
        }
        Ok(out)
    }
}

impl PackNames for CellMap {
    fn name_of(&self, pack: u32) -> &str {
        self.packs.get(pack as usize).map_or("", String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A map of an image of `cells` cells of 4 KiB whose cells holding data are `data`
    /// (sorted, distinct), bitmaps only (no file records).
    fn map(cells: u64, data: &[u64]) -> CellMap {
        let frames = frame::count(cells);
        let mut bits = Vec::new();
        let mut before = 0;
        for k in 0..frames {
            let r = frame::range(cells, k);
            let inside: Vec<u64> = data.iter().copied().filter(|c| r.contains(c)).collect();
            bits.push(FrameBits::of(before, inside.iter().copied()));
            before += inside.len();
        }
        CellMap {
            file: tempfile::tempfile().unwrap(),
            size: cells * 4096,
            chunk_size: 4096,
            entries: data.len(),
            frames: bits,
            packs: Vec::new(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn positions_and_cells_match_a_sorted_list(
            extra in 0u64..3 * frame::SEG,
            picks in proptest::collection::vec(0u64..3 * frame::SEG, 0..300),
            queries in proptest::collection::vec((0u64..4 * frame::SEG, 1u64..70_000), 1..20),
        ) {
            let cells = frame::SEG + extra;
            let mut data: Vec<u64> = picks.into_iter().filter(|c| *c < cells).collect();
            // Frame edges and word edges too.
            data.extend([0, 63, 64, frame::SEG - 1, frame::SEG, cells - 1]);
            data.retain(|c| *c < cells);
            data.sort_unstable();
            data.dedup();
            let m = map(cells, &data);
            for (first, n) in queries {
                let (off, len) = (first * 4096, n * 4096 - 1);
                let a = data.partition_point(|c| *c < off / 4096);
                let b = data.partition_point(|c| *c <= (off + len - 1) / 4096);
                prop_assert_eq!(m.positions(off, len), a..b.max(a));
                let want: Vec<(usize, u64)> = (a..b).map(|p| (p, data[p])).collect();
                prop_assert_eq!(m.cells(a..b), want);
            }
            let all: Vec<(usize, u64)> = data.iter().copied().enumerate().collect();
            prop_assert_eq!(m.cells(0..data.len() + 5), all);
            prop_assert!(m.cells(data.len()..data.len() + 3).is_empty());
        }
    }
}
