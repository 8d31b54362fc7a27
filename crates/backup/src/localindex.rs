//! The local chunk index (docs/design.md §12 "Segmented tables and an on-disk chunk
//! index"): which packs hold a chunk, from sorted files on this host instead of a map in
//! RAM. The jobs do not use it yet; this is its store and lookup.
//!
//! Layout of a directory (one per repository): `packs`, the pack table (a pack's number
//! is its line), and files `chunks.<n>`, each a run of [`RECORD`]-byte records (chunk id
//! 32, pack number u32 LE, offset u32 LE, length u32 LE) sorted by id then pack number,
//! followed by a fanout (65,537 u64 LE: records whose id's first two bytes are below
//! each value) and a trailer (`SBLI`, version u8 = 1, record count u64 LE). A lookup reads
//! one fanout bucket per file with one `pread` and searches it; only the fanouts
//! (512 KiB per file) are held in RAM.
//!
//! It is a cache: what it answers is a candidate its caller checks (a chunk read back is
//! verified against its id), so a damaged file costs a rebuild, never a wrong restore. A
//! file whose length, fanout or trailer does not check is refused when opened. Files are
//! written to a temporary name, synced and renamed; a crash leaves the old set.
//!
//! Threading: lookups take `&self` (preads on shared files); updates take `&mut self`.

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
const FANOUT: usize = 65_537;
const TRAILER: usize = 13;
const MAGIC: &[u8; 4] = b"SBLI";
/// Records sorted in RAM before they are written as a file (44 MiB).
pub const RUN_RECORDS: usize = 1 << 20;
/// Files kept before they are merged into one.
const MAX_FILES: usize = 4;

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
    fanout: Vec<u64>,
}

pub struct LocalIndex {
    dir: PathBuf,
    packs: Vec<String>,
    numbers: HashMap<String, u32>,
    runs: Vec<Run>,
    next_file: u64,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = format!("local chunk index: {what} {}", path.display());
    move |e| BackupError::invalid(what, e.to_string())
}

