//! The local chunk index (docs/design.md §12 "Segmented tables and an on-disk chunk
//! index"): which packs hold a chunk, from sorted files on this host instead of a map in
//! RAM. This is its store and lookup; `crate::chunks` keeps it up to date with the
//! repository's listing and says which of its packs a job may use.
//!
//! Layout of a directory (one per repository): `packs`, the pack table (a pack's number
//! is its line), and files `chunks.<n>`, each a run of [`RECORD`]-byte records (chunk id
//! 32, pack number u32 LE, offset u32 LE, length u32 LE) sorted by id then pack number,
//! followed by a fanout (2^bits + 1 u64 LE: records whose id's first `bits` bits are below
//! each value; bits chosen for ~16 records a bucket, 4..=20) and a trailer (`SBLI`,
//! version u8 = 2, bits u8, record count u64 LE). A lookup reads one fanout bucket per
//! file with one `pread` and searches it; only the fanouts (a 16th of a record per
//! record: 512 KiB for a file of 1M records) are held in RAM.
//!
//! It is a cache: what it answers is a candidate its caller checks (a chunk read back is
//! verified against its id), so a damaged file costs a rebuild, never a wrong restore. A
//! file whose length, fanout or trailer does not check is refused when opened. Files are
//! written to a temporary name, synced and renamed; a crash leaves the old set.
//!
//! Threading: lookups take `&self` (preads on shared files); updates take `&mut self`.
//! Several jobs and processes share a directory: [`LocalIndex::sync`] updates it under an
//! exclusive file lock; an index once returned reads through its open files, which a
//! later merge or rebuild unlinks but never changes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::pack::PackEntry;

/// Bytes of one record.
pub const RECORD: usize = 44;
/// Bytes of the trailer: magic 4, version 1, fanout bits 1, generation 8, packs needed 4,
/// record count 8, BLAKE3 of everything before the hash 32.
const TRAILER: usize = 58;
/// First word of the pack table's first line (`snapblk-chunk-index <generation>`).
const TABLE_HEAD: &str = "snapblk-chunk-index";
/// Fanout bits: enough for ~16 records per bucket, within these bounds (a file of 1M
/// records, the most one sort writes, has 16 bits: 512 KiB of fanout).
const MIN_BITS: u32 = 4;
const MAX_BITS: u32 = 20;
const MAGIC: &[u8; 4] = b"SBLI";
/// Records sorted in RAM before they are written as a file (704 KiB): the most an add
/// holds, however many packs it adds (more files merge as they come, geometrically).
pub const RUN_RECORDS: usize = 1 << 14;
/// Read buffers of one merge, shared by its inputs (each gets at least 64 KiB): a merge
/// of many files holds no more than a merge of two, so a job's memory does not grow with
/// the files its own index has reached (sequential reads: the kernel reads ahead anyway).
const MERGE_READ_BUFFERS: usize = 1 << 20;
/// Most files kept: past this the newest are merged even if their sizes still fall
/// geometrically (they do not reach it: 24 halvings from the largest file).
const MAX_FILES: usize = 24;

/// Where one copy of a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub pack: u32,
    pub offset: u32,
    pub len: u32,
}

struct Run {
    path: PathBuf,
    file: File,
    records: u64,
    bits: u32,
    fanout: Vec<u64>,
}

pub struct LocalIndex {
    dir: PathBuf,
    /// Random, fixed when the pack table is created: each file names it, so a file left
    /// from an earlier table (an interrupted wipe) is never read against a new one.
    generation: u64,
    packs: Vec<String>,
    numbers: HashMap<String, u32>,
    runs: Vec<Run>,
    next_file: u64,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = format!("local chunk index: {what}");
    let path = path.display().to_string();
    move |e| BackupError::LocalState {
        what,
        path,
        detail: e.to_string(),
    }
}

/// The bucket of `id` in a fanout of `bits` bits: its first `bits` bits.
fn bucket(id: &ChunkId, bits: u32) -> usize {
    (u32::from_be_bytes([id.0[0], id.0[1], id.0[2], id.0[3]]) >> (32 - bits)) as usize
}

/// The fanout bits of a file of `records` records.
fn bits_for(records: u64) -> u32 {
    (64 - (records / 16).leading_zeros()).clamp(MIN_BITS, MAX_BITS)
}

