//! Manifests: what a backed-up snapshot is made of.
//!
//! A manifest is two sealed objects with the same random id: `tables/<id>` (the cell table)
//! and `manifests/<id>` (the header). The table is written first, then the header goes
//! into its pool's catalog (the commit point, `crate::catalog`), then into `manifests/`
//! as a copy. The header's `digest` is the BLAKE3 hash of the encoded table, and each chunk id
//! is a keyed hash of the cell's bytes, so header + table + chunks pin down the image byte
//! for byte.
//!
//! The table's encoding is in [`crate::table`]; in a format-4 repository it is stored in
//! frames of 65,536 cells, one object each ([`crate::frame`]), so no object, and no
//! buffer that writes or reads one, grows with the volume. Reading a table never
//! allocates by a size read from stored bytes: each object is fetched with a cap derived
//! from the authenticated header (its cell count, or the frame span), then decompressed
//! and parsed as a stream.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::crypto::{ChunkId, SEAL_OVERHEAD};
use crate::error::{BackupError, Result};
use crate::frame;
use crate::repo::{self, Repository};
use crate::table::{Hashing, TableReader};
pub use crate::table::{Table, MAX_ENTRIES};
use crate::tablecopy::TableCopy;

/// Largest sealed manifest header accepted (headers are a few hundred bytes of JSON).
pub const MAX_HEADER_BYTES: u64 = 1 << 20;
/// zstd window accepted when decompressing a table (tables are compressed in one shot at
/// level 3, whose window is at most 2 MiB): a frame asking for more is refused instead of
/// sizing a larger buffer.
const TABLE_WINDOW_LOG_MAX: u32 = 24;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupStats {
    /// Bytes read from the snapshot.
    pub bytes_read: u64,
    /// Uncompressed bytes of chunks new to the repository.
    pub bytes_new: u64,
    /// Bytes of pack objects uploaded (compressed, sealed, with pack overhead).
    pub bytes_uploaded: u64,
    pub chunks_new: u64,
    /// Cells that matched a chunk already stored.
    pub chunks_reused: u64,
    pub packs: u64,
    pub seconds: f64,
    /// Chunks stored again to compact this backup's packs (crate::compact), and their
    /// stored bytes before (counted in `chunks_new`/`bytes_uploaded` too).
    #[serde(default)]
    pub chunks_compacted: u64,
    #[serde(default)]
    pub bytes_compacted: u64,
}

/// The sealed header object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Header {
    /// Random id: names this header and its table.
    pub id: String,
    pub volume: String,
    pub snapshot: String,
    /// The snapshot's id in its pool and the pool's uuid (to find incremental bases).
    pub snapshot_id: u64,
    pub pool: String,
    /// When the snapshot was taken and when it was backed up (Unix seconds).
    pub created: u64,
    pub backed_up: u64,
    pub size: u64,
    pub chunk_size: u32,
    /// Cells holding data and their bytes (cells are `chunk_size`, the last may be short).
    pub cells: u64,
    pub stored_bytes: u64,
    /// Hex BLAKE3 of the encoded table.
    pub digest: String,
    /// Manifest this backup was taken incrementally against.
    pub base: Option<String>,
    pub stats: BackupStats,
    /// Host name of the machine that took the backup (for people; pools are told apart
    /// by `pool`).
    #[serde(default)]
    pub host: String,
    /// The table is stored as frames (`tables/<id>/<k>`, repository format 4,
    /// [`crate::frame`]) and `digest` hashes their plaintexts in order; false: one object
    /// `tables/<id>` (format 1 of the table).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub framed: bool,
}

impl Header {
    pub fn name(&self) -> String {
        format!("{}@{}", self.volume, self.snapshot)
    }
}

fn header_aad(id: &str) -> Vec<u8> {
    format!("snapblk manifest {id}").into_bytes()
}
fn table_aad(id: &str) -> Vec<u8> {
    format!("snapblk table {id}").into_bytes()
}

