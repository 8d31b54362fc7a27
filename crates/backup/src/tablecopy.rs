//! A job's own copy of the table it reads (docs/design.md §12 "Segmented tables"): taken
//! at the job's start, under its lease, so a prune and gc that delete the backup's table
//! meanwhile cannot fail the job; read back one frame at a time, so the job never holds
//! the whole table of a large volume.
//!
//! A framed table (format 4) is copied frame by frame into a private temporary directory
//! (beside the object cache when there is one, else the system's temporary directory):
//! each frame is authenticated as it is fetched, the entry count and digest of all of
//! them are checked against the header before the copy is returned, and each frame is
//! authenticated again when read back (so the local copy is trusted no more than the
//! store; a copy left by a killed job is removed by the next job that makes one).
//! Memory: one frame at a time. A whole table (format 1, written before `repo
//! upgrade` to format 4) is held in memory as read, and handed out in frame-sized
//! slices.
//!
//! Threading: one job's; `frame` takes `&self` and may be called from any thread.

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::frame;
use crate::manifest::{self, Header, Table};
use crate::repo::Repository;

enum Source {
    Whole(Table),
    /// The sealed frames, one file each, named by position.
    Frames(tempfile::TempDir),
}

pub struct TableCopy {
    size: u64,
    chunk_size: u32,
    cells: u64,
    entries: u64,
    source: Source,
    repo: Repository,
    header: Header,
}

impl TableCopy {
    /// Copies `h`'s table (see the module doc). Fails naming the backup when an object is
    /// gone ([`BackupError::Lost`]) or does not check.
    pub fn take(repo: &Repository, h: &Header) -> Result<TableCopy> {
        manifest::check_header(h)?;
        let cells = h.size.div_ceil(u64::from(h.chunk_size));
        let source = if h.framed {
            let scratch = |e: std::io::Error| BackupError::LocalState {
                what: format!("a local copy of the table of {}", h.name()),
                path: repo
                    .cache()
                    .map_or_else(std::env::temp_dir, |c| c.scratch_dir(repo))
                    .display()
                    .to_string(),
                detail: e.to_string(),
            };
            let dir = match repo.cache() {
                Some(c) => {
                    c.sweep_scratch(repo, "table-");
                    let base = c.scratch_dir(repo);
                    std::fs::create_dir_all(&base).map_err(scratch)?;
                    tempfile::Builder::new()
                        .prefix(&format!("table-{}-", std::process::id()))
                        .tempdir_in(base)
                        .map_err(scratch)?
                }
                None => tempfile::Builder::new()
                    .prefix("snapblk-table-")
                    .tempdir()
                    .map_err(scratch)?,
            };
            let n = manifest::frame_count(h);
            let mut digest = frame::Digest::default();
            let mut entries = 0u64;
            let ks: Vec<u64> = (0..n).collect();
            for part in ks.chunks(crate::index::FETCH_THREADS) {
                let got =
                    crate::par::map(part, part.len(), |k| manifest::fetch_frame(repo, h, *k))?;
                for (k, sealed) in part.iter().zip(got) {
                    let (f, plain) = manifest::open_frame(repo, h, *k, &sealed)?;
                    digest.add(&plain);
                    entries += f.cells.len() as u64;
                    std::fs::write(dir.path().join(k.to_string()), &sealed).map_err(scratch)?;
                }
            }
            manifest::check_totals(h, entries, &digest)?;
            Source::Frames(dir)
        } else {
            Source::Whole(manifest::read_table(repo, h)?)
        };
        Ok(TableCopy {
            size: h.size,
            chunk_size: h.chunk_size,
            cells,
            entries: h.cells,
            source,
            repo: repo.clone(),
            header: h.clone(),
        })
    }

    /// Frames of the table.
    pub fn count(&self) -> u64 {
        frame::count(self.cells)
    }

    /// Entries (cells holding data) in all frames.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The entries of frame `k` as a table of the image's size (its cells only).
    pub fn frame(&self, k: u64) -> Result<Table> {
        let cells = match &self.source {
            Source::Whole(t) => {
                let r = frame::range(self.cells, k);
                let a = t.cells.partition_point(|(c, _)| *c < r.start);
                let b = t.cells.partition_point(|(c, _)| *c < r.end);
                t.cells[a..b].to_vec()
            }
            Source::Frames(dir) => {
                let path = dir.path().join(k.to_string());
                let sealed = std::fs::read(&path).map_err(|e| BackupError::LocalState {
                    what: format!("the local copy of the table of {}", self.header.name()),
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
                manifest::open_frame(&self.repo, &self.header, k, &sealed)?
                    .0
                    .cells
            }
        };
        Ok(Table {
            size: self.size,
            chunk_size: self.chunk_size,
            cells,
        })
    }
}

/// The distinct chunks of `cells`, sorted.
pub fn distinct(cells: &[(u64, ChunkId)]) -> Vec<ChunkId> {
    let mut ids: Vec<ChunkId> = cells.iter().map(|(_, id)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}
