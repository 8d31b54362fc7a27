//! The daemon's pool space guard (logic: crates/policy/src/space.rs): a thread that checks
//! free space every [`POLL`] and deletes what the policies allow when it is under the
//! threshold, and the pool's `SpaceRelief`, through which a write that found the pool full
//! runs a pass before it fails with ENOSPC. Events go to the notifications.
//!
//! Threading: a pass takes the manager mutex only to choose and delete one snapshot; the
//! reclaim that frees its blocks runs without it. The relief runs on the writer's thread
//! (NBD worker, ublk queue) holding no pool lock.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::json;
use snapblk_core::pool2::SpaceRelief;
use snapblk_core::Pool;
use snapblk_policy::{GuardConfig, PoolSpace, GUARD_RECORD};

use crate::error::{DaemonError, Result};
use crate::policies::PolicyService;

/// How often the guard thread looks at free space (one allocator lock: cheap).
const POLL: Duration = Duration::from_secs(2);

/// The pool's space for the guard.
pub struct DaemonSpace(pub Arc<Pool>);

impl PoolSpace for DaemonSpace {
    fn space(&self) -> (u64, u64) {
        self.0.space()
    }
    fn settle(&self) -> Result<(), String> {
        self.0.reclaim_all().map_err(|e| e.to_string())
    }
}

/// What a full pool calls: a guard pass on the writer's thread.
pub struct Relief(pub Weak<PolicyService>);

impl SpaceRelief for Relief {
    fn relieve(&self, needed_blocks: u64) -> bool {
        let Some(s) = self.0.upgrade() else {
            return false;
        };
        log::warn!("pool full: a write needs {needed_blocks} blocks; asking the space guard");
        s.guard_pass(true)
    }
}

/// The guard's settings as stored with the pool (none: off). A record that does not
/// decode or check leaves the guard off, loudly: the daemon still serves the volumes.
pub fn load_config(pool: &Pool) -> Result<Option<GuardConfig>> {
    let Some((_, v)) = pool
        .records(GUARD_RECORD)?
        .into_iter()
        .find(|(k, _)| k == GUARD_RECORD)
    else {
        return Ok(None);
    };
    let checked = serde_json::from_slice::<GuardConfig>(&v)
        .map_err(|e| e.to_string())
        .and_then(|c| GuardConfig::new(c.min_free_percent, Some(c.target_free_percent)));
    match checked {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            log::error!("record {GUARD_RECORD}: {e}; the space guard is off (set it again with `snapblk pool guard`)");
            Ok(None)
        }
    }
}

impl PolicyService {
    /// Starts the guard thread and installs the relief on the pool.
    pub fn start_guard(self: &Arc<Self>, pool: &Pool) -> Result<()> {
        let relief: Arc<dyn SpaceRelief> = Arc::new(Relief(Arc::downgrade(self)));
        pool.set_space_relief(Arc::downgrade(&relief));
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("space-guard".into())
            .spawn(move || {
                let _keep = relief;
                while !me.stopping() {
                    me.guard_pass(false);
                    std::thread::sleep(POLL);
                }
            })
            .map_err(DaemonError::io("starting the space guard thread"))?;
        Ok(())
    }

    /// One guard pass; whether it (or one it waited for) freed space.
    pub fn guard_pass(&self, urgent: bool) -> bool {
        let space = DaemonSpace(self.pool());
        let pass = self
            .guard
            .pass(&self.m, &space, urgent, jiff::Timestamp::now());
        for c in &pass.deleted {
            log::warn!(
                "space guard: deleted {}@{} (policy {}) to free space",
                c.volume,
                c.snapshot,
                c.policy
            );
        }
        for e in &pass.errors {
            log::warn!("space guard: {e}");
        }
        self.send_events(pass.events.into_iter().map(|e| json!(e)).collect());
        pass.progressed
    }

    /// `pool guard`: shows or sets the guard.
    pub fn guard_command(
        &self,
        min_free: Option<f64>,
        target_free: Option<f64>,
        off: bool,
    ) -> Result<snapblk_control::Reply> {
        let pool = self.pool();
        if target_free.is_some() && min_free.is_none() {
            return Err(DaemonError::Invalid(
                "--target-free needs --min-free".into(),
            ));
        }
        if off {
            pool.put_record(GUARD_RECORD, None)?;
            self.guard.set_config(None);
        } else if let Some(min) = min_free {
            let c = GuardConfig::new(min, target_free).map_err(DaemonError::Invalid)?;
            let v = serde_json::to_vec(&c).map_err(|e| DaemonError::Invalid(e.to_string()))?;
            pool.put_record(GUARD_RECORD, Some(v))?;
            self.guard.set_config(Some(c));
        }
        let (free, cap) = pool.space();
        let candidates = self.candidates();
        Ok(snapblk_control::Reply::SpaceGuard(
            snapblk_control::reply::SpaceGuard {
                guard: self.guard.config(),
                free,
                capacity: cap,
                free_percent: if cap == 0 {
                    100.0
                } else {
                    free as f64 * 100.0 / cap as f64
                },
                deletable: candidates,
            },
        ))
    }
}
