//! Protection policies (issue 13), as pure logic with no I/O: calendar schedules
//! ([`calendar`]), retention ([`retention`]) and the job scheduler ([`scheduler`]). The
//! daemon feeds them the wall clock and the pool's snapshots; the tests feed them a
//! simulated clock, so a week of schedules runs in milliseconds.

pub mod calendar;
pub mod retention;
pub mod scheduler;

pub use calendar::{CalendarEvent, ParseError};
pub use retention::{apply as apply_retention, Item, Keep, Reason, Verdict};
pub use scheduler::{JobSpec, JobState, JobView, Outcome, SchedError, Scheduler, Start};
