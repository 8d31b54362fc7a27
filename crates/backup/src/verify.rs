//! `backup verify`: each pool's newest catalog opens and is not behind this host's
//! high-water mark; every backup it lists has its header and table; every chunk they
//! reference is indexed and lies inside an existing pack; with `read_data`, every referenced chunk is downloaded, opened and
//! hashed. Each problem names the object or chunk and the snapshots it affects.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::catalog::Catalogs;
use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::index::{ChunkIndex, Purpose};
use crate::manifest;
use crate::par::lock;
use crate::progress::Progress;
use crate::repo::{self, Repository};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// What is bad: `chunk <hex>`, `pack <hex>`, `manifest <id>`.
    pub object: String,
    pub detail: String,
    /// `vol@snap` of every backup that cannot be restored because of it.
    pub affects: Vec<String>,
}

/// One pool's newest catalog generation, as verified.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CatalogInfo {
    pub pool: String,
    pub generation: u64,
    /// BLAKE3 of the generation's sealed object (compare across hosts).
    pub hash: String,
    pub written: u64,
    pub host: String,
    pub backups: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Each pool's catalog: compare generations with what the hosts writing them saw.
    pub catalogs: Vec<CatalogInfo>,
    /// Stored headers no catalog lists and none removed: evidence of a rolled-back
    /// catalog (each is also a problem). gc keeps them and their chunks.
    pub uncatalogued: Vec<String>,
    /// Stored headers of removed backups (an interrupted prune; gc deletes them).
    pub leftovers: u64,
    /// Listed backups whose `manifests/` copy is missing (harmless).
    pub header_copies_missing: u64,
    pub manifests: u64,
    pub chunks: u64,
    pub packs: u64,
    /// Chunks stored in live packs that no backup references (garbage for `gc`).
    pub chunks_unreferenced: u64,
    /// Extra copies of chunks stored in more than one live pack.
    pub chunks_duplicate: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Whether `h` is still listed in its pool's newest catalog.
fn still_listed(repo: &Repository, h: &manifest::Header) -> Result<bool> {
    Ok(crate::catalog::load_pool(repo, &h.pool)?
        .is_some_and(|l| l.catalog.backups.iter().any(|b| b.id == h.id)))
}

/// How much data a verify downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadData {
    /// None: structure only.
    None,
    /// Every referenced chunk.
    All,
    /// The packs of part `k` of `n` (packs split by their id, so `n` runs with `k` = 0..n
    /// read every pack once, as restic's `--read-data-subset k/n`).
    Part(u32, u32),
}

impl ReadData {
    fn wants(&self, pack_id: &str) -> bool {
        match *self {
            ReadData::None => false,
            ReadData::All => true,
            ReadData::Part(k, n) => part_of(pack_id, n) == k,
        }
    }
}

/// Which of `n` parts a pack belongs to (its id is a hash: parts are even).
pub fn part_of(pack_id: &str, n: u32) -> u32 {
    let head = pack_id.get(..16).unwrap_or(pack_id);
    let v = u64::from_str_radix(head, 16).unwrap_or(0);
    (v % u64::from(n.max(1))) as u32
}

