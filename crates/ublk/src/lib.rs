//! snapblk-ublk: `/dev/ublkbN` block devices backed by a `snapblk_core::Export`, through
//! the kernel's ublk driver and the `libublk` crate.
//!
//! Threading (as libublk intends): each device has a control thread that owns its
//! `UblkCtrl` (libublk's control ring is per thread) and runs the target; each queue has
//! its own thread and io_uring, created by libublk, and one async task per tag
//! (queue.rs). Whole-block reads and writes do their data-device I/O on the queue's own
//! ring, so a request's data never hops to another thread and a queue serves up to
//! `--depth` requests at once; a direct write's metadata commit completes on the pool's
//! committer thread, which wakes the task through an eventfd on that ring (wakeup.rs).
//! FLUSH, DISCARD and WRITE_ZEROES run on a helper thread per queue (offload.rs); other
//! requests run synchronously on the queue thread (request.rs).
//!
//! Invariants: every request is completed exactly once, with the byte count or a negative
//! errno; an invalid request (unknown op, a length beyond the I/O buffer) gets -EINVAL and
//! never panics. Detach stops the device (in-flight requests complete first) and deletes it.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use snapblk_core::Export;

mod offload;
mod queue;
mod request;
mod transfer;
mod wakeup;

pub use request::execute;

pub const CONTROL_DEVICE: &str = "/dev/ublk-control";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ublk is not available: {0}")]
    Unavailable(String),
    #[error("ublk: {0}")]
    Ublk(String),
    #[error("volume: {0}")]
    Volume(#[from] snapblk_core::Error),
}

/// How a device is created.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub queues: u16,
    pub depth: u16,
    /// Largest request in bytes (the kernel splits bigger ones).
    pub io_buf_bytes: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: 2,
            depth: 64,
            io_buf_bytes: 1 << 20,
        }
    }
}

/// Requests a device's queues have completed, by path (counted with relaxed atomics).
#[derive(Debug, Default)]
pub struct IoStats {
    /// Whole-block reads and writes whose data I/O ran on the queue's own ring.
    pub direct: AtomicU64,
    /// Requests run through the `Export` API: flush, discard and write-zeroes (on the
    /// queue's helper thread), unaligned requests and exports without direct I/O.
    pub via_api: AtomicU64,
    /// Requests completed with an error (counted in one of the above too).
    pub failed: AtomicU64,
}

