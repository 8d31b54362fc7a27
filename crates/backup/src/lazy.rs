//! Lazy restore: a restored volume is usable at once while its data arrives.
//!
//! A `Hydration` owns a new, empty volume and the backup's cell table. Cells are
//! *hydrated* (their chunk fetched, verified and written into the volume) on first touch by
//! a client, or by a background thread working through the table in order. A bitmap over
//! table positions records hydrated cells.
//!
//! Invariants:
//! - A table cell is never read, written, trimmed or reported as a hole before it is
//!   hydrated: `LazyExport` hydrates every table cell a request touches first, and block
//!   status reports a range with unhydrated cells as data.
//! - A cell is hydrated at most once, under its stripe lock, so hydration never overwrites a
//!   client's write (clients write only after the cell is hydrated).
//! - The bitmap on disk only claims cells whose data the pool has synced: it is saved after
//!   a pool flush (on client FLUSH, and periodically by the background thread). After a
//!   crash, a cell hydrated but not recorded is hydrated again, which is only wrong for a
//!   client write that was never flushed (and may be lost anyway).
//! - A failed fetch fails the request with EIO (never zeros or stale data); the background
//!   thread records the error and retries with backoff until the store answers again.
//!
//! When every cell is hydrated the volume is synced, the state files are removed and the
//! volume is an ordinary local volume (requests pass straight through).
//!
//! Threading: one background thread per hydration; client requests hydrate on their own
//! threads; stripe locks serialise work on one cell.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snapblk_core::export::{Export, ExportProvider, StatusRun};
use snapblk_core::Error as VolError;

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::manifest::{self, Header, Table};
use crate::par::lock;
use crate::repo::Repository;
use crate::restore::Fetcher;

const STRIPES: usize = 256;
/// Cells fetched per background request batch.
const BATCH: usize = 512;
/// The background thread saves the bitmap at least this often.
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// What the state file records, to resume after a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct State {
    pub volume: String,
    pub volume_id: u64,
    /// Manifest id and `vol@snap` of the backup being restored.
    pub manifest: String,
    pub backup: String,
    /// Where it comes from (no key material).
    pub target: String,
}

pub struct Hydration {
    state: State,
    fetcher: Fetcher,
    table: Table,
    sink: Arc<dyn Export>,
    done: Vec<AtomicU64>,
    stripes: Vec<Mutex<()>>,
    remaining: AtomicU64,
    bytes_done: AtomicU64,
    bytes_total: u64,
    complete: AtomicBool,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
    save_lock: Mutex<()>,
    started: Instant,
    dir: PathBuf,
}

