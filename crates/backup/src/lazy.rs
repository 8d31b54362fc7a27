//! Lazy restore: a restored volume is usable at once while its data arrives.
//!
//! A `Hydration` owns a new, empty volume and the backup's cell table. Cells are
//! *hydrated* (their chunk fetched, verified and written into the volume) on first touch by
//! a client, or by a background thread working through the table in order. A bitmap over
//! table positions records hydrated cells.
//!
//! The restore's identity lives in the pool: the volume is created *marked* (`Incomplete`
//! with `Filling::LazyRestore`, naming backup, manifest and repository) in the same commit
//! that creates it, and the mark is cleared only when hydration is complete and durable.
//! While marked, the volume opens only through a running `Hydration` ([`LazyExports`]);
//! management commands that would see half-restored data are refused (crates/daemon/src/admin.rs), in
//! the daemon and in direct mode alike. Two files per restore sit in the state directory,
//! keyed by volume id: `<id>.bits` and `<id>.hot`.
//!
//! Invariants:
//! - A table cell is never read, written, trimmed or reported as a hole before it is
//!   hydrated: `LazyExport` hydrates every table cell a request touches first, and block
//!   status reports a range with unhydrated cells as data.
//! - A cell is hydrated at most once per run, under its stripe lock, so hydration never
//!   overwrites a client's write in this run (clients write only after the cell is
//!   hydrated). A run of adjacent cells is written at once under all its stripe locks,
//!   taken in ascending order; every other holder takes a single stripe lock, so no
//!   cycle can form.
//! - A TRIM or WRITE_ZEROES hydrates the cells it covers in part first; the cells it
//!   covers whole are marked hydrated without being fetched, under their stripe locks and
//!   only after the request succeeded (it replaced every byte of them).
//! - After a restart a cell is hydrated again only if no acknowledged client write to it
//!   can be lost by that:
//!   * `<id>.bits` claims only cells whose data the pool had synced: it is written (and
//!     fsynced) after a pool flush — on a client FLUSH, on a FUA request that touches a cell
//!     hydrated since the last save, and periodically by the background thread. It survives
//!     a power cut, and so does everything a FLUSH or FUA acknowledged.
//!   * `<id>.hot` records every hydrated cell before any client request that touched it
//!     returns (one `pwrite` of the bitmap word, no fsync), headed by the kernel's boot id.
//!     A daemon killed without a reboot left it, and the pool data it describes, in the page
//!     cache; a resume in the same boot trusts it, so plain acknowledged writes survive
//!     kill -9 too. After a reboot it is ignored (its data may not have reached the disk).
//! - A failed fetch fails the request with EIO (never zeros or stale data); the background
//!   thread records the error and retries with backoff until the store answers again.
//!
//! Completion: every cell hydrated → flush the volume → clear the pool's mark (the commit
//! point) → remove the state files and fsync the directory → `complete` → the daemon drops
//! the hydration (its index and its handle on the volume). A crash anywhere before the mark
//! is cleared resumes; after it, leftover state files are stale and removed at start.
//!
//! Threading: one background thread per hydration (started by [`Hydration::spawn`] once
//! the restore is registered); client requests hydrate on their own threads (a request's
//! misses as one batch of coalesced ranged GETs, with read-ahead for a sequential reader);
//! stripe locks serialise work on one cell.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapblk_core::device::AlignedVec;
use snapblk_core::export::{Export, ExportProvider, StatusRun};
use snapblk_core::keys::Filling;
use snapblk_core::{Error as VolError, Pool};

use crate::cellmap::{CellMap, Entry};
use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::index::Loc;
use crate::manifest::Header;
use crate::par::lock;
use crate::repo::Repository;
use crate::restore::{fetch_located, Buffers, Downloads, Fetched, MAX_FETCH};

const STRIPES: usize = 256;

/// Positions (and cells) of each chunk a fetch brings.
type Wanted = HashMap<ChunkId, Vec<(usize, u64)>>;

/// The chunks of `entries` to fetch, each once, and where each goes.
fn wanted(entries: Vec<(usize, Entry)>) -> (Wanted, Vec<(Loc, ChunkId)>) {
    let mut at: Wanted = HashMap::new();
    let mut items = Vec::new();
    for (p, e) in entries {
        let v = at.entry(e.id).or_default();
        if v.is_empty() {
            items.push((e.loc, e.id));
        }
        v.push((p, e.cell));
    }
    (at, items)
}
/// Ranged GETs a client request's misses run at once.
const FETCH_THREADS: usize = 8;
/// Largest ranged GET for a client request (several run at once, each decoded and
/// written on its own thread).
const CLIENT_FETCH: u64 = 4 << 20;
/// How long the background thread pauses after a client request had to fetch.
const CLIENT_FIRST: Duration = Duration::from_millis(200);
/// Largest write of adjacent hydrated cells (the stripe locks of a run are held across
/// its write; a thread's run buffer grows to this).
const MAX_RUN: usize = 1 << 20;
/// Bytes read past a miss that continues the previous one (a sequential reader).
const READ_AHEAD: u64 = 16 << 20;
/// How far ahead of a sequential reader the background read-ahead keeps the volume
/// hydrated (claimed: fetched or being fetched).
const PREFETCH: u64 = 64 << 20;
/// Ranged GETs the read-ahead keeps in flight, and the bytes of the image each covers
/// (8 MiB: 117-142 MB/s and ~20% less CPU per byte than 4 MiB steps, 111 MB/s, on the
/// 2-core bench host; at most 8 x (8 + 1) MiB of buffers while a reader streams).
const AHEAD_STREAMS: usize = 8;
const AHEAD_STEP: u64 = 8 << 20;
/// The read-ahead stops when its reader has not moved for this long.
const AHEAD_IDLE: Duration = Duration::from_millis(500);
/// Longest a client miss waits for the read-ahead already fetching its cells before it
/// fetches them itself.
const AHEAD_WAIT: Duration = Duration::from_secs(5);
/// Cells fetched per background request batch.
const BATCH: usize = 128;
/// The background thread saves the bitmap at least this often.
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// Which restore a hydration is (from the volume's mark in the pool).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct State {
    pub volume: String,
    pub volume_id: u64,
    /// Manifest id and `vol@snap` of the backup being restored.
    pub manifest: String,
    pub backup: String,
    /// Where it comes from (no key material).
    pub target: String,
    /// The restoring pool's uuid (names the restore's hold in the repository).
    pub pool: String,
}