fn encode(id: &ChunkId, h: &Hit, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&h.pack.to_le_bytes());
    out.extend_from_slice(&h.offset.to_le_bytes());
    out.extend_from_slice(&h.len.to_le_bytes());
}

fn decode(r: &[u8]) -> (ChunkId, Hit) {
    let mut id = [0u8; 32];
    id.copy_from_slice(&r[..32]);
    let u = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
    (
        ChunkId(id),
        Hit {
            pack: u(32),
            offset: u(36),
            len: u(40),
        },
    )
}

/// Every copy of `id` among `buf`'s records (one bucket, sorted), appended to `out`.
fn search(buf: &[u8], id: &ChunkId, out: &mut Vec<Hit>) {
    let n = buf.len() / RECORD;
    let rec = |i: usize| &buf[i * RECORD..(i + 1) * RECORD];
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if rec(mid)[..32] < id.0[..] {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    for i in lo..n {
        let r = rec(i);
        if r[..32] != id.0[..] {
            break;
        }
        out.push(decode(r).1);
    }
}

impl Run {
    /// Opens a file of the table `generation` holding `packs` packs: refused unless its
    /// trailer, length, fanout and checksum check and it names no pack the table lacks.
    fn open(path: PathBuf, generation: u64, packs: usize) -> Result<Run> {
        let file = File::open(&path).map_err(io("opening", &path))?;
        let len = file.metadata().map_err(io("reading", &path))?.len();
        let bad = |d: &str| BackupError::corrupt(path.display().to_string(), d.to_string());
        if len < TRAILER as u64 {
            return Err(bad("shorter than its trailer"));
        }
        let mut t = [0u8; TRAILER];
        file.read_exact_at(&mut t, len - TRAILER as u64)
            .map_err(io("reading", &path))?;
        if &t[..4] != MAGIC || t[4] != 3 {
            return Err(bad("not a chunk index file of this version"));
        }
        let bits = u32::from(t[5]);
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(bad("its fanout size is out of range"));
        }
        let u64at = |i: usize| u64::from_le_bytes(t[i..i + 8].try_into().expect("8 bytes"));
        if u64at(6) != generation {
            return Err(bad("it belongs to another pack table"));
        }
        let needed = u32::from_le_bytes(t[14..18].try_into().expect("4 bytes"));
        if needed as usize > packs {
            return Err(bad("it names packs its pack table lacks"));
        }
        let records = u64at(18);
        let entries = (1usize << bits) + 1;
        let tail_len = (entries * 8 + TRAILER) as u64;
        let body = len.checked_sub(tail_len);
        if body.is_none() || records.checked_mul(RECORD as u64) != body {
            return Err(bad("its length does not match its record count"));
        }
        // The checksum covers every byte before it: records, fanout, trailer.
        let mut h = blake3::Hasher::new();
        let mut r = BufReader::with_capacity(1 << 20, (&file).take(len - 32));
        std::io::copy(&mut r, &mut h).map_err(io("reading", &path))?;
        if h.finalize().as_bytes() != &t[26..58] {
            return Err(bad("its checksum does not match"));
        }
        let mut raw = vec![0u8; entries * 8];
        file.read_exact_at(&mut raw, len - tail_len)
            .map_err(io("reading", &path))?;
        let fanout: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if fanout[0] != 0
            || fanout[entries - 1] != records
            || fanout.windows(2).any(|w| w[0] > w[1])
        {
            return Err(bad("its fanout does not check"));
        }
        Ok(Run {
            path,
            file,
            records,
            bits,
            fanout,
        })
    }

    /// Reads the records of bucket `b`.
    fn bucket(&self, b: usize, buf: &mut Vec<u8>) -> Result<()> {
        let (lo, hi) = (self.fanout[b], self.fanout[b + 1]);
        // The fanout checked monotonic and bounded by the record count when opened.
        buf.resize(((hi - lo) as usize) * RECORD, 0);
        self.file
            .read_exact_at(buf, lo * RECORD as u64)
            .map_err(io("reading", &self.path))
    }

    /// All records in order, read through a buffer of `buffer` bytes.
    fn records(&self, buffer: usize) -> Result<impl Iterator<Item = Result<(ChunkId, Hit)>> + '_> {
        // Its own open file: a clone would share the offset other reads move.
        let f = File::open(&self.path).map_err(io("opening", &self.path))?;
        let mut r = BufReader::with_capacity(buffer, f.take(self.records * RECORD as u64));
        let path = self.path.clone();
        Ok((0..self.records).map(move |_| {
            let mut b = [0u8; RECORD];
            r.read_exact(&mut b).map_err(io("reading", &path))?;
            Ok(decode(&b))
        }))
    }
}