fn bucket(id: &ChunkId) -> usize {
    usize::from(u16::from_be_bytes([id.0[0], id.0[1]]))
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

impl Run {
    fn open(path: PathBuf) -> Result<Run> {
        let file = File::open(&path).map_err(io("opening", &path))?;
        let len = file.metadata().map_err(io("reading", &path))?.len();
        let tail_len = (FANOUT * 8 + TRAILER) as u64;
        let bad = |d: &str| BackupError::corrupt(path.display().to_string(), d.to_string());
        if len < tail_len {
            return Err(bad("shorter than its fanout"));
        }
        let mut tail = vec![0u8; FANOUT * 8 + TRAILER];
        file.read_exact_at(&mut tail, len - tail_len)
            .map_err(io("reading", &path))?;
        let t = &tail[FANOUT * 8..];
        if &t[..4] != MAGIC || t[4] != 1 {
            return Err(bad("not a chunk index file"));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&t[5..13]);
        let records = u64::from_le_bytes(n);
        if records.checked_mul(RECORD as u64) != Some(len - tail_len) {
            return Err(bad("its length does not match its record count"));
        }
        let fanout: Vec<u64> = tail[..FANOUT * 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if fanout[0] != 0 || fanout[FANOUT - 1] != records || fanout.windows(2).any(|w| w[0] > w[1])
        {
            return Err(bad("its fanout does not check"));
        }
        Ok(Run {
            path,
            file,
            records,
            fanout,
        })
    }

    /// Every copy of `id` this file lists.
    fn find(&self, id: &ChunkId, out: &mut Vec<Hit>) -> Result<()> {
        let b = bucket(id);
        let (lo, hi) = (self.fanout[b], self.fanout[b + 1]);
        if lo == hi {
            return Ok(());
        }
        let mut buf = vec![0u8; ((hi - lo) as usize) * RECORD];
        self.file
            .read_exact_at(&mut buf, lo * RECORD as u64)
            .map_err(io("reading", &self.path))?;
        let recs: Vec<&[u8]> = buf.chunks_exact(RECORD).collect();
        let first = recs.partition_point(|r| r[..32] < id.0[..]);
        for r in &recs[first..] {
            if r[..32] != id.0[..] {
                break;
            }
            out.push(decode(r).1);
        }
        Ok(())
    }

    /// All records in order.
    fn records(&self) -> Result<impl Iterator<Item = Result<(ChunkId, Hit)>> + '_> {
        let f = self.file.try_clone().map_err(io("reading", &self.path))?;
        let mut r = BufReader::with_capacity(1 << 20, f.take(self.records * RECORD as u64));
        let path = self.path.clone();
        Ok((0..self.records).map(move |_| {
            let mut b = [0u8; RECORD];
            r.read_exact(&mut b).map_err(io("reading", &path))?;
            Ok(decode(&b))
        }))
    }
}

/// Writes sorted records as a file (temporary name, synced, renamed).
fn write_run(path: &Path, records: impl Iterator<Item = Result<(ChunkId, Hit)>>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let f = File::create(&tmp).map_err(io("creating", &tmp))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut counts = vec![0u64; FANOUT];
    let mut n = 0u64;
    let mut rec = Vec::with_capacity(RECORD);
    for r in records {
        let (id, h) = r?;
        rec.clear();
        encode(&id, &h, &mut rec);
        w.write_all(&rec).map_err(io("writing", &tmp))?;
        counts[bucket(&id) + 1] += 1;
        n += 1;
    }
    let mut tail = Vec::with_capacity(FANOUT * 8 + TRAILER);
    let mut sum = 0u64;
    for c in counts {
        sum += c;
        tail.extend_from_slice(&sum.to_le_bytes());
    }
    tail.extend_from_slice(MAGIC);
    tail.push(1);
    tail.extend_from_slice(&n.to_le_bytes());
    w.write_all(&tail).map_err(io("writing", &tmp))?;
    let f = w
        .into_inner()
        .map_err(|e| io("writing", &tmp)(e.into_error()))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", &tmp))?;
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
    pub fn open(dir: &Path) -> Result<LocalIndex> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let packs_path = dir.join("packs");
        let text = match std::fs::read_to_string(&packs_path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("reading", &packs_path)(e)),
        };
        // A line cut short by a crash names no pack (no record was written for it: the
        // table is written first); drop it, so the next append starts a line of its own.
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
        let packs: Vec<String> = text[..whole].lines().map(str::to_string).collect();
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
            .map(|(_, p)| Run::open(p))
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
            packs,
            numbers,
            runs,
            next_file,
        })
    }

    /// Whether the records of `pack` are in the index.
    pub fn has_pack(&self, pack: &str) -> bool {
        self.numbers.contains_key(pack)
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

    /// Every copy of `id` the index lists.
    pub fn lookup(&self, id: &ChunkId) -> Result<Vec<Hit>> {
        let mut out = Vec::new();
        for r in &self.runs {
            r.find(id, &mut out)?;
        }
        Ok(out)
    }

    /// Adds the entries of packs not in the index yet (others are skipped), sorting at
    /// most [`RUN_RECORDS`] in RAM at a time; merges the files when there are too many.
    pub fn add(&mut self, packs: impl IntoIterator<Item = (String, Vec<PackEntry>)>) -> Result<()> {
        let mut batch: Vec<(ChunkId, Hit)> = Vec::new();
        let mut new_packs: Vec<String> = Vec::new();
        for (name, entries) in packs {
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
            }
        }
        if !batch.is_empty() || !new_packs.is_empty() {
            self.flush(&mut batch, &new_packs)?;
        }
        if self.runs.len() > MAX_FILES {
            self.merge()?;
        }
        Ok(())
    }

    /// Writes the pack table, then `batch` as a new file: a record never names a pack
    /// the table on disk lacks.
    fn flush(&mut self, batch: &mut Vec<(ChunkId, Hit)>, new_packs: &[String]) -> Result<()> {
        if !new_packs.is_empty() {
            let path = self.dir.join("packs");
            let f = std::fs::OpenOptions::new()
                .create(true)
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
        if batch.is_empty() {
            return Ok(());
        }
        batch.sort_unstable_by_key(|(id, h)| (id.0, h.pack));
        let path = self.dir.join(format!("chunks.{}", self.next_file));
        write_run(&path, batch.drain(..).map(Ok))?;
        sync_dir(&self.dir)?;
        self.next_file += 1;
        self.runs.push(Run::open(path)?);
        Ok(())
    }

    /// Merges every file into one (streamed: a buffer per file).
    fn merge(&mut self) -> Result<()> {
        let path = {
            let mut iters = Vec::new();
            for r in &self.runs {
                let mut it = r.records()?;
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
            write_run(&path, merged)?;
            path
        };
        let merged = Run::open(path)?;
        for r in std::mem::take(&mut self.runs) {
            std::fs::remove_file(&r.path).map_err(io("removing", &r.path))?;
        }
        sync_dir(&self.dir)?;
        self.next_file += 1;
        self.runs.push(merged);
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

    #[test]
    fn lookups_find_every_copy_across_files_merges_and_reopens() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = LocalIndex::open(d.path()).unwrap();
        // Six adds: more files than kept, so they merge; chunk 5 is in two packs.
        for p in 0..6u64 {
            ix.add([(format!("p{p}"), pack(p * 100, 100))]).unwrap();
        }
        ix.add([
            ("again".to_string(), pack(5, 1)),
            ("p0".to_string(), pack(0, 1)),
        ])
        .unwrap();
        assert!(ix.runs.len() <= MAX_FILES + 1);
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
    fn a_damaged_file_is_refused_and_an_interrupted_write_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let mut ix = LocalIndex::open(d.path()).unwrap();
        ix.add([("p".to_string(), pack(0, 50))]).unwrap();
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
        ix.add([("q".to_string(), pack(50, 1))]).unwrap();
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
        let at = 50 * RECORD + 8; // the fanout's second value
        b[at] = b[at].wrapping_add(1);
        std::fs::write(&f, &b).unwrap();
        assert!(
            LocalIndex::open(d.path()).is_err(),
            "a bad fanout was opened"
        );
    }
}