impl IoStats {
    pub(crate) fn count(&self, direct: bool, res: i32) {
        let c = if direct { &self.direct } else { &self.via_api };
        c.fetch_add(1, Ordering::Relaxed);
        if res < 0 {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (direct, via_api, failed).
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.direct.load(Ordering::Relaxed),
            self.via_api.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// An attached device. Dropping it without `detach` leaves the device running until the
/// process exits.
pub struct Device {
    pub id: i32,
    pub path: String,
    pub export: String,
    pub read_only: bool,
    /// Taken over after a crash: libublk then leaves deleting the device to us.
    pub recovered: bool,
    pub stats: Arc<IoStats>,
    control: Option<JoinHandle<()>>,
}

/// Devices survive a crash of the daemon: the kernel holds their I/O (UBLK_F_USER_RECOVERY)
/// and hands requests that were in flight to the restarted daemon (REISSUE).
const CTRL_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

fn check_available() -> Result<(), Error> {
    if !Path::new(CONTROL_DEVICE).exists() {
        return Err(Error::Unavailable(format!(
            "{CONTROL_DEVICE} does not exist; load the ublk_drv kernel module (modprobe ublk_drv)"
        )));
    }
    Ok(())
}

/// How a device is started: new, or taking over a quiesced one after a crash.
#[derive(Clone, Copy)]
enum Start {
    New(Options),
    Recover {
        id: i32,
        queues: u16,
        depth: u16,
        io_buf_bytes: u32,
    },
}

/// Creates a ublk device for `export` and returns once `/dev/ublkbN` exists. `owner` (the
/// pool uuid) is recorded with the device so that only this pool's daemon recovers it.
pub fn attach(export: Arc<dyn Export>, owner: &str, opts: Options) -> Result<Device, Error> {
    check_available()?;
    start(export, owner, Start::New(opts))
}

/// A device left quiesced by a daemon that died, which this owner can take over.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub id: i32,
    pub export: String,
    pub read_only: bool,
}

/// Quiesced snapblk devices of `owner` (after a crash of its daemon).
pub fn orphans(owner: &str) -> Vec<Orphan> {
    if check_available().is_err() {
        return Vec::new();
    }
    let found = Rc::new(RefCell::new(Vec::new()));
    let f = found.clone();
    let owner = owner.to_string();
    UblkCtrl::for_each_dev_id(move |id| {
        let Ok(ctrl) = UblkCtrl::new_simple(id as i32) else {
            return;
        };
        let Some(t) = ctrl.get_target_data_from_json() else {
            return;
        };
        drop(ctrl);
        if t["owner"].as_str() == Some(owner.as_str()) && wait_quiesced(id as i32) {
            if let Some(export) = t["export"].as_str() {
                f.borrow_mut().push(Orphan {
                    id: id as i32,
                    export: export.to_string(),
                    read_only: t["read_only"].as_bool().unwrap_or(false),
                });
            }
        }
        // new_simple() handles never delete the device when dropped.
    });
    let v = found.borrow().clone();
    v
}

/// Whether device `id` is (or, its daemon having just died, soon becomes) quiesced: the
/// kernel notices a dead server asynchronously, so a device can still read LIVE for a few
/// seconds after the kill; wait up to 15 s while its server process is gone.
fn wait_quiesced(id: i32) -> bool {
    for _ in 0..150 {
        let Ok(ctrl) = UblkCtrl::new_simple(id) else {
            return false;
        };
        let info = ctrl.dev_info();
        let state = u32::from(info.state);
        if state == sys::UBLK_S_DEV_QUIESCED {
            return true;
        }
        // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
        let alive = info.ublksrv_pid > 0 && unsafe { libc::kill(info.ublksrv_pid, 0) } == 0;
        if state != sys::UBLK_S_DEV_LIVE || alive {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Takes over quiesced device `id` (see `orphans`), serving it from `export`: I/O that
/// waited meanwhile continues, in-flight requests are reissued.
pub fn recover(export: Arc<dyn Export>, owner: &str, id: i32) -> Result<Device, Error> {
    check_available()?;
    let old = UblkCtrl::new_simple(id).map_err(|e| Error::Ublk(format!("device {id}: {e}")))?;
    let r = old
        .start_user_recover()
        .map_err(|e| Error::Ublk(format!("recovering device {id}: {e}")))?;
    if r < 0 {
        return Err(Error::Ublk(format!("recovering device {id}: error {r}")));
    }
    let info = old.dev_info();
    drop(old);
    let mut dev = start(
        export,
        owner,
        Start::Recover {
            id,
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            io_buf_bytes: info.max_io_buf_bytes,
        },
    )?;
    dev.recovered = true;
    Ok(dev)
}

fn start(export: Arc<dyn Export>, owner: &str, how: Start) -> Result<Device, Error> {
    let size = export.size()?;
    let read_only = export.read_only();
    let name = export.name().to_string();
    let owner = owner.to_string();
    let (tx, rx) = mpsc::channel::<Result<(i32, String), String>>();
    let stats = Arc::new(IoStats::default());
    let st = Arc::clone(&stats);
    let control = std::thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || run_device(export, st, &owner, size, read_only, how, tx))
        .map_err(|e| Error::Ublk(format!("cannot start the control thread: {e}")))?;
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok((id, path))) => Ok(Device {
            id,
            path,
            export: name,
            read_only,
            recovered: false,
            stats,
            control: Some(control),
        }),
        Ok(Err(e)) => {
            let _ = control.join();
            Err(Error::Ublk(e))
        }
        Err(_) => Err(Error::Ublk("the device did not start within 60 s".into())),
    }
}

impl Device {
    /// Tells the kernel the export's new size (`UBLK_U_CMD_UPDATE_SIZE`, Linux 6.16 and
    /// later). Older kernels refuse the command; the device then keeps its old size until
    /// it is attached again.
    pub fn update_size(&self, bytes: u64) -> Result<(), Error> {
        let ctrl = UblkCtrl::new_simple(self.id)
            .map_err(|e| Error::Ublk(format!("device {}: {e}", self.id)))?;
        ctrl.update_size(bytes).map(|_| ()).map_err(|e| {
            Error::Ublk(format!(
                "the kernel did not resize {} ({e}; resizing an attached ublk device needs Linux 6.16 or later): detach and attach it again to see the new size",
                self.path
            ))
        })
    }

    /// Stops and deletes the device; returns when its threads have ended.
    pub fn detach(mut self) -> Result<(), Error> {
        // A control handle for this thread (libublk's control ring is per thread).
        let ctrl = UblkCtrl::new_simple(self.id)
            .map_err(|e| Error::Ublk(format!("device {}: {e}", self.id)))?;
        ctrl.kill_dev()
            .map_err(|e| Error::Ublk(format!("stopping device {}: {e}", self.id)))?;
        if let Some(h) = self.control.take() {
            let _ = h.join();
        }
        if self.recovered {
            ctrl.del_dev()
                .map_err(|e| Error::Ublk(format!("deleting device {}: {e}", self.id)))?;
        }
        Ok(())
    }
}

fn run_device(
    export: Arc<dyn Export>,
    stats: Arc<IoStats>,
    owner: &str,
    size: u64,
    read_only: bool,
    how: Start,
    tx: mpsc::Sender<Result<(i32, String), String>>,
) {
    let builder = UblkCtrlBuilder::default()
        .name("snapblk")
        .ctrl_flags(CTRL_FLAGS);
    let builder = match how {
        Start::New(o) => builder
            .id(-1)
            .nr_queues(o.queues.max(1))
            .depth(o.depth.max(1))
            .io_buf_bytes(o.io_buf_bytes)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV),
        Start::Recover {
            id,
            queues,
            depth,
            io_buf_bytes,
        } => builder
            .id(id)
            .nr_queues(queues)
            .depth(depth)
            .io_buf_bytes(io_buf_bytes)
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV),
    };
    let ctrl = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(format!("creating the device: {e}")));
            return;
        }
    };
    let ready = tx.clone();
    let target =
        serde_json::json!({ "export": export.name(), "read_only": read_only, "owner": owner });
    let tgt_init = move |dev: &mut UblkDev| {
        set_params(dev, size, read_only);
        // Room on the queue ring: submissions for every tag's command and some data I/O (a
        // full queue is flushed and retried); completions for every tag's command plus a
        // full window of data segments each (transfer::WINDOW), so nothing overflows.
        let depth = dev.dev_info.queue_depth;
        dev.tgt.sq_depth = depth.saturating_mul(4).min(4096);
        dev.tgt.cq_depth = depth
            .saturating_mul(1 + transfer::WINDOW as u16)
            .clamp(dev.tgt.sq_depth, 4096);
        dev.set_target_json(target);
        Ok(())
    };
    let queue = move |qid: u16, dev: &UblkDev| queue::queue_main(qid, dev, &export, &stats);
    let started = move |c: &UblkCtrl| {
        let _ = ready.send(Ok((c.dev_info().dev_id as i32, c.get_bdev_path())));
    };
    if let Err(e) = ctrl.run_target(tgt_init, queue, started) {
        let _ = tx.send(Err(format!(
            "running the device: {e} (the daemon log names the queue that failed, if one did)"
        )));
    }
    // Dropping a new device's `ctrl` deletes the device (UBLK_DEV_F_ADD_DEV); a recovered
    // one is deleted by `Device::detach`.
}