/// Lookups that keep the last bucket read of each file (see [`LocalIndex::cursor`]).
pub struct Cursor<'a> {
    ix: &'a LocalIndex,
    held: Vec<(usize, Vec<u8>)>,
}

impl Cursor<'_> {
    /// Every copy of `id` the index lists, into `out` (cleared first).
    pub fn lookup(&mut self, id: &ChunkId, out: &mut Vec<Hit>) -> Result<()> {
        out.clear();
        for (r, (at, buf)) in self.ix.runs.iter().zip(&mut self.held) {
            let b = bucket(id, r.bits);
            if *at != b {
                *at = usize::MAX;
                r.bucket(b, buf)?;
                *at = b;
            }
            search(buf, id, out);
        }
        Ok(())
    }
}

/// Writes sorted records as a file (temporary name, synced, renamed) of the table
/// `generation`, naming packs below `needed`. `total` is how many `records` yields (it
/// sizes the fanout; a different count fails).
fn write_run(
    path: &Path,
    generation: u64,
    needed: u32,
    total: u64,
    records: impl Iterator<Item = Result<(ChunkId, Hit)>>,
) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let f = File::create(&tmp).map_err(io("creating", &tmp))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut h = blake3::Hasher::new();
    let bits = bits_for(total);
    let mut counts = vec![0u64; (1 << bits) + 1];
    let mut n = 0u64;
    let mut rec = Vec::with_capacity(RECORD);
    for r in records {
        let (id, hit) = r?;
        rec.clear();
        encode(&id, &hit, &mut rec);
        w.write_all(&rec).map_err(io("writing", &tmp))?;
        h.update(&rec);
        counts[bucket(&id, bits) + 1] += 1;
        n += 1;
    }
    if n != total {
        return Err(BackupError::invalid(
            format!("local chunk index: writing {}", tmp.display()),
            format!("{n} records instead of {total}"),
        ));
    }
    let mut tail = Vec::with_capacity(counts.len() * 8 + TRAILER);
    let mut sum = 0u64;
    for c in counts {
        sum += c;
        tail.extend_from_slice(&sum.to_le_bytes());
    }
    tail.extend_from_slice(MAGIC);
    tail.push(3);
    tail.push(bits as u8);
    tail.extend_from_slice(&generation.to_le_bytes());
    tail.extend_from_slice(&needed.to_le_bytes());
    tail.extend_from_slice(&n.to_le_bytes());
    h.update(&tail);
    tail.extend_from_slice(h.finalize().as_bytes());
    w.write_all(&tail).map_err(io("writing", &tmp))?;
    let f = w
        .into_inner()
        .map_err(|e| io("writing", &tmp)(e.into_error()))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", &tmp))?;
    Ok(())
}

