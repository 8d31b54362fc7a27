//! Wiring of protection policies (logic: crates/policy): the pool as a `PolicyPool`, the
//! daemon's scheduler thread, and the policy and job commands.
//!
//! Threading: one `Manager` behind a mutex; the scheduler thread holds it while a due job
//! runs (snapshot jobs take milliseconds), commands hold it for their duration. The thread
//! sleeps until the next due job, at most a minute (the wall clock may jump), or until a
//! command changes the policies.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Result};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde_json::{json, Value};
use snapblk_control::Command;
use snapblk_core::Pool;
use snapblk_policy::{Manager, Policy, PolicyPool};

/// The pool as the policy manager sees it.
pub struct PoolPolicies(pub Arc<Pool>);

impl PolicyPool for PoolPolicies {
    fn snapshots(&self, vol: &str) -> Result<Vec<(String, Timestamp)>, String> {
        let snaps = self
            .0
            .list_snapshots(Some(vol))
            .map_err(|e| e.to_string())?;
        Ok(snaps
            .into_iter()
            .map(|s| {
                let t = Timestamp::from_second(s.created as i64).unwrap_or(Timestamp::UNIX_EPOCH);
                (s.name, t)
            })
            .collect())
    }
    fn create_snapshot(&self, vol: &str, name: &str) -> Result<(), String> {
        self.0
            .create_snapshot(vol, name)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn group_members(&self, group: &str) -> Result<Vec<String>, String> {
        self.0.group(group).map_err(|e| e.to_string())
    }
    fn create_group_snapshot(&self, group: &str, name: &str) -> Result<(), String> {
        self.0
            .create_group_snapshot(group, name)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn delete_snapshot(&self, vol: &str, name: &str) -> Result<(), String> {
        self.0.delete_snapshot(vol, name).map_err(|e| e.to_string())
    }
    fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        self.0.records(prefix).map_err(|e| e.to_string())
    }
    fn put_record(&self, name: &str, value: Option<Vec<u8>>) -> Result<(), String> {
        self.0.put_record(name, value).map_err(|e| e.to_string())
    }
    fn run_hook(
        &self,
        argv: &[String],
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Result<(), String> {
        run_hook(argv, env, timeout)
    }
}

/// The last 2 KiB a hook wrote to a pipe (read to the end, so it never blocks on a full
/// pipe; memory stays bounded).
fn tail_of(mut r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut keep: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            keep.extend_from_slice(&buf[..n]);
            if keep.len() > 2048 {
                keep.drain(..keep.len() - 2048);
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&keep).trim().to_string());
    });
    rx
}

/// Runs a hook: no shell, stdin from /dev/null, killed after `timeout`.
fn run_hook(argv: &[String], env: &[(&str, String)], timeout: Duration) -> Result<(), String> {
    use std::process::{Command as Proc, Stdio};
    let (cmd, args) = argv.split_first().ok_or("empty hook")?;
    let mut child = Proc::new(cmd)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {cmd}: {e}"))?;
    let out = child.stdout.take().map(tail_of);
    let err = child.stderr.take().map(tail_of);
    let t0 = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if t0.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd} killed after {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {cmd}: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    // A child the hook left running may hold the pipes open: wait for them a little only.
    let text = |rx: Option<std::sync::mpsc::Receiver<String>>| {
        rx.and_then(|r| r.recv_timeout(Duration::from_secs(1)).ok())
            .unwrap_or_default()
    };
    let (o, e) = (text(out), text(err));
    let said = if e.is_empty() { o } else { e };
    Err(format!(
        "{cmd} {status}{}",
        if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        }
    ))
}

pub struct PolicyService {
    m: Mutex<Manager<PoolPolicies>>,
    wake: Condvar,
    stopping: Mutex<bool>,
}

fn now() -> Timestamp {
    Timestamp::now()
}

impl PolicyService {
    /// Loads the pool's policies and job states (an interrupted run is recorded as such).
    pub fn open(pool: Arc<Pool>) -> Result<Arc<PolicyService>> {
        let m = Manager::open(PoolPolicies(pool), TimeZone::system(), now())
            .map_err(|e| anyhow!("loading protection policies: {e}"))?;
        Ok(Arc::new(PolicyService {
            m: Mutex::new(m),
            wake: Condvar::new(),
            stopping: Mutex::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Manager<PoolPolicies>> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the scheduler thread.
    pub fn start(self: &Arc<Self>) -> Result<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("policies".into())
            .spawn(move || me.run())?;
        Ok(())
    }

    fn run(&self) {
        loop {
            let next = {
                let mut m = self.lock();
                for (job, r) in m.tick(now(), &now) {
                    match &r.outcome {
                        snapblk_policy::Outcome::Ok => log::info!(
                            "job {job}: created {}, deleted {}",
                            r.created.join(" "),
                            r.deleted.join(" ")
                        ),
                        o => log::warn!("job {job}: {o:?}"),
                    }
                }
                m.next_wakeup()
            };
            let wait = next
                .map(|t| t.duration_since(now()).as_millis().clamp(0, 60_000) as u64)
                .unwrap_or(60_000);
            let stop = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
            let (stop, _) = self
                .wake
                .wait_timeout(stop, Duration::from_millis(wait.max(10)))
                .unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
        }
    }

    /// Stops the scheduler thread after the job it runs, if any.
    pub fn stop(&self) {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
        drop(self.lock()); // waits for a running job
    }

    /// Executes a policy or job command.
    pub fn execute(&self, cmd: &Command) -> Result<Value> {
        let mut m = self.lock();
        let v = match cmd {
            Command::PolicySet { name, policy } => {
                let p: Policy = serde_json::from_value(policy.clone())
                    .map_err(|e| anyhow!("policy {name}: {e}"))?;
                m.set_policy(name, p, now()).map_err(|e| anyhow!(e))?;
                json!({ "name": name, "policy": m.policies().get(name) })
            }
            Command::PolicyList => json!(m
                .policies()
                .iter()
                .map(|(n, p)| json!({ "name": n, "policy": p }))
                .collect::<Vec<_>>()),
            Command::PolicyShow { name } => {
                let p = m
                    .policies()
                    .get(name)
                    .ok_or_else(|| anyhow!("policy '{name}' does not exist"))?;
                let jobs: Vec<_> = m.jobs().into_iter().filter(|j| &j.policy == name).collect();
                json!({ "name": name, "policy": p, "jobs": jobs })
            }
            Command::PolicyDelete { name } => {
                m.delete_policy(name).map_err(|e| anyhow!(e))?;
                json!({ "deleted": name })
            }
            Command::PolicyPlan { name } => json!(m.prune_plan(name).map_err(|e| anyhow!(e))?),
            Command::Jobs => json!(m.jobs()),
            Command::JobRun { name } => {
                json!(m.run_now(name, now(), &now).map_err(|e| anyhow!(e))?)
            }
            _ => return Err(anyhow!("not a policy command")),
        };
        drop(m);
        self.wake.notify_all();
        Ok(v)
    }
}
