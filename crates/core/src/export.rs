//! What block frontends (NBD, ublk) see: an export with one set of operations. Frontends
//! translate protocol requests to these calls and `Error::errno` back to protocol errors;
//! they never reach into the pool.

use std::os::unix::io::RawFd;
use std::sync::Arc;

use crate::error::Result;
use crate::pool::plan::ReadPlan;
use crate::pool2::{WritePlan, WriteThen};

/// Block status run: `(bytes, flags)` with NBD base:allocation flags.
pub type StatusRun = (u64, u32);

pub trait Export: Send + Sync {
    /// Current size in bytes.
    fn size(&self) -> Result<u64>;
    fn read_only(&self) -> bool;
    /// The name clients use (`vol` or `vol@snap`).
    fn name(&self) -> &str;
    /// Fills all of `buf` (the NBD server reuses reply buffers between requests).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Writes like [`Export::write`] but may return before the write's metadata commits:
    /// `then` gets the outcome, here or later on the pool's committer thread, where it must
    /// not block (a frontend sends its reply from it). `data` is not used after return.
    fn write_then(&self, offset: u64, data: &[u8], fua: bool, then: WriteThen) {
        then(self.write(offset, data, fua))
    }
    fn flush(&self) -> Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    /// With `fast`, fails with `Error::Unsupported` rather than writing data (NBD FAST_ZERO).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, fast: bool) -> Result<()>;
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusRun>>;
    /// Planned I/O, for a frontend that does the data-device I/O itself on its own
    /// io_uring. `None` (the default) when the export cannot offer it; the frontend then
    /// uses `read` and `write`.
    fn direct(&self) -> Option<&dyn DirectIo> {
        None
    }
    /// Where the frontend reports each request it served (`Metered`); `None`: nowhere.
    fn meter(&self) -> Option<Arc<dyn IoMeter>> {
        None
    }
}

/// What a frontend request did, for accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl IoKind {
    pub const ALL: [IoKind; 5] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Flush,
        IoKind::Trim,
        IoKind::WriteZeroes,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Trim => "trim",
            IoKind::WriteZeroes => "write_zeroes",
        }
    }
}

/// Receives one report per request a frontend served: its kind, the bytes it covered,
/// the time from its arrival to its completion, and whether it succeeded. Called on the
/// frontends' I/O threads: must not block.
pub trait IoMeter: Send + Sync {
    fn record(&self, kind: IoKind, bytes: u64, elapsed: std::time::Duration, ok: bool);
}

/// The meter of an export, by its name (`vol` or `vol@snap`).
pub type MeterFor = Arc<dyn Fn(&str) -> Arc<dyn IoMeter> + Send + Sync>;

/// A provider whose exports report their requests to the meter `meter_for` names.
pub struct MeteredExports {
    pub inner: Arc<dyn ExportProvider>,
    pub meter_for: MeterFor,
}

impl ExportProvider for MeteredExports {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>> {
        let inner = self.inner.open(name)?;
        let meter = (self.meter_for)(inner.name());
        Ok(Arc::new(Metered { inner, meter }))
    }
    fn list(&self) -> Vec<String> {
        self.inner.list()
    }
}

/// Any export, whose frontend reports its requests to `meter`; everything else passes
/// through (planned I/O included).
pub struct Metered {
    pub inner: Arc<dyn Export>,
    pub meter: Arc<dyn IoMeter>,
}

impl Export for Metered {
    fn size(&self) -> Result<u64> {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.inner.write(offset, data, fua)
    }
    fn write_then(&self, offset: u64, data: &[u8], fua: bool, then: WriteThen) {
        self.inner.write_then(offset, data, fua, then)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, fast: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, fua, fast)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusRun>> {
        self.inner.block_status(offset, len)
    }
    fn direct(&self) -> Option<&dyn DirectIo> {
        self.inner.direct()
    }
    fn meter(&self) -> Option<Arc<dyn IoMeter>> {
        Some(Arc::clone(&self.meter))
    }
}

