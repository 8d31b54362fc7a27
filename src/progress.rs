//! Progress of long commands (backup, restore, verify): a terminal bar with throughput and
//! ETA (indicatif; drawn only when stderr is a terminal and --json is off), also showing
//! the progress lines a daemon-side job relays (crates/daemon relay.rs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
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
