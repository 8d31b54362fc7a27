//! Catalogs: each pool's sealed, versioned record of which backups exist (repository
//! format 3; docs/design.md §12 "Catalogs").
//!
//! Invariants:
//! - A backup exists iff the newest generation of its pool's catalog lists it. Headers in
//!   `manifests/` that no catalog lists are leftovers of an interrupted backup or pruned
//!   backups put back by someone with write access to the store; they are never restored
//!   or used as an incremental base.
//! - Generations only grow and are written create-only (`put_new`); each is sealed under
//!   its own name (repository, pool and generation), so none can be replayed under
//!   another, and names the hashes of the generations before it (`previous`), so a
//!   generation rewritten after newer ones were deleted does not pass for the one a host
//!   saw.
//! - Readers use each pool's highest generation and never fall back to an older one. One
//!   below this host's high-water mark ([`crate::marks`]), or one that does not descend
//!   from the generation the mark names, is a rollback and an error.
//! - Commit orders: a backup writes its table, then the catalog (the commit point), then
//!   the header as a copy (for `repo repair` and as evidence). Removal (prune, forget)
//!   writes the catalog with the ids in `removed`, then deletes header and table. So a
//!   stored header that no catalog lists and none removed is evidence of a rollback (or a
//!   lost update on a store ignoring If-None-Match), never a normal state.
//!
//! Threading: stateless functions; writers in one process are serialised by a mutex,
//! writers in several race on `put_new` and the loser rereads and retries.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};
use crate::manifest::Header;
use crate::repo::{self, Repository};

pub const CATALOGS: &str = "catalogs/";
/// Generations kept per pool after a write (older ones are deleted).
pub const KEEP_GENERATIONS: u64 = 8;
/// Largest sealed catalog object read.
pub const MAX_SEALED: u64 = 64 << 20;
/// Largest decompressed catalog accepted.
pub const MAX_PLAIN: u64 = 256 << 20;
/// Backups one pool's catalog may list (at ~600 bytes of JSON each, well within
/// `MAX_PLAIN`; the writer also checks the encoded size).
pub const MAX_BACKUPS: usize = 200_000;
/// Removed ids a catalog remembers (the oldest are forgotten first).
pub const MAX_REMOVED: usize = 100_000;
/// Hashes of earlier generations a catalog names.
pub const MAX_PREVIOUS: usize = 64;
/// Create-only attempts before a writer gives up (each loses to another writer).
const MAX_ATTEMPTS: usize = 16;
/// Digits of a generation in an object name (u64::MAX has 20).
const GEN_DIGITS: usize = 20;

/// One generation of a pool's catalog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Catalog {
    pub pool: String,
    pub generation: u64,
    /// When it was written (Unix seconds) and by which host.
    pub written: u64,
    pub host: String,
    /// Every backup of the pool, as its header.
    pub backups: Vec<Header>,
    /// Ids of backups removed (pruned, forgotten), oldest first: their stored headers are
    /// leftovers, not evidence.
    #[serde(default)]
    pub removed: Vec<String>,
    /// (generation, hex BLAKE3 of its sealed object) of up to [`MAX_PREVIOUS`] generations
    /// before this one, newest last.
    #[serde(default)]
    pub previous: Vec<(u64, String)>,
}

/// A catalog generation as read, with the hash of its sealed object.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub catalog: Catalog,
    pub hash: String,
}

impl Loaded {
    /// Whether this generation is, or descends from, generation `g` with hash `h`
    /// (`None` when `g` is older than the hashes it names: cannot tell).
    pub fn descends_from(&self, g: u64, h: &str) -> Option<bool> {
        let c = &self.catalog;
        if g == c.generation {
            return Some(h == self.hash);
        }
        if g > c.generation {
            return Some(false);
        }
        if let Some((_, ph)) = c.previous.iter().find(|(pg, _)| *pg == g) {
            return Some(ph == h);
        }
        // Every writer names its predecessor: a generation missing from a full window
        // means the chain was not ours to check that far back.
        match c.previous.first() {
            Some((first, _)) if c.previous.len() >= MAX_PREVIOUS && g < *first => None,
            _ => Some(false),
        }
    }
}