/// Called when hydration is complete and flushed: clears the volume's mark (durable on
/// return).
pub type CommitFn = Box<dyn Fn() -> snapblk_core::Result<()> + Send + Sync>;
/// Called once the restore is finished, to drop it from the daemon's registry.
pub type ReleaseFn = Box<dyn Fn(&str) + Send + Sync>;

pub struct Hydration {
    state: State,
    /// Bitmap words as last saved to `<id>.bits` (cells whose data is durable).
    saved: Vec<AtomicU64>,
    hot: std::fs::File,
    commit: CommitFn,
    release: ReleaseFn,
    repo: Repository,
    /// The backup's table as hydration reads it: positions, cells, chunks, locations
    /// (crate::cellmap: on local disk, a bitmap in RAM).
    map: CellMap,
    sink: Arc<dyn Export>,
    done: Vec<AtomicU64>,
    stripes: Vec<Mutex<()>>,
    remaining: AtomicU64,
    bytes_done: AtomicU64,
    bytes_total: u64,
    /// Shared with every `LazyExport` of the volume, which then needs the hydration no
    /// more (and lets its table and chunk locations go).
    complete: Arc<AtomicBool>,
    stop: AtomicBool,
    /// Only the background thread stops (tests drive hydration by client requests alone).
    background_off: AtomicBool,
    error: Mutex<Option<String>>,
    save_lock: Mutex<()>,
    started: Instant,
    /// End of the last client miss (read-ahead detection; a hint, racing is harmless).
    last_miss_end: AtomicU64,
    /// When a client request last had to fetch (ms since `started`): the background
    /// thread gives way for [`CLIENT_FIRST`] after it.
    last_client_fetch: AtomicU64,
    /// Background read-ahead for a sequential reader ([`Hydration::read_ahead`]): the end
    /// of the last client read, the window being (or last) fetched, and whether a fetch
    /// runs. Hints: a race costs at most a duplicate or a skipped read-ahead.
    last_read_end: AtomicU64,
    ahead_from: AtomicU64,
    ahead_to: AtomicU64,
    ahead_running: AtomicBool,
    dir: PathBuf,
    /// Keeps gc from deleting the packs this restore reads, until it completes.
    lease: Mutex<Option<crate::lease::Lease>>,
}

fn bits_path(dir: &Path, vol_id: u64) -> PathBuf {
    dir.join(format!("{vol_id}.bits"))
}
fn hot_path(dir: &Path, vol_id: u64) -> PathBuf {
    dir.join(format!("{vol_id}.hot"))
}

/// Bytes of the boot id heading `<id>.hot`.
const BOOT_ID_LEN: usize = 36;

/// The kernel's id of this boot: page-cache contents survive exactly while it stays the same.
fn boot_id() -> [u8; BOOT_ID_LEN] {
    let mut id = [b'?'; BOOT_ID_LEN];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let b = s.trim().as_bytes();
        let n = b.len().min(BOOT_ID_LEN);
        id[..n].copy_from_slice(&b[..n]);
    }
    id
}

/// Removes the state files of restores that are no longer marked in the pool (finished,
/// or their volume deleted), keeping those of `live` volume ids. Files of an older
/// snapblk (`<id>.json`) go too: their restore's mark is what counts now.
pub fn remove_stale(dir: &Path, live: &[u64]) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok());
        if id.is_none_or(|id| !live.contains(&id)) {
            log::info!("removing stale lazy-restore state {}", path.display());
            let _ = std::fs::remove_file(&path);
        }
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Reads `<id>.hot` if it was written in this boot and fits the table (`words` u64s).
fn read_hot(path: &Path, words: usize, boot: &[u8; BOOT_ID_LEN]) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let want = BOOT_ID_LEN + words * 8;
    let mut b = Vec::with_capacity(want);
    f.take(want as u64 + 1).read_to_end(&mut b)?;
    if b.len() != want || b[..BOOT_ID_LEN] != boot[..] {
        log::info!(
            "{}: from another boot or another table; using the saved bitmap only",
            path.display()
        );
        return Ok(None);
    }
    Ok(Some(b.split_off(BOOT_ID_LEN)))
}

/// Writes `<id>.hot` afresh (this boot's id, then `done`), replacing the old one in one
/// rename so a kill at any point leaves a whole file; returns it open for word updates.
fn open_hot(
    path: &Path,
    boot: &[u8; BOOT_ID_LEN],
    done: &[AtomicU64],
) -> std::io::Result<std::fs::File> {
    let mut b = Vec::with_capacity(BOOT_ID_LEN + done.len() * 8);
    b.extend_from_slice(boot);
    for w in done {
        b.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    let tmp = path.with_extension("hot-tmp");
    std::fs::write(&tmp, &b)?;
    std::fs::rename(&tmp, path)?;
    std::fs::OpenOptions::new().write(true).open(path)
}

/// Reads a saved hydration bitmap of `words` u64s: `None` if none was saved yet; an error
/// if its length is not what the table needs (never read more than that).
fn read_bits(path: &Path, words: usize) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let want = words as u64 * 8;
    let mut b = Vec::with_capacity(words * 8);
    f.take(want + 1).read_to_end(&mut b)?;
    if b.len() as u64 != want {
        return Err(BackupError::corrupt(
            path.display().to_string(),
            format!(
                "hydration bitmap of {} bytes, the backup's table needs {want}",
                b.len()
            ),
        ));
    }
    Ok(Some(b))
}