/// How a table was stored: what its header records.
#[derive(Debug, Clone)]
pub struct Stored {
    pub digest: String,
    pub framed: bool,
    /// Cells holding data, and their bytes.
    pub cells: u64,
    pub stored_bytes: u64,
}

/// Writes a new backup's table frame by frame, in order, before its catalog entry (the
/// commit point). In a format-4 repository each frame is encoded straight into its
/// compressor (hashed for the digest on the way), sealed, kept in a private local copy
/// (what the job reads back to confirm its chunks: [`TableCopy`]) and put from that
/// copy, as many at a time as the job has uploaders: memory is the frame being sealed,
/// never the table. Before format 4 a table is one object, so its entries are held until
/// [`TableWriter::finish`] writes it.
pub(crate) struct TableWriter {
    repo: Repository,
    /// The new backup's header as far as it is known (id, names, size, chunk size): what
    /// frames are sealed to and messages name.
    header: Header,
    /// Cells of the image, frames of the table, and the next frame expected.
    cells: u64,
    frames: u64,
    next: u64,
    entries: u64,
    stored_bytes: u64,
    out: Out,
}

enum Out {
    Frames {
        dir: tempfile::TempDir,
        digest: Box<frame::Digest>,
        /// Frames written locally, not stored yet: (number, length).
        ready: Vec<(u64, u64)>,
        batch: usize,
    },
    Whole(Vec<(u64, ChunkId)>),
}

impl TableWriter {
    /// For the table of the backup `header` describes (its id, names, size and chunk
    /// size are used).
    pub(crate) fn new(repo: &Repository, header: Header) -> Result<TableWriter> {
        let cells = header.size.div_ceil(u64::from(header.chunk_size));
        let out = if repo.config().version >= crate::config::VERSION_FRAMES {
            Out::Frames {
                dir: crate::tablecopy::scratch(
                    repo,
                    "new-table-",
                    &format!("the table of the new backup of {}", header.name()),
                )?,
                digest: Box::default(),
                ready: Vec::new(),
                batch: repo.parallelism().uploaders.max(1),
            }
        } else {
            Out::Whole(Vec::new())
        };
        Ok(TableWriter {
            repo: repo.clone(),
            cells,
            frames: frame::count(cells),
            next: 0,
            entries: 0,
            stored_bytes: 0,
            out,
            header,
        })
    }

