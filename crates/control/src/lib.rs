//! snapblk-control: the daemon's control-socket protocol, shared by the CLI (client) and
//! the daemon (server), and fuzzed (fuzz/fuzz_targets/control.rs).
//!
//! Wire format: one JSON [`Command`] per line in; zero or more progress lines and then one
//! JSON reply per line out: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
//! Lines longer than [`MAX_LINE`] end the connection after an error reply. Nothing a client
//! sends can panic the server: bad UTF-8, bad JSON, unknown commands and fields, and
//! oversized lines all get an error reply.
//!
//! Threading: [`serve_lines`] runs on the connection's thread and calls `exec` there.

use std::io::{BufRead, Read, Write};

pub mod human;
pub mod reply;
pub use reply::Reply;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Longest request line accepted.
pub const MAX_LINE: u64 = 64 << 10;

/// Key material; never printed (Debug is redacted) and never part of any output.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }
    /// The secret in clear, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Everything needed to open a repository; travels to the daemon over the control socket
/// (mode 0600) for backup and restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoSpec {
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub secret: Secret,
    /// S3 credentials the CLI resolved (access key id, secret key, session token), so the
    /// daemon acts with the invoking user's credentials. Absent: the daemon's own chain.
    #[serde(default)]
    pub credentials: Option<(String, Secret, Option<Secret>)>,
    /// Instead of `credentials` when the CLI's credentials expire: the profile name and
    /// the config and credentials files its environment named, for the daemon's own
    /// (refreshing) credential chain.
    #[serde(default)]
    pub profile: Option<(String, Option<String>, Option<String>)>,
    /// Seconds one S3 request attempt may take before it is abandoned and retried.
    #[serde(default = "default_s3_timeout")]
    pub s3_timeout: u64,
    /// Attempts per S3 request, the first included (transient errors back off and retry).
    #[serde(default = "default_s3_attempts")]
    pub s3_attempts: u32,
    /// Slowest accepted transfer rate in KiB/s: an attempt moving N bytes may take
    /// `s3_timeout` plus N at this rate.
    #[serde(default = "default_s3_min_rate")]
    pub s3_min_rate: u64,
    /// Upload rate limit in bytes per second (none: as fast as the link goes).
    #[serde(default)]
    pub limit_upload: Option<u64>,
    /// Threads: snapshot readers, pack uploaders, ranged downloads (none: the defaults;
    /// the receiver clamps each to its limits).
    #[serde(default)]
    pub readers: Option<u32>,
    #[serde(default)]
    pub uploaders: Option<u32>,
    #[serde(default)]
    pub downloads: Option<u32>,
}

pub fn default_s3_timeout() -> u64 {
    60
}

pub fn default_s3_min_rate() -> u64 {
    32
}

pub fn default_s3_attempts() -> u32 {
    5
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    PoolInfo,
    PoolCheck,
    PoolScrub,
    PoolCompact,
    VolumeCreate {
        name: String,
        size: u64,
    },
    VolumeList,
    VolumeInfo {
        name: String,
    },
    VolumeResize {
        name: String,
        size: u64,
        force: bool,
    },
    VolumeRename {
        old: String,
        new: String,
    },
    VolumeDelete {
        name: String,
        recursive: bool,
    },
    /// Sets the default volume (the empty NBD export name); `name: None` with `clear`
    /// clears it, with neither shows it.
    VolumeSetDefault {
        name: Option<String>,
        #[serde(default)]
        clear: bool,
    },
    SnapshotCreate {
        snapshot: String,
        /// `snapshot` is GROUP@NAME: snapshot every member as one cut.
        #[serde(default)]
        group: bool,
    },
    SnapshotList {
        volume: Option<String>,
    },
    SnapshotInfo {
        snapshot: String,
    },
    SnapshotDelete {
        snapshot: String,
    },
    /// Backups in the repository at `url` were removed outside the daemon's jobs (`backup
    /// forget` / `prune` by hand): the jobs' records of what it holds are checked again.
    BackupsChanged {
        url: String,
    },
    /// Protects a snapshot from deletion (`protect: false` lifts it).
    SnapshotProtect {
        snapshot: String,
        protect: bool,
    },
    /// Sets (`Some`) or removes (`None`) the bytes a volume and its snapshots may hold.
    VolumeSetQuota {
        name: String,
        quota: Option<u64>,
    },
    /// The pool space guard: shown when nothing is given, set by `min_free` (percent,
    /// with an optional `target_free`), turned off by `off`.
    SpaceGuard {
        #[serde(default)]
        min_free: Option<f64>,
        #[serde(default)]
        target_free: Option<f64>,
        #[serde(default)]
        off: bool,
    },
    Clone {
        snapshot: String,
        name: String,
    },
    Rollback {
        snapshot: String,
    },
    Diff {
        from: String,
        to: String,
    },
    Attach {
        target: String,
        read_only: bool,
        queues: u16,
        depth: u16,
    },
    Detach {
        what: String,
    },
    List,
    Backup {
        snapshot: String,
        repo: RepoSpec,
        full: bool,
    },
    Restore {
        repo: RepoSpec,
        backup: String,
        name: String,
        #[serde(default)]
        lazy: bool,
        /// Pool uuid or host whose backup to restore (default: this pool's, else the one
        /// pool that has it).
        #[serde(default)]
        from: Option<String>,
    },
    RestoreStatus,
    /// Stops the lazy restore of `volume` (then deletable, or resumable).
    RestoreCancel {
        volume: String,
    },
    /// Creates or replaces a protection policy (`policy`: snapblk_policy::Policy as JSON).
    PolicySet {
        name: String,
        policy: Value,
    },
    PolicyList,
    PolicyShow {
        name: String,
    },
    PolicyDelete {
        name: String,
    },
    /// What the policy's retention keeps and deletes now (changes nothing).
    PolicyPlan {
        name: String,
    },
    Jobs,
    JobRun {
        name: String,
    },
    /// Registers or replaces a repository for scheduled jobs (`repo`:
    /// snapblk_policy::RepoTarget as JSON).
    RepoSet {
        name: String,
        repo: Value,
    },
    RepoList,
    /// Sets where notifications go (`Some("")` clears one; `None` leaves it).
    NotifySet {
        #[serde(default)]
        webhook: Option<String>,
        #[serde(default)]
        command: Option<String>,
    },
    NotifyShow,
    /// Sends a test event now.
    NotifyTest,
    /// The 3-2-1 report of every volume (or one).
    Status {
        #[serde(default)]
        volume: Option<String>,
    },
    RepoDelete {
        name: String,
    },
    /// Adds or replaces one backup target of a policy (`rule`: snapblk_policy::BackupRule).
    PolicyBackupSet {
        policy: String,
        rule: Value,
    },
    PolicyBackupDelete {
        policy: String,
        repository: String,
    },
    /// Creates or replaces a consistency group.
    GroupSet {
        name: String,
        volumes: Vec<String>,
    },
    GroupList,
    GroupDelete {
        name: String,
    },
}

