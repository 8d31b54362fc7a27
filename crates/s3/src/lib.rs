//! `s3://bucket/prefix` repositories through aws-sdk-s3: the standard AWS credential chain
//! (environment, profile files, ...), any S3-compatible endpoint (`--endpoint`, which also
//! switches to path-style addressing), bounded retries with backoff for transient errors,
//! and timeouts, so a dead server makes a backup fail instead of hang.
//!
//! Threading: the store owns a small multi-threaded tokio runtime; the synchronous
//! `ObjectStore` methods are called from the backup engine's plain threads and block on
//! it. They must not be called from inside an async context.

use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::Client;
use snapblk_backup::store::MAX_PREALLOC;
use snapblk_backup::{ObjectMeta, ObjectStore, StoreError};

/// Default slowest accepted transfer rate: 32 KiB/s (256 kbit/s per request; with four
/// uploads at once, links from about 1 Mbit/s finish any pack).
pub const DEFAULT_MIN_RATE: u64 = 32 << 10;
/// A whole-object GET's deadline assumes at most this many bytes (bounds are larger).
const GET_DEADLINE_BYTES: u64 = 64 << 20;
/// Read size of a file sent as a body (a spooled pack).
const FILE_BUFFER: usize = 256 << 10;

/// Where and how to reach the store.
#[derive(Debug, Clone)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix inside the bucket ("" or ending in '/').
    pub prefix: String,
    /// S3-compatible endpoint URL (path-style addressing), e.g. http://127.0.0.1:9000.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Attempts per request, including the first.
    pub max_attempts: u32,
    /// Time one attempt may take beyond moving its bytes.
    pub attempt_timeout: Duration,
    /// The slowest transfer rate (bytes/s) still accepted: an attempt moving N bytes may
    /// take `attempt_timeout + N / min_rate` (so a slow link finishes large packs, and a
    /// dead one is still noticed).
    pub min_rate: u64,
    /// Use these credentials instead of this process's credential chain (the daemon runs
    /// backups with the credentials the CLI user resolved). Only for credentials that do
    /// not expire: they are never refreshed.
    pub credentials: Option<StaticCredentials>,
    /// Otherwise: the standard chain reading this profile and these files (what the CLI
    /// user's environment named), so expiring credentials (credential_process, assumed
    /// roles, web identity, instance metadata) are fetched again before they expire.
    pub profile: Option<ProfileSource>,
}

/// The shared-config profile a credential chain reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSource {
    pub name: String,
    pub config_file: Option<std::path::PathBuf>,
    pub credentials_file: Option<std::path::PathBuf>,
}

impl ProfileSource {
    /// The profile this process's environment names: `AWS_PROFILE` (else "default"),
    /// `AWS_CONFIG_FILE` and `AWS_SHARED_CREDENTIALS_FILE` (else under `~/.aws`).
    pub fn from_env() -> ProfileSource {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let home = var("HOME").map(std::path::PathBuf::from);
        ProfileSource {
            name: var("AWS_PROFILE")
                .and_then(|v| v.into_string().ok())
                .unwrap_or_else(|| "default".into()),
            config_file: var("AWS_CONFIG_FILE")
                .map(Into::into)
                .or_else(|| home.as_ref().map(|h| h.join(".aws/config"))),
            credentials_file: var("AWS_SHARED_CREDENTIALS_FILE")
                .map(Into::into)
                .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials"))),
        }
    }
}

/// Credentials resolved by the standard chain, to hand to another process.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticCredentials({}, <redacted>)", self.access_key_id)
    }
}

/// Credentials the chain resolved, and whether they expire.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub credentials: StaticCredentials,
    pub expires: bool,
}

/// Resolves credentials with the standard AWS chain (environment, shared config and
/// credentials files, web identity, container and instance metadata) in this process.
/// `None` when the chain has none.
pub fn resolve_credentials() -> Option<Resolved> {
    use aws_sdk_s3::config::ProvideCredentials;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .load()
            .await;
        let c = conf
            .credentials_provider()?
            .provide_credentials()
            .await
            .ok()?;
        Some(Resolved {
            credentials: StaticCredentials {
                access_key_id: c.access_key_id().to_string(),
                secret_access_key: c.secret_access_key().to_string(),
                session_token: c.session_token().map(str::to_string),
            },
            expires: c.expiry().is_some(),
        })
    })
}