    /// Adds the entries of frame `k` (the next one: frames come in order, each once), in
    /// cell order inside it.
    pub(crate) fn push(&mut self, k: u64, part: &[(u64, ChunkId)]) -> Result<()> {
        let name = self.header.name();
        let bad = |d: String| BackupError::invalid(&name, d);
        let r = frame::range(self.cells, k);
        if k != self.next || k >= self.frames {
            return Err(bad(format!("table frame {k} written out of order")));
        }
        if part.windows(2).any(|w| w[0].0 >= w[1].0)
            || part.first().is_some_and(|(c, _)| *c < r.start)
            || part.last().is_some_and(|(c, _)| *c >= r.end)
        {
            return Err(bad(format!(
                "table frame {k} is not in cell order inside its span"
            )));
        }
        if self.entries + part.len() as u64 > MAX_ENTRIES {
            return Err(bad(format!(
                "more than {MAX_ENTRIES} cells hold data; a backup table holds at most that many (use a larger --chunk-size)"
            )));
        }
        self.next += 1;
        self.entries += part.len() as u64;
        let cs = u64::from(self.header.chunk_size);
        let size = self.header.size;
        self.stored_bytes += part.iter().map(|(c, _)| cs.min(size - c * cs)).sum::<u64>();
        match &mut self.out {
            Out::Whole(all) => all.extend_from_slice(part),
            Out::Frames {
                dir,
                digest,
                ready,
                batch,
            } => {
                let plain = frame::F_HEAD + part.len() * crate::table::T_ENTRY as usize;
                let enc = frame_encoder(plain).map_err(BackupError::Io)?;
                let mut w = Tee { inner: enc, digest };
                frame::write(&mut w, r.start, (r.end - r.start) as u32, part)
                    .map_err(BackupError::Io)?;
                let z = w.inner.finish().map_err(BackupError::Io)?;
                let id = &self.header.id;
                let sealed = self
                    .repo
                    .keys()
                    .seal(&z, frame::aad(id, k, k + 1 == self.frames).as_bytes());
                let path = dir.path().join(k.to_string());
                std::fs::write(&path, &sealed).map_err(|e| BackupError::LocalState {
                    what: format!("the table of the new backup of {name}"),
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
                ready.push((k, sealed.len() as u64));
                drop(sealed);
                if ready.len() >= *batch {
                    put_frames(&self.repo, id, dir.path(), ready)?;
                }
            }
        }
        Ok(())
    }

    /// Stores what is left (every frame must have been pushed) and returns what the
    /// header records, with the table as the job reads it back.
    pub(crate) fn finish(self) -> Result<(Stored, TableCopy)> {
        if self.next != self.frames {
            return Err(BackupError::invalid(
                self.header.name(),
                format!(
                    "table ends after {} of its {} frames",
                    self.next, self.frames
                ),
            ));
        }
        let mut header = self.header;
        header.cells = self.entries;
        header.stored_bytes = self.stored_bytes;
        match self.out {
            Out::Frames {
                dir,
                digest,
                mut ready,
                ..
            } => {
                put_frames(&self.repo, &header.id, dir.path(), &mut ready)?;
                header.digest = digest.hex();
                header.framed = true;
                let stored = Stored {
                    digest: header.digest.clone(),
                    framed: true,
                    cells: self.entries,
                    stored_bytes: self.stored_bytes,
                };
                Ok((stored, TableCopy::written_frames(&self.repo, &header, dir)))
            }
            Out::Whole(cells) => {
                let table = Table {
                    size: header.size,
                    chunk_size: header.chunk_size,
                    cells,
                };
                let digest = write_whole(&self.repo, &header.id, &table)?;
                header.digest = digest.clone();
                let stored = Stored {
                    digest,
                    framed: false,
                    cells: self.entries,
                    stored_bytes: self.stored_bytes,
                };
                Ok((stored, TableCopy::written_whole(&self.repo, &header, table)))
            }
        }
    }
}

/// Puts the sealed frames `ready` (number, length) of backup `id`'s table from their
/// local copies in `dir` (streamed, not held in memory), each on its own thread, and
/// empties `ready`.
fn put_frames(repo: &Repository, id: &str, dir: &Path, ready: &mut Vec<(u64, u64)>) -> Result<()> {
    crate::par::map(ready, ready.len(), |(k, len)| {
        repo.paced(*len, || {
            repo.store()
                .put_file(&frame::key(id, *k), &dir.join(k.to_string()), *len)
        })
        .map_err(BackupError::from)
    })?;
    ready.clear();
    Ok(())
}

/// Writes `table` as the one object `tables/<id>` (a repository before format 4);
/// returns its digest.
fn write_whole(repo: &Repository, id: &str, table: &Table) -> Result<String> {
    let digest = digest(table);
    let plain = Table::encoded_len(table.cells.len() as u64) as usize;
    let out = Vec::with_capacity(plain + plain / 128 + 4096);
    let mut z = zstd::stream::Encoder::new(out, 3).map_err(BackupError::Io)?;
    table.write_to(&mut z).map_err(BackupError::Io)?;
    let mut z = z.finish().map_err(BackupError::Io)?;
    z.shrink_to_fit();
    repo.store()
        .put(&repo::table_key(id), &repo.keys().seal(&z, &table_aad(id)))?;
    Ok(digest)
}

/// A writer that hashes what passes through it into a frame digest.
struct Tee<'a, W> {
    inner: W,
    digest: &'a mut frame::Digest,
}

impl<W: std::io::Write> std::io::Write for Tee<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.digest.add(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the header object (after the catalog entry: a copy).
pub fn write_header(repo: &Repository, header: &Header) -> Result<()> {
    let h =
        serde_json::to_vec(header).map_err(|e| BackupError::invalid("manifest", e.to_string()))?;
    repo.store().put(
        &repo::manifest_key(&header.id),
        &repo.keys().seal(&h, &header_aad(&header.id)),
    )?;
    Ok(())
}

pub fn digest(table: &Table) -> String {
    let mut h = blake3::Hasher::new();
    table.write_to(&mut h).expect("hashing does not fail");
    h.finalize().to_hex().to_string()
}

pub fn read_header(repo: &Repository, id: &str) -> Result<Header> {
    let key = repo::manifest_key(id);
    let sealed = repo.store().get(&key, MAX_HEADER_BYTES)?;
    let plain = repo
        .keys()
        .open(&sealed, &header_aad(id))
        .ok_or_else(|| BackupError::corrupt(&key, "fails authentication (altered or misplaced)"))?;
    let h: Header = serde_json::from_slice(&plain)
        .map_err(|e| BackupError::corrupt(&key, format!("bad header: {e}")))?;
    if h.id != id {
        return Err(BackupError::corrupt(&key, format!("names itself {}", h.id)));
    }
    Ok(h)
}

/// Largest sealed table object that can hold `count` entries (zstd's worst-case expansion
/// of incompressible input is well under 1/128, plus frame overhead and the seal).
fn max_sealed_table(count: u64) -> u64 {
    let plain = Table::encoded_len(count);
    plain + plain / 128 + 4096 + SEAL_OVERHEAD as u64
}

/// Reads, authenticates and decodes the table of `h`, streaming: memory is the decoded
/// entries plus the sealed object, whose size is capped by the header's cell count.
pub fn read_table(repo: &Repository, h: &Header) -> Result<Table> {
    check_header(h)?;
    if h.framed {
        return read_frames(repo, h);
    }
    let key = repo::table_key(&h.id);
    let decoded = crate::cache::get_with(repo, &key, max_sealed_table(h.cells), |sealed| {
        decode_table(repo, h, &key, sealed)
    });
    lost_if_gone(h, key, decoded)
}

/// A table object missing from the store is lost (a backup that cannot be restored).
fn lost_if_gone<T>(h: &Header, key: String, r: Result<T>) -> Result<T> {
    match r {
        Err(BackupError::Store(e)) if e.is_not_found() => Err(BackupError::Lost {
            backup: format!("{} ({})", h.name(), h.id),
            object: key,
        }),
        r => r,
    }
}

/// Largest sealed frame object (a whole frame of incompressible entries).
fn max_sealed_frame() -> u64 {
    let plain = (frame::F_HEAD as u64) + frame::SEG * crate::table::T_ENTRY;
    plain + plain / 128 + 4096 + SEAL_OVERHEAD as u64
}

/// The compressor of a frame of `plain` bytes: its header states that size, so a reader
/// sizes its buffer to the frame, not to the frame's largest possible span
/// ([`decompress`]; a sparse frame is a small fraction of that).
pub(crate) fn frame_encoder(
    plain: usize,
) -> std::io::Result<zstd::stream::Encoder<'static, Vec<u8>>> {
    let mut enc = zstd::stream::Encoder::new(Vec::with_capacity(plain / 2 + 4096), 3)?;
    enc.set_pledged_src_size(Some(plain as u64))?;
    enc.include_contentsize(true)?;
    Ok(enc)
}

/// Decompresses `z` (a table or frame), refusing more than `limit` bytes of output.
pub(crate) fn decompress(z: &[u8], limit: u64) -> std::result::Result<Vec<u8>, String> {
    // The output is allocated once, at the size its header states (frames written since
    // session 25: `frame_encoder`), bounded by the span's limit, or else at the limit:
    // growing it by doubling through read_to_end left the smaller buffers of every frame
    // a restore reads behind in the allocator (a 16 GiB restore held ~1 MiB more than a
    // 4 GiB one at its peak). A full frame's limit (~2.6 MB) is past the mmap threshold
    // the binary gives glibc (src/heap.rs), so pages an older, sparser frame leaves
    // untouched are never resident.
    let past = || "decompresses past its frame's span".to_string();
    let cap = match zstd::zstd_safe::get_frame_content_size(z) {
        Ok(Some(n)) if n > limit => return Err(past()),
        Ok(Some(n)) => n,
        _ => limit,
    };
    let cap = usize::try_from(cap).map_err(|_| past())?;
    let mut dec =
        zstd::bulk::Decompressor::new().map_err(|e| format!("does not decompress: {e}"))?;
    dec.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
        TABLE_WINDOW_LOG_MAX,
    ))
    .map_err(|e| format!("does not decompress: {e}"))?;
    let mut out = Vec::with_capacity(cap);
    // A frame that would decompress past `cap` fails here (its destination is too small).
    dec.decompress_to_buffer(z, &mut out)
        .map_err(|e| format!("does not decompress: {e}"))?;
    Ok(out)
}

