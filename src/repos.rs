//! Backup targets named on the command line: the key material and S3 options for them
//! (opening the repository: crates/daemon repos.rs).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use snapblk_control::{
    default_s3_attempts, default_s3_min_rate, default_s3_timeout, RepoSpec, Secret,
};
use snapblk_daemon::repos::{parse_target, Target};

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
                    let b = snapblk_control::human::parse_size(r)
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