impl S3Options {
    /// Parses `s3://bucket[/prefix]`.
    pub fn from_url(url: &str) -> Result<S3Options, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(format!(
                "{bucket:?} is not a valid bucket name (3-63 lowercase letters, digits, '-', '.')"
            ));
        }
        let prefix = prefix.trim_matches('/');
        Ok(S3Options {
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            endpoint: None,
            region: None,
            max_attempts: 5,
            attempt_timeout: Duration::from_secs(60),
            min_rate: DEFAULT_MIN_RATE,
            credentials: None,
            profile: None,
        })
    }
}

pub struct S3Store {
    rt: tokio::runtime::Runtime,
    client: Client,
    opts: S3Options,
}

fn describe_err<E: std::error::Error + ProvideErrorMetadata + 'static>(e: &SdkError<E>) -> String {
    let status = e.raw_response().map(|r| r.status().as_u16());
    match (e.code(), status) {
        (Some(code), st) => format!(
            "{code}{}: {}",
            st.map(|s| format!(" (HTTP {s})")).unwrap_or_default(),
            e.message().unwrap_or("")
        ),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => match e {
            SdkError::TimeoutError(_) => "timed out".to_string(),
            SdkError::DispatchFailure(d) => {
                // A connector timeout is a deadline, not an unreachable server: the SDK's
                // stalled-stream protection (a body that moved nothing for its grace
                // period) reports through here and races our per-request deadline.
                let timeout = d.as_connector_error().is_some_and(|c| c.is_timeout());
                let mut msg = if timeout {
                    "timed out"
                } else {
                    "cannot reach the server"
                }
                .to_string();
                // The connector error's own text is generic ("io error"); its sources
                // say what happened ("Connection refused").
                let mut src: Option<&dyn std::error::Error> =
                    d.as_connector_error().map(|c| c as &dyn std::error::Error);
                while let Some(s) = src {
                    let t = s.to_string();
                    // (A timeout's own text is just "timeout": said already.)
                    let said = msg.contains(&t) || (timeout && t == "timeout");
                    if !said {
                        msg = format!("{msg}: {t}");
                    }
                    src = s.source();
                }
                msg
            }
            other => aws_sdk_s3::error::DisplayErrorContext(other)
                .to_string()
                .lines()
                .next()
                .unwrap_or("request failed")
                .to_string(),
        },
    }
}