pub fn run(
    repo: &Repository,
    read_data: bool,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Report> {
    let read = if read_data {
        ReadData::All
    } else {
        ReadData::None
    };
    run_with(repo, read, threads, progress)
}

/// Verifies, downloading what `read` says.
pub fn run_with(
    repo: &Repository,
    read: ReadData,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Report> {
    let mut rep = Report::default();
    let _lease = crate::lease::Lease::shared(repo, "verify")?;
    let catalogs = Catalogs::load(repo)?;
    for c in catalogs.pools.values() {
        rep.catalogs.push(CatalogInfo {
            pool: c.catalog.pool.clone(),
            generation: c.catalog.generation,
            hash: c.hash.clone(),
            written: c.catalog.written,
            host: c.catalog.host.clone(),
            backups: c.catalog.backups.len() as u64,
        });
    }
    let headers = catalogs.headers();
    let stored: HashSet<String> = repo
        .store()
        .list(repo::MANIFESTS)?
        .into_iter()
        .filter_map(|o| o.key.strip_prefix(repo::MANIFESTS).map(str::to_string))
        .collect();
    let listed: HashSet<&str> = headers.iter().map(|h| h.id.as_str()).collect();
    let mut unlisted: Vec<&String> = stored
        .iter()
        .filter(|id| !listed.contains(id.as_str()))
        .collect();
    unlisted.sort();
    for id in unlisted {
        match manifest::read_header(repo, id) {
            Ok(h) if catalogs.removed(&h.pool, &h.id) => rep.leftovers += 1,
            Ok(h) => {
                rep.uncatalogued.push(id.clone());
                rep.problems.push(Problem {
                    object: format!("manifest {id}"),
                    detail: format!(
                        "backed up {} from pool {}, but no catalog lists it and none removed it: \
                         its pool's catalog was rolled back (newer generations deleted or replaced) \
                         or an update was lost; it is not restorable by name until listed again",
                        h.backed_up, h.pool
                    ),
                    affects: vec![h.name()],
                });
            }
            Err(e) => rep.problems.push(Problem {
                object: format!("manifest {id}"),
                detail: e.to_string(),
                affects: vec![format!("backup {id}")],
            }),
        }
    }
    let mut refs: HashMap<ChunkId, BTreeSet<String>> = HashMap::new();
    for h in &headers {
        if !stored.contains(&h.id) {
            // Harmless (the catalog holds the header); a cut between the catalog write
            // and the copy leaves this too.
            rep.header_copies_missing += 1;
        }
        rep.manifests += 1;
        match manifest::read_table(repo, h) {
            Ok(t) => {
                for (_, id) in t.cells {
                    refs.entry(id).or_default().insert(h.name());
                }
            }
            // Pruned while we ran: not a problem.
            Err(BackupError::Lost { .. }) if !still_listed(repo, h)? => {}
            Err(e) => rep.problems.push(Problem {
                object: format!("manifest {}", h.id),
                detail: e.to_string(),
                affects: vec![h.name()],
            }),
        }
    }
    rep.chunks = refs.len() as u64;
    let index = ChunkIndex::load(repo, Purpose::Read)?;
    rep.chunks_unreferenced = index
        .packs
        .iter()
        .filter(|p| !p.condemned)
        .flat_map(|p| p.entries.iter())
        .filter(|e| !refs.contains_key(&e.id))
        .count() as u64;
    let mut seen = std::collections::HashSet::new();
    rep.chunks_duplicate = index
        .packs
        .iter()
        .filter(|p| !p.condemned)
        .flat_map(|p| p.entries.iter())
        .filter(|e| !seen.insert(e.id))
        .count() as u64;
    let sizes: HashMap<String, u64> = repo
        .store()
        .list(repo::PACKS)?
        .into_iter()
        .filter_map(|o| {
            let id = o.key.rsplit('/').next()?.to_string();
            Some((id, o.size))
        })
        .collect();
    // Referenced chunks grouped by pack.
    let mut by_pack: HashMap<u32, Vec<ChunkId>> = HashMap::new();
    for (id, snaps) in &refs {
        let affects: Vec<String> = snaps.iter().cloned().collect();
        let Some(loc) = index.map.get(id) else {
            rep.problems.push(Problem {
                object: format!("chunk {}", id.hex()),
                detail: "referenced but in no pack index".into(),
                affects,
            });
            continue;
        };
        let pack = index.pack_id(loc);
        match sizes.get(pack) {
            None => rep.problems.push(Problem {
                object: format!("chunk {}", id.hex()),
                detail: format!("its pack {pack} is missing"),
                affects,
            }),
            Some(&sz) if u64::from(loc.offset) + u64::from(loc.len) > sz => {
                rep.problems.push(Problem {
                    object: format!("chunk {}", id.hex()),
                    detail: format!("lies past the end of pack {pack} ({sz} bytes)"),
                    affects,
                })
            }
            Some(_) => by_pack.entry(loc.pack).or_default().push(*id),
        }
    }
    if read == ReadData::None {
        return Ok(rep);
    }
    let packs: Vec<(u32, Vec<ChunkId>)> = by_pack
        .into_iter()
        .filter(|(p, _)| read.wants(&index.packs[*p as usize].id))
        .collect();
    let total: u64 = packs
        .iter()
        .map(|(p, _)| {
            sizes
                .get(&index.packs[*p as usize].id)
                .copied()
                .unwrap_or(0)
        })
        .sum();
    progress.start("verify", total);
    let problems = Mutex::new(Vec::new());
    let read = AtomicU64::new(0);
    let max = repo.config().chunk_size as usize;
    let bad_chunk = |id: &ChunkId, pid: &str, detail: &str| Problem {
        object: format!("chunk {}", id.hex()),
        detail: format!("in pack {pid}: {detail}"),
        affects: refs
            .get(id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default(),
    };
    crate::par::map(&packs, threads, |(p, ids)| -> Result<()> {
        let pid = &index.packs[*p as usize].id;
        let key = repo::pack_key(pid);
        let bytes = match repo.store().get(&key, crate::pack::MAX_PACK_OBJECT) {
            Ok(b) => b,
            Err(e) => {
                // The store refused the whole object (e.g. its own checksum failed): check
                // chunk by chunk with ranged reads, so the bad chunks get named.
                let mut found = false;
                for id in ids {
                    let Some(loc) = index.map.get(id) else {
                        continue;
                    };
                    let res = repo
                        .store()
                        .get_range(&key, u64::from(loc.offset), u64::from(loc.len))
                        .map_err(|e| format!("cannot be read: {e}"))
                        .and_then(|b| crate::chunk::decode(repo.keys(), id, &b, max).map(|_| ()));
                    read.fetch_add(u64::from(loc.len), Ordering::Relaxed);
                    if let Err(detail) = res {
                        found = true;
                        lock(&problems).push(bad_chunk(id, pid, &detail));
                    }
                }
                if !found {
                    lock(&problems).push(Problem {
                        object: format!("pack {pid}"),
                        detail: format!(
                            "cannot be read whole ({e}), though each referenced chunk can"
                        ),
                        affects: Vec::new(),
                    });
                }
                progress.advance(sizes.get(pid).copied().unwrap_or(0));
                return Ok(());
            }
        };
        read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        progress.advance(bytes.len() as u64);
        let mut any_bad = false;
        for id in ids {
            let Some(loc) = index.map.get(id) else {
                continue;
            };
            let blob = bytes.get(loc.offset as usize..loc.offset as usize + loc.len as usize);
            let res = match blob {
                None => Err("pack is shorter than its index says".to_string()),
                Some(b) => crate::chunk::decode(repo.keys(), id, b, max).map(|_| ()),
            };
            if let Err(detail) = res {
                any_bad = true;
                lock(&problems).push(bad_chunk(id, pid, &detail));
            }
        }
        if !any_bad && !crate::pack::names(pid, &bytes) {
            lock(&problems).push(Problem {
                object: format!("pack {pid}"),
                detail: "bytes do not match its name (damage outside the referenced chunks)".into(),
                affects: Vec::new(),
            });
        }
        Ok(())
    })
    .map_err(|e: BackupError| e)?;
    rep.packs = packs.len() as u64;
    rep.bytes_read = read.into_inner();
    rep.problems
        .extend(problems.into_inner().unwrap_or_else(|p| p.into_inner()));
    Ok(rep)
}
