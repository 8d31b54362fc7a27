//! Progress of long commands (backup, restore, verify): a terminal bar with throughput and
//! ETA (indicatif; drawn only when stderr is a terminal and --json is off), and the relay
//! that streams a daemon-side job's progress over the control socket as JSON lines
//! `{"progress":{"phase":..,"total":..,"done":..}}` ahead of the reply.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use snapblk_backup::Progress;

/// A progress bar on stderr.
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
    visible: bool,
}

impl Bar {
    pub fn new(quiet: bool) -> Bar {
        use std::io::IsTerminal;
        Bar {
            bar: Mutex::new(None),
            visible: !quiet && std::io::stderr().is_terminal(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.bar.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shows `done` of `total` for `phase` (starting a new bar when the phase changes).
    pub fn set(&self, phase: &str, total: u64, done: u64) {
        if !self.visible {
            return;
        }
        let mut g = self.lock();
        let same = g
            .as_ref()
            .is_some_and(|b| b.message() == phase && b.length() == Some(total));
        if !same {
            if let Some(b) = g.take() {
                b.finish();
            }
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            b.set_style(style);
            b.set_message(phase.to_string());
            *g = Some(b);
        }
        if let Some(b) = g.as_ref() {
            b.set_position(done);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = self.lock().take() {
            b.finish_and_clear();
        }
    }
}

/// A `Progress` drawing a `Bar` in this process (direct mode and repository commands).
pub struct Local {
    pub bar: Bar,
    phase: Mutex<(String, u64)>,
    done: AtomicU64,
}

impl Local {
    pub fn new(quiet: bool) -> Local {
        Local {
            bar: Bar::new(quiet),
            phase: Mutex::new((String::new(), 0)),
            done: AtomicU64::new(0),
        }
    }
}

impl Progress for Local {
    fn start(&self, phase: &str, total: u64) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = (phase.to_string(), total);
        self.done.store(0, Ordering::Relaxed);
        self.bar.set(phase, total, 0);
    }
    fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        let (p, t) = self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.bar.set(&p, t, done);
    }
}

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

/// Shows a relayed progress line on `bar`; false if `v` is not a progress line.
pub fn show_relayed(bar: &Bar, v: &Value) -> bool {
    let Some(p) = v.get("progress") else {
        return false;
    };
    bar.set(
        p["phase"].as_str().unwrap_or(""),
        p["total"].as_u64().unwrap_or(0),
        p["done"].as_u64().unwrap_or(0),
    );
    true
}