fn set_params(dev: &mut UblkDev, size: u64, read_only: bool) {
    dev.set_default_params(size);
    let p = &mut dev.tgt.params;
    // A volatile cache (the kernel sends FLUSH) and FUA, as the volume API implements both.
    p.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    if read_only {
        p.basic.attrs |= sys::UBLK_ATTR_READ_ONLY;
    } else {
        // 1 GiB per discard / write-zeroes request; 4 KiB granularity (the pool's block).
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: 1 << 21,
            max_write_zeroes_sectors: 1 << 21,
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
}

/// The export (`vol` or `vol@snap`) that ublk block device `kernel_name` (`ublkbN`, as
/// udev's %k gives it) serves, from the description libublk keeps in /run/ublksrvd.
/// Used by the udev rules for /dev/disk/by-snapblk/ names.
pub fn export_of_device(kernel_name: &str) -> Result<String, Error> {
    let id: u32 = kernel_name
        .strip_prefix("ublkb")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Error::Ublk(format!(
                "'{kernel_name}' is not a ublk block device name (ublkbN)"
            ))
        })?;
    let path = format!("{}/{id:04}.json", UblkCtrl::run_dir());
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Ublk(format!("{path}: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Ublk(format!("{path}: {e}")))?;
    v["target_data"]["export"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Ublk(format!("{path}: device {id} is not a snapblk device")))
}