fn status<E>(e: &SdkError<E>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl S3Store {
    pub fn new(opts: S3Options) -> Result<S3Store, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("s3")
            .build()
            .map_err(|e| StoreError::Failed {
                store: format!("s3://{}", opts.bucket),
                op: "connect",
                key: String::new(),
                detail: format!("starting the I/O runtime: {e}"),
            })?;
        let client = rt.block_on(async {
            let region = match &opts.region {
                Some(r) => RegionProviderChain::first_try(Region::new(r.clone())),
                None => RegionProviderChain::first_try(
                    aws_config::environment::EnvironmentVariableRegionProvider::new(),
                )
                .or_else(aws_config::profile::ProfileFileRegionProvider::new())
                .or_else(Region::new("us-east-1")),
            };
            let mut loader = aws_config::defaults(BehaviorVersion::latest())
                .region(region)
                .retry_config(
                    RetryConfig::standard()
                        .with_max_attempts(opts.max_attempts.max(1))
                        .with_initial_backoff(Duration::from_millis(200))
                        .with_max_backoff(Duration::from_secs(5)),
                )
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .operation_attempt_timeout(opts.attempt_timeout)
                        .build(),
                )
                // Uploads: no stalled-stream protection. It fails a body the HTTP client
                // did not poll for its grace period (the SDK's default is 20 s), and on a
                // slow link the client does not poll while the kernel's send buffer
                // (up to 4 MiB) drains: a backup over a slow but moving link failed at
                // random. An upload's deadline is ours (`deadline`: attempt timeout +
                // bytes at --s3-min-rate). Downloads keep it, with the attempt timeout
                // as its grace period: our deadline ends at the response head, and this
                // is what ends a body that stops moving.
                .stalled_stream_protection(
                    aws_sdk_s3::config::StalledStreamProtectionConfig::enabled()
                        .upload_enabled(false)
                        .grace_period(opts.attempt_timeout)
                        .build(),
                );
            if let Some(ep) = &opts.endpoint {
                loader = loader.endpoint_url(ep);
            }
            if let Some(c) = &opts.credentials {
                loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                    c.access_key_id.clone(),
                    c.secret_access_key.clone(),
                    c.session_token.clone(),
                    None,
                    "snapblk-cli",
                ));
            } else if let Some(p) = &opts.profile {
                use aws_runtime::env_config::file::{
                    EnvConfigFileKind as ProfileFileKind, EnvConfigFiles as ProfileFiles,
                };
                let mut files = ProfileFiles::builder();
                // A file that does not exist is no profile source (as the defaults are).
                if let Some(f) = p.config_file.as_ref().filter(|f| f.exists()) {
                    files = files.with_file(ProfileFileKind::Config, f);
                }
                if let Some(f) = p.credentials_file.as_ref().filter(|f| f.exists()) {
                    files = files.with_file(ProfileFileKind::Credentials, f);
                }
                loader = loader.profile_name(&p.name).profile_files(
                    files
                        .include_default_config_file(false)
                        .include_default_credentials_file(false)
                        .build(),
                );
            }
            let conf = loader.load().await;
            let mut b = aws_sdk_s3::config::Builder::from(&conf);
            if opts.endpoint.is_some() {
                // S3-compatible servers: path-style, and the SDK's flexible checksums only
                // where an operation requires them (some servers reject the new headers:
                // awslabs/aws-sdk-rust#1240).
                use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
                b = b
                    .force_path_style(true)
                    .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                    .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
            }
            Client::from_conf(b.build())
        });
        Ok(S3Store { rt, client, opts })
    }

    /// Creates the bucket if it does not exist (for `repo init`).
    pub fn ensure_bucket(&self) -> Result<(), StoreError> {
        self.rt.block_on(async {
            let b = &self.opts.bucket;
            match self.client.head_bucket().bucket(b).send().await {
                Ok(_) => Ok(()),
                Err(e) if status(&e) == Some(404) => self
                    .client
                    .create_bucket()
                    .bucket(b)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.fail("create bucket", b, describe_err(&e))),
                Err(e) => Err(self.fail("head bucket", b, describe_err(&e))),
            }
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.opts.prefix)
    }

    fn fail(&self, op: &'static str, key: &str, detail: String) -> StoreError {
        StoreError::Failed {
            store: self.describe(),
            op,
            key: key.to_string(),
            detail,
        }
    }

    fn not_found(&self, key: &str) -> StoreError {
        StoreError::NotFound {
            store: self.describe(),
            key: key.to_string(),
        }
    }

    fn too_large(&self, key: &str, max: u64) -> StoreError {
        StoreError::TooLarge {
            store: self.describe(),
            key: key.to_string(),
            max,
        }
    }

    /// GETs `key` (or a range of it): at most `max` bytes are accepted, whatever the
    /// server's Content-Length says.
    fn get_impl(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        max: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.get_impl_into(key, range, max, &mut out)?;
        Ok(out)
    }

    /// [`S3Store::get_impl`] into `out` (replacing its contents; its capacity is reused).
    fn get_impl_into(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        max: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        out.clear();
        if range.is_some_and(|(_, len)| len == 0) {
            return Ok(());
        }
        // The SDK retries a request until its response head arrives; a connection that
        // drops while the body streams is retried here, with the same attempt budget.
        let attempts = self.opts.max_attempts.max(1);
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.get_once(key, range, max, out) {
                Err(BodyError(detail)) if attempt < attempts => {
                    log::warn!(
                        "get {key}: {detail}; retrying (attempt {} of {attempts})",
                        attempt + 1
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(BodyError(detail)) => {
                    return Err(self.fail(
                        "get",
                        key,
                        format!("reading the body: {detail} ({attempts} attempts)"),
                    ))
                }
                Ok(r) => return r,
            }
        }
    }

    /// Config for one request moving `bytes`: its attempts may take the attempt timeout
    /// plus the bytes' time at the slowest accepted rate. A download must also start
    /// answering within the attempt timeout (`read_timeout`: time to the first response
    /// byte), so a server that hangs is noticed as fast as before, and the SDK's
    /// stalled-stream protection ends a body that stops moving; an upload's first
    /// response byte comes after its body, so it has the whole deadline (a stalled
    /// upload fails when it passes).
    fn deadline(&self, bytes: u64, download: bool) -> aws_sdk_s3::config::Builder {
        let transfer = Duration::from_secs_f64(bytes as f64 / self.opts.min_rate.max(1) as f64);
        let mut t = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(self.opts.attempt_timeout + transfer);
        if download {
            t = t.read_timeout(self.opts.attempt_timeout);
        }
        aws_sdk_s3::config::Builder::default().timeout_config(t.build())
    }

    /// One GET: `Err(BodyError)` when the body stream broke (retryable), else the outcome.
    fn get_once(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        max: u64,
        v: &mut Vec<u8>,
    ) -> Result<Result<(), StoreError>, BodyError> {
        self.rt.block_on(async {
            let mut req = self
                .client
                .get_object()
                .bucket(&self.opts.bucket)
                .key(self.key(key));
            if let Some((off, len)) = range {
                req = req.range(format!("bytes={off}-{}", off + len - 1));
            }
            let bytes = range.map_or(max.min(GET_DEADLINE_BYTES), |r| r.1);
            match req
                .customize()
                .config_override(self.deadline(bytes, true))
                .send()
                .await
            {
                Ok(out) => {
                    // Copy segment by segment into one buffer (AggregatedBytes::to_vec goes
                    // byte by byte, which dominated restore CPU time).
                    // The declared length is checked, and only trusted up to a bound, before
                    // it sizes the buffer; the bytes that arrive are checked too.
                    let declared = out.content_length().unwrap_or(0).max(0) as u64;
                    if declared > max {
                        return Ok(Err(self.too_large(key, max)));
                    }
                    // (A retried attempt starts again from an empty buffer.)
                    v.clear();
                    // Exactly: `reserve` may double a kept buffer's capacity past what any body
                    // needs (a restore keeps one per download thread).
                    v.reserve_exact(declared.min(MAX_PREALLOC) as usize);
                    let mut body = out.body;
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk.map_err(|e| BodyError(e.to_string()))?;
                        if (v.len() + chunk.len()) as u64 > max {
                            return Ok(Err(self.too_large(key, max)));
                        }
                        v.extend_from_slice(&chunk);
                    }
                    Ok(Ok(()))
                }
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                    Ok(Err(self.not_found(key)))
                }
                Err(e) if status(&e) == Some(404) => Ok(Err(self.not_found(key))),
                Err(e) if status(&e) == Some(416) => {
                    v.clear();
                    Ok(Ok(()))
                }
                Err(e) => Ok(Err(self.fail("get", key, describe_err(&e)))),
            }
        })
    }
}