fn bits_path(dir: &Path, vol_id: u64) -> PathBuf {
    dir.join(format!("{vol_id}.bits"))
}
fn state_path(dir: &Path, vol_id: u64) -> PathBuf {
    dir.join(format!("{vol_id}.json"))
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

/// Interrupted lazy restores recorded in `dir`.
pub fn interrupted(dir: &Path) -> Vec<State> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

impl Hydration {
    /// Starts (or, with a saved bitmap in `dir`, resumes) hydrating `sink` — the volume
    /// `state.volume`, new and empty on a fresh start — from `header`.
    pub fn start(
        repo: &Repository,
        header: &Header,
        sink: Arc<dyn Export>,
        state: State,
        dir: &Path,
    ) -> Result<Arc<Hydration>> {
        let table = manifest::read_table(repo, header)?;
        let fetcher = Fetcher::new(repo)?;
        for (_, id) in &table.cells {
            fetcher.locate(id)?;
        }
        let n = table.cells.len();
        let done: Vec<AtomicU64> = (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        std::fs::create_dir_all(dir)?;
        let spath = state_path(dir, state.volume_id);
        let resumed = spath.exists();
        if resumed {
            if let Some(b) = read_bits(&bits_path(dir, state.volume_id), done.len())? {
                for (w, c) in done.iter().zip(b.chunks_exact(8)) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    w.store(u64::from_le_bytes(a), Ordering::Relaxed);
                }
            }
        }
        let bytes_total = header.stored_bytes;
        let h = Arc::new(Hydration {
            fetcher,
            sink,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            remaining: AtomicU64::new(n as u64),
            bytes_done: AtomicU64::new(0),
            bytes_total,
            complete: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            save_lock: Mutex::new(()),
            started: Instant::now(),
            dir: dir.to_path_buf(),
            done,
            table,
            state,
        });
        let mut rem = 0u64;
        let mut bytes = 0u64;
        for (p, (c, _)) in h.table.cells.iter().enumerate() {
            if h.is_done(p) {
                bytes += h.table.cell_len(*c);
            } else {
                rem += 1;
            }
        }
        h.remaining.store(rem, Ordering::Relaxed);
        h.bytes_done.store(bytes, Ordering::Relaxed);
        if !resumed {
            let s = serde_json::to_vec_pretty(&h.state)
                .map_err(|e| BackupError::invalid("restore state", e.to_string()))?;
            write_atomic(&spath, &s)?;
        }
        let bg = Arc::clone(&h);
        std::thread::Builder::new()
            .name(format!("hydrate-{}", h.state.volume))
            .spawn(move || bg.background())?;
        Ok(h)
    }

    pub fn volume(&self) -> &str {
        &self.state.volume
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Stops the background thread (daemon shutdown); state files stay for a resume.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
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

    /// Writes `data` as table position `p` unless it is hydrated already.
    fn put(&self, p: usize, data: &[u8]) -> snapblk_core::Result<()> {
        let _g = lock(&self.stripes[p % STRIPES]);
        if self.is_done(p) {
            return Ok(());
        }
        let cell = self.table.cells[p].0;
        self.sink
            .write(cell * u64::from(self.table.chunk_size), data, false)?;
        self.done[p / 64].fetch_or(1 << (p % 64), Ordering::AcqRel);
        self.bytes_done
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.remaining.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Hydrates every table cell overlapping `[off, off + len)`.
    pub fn ensure(&self, off: u64, len: u64) -> snapblk_core::Result<()> {
        if self.is_complete() || len == 0 {
            return Ok(());
        }
        let cs = u64::from(self.table.chunk_size);
        let (first, last) = (off / cs, (off + len - 1) / cs);
        let start = self.table.cells.partition_point(|(c, _)| *c < first);
        for p in start..self.table.cells.len() {
            let (c, id) = self.table.cells[p];
            if c > last {
                break;
            }
            if self.is_done(p) {
                continue;
            }
            let data = self.fetcher.fetch(&id).map_err(|e| self.eio(e))?;
            self.put(p, &data)?;
        }
        Ok(())
    }

    /// Whether any table cell in the range is not hydrated yet.
    fn pending_in(&self, off: u64, len: u64) -> bool {
        if self.is_complete() || len == 0 {
            return false;
        }
        let cs = u64::from(self.table.chunk_size);
        let (first, last) = (off / cs, (off + len - 1) / cs);
        let start = self.table.cells.partition_point(|(c, _)| *c < first);
        (start..self.table.cells.len())
            .take_while(|&p| self.table.cells[p].0 <= last)
            .any(|p| !self.is_done(p))
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
            .map_err(|e| VolError::device("saving the lazy restore bitmap", e))
    }

    fn background(self: Arc<Self>) {
        let n = self.table.cells.len();
        let mut last_save = Instant::now();
        let mut backoff = Duration::from_secs(1);
        let mut p0 = 0;
        while p0 < n {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let batch: Vec<usize> = (p0..n).filter(|&p| !self.is_done(p)).take(BATCH).collect();
            let Some(&end) = batch.last() else {
                // Client reads hydrated the rest (perhaps while this thread backed off):
                // whatever failed before is no longer outstanding.
                *lock(&self.error) = None;
                break;
            };
            let mut by_id: HashMap<ChunkId, Vec<usize>> = HashMap::new();
            for &p in &batch {
                by_id.entry(self.table.cells[p].1).or_default().push(p);
            }
            let ids: Vec<ChunkId> = by_id.keys().copied().collect();
            let dl = AtomicU64::new(0);
            let r = self.fetcher.fetch_many(
                &ids,
                8,
                |chunks| {
                    for (id, data) in chunks {
                        for &p in by_id.get(&id).map(Vec::as_slice).unwrap_or(&[]) {
                            self.put(p, &data)?;
                        }
                    }
                    Ok(())
                },
                &dl,
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
        // Everything is hydrated: make it durable, then forget the restore.
        match self.sink.flush() {
            Ok(()) => {
                let _g = lock(&self.save_lock);
                self.complete.store(true, Ordering::Release);
                let _ = std::fs::remove_file(state_path(&self.dir, self.state.volume_id));
                let _ = std::fs::remove_file(bits_path(&self.dir, self.state.volume_id));
                log::info!(
                    "lazy restore of {} complete in {:.1} s",
                    self.state.volume,
                    self.started.elapsed().as_secs_f64()
                );
            }
            Err(e) => *lock(&self.error) = Some(format!("final flush: {e}")),
        }
    }

    pub fn status(&self) -> Value {
        let done = self.bytes_done.load(Ordering::Relaxed);
        json!({
            "volume": self.state.volume,
            "backup": self.state.backup,
            "manifest": self.state.manifest,
            "target": self.state.target,
            "complete": self.is_complete(),
            "bytes_done": done,
            "bytes_total": self.bytes_total,
            "cells_remaining": self.remaining.load(Ordering::Relaxed),
            "percent": if self.bytes_total == 0 { 100.0 } else { done as f64 * 100.0 / self.bytes_total as f64 },
            "seconds": self.started.elapsed().as_secs_f64(),
            "error": *lock(&self.error),
        })
    }
}

/// A client's view of a volume being hydrated.
pub struct LazyExport {
    pub hyd: Arc<Hydration>,
    pub inner: Arc<dyn Export>,
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
        self.hyd.ensure(offset, buf.len() as u64)?;
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> snapblk_core::Result<()> {
        self.hyd.ensure(offset, data.len() as u64)?;
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> snapblk_core::Result<()> {
        self.inner.flush()?;
        self.hyd.save()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> snapblk_core::Result<()> {
        self.hyd.ensure(offset, len)?;
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        fast: bool,
    ) -> snapblk_core::Result<()> {
        self.hyd.ensure(offset, len)?;
        self.inner.write_zeroes(offset, len, fua, fast)
    }
    fn block_status(&self, offset: u64, len: u64) -> snapblk_core::Result<Vec<StatusRun>> {
        if self.hyd.pending_in(offset, len) {
            return Ok(vec![(len, 0)]);
        }
        self.inner.block_status(offset, len)
    }
}

/// The daemon's lazy restores, by volume name.
#[derive(Default)]
pub struct Restores {
    map: Mutex<HashMap<String, Arc<Hydration>>>,
    /// Interrupted restores not resumed yet: volume name -> backup.
    suspended: Mutex<HashMap<String, State>>,
}

impl Restores {
    pub fn insert(&self, h: Arc<Hydration>) {
        lock(&self.suspended).remove(h.volume());
        lock(&self.map).insert(h.volume().to_string(), h);
    }
    pub fn suspend(&self, s: State) {
        lock(&self.suspended).insert(s.volume.clone(), s);
    }
    /// The unfinished hydration of `volume`, if any.
    pub fn active(&self, volume: &str) -> Option<Arc<Hydration>> {
        lock(&self.map)
            .get(volume)
            .filter(|h| !h.is_complete())
            .cloned()
    }
    pub fn suspended(&self, volume: &str) -> Option<State> {
        lock(&self.suspended).get(volume).cloned()
    }
    /// Whether `volume` is still being restored (active or suspended).
    pub fn busy(&self, volume: &str) -> bool {
        self.active(volume).is_some() || self.suspended(volume).is_some()
    }
    pub fn status(&self) -> Vec<Value> {
        let mut out: Vec<Value> = lock(&self.map).values().map(|h| h.status()).collect();
        out.extend(lock(&self.suspended).values().map(|s| {
            json!({ "volume": s.volume, "backup": s.backup, "manifest": s.manifest,
                "target": s.target, "complete": false,
                "error": "interrupted by a daemon restart: run the same `snapblk restore --lazy` again to resume" })
        }));
        out
    }
    pub fn stop_all(&self) {
        for h in lock(&self.map).values() {
            h.stop();
        }
    }
}

/// Wraps a provider so volumes being restored lazily hydrate on access, and volumes whose
/// lazy restore was interrupted refuse I/O until it is resumed.
pub struct LazyExports {
    pub inner: Arc<dyn ExportProvider>,
    pub restores: Arc<Restores>,
}

impl ExportProvider for LazyExports {
    fn open(&self, name: &str) -> snapblk_core::Result<Arc<dyn Export>> {
        if let Some(s) = self.restores.suspended(name) {
            return Err(VolError::Busy(format!(
                "volume {name} is a lazy restore of {} from {} that was interrupted; run `snapblk restore {} {} --as {name} --lazy` to resume it",
                s.backup, s.target, s.target, s.backup
            )));
        }
        let e = self.inner.open(name)?;
        Ok(match self.restores.active(name) {
            Some(hyd) => Arc::new(LazyExport { hyd, inner: e }),
            None => e,
        })
    }
    fn list(&self) -> Vec<String> {
        self.inner.list()
    }
}
