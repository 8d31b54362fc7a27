//! Typed replies: what each [`Command`] answers with.
//!
//! The daemon builds a [`Reply`] and sends its JSON (the variant's own value, no tag: the
//! `--json` output is exactly that value); the CLI parses the reply its command expects
//! ([`Reply::parse`]) and renders it per type. A field renamed in a result type changes
//! both ends at once and breaks the renderer's build, never the output silently. The
//! `--json` field lists in docs/json.md are these types.
//!
//! Invariant: for every command, `Reply::parse(cmd, reply.to_value())` gives back the
//! variant the daemon built: crates/control/tests/json_doc.rs parses a sample of every
//! reply type (and ones without the fields types skip when empty) and serializes it back;
//! the e2e tests run every command through a live daemon and the CLI.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use snapblk_backup::lazy::RestoreStatus;
use snapblk_core::pool::diff::DiffRange;
use snapblk_core::pool::scrub::ScrubReport;
use snapblk_core::pool::PoolInfo;
use snapblk_core::pool::{SnapshotInfo, VolumeInfo};
use snapblk_core::v2::check::Report as CheckReport;
use snapblk_policy::{
    Candidate, Compliance, GuardConfig, JobInfo, Policy, RepoTarget, RunRecord, VolumePlan,
    VolumeStatus,
};

use crate::Command;

/// `volume resize`: the volume, and each attached ublk device's new size (or why not).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resized {
    #[serde(flatten)]
    pub volume: VolumeInfo,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceResized>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceResized {
    pub path: String,
    pub resized: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `snapshot create` (and `snapshot info`/`protect`, without the time).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(flatten)]
    pub snapshot: SnapshotInfo,
    /// Microseconds the daemon took to create it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_micros: Option<u64>,
}

/// `snapshot create --group`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSnapshot {
    pub group: String,
    pub snapshots: Vec<SnapshotInfo>,
    pub create_micros: u64,
}

/// A consistency group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub volumes: Vec<String>,
}

/// `group set` (same shape, named `group`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSet {
    pub group: String,
    pub volumes: Vec<String>,
}

/// Whatever `delete` removed (volume, snapshot, group, policy, repository).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: String,
}

/// `volume set-default`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DefaultVolume {
    pub default_volume: Option<String>,
}

/// `diff`: byte ranges whose contents may differ.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Diff {
    pub from: String,
    pub to: String,
    pub changed_bytes: u64,
    pub ranges: Vec<DiffRange>,
}

/// A ublk device (`attach`, `detach`, `list`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Device {
    pub id: i32,
    pub path: String,
    pub export: String,
    pub read_only: bool,
    /// Requests served on the queue threads, through the volume API, and failed.
    pub requests_direct: u64,
    pub requests_via_api: u64,
    pub requests_failed: u64,
}

/// `restore --cancel`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cancelled {
    pub cancelled: String,
}

/// A policy by name (`policy set`, `policy list`, `policy backup-to`); `policy` is absent
/// only if it was deleted meanwhile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedPolicy {
    pub name: String,
    pub policy: Option<Policy>,
}

/// `policy show`: the policy and its jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyDetail {
    pub name: String,
    pub policy: Policy,
    pub jobs: Vec<JobInfo>,
}

/// A registered repository by name (`repo set`, `repo list`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedRepo {
    pub name: String,
    pub repository: Option<RepoTarget>,
}

/// `status`: the 3-2-1 verdict of each volume and the worst of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Protection {
    pub verdict: Compliance,
    /// The CLI's exit status for `verdict` (0 compliant, 1 at risk, 2 violated).
    pub exit_code: u8,
    pub volumes: Vec<VolumeStatus>,
}

/// Where alerts go (`notify set`/`show`; stored as the pool's `notify` record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

impl NotifyConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(w) = &self.webhook {
            if !(w.starts_with("http://") || w.starts_with("https://")) || w.len() > 2048 {
                return Err(format!(
                    "webhook {w:?}: an http:// or https:// URL, at most 2048 bytes"
                ));
            }
        }
        if let Some(c) = &self.command {
            if c.is_empty() || c.len() > 4096 || c.contains('\0') {
                return Err("the command is empty, longer than 4096 bytes or holds a NUL".into());
            }
        }
        Ok(())
    }
}

/// `notify test`: the event delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotifyTested {
    pub delivered: Value,
}

/// `pool guard`: the space guard's settings and the pool's free space.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpaceGuard {
    pub guard: Option<GuardConfig>,
    pub free: u64,
    pub capacity: u64,
    pub free_percent: f64,
    /// What the guard would delete next, oldest first.
    pub deletable: Vec<Candidate>,
}

/// `backup changed` (a hint that backups changed by hand): jobs whose records moved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupsChanged {
    pub repositories: Vec<String>,
    pub jobs_updated: Vec<String>,
}

