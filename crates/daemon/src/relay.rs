//! Relays a daemon-side job's progress to the control-socket client that started it, as
//! JSON lines `{"progress":{"phase":..,"total":..,"done":..}}` ahead of the reply (the CLI
//! draws them as a bar).
//!
//! Threading: the job's threads call [`Relay`] concurrently; one mutex orders the lines.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use snapblk_backup::Progress;

/// Relays progress to a control-socket client, at most five lines a second.
pub struct Relay {
    w: Mutex<(UnixStream, Instant)>,
    phase: Mutex<(String, u64)>,
    done: AtomicU64,
    /// Set when a progress line could not be written: no more are sent.
    gave_up: std::sync::atomic::AtomicBool,
}

/// A CLI that stops reading (suspended with ^Z, say) may hold up a job's progress reports
/// this long; then the job goes on without them.
const RELAY_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl Relay {
    pub fn new(w: UnixStream) -> Relay {
        let _ = w.set_write_timeout(Some(RELAY_WRITE_TIMEOUT));
        Relay {
            w: Mutex::new((w, Instant::now() - Duration::from_secs(1))),
            phase: Mutex::new((String::new(), 0)),
            done: AtomicU64::new(0),
            gave_up: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn send(&self, force: bool) {
        if self.gave_up.load(Ordering::Relaxed) {
            return;
        }
        let mut g = self.w.lock().unwrap_or_else(|p| p.into_inner());
        if !force && g.1.elapsed() < Duration::from_millis(200) {
            return;
        }
        g.1 = Instant::now();
        let (phase, total) = self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let line = json!({ "progress": { "phase": phase, "total": total,
            "done": self.done.load(Ordering::Relaxed) } });
        // A client that went away or stopped reading just stops seeing progress; the job
        // goes on.
        if writeln!(g.0, "{line}").is_err() {
            self.gave_up.store(true, Ordering::Relaxed);
        }
    }
}

impl Progress for Relay {
    fn start(&self, phase: &str, total: u64) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = (phase.to_string(), total);
        self.done.store(0, Ordering::Relaxed);
        self.send(true);
    }
    fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        self.send(false);
    }
}