/// A response body that broke off while streaming.
struct BodyError(String);

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.opts.bucket, self.opts.prefix)
    }

    fn get(&self, key: &str, max: u64) -> Result<Vec<u8>, StoreError> {
        self.get_impl(key, None, max)
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        self.get_impl(key, Some((offset, len)), len)
    }

    fn get_range_into(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.get_impl_into(key, Some((offset, len)), len, out)
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        self.put_owned(key, data.to_vec())
    }

    /// The body is the caller's buffer itself (no copy); the SDK's retries resend it.
    fn put_owned(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let len = data.len() as u64;
        self.rt.block_on(async {
            self.client
                .put_object()
                .bucket(&self.opts.bucket)
                .key(self.key(key))
                .body(ByteStream::from(data))
                .customize()
                .config_override(self.deadline(len, false))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.fail("put", key, describe_err(&e)))
        })
    }

    /// Streams the file (reopened by the SDK for a retry): the pack is never in memory.
    fn put_file(&self, key: &str, path: &std::path::Path, len: u64) -> Result<(), StoreError> {
        self.rt.block_on(async {
            let body = ByteStream::read_from()
                .path(path)
                .length(Length::Exact(len))
                .buffer_size(FILE_BUFFER)
                .build()
                .await
                .map_err(|e| self.fail("put", key, format!("reading {}: {e}", path.display())))?;
            self.client
                .put_object()
                .bucket(&self.opts.bucket)
                .key(self.key(key))
                .content_length(len as i64)
                .body(body)
                .customize()
                .config_override(self.deadline(len, false))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.fail("put", key, describe_err(&e)))
        })
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool, StoreError> {
        self.rt.block_on(async {
            match self
                .client
                .put_object()
                .bucket(&self.opts.bucket)
                .key(self.key(key))
                .body(ByteStream::from(data.to_vec()))
                .if_none_match("*")
                .customize()
                .config_override(self.deadline(data.len() as u64, false))
                .send()
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if status(&e) == Some(412) || e.code() == Some("PreconditionFailed") => {
                    Ok(false)
                }
                Err(e) => Err(self.fail("put", key, describe_err(&e))),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.list_impl(prefix, None)
    }

    fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.list_impl(prefix, Some(after))
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.rt.block_on(async {
            match self
                .client
                .head_object()
                .bucket(&self.opts.bucket)
                .key(self.key(key))
                .send()
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if status(&e) == Some(404) => Ok(false),
                Err(e) => Err(self.fail("head", key, describe_err(&e))),
            }
        })
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.rt.block_on(async {
            self.client
                .delete_object()
                .bucket(&self.opts.bucket)
                .key(self.key(key))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.fail("delete", key, describe_err(&e)))
        })
    }
}

