//! Protection policies (issue 13): calendar schedules ([`calendar`]), retention
//! ([`retention`]), the job scheduler ([`scheduler`]) — pure logic driven by a clock the
//! caller passes in, so a week of schedules runs in milliseconds in the tests — and the
//! manager ([`manager`]) that runs policies' jobs against a pool seen through
//! [`manager::PolicyPool`] (the daemon adapts its pool; tests use an in-memory one), with
//! backup targets and repository maintenance jobs ([`backups`]).

pub mod backups;
pub mod calendar;
pub mod events;
pub mod manager;
pub mod policy;
pub mod retention;
pub mod scheduler;
pub mod space;
pub mod status;

pub use backups::{
    BackupDone, BackupItem, BackupRule, CopyDone, CopyRule, GcRule, NamedRepo, RepoTarget, Task,
    TaskResult, VerifyRule, Work,
};
pub use calendar::{CalendarEvent, ParseError};
pub use events::{Event, Watch};
pub use manager::{JobInfo, JobRecord, Manager, PolicyPool, RunRecord, Started, VolumePlan};
pub use policy::{parse_snapshot_name, snapshot_name, Hooks, OnPreFailure, Policy, SnapshotRule};
pub use retention::{apply as apply_retention, Item, Keep, Reason, Verdict};
pub use scheduler::{JobSpec, JobState, JobView, Outcome, SchedError, Scheduler, Start};
pub use space::{Candidate, Guard, GuardConfig, PoolSpace, GUARD_RECORD};
pub use status::{Medium, TargetStatus, Verdict as Compliance, VolumeStatus};