impl Hydration {
    /// Prepares hydrating `sink` — the volume `state.volume`, new and empty on a `fresh`
    /// start — from `header`, resuming from the state files in `dir` if there are any.
    /// Places the restore's hold on the backup first (and on a fresh start checks that the
    /// backup is still listed once it is held).
    /// Nothing runs in the background until [`Hydration::spawn`].
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        repo: &Repository,
        header: &Header,
        fresh: bool,
        sink: Arc<dyn Export>,
        state: State,
        dir: &Path,
        commit: CommitFn,
        release: ReleaseFn,
    ) -> Result<Arc<Hydration>> {
        let lease = crate::lease::Lease::shared(repo, format!("lazy restore {}", header.name()))?;
        // Before the table is read: from here on prune and forget keep the backup, so an
        // interrupted restore can always resume (crate::hold).
        crate::hold::place(
            repo,
            &header.id,
            &header.name(),
            &state.pool,
            &state.volume,
            state.volume_id,
        )?;
        std::fs::create_dir_all(dir)?;
        // The map (table copy, chunk index) is built beside the check below: a first read
        // waits for both. Built for nothing if the check fails; nothing is served from it.
        let (listed, map) = std::thread::scope(|s| {
            let map = s.spawn(|| CellMap::build(repo, header, dir));
            // The caller chose the backup from a catalog read before the hold existed: a
            // prune may have removed it since. Still listed now = listed after the hold
            // was placed, so every later prune sees the hold. (A resume's hold is older.)
            let listed = !fresh
                || crate::catalog::load_pool(repo, &header.pool).map(|l| {
                    l.is_some_and(|l| l.catalog.backups.iter().any(|b| b.id == header.id))
                })?;
            let map = map.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            Ok::<_, BackupError>((listed, map))
        })?;
        if !listed {
            let s = &state;
            if let Err(e) = crate::hold::release(repo, &header.id, &s.pool, s.volume_id) {
                log::warn!("releasing the hold on {}: {e}", header.name());
            }
            return Err(BackupError::NoSuchBackup(format!(
                "{} ({}): removed (pruned or forgotten) while the restore started",
                header.name(),
                header.id
            )));
        }
        let map = map?;
        let n = map.len();
        let words = n.div_ceil(64);
        let done: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let saved: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let id = state.volume_id;
        if let Some(b) = read_bits(&bits_path(dir, id), words)? {
            for ((w, s), c) in done.iter().zip(&saved).zip(b.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                w.store(u64::from_le_bytes(a), Ordering::Relaxed);
                s.store(u64::from_le_bytes(a), Ordering::Relaxed);
            }
        }
        let boot = boot_id();
        if let Some(b) = read_hot(&hot_path(dir, id), words, &boot)? {
            // Same boot: what the killed daemon hydrated is in the page cache, and so is
            // the pool data it wrote for it.
            for (w, c) in done.iter().zip(b.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                w.fetch_or(u64::from_le_bytes(a), Ordering::Relaxed);
            }
        }
        let hot = open_hot(&hot_path(dir, id), &boot, &done)?;
        let bytes_total = header.stored_bytes;
        let h = Arc::new(Hydration {
            repo: repo.clone(),
            sink,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            remaining: AtomicU64::new(n as u64),
            bytes_done: AtomicU64::new(0),
            bytes_total,
            complete: Arc::new(AtomicBool::new(false)),
            stop: AtomicBool::new(false),
            background_off: AtomicBool::new(false),
            error: Mutex::new(None),
            save_lock: Mutex::new(()),
            started: Instant::now(),
            last_miss_end: AtomicU64::new(u64::MAX),
            last_client_fetch: AtomicU64::new(0),
            last_read_end: AtomicU64::new(u64::MAX),
            ahead_from: AtomicU64::new(0),
            ahead_to: AtomicU64::new(0),
            ahead_running: AtomicBool::new(false),
            dir: dir.to_path_buf(),
            lease: Mutex::new(Some(lease)),
            done,
            saved,
            hot,
            commit,
            release,
            map,
            state,
        });
        let mut rem = 0u64;
        let mut bytes = 0u64;
        h.map.visit_cells(0..n, |p, c| {
            if h.is_done(p) {
                bytes += h.map.cell_len(c);
            } else {
                rem += 1;
            }
        });
        h.remaining.store(rem, Ordering::Relaxed);
        h.bytes_done.store(bytes, Ordering::Relaxed);
        Ok(h)
    }

    /// Starts the background thread (once the restore is registered, so the thread's
    /// completion finds it there to release).
    pub fn spawn(self: &Arc<Self>) -> Result<()> {
        let bg = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("hydrate-{}", self.state.volume))
            .spawn(move || bg.background())?;
        Ok(())
    }

    pub fn volume(&self) -> &str {
        &self.state.volume
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Stops the background thread (daemon shutdown); state files stay for a resume.
    /// Stops the restore: the background thread and any read-ahead write nothing more,
    /// client requests that would hydrate fail (the volume is an interrupted restore now).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Stops only the background thread; client requests still hydrate what they touch.
    pub fn stop_background(&self) {
        self.background_off.store(true, Ordering::Release);
    }

    fn is_done(&self, p: usize) -> bool {
        self.done[p / 64].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }

    fn eio(&self, e: impl std::fmt::Display) -> VolError {
        VolError::device(
            format!(
                "lazy restore of {} from {}",
                self.state.volume, self.state.target
            ),
            std::io::Error::other(e.to_string()),
        )
    }

    /// Writes fetched `chunks` at every position `at` lists for them, adjacent cells in
    /// one write each (a ranged GET's chunks are mostly adjacent cells): the stripe locks
    /// of a run are taken together, in ascending order (every other holder takes one).
    fn put_chunks(&self, got: &Fetched, at: &Wanted, buf: &mut AlignedVec) -> Result<()> {
        let mut cells: Vec<(usize, u64, &[u8])> = Vec::new();
        for (id, data) in got.chunks() {
            for &(p, cell) in at.get(&id).map(Vec::as_slice).unwrap_or(&[]) {
                let len = self.map.cell_len(cell);
                if data.len() as u64 != len {
                    return Err(BackupError::invalid(
                        "lazy restore",
                        format!(
                            "cell {cell} is {len} bytes but chunk {} holds {}",
                            id.hex(),
                            data.len()
                        ),
                    ));
                }
                cells.push((p, cell, data));
            }
        }
        cells.sort_unstable_by_key(|(p, _, _)| *p);
        let mut i = 0;
        while i < cells.len() {
            let mut j = i + 1;
            let mut bytes = cells[i].2.len();
            while j < cells.len()
                && cells[j].1 == cells[j - 1].1 + 1
                && bytes + cells[j].2.len() <= MAX_RUN
            {
                bytes += cells[j].2.len();
                j += 1;
            }
            self.put_run(&cells[i..j], buf)?;
            i = j;
        }
        Ok(())
    }

    /// Writes a run of adjacent cells not hydrated yet, skipping those that are (`buf`:
    /// the calling download thread's buffer for the run).
    fn put_run(
        &self,
        run: &[(usize, u64, &[u8])],
        buf: &mut AlignedVec,
    ) -> snapblk_core::Result<()> {
        let mut stripes: Vec<usize> = run.iter().map(|(p, _, _)| p % STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _held: Vec<_> = stripes.iter().map(|&s| lock(&self.stripes[s])).collect();
        // A stopped (cancelled) run writes nothing more: a resumed run may own these
        // cells now, and a client may have written them through it.
        if self.stop.load(Ordering::Acquire) {
            return Err(self.eio("the restore was stopped"));
        }
        let cs = self.map.chunk_size();
        let mut i = 0;
        while i < run.len() {
            if self.is_done(run[i].0) {
                i += 1;
                continue;
            }
            let mut j = i;
            buf.clear();
            while j < run.len() && !self.is_done(run[j].0) {
                buf.extend_from_slice(run[j].2);
                j += 1;
            }
            let cell = run[i].1;
            self.sink.write(cell * cs, buf, false)?;
            for (p, _, data) in &run[i..j] {
                self.mark_done(*p, data.len() as u64)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Records position `p` (`len` bytes) hydrated. The caller holds its stripe lock and
    /// has checked it was not.
    fn mark_done(&self, p: usize, len: u64) -> snapblk_core::Result<()> {
        let word = self.done[p / 64].fetch_or(1 << (p % 64), Ordering::AcqRel) | (1 << (p % 64));
        self.write_hot(p / 64, word)?;
        self.bytes_done.fetch_add(len, Ordering::Relaxed);
        self.remaining.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `op`, a request that replaces every byte of `[off, off + len)` (trim, write of
    /// zeroes), without downloading the cells it covers whole: the cells it covers in part
    /// are hydrated first; the stripe locks of the whole ones still to hydrate are taken
    /// (ascending, as in [`Hydration::put_run`]), `op` runs, and only if it succeeds are
    /// they marked hydrated — after the pool has their new contents, so a bitmap save
    /// never claims a cell before its data, and a refused request (out of range, an
    /// unsupported fast zero, an I/O error) leaves them to be fetched as before. A TRIM of
    /// an unhydrated range costs no download.
    pub fn discard(
        &self,
        off: u64,
        len: u64,
        op: impl FnOnce() -> snapblk_core::Result<()>,
    ) -> snapblk_core::Result<()> {
        if self.is_complete() || len == 0 {
            return op();
        }
        let cs = self.map.chunk_size();
        let end = off.saturating_add(len);
        let covered = |cell: u64| {
            let a = cell * cs;
            a >= off && a + self.map.cell_len(cell) <= end
        };
        let range = self.positions(off, len);
        let cells = self.map.cells(range.clone());
        for &(p, cell) in [cells.first(), cells.last()].into_iter().flatten() {
            if !covered(cell) {
                self.hydrate(p..p + 1).map_err(|e| self.eio(e))?;
            }
        }
        let whole: Vec<(usize, u64)> = cells
            .into_iter()
            .filter(|&(p, cell)| covered(cell) && !self.is_done(p))
            .collect();
        let mut stripes: Vec<usize> = whole.iter().map(|(p, _)| p % STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _held: Vec<_> = stripes.iter().map(|&s| lock(&self.stripes[s])).collect();
        let todo: Vec<(usize, u64)> = whole
            .into_iter()
            .filter(|&(p, _)| !self.is_done(p))
            .collect();
        op()?;
        for (p, cell) in todo {
            self.mark_done(p, self.map.cell_len(cell))?;
        }
        Ok(())
    }

    /// Records bitmap word `i` in `<id>.hot` (page cache only; see the module doc).
    fn write_hot(&self, i: usize, word: u64) -> snapblk_core::Result<()> {
        use std::os::unix::fs::FileExt;
        self.hot
            .write_all_at(&word.to_le_bytes(), (BOOT_ID_LEN + i * 8) as u64)
            .map_err(|e| VolError::device("recording hydrated cells", e))
    }

    /// Table positions of the cells overlapping `[off, off + len)`.
    fn positions(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        self.map.positions(off, len)
    }

    /// Whether a cell in the range was hydrated since the bitmap was last saved: a FUA
    /// request there must save it, or a power cut could undo the request by hydrating
    /// the cell again.
    fn unsaved_in(&self, off: u64, len: u64) -> bool {
        if self.is_complete() {
            return false;
        }
        self.positions(off, len).any(|p| {
            let bit = 1 << (p % 64);
            self.done[p / 64].load(Ordering::Acquire) & bit != 0
                && self.saved[p / 64].load(Ordering::Acquire) & bit == 0
        })
    }

    /// After a FUA request to `[off, off + len)`: makes the hydration of its cells durable.
    fn fua_done(&self, off: u64, len: u64) -> snapblk_core::Result<()> {
        if self.unsaved_in(off, len) {
            self.save()?;
        }
        Ok(())
    }

    /// Hydrates every table cell overlapping `[off, off + len)`: the missing ones in one
    /// batch of ranged GETs (adjacent blobs of a pack coalesced, [`FETCH_THREADS`] at
    /// once). A miss starting where the previous one ended reads [`READ_AHEAD`] bytes
    /// further, so a sequential reader of an unhydrated range gets whole ranged GETs,
    /// not one per cell.
    pub fn ensure(&self, off: u64, len: u64) -> snapblk_core::Result<()> {
        if self.is_complete() || len == 0 {
            return Ok(());
        }
        let asked = self.positions(off, len);
        if !asked.clone().any(|p| !self.is_done(p)) {
            return Ok(());
        }
        let end = off + len;
        self.last_client_fetch.store(
            self.started.elapsed().as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
        // The background read-ahead may be fetching these cells now: wait for it rather
        // than download them twice.
        if self.ahead_running.load(Ordering::Acquire)
            && off >= self.ahead_from.load(Ordering::Relaxed)
            && end <= self.ahead_to.load(Ordering::Relaxed)
        {
            let t = Instant::now();
            while self.ahead_running.load(Ordering::Acquire)
                && self.pending_in(off, len)
                && t.elapsed() < AHEAD_WAIT
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            if !self.pending_in(off, len) {
                return Ok(());
            }
        }
        if self.last_miss_end.swap(end, Ordering::Relaxed) == off {
            let ahead = self.positions(end, READ_AHEAD);
            let with_ahead = asked.start..asked.end.max(ahead.end);
            self.last_miss_end
                .store(end + READ_AHEAD, Ordering::Relaxed);
            match self.hydrate(with_ahead) {
                Ok(()) => return Ok(()),
                // Read-ahead is a guess: its failure must not fail the request.
                Err(e) => log::debug!("lazy restore of {}: read-ahead: {e}", self.state.volume),
            }
        }
        self.hydrate(asked).map_err(|e| self.eio(e))
    }

    /// After a client read of `[off, off + len)`: if it continues the previous read (a
    /// sequential reader) and no read-ahead runs, starts one on a thread of its own. It
    /// keeps [`AHEAD_STREAMS`] ranged GETs of [`AHEAD_STEP`] in flight, each stream
    /// claiming the next step past the last one claimed, until [`PREFETCH`] past the
    /// reader is claimed; it then waits for the reader to move and stops when the reader
    /// pauses for [`AHEAD_IDLE`] or jumps elsewhere. A stream, not windows: a window of
    /// parallel GETs ends with its slowest, and the link idled at each window's end (a
    /// sequential unhydrated read ran at ~85 MB/s with the CPUs half idle). Failures only
    /// cost the read-ahead (the reader's own miss fetches).
    pub fn read_ahead(self: &Arc<Self>, off: u64, len: u64) {
        let end = off.saturating_add(len);
        // Reads that finish out of order (several requests in flight, several readers)
        // leave it alone; a sequential run below the claimed range starts a new one.
        if self.last_read_end.swap(end, Ordering::Relaxed) != off {
            return;
        }
        if self.is_complete()
            || self.stop.load(Ordering::Relaxed)
            || self.ahead_running.load(Ordering::Acquire)
        {
            return;
        }
        let (from, to) = (
            self.ahead_from.load(Ordering::Relaxed),
            self.ahead_to.load(Ordering::Relaxed),
        );
        // Inside what an earlier run claimed: go on from its end.
        let frontier = if from <= end && end <= to { to } else { end };
        if frontier >= self.map.size()
            || !self.pending_in(frontier, PREFETCH.min(self.map.size() - frontier))
            || self.ahead_running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.ahead_from.store(end, Ordering::Relaxed);
        self.ahead_to.store(frontier, Ordering::Relaxed);
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("ahead-{}", self.state.volume))
            .spawn(move || {
                // Cleared however the streams end (a panic included): misses stop waiting.
                struct Done<'a>(&'a AtomicBool);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::Release);
                    }
                }
                let _done = Done(&me.ahead_running);
                // One stream's failure stops them all: a reader waiting for the range
                // it claimed then fetches that range itself at once.
                let failed = AtomicBool::new(false);
                std::thread::scope(|s| {
                    for _ in 0..AHEAD_STREAMS {
                        s.spawn(|| me.ahead_stream(&failed));
                    }
                });
            });
        if spawned.is_err() {
            self.ahead_running.store(false, Ordering::Release);
        }
    }

    /// One stream of the read-ahead: claims the next [`AHEAD_STEP`] past the claimed
    /// range (`ahead_to`) and hydrates it, while the claimed range reaches less than
    /// [`PREFETCH`] past the reader.
    fn ahead_stream(&self, failed: &AtomicBool) {
        let size = self.map.size();
        let mut idle_since: Option<Instant> = None;
        // Kept for the stream's life (it ends when its reader pauses): a step's body and
        // runs are not allocated and faulted in again for every step.
        let buffers = Buffers::with_run(MAX_RUN);
        loop {
            if self.stop.load(Ordering::Relaxed)
                || self.is_complete()
                || failed.load(Ordering::Relaxed)
            {
                return;
            }
            let reader = self.last_read_end.load(Ordering::Relaxed);
            let claimed = self.ahead_to.load(Ordering::Relaxed);
            // The reader jumped back or far past the claimed range: not this run's reader.
            if reader < self.ahead_from.load(Ordering::Relaxed)
                || reader > claimed.saturating_add(PREFETCH)
            {
                return;
            }
            let from = claimed.max(reader);
            if from >= size {
                return;
            }
            if from >= reader.saturating_add(PREFETCH) {
                // Far enough ahead: wait for the reader, stop if it pauses.
                let t = *idle_since.get_or_insert_with(Instant::now);
                if t.elapsed() >= AHEAD_IDLE {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            idle_since = None;
            let until = from.saturating_add(AHEAD_STEP).min(size);
            if self
                .ahead_to
                .compare_exchange(claimed, until, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let todo: Vec<usize> = self
                .positions(from, until - from)
                .filter(|&p| !self.is_done(p))
                .collect();
            if todo.is_empty() {
                continue;
            }
            if let Err(e) = self.fetch_positions(&todo, 1, AHEAD_STEP, &buffers) {
                log::debug!("lazy restore of {}: read-ahead: {e}", self.state.volume);
                failed.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Fetches and writes the table positions of `range` not hydrated yet.
    fn hydrate(&self, range: std::ops::Range<usize>) -> Result<()> {
        let todo: Vec<usize> = range.filter(|&p| !self.is_done(p)).collect();
        // Per miss: a restore idle between misses keeps no download buffers.
        self.fetch_positions(&todo, FETCH_THREADS, CLIENT_FETCH, &Buffers::default())
    }

    /// Fetches the chunks of `positions` (ascending) and writes them where the table
    /// has them, `threads` ranged GETs of at most `max_fetch` bytes at a time, in
    /// `buffers`.
    fn fetch_positions(
        &self,
        positions: &[usize],
        threads: usize,
        max_fetch: u64,
        buffers: &Buffers,
    ) -> Result<()> {
        let (wanted, items) = wanted(self.map.entries(positions)?);
        fetch_located(
            &self.repo,
            &self.map,
            items,
            Downloads {
                threads,
                max_fetch,
                buffers,
            },
            |got, buf| self.put_chunks(got, &wanted, buf),
            &AtomicU64::new(0),
        )
    }

    /// Whether any table cell in the range is not hydrated yet.
    fn pending_in(&self, off: u64, len: u64) -> bool {
        if self.is_complete() || len == 0 {
            return false;
        }
        self.positions(off, len).any(|p| !self.is_done(p))
    }

    /// Flushes the volume, then records the bitmap (see the invariants above).
    fn save(&self) -> snapblk_core::Result<()> {
        let _g = lock(&self.save_lock);
        if self.is_complete() {
            return Ok(());
        }
        let words: Vec<u64> = self
            .done
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        self.sink.flush()?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        write_atomic(&bits_path(&self.dir, self.state.volume_id), &bytes)
            .map_err(|e| VolError::device("saving the lazy restore bitmap", e))?;
        for (s, w) in self.saved.iter().zip(&words) {
            s.fetch_or(*w, Ordering::AcqRel);
        }
        Ok(())
    }

    fn renew_hold(&self) -> Result<()> {
        let s = &self.state;
        crate::hold::place(
            &self.repo,
            &s.manifest,
            &s.backup,
            &s.pool,
            &s.volume,
            s.volume_id,
        )
        .map(|_| ())
    }

    fn background(self: Arc<Self>) {
        let n = self.map.len();
        let mut last_save = Instant::now();
        let mut last_hold = Instant::now();
        let mut backoff = Duration::from_secs(1);
        // The background pass's download buffers, kept between its batches (as a full
        // restore keeps them between frames); freed when it ends.
        let buffers = Buffers::with_run(MAX_RUN);
        let mut p0 = 0;
        while p0 < n {
            if self.stop.load(Ordering::Relaxed) || self.background_off.load(Ordering::Relaxed) {
                return;
            }
            if last_hold.elapsed().as_secs() >= crate::hold::RENEW_EVERY {
                // A failure is retried at the next pass; the hold lasts 30 renewals.
                match self.renew_hold() {
                    Ok(()) => last_hold = Instant::now(),
                    Err(e) => log::warn!(
                        "lazy restore of {}: renewing its hold: {e}",
                        self.state.volume
                    ),
                }
            }
            // Clients first: while they fetch, the link and the pool are theirs.
            let last = self.last_client_fetch.load(Ordering::Relaxed);
            if self.ahead_running.load(Ordering::Acquire)
                || (last > 0
                    && (self.started.elapsed().as_millis() as u64).saturating_sub(last)
                        < CLIENT_FIRST.as_millis() as u64)
            {
                std::thread::sleep(CLIENT_FIRST / 4);
                continue;
            }
            let batch: Vec<usize> = (p0..n).filter(|&p| !self.is_done(p)).take(BATCH).collect();
            let Some(&end) = batch.last() else {
                // Client reads hydrated the rest (perhaps while this thread backed off):
                // whatever failed before is no longer outstanding.
                *lock(&self.error) = None;
                break;
            };
            let r = self.fetch_positions(
                &batch,
                self.repo.parallelism().downloads,
                MAX_FETCH,
                &buffers,
            );
            match r {
                Ok(()) => {
                    *lock(&self.error) = None;
                    backoff = Duration::from_secs(1);
                    p0 = end + 1;
                }
                Err(e) => {
                    log::warn!(
                        "lazy restore of {}: {e}; retrying in {backoff:?}",
                        self.state.volume
                    );
                    *lock(&self.error) = Some(e.to_string());
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
            if last_save.elapsed() >= SAVE_EVERY {
                if let Err(e) = self.save() {
                    *lock(&self.error) = Some(e.to_string());
                }
                last_save = Instant::now();
            }
        }
        // Everything is hydrated: make it durable, clear the mark (the commit point),
        // remove the state, then let the daemon forget the restore.
        let _g = lock(&self.save_lock);
        let finished = self
            .sink
            .flush()
            .map_err(|e| format!("final flush: {e}"))
            .and_then(|()| {
                (self.commit)().map_err(|e| format!("clearing the volume's restore mark: {e}"))
            });
        if let Err(e) = finished {
            log::warn!("lazy restore of {}: {e}", self.state.volume);
            *lock(&self.error) = Some(e);
            return;
        }
        let id = self.state.volume_id;
        // With the temporaries a kill mid-rewrite left behind (never renamed: garbage).
        let tmps = [".tmp", ".hot-tmp"].map(|ext| self.dir.join(format!("{id}{ext}")));
        let all = [bits_path(&self.dir, id), hot_path(&self.dir, id)];
        for p in all.into_iter().chain(tmps) {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    // Harmless: the mark is gone, so the next start removes it as stale.
                    log::warn!("removing {}: {e}", p.display());
                }
            }
        }
        if let Err(e) = std::fs::File::open(&self.dir).and_then(|d| d.sync_all()) {
            log::warn!("syncing {}: {e}", self.dir.display());
        }
        self.complete.store(true, Ordering::Release);
        // The backup is no longer needed here; a hold left by a failure lapses in 30 days.
        let s = &self.state;
        if let Err(e) = crate::hold::release(&self.repo, &s.manifest, &s.pool, s.volume_id) {
            log::warn!(
                "lazy restore of {}: releasing its hold on {}: {e}",
                s.volume,
                s.backup
            );
        }
        drop(lock(&self.lease).take());
        log::info!(
            "lazy restore of {} complete in {:.1} s",
            self.state.volume,
            self.started.elapsed().as_secs_f64()
        );
        (self.release)(&self.state.volume);
    }

    pub fn status(&self) -> RestoreStatus {
        let done = self.bytes_done.load(Ordering::Relaxed);
        RestoreStatus {
            volume: self.state.volume.clone(),
            backup: self.state.backup.clone(),
            manifest: self.state.manifest.clone(),
            target: self.state.target.clone(),
            complete: self.is_complete(),
            bytes_done: Some(done),
            bytes_total: Some(self.bytes_total),
            cells_remaining: Some(self.remaining.load(Ordering::Relaxed)),
            percent: Some(if self.bytes_total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / self.bytes_total as f64
            }),
            seconds: Some(self.started.elapsed().as_secs_f64()),
            error: lock(&self.error).clone(),
            ready_seconds: None,
        }
    }
}

/// One lazy restore as `restore-status` (and `restore --lazy`) report it. An interrupted
/// restore has no progress figures, only its error.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RestoreStatus {
    pub volume: String,
    /// `vol@snap` and manifest id of the backup, and the repository it comes from.
    pub backup: String,
    pub manifest: String,
    pub target: String,
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cells_remaining: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Seconds since this run of the restore started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// The last error (fetches are retried), or why it is not running.
    pub error: Option<String>,
    /// Seconds `restore --lazy` took until the volume was usable (its own reply only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_seconds: Option<f64>,
}

/// A client's view of a volume being hydrated.
/// A volume being restored, as clients see it. It holds its hydration weakly: the
/// daemon's registry and the background thread keep it alive until it completes, after
/// which the table and chunk locations are freed and requests go straight to the volume.
pub struct LazyExport {
    hyd: std::sync::Weak<Hydration>,
    complete: Arc<AtomicBool>,
    pub inner: Arc<dyn Export>,
}

impl LazyExport {
    pub fn new(hyd: &Arc<Hydration>, inner: Arc<dyn Export>) -> LazyExport {
        LazyExport {
            hyd: Arc::downgrade(hyd),
            complete: Arc::clone(&hyd.complete),
            inner,
        }
    }

    /// The hydration still to consult (None: complete). A hydration gone before completing
    /// (its restore stopped) fails the request: its unhydrated cells would read as zeros.
    fn hyd(&self) -> snapblk_core::Result<Option<Arc<Hydration>>> {
        if self.complete.load(Ordering::Acquire) {
            return Ok(None);
        }
        match self.hyd.upgrade() {
            Some(h) if h.stop.load(Ordering::Acquire) && !h.is_complete() => Err(VolError::device(
                format!("lazy restore of {}", self.inner.name()),
                std::io::Error::other("the restore was stopped before it completed"),
            )),
            Some(h) => Ok(Some(h)),
            None if self.complete.load(Ordering::Acquire) => Ok(None),
            None => Err(VolError::device(
                format!("lazy restore of {}", self.inner.name()),
                std::io::Error::other("the restore stopped before it completed"),
            )),
        }
    }
}

impl Export for LazyExport {
    fn size(&self) -> snapblk_core::Result<u64> {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> snapblk_core::Result<()> {
        if let Some(h) = self.hyd()? {
            h.ensure(offset, buf.len() as u64)?;
            h.read_ahead(offset, buf.len() as u64);
        }
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> snapblk_core::Result<()> {
        let h = self.hyd()?;
        if let Some(h) = &h {
            h.ensure(offset, data.len() as u64)?;
        }
        self.inner.write(offset, data, fua)?;
        if let (true, Some(h)) = (fua, &h) {
            h.fua_done(offset, data.len() as u64)?;
        }
        Ok(())
    }
    fn flush(&self) -> snapblk_core::Result<()> {
        self.inner.flush()?;
        match self.hyd()? {
            Some(h) => h.save(),
            None => Ok(()),
        }
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> snapblk_core::Result<()> {
        let h = self.hyd()?;
        match &h {
            Some(h) => h.discard(offset, len, || self.inner.trim(offset, len, fua))?,
            None => self.inner.trim(offset, len, fua)?,
        }
        if let (true, Some(h)) = (fua, &h) {
            h.fua_done(offset, len)?;
        }
        Ok(())
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        fast: bool,
    ) -> snapblk_core::Result<()> {
        let h = self.hyd()?;
        let op = || self.inner.write_zeroes(offset, len, fua, fast);
        match &h {
            Some(h) => h.discard(offset, len, op)?,
            None => op()?,
        }
        if let (true, Some(h)) = (fua, &h) {
            h.fua_done(offset, len)?;
        }
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> snapblk_core::Result<Vec<StatusRun>> {
        if let Some(h) = self.hyd()? {
            if h.pending_in(offset, len) {
                return Ok(vec![(len, 0)]);
            }
        }
        self.inner.block_status(offset, len)
    }
}

/// The daemon's lazy restores, by volume name.
#[derive(Default)]
pub struct Restores {
    map: Mutex<HashMap<String, Arc<Hydration>>>,
    /// Interrupted restores not resumed yet: volume name -> backup, and the repository
    /// when this process knows it (to release the hold if the volume is deleted).
    suspended: Mutex<HashMap<String, (State, Option<Repository>)>>,
    /// Volumes a `restore --lazy` is starting or resuming right now.
    starting: Mutex<std::collections::HashSet<String>>,
    /// Status of the last restores that finished (their hydrations are dropped).
    finished: Mutex<Vec<RestoreStatus>>,
}

/// Finished restores `restore-status` still shows.
const FINISHED_KEPT: usize = 16;

/// A volume reserved by a starting restore; dropping it frees the name.
pub struct Reservation<'a> {
    restores: &'a Restores,
    volume: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.restores.starting).remove(&self.volume);
    }
}

impl Restores {
    /// Reserves `volume` for a restore that is starting or resuming: fails if one is
    /// running or starting already (two resumes of one volume must never both run).
    pub fn reserve(&self, volume: &str) -> Result<Reservation<'_>> {
        if self.active(volume).is_some() {
            return Err(BackupError::invalid(volume, "is already being restored"));
        }
        if !lock(&self.starting).insert(volume.to_string()) {
            return Err(BackupError::invalid(
                volume,
                "another restore into it is starting",
            ));
        }
        Ok(Reservation {
            restores: self,
            volume: volume.to_string(),
        })
    }
    pub fn insert(&self, h: Arc<Hydration>) {
        lock(&self.suspended).remove(h.volume());
        lock(&self.finished).retain(|v| v.volume != h.volume());
        lock(&self.map).insert(h.volume().to_string(), h);
    }
    /// Forgets a restore (its hydration, index and volume handle are dropped once no client
    /// holds them); a finished one stays in `status` as a summary.
    pub fn remove(&self, volume: &str) {
        let Some(h) = lock(&self.map).remove(volume) else {
            return;
        };
        if h.is_complete() {
            let mut f = lock(&self.finished);
            f.push(h.status());
            let n = f.len().saturating_sub(FINISHED_KEPT);
            f.drain(..n);
        }
    }
    /// Records an interrupted restore found at start (its repository unknown until resumed).
    pub fn suspend(&self, s: State) {
        self.suspend_from(s, None);
    }
    /// Records an interrupted restore of `repo`.
    pub fn suspend_from(&self, s: State, repo: Option<Repository>) {
        lock(&self.suspended).insert(s.volume.clone(), (s, repo));
    }
    /// Forgets an interrupted restore whose volume was deleted, releasing its hold when
    /// the repository is known (else the hold lapses in 30 days: crate::hold).
    pub fn forget(&self, volume: &str) {
        let Some((s, repo)) = lock(&self.suspended).remove(volume) else {
            return;
        };
        match repo {
            Some(r) => {
                if let Err(e) = crate::hold::release(&r, &s.manifest, &s.pool, s.volume_id) {
                    log::warn!("releasing the hold of the abandoned lazy restore of {volume} on {}: {e}", s.backup);
                }
            }
            None => log::info!(
                "the abandoned lazy restore of {volume} keeps a hold on {} at {} until it lapses (30 days; `backup forget --force` removes the backup anyway)",
                s.backup,
                s.target
            ),
        }
    }
    /// The unfinished hydration of `volume`, if any.
    pub fn active(&self, volume: &str) -> Option<Arc<Hydration>> {
        lock(&self.map)
            .get(volume)
            .filter(|h| !h.is_complete())
            .cloned()
    }
    pub fn suspended(&self, volume: &str) -> Option<State> {
        lock(&self.suspended).get(volume).map(|(s, _)| s.clone())
    }
    /// Whether `volume` is still being restored (active or suspended).
    pub fn busy(&self, volume: &str) -> bool {
        self.active(volume).is_some() || self.suspended(volume).is_some()
    }
    /// `(volume, bytes_total, bytes_done)` of every restore hydrating now.
    pub fn progress(&self) -> Vec<(String, u64, u64)> {
        lock(&self.map)
            .values()
            .filter(|h| !h.is_complete())
            .map(|h| {
                let done = h.bytes_done.load(Ordering::Relaxed);
                (h.state.volume.clone(), h.bytes_total, done)
            })
            .collect()
    }

    pub fn status(&self) -> Vec<RestoreStatus> {
        let mut out: Vec<RestoreStatus> = lock(&self.finished).clone();
        out.extend(lock(&self.map).values().map(|h| h.status()));
        out.extend(lock(&self.suspended).values().map(|(s, _)| RestoreStatus {
            volume: s.volume.clone(),
            backup: s.backup.clone(),
            manifest: s.manifest.clone(),
            target: s.target.clone(),
            complete: false,
            bytes_done: None,
            bytes_total: None,
            cells_remaining: None,
            percent: None,
            seconds: None,
            error: Some(
                "interrupted by a daemon restart: run the same `snapblk restore --lazy` again to resume"
                    .into(),
            ),
            ready_seconds: None,
        }));
        out
    }
    /// Stops the lazy restore of `volume` (it is then an interrupted one: the volume can be
    /// deleted, or the restore resumed); false if none runs. The hydration lets go of the
    /// volume once its background thread and clients are done with it.
    pub fn cancel(&self, volume: &str) -> bool {
        let Some(h) = lock(&self.map).remove(volume) else {
            return false;
        };
        if h.is_complete() {
            return false;
        }
        h.stop();
        self.suspend_from(h.state.clone(), Some(h.repo.clone()));
        true
    }
    pub fn stop_all(&self) {
        for h in lock(&self.map).values() {
            h.stop();
        }
    }
}

/// Wraps a provider so volumes being restored lazily hydrate on access, and volumes that
/// are marked incomplete (a restore not running, interrupted, or still being set up)
/// refuse to open: nothing reads or writes a half-restored volume behind its restore.
pub struct LazyExports {
    pub inner: Arc<dyn ExportProvider>,
    pub restores: Arc<Restores>,
    pub pool: Arc<Pool>,
}

impl ExportProvider for LazyExports {
    fn open(&self, name: &str) -> snapblk_core::Result<Arc<dyn Export>> {
        // The empty name is the default volume: resolved first, so a volume being restored
        // lazily is served through its restore whatever name reached it.
        let name = &self.pool.export_name(name)?;
        if !name.contains('@') {
            if let Some(hyd) = self.restores.active(name) {
                let e = self.inner.open(name)?;
                return Ok(Arc::new(LazyExport::new(&hyd, e)));
            }
            if let Some(m) = self.pool.volume_info(name).ok().and_then(|v| v.incomplete) {
                let how = match m.by {
                    Filling::LazyRestore => format!(
                        "resume it with `snapblk restore {} {} --as {name} --lazy`",
                        m.source, m.backup
                    ),
                    Filling::FullRestore => "delete it and restore again".to_string(),
                };
                return Err(VolError::Busy(format!(
                    "volume {name} is not whole: {m} ({how})"
                )));
            }
        }
        self.inner.open(name)
    }
    fn list(&self) -> Vec<String> {
        self.inner.list()
    }
}