/// Checks what the header of a table read frame by frame claims, before any frame is read.
pub(crate) fn check_header(h: &Header) -> Result<()> {
    crate::config::check_chunk_size(h.chunk_size)
        .map_err(|e| BackupError::corrupt(repo::manifest_key(&h.id), e.to_string()))?;
    let image_cells = h.size.div_ceil(u64::from(h.chunk_size));
    if h.cells > image_cells.min(MAX_ENTRIES) {
        return Err(BackupError::corrupt(
            repo::manifest_key(&h.id),
            format!(
                "claims {} cells in an image of {image_cells} (at most {MAX_ENTRIES})",
                h.cells
            ),
        ));
    }
    Ok(())
}

/// Frames of `h`'s table (`h` checked by [`check_header`]).
pub(crate) fn frame_count(h: &Header) -> u64 {
    frame::count(h.size.div_ceil(u64::from(h.chunk_size)))
}

/// Authenticates and decodes frame `k` of `h`'s table from its sealed bytes; returns it
/// with its plaintext (for the digest).
pub(crate) fn open_frame(
    repo: &Repository,
    h: &Header,
    k: u64,
    sealed: &[u8],
) -> Result<(frame::Frame, Vec<u8>)> {
    let cells = h.size.div_ceil(u64::from(h.chunk_size));
    let key = frame::key(&h.id, k);
    let last = k + 1 == frame::count(cells);
    let bad = |d: String| BackupError::corrupt(&key, d);
    let z = repo
        .keys()
        .open(sealed, frame::aad(&h.id, k, last).as_bytes())
        .ok_or_else(|| {
            bad("fails authentication (altered, misplaced, or a table cut short)".into())
        })?;
    let span = frame::range(cells, k);
    let limit = (frame::F_HEAD as u64) + (span.end - span.start) * crate::table::T_ENTRY;
    let plain = decompress(&z, limit).map_err(bad)?;
    let f = frame::Frame::decode(&plain, cells, k).map_err(bad)?;
    Ok((f, plain))
}

