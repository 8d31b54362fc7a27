//! Backup targets named on the command line: `s3://bucket/prefix` or `file:///path`, the
//! key material for them, and opening the repository there.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use snapblk_backup::cache::ObjectCache;
use snapblk_backup::file::FileStore;
use snapblk_backup::marks::Marks;
use snapblk_backup::repo::{InitOptions, Parallelism};
use snapblk_backup::{ObjectStore, Repository};
use snapblk_control::{
    default_s3_attempts, default_s3_min_rate, default_s3_timeout, RepoSpec, Secret,
};
use snapblk_s3::{S3Options, S3Store};

/// Command-line options naming a repository's key and S3 endpoint.
#[derive(clap::Args, Debug, Clone)]
pub struct RepoArgs {
    /// File whose whole contents are the repository key (e.g. 32 random bytes).
    #[arg(long, env = "SNAPBLK_KEY_FILE", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// File holding a passphrase (first line). Or set SNAPBLK_PASSPHRASE.
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
    /// S3-compatible endpoint URL (MinIO, Garage, Ceph RGW, ...); implies path-style.
    #[arg(long, env = "SNAPBLK_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    /// S3 region (default: the AWS configuration's, else us-east-1).
    #[arg(long, env = "SNAPBLK_S3_REGION")]
    pub region: Option<String>,
    /// Seconds one S3 request attempt may take before it is retried.
    #[arg(long, env = "SNAPBLK_S3_TIMEOUT", default_value_t = default_s3_timeout(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub s3_timeout: u64,
    /// Attempts per S3 request, the first included; transient errors (5xx, throttling,
    /// dropped connections, timeouts) back off and retry.
    #[arg(long, env = "SNAPBLK_S3_ATTEMPTS", default_value_t = default_s3_attempts(),
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub s3_attempts: u32,
    /// Slowest transfer rate (KiB/s) an upload or download may run at: each attempt gets
    /// --s3-timeout plus the time its bytes take at this rate (a slow link finishes large
    /// packs; a dead one still fails).
    #[arg(long, env = "SNAPBLK_S3_MIN_RATE", default_value_t = default_s3_min_rate(),
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub s3_min_rate: u64,
    /// Average upload rate limit per job, in bytes per second with binary units (`4M` =
    /// 4 MiB/s), as restic and PBS have.
    #[arg(long, env = "SNAPBLK_LIMIT_UPLOAD", value_name = "RATE")]
    pub limit_upload: Option<String>,
    /// Backup: threads reading the snapshot, each one 64 KiB cell at a time (default 2;
    /// more keep a deep queue on the data disk).
    #[arg(long, env = "SNAPBLK_READERS", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub readers: Option<u32>,
    /// Backup: packs uploaded at once (default 4).
    #[arg(long, env = "SNAPBLK_UPLOADERS", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub uploaders: Option<u32>,
    /// Restore, lazy restore and verify --read-data: ranged GETs at once (default 8).
    #[arg(long, env = "SNAPBLK_DOWNLOADS", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub downloads: Option<u32>,
}

