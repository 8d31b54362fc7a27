//! Backup targets (`s3://bucket/prefix` or `file:///path`): parsing them, and opening the
//! repository a [`RepoSpec`] (from the command line) or a registered target names.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use snapblk_backup::cache::ObjectCache;
use snapblk_backup::file::FileStore;
use snapblk_backup::marks::Marks;
use snapblk_backup::repo::{InitOptions, Parallelism};
use snapblk_backup::{ObjectStore, Repository};
use snapblk_control::{
    default_s3_attempts, default_s3_min_rate, default_s3_timeout, RepoSpec, Secret,
};
use snapblk_s3::{S3Options, S3Store};

use crate::error::{DaemonError, Result};

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

/// Where a backup target URL points.
pub enum Target {
    File(PathBuf),
    S3(Box<S3Options>),
}

/// Parses `file:///PATH` or `s3://BUCKET/PREFIX` (with the S3 endpoint, if any).
pub fn parse_target(url: &str, endpoint: Option<&str>) -> Result<Target> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(DaemonError::Invalid(format!(
                "{url:?}: a file:// target needs an absolute path (file:///backups/x)"
            )));
        }
        return Ok(Target::File(PathBuf::from(path)));
    }
    if url.starts_with("s3://") {
        let mut o = S3Options::from_url(url).map_err(DaemonError::Invalid)?;
        o.endpoint = endpoint.map(str::to_string);
        return Ok(Target::S3(Box::new(o)));
    }
    Err(DaemonError::Invalid(format!(
        "{url:?} is not a backup target: use s3://BUCKET/PREFIX or file:///PATH"
    )))
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
    hex::decode(s.expose())
        .map_err(|e| DaemonError::Invalid(format!("malformed key material: {e}")))
}

/// An opened repository with this host's marks and cache and the spec's job settings.
fn for_jobs(r: Repository, spec: &RepoSpec) -> Repository {
    r.with_marks(marks())
        .with_cache(cache())
        .with_upload_limit(spec.limit_upload)
        .with_parallelism(parallelism(spec))
        .with_lease_ttl(lease_ttl())
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
        let r = Repository::open(self.store(false)?, &key_bytes(&self.secret)?)?;
        Ok(for_jobs(r, self))
    }

    fn upgrade(&self) -> Result<Repository> {
        let r = Repository::upgrade(self.store(false)?, &key_bytes(&self.secret)?)?;
        Ok(for_jobs(r, self))
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
        (Some(p), _) => {
            std::fs::read(p).map_err(DaemonError::io(format!("reading key file {p}")))?
        }
        (None, Some(p)) => {
            let s = std::fs::read_to_string(p)
                .map_err(DaemonError::io(format!("reading passphrase file {p}")))?;
            s.lines().next().unwrap_or("").as_bytes().to_vec()
        }
        (None, None) => {
            return Err(DaemonError::Invalid(format!(
                "repository {}: no key file or passphrase file registered",
                t.url
            )))
        }
    };
    if secret.is_empty() {
        return Err(DaemonError::Invalid(format!(
            "repository {}: the key is empty",
            t.url
        )));
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
