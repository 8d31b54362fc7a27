//! One ublk request run synchronously against an `Export`: the path for everything the
//! queue's direct path does not take (flush, discard, write-zeroes, requests not aligned to
//! 4 KiB, exports without direct I/O). Never panics on a request's fields.

use libublk::sys;
use snapblk_core::Export;

/// Runs one ublk request against the export; returns bytes done or a negative errno.
pub fn execute(
    export: &dyn Export,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> i32 {
    let op = op_flags & 0xff;
    let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
    log::trace!(
        "ublk {}: op {op} flags {op_flags:#x} sector {start_sector} sectors {nr_sectors}",
        export.name()
    );
    if op == sys::UBLK_IO_OP_FLUSH {
        // A flush carries no range (the kernel sends start_sector u64::MAX).
        return match export.flush() {
            Ok(()) => 0,
            Err(e) => {
                log::warn!("ublk {}: flush: {e}", export.name());
                -e.errno()
            }
        };
    }
    let Some(off) = start_sector.checked_mul(512) else {
        return -libc::EINVAL;
    };
    let len = u64::from(nr_sectors) * 512;
    let data_len = usize::try_from(len).ok().filter(|l| *l <= buf.len());
    let r = match (op, data_len) {
        (sys::UBLK_IO_OP_READ, Some(n)) => export.read(off, &mut buf[..n]),
        (sys::UBLK_IO_OP_WRITE, Some(n)) => export.write(off, &buf[..n], fua),
        (sys::UBLK_IO_OP_DISCARD, _) => export.trim(off, len, fua),
        (sys::UBLK_IO_OP_WRITE_ZEROES, _) => export.write_zeroes(off, len, fua, false),
        _ => {
            log::warn!(
                "ublk {}: unsupported op {op} ({len} bytes at {off})",
                export.name()
            );
            return -libc::EINVAL;
        }
    };
    match r {
        Ok(()) => match op {
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => len as i32,
            _ => 0,
        },
        Err(e) => {
            log::warn!("ublk {}: op {op} at {off}+{len}: {e}", export.name());
            -e.errno()
        }
    }
}