/// The sealed bytes of frame `k` of `h`'s table (from the cache or the store; checked
/// to open before they are returned).
pub(crate) fn fetch_frame(repo: &Repository, h: &Header, k: u64) -> Result<Vec<u8>> {
    let key = frame::key(&h.id, k);
    let got = crate::cache::get_with(repo, &key, max_sealed_frame(), |sealed| {
        open_frame(repo, h, k, sealed)?;
        Ok(sealed.to_vec())
    });
    lost_if_gone(h, key, got)
}

/// One frame of `h`'s table, authenticated and decoded.
fn read_frame(repo: &Repository, h: &Header, k: u64) -> Result<frame::Frame> {
    let key = frame::key(&h.id, k);
    let got = crate::cache::get_with(repo, &key, max_sealed_frame(), |sealed| {
        open_frame(repo, h, k, sealed).map(|(f, _)| f)
    });
    lost_if_gone(h, key, got)
}

/// Checks the frames' totals against `h`: the entry count and the digest.
pub(crate) fn check_totals(h: &Header, entries: u64, digest: &frame::Digest) -> Result<()> {
    let key = repo::table_key(&h.id);
    if entries != h.cells {
        return Err(BackupError::corrupt(
            key,
            format!(
                "its frames hold {entries} entries, its manifest says {}",
                h.cells
            ),
        ));
    }
    if digest.hex() != h.digest {
        return Err(BackupError::corrupt(
            key,
            "does not match the digest in its manifest",
        ));
    }
    Ok(())
}

