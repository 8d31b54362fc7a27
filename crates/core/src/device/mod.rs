//! The data device: where block contents live (docs/design.md §4).
//!
//! Invariants: every offset and length passed to a `DataDevice` is a multiple of
//! [`BLOCK_SIZE`] and every buffer is [`BLOCK_SIZE`]-aligned (callers use [`AlignedBuf`]), so
//! implementations may use O_DIRECT. Implementations are `Send + Sync`; any thread may submit.

pub mod aligned;
pub mod header;
pub mod mem;
pub mod uring;

use std::io;
use std::os::unix::io::RawFd;

pub use aligned::{is_aligned, AlignedBuf, AlignedVec};
pub use header::DeviceHeader;

pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// Bytes reserved at the start of the device for the header.
pub const DATA_START: u64 = 1 << 20;

pub struct ReadSeg<'a> {
    pub offset: u64,
    pub buf: &'a mut [u8],
}

pub struct WriteSeg<'a> {
    pub offset: u64,
    pub buf: &'a [u8],
}

pub trait DataDevice: Send + Sync {
    /// Size of the device in bytes.
    fn len(&self) -> u64;
    /// Whether the device is empty (0 bytes).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads every segment completely (submitted together where the backend allows).
    fn read(&self, segs: &mut [ReadSeg<'_>]) -> io::Result<()>;
    /// Writes every segment completely; with `fua` each is durable when this returns.
    fn write(&self, segs: &[WriteSeg<'_>], fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// The device's file descriptor for writes (and reads, see [`DataDevice::raw_read_fd`]),
    /// for a caller that submits block I/O on its own
    /// io_uring (a ublk queue) under the same invariants (block-aligned offsets, lengths
    /// and buffers). `None` (the default) for devices that are not one plain file: memory,
    /// test wrappers that inject faults. Callers then use `read` and `write`.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// The descriptor such a caller reads through: [`DataDevice::raw_fd`] unless reads go
    /// through the page cache while writes do not (`data_cache = "reads"`).
    fn raw_read_fd(&self) -> Option<RawFd> {
        self.raw_fd()
    }
    /// Whether reads may be answered from a cache of the host's that writes do not pass
    /// through (`data_cache = "reads"`), so a read that fails its checksum is worth
    /// reading again from the media (`ReadPlan::finish_on`).
    fn reads_cached(&self) -> bool {
        false
    }
    /// Drops what such a cache holds of `len` bytes at `offset` (a hint).
    fn forget_cached(&self, _offset: u64, _len: u64) {}
}

/// Checks the alignment invariant; backends call it so a caller bug is an error, not UB.
pub(crate) fn check_aligned(offset: u64, buf: &[u8]) -> io::Result<()> {
    if !offset.is_multiple_of(BLOCK_SIZE_U64)
        || !buf.len().is_multiple_of(BLOCK_SIZE)
        || !(buf.as_ptr() as usize).is_multiple_of(BLOCK_SIZE)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unaligned data device I/O at offset {offset}, {} bytes",
                buf.len()
            ),
        ));
    }
    Ok(())
}
