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
//! Memory: one frame at a time, [`COPY_THREADS`] while copying. A whole table (format 1, written before `repo
//! upgrade` to format 4) is held in memory as read, and handed out in frame-sized
//! slices.
//!
//! Threading: one job's; `frame` takes `&self` and may be called from any thread.

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::frame;
use crate::manifest::{self, Header, Table};
use crate::repo::Repository;

/// Frames fetched at once while copying. Each fetch holds one sealed frame (~2.6 MB for
/// a full frame of 65,536 cells) until it is written out: 32 at once held ~84 MB.
const COPY_THREADS: usize = 4;

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
        let source = if h.framed {
            let dir = scratch(
                repo,
                "table-",
                &format!("a local copy of the table of {}", h.name()),
            )?;
            let scratch_err = local_err(dir.path(), h);
            let n = manifest::frame_count(h);
            // Fetched (and authenticated) on a few threads, each writing its frame out
            // as soon as it has it; then read back in order for the totals.
            let ks: Vec<u64> = (0..n).collect();
            crate::par::map(&ks, COPY_THREADS, |k| {
                let sealed = manifest::fetch_frame(repo, h, *k)?;
                std::fs::write(dir.path().join(k.to_string()), &sealed).map_err(&scratch_err)
            })?;
            let mut digest = frame::Digest::default();
            let mut entries = 0u64;
            for k in 0..n {
                let sealed = std::fs::read(dir.path().join(k.to_string())).map_err(&scratch_err)?;
                let (f, plain) = manifest::open_frame(repo, h, k, &sealed)?;
                digest.add(&plain);
                entries += f.cells.len() as u64;
            }
            manifest::check_totals(h, entries, &digest)?;
            Source::Frames(dir)
        } else {
            Source::Whole(manifest::read_table(repo, h)?)
        };
        Ok(TableCopy::new(repo, h, source))
    }

    fn new(repo: &Repository, h: &Header, source: Source) -> TableCopy {
        TableCopy {
            size: h.size,
            chunk_size: h.chunk_size,
            cells: h.size.div_ceil(u64::from(h.chunk_size)),
            entries: h.cells,
            source,
            repo: repo.clone(),
            header: h.clone(),
        }
    }

    /// The table a job has just written ([`crate::manifest::TableWriter`]): its sealed
    /// frames in `dir`, as [`TableCopy::take`] would have copied them.
    pub(crate) fn written_frames(
        repo: &Repository,
        h: &Header,
        dir: tempfile::TempDir,
    ) -> TableCopy {
        TableCopy::new(repo, h, Source::Frames(dir))
    }

    /// The whole table a job has just written (a repository before format 4).
    pub(crate) fn written_whole(repo: &Repository, h: &Header, table: Table) -> TableCopy {
        TableCopy::new(repo, h, Source::Whole(table))
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
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

/// An error writing a local copy of `h`'s table.
fn local_err(dir: &std::path::Path, h: &Header) -> impl Fn(std::io::Error) -> BackupError {
    let what = format!("a local copy of the table of {}", h.name());
    let path = dir.display().to_string();
    move |e| BackupError::LocalState {
        what: what.clone(),
        path: path.clone(),
        detail: e.to_string(),
    }
}

/// A private directory for this job's files (`what`, for messages), named
/// `<prefix><pid>-...` beside the object cache (where a later job removes it should this
/// process die first: [`crate::cache::ObjectCache::sweep_scratch`]), else in the system's
/// temporary directory; removed when dropped.
pub(crate) fn scratch(repo: &Repository, prefix: &str, what: &str) -> Result<tempfile::TempDir> {
    let err = |base: &std::path::Path| {
        let path = base.display().to_string();
        move |e: std::io::Error| BackupError::LocalState {
            what: what.to_string(),
            path,
            detail: e.to_string(),
        }
    };
    if let Some(c) = repo.cache() {
        let base = c.scratch_dir(repo);
        c.sweep_scratch(repo, prefix);
        let made = std::fs::create_dir_all(&base)
            .and_then(|()| {
                tempfile::Builder::new()
                    .prefix(&format!("{prefix}{}-", std::process::id()))
                    .tempdir_in(&base)
            })
            .map_err(err(&base));
        match made {
            Ok(d) => return Ok(d),
            // This host's cache directory is unusable (full, read-only): the job still
            // runs, with its files in the system's temporary directory.
            Err(e) => log::warn!("{e}; using the system's temporary directory"),
        }
    }
    let base = std::env::temp_dir();
    tempfile::Builder::new()
        .prefix(&format!("snapblk-{prefix}"))
        .tempdir()
        .map_err(err(&base))
}

/// The distinct chunks of `cells`, sorted.
pub fn distinct(cells: &[(u64, ChunkId)]) -> Vec<ChunkId> {
    let mut ids: Vec<ChunkId> = cells.iter().map(|(_, id)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}