/// Reads every frame of `h`'s table (fetched [`crate::index::FETCH_THREADS`] at a time)
/// and joins them, checking the entry count and the digest against the header.
fn read_frames(repo: &Repository, h: &Header) -> Result<Table> {
    let n = frame_count(h);
    let mut out: Vec<(u64, ChunkId)> = Vec::with_capacity(h.cells as usize);
    let mut digest = frame::Digest::default();
    let ks: Vec<u64> = (0..n).collect();
    for part in ks.chunks(crate::index::FETCH_THREADS) {
        let got = crate::par::map(part, part.len(), |k| read_frame(repo, h, *k))?;
        for f in got {
            // Decoding accepts one encoding only, so this is the plaintext read.
            digest.add(&f.encode());
            if (out.len() + f.cells.len()) as u64 > h.cells {
                return Err(BackupError::corrupt(
                    repo::table_key(&h.id),
                    "its frames hold more entries than its manifest says",
                ));
            }
            out.extend(f.cells);
        }
    }
    check_totals(h, out.len() as u64, &digest)?;
    Ok(Table {
        size: h.size,
        chunk_size: h.chunk_size,
        cells: out,
    })
}

/// Authenticates, decompresses (as a stream) and parses the sealed table of `h`, checking
/// it against the header's digest and counts.
fn decode_table(repo: &Repository, h: &Header, key: &str, sealed: &[u8]) -> Result<Table> {
    let z = repo
        .keys()
        .open(sealed, &table_aad(&h.id))
        .ok_or_else(|| BackupError::corrupt(key, "fails authentication (altered or misplaced)"))?;
    let bad = |d: String| BackupError::corrupt(key, d);
    let mut dec = zstd::stream::read::Decoder::with_buffer(&z[..])
        .map_err(|e| bad(format!("does not decompress: {e}")))?;
    dec.window_log_max(TABLE_WINDOW_LOG_MAX)
        .map_err(|e| bad(format!("does not decompress: {e}")))?;
    // One byte past the expected length is read so trailing data is caught, never more.
    let limit = Table::encoded_len(h.cells) + 1;
    let stream = Hashing {
        inner: dec.take(limit),
        hasher: blake3::Hasher::new(),
    };
    let mut reader = TableReader::new(stream).map_err(bad)?;
    if reader.head.count != h.cells
        || reader.head.size != h.size
        || reader.head.chunk_size != h.chunk_size
    {
        return Err(bad(
            "cell count, size or chunk size differs from its manifest".to_string(),
        ));
    }
    let t = reader.read_all().map_err(bad)?;
    let stream = reader.finish().map_err(bad)?;
    if stream.hasher.finalize().to_hex().as_str() != h.digest {
        return Err(BackupError::corrupt(
            key,
            "does not match the digest in its manifest",
        ));
    }
    Ok(t)
}

/// Manifest ids whose header could not be read, with why.
pub type Unreadable = Vec<(String, BackupError)>;

