//! `VolumeHandle`: the one place where block requests are validated (range, size limit,
//! read-only) before they reach the pool. Every frontend goes through it.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::export::{DirectIo, Export, ExportProvider, StatusRun};
use crate::pool::plan::ReadPlan;
use crate::pool::Target;
use crate::pool2::{Pool2 as Pool, WritePlan, WriteThen};

/// Largest single read or write (NBD's maximum block size advertises the same).
pub const MAX_IO: u64 = 32 << 20;

pub struct VolumeHandle {
    pool: Arc<Pool>,
    target: Target,
    name: String,
}

impl VolumeHandle {
    /// Opens `vol` (read-write) or `vol@snap` (read-only).
    pub fn open(pool: &Arc<Pool>, name: &str) -> Result<Self> {
        let target = pool.resolve_target(name)?;
        pool.register_open(&target)?;
        Ok(VolumeHandle {
            pool: Arc::clone(pool),
            target,
            name: name.to_string(),
        })
    }

    fn check(&self, offset: u64, len: u64, write: bool, limit: bool) -> Result<()> {
        if write && self.read_only() {
            return Err(Error::ReadOnly(format!("snapshot export '{}'", self.name)));
        }
        if limit && len > MAX_IO {
            return Err(Error::invalid(
                "request",
                format!("{len} bytes exceeds the maximum of {MAX_IO}"),
            ));
        }
        let size = self.pool.target_size(&self.target)?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    fn vol(&self) -> Result<u64> {
        match &self.target {
            Target::Volume(v) => Ok(*v),
            Target::Snapshot(..) => {
                Err(Error::ReadOnly(format!("snapshot export '{}'", self.name)))
            }
        }
    }
}

impl Drop for VolumeHandle {
    fn drop(&mut self) {
        self.pool.unregister_open(&self.target);
    }
}

impl Export for VolumeHandle {
    fn size(&self) -> Result<u64> {
        self.pool.target_size(&self.target)
    }
    fn read_only(&self) -> bool {
        matches!(self.target, Target::Snapshot(..))
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64, false, true)?;
        self.pool.read(&self.target, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check(offset, data.len() as u64, true, true)?;
        self.pool.write(self.vol()?, offset, data, fua)
    }
    fn write_then(&self, offset: u64, data: &[u8], fua: bool, then: WriteThen) {
        match self
            .check(offset, data.len() as u64, true, true)
            .and_then(|()| self.vol())
        {
            Ok(vol) => self.pool.write_then(vol, offset, data, fua, then),
            Err(e) => then(Err(e)),
        }
    }
    fn flush(&self) -> Result<()> {
        self.pool.sync()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check(offset, len, true, false)?;
        self.pool.trim(self.vol()?, offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, fast: bool) -> Result<()> {
        self.check(offset, len, true, false)?;
        let bs = crate::device::BLOCK_SIZE_U64;
        if fast && (!offset.is_multiple_of(bs) || !(offset + len).is_multiple_of(bs)) {
            return Err(Error::Unsupported("fast zeroing of a partial block".into()));
        }
        self.pool.zero(self.vol()?, offset, len, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusRun>> {
        self.check(offset, len, false, false)?;
        self.pool.block_status(&self.target, offset, len)
    }
    fn direct(&self) -> Option<&dyn DirectIo> {
        self.pool.device().raw_fd().map(|_| self as &dyn DirectIo)
    }
}

impl DirectIo for VolumeHandle {
    fn data_fd(&self) -> std::os::unix::io::RawFd {
        // `direct` hands this trait out only for devices with a descriptor.
        self.pool.device().raw_fd().unwrap_or(-1)
    }
    fn data_read_fd(&self) -> std::os::unix::io::RawFd {
        self.pool.device().raw_read_fd().unwrap_or(-1)
    }
    fn plan_read(&self, offset: u64, len: usize) -> Result<ReadPlan<'_>> {
        self.check(offset, len as u64, false, true)?;
        self.pool.plan_read(&self.target, offset, len)
    }
    fn finish_read(&self, plan: ReadPlan<'_>, buf: &mut [u8]) -> Result<()> {
        plan.finish_on(buf, &**self.pool.device())
    }
    fn plan_write(&self, offset: u64, data: &[u8], fua: bool) -> Result<WritePlan<'_>> {
        self.check(offset, data.len() as u64, true, true)?;
        self.pool.plan_write_now(self.vol()?, offset, data, fua)
    }
    fn finish_write(&self, plan: WritePlan<'_>, io: std::io::Result<()>) -> Result<()> {
        self.pool.finish_write(plan, io)
    }
    fn finish_write_then(&self, plan: WritePlan<'_>, io: std::io::Result<()>, then: WriteThen) {
        self.pool.finish_write_then(plan, io, then)
    }
}

/// Exports every volume (read-write) and snapshot (read-only) of a pool by name.
pub struct PoolExports(pub Arc<Pool>);

impl ExportProvider for PoolExports {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>> {
        let name = self.0.export_name(name)?;
        Ok(Arc::new(VolumeHandle::open(&self.0, &name)?))
    }
    fn list(&self) -> Vec<String> {
        let mut out = Vec::new();
        for v in self.0.list_volumes() {
            out.push(v.name.clone());
        }
        if let Ok(snaps) = self.0.list_snapshots(None) {
            out.extend(
                snaps
                    .into_iter()
                    .map(|s| format!("{}@{}", s.volume, s.name)),
            );
        }
        out
    }
}