/// A pool uuid as it may appear in an object name.
fn valid_pool(pool: &str) -> bool {
    !pool.is_empty()
        && pool.len() <= 64
        && pool
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn key(pool: &str, generation: u64) -> String {
    format!("{CATALOGS}{pool}/{generation:0GEN_DIGITS$}")
}

fn aad(repo: &Repository, pool: &str, generation: u64) -> Vec<u8> {
    format!("snapblk catalog {} {pool} {generation}", repo.config().id).into_bytes()
}

/// (pool, generation) of a catalog object's key; None for anything else.
pub fn parse_key(key: &str) -> Option<(String, u64)> {
    let rest = key.strip_prefix(CATALOGS)?;
    let (pool, generation) = rest.split_once('/')?;
    if !valid_pool(pool)
        || generation.len() != GEN_DIGITS
        || !generation.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((pool.to_string(), generation.parse().ok()?))
}

/// Every generation stored of each pool (those of `pool` only, if given), ascending.
pub fn generations(repo: &Repository, pool: Option<&str>) -> Result<BTreeMap<String, Vec<u64>>> {
    let prefix = match pool {
        Some(p) => format!("{CATALOGS}{p}/"),
        None => CATALOGS.to_string(),
    };
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for o in repo.store().list(&prefix)? {
        if let Some((p, g)) = parse_key(&o.key) {
            out.entry(p).or_default().push(g);
        }
    }
    for gens in out.values_mut() {
        gens.sort_unstable();
    }
    Ok(out)
}

/// Reads and authenticates one generation.
pub fn read(repo: &Repository, pool: &str, generation: u64) -> Result<Loaded> {
    let k = key(pool, generation);
    let sealed = repo.store().get(&k, MAX_SEALED)?;
    let hash = blake3::hash(&sealed).to_hex().to_string();
    let z = repo
        .keys()
        .open(&sealed, &aad(repo, pool, generation))
        .ok_or_else(|| BackupError::corrupt(&k, "fails authentication (altered or misplaced)"))?;
    drop(sealed);
    let bad = |d: String| BackupError::corrupt(&k, d);
    let mut plain = Vec::new();
    zstd::stream::read::Decoder::with_buffer(&z[..])
        .map_err(|e| bad(format!("does not decompress: {e}")))?
        .take(MAX_PLAIN + 1)
        .read_to_end(&mut plain)
        .map_err(|e| bad(format!("does not decompress: {e}")))?;
    if plain.len() as u64 > MAX_PLAIN {
        return Err(bad(format!("decompresses to more than {MAX_PLAIN} bytes")));
    }
    let c: Catalog =
        serde_json::from_slice(&plain).map_err(|e| bad(format!("bad catalog: {e}")))?;
    if c.pool != pool || c.generation != generation {
        return Err(bad(format!(
            "names itself generation {} of pool {}",
            c.generation, c.pool
        )));
    }
    if c.backups.len() > MAX_BACKUPS
        || c.removed.len() > MAX_REMOVED
        || c.previous.len() > MAX_PREVIOUS
    {
        return Err(bad(
            "lists more backups, removals or generations than allowed".into(),
        ));
    }
    if let Some(h) = c.backups.iter().find(|h| h.pool != pool) {
        return Err(bad(format!("lists backup {} of pool {}", h.id, h.pool)));
    }
    Ok(Loaded { catalog: c, hash })
}

fn seal(repo: &Repository, c: &Catalog) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(c).map_err(|e| BackupError::invalid("catalog", e.to_string()))?;
    if json.len() as u64 > MAX_PLAIN {
        // Written, it could never be read back.
        return Err(BackupError::invalid(
            format!("catalog of pool {}", c.pool),
            format!(
                "would be {} bytes (at most {MAX_PLAIN}): prune first",
                json.len()
            ),
        ));
    }
    let z = zstd::bulk::compress(&json, 3).map_err(BackupError::Io)?;
    Ok(repo.keys().seal(&z, &aad(repo, &c.pool, c.generation)))
}

/// The newest generation of every pool, checked against (and raising) this host's
/// high-water marks.
#[derive(Debug, Clone, Default)]
pub struct Catalogs {
    pub pools: BTreeMap<String, Loaded>,
}

impl Catalogs {
    /// Loads the newest catalog of every pool (one listing, one GET per pool).
    pub fn load(repo: &Repository) -> Result<Catalogs> {
        let gens = generations(repo, None)?;
        let newest: Vec<(String, u64)> = gens
            .iter()
            .filter_map(|(p, g)| Some((p.clone(), *g.last()?)))
            .collect();
        let got = crate::par::map(&newest, crate::index::FETCH_THREADS, |(p, g)| {
            Ok::<_, BackupError>(read(repo, p, *g))
        })?;
        let mut out = Catalogs::default();
        for ((p, _), c) in newest.into_iter().zip(got) {
            out.pools.insert(p, c?);
        }
        repo.check_marks(&out.pools, None)?;
        repo.raise_marks(out.pools.values());
        Ok(out)
    }

    /// Every listed backup, oldest first (as `manifest::list` orders headers).
    pub fn headers(&self) -> Vec<Header> {
        let mut all: Vec<Header> = self
            .pools
            .values()
            .flat_map(|c| c.catalog.backups.iter().cloned())
            .collect();
        crate::manifest::sort(&mut all);
        all
    }