impl Command {
    /// The command's wire name (`volume_create`, ...), for messages.
    pub fn name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("cmd").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default()
    }
}

/// One request read from a connection.
#[derive(Debug)]
pub enum Request {
    Command(Box<Command>),
    /// A line that is not a command: the reply names what was wrong.
    Bad(String),
    /// A line over [`MAX_LINE`]: replied to, then the connection ends.
    TooLong,
}

/// Reads the next request line; `None` at the end of the stream (or on a read error).
pub fn read_request(r: &mut impl BufRead) -> Option<Request> {
    let mut line = Vec::new();
    match r.take(MAX_LINE).read_until(b'\n', &mut line) {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    if !line.ends_with(b"\n") && line.len() as u64 >= MAX_LINE {
        return Some(Request::TooLong);
    }
    let Ok(text) = std::str::from_utf8(&line) else {
        return Some(Request::Bad("bad request: not UTF-8".into()));
    };
    Some(match serde_json::from_str::<Command>(text.trim()) {
        Ok(c) => Request::Command(Box::new(c)),
        Err(e) => Request::Bad(format!("bad request: {e}")),
    })
}

/// What kind of failure a command met: the CLI's exit code says it (README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    Exists,
    /// Busy: in use by an export, a restore, a running job.
    InUse,
    Invalid,
    Other,
}

/// A failed command: its message and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    pub kind: ErrorKind,
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure {
            message,
            kind: ErrorKind::Other,
        }
    }
}

/// The reply line for a command's outcome.
pub fn reply(outcome: Result<Value, Failure>) -> Value {
    match outcome {
        Ok(v) => json!({ "ok": true, "result": v }),
        Err(f) => json!({ "ok": false, "error": f.message, "kind": f.kind }),
    }
}

/// Serves one connection: every request line gets exactly one reply line; `exec` runs the
/// commands. Returns when the client closes, a line is too long, or a write fails.
pub fn serve_lines(
    r: &mut impl BufRead,
    w: &mut impl Write,
    mut exec: impl FnMut(&Command) -> Result<Value, Failure>,
) {
    while let Some(req) = read_request(r) {
        let (v, last) = match req {
            Request::Command(c) => (reply(exec(&c)), false),
            Request::Bad(e) => (
                reply(Err(Failure {
                    message: e,
                    kind: ErrorKind::Invalid,
                })),
                false,
            ),
            Request::TooLong => (
                reply(Err(Failure {
                    message: "request line too long".into(),
                    kind: ErrorKind::Invalid,
                })),
                true,
            ),
        };
        if writeln!(w, "{v}").is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> Vec<Value> {
        let mut out = Vec::new();
        serve_lines(&mut &input[..], &mut out, |c| {
            serde_json::to_value(c).map_err(|e| Failure::from(e.to_string()))
        });
        String::from_utf8(out)
            .expect("replies are UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("replies are JSON"))
            .collect()
    }

    #[test]
    fn one_reply_per_line_and_errors_name_the_problem() {
        let r = run(b"{\"cmd\":\"pool_info\"}\nnot json\n{\"cmd\":\"launch\"}\n\xff\xfe\n");
        assert_eq!(r.len(), 4);
        assert_eq!(r[0]["ok"], true);
        assert!(r[1]["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("bad request"));
        assert!(r[2]["error"]
            .as_str()
            .unwrap_or("")
            .contains("unknown variant"));
        assert!(r[3]["error"].as_str().unwrap_or("").contains("UTF-8"));
    }

    #[test]
    fn an_overlong_line_ends_the_connection() {
        let mut input = vec![b' '; MAX_LINE as usize + 10];
        input.extend_from_slice(b"\n{\"cmd\":\"pool_info\"}\n");
        let r = run(&input);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["error"], "request line too long");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s = Secret::new("topsecret".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
    }
}
