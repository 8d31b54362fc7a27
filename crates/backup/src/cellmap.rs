//! A lazy restore's map of its backup's table (docs/design.md §12): for each table
//! position (the cells holding data, in cell order) its cell, chunk and location, in a
//! private unnamed file on local disk read with `pread`; in RAM only a bitmap over the
//! image's cells (1 bit per cell, and 4 bytes per 64 cells of running counts) that turns
//! a byte range into its positions, and the names of the packs the locations point into.
//! For a 1 TiB volume of 64 KiB cells: ~3 MiB of RAM and 832 MiB of file, where the table
//! and its locations in RAM took ~1.3 GiB.
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
    /// Bit c: cell c holds data (is a table position).
    present: Vec<u64>,
    /// Positions before each word of `present`.
    before: Vec<u32>,
    packs: Vec<String>,
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
        let copy = TableCopy::take(repo, h)?;
        let chunks = Chunks::load(repo)?;
        let chunk_size = u64::from(h.chunk_size);
        let cells = h.size.div_ceil(chunk_size);
        let what = format!("the map of the lazy restore of {}", h.name());
        let file = tempfile::tempfile_in(dir).map_err(local(&what, dir))?;
        let mut w = BufWriter::with_capacity(1 << 20, &file);
        let mut present = vec![0u64; cells.div_ceil(64) as usize];
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
                // Cells come from an authenticated frame, inside the image, in order.
                present[(c / 64) as usize] |= 1 << (c % 64);
                entries += 1;
            }
        }
        w.flush().map_err(local(&what, dir))?;
        drop(w);
        let mut before = Vec::with_capacity(present.len());
        let mut n = 0u32;
        for word in &present {
            before.push(n);
            n += word.count_ones();
        }
        Ok(CellMap {
            file,
            size: h.size,
            chunk_size,
            entries,
            present,
            before,
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

    /// Bytes of cell `cell` (the last may be short).
    pub(crate) fn cell_len(&self, cell: u64) -> u64 {
        (self.size - cell * self.chunk_size).min(self.chunk_size)
    }

    /// Positions of the cells below `cell`.
    fn rank(&self, cell: u64) -> usize {
        let w = (cell / 64) as usize;
        match self.present.get(w) {
            None => self.entries,
            Some(word) => {
                let below = word & ((1u64 << (cell % 64)) - 1);
                self.before[w] as usize + below.count_ones() as usize
            }
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
        if r.is_empty() {
            return;
        }
        // The word holding position r.start: the last whose count before it is <= it.
        let mut w = self.before.partition_point(|b| (*b as usize) <= r.start) - 1;
        let mut p = self.before[w] as usize;
        while w < self.present.len() && p < r.end {
            let mut word = self.present[w];
            while word != 0 && p < r.end {
                let bit = u64::from(word.trailing_zeros());
                if p >= r.start {
                    f(p, w as u64 * 64 + bit);
                }
                p += 1;
                word &= word - 1;
            }
            w += 1;
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
    fn pack_name(&self, pack: u32) -> &str {
        self.packs.get(pack as usize).map_or("", String::as_str)
    }
}
