//! Delivering notification events (crates/policy events.rs): each event, as JSON with the
//! pool and host added, is POSTed to the webhook and/or given on stdin to the command
//! (`/bin/sh -c`, `SNAPBLK_EVENT` = the event's kind) that `snapblk notify set` stored in
//! the pool (record `notify`).
//!
//! Threading: one delivery thread per daemon behind a bounded queue ([`QUEUE`] events;
//! when full, new events are dropped with a warning — a dead webhook never blocks the
//! scheduler). A webhook gets [`ATTEMPTS`] tries with backoff, each bounded by
//! [`TIMEOUT`]; a command is killed after [`TIMEOUT`] too.

use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const QUEUE: usize = 1000;
const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where events go (the `notify` record): the control protocol's type, so `notify show`
/// prints exactly what is stored.
pub use snapblk_control::reply::NotifyConfig as AlertConfig;

pub struct Alerts {
    tx: SyncSender<Value>,
    config: Arc<Mutex<AlertConfig>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Alerts {
    /// Starts the delivery thread.
    pub fn start(config: AlertConfig) -> Alerts {
        let (tx, rx) = sync_channel::<Value>(QUEUE);
        let config = Arc::new(Mutex::new(config));
        let cfg = Arc::clone(&config);
        let spawned = std::thread::Builder::new()
            .name("alerts".into())
            .spawn(move || {
                for ev in rx {
                    let c = lock(&cfg).clone();
                    if let Err(e) = deliver(&c, &ev) {
                        log::warn!("notification {}: {e}", ev["event"]);
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("starting the notification thread: {e}");
        }
        Alerts { tx, config }
    }

    pub fn config(&self) -> AlertConfig {
        lock(&self.config).clone()
    }

    pub fn set_config(&self, c: AlertConfig) {
        *lock(&self.config) = c;
    }

    /// Queues `ev` (dropped, with a warning, if the queue is full or nothing is set).
    pub fn send(&self, ev: Value) {
        let c = self.config();
        if c.webhook.is_none() && c.command.is_none() {
            return;
        }
        log::info!("notification: {ev}");
        if let Err(TrySendError::Full(ev)) = self.tx.try_send(ev) {
            log::warn!("notification queue full; dropped {}", ev["event"]);
        }
    }
}

/// Delivers `ev` to everything `c` names now; an error names what failed.
pub fn deliver(c: &AlertConfig, ev: &Value) -> Result<(), String> {
    let body = ev.to_string();
    let mut errors = Vec::new();
    if let Some(url) = &c.webhook {
        if let Err(e) = post(url, &body) {
            errors.push(format!("webhook {url}: {e}"));
        }
    }
    if let Some(cmd) = &c.command {
        let kind = ev["event"].as_str().unwrap_or("event");
        if let Err(e) = run(cmd, kind, &body) {
            errors.push(format!("command: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn post(url: &str, body: &str) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .build()
        .into();
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1 << attempt));
        }
        match agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body)
        {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("{last} (after {ATTEMPTS} attempts)"))
}

fn run(cmd: &str, kind: &str, body: &str) -> Result<(), String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("/bin/sh")
        .args(["-c", cmd])
        .env("SNAPBLK_EVENT", kind)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting /bin/sh: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // Written on a thread of its own: a command that does not read its input neither
        // blocks the delivery (the timeout below holds) nor fails.
        let body = body.to_string();
        std::thread::spawn(move || {
            let _ = stdin.write_all(body.as_bytes());
        });
    }
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("{s}")),
            Ok(None) if t0.elapsed() >= TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("killed after {} s", TIMEOUT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}
