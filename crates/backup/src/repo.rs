//! An open repository: its store, config and keys, and the names of its objects.
//!
//! Object layout (all keys relative to the target's prefix; docs/design.md §12):
//! `config` (plain JSON, authenticated), `packs/<2 hex>/<64 hex>` (pack, named by the BLAKE3
//! hash of its blob section), `index/<64 hex>` (chunk list of that pack, sealed under its
//! name), `tables/<id>` (sealed cell table of a manifest), `manifests/<id>` (sealed
//! manifest header), `catalogs/<pool>/<generation>` (sealed list of a pool's backups, the
//! commit point of a backup: `crate::catalog`), `trash/<64 hex>` (garbage-collection mark
//! of a pack, plain JSON).

use std::sync::Arc;

use crate::config::{
    check_chunk_size, RepoConfig, DEFAULT_PACK_SIZE, FORMAT, MAX_CONFIG_BYTES, VERSION,
    VERSION_NO_CATALOGS, VERSION_UNAUTHENTICATED,
};
use crate::crypto::{random_bytes, unwrap_master, wrap_master, Keys};
use crate::error::{BackupError, Result};
use crate::marks::Marks;
use crate::store::ObjectStore;

pub const CONFIG_KEY: &str = "config";
pub const PACKS: &str = "packs/";
pub const INDEX: &str = "index/";
/// Format-5 index objects, keyed by time (crate::index::Indexed).
pub const IX: &str = "ix/";
pub const TABLES: &str = "tables/";
pub const MANIFESTS: &str = "manifests/";
pub const TRASH: &str = "trash/";
/// The name, in this host's marks, of the newest index generation it saw (pool names
/// cannot hold spaces or parentheses, so no pool's catalog mark shares it).
pub const INDEX_MARK: &str = "(index generations)";
/// The name, in this host's marks, of the highest repository format it saw (its
/// `generation`; no hash).
pub const FORMAT_MARK: &str = "(format)";

pub fn pack_key(id: &str) -> String {
    format!("{PACKS}{}/{id}", id.get(..2).unwrap_or("00"))
}
pub fn index_key(id: &str) -> String {
    format!("{INDEX}{id}")
}
pub fn table_key(id: &str) -> String {
    format!("{TABLES}{id}")
}
pub fn manifest_key(id: &str) -> String {
    format!("{MANIFESTS}{id}")
}
pub fn trash_key(id: &str) -> String {
    format!("{TRASH}{id}")
}

/// Upgrade to format 5: takes a sole exclusive lease, waits for running jobs to end,
/// then writes an index generation of every pack listed now (as gc would, deleting
/// nothing). Returns the lease, to hold until the config is raised.
fn write_first_generation(repo: &Repository) -> Result<crate::lease::Lease> {
    let lease = crate::lease::Lease::exclusive_with(repo, "repo upgrade (format 5)", true)?;
    lease.wait_for_shared()?;
    let listing = crate::index::Listing::take(repo)?;
    let objects: std::collections::HashMap<String, (u64, u64)> = repo
        .store
        .list(PACKS)?
        .into_iter()
        .filter_map(|o| Some((o.key.rsplit('/').next()?.to_string(), (o.size, o.modified))))
        .collect();
    let t = now();
    lease.check()?;
    crate::gcgen::advance(
        repo,
        &crate::gcgen::Inputs {
            listing: &listing,
            objects: &objects,
            deleted: &[],
            cut_ms: t
                .saturating_mul(1000)
                .saturating_sub(crate::gc::CUT_SLACK_MS),
            now: t,
            retire_before: 0,
        },
    )?;
    Ok(lease)
}

/// Parameters of a new repository.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub chunk_size: u32,
    pub pack_size: u32,
    pub zstd_level: i32,
    /// The format to create: [`VERSION`], or
    /// [`crate::config::VERSION_WHOLE_TABLES`] for a repository hosts running an older
    /// snapblk (format 3) share until they are upgraded.
    pub version: u32,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: crate::config::DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            zstd_level: 3,
            version: VERSION,
        }
    }
}