/// Whole-block reads and writes split into plan → data I/O → finish (`pool/plan.rs`),
/// validated like `Export::read`/`write`. The caller reads the plan's device segments on
/// `data_read_fd` or writes them on `data_fd` (block-aligned offsets, lengths and
/// buffers), then finishes it.
pub trait DirectIo {
    /// The data device's descriptor for writes.
    fn data_fd(&self) -> RawFd;
    /// The data device's descriptor for reads (the same one unless reads go through the
    /// page cache while writes do not).
    fn data_read_fd(&self) -> RawFd;
    /// Offset and length must be whole 4 KiB blocks.
    fn plan_read(&self, offset: u64, len: usize) -> Result<ReadPlan<'_>>;
    /// Checks a planned read's checksums once its device reads (on `data_read_fd`) are in
    /// `buf` (`ReadPlan::finish_on`: a copy from the host page cache that fails is read
    /// again from the media).
    fn finish_read(&self, plan: ReadPlan<'_>, buf: &mut [u8]) -> Result<()>;
    /// Offset and length must be whole 4 KiB blocks. Never waits for space relief: a
    /// full pool answers `NoSpace` at once, and the caller retries the write through
    /// [`Export::write`] where it may block (ublk: the queue's helper thread).
    fn plan_write(&self, offset: u64, data: &[u8], fua: bool) -> Result<WritePlan<'_>>;
    /// Commits a planned write after its data I/O, or frees its blocks if `io` failed.
    fn finish_write(&self, plan: WritePlan<'_>, io: std::io::Result<()>) -> Result<()>;
    /// [`DirectIo::finish_write`] that does not wait for the commit: `then` gets the
    /// outcome, here or later on the pool's committer thread (it must not block).
    fn finish_write_then(&self, plan: WritePlan<'_>, io: std::io::Result<()>, then: WriteThen) {
        then(self.finish_write(plan, io))
    }
}

/// Resolves export names for a frontend.
pub trait ExportProvider: Send + Sync {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>>;
    /// Every export name, for NBD_OPT_LIST.
    fn list(&self) -> Vec<String>;
}

/// An export that refuses writes, around any other (`attach VOL --read-only`).
pub struct ReadOnly(pub Arc<dyn Export>);

impl ReadOnly {
    fn refuse(&self) -> crate::Error {
        crate::Error::ReadOnly(format!("read-only attachment of '{}'", self.0.name()))
    }
}

impl Export for ReadOnly {
    fn size(&self) -> Result<u64> {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn name(&self) -> &str {
        self.0.name()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read(offset, buf)
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<()> {
        Err(self.refuse())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> Result<()> {
        Err(self.refuse())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<()> {
        Err(self.refuse())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusRun>> {
        self.0.block_status(offset, len)
    }
    fn direct(&self) -> Option<&dyn DirectIo> {
        self.0.direct().map(|_| self as &dyn DirectIo)
    }
    fn meter(&self) -> Option<Arc<dyn IoMeter>> {
        self.0.meter()
    }
}

/// Planned reads pass through; planned writes are refused like `write`.
impl DirectIo for ReadOnly {
    fn data_fd(&self) -> RawFd {
        self.0.direct().map_or(-1, |d| d.data_fd())
    }
    fn data_read_fd(&self) -> RawFd {
        self.0.direct().map_or(-1, |d| d.data_read_fd())
    }
    fn finish_read(&self, plan: ReadPlan<'_>, buf: &mut [u8]) -> Result<()> {
        match self.0.direct() {
            Some(d) => d.finish_read(plan, buf),
            None => plan.finish(buf),
        }
    }
    fn plan_read(&self, offset: u64, len: usize) -> Result<ReadPlan<'_>> {
        match self.0.direct() {
            Some(d) => d.plan_read(offset, len),
            None => Err(crate::Error::Unsupported(format!(
                "planned I/O on '{}'",
                self.0.name()
            ))),
        }
    }
    fn plan_write(&self, _: u64, _: &[u8], _: bool) -> Result<WritePlan<'_>> {
        Err(self.refuse())
    }
    fn finish_write(&self, plan: WritePlan<'_>, io: std::io::Result<()>) -> Result<()> {
        // No plan_write of ours succeeds; a plan from elsewhere is finished where it came from.
        match self.0.direct() {
            Some(d) => d.finish_write(plan, io),
            None => Err(self.refuse()),
        }
    }
}