    pub fn contains(&self, id: &str) -> bool {
        self.pools
            .values()
            .any(|c| c.catalog.backups.iter().any(|h| h.id == id))
    }

    /// The host that took `pool`'s newest backup ("" if unknown).
    pub fn host_of(&self, pool: &str) -> &str {
        self.pools
            .get(pool)
            .and_then(|l| l.catalog.backups.iter().max_by_key(|h| h.backed_up))
            .map_or("", |h| h.host.as_str())
    }

    /// Pools `from` names: a pool uuid, or the host name of a pool's backups.
    pub fn pools_named(&self, from: &str) -> Vec<&str> {
        self.pools
            .iter()
            .filter(|(p, l)| p.as_str() == from || l.catalog.backups.iter().any(|h| h.host == from))
            .map(|(p, _)| p.as_str())
            .collect()
    }

    /// The backup `name` (`vol@snap`: the newest of that name; or a backup id) to
    /// restore: from the pools `from` names if given; else from `this_pool` if it has one
    /// of that name; else from the one other pool that has one. Several candidates are an
    /// error naming them (choose with `from`).
    pub fn choose(
        &self,
        name: &str,
        this_pool: Option<&str>,
        from: Option<&str>,
    ) -> Result<Header> {
        let newest_in = |pools: &[&str]| -> Option<Header> {
            let mut hs: Vec<Header> = pools
                .iter()
                .filter_map(|p| self.pools.get(*p))
                .flat_map(|l| l.catalog.backups.iter().cloned())
                .collect();
            crate::manifest::sort(&mut hs);
            crate::manifest::find(&hs, name).cloned()
        };
        if let Some(from) = from {
            let pools = self.pools_named(from);
            if pools.is_empty() {
                return Err(BackupError::invalid(
                    format!("--from {from}"),
                    "names no pool or host that has backups in this repository",
                ));
            }
            return newest_in(&pools)
                .ok_or_else(|| BackupError::NoSuchBackup(format!("{name} from {from}")));
        }
        if let Some(h) = self.headers().into_iter().find(|h| h.id == name) {
            return Ok(h);
        }
        if let Some(h) = this_pool.and_then(|p| newest_in(&[p])) {
            return Ok(h);
        }
        let mut found: Vec<Header> = self
            .pools
            .keys()
            .filter(|p| Some(p.as_str()) != this_pool)
            .filter_map(|p| newest_in(&[p.as_str()]))
            .collect();
        match found.len() {
            0 => Err(BackupError::NoSuchBackup(name.to_string())),
            1 => Ok(found.remove(0)),
            _ => Err(BackupError::invalid(
                name,
                format!(
                    "is backed up from several pools: {}; choose one with --from HOST|POOL",
                    found
                        .iter()
                        .map(|h| format!("pool {} (host {})", h.pool, self.host_of(&h.pool)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Whether `id` was removed (pruned or forgotten) from its pool's catalog.
    pub fn removed(&self, pool: &str, id: &str) -> bool {
        self.pools
            .get(pool)
            .is_some_and(|c| c.catalog.removed.iter().any(|r| r == id))
    }
}

/// The newest catalog of `pool` (None if it has none), checked against this host's mark.
pub fn load_pool(repo: &Repository, pool: &str) -> Result<Option<Loaded>> {
    let gens = generations(repo, Some(pool))?;
    let newest = gens.get(pool).and_then(|g| g.last().copied());
    let mut m = BTreeMap::new();
    if let Some(g) = newest {
        m.insert(pool.to_string(), read(repo, pool, g)?);
    }
    repo.check_marks(&m, Some(pool))?;
    repo.raise_marks(m.values());
    Ok(m.remove(pool))
}

/// Serialises this process's catalog writers (a pool's own backups would otherwise spend
/// their create-only attempts on each other).
static WRITERS: Mutex<()> = Mutex::new(());

/// A change to a pool's list of backups.
pub enum Change<'a> {
    /// Lists `header` unless a backup of the same snapshot is listed; returns that one.
    Add(&'a Header),
    /// Lists every header not listed yet (repository upgrade).
    Merge(&'a [Header]),
    /// Unlists these ids and remembers them as removed.
    Remove(&'a HashSet<&'a str>),
    /// Lists these headers again and forgets they were removed (a prune that found a
    /// hold placed after its listing, before it deleted their objects).
    Reinstate(&'a [Header]),
}

/// Writes the next generation of `pool`'s catalog with `change` applied, rereading and
/// retrying when another writer took the generation. Returns, for `Add`, the backup of
/// that snapshot listed before (nothing was written then).
pub fn update(repo: &Repository, pool: &str, change: Change<'_>) -> Result<Option<Header>> {
    if !valid_pool(pool) {
        return Err(BackupError::invalid(
            "catalog",
            format!("{pool:?} cannot name a pool's catalog"),
        ));
    }
    let _serial = WRITERS.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..MAX_ATTEMPTS {
        let current = load_pool(repo, pool)?;
        let (generation, mut next) = match &current {
            Some(l) => {
                let mut previous = l.catalog.previous.clone();
                previous.push((l.catalog.generation, l.hash.clone()));
                let drop = previous.len().saturating_sub(MAX_PREVIOUS);
                previous.drain(..drop);
                (
                    l.catalog.generation,
                    Catalog {
                        previous,
                        ..l.catalog.clone()
                    },
                )
            }
            None => (
                0,
                Catalog {
                    pool: pool.to_string(),
                    generation: 0,
                    written: 0,
                    host: String::new(),
                    backups: Vec::new(),
                    removed: Vec::new(),
                    previous: Vec::new(),
                },
            ),
        };
        match &change {
            Change::Add(h) => {
                if let Some(old) = next.backups.iter().find(|b| b.snapshot_id == h.snapshot_id) {
                    return Ok(Some(old.clone()));
                }
                next.backups.push((*h).clone());
            }
            Change::Merge(hs) => {
                let before = next.backups.len();
                for h in hs.iter() {
                    if !next.backups.iter().any(|b| b.id == h.id) {
                        next.backups.push(h.clone());
                    }
                }
                if next.backups.len() == before {
                    return Ok(None);
                }
            }
            Change::Reinstate(hs) => {
                let before = (next.backups.len(), next.removed.len());
                for h in hs.iter() {
                    next.removed.retain(|r| *r != h.id);
                    if !next.backups.iter().any(|b| b.id == h.id) {
                        next.backups.push(h.clone());
                    }
                }
                if (next.backups.len(), next.removed.len()) == before {
                    return Ok(None);
                }
            }
            Change::Remove(ids) => {
                let before = next.backups.len();
                next.backups.retain(|h| !ids.contains(h.id.as_str()));
                if next.backups.len() == before {
                    return Ok(None);
                }
                next.removed.extend(ids.iter().map(|s| s.to_string()));
                let drop = next.removed.len().saturating_sub(MAX_REMOVED);
                next.removed.drain(..drop);
            }
        }
        if next.backups.len() > MAX_BACKUPS {
            return Err(BackupError::invalid(
                format!("catalog of pool {pool}"),
                format!("would list more than {MAX_BACKUPS} backups: prune first"),
            ));
        }
        next.generation = generation + 1;
        next.written = repo::now();
        next.host = host_name();
        let bytes = seal(repo, &next)?;
        let k = key(pool, next.generation);
        if !repo.store().put_new(&k, &bytes)? {
            // Another writer took this generation (or it is the retry of our own put whose
            // answer was lost: the bytes then match, as they hold a fresh nonce).
            if repo.store().get(&k, MAX_SEALED)? != bytes {
                continue;
            }
        }
        let written = Loaded {
            hash: blake3::hash(&bytes).to_hex().to_string(),
            catalog: next,
        };
        repo.raise_marks([&written]);
        forget_old(repo, pool, written.catalog.generation);
        return Ok(None);
    }
    Err(BackupError::invalid(
        format!("catalog of pool {pool}"),
        format!("{MAX_ATTEMPTS} attempts lost to concurrent writers"),
    ))
}

/// Deletes generations of `pool` more than [`KEEP_GENERATIONS`] below `newest`. Failures
/// are only logged: old generations are never read.
fn forget_old(repo: &Repository, pool: &str, newest: u64) {
    let Ok(gens) = generations(repo, Some(pool)) else {
        return;
    };
    let below = newest.saturating_sub(KEEP_GENERATIONS - 1);
    for g in gens.get(pool).into_iter().flatten().filter(|g| **g < below) {
        if let Err(e) = repo.store().delete(&key(pool, *g)) {
            log::warn!("deleting an old catalog generation: {e}");
        }
    }
}

/// This machine's host name, for the record (not used to decide anything).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_reject_others() {
        let k = key("0b7e-11", 42);
        assert_eq!(k, "catalogs/0b7e-11/00000000000000000042");
        assert_eq!(parse_key(&k), Some(("0b7e-11".into(), 42)));
        assert_eq!(parse_key(&key("p", u64::MAX)), Some(("p".into(), u64::MAX)));
        for bad in [
            "catalogs/p/42",
            "catalogs//00000000000000000042",
            "catalogs/a/b/00000000000000000042",
            "catalogs/p/0000000000000000004x",
            "catalogs/p/99999999999999999999",
            "manifests/p/00000000000000000042",
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }
}