/// The result of a command, by type.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Pool(PoolInfo),
    Check(CheckReport),
    Scrub(ScrubReport),
    Volume(VolumeInfo),
    Resized(Resized),
    Volumes(Vec<VolumeInfo>),
    DefaultVolume(DefaultVolume),
    Deleted(Deleted),
    Snapshot(Snapshot),
    GroupSnapshot(GroupSnapshot),
    Snapshots(Vec<SnapshotInfo>),
    GroupSet(GroupSet),
    Groups(Vec<Group>),
    Diff(Diff),
    Device(Device),
    Devices(Vec<Device>),
    Backup(snapblk_backup::backup::Summary),
    Restore(snapblk_backup::restore::Summary),
    Restoring(RestoreStatus),
    Restores(Vec<RestoreStatus>),
    Cancelled(Cancelled),
    Policy(NamedPolicy),
    Policies(Vec<NamedPolicy>),
    PolicyDetail(PolicyDetail),
    Plan(Vec<VolumePlan>),
    Jobs(Vec<JobInfo>),
    Run(RunRecord),
    Repo(NamedRepo),
    Repos(Vec<NamedRepo>),
    Protection(Protection),
    Notify(NotifyConfig),
    NotifyTested(NotifyTested),
    SpaceGuard(SpaceGuard),
    BackupsChanged(BackupsChanged),
}

impl Reply {
    /// The reply's JSON: what goes over the socket and what `--json` prints.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Reads the reply to `cmd` from its JSON; an error names the command and the field.
    pub fn parse(cmd: &Command, v: Value) -> Result<Reply, String> {
        fn as_<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, serde_json::Error> {
            serde_json::from_value(v)
        }
        use Command as C;
        let r = match cmd {
            C::PoolInfo | C::PoolCompact => as_(v).map(Reply::Pool),
            C::PoolCheck => as_(v).map(Reply::Check),
            C::PoolScrub => as_(v).map(Reply::Scrub),
            C::VolumeCreate { .. }
            | C::VolumeInfo { .. }
            | C::VolumeRename { .. }
            | C::VolumeSetQuota { .. }
            | C::Clone { .. }
            | C::Rollback { .. } => as_(v).map(Reply::Volume),
            C::VolumeResize { .. } => as_(v).map(Reply::Resized),
            C::VolumeList => as_(v).map(Reply::Volumes),
            C::VolumeSetDefault { .. } => as_(v).map(Reply::DefaultVolume),
            C::VolumeDelete { .. }
            | C::SnapshotDelete { .. }
            | C::GroupDelete { .. }
            | C::PolicyDelete { .. }
            | C::RepoDelete { .. } => as_(v).map(Reply::Deleted),
            C::SnapshotCreate { group: true, .. } => as_(v).map(Reply::GroupSnapshot),
            C::SnapshotCreate { .. } | C::SnapshotInfo { .. } | C::SnapshotProtect { .. } => {
                as_(v).map(Reply::Snapshot)
            }
            C::SnapshotList { .. } => as_(v).map(Reply::Snapshots),
            C::GroupSet { .. } => as_(v).map(Reply::GroupSet),
            C::GroupList => as_(v).map(Reply::Groups),
            C::Diff { .. } => as_(v).map(Reply::Diff),
            C::Attach { .. } | C::Detach { .. } => as_(v).map(Reply::Device),
            C::List => as_(v).map(Reply::Devices),
            C::Backup { .. } => as_(v).map(Reply::Backup),
            C::Restore { lazy: true, .. } => as_(v).map(Reply::Restoring),
            C::Restore { .. } => as_(v).map(Reply::Restore),
            C::RestoreStatus => as_(v).map(Reply::Restores),
            C::RestoreCancel { .. } => as_(v).map(Reply::Cancelled),
            C::PolicySet { .. } | C::PolicyBackupSet { .. } | C::PolicyBackupDelete { .. } => {
                as_(v).map(Reply::Policy)
            }
            C::PolicyList => as_(v).map(Reply::Policies),
            C::PolicyShow { .. } => as_(v).map(Reply::PolicyDetail),
            C::PolicyPlan { .. } => as_(v).map(Reply::Plan),
            C::Jobs => as_(v).map(Reply::Jobs),
            C::JobRun { .. } => as_(v).map(Reply::Run),
            C::RepoSet { .. } => as_(v).map(Reply::Repo),
            C::RepoList => as_(v).map(Reply::Repos),
            C::Status { .. } => as_(v).map(Reply::Protection),
            C::NotifySet { .. } | C::NotifyShow => as_(v).map(Reply::Notify),
            C::NotifyTest => as_(v).map(Reply::NotifyTested),
            C::SpaceGuard { .. } => as_(v).map(Reply::SpaceGuard),
            C::BackupsChanged { .. } => as_(v).map(Reply::BackupsChanged),
        };
        r.map_err(|e| format!("the daemon's reply to {} does not parse: {e}", cmd.name()))
    }
}