impl RepoArgs {
    pub fn spec(&self, url: &str) -> Result<RepoSpec> {
        let secret: Vec<u8> = if let Some(p) = &self.key_file {
            std::fs::read(p).with_context(|| format!("reading key file {}", p.display()))?
        } else if let Some(p) = &self.passphrase_file {
            let s = std::fs::read_to_string(p)
                .with_context(|| format!("reading passphrase file {}", p.display()))?;
            s.lines().next().unwrap_or("").as_bytes().to_vec()
        } else if let Ok(p) = std::env::var("SNAPBLK_PASSPHRASE") {
            p.into_bytes()
        } else {
            bail!("no repository key: give --key-file FILE or --passphrase-file FILE, or set SNAPBLK_PASSPHRASE");
        };
        if secret.is_empty() {
            bail!("the repository key is empty");
        }
        // Credentials that never expire travel as they are; expiring ones (a
        // credential_process, an assumed role, ...) as the profile that yields them, so
        // whoever runs the job fetches them again before they expire.
        let (credentials, profile) = match parse_target(url, self.endpoint.as_deref())? {
            Target::S3(_) => match snapblk_s3::resolve_credentials() {
                Some(r) if r.expires => {
                    let p = snapblk_s3::ProfileSource::from_env();
                    let path = |f: Option<PathBuf>| f.map(|f| f.display().to_string());
                    (
                        None,
                        Some((p.name, path(p.config_file), path(p.credentials_file))),
                    )
                }
                Some(r) => (
                    Some((
                        r.credentials.access_key_id,
                        Secret::new(r.credentials.secret_access_key),
                        r.credentials.session_token.map(Secret::new),
                    )),
                    None,
                ),
                None => (None, None),
            },
            Target::File(_) => (None, None),
        };
        Ok(RepoSpec {
            url: url.to_string(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            secret: Secret::new(hex::encode(secret)),
            credentials,
            profile,
            s3_timeout: self.s3_timeout,
            s3_attempts: self.s3_attempts,
            s3_min_rate: self.s3_min_rate,
            limit_upload: match &self.limit_upload {
                Some(r) => {
                    let b = crate::human::parse_size(r)
                        .with_context(|| format!("--limit-upload {r}"))?;
                    if b == 0 {
                        bail!("--limit-upload must be above 0");
                    }
                    Some(b)
                }
                None => None,
            },
            readers: self.readers,
            uploaders: self.uploaders,
            downloads: self.downloads,
        })
    }
}

/// The spec's thread counts over the defaults (clamped by the repository).
fn parallelism(spec: &RepoSpec) -> Parallelism {
    let d = Parallelism::default();
    let n = |v: Option<u32>, d: usize| v.map_or(d, |v| v as usize);
    Parallelism {
        readers: n(spec.readers, d.readers),
        uploaders: n(spec.uploaders, d.uploaders),
        downloads: n(spec.downloads, d.downloads),
    }
}

enum Target {
    File(PathBuf),
    S3(Box<S3Options>),
}

fn parse_target(url: &str, endpoint: Option<&str>) -> Result<Target> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!("{url:?}: a file:// target needs an absolute path (file:///backups/x)");
        }
        return Ok(Target::File(PathBuf::from(path)));
    }
    if url.starts_with("s3://") {
        let mut o = S3Options::from_url(url).map_err(anyhow::Error::msg)?;
        o.endpoint = endpoint.map(str::to_string);
        return Ok(Target::S3(Box::new(o)));
    }
    bail!("{url:?} is not a backup target: use s3://BUCKET/PREFIX or file:///PATH")
}

/// Opening the repository a [`RepoSpec`] names (the spec itself is protocol data:
/// crates/control).
pub trait RepoOpen {
    fn store(&self, create_bucket: bool) -> Result<Arc<dyn ObjectStore>>;
    fn open(&self) -> Result<Repository>;
    fn init(&self, opts: &InitOptions) -> Result<Repository>;
    fn upgrade(&self) -> Result<Repository>;
}

/// Lease lifetime: `SNAPBLK_LEASE_TTL` seconds (for tests), else the default (30 min).
fn lease_ttl() -> u64 {
    std::env::var("SNAPBLK_LEASE_TTL")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| (6..=86_400).contains(v))
        .unwrap_or(snapblk_backup::lease::DEFAULT_TTL)
}

/// This host's cache of immutable repository objects (`<state dir>/cache`).
fn cache() -> Option<ObjectCache> {
    snapblk_backup::marks::state_dir().map(|d| ObjectCache::new(d.join("cache")))
}

/// This host's catalog high-water marks (docs/design.md §12 "Catalogs").
fn marks() -> Option<Marks> {
    let m = Marks::default_dir().map(Marks::new);
    if m.is_none() {
        log::warn!("no state directory (set SNAPBLK_STATE_DIR or HOME): a rolled-back repository would go unnoticed");
    }
    m
}