/// Removes an index's files (not its lock): the record files first, then the pack
/// table (so what an interrupted wipe leaves is refused by its generation anyway).
fn wipe(dir: &Path) -> Result<()> {
    let mut table = None;
    for e in std::fs::read_dir(dir)
        .map_err(io("listing", dir))?
        .flatten()
    {
        let name = e.file_name();
        if name == "packs" {
            table = Some(e.path());
        } else if name != "lock" {
            std::fs::remove_file(e.path()).map_err(io("removing", &e.path()))?;
        }
    }
    sync_dir(dir)?;
    if let Some(t) = table {
        std::fs::remove_file(&t).map_err(io("removing", &t))?;
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

impl LocalIndex {
    /// Opens (or creates) the index in `dir`; a file that does not check is an error (the
    /// caller removes the directory and builds it again).
    pub(crate) fn open(dir: &Path) -> Result<LocalIndex> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let packs_path = dir.join("packs");
        let text = match std::fs::read_to_string(&packs_path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("reading", &packs_path)(e)),
        };
        // A line cut short by a crash: drop it, so the next append starts a line of its
        // own (the file written before it needs its pack, so it is refused and the index
        // rebuilt).
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&packs_path)
                .map_err(io("opening", &packs_path))?;
            f.set_len(whole as u64)
                .and_then(|()| f.sync_all())
                .map_err(io("truncating", &packs_path))?;
        }
        let mut lines = text[..whole].lines();
        let generation = match lines.next() {
            Some(head) => head
                .strip_prefix(TABLE_HEAD)
                .and_then(|g| u64::from_str_radix(g.trim(), 16).ok())
                .ok_or_else(|| {
                    BackupError::corrupt(
                        packs_path.display().to_string(),
                        "not a chunk index's pack table",
                    )
                })?,
            None => {
                // A new table (or one whose first line a crash cut): a new generation,
                // recorded before any file names it.
                let g = u64::from_le_bytes(crate::crypto::random_bytes());
                let mut f = File::create(&packs_path).map_err(io("creating", &packs_path))?;
                writeln!(f, "{TABLE_HEAD} {g:016x}")
                    .and_then(|()| f.sync_all())
                    .map_err(io("writing", &packs_path))?;
                sync_dir(dir)?;
                g
            }
        };
        let packs: Vec<String> = lines.map(str::to_string).collect();
        let mut numbered: Vec<(u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(dir)
            .map_err(io("listing", dir))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix("chunks.").and_then(|n| n.parse().ok()) {
                numbered.push((n, e.path()));
            } else if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path()); // an interrupted write
            }
        }
        numbered.sort();
        let next_file = numbered.last().map_or(0, |(n, _)| n + 1);
        let runs = numbered
            .into_iter()
            .map(|(_, p)| Run::open(p, generation, packs.len()))
            .collect::<Result<Vec<_>>>()?;
        if packs.len() as u64 > u64::from(u32::MAX) {
            return Err(BackupError::corrupt(
                packs_path.display().to_string(),
                "more packs than numbers",
            ));
        }
        let numbers = packs
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        Ok(LocalIndex {
            dir: dir.to_path_buf(),
            generation,
            packs,
            numbers,
            runs,
            next_file,
        })
    }

    /// Brings the index in `dir` up to date with `listed` (the packs whose index objects
    /// the caller's listing shows) and returns it. Under an exclusive lock on `dir/lock`,
    /// so jobs of this and other processes update it one at a time (each sees what the
    /// one before added); an index that does not open (a damaged file) or whose packs are
    /// mostly no longer listed (gc deleted them) is removed and built again. The entries
    /// of packs it lacks come from `fetch`, called with up to `batch` names at a time.
    /// The index returned holds open files, not the lock: a later job's merge or rebuild
    /// removes names, not the data this one reads.
    pub fn sync(
        dir: &Path,
        listed: &[String],
        batch: usize,
        mut fetch: impl FnMut(&[String]) -> Result<Vec<Vec<PackEntry>>>,
    ) -> Result<LocalIndex> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let lock_path = dir.join("lock");
        let lock = File::create(&lock_path).map_err(io("creating", &lock_path))?;
        lock.lock().map_err(io("locking", &lock_path))?;
        let mut ix = match LocalIndex::open(dir) {
            Ok(ix) => ix,
            Err(e) => {
                log::warn!("{e}: building the local chunk index again");
                wipe(dir)?;
                LocalIndex::open(dir)?
            }
        };
        let live = listed.iter().filter(|p| ix.has_pack(p)).count();
        let dead = ix.packs.len() - live;
        if dead >= 64 && dead > live {
            log::info!(
                "local chunk index {}: {dead} of its {} packs are gone; building it again",
                dir.display(),
                ix.packs.len()
            );
            drop(ix);
            wipe(dir)?;
            ix = LocalIndex::open(dir)?;
        }
        let todo: Vec<String> = listed.iter().filter(|p| !ix.has_pack(p)).cloned().collect();
        let mut parts = todo.chunks(batch.max(1));
        let mut ready: std::vec::IntoIter<(String, Vec<PackEntry>)> = Vec::new().into_iter();
        let items = std::iter::from_fn(|| loop {
            if let Some(p) = ready.next() {
                return Some(Ok(p));
            }
            let names = parts.next()?;
            match fetch(names) {
                Ok(got) => {
                    ready = names
                        .iter()
                        .cloned()
                        .zip(got)
                        .collect::<Vec<_>>()
                        .into_iter()
                }
                Err(e) => return Some(Err(e)),
            }
        });
        ix.add(items)?;
        drop(lock);
        Ok(ix)
    }

    /// Whether the records of `pack` are in the index.
    pub fn has_pack(&self, pack: &str) -> bool {
        self.numbers.contains_key(pack)
    }

    /// The number of pack `name`, if its records are in the index.
    pub fn number(&self, name: &str) -> Option<u32> {
        self.numbers.get(name).copied()
    }

    /// Packs in the pack table (numbers run 0..this).
    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }

    /// The name of pack number `n`.
    pub fn pack_name(&self, n: u32) -> Option<&str> {
        self.packs.get(n as usize).map(String::as_str)
    }

    /// Records held, in all files.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.records).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every copy of `id` the index lists (one pread per file).
    pub fn lookup(&self, id: &ChunkId) -> Result<Vec<Hit>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for r in &self.runs {
            r.bucket(bucket(id, r.bits), &mut buf)?;
            search(&buf, id, &mut out);
        }
        Ok(out)
    }

    /// A reader for lookups in ascending id order: each file's bucket is read once
    /// however many lookups fall in it, so looking up every id of a sorted list streams
    /// the files once.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            ix: self,
            held: self.runs.iter().map(|_| (usize::MAX, Vec::new())).collect(),
        }
    }

    /// Adds the entries of packs not in the index yet (others are skipped), sorting at
    /// most [`RUN_RECORDS`] in RAM at a time; then merges the newest files as
    /// [`LocalIndex::merge_newest`] says. A failed item stops the add: what was added before
    /// it stays (and is whole).
    pub(crate) fn add(
        &mut self,
        packs: impl IntoIterator<Item = Result<(String, Vec<PackEntry>)>>,
    ) -> Result<()> {
        let mut batch: Vec<(ChunkId, Hit)> = Vec::new();
        let mut new_packs: Vec<String> = Vec::new();
        for item in packs {
            let (name, entries) = match item {
                Ok(p) => p,
                Err(e) => {
                    // Keep what came before: a retry fetches only the rest.
                    self.flush(&mut batch, &new_packs)?;
                    return Err(e);
                }
            };
            if self.numbers.contains_key(&name) || name.contains('\n') {
                continue;
            }
            let n = u32::try_from(self.packs.len()).map_err(|_| {
                BackupError::invalid("local chunk index", "more packs than numbers")
            })?;
            self.numbers.insert(name.clone(), n);
            self.packs.push(name.clone());
            new_packs.push(name);
            for e in entries {
                batch.push((
                    e.id,
                    Hit {
                        pack: n,
                        offset: e.offset,
                        len: e.len,
                    },
                ));
            }
            if batch.len() >= RUN_RECORDS {
                self.flush(&mut batch, &new_packs)?;
                new_packs.clear();
                self.merge_newest()?;
            }
        }
        if !batch.is_empty() || !new_packs.is_empty() {
            self.flush(&mut batch, &new_packs)?;
        }
        self.merge_newest()
    }

    /// Keeps the files' sizes falling geometrically from the oldest (each file more than
    /// twice the newer ones together): the newest files are merged, in one pass, with
    /// every older file they reach half of (and with more, while there would be more than
    /// [`MAX_FILES`]). A lookup then reads about log2(records / smallest file) files, and
    /// each record is rewritten O(log) times over the index's life: an add costs what it
    /// adds (amortised), never a rewrite of the whole index per add (a job's own index
    /// grows a file per batch it stores), and an add of many files (a first sync) merges
    /// them once, not one at a time.
    fn merge_newest(&mut self) -> Result<()> {
        let n = self.runs.len();
        if n < 2 {
            return Ok(());
        }
        let mut from = n - 1;
        let mut tail = self.runs[from].records;
        while from > 0
            && (from >= MAX_FILES || tail.saturating_mul(2) >= self.runs[from - 1].records)
        {
            from -= 1;
            tail = tail.saturating_add(self.runs[from].records);
        }
        if from < n - 1 {
            self.merge(from)?;
        }
        Ok(())
    }

    /// Writes `batch` as a new file, then appends `new_packs` to the pack table: a file
    /// whose packs the table on disk lacks (a crash in between) is refused when opened
    /// (its trailer says how many packs it needs), and packs the table lists always have
    /// their records on disk.
    fn flush(&mut self, batch: &mut Vec<(ChunkId, Hit)>, new_packs: &[String]) -> Result<()> {
        if !batch.is_empty() {
            batch.sort_unstable_by_key(|(id, h)| (id.0, h.pack));
            let path = self.dir.join(format!("chunks.{}", self.next_file));
            let needed = self.packs.len() as u32;
            write_run(
                &path,
                self.generation,
                needed,
                batch.len() as u64,
                batch.drain(..).map(Ok),
            )?;
            sync_dir(&self.dir)?;
            self.next_file += 1;
            self.runs
                .push(Run::open(path, self.generation, self.packs.len())?);
        }
        if !new_packs.is_empty() {
            let path = self.dir.join("packs");
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io("opening", &path))?;
            let mut w = BufWriter::new(f);
            for p in new_packs {
                writeln!(w, "{p}").map_err(io("writing", &path))?;
            }
            let f = w
                .into_inner()
                .map_err(|e| io("writing", &path)(e.into_error()))?;
            f.sync_all().map_err(io("syncing", &path))?;
        }
        Ok(())
    }

    /// Merges the files from position `from` on into one (streamed: the files share
    /// [`MERGE_READ_BUFFERS`]),
    /// numbered after every file (so it stays the newest).
    fn merge(&mut self, from: usize) -> Result<()> {
        let path = {
            let mut iters = Vec::new();
            let inputs = self.runs.len() - from;
            let buffer = (MERGE_READ_BUFFERS / inputs.max(1)).max(64 << 10);
            for r in &self.runs[from..] {
                let mut it = r.records(buffer)?;
                let head = it.next().transpose()?;
                iters.push((it, head));
            }
            let merged = std::iter::from_fn(|| {
                let mut best: Option<usize> = None;
                for (i, (_, head)) in iters.iter().enumerate() {
                    if let Some((id, h)) = head {
                        let better = match best.and_then(|b| iters[b].1.as_ref()) {
                            None => true,
                            Some((bid, bh)) => (id.0, h.pack) < (bid.0, bh.pack),
                        };
                        if better {
                            best = Some(i);
                        }
                    }
                }
                let i = best?;
                let out = iters[i].1.take();
                iters[i].1 = match iters[i].0.next().transpose() {
                    Ok(next) => next,
                    Err(e) => return Some(Err(e)),
                };
                out.map(Ok)
            });
            let path = self.dir.join(format!("chunks.{}", self.next_file));
            let total = self.runs[from..].iter().map(|r| r.records).sum();
            write_run(
                &path,
                self.generation,
                self.packs.len() as u32,
                total,
                merged,
            )?;
            path
        };
        let merged = Run::open(path, self.generation, self.packs.len())?;
        // The merged file's name is durable before its inputs go (a power cut in between
        // leaves both: duplicate records, which lookups tolerate).
        sync_dir(&self.dir)?;
        let inputs = self.runs.split_off(from);
        self.runs.push(merged);
        self.next_file += 1;
        for r in inputs {
            std::fs::remove_file(&r.path).map_err(io("removing", &r.path))?;
        }
        sync_dir(&self.dir)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    fn pack(first: u64, n: u64) -> Vec<PackEntry> {
        (first..first + n)
            .map(|i| PackEntry {
                id: id(i),
                offset: i as u32,
                len: 7,
            })
            .collect()
    }

    /// Some record file of the index in `dir`.
    fn first_file(dir: &Path) -> PathBuf {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("chunks."))
            .unwrap()
            .path()
    }

    /// The entries of packs named `p<n>`: chunks 10n .. 10n + 10.
    fn fetch_packs(batch: &[String]) -> Result<Vec<Vec<PackEntry>>> {
        Ok(batch
            .iter()
            .map(|n| pack(n[1..].parse::<u64>().unwrap() * 10, 10))
            .collect())
    }

    #[test]
    fn lookups_find_every_copy_across_files_merges_and_reopens() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = LocalIndex::open(d.path()).unwrap();
        // Six adds of equal size merge as they come; chunk 5 is in two packs.
        for p in 0..6u64 {
            ix.add([Ok((format!("p{p}"), pack(p * 100, 100)))]).unwrap();
            let sizes: Vec<u64> = ix.runs.iter().map(|r| r.records).collect();
            assert!(sizes.windows(2).all(|w| w[0] > 2 * w[1]), "{sizes:?}");
        }
        ix.add([
            Ok(("again".to_string(), pack(5, 1))),
            Ok(("p0".to_string(), pack(0, 1))),
        ])
        .unwrap();
        assert!(ix.runs.len() <= 3, "{}", ix.runs.len());
        let check = |ix: &LocalIndex| {
            assert_eq!(ix.len(), 601);
            for i in 0..600u64 {
                let hits = ix.lookup(&id(i)).unwrap();
                let names: Vec<_> = hits
                    .iter()
                    .map(|h| ix.pack_name(h.pack).unwrap().to_string())
                    .collect();
                let mut want = vec![format!("p{}", i / 100)];
                if i == 5 {
                    want.push("again".into());
                }
                assert_eq!(names, want, "chunk {i}");
                assert!(hits.iter().all(|h| h.offset == i as u32 && h.len == 7));
            }
            assert!(ix.lookup(&id(10_000)).unwrap().is_empty());
        };
        check(&ix);
        let again = LocalIndex::open(d.path()).unwrap();
        assert!(again.has_pack("p3") && !again.has_pack("p9"));
        check(&again);
    }

    #[test]
    fn files_stay_few_and_geometric_under_many_small_adds() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = LocalIndex::open(d.path()).unwrap();
        for p in 0..300u64 {
            ix.add([Ok((format!("p{p}"), pack(p * 10, 10)))]).unwrap();
            let sizes: Vec<u64> = ix.runs.iter().map(|r| r.records).collect();
            assert!(
                sizes.windows(2).all(|w| w[0] > 2 * w[1]),
                "after {p}: {sizes:?}"
            );
            // 10 records a file at least: at most log2(total / 10) + 1 files.
            let most = (64 - (p + 1).leading_zeros()) as usize + 1;
            assert!(sizes.len() <= most, "after {p}: {sizes:?}");
        }
        assert_eq!(ix.len(), 3000);
        assert_eq!(ix.lookup(&id(2345)).unwrap().len(), 1);
        // Files on disk are exactly the index's (merged inputs removed).
        let files = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("chunks."))
            .count();
        assert_eq!(files, ix.runs.len());
    }

    #[test]
    fn a_damaged_file_is_refused_and_an_interrupted_write_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = LocalIndex::open(d.path()).unwrap();
        ix.add([Ok(("p".to_string(), pack(0, 50)))]).unwrap();
        std::fs::write(d.path().join("chunks.9.tmp"), b"half").unwrap();
        let table = d.path().join("packs");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&table)
            .unwrap();
        f.write_all(b"cut-sh").unwrap();
        drop(f);
        let mut ix = LocalIndex::open(d.path()).unwrap();
        assert!(!d.path().join("chunks.9.tmp").exists());
        assert!(!ix.has_pack("cut-sh"), "a cut line was read as a pack");
        ix.add([Ok(("q".to_string(), pack(50, 1)))]).unwrap();
        let hit = ix.lookup(&id(50)).unwrap()[0];
        drop(ix);
        let ix = LocalIndex::open(d.path()).unwrap();
        assert_eq!(ix.pack_name(hit.pack), Some("q"));
        drop(ix);
        let f = d.path().join("chunks.0");
        let mut b = std::fs::read(&f).unwrap();
        b.truncate(b.len() - 1);
        std::fs::write(&f, &b).unwrap();
        assert!(
            LocalIndex::open(d.path()).is_err(),
            "a short file was opened"
        );
        let mut b = std::fs::read(&f).unwrap();
        b.push(0);
        let at = 50 * RECORD; // the fanout's first value (must be 0)
        b[at] = b[at].wrapping_add(1);
        std::fs::write(&f, &b).unwrap();
        assert!(
            LocalIndex::open(d.path()).is_err(),
            "a bad fanout was opened"
        );
    }

    /// `sync` from several threads at once: each pack is added once, every index returned
    /// finds what was listed; a damaged file and an index of mostly dead packs are
    /// rebuilt.
    #[test]
    fn sync_adds_each_pack_once_and_rebuilds_what_does_not_serve() {
        let d = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..100).map(|p| format!("p{p:03}")).collect();
        let fetched = std::sync::atomic::AtomicUsize::new(0);
        let fetch = |batch: &[String]| -> Result<Vec<Vec<PackEntry>>> {
            fetched.fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
            fetch_packs(batch)
        };
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let ix = LocalIndex::sync(d.path(), &names, 7, fetch).unwrap();
                    for i in (0..1000u64).step_by(37) {
                        let h = ix.lookup(&id(i)).unwrap();
                        assert_eq!(h.len(), 1, "chunk {i}");
                        assert_eq!(ix.pack_name(h[0].pack).unwrap(), format!("p{:03}", i / 10));
                    }
                });
            }
        });
        assert_eq!(
            fetched.load(std::sync::atomic::Ordering::SeqCst),
            100,
            "a pack was fetched twice"
        );
        // A fetch failing part-way keeps what came before it.
        let more: Vec<String> = (100..120).map(|p| format!("p{p:03}")).collect();
        let failing = |batch: &[String]| -> Result<Vec<Vec<PackEntry>>> {
            if batch.iter().any(|n| n == "p110") {
                return Err(BackupError::invalid("test", "GET failed"));
            }
            fetch(batch)
        };
        assert!(LocalIndex::sync(d.path(), &more, 5, failing).is_err());
        let ix = LocalIndex::sync(d.path(), &[], 5, fetch).unwrap();
        assert!(ix.has_pack("p109") && !ix.has_pack("p110"));
        drop(ix);
        // A damaged file: rebuilt from what is listed.
        let f = first_file(d.path());
        std::fs::write(&f, b"damaged").unwrap();
        let ix = LocalIndex::sync(d.path(), &names, 7, fetch).unwrap();
        assert_eq!(ix.pack_count(), 100);
        assert_eq!(ix.lookup(&id(499)).unwrap().len(), 1);
        drop(ix);
        // Most packs gone (gc): rebuilt with only the live ones.
        let ix = LocalIndex::sync(d.path(), &names[..10], 7, fetch).unwrap();
        assert_eq!(ix.pack_count(), 10, "dead packs were kept");
        assert!(ix.lookup(&id(499)).unwrap().is_empty());
        assert_eq!(ix.lookup(&id(99)).unwrap().len(), 1);
    }

    /// What an interrupted wipe or add leaves never makes a record name the wrong pack:
    /// files of an earlier pack table (the table gone, rebuilt with other numbers) and a
    /// file naming packs its table lacks (a crash before the table's lines were appended)
    /// are refused, and the index is rebuilt from the listing.
    #[test]
    fn leftovers_of_a_cut_wipe_or_add_never_name_the_wrong_pack() {
        let d = tempfile::tempdir().unwrap();
        let fetch = fetch_packs;
        let names: Vec<String> = (0..20).map(|p| format!("p{p:03}")).collect();
        drop(LocalIndex::sync(d.path(), &names, 7, fetch).unwrap());
        // A wipe cut after the pack table went, its files left.
        std::fs::remove_file(d.path().join("packs")).unwrap();
        let mut reversed = names.clone();
        reversed.reverse();
        let check = |ix: &LocalIndex| {
            for i in 0..200u64 {
                let h = ix.lookup(&id(i)).unwrap();
                assert_eq!(h.len(), 1, "chunk {i}: {h:?}");
                assert_eq!(ix.pack_name(h[0].pack).unwrap(), format!("p{:03}", i / 10));
            }
        };
        let ix = LocalIndex::sync(d.path(), &reversed, 7, fetch).unwrap();
        check(&ix);
        drop(ix);
        // An add cut after its file, before the table's lines: drop the last line.
        let more: Vec<String> = (20..25).map(|p| format!("p{p:03}")).collect();
        drop(LocalIndex::sync(d.path(), &more, 7, fetch).unwrap());
        let t = d.path().join("packs");
        let text = std::fs::read_to_string(&t).unwrap();
        let cut = text.trim_end().rfind('\n').unwrap() + 1;
        std::fs::write(&t, &text[..cut]).unwrap();
        let all: Vec<String> = names.iter().chain(&more).cloned().collect();
        let ix = LocalIndex::sync(d.path(), &all, 7, fetch).unwrap();
        for i in 0..250u64 {
            let h = ix.lookup(&id(i)).unwrap();
            assert_eq!(h.len(), 1, "chunk {i}: {h:?}");
            assert_eq!(ix.pack_name(h[0].pack).unwrap(), format!("p{:03}", i / 10));
        }
        // A flipped bit in a record: refused by the checksum, rebuilt.
        drop(ix);
        let f = first_file(d.path());
        let mut b = std::fs::read(&f).unwrap();
        b[33] ^= 1; // the pack number of the first record
        std::fs::write(&f, &b).unwrap();
        assert!(
            LocalIndex::open(d.path()).is_err(),
            "a flipped bit was read"
        );
        let ix = LocalIndex::sync(d.path(), &all, 7, fetch).unwrap();
        assert_eq!(ix.lookup(&id(0)).unwrap().len(), 1);
    }
}