/// Every header stored, catalogued or not (gc, verify, repair and `repo upgrade` need
/// them all; everything else lists backups through [`crate::catalog`]), oldest backup
/// first. Headers that fail to read are returned separately (id, error).
pub fn list(repo: &Repository) -> Result<(Vec<Header>, Unreadable)> {
    let ids: Vec<String> = repo
        .store()
        .list(repo::MANIFESTS)?
        .into_iter()
        .filter_map(|o| o.key.strip_prefix(repo::MANIFESTS).map(str::to_string))
        .collect();
    let got = crate::par::map(&ids, crate::index::FETCH_THREADS, |id| {
        Ok::<_, BackupError>(read_header(repo, id))
    })?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (id, r) in ids.into_iter().zip(got) {
        match r {
            Ok(h) => ok.push(h),
            Err(e) => bad.push((id, e)),
        }
    }
    sort(&mut ok);
    Ok((ok, bad))
}

/// Oldest backup first.
pub fn sort(headers: &mut [Header]) {
    headers.sort_by(|a, b| {
        (a.backed_up, a.created, a.snapshot_id, &a.id).cmp(&(
            b.backed_up,
            b.created,
            b.snapshot_id,
            &b.id,
        ))
    });
}

/// Finds the newest backup of `vol@snap` (or the manifest whose id is `name`).
pub fn find<'a>(headers: &'a [Header], name: &str) -> Option<&'a Header> {
    headers
        .iter()
        .rev()
        .find(|h| h.name() == name || h.id == name)
}

/// Deletes a manifest: header first (it disappears from listings), then its table (each
/// frame, the last first). What a crash leaves, gc removes as orphan table objects.
pub fn delete(repo: &Repository, h: &Header) -> Result<()> {
    repo.store().delete(&repo::manifest_key(&h.id))?;
    if h.framed {
        let cells = h.size.div_ceil(u64::from(h.chunk_size.max(1)));
        for k in (0..frame::count(cells)).rev() {
            repo.store().delete(&frame::key(&h.id, k))?;
        }
    } else {
        repo.store().delete(&repo::table_key(&h.id))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::decompress;
    use std::io::Write;

    /// Compressed as frames written before session 25 were (and format-1 tables are): a
    /// stream with no content size in its header.
    fn streamed(plain: &[u8]) -> Vec<u8> {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.write_all(plain).unwrap();
        enc.finish().unwrap()
    }

    fn plain(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_frame_is_decompressed_into_one_allocation() {
        // A full frame's span (65,536 entries of 40 bytes and its head): read_to_end grew
        // its buffer through every smaller size, each left behind in the allocator.
        let p = plain(65_536 * 40 + 64);
        let out = decompress(&streamed(&p), p.len() as u64).unwrap();
        assert_eq!(out, p);
        assert_eq!(out.capacity(), p.len());
        // A sparser frame under the same limit: the same single buffer, filled in part.
        let short = plain(1000);
        assert_eq!(
            decompress(&streamed(&short), p.len() as u64).unwrap(),
            short
        );
    }

    #[test]
    fn a_sparse_frame_is_sized_by_its_header_not_its_span() {
        // 1,000 entries of a span that could hold 65,536: the writer's frames state their
        // size, and the reader allocates that, not the span's 2.6 MB.
        let limit = (65_536 * 40 + 64) as u64;
        let p = plain(1000 * 40 + 64);
        let mut enc = super::frame_encoder(p.len()).unwrap();
        enc.write_all(&p).unwrap();
        let z = enc.finish().unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&z).unwrap(),
            Some(p.len() as u64)
        );
        let out = decompress(&z, limit).unwrap();
        assert_eq!(out, p);
        assert_eq!(out.capacity(), p.len());
    }

    #[test]
    fn output_past_the_limit_is_refused() {
        let p = plain(100_000);
        assert!(decompress(&streamed(&p), 99_999).is_err());
        // A header that states a content size past the limit is refused before any
        // buffer is sized by it.
        let sized = zstd::bulk::compress(&p, 3).unwrap();
        let e = decompress(&sized, 99_999).unwrap_err();
        assert!(e.contains("past its frame's span"), "{e}");
        assert_eq!(decompress(&sized, 100_000).unwrap(), p);
        assert!(decompress(b"not zstd at all", 1 << 20).is_err());
    }
}