fn key_bytes(s: &Secret) -> Result<Vec<u8>> {
    hex::decode(s.expose()).context("malformed key material")
}

impl RepoOpen for RepoSpec {
    fn store(&self, create_bucket: bool) -> Result<Arc<dyn ObjectStore>> {
        Ok(match parse_target(&self.url, self.endpoint.as_deref())? {
            Target::File(p) => Arc::new(FileStore::new(p)),
            Target::S3(mut o) => {
                o.region = self.region.clone();
                o.credentials = self.credentials.as_ref().map(|(id, key, token)| {
                    snapblk_s3::StaticCredentials {
                        access_key_id: id.clone(),
                        secret_access_key: key.expose().to_string(),
                        session_token: token.as_ref().map(|t| t.expose().to_string()),
                    }
                });
                o.profile =
                    self.profile
                        .as_ref()
                        .map(|(name, config, creds)| snapblk_s3::ProfileSource {
                            name: name.clone(),
                            config_file: config.as_ref().map(PathBuf::from),
                            credentials_file: creds.as_ref().map(PathBuf::from),
                        });
                o.attempt_timeout = Duration::from_secs(self.s3_timeout.max(1));
                o.max_attempts = self.s3_attempts.max(1);
                o.min_rate = self.s3_min_rate.max(1) << 10;
                let s = S3Store::new(*o)?;
                if create_bucket {
                    s.ensure_bucket()?;
                }
                Arc::new(s)
            }
        })
    }

    fn open(&self) -> Result<Repository> {
        Ok(
            Repository::open(self.store(false)?, &key_bytes(&self.secret)?)?
                .with_marks(marks())
                .with_cache(cache())
                .with_upload_limit(self.limit_upload)
                .with_parallelism(parallelism(self))
                .with_lease_ttl(lease_ttl()),
        )
    }

    fn upgrade(&self) -> Result<Repository> {
        Ok(
            Repository::upgrade(self.store(false)?, &key_bytes(&self.secret)?)?
                .with_marks(marks())
                .with_cache(cache())
                .with_upload_limit(self.limit_upload)
                .with_parallelism(parallelism(self))
                .with_lease_ttl(lease_ttl()),
        )
    }

    fn init(&self, opts: &InitOptions) -> Result<Repository> {
        Ok(
            Repository::init(self.store(true)?, &key_bytes(&self.secret)?, opts)?
                .with_marks(marks()),
        )
    }
}

/// The spec of a repository registered with the daemon (`snapblk repo add`): its key is
/// read from the file it names now, at each job; S3 credentials come from the daemon's own
/// (refreshing) provider chain.
pub fn registered_spec(t: &snapblk_policy::RepoTarget) -> Result<RepoSpec> {
    let secret: Vec<u8> = match (&t.key_file, &t.passphrase_file) {
        (Some(p), _) => std::fs::read(p).with_context(|| format!("reading key file {p}"))?,
        (None, Some(p)) => {
            let s = std::fs::read_to_string(p)
                .with_context(|| format!("reading passphrase file {p}"))?;
            s.lines().next().unwrap_or("").as_bytes().to_vec()
        }
        (None, None) => bail!("no key file or passphrase file registered"),
    };
    if secret.is_empty() {
        bail!("the repository key is empty");
    }
    Ok(RepoSpec {
        url: t.url.clone(),
        endpoint: t.endpoint.clone(),
        region: t.region.clone(),
        secret: Secret::new(hex::encode(secret)),
        credentials: None,
        profile: None,
        s3_timeout: default_s3_timeout(),
        s3_attempts: default_s3_attempts(),
        s3_min_rate: default_s3_min_rate(),
        limit_upload: None,
        readers: None,
        uploaders: None,
        downloads: None,
    })
}
