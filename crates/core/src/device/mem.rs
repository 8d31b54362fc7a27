//! A data device in memory, for tests and models.

use std::io;
use std::sync::Mutex;

use super::{check_aligned, DataDevice, ReadSeg, WriteSeg};

pub struct MemDevice {
    data: Mutex<Vec<u8>>,
}

impl MemDevice {
    pub fn new(len: u64) -> Self {
        MemDevice {
            data: Mutex::new(vec![0u8; len as usize]),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let mut g = self.data.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    fn range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        match start.checked_add(n) {
            Some(end) if end <= len => Ok(start..end),
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }
}

impl DataDevice for MemDevice {
    fn len(&self) -> u64 {
        self.with(|d| d.len() as u64)
    }

    fn read(&self, segs: &mut [ReadSeg<'_>]) -> io::Result<()> {
        self.with(|d| {
            for s in segs.iter_mut() {
                check_aligned(s.offset, s.buf)?;
                let r = Self::range(d.len(), s.offset, s.buf.len())?;
                s.buf.copy_from_slice(&d[r]);
            }
            Ok(())
        })
    }

    fn write(&self, segs: &[WriteSeg<'_>], _fua: bool) -> io::Result<()> {
        self.with(|d| {
            for s in segs {
                check_aligned(s.offset, s.buf)?;
                let r = Self::range(d.len(), s.offset, s.buf.len())?;
                d[r].copy_from_slice(s.buf);
            }
            Ok(())
        })
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}