#[derive(Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    config: RepoConfig,
    keys: Keys,
    /// This host's catalog high-water marks (None: rollbacks go unnoticed).
    marks: Option<Marks>,
    /// Lifetime of this process's leases without a refresh (seconds).
    lease_ttl: u64,
    /// Local copies of immutable objects (None: everything is downloaded each time).
    cache: Option<crate::cache::ObjectCache>,
    /// Upload rate limit shared by every job on this handle and its clones.
    pacer: Option<Arc<crate::pace::Pacer>>,
    /// Threads a job runs.
    parallelism: Parallelism,
    /// Cells a backup reads per batch ([`Repository::with_batch`]).
    batch: usize,
}

/// Threads a job runs (`--readers`, `--uploaders`, `--downloads`); each 1..=[`MAX_THREADS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parallelism {
    /// Backup: threads reading cells of the snapshot (each one read at a time).
    pub readers: usize,
    /// Backup: packs uploaded at once.
    pub uploaders: usize,
    /// Restore, lazy restore's background, verify --read-data: ranged GETs at once.
    pub downloads: usize,
}

/// Most threads of one kind a job runs.
pub const MAX_THREADS: usize = 64;

impl Default for Parallelism {
    fn default() -> Self {
        Parallelism {
            readers: 2,
            uploaders: 4,
            downloads: 8,
        }
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Repository {
    /// A handle with no marks, no cache and the default lease lifetime.
    fn with_parts(store: Arc<dyn ObjectStore>, config: RepoConfig, keys: Keys) -> Repository {
        Repository {
            store,
            config,
            keys,
            marks: None,
            lease_ttl: crate::lease::DEFAULT_TTL,
            cache: None,
            pacer: None,
            parallelism: Parallelism::default(),
            batch: crate::frame::SEG as usize,
        }
    }

    /// Creates a repository in `store`, whose master key is wrapped for `secret`.
    pub fn init(
        store: Arc<dyn ObjectStore>,
        secret: &[u8],
        opts: &InitOptions,
    ) -> Result<Repository> {
        check_chunk_size(opts.chunk_size)?;
        if secret.is_empty() {
            return Err(BackupError::invalid(
                "key",
                "the passphrase or key file is empty",
            ));
        }
        if !(1 << 20..=256 << 20).contains(&opts.pack_size) {
            return Err(BackupError::invalid(
                "pack size",
                "must be between 1 MiB and 256 MiB",
            ));
        }
        if !(crate::config::VERSION_WHOLE_TABLES..=VERSION).contains(&opts.version) {
            return Err(BackupError::invalid(
                "repository format",
                format!(
                    "{} cannot be created (only {} or {VERSION})",
                    opts.version,
                    crate::config::VERSION_WHOLE_TABLES
                ),
            ));
        }
        let master: [u8; 32] = random_bytes();
        let config = RepoConfig {
            format: FORMAT.into(),
            version: opts.version,
            id: uuid::Uuid::new_v4().to_string(),
            created: now(),
            chunk_size: opts.chunk_size,
            pack_size: opts.pack_size,
            compression: "zstd".into(),
            zstd_level: opts.zstd_level,
            cipher: "xchacha20poly1305".into(),
            chunk_hash: "blake3-keyed".into(),
            keys: vec![wrap_master(&master, secret)?],
            mac: None,
        };
        let keys = Keys::from_master(&master);
        let (config, bytes) = signed(config, &keys)?;
        let version = config.version;
        // Look first: some S3-compatible servers ignore If-None-Match, and a put over an
        // existing repository's config would make every backup in it unreadable.
        match store.get(CONFIG_KEY, MAX_CONFIG_BYTES) {
            Ok(_) => return Err(BackupError::RepositoryExists(store.describe())),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        // Then create conditionally. A create-only put that reports "exists" may be the
        // retry of our own put whose answer was lost: the stored config is then
        // byte-for-byte ours (it holds a fresh uuid and key slot, so no other writer's can
        // match).
        if !store.put_new(CONFIG_KEY, &bytes)? && store.get(CONFIG_KEY, MAX_CONFIG_BYTES)? != bytes
        {
            return Err(BackupError::RepositoryExists(store.describe()));
        }
        let repo = Repository::with_parts(store, config, keys);
        if version >= crate::config::VERSION_GENERATIONS {
            // Its first index generation, empty (jobs of format 5 refuse a repository
            // with none; a gc writes one if this init dies first).
            let g = crate::generation::Generation {
                number: 1,
                created: now(),
                cut_ms: now()
                    .saturating_mul(1000)
                    .saturating_sub(crate::gc::CUT_SLACK_MS),
                ..Default::default()
            };
            crate::generation::write(&repo, &g, None)?;
        }
        Ok(repo)
    }

    /// Opens the repository in `store` with `secret`: unwraps the master key, then checks
    /// the config's mac (format 2).
    pub fn open(store: Arc<dyn ObjectStore>, secret: &[u8]) -> Result<Repository> {
        let (config, keys) = unlock(&*store, secret)?;
        if config.version == VERSION_UNAUTHENTICATED {
            return Err(BackupError::Unsupported(format!(
                "the repository at {} is format 1, whose config is not authenticated; \
                 run `snapblk repo upgrade {}` once to authenticate it",
                store.describe(),
                store.describe()
            )));
        }
        check_mac(&config, &keys)?;
        if config.version == VERSION_NO_CATALOGS {
            return Err(BackupError::Unsupported(format!(
                "the repository at {} is format 2, which keeps no catalog of its backups; \
                 run `snapblk repo upgrade {}` once to write them",
                store.describe(),
                store.describe()
            )));
        }
        Ok(Repository::with_parts(store, config, keys))
    }

    /// Converts a repository to format 4: authenticates its config as it is now (format
    /// 1), writes a catalog for every pool from the headers stored now (formats 1 and 2),
    /// so run it where you trust the store's current contents; then raises the version,
    /// after which new tables are written as frames and an older snapblk refuses the
    /// repository. Idempotent: an upgrade cut short runs again from where it stopped.
    pub fn upgrade(store: Arc<dyn ObjectStore>, secret: &[u8]) -> Result<Repository> {
        let (config, keys) = unlock(&*store, secret)?;
        if config.version != VERSION_UNAUTHENTICATED {
            check_mac(&config, &keys)?;
        }
        let mut repo = Repository::with_parts(store, config, keys);
        if repo.config.version == VERSION {
            return Ok(repo);
        }
        // Pack indexes first, bound to their pack's name; then the catalogs; the config
        // last.
        if repo.config.version == VERSION_UNAUTHENTICATED {
            reseal_indexes(&*repo.store, &repo.keys)?;
        }
        if repo.config.version < crate::config::VERSION_WHOLE_TABLES {
            write_first_catalogs(&repo)?;
        }
        // Held until the config is raised: no job starts meanwhile, none runs.
        let _lease = write_first_generation(&repo)?;
        let (config, bytes) = signed(
            RepoConfig {
                version: VERSION,
                ..repo.config.clone()
            },
            &repo.keys,
        )?;
        repo.store.put(CONFIG_KEY, &bytes)?;
        repo.config = config;
        Ok(repo)
    }

    /// The same repository, checking and raising this host's catalog high-water marks.
    pub fn with_marks(mut self, marks: Option<Marks>) -> Repository {
        self.marks = marks;
        self
    }

    pub fn marks(&self) -> Option<&Marks> {
        self.marks.as_ref()
    }

    /// The same repository, with leases that expire `secs` after their last refresh
    /// (refreshed every sixth of that; default [`crate::lease::DEFAULT_TTL`]).
    pub fn with_lease_ttl(mut self, secs: u64) -> Repository {
        self.lease_ttl = secs;
        self
    }

    pub fn lease_ttl(&self) -> u64 {
        self.lease_ttl
    }

    /// The same repository, keeping copies of immutable objects in `cache`.
    pub fn with_cache(mut self, cache: Option<crate::cache::ObjectCache>) -> Repository {
        self.cache = cache;
        self
    }

    pub fn cache(&self) -> Option<&crate::cache::ObjectCache> {
        self.cache.as_ref()
    }

    /// The same repository, its jobs running `p` threads (each clamped to
    /// 1..=[`MAX_THREADS`]).
    pub fn with_parallelism(mut self, p: Parallelism) -> Repository {
        let c = |n: usize| n.clamp(1, MAX_THREADS);
        self.parallelism = Parallelism {
            readers: c(p.readers),
            uploaders: c(p.uploaders),
            downloads: c(p.downloads),
        };
        self
    }

    pub fn parallelism(&self) -> Parallelism {
        self.parallelism
    }

    /// The same repository, its backups reading about `cells` cells per batch (at least
    /// 1; a batch also completes at least one table frame). A backup holds ~200 bytes
    /// per cell of its batch, and its pipeline drains once per batch; the default is one
    /// frame's worth (65,536 cells).
    pub fn with_batch(mut self, cells: usize) -> Repository {
        self.batch = cells.max(1);
        self
    }

    /// Cells a backup reads per batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The same repository, uploading packs at most `bytes_per_sec` on average.
    pub fn with_upload_limit(mut self, bytes_per_sec: Option<u64>) -> Repository {
        self.pacer = bytes_per_sec.map(|b| Arc::new(crate::pace::Pacer::new(b)));
        self
    }

    /// Uploads `bytes` with `put` within the upload limit: waits for its turn, uploads,
    /// then waits until the bytes' time at the limit has passed (no limit: at once).
    pub fn paced<T>(&self, bytes: u64, put: impl FnOnce() -> T) -> T {
        let Some(p) = &self.pacer else { return put() };
        let end = p.reserve(bytes);
        let r = put();
        crate::pace::Pacer::until(end);
        r
    }

    /// Fails with `RolledBack` if a pool's newest catalog generation (in `newest`; a pool
    /// missing from it has none) is below this host's mark or does not descend from the
    /// generation the mark names. `only`: the listing covered that pool alone.
    pub(crate) fn check_marks(
        &self,
        newest: &std::collections::BTreeMap<String, crate::catalog::Loaded>,
        only: Option<&str>,
    ) -> Result<()> {
        let Some(m) = &self.marks else { return Ok(()) };
        for (pool, seen) in m.get(&self.config.id)? {
            if pool == FORMAT_MARK && u64::from(self.config.version) < seen.generation {
                // An older config put back (from a copy of the bucket, or by someone with
                // write access): older rules would ignore or undo what the newer format
                // relies on (a format-4 gc writes no index generation).
                return Err(BackupError::FormatRolledBack {
                    repo: self.describe(),
                    seen: seen.generation,
                    found: self.config.version,
                    marks: m.file(&self.config.id).display().to_string(),
                });
            }
            if only.is_some_and(|o| o != pool) || pool == INDEX_MARK || pool == FORMAT_MARK {
                continue;
            }
            let found = match newest.get(&pool) {
                None => Some("is gone".to_string()),
                Some(l) if l.catalog.generation < seen.generation => {
                    Some(format!("is at generation {}", l.catalog.generation))
                }
                Some(l) if l.descends_from(seen.generation, &seen.hash) == Some(false) => {
                    Some(format!(
                        "is at generation {}, which does not descend from the one this host saw (replaced)",
                        l.catalog.generation
                    ))
                }
                Some(_) => None,
            };
            if let Some(found) = found {
                return Err(BackupError::RolledBack {
                    repo: self.describe(),
                    pool,
                    seen: seen.generation,
                    found,
                    marks: m.file(&self.config.id).display().to_string(),
                });
            }
        }
        Ok(())
    }

    /// Refuses index generation `number` (head hash `hash`) as the newest if this host
    /// saw a newer one, or another head of that number (newer heads deleted, or the
    /// store's `gen/` replaced: a rollback that would hide packs gc deleted since);
    /// else raises this host's mark to it.
    pub(crate) fn check_index_generation(&self, number: u64, hash: &str) -> Result<()> {
        let Some(m) = &self.marks else { return Ok(()) };
        if let Some(seen) = m.get(&self.config.id)?.get(INDEX_MARK) {
            let found = if number < seen.generation {
                Some(format!("is at {number}"))
            } else if number == seen.generation && hash != seen.hash {
                Some(format!("{number} is not the one this host saw (replaced)"))
            } else {
                None
            };
            if let Some(found) = found {
                return Err(BackupError::IndexRolledBack {
                    repo: self.describe(),
                    seen: seen.generation,
                    found,
                    marks: m.file(&self.config.id).display().to_string(),
                });
            }
            if number == seen.generation {
                return Ok(());
            }
        }
        let mark = crate::marks::Mark {
            generation: number,
            hash: hash.to_string(),
        };
        if let Err(e) = m.raise(&self.config.id, &[(INDEX_MARK.to_string(), mark)].into()) {
            log::warn!("saving index generation high-water mark: {e}");
        }
        Ok(())
    }

    /// Raises this host's marks to generations just read or written. A failure to save
    /// them is logged: the job itself is not wrong, detection is weaker.
    pub(crate) fn raise_marks<'a>(
        &self,
        seen: impl IntoIterator<Item = &'a crate::catalog::Loaded>,
    ) {
        let Some(m) = &self.marks else { return };
        let format = crate::marks::Mark {
            generation: u64::from(self.config.version),
            hash: String::new(),
        };
        let seen = seen
            .into_iter()
            .map(|l| {
                (
                    l.catalog.pool.clone(),
                    crate::marks::Mark {
                        generation: l.catalog.generation,
                        hash: l.hash.clone(),
                    },
                )
            })
            .chain([(FORMAT_MARK.to_string(), format)])
            .collect();
        if let Err(e) = m.raise(&self.config.id, &seen) {
            log::warn!("saving catalog high-water marks: {e}");
        }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }
    pub fn keys(&self) -> &Keys {
        &self.keys
    }
    pub fn chunk_size(&self) -> u64 {
        u64::from(self.config.chunk_size)
    }
    pub fn describe(&self) -> String {
        self.store.describe()
    }
}

/// Reads the config and opens a key slot with `secret` (the config is not checked yet).
fn unlock(store: &dyn ObjectStore, secret: &[u8]) -> Result<(RepoConfig, Keys)> {
    let bytes = match store.get(CONFIG_KEY, MAX_CONFIG_BYTES) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Err(BackupError::NoRepository(store.describe())),
        Err(e) => return Err(e.into()),
    };
    let config = RepoConfig::parse(&bytes)?;
    for slot in &config.keys {
        if let Some(master) = unwrap_master(slot, secret)? {
            return Ok((config, Keys::from_master(&master)));
        }
    }
    Err(BackupError::WrongKey(store.describe()))
}

fn check_mac(config: &RepoConfig, keys: &Keys) -> Result<()> {
    let want = keys.config_mac(&config.mac_input());
    let ok = config
        .mac
        .as_deref()
        .and_then(|m| blake3::Hash::from_hex(m).ok())
        .is_some_and(|m| m == want); // blake3::Hash compares in constant time
    if !ok {
        return Err(BackupError::corrupt(
            CONFIG_KEY,
            "fails authentication: it was altered (or its mac removed) since it was written",
        ));
    }
    Ok(())
}

/// `config` with its mac set, and its stored bytes.
fn signed(mut config: RepoConfig, keys: &Keys) -> Result<(RepoConfig, Vec<u8>)> {
    config.mac = Some(keys.config_mac(&config.mac_input()).to_hex().to_string());
    let bytes = serde_json::to_vec_pretty(&config)
        .map_err(|e| BackupError::invalid("config", e.to_string()))?;
    Ok((config, bytes))
}

/// Re-seals every format-1 `index/` object (constant associated data) under its pack's
/// name; indexes already bound are left alone.
fn reseal_indexes(store: &dyn ObjectStore, keys: &Keys) -> Result<()> {
    use crate::pack::{index_aad, LEGACY_INDEX_AAD, MAX_PACK_OBJECT};
    for o in store.list(INDEX)? {
        let Some(id) = o.key.strip_prefix(INDEX) else {
            continue;
        };
        let sealed = store.get(&o.key, MAX_PACK_OBJECT)?;
        if keys.open(&sealed, &index_aad(id)).is_some() {
            continue;
        }
        let plain = keys
            .open(&sealed, LEGACY_INDEX_AAD)
            .ok_or_else(|| BackupError::corrupt(&o.key, "fails authentication"))?;
        store.put(&o.key, &keys.seal(&plain, &index_aad(id)))?;
    }
    Ok(())
}

/// Format 3 upgrade: generation 1 (or the next) of each pool's catalog lists every header
/// of that pool stored now.
fn write_first_catalogs(repo: &Repository) -> Result<()> {
    let (headers, bad) = crate::manifest::list(repo)?;
    if let Some((id, e)) = bad.first() {
        return Err(BackupError::invalid(
            "repo upgrade",
            format!(
                "manifest {id} cannot be read ({e}); run `snapblk repo repair` or delete it first"
            ),
        ));
    }
    let mut by_pool: std::collections::BTreeMap<String, Vec<crate::manifest::Header>> =
        Default::default();
    for h in headers {
        by_pool.entry(h.pool.clone()).or_default().push(h);
    }
    for (pool, hs) in by_pool {
        crate::catalog::update(repo, &pool, crate::catalog::Change::Merge(&hs))?;
    }
    Ok(())
}