impl S3Store {
    /// Every object under `prefix` (after `after`, if given: S3 lists in key order, so
    /// `StartAfter` skips what sorts before without sending it).
    fn list_impl(&self, prefix: &str, after: Option<&str>) -> Result<Vec<ObjectMeta>, StoreError> {
        self.rt.block_on(async {
            let full = self.key(prefix);
            let mut out = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.opts.bucket)
                .prefix(&full)
                .set_start_after(after.map(|a| self.key(a)))
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.fail("list", prefix, describe_err(&e)))?;
                for o in page.contents() {
                    let Some(k) = o.key().and_then(|k| k.strip_prefix(&self.opts.prefix)) else {
                        continue;
                    };
                    out.push(ObjectMeta {
                        key: k.to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        modified: o.last_modified().map_or(0, |t| t.secs().max(0) as u64),
                    });
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::S3Options;

    #[test]
    fn a_connector_timeout_says_timed_out() {
        use aws_sdk_s3::error::{ConnectorError, SdkError};
        use aws_sdk_s3::operation::put_object::PutObjectError;
        let stalled: SdkError<PutObjectError> =
            SdkError::dispatch_failure(ConnectorError::timeout(
                "minimum throughput was specified at 1 B/s, but throughput of 0 B/s was observed"
                    .into(),
            ));
        let msg = super::describe_err(&stalled);
        assert!(msg.starts_with("timed out: minimum throughput"), "{msg}");
        assert!(msg.contains("throughput of 0 B/s"), "{msg}");
        let refused: SdkError<PutObjectError> = SdkError::dispatch_failure(ConnectorError::io(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
        ));
        assert!(super::describe_err(&refused).starts_with("cannot reach the server"));
    }

    #[test]
    fn urls() {
        let o = S3Options::from_url("s3://my-bucket/a/b/").unwrap();
        assert_eq!(
            (o.bucket.as_str(), o.prefix.as_str()),
            ("my-bucket", "a/b/")
        );
        assert_eq!(S3Options::from_url("s3://bkt").unwrap().prefix, "");
        assert!(S3Options::from_url("s3://B").is_err());
        assert!(S3Options::from_url("file:///x").is_err());
    }
}
