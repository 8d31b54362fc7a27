//! The data device on a file or block device, with I/O through io_uring: writes on an
//! O_DIRECT descriptor, reads on it too or on a second, buffered one ([`DataCache`]).
//!
//! Threading: every I/O thread lazily creates its own ring (thread-local, 64 entries), so
//! threads never contend on a ring and a request's segments are submitted in one system call
//! and reaped by the thread that submitted them. If a ring cannot be created (kernel without
//! io_uring, seccomp), that thread falls back to pread/pwrite.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};

use super::{check_aligned, AlignedBuf, DataDevice, ReadSeg, WriteSeg, BLOCK_SIZE};

const RING_ENTRIES: u32 = 64;

thread_local! {
    static RING: RefCell<RingState> = const { RefCell::new(RingState::Untried) };
}

enum RingState {
    Untried,
    Ready(Box<IoUring>),
    Unavailable,
}

/// How data I/O uses the host's page cache (the daemon's `data_cache` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataCache {
    /// O_DIRECT reads and writes (qemu's `cache=none`).
    None,
    /// O_DIRECT writes, reads through the page cache: reads of data the host caches skip
    /// the device and large reads get the kernel's read-ahead, while writes cost what they
    /// cost with `None`. Coherent on a file of a file system whose direct I/O is iomap's
    /// (ext4, xfs, btrfs): a direct write writes back and drops the cached pages of its
    /// range before it is issued and again when it completes, before its completion is
    /// reported. A block device drops them only before an async write, so there this mode
    /// is `None` (see [`UringFile::data_cache`]).
    Reads,
    /// Reads and writes through the page cache (qemu's `cache=writeback`).
    Host,
}

pub struct UringFile {
    /// Writes (and reads unless `reads` is set) go to this descriptor.
    file: File,
    /// With [`DataCache::Reads`], a second, buffered descriptor of the same file for reads.
    reads: Option<File>,
    path: PathBuf,
    len: u64,
    direct: bool,
}

impl UringFile {
    /// Opens an existing file or block device read-write, with O_DIRECT when the file system
    /// supports it.
    pub fn open(path: &Path) -> io::Result<Self> {
        UringFile::open_with(path, true)
    }

    /// [`UringFile::open`]; with `direct` false, through the host's page cache (qemu's
    /// `cache=writeback`): reads of data the host caches skip the device, writes are
    /// durable only after `sync` or with FUA (`RWF_DSYNC`), as on a device with a
    /// volatile write cache — which is what the pool's durability rules already assume.
    pub fn open_with(path: &Path, direct: bool) -> io::Result<Self> {
        UringFile::open_cached(
            path,
            if direct {
                DataCache::None
            } else {
                DataCache::Host
            },
        )
    }

    /// Opens with the page-cache use `cache` asks for ([`DataCache`]); where the file
    /// system refuses O_DIRECT, everything goes through the page cache.
    pub fn open_cached(path: &Path, cache: DataCache) -> io::Result<Self> {
        let direct = (cache != DataCache::Host)
            .then(|| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()
                    .filter(probe_direct)
            })
            .flatten();
        let (file, direct) = match direct {
            Some(f) => (f, true),
            None => (OpenOptions::new().read(true).write(true).open(path)?, false),
        };
        // A block device's async O_DIRECT writes (io_uring's) drop its cached pages only
        // before they are issued, not when they complete (block/fops.c, unlike iomap file
        // systems): a read-ahead racing a write could keep a block's old contents cached.
        // So on a block device reads go around the page cache too.
        let block_device = file.metadata()?.file_type().is_block_device();
        let reads = match (cache, direct, block_device) {
            (DataCache::Reads, true, false) => Some(OpenOptions::new().read(true).open(path)?),
            _ => None,
        };
        let len = (&file).seek(SeekFrom::End(0))?;
        Ok(UringFile {
            file,
            reads,
            path: path.to_path_buf(),
            len,
            direct,
        })
    }

    /// Creates (or truncates) a regular file of `size` bytes, sparse.
    pub fn create_file(path: &Path, size: u64) -> io::Result<()> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.set_len(size)?;
        f.sync_all()
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// What this device actually does: O_DIRECT refused by the file system means `Host`; a
    /// block device asked for `Reads` gives `None`.
    pub fn data_cache(&self) -> DataCache {
        match (self.direct, self.reads.is_some()) {
            (false, _) => DataCache::Host,
            (true, true) => DataCache::Reads,
            (true, false) => DataCache::None,
        }
    }

    /// The descriptor reads use: the buffered one of [`DataCache::Reads`], except for bulk
    /// reads (`meta::bulk_reads`: scrub, a backup reading a snapshot), which read the media
    /// through the O_DIRECT one — scrub checks what is on the device, not a cached copy,
    /// and one pass over a volume does not evict the page cache's working set.
    fn read_file(&self) -> &File {
        match &self.reads {
            Some(r) if !crate::meta::is_bulk() => r,
            _ => &self.file,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with_ring<R>(&self, f: impl FnOnce(Option<&mut IoUring>) -> R) -> R {
        RING.with(|cell| {
            let mut st = cell.borrow_mut();
            if matches!(*st, RingState::Untried) {
                *st = match IoUring::new(RING_ENTRIES) {
                    Ok(r) => RingState::Ready(Box::new(r)),
                    Err(e) => {
                        log::warn!("io_uring unavailable ({e}); using pread/pwrite on this thread");
                        RingState::Unavailable
                    }
                };
            }
            match &mut *st {
                RingState::Ready(r) => f(Some(r)),
                _ => f(None),
            }
        })
    }
}

/// O_DIRECT opens succeed on some file systems whose I/O then fails with EINVAL; try one read.
fn probe_direct(f: &File) -> bool {
    let mut b = AlignedBuf::zeroed(BLOCK_SIZE);
    f.read_at(&mut b, 0).is_ok()
}

/// One prepared operation: raw pointer and length into a caller buffer that outlives the
/// submission (the caller waits for every completion before returning).
struct Op {
    offset: u64,
    ptr: *mut u8,
    len: usize,
}

fn run_ops(
    ring: &mut IoUring,
    fd: i32,
    ops: &[Op],
    write: bool,
    fua: bool,
) -> io::Result<Vec<i32>> {
    let lens = ops
        .iter()
        .map(|op| u32::try_from(op.len))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment over 4 GiB"))?;
    let mut results = vec![0i32; ops.len()];
    let mut next = 0usize;
    let mut inflight = 0usize;
    let mut first_err: Option<io::Error> = None;
    let mut hard_errors = 0u32;
    while (next < ops.len() && first_err.is_none()) || inflight > 0 {
        while next < ops.len() && first_err.is_none() {
            let op = &ops[next];
            let sqe = if write {
                let mut w = opcode::Write::new(types::Fd(fd), op.ptr as *const u8, lens[next])
                    .offset(op.offset);
                if fua {
                    w = w.rw_flags(libc::RWF_DSYNC);
                }
                w.build()
            } else {
                opcode::Read::new(types::Fd(fd), op.ptr, lens[next])
                    .offset(op.offset)
                    .build()
            }
            .user_data(next as u64);
            // SAFETY: the buffer behind op.ptr/len belongs to a segment borrowed by our
            // caller for the whole call, and this function does not return while any pushed
            // entry is still in flight (the loop runs while inflight > 0, even after errors;
            // see below), so the kernel never touches memory that has been freed or reused.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                break; // submission queue full: submit what we have first
            }
            next += 1;
            inflight += 1;
        }
        if inflight == 0 {
            break;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) => {}
            Err(e) => {
                // Stop submitting, but keep reaping: returning now would free buffers the
                // kernel may still be using.
                hard_errors += 1;
                if first_err.is_none() {
                    first_err = Some(e);
                }
                if hard_errors > 10_000 {
                    log::error!("io_uring: cannot reap {inflight} in-flight operations; aborting to avoid memory corruption");
                    std::process::abort();
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            if let Some(r) = results.get_mut(i) {
                *r = cqe.result();
            }
            inflight = inflight.saturating_sub(1);
        }
        if first_err.is_none() {
            if let Some(r) = results[..next]
                .iter()
                .find(|r| **r < 0 && **r != -libc::EAGAIN && **r != -libc::EINTR)
            {
                first_err = Some(io::Error::from_raw_os_error(-r));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

impl DataDevice for UringFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, segs: &mut [ReadSeg<'_>]) -> io::Result<()> {
        for s in segs.iter() {
            check_aligned(s.offset, s.buf)?;
        }
        let ops: Vec<Op> = segs
            .iter_mut()
            .map(|s| Op {
                offset: s.offset,
                ptr: s.buf.as_mut_ptr(),
                len: s.buf.len(),
            })
            .collect();
        let fd = self.read_file().as_raw_fd();
        let results = self.with_ring(|ring| match ring {
            Some(r) => run_ops(r, fd, &ops, false, false).map(Some),
            None => Ok(None),
        })?;
        for (i, s) in segs.iter_mut().enumerate() {
            let done = results.as_ref().map_or(0, |r| r[i].max(0) as usize);
            if done < s.buf.len() {
                // Short or retryable completion (or no ring): finish synchronously.
                self.read_file()
                    .read_exact_at(&mut s.buf[done..], s.offset + done as u64)?;
            }
        }
        Ok(())
    }

    fn write(&self, segs: &[WriteSeg<'_>], fua: bool) -> io::Result<()> {
        for s in segs {
            check_aligned(s.offset, s.buf)?;
        }
        let ops: Vec<Op> = segs
            .iter()
            .map(|s| Op {
                offset: s.offset,
                ptr: s.buf.as_ptr() as *mut u8,
                len: s.buf.len(),
            })
            .collect();
        let fd = self.file.as_raw_fd();
        let results = self.with_ring(|ring| match ring {
            Some(r) => run_ops(r, fd, &ops, true, fua).map(Some),
            None => Ok(None),
        })?;
        let mut slow = false;
        for (i, s) in segs.iter().enumerate() {
            let done = results.as_ref().map_or(0, |r| r[i].max(0) as usize);
            if done < s.buf.len() {
                self.file
                    .write_all_at(&s.buf[done..], s.offset + done as u64)?;
                slow = true;
            }
        }
        if slow && fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn raw_read_fd(&self) -> Option<std::os::unix::io::RawFd> {
        Some(self.reads.as_ref().unwrap_or(&self.file).as_raw_fd())
    }

    fn reads_cached(&self) -> bool {
        self.reads.is_some()
    }

    fn forget_cached(&self, offset: u64, len: u64) {
        if let (Some(r), Ok(off), Ok(len)) = (
            &self.reads,
            libc::off_t::try_from(offset),
            libc::off_t::try_from(len),
        ) {
            // SAFETY: an advisory call on a descriptor this device owns; no memory passed.
            unsafe { libc::posix_fadvise(r.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_roundtrip() {
        roundtrip(true);
    }

    #[test]
    fn read_write_roundtrip_through_the_page_cache() {
        roundtrip(false);
    }

    /// Whether `p` lives on ext4, xfs or btrfs with 4 KiB pages: file systems whose page
    /// cache caches the disk, so mincore shows what reads cached.
    fn page_cache_observable(p: &Path) -> bool {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statfs fills the zeroed struct passed by pointer; `c` outlives the call.
        let (rc, st) = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            (libc::statfs(c.as_ptr(), &mut st), st)
        };
        // SAFETY: sysconf has no memory arguments.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        // ext4, xfs, btrfs
        rc == 0 && page == 4096 && matches!(st.f_type, 0xEF53 | 0x5846_5342 | 0x9123_683E)
    }

    /// Pages of the 8 KiB at `off` of the 1 MiB file `p` that are in the page cache.
    fn cached_pages(p: &Path, off: usize) -> usize {
        let f = File::open(p).unwrap();
        // SAFETY: a private read-only mapping of the whole 1 MiB file, only passed to
        // mincore (never dereferenced) and unmapped before returning.
        unsafe {
            let m = libc::mmap(
                std::ptr::null_mut(),
                1 << 20,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(m, libc::MAP_FAILED);
            let mut v = [0u8; 2];
            let rc = libc::mincore(m.cast::<u8>().add(off).cast(), 8192, v.as_mut_ptr());
            libc::munmap(m, 1 << 20);
            assert_eq!(rc, 0);
            v.iter().filter(|&&x| x & 1 != 0).count()
        }
    }

    /// With reads through the page cache and writes around it, a read after an overwrite
    /// sees the new contents even though the old ones were cached (what the pool relies
    /// on when it reuses a freed block).
    #[test]
    fn direct_writes_drop_what_buffered_reads_cached() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        UringFile::create_file(&p, 1 << 20).unwrap();
        let d = UringFile::open_cached(&p, DataCache::Reads).unwrap();
        if !d.is_direct() {
            assert_eq!(d.data_cache(), DataCache::Host);
            return; // no O_DIRECT here (older tmpfs): nothing to split
        }
        assert_eq!(d.data_cache(), DataCache::Reads);
        let direct_flag = |fd: i32| {
            // SAFETY: F_GETFL on a descriptor this device keeps open for its lifetime.
            let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            assert!(fl >= 0);
            fl & libc::O_DIRECT != 0
        };
        assert!(
            direct_flag(d.raw_fd().unwrap()),
            "writes go around the page cache"
        );
        assert!(
            !direct_flag(d.raw_read_fd().unwrap()),
            "reads go through it"
        );
        // A read caches what it read; a bulk read (scrub, backup) reads the media and
        // caches nothing. Observable with mincore only where the page cache is a cache of
        // a disk file system with 4 KiB pages (on tmpfs the page cache is the file, ZFS
        // caches in its ARC).
        if page_cache_observable(&p) {
            let mut r = AlignedBuf::zeroed(8192);
            crate::meta::bulk_reads(|| {
                d.read(&mut [ReadSeg {
                    offset: 512 << 10,
                    buf: &mut r,
                }])
            })
            .unwrap();
            assert_eq!(
                cached_pages(&p, 512 << 10),
                0,
                "a bulk read left pages cached"
            );
            d.read(&mut [ReadSeg {
                offset: 768 << 10,
                buf: &mut r,
            }])
            .unwrap();
            assert_eq!(
                cached_pages(&p, 768 << 10),
                2,
                "a read did not go through the cache"
            );
        } else {
            eprintln!("page cache residency not checked on this file system");
        }
        for round in 0..8u8 {
            let mut w = AlignedBuf::zeroed(16384);
            w.fill(round.wrapping_mul(37) | 1);
            d.write(
                &[WriteSeg {
                    offset: 8192,
                    buf: &w,
                }],
                false,
            )
            .unwrap();
            // Twice: the second read is served from the page cache the first filled.
            for _ in 0..2 {
                let mut r = AlignedBuf::zeroed(32768);
                d.read(&mut [ReadSeg {
                    offset: 0,
                    buf: &mut r,
                }])
                .unwrap();
                assert!(r[8192..24576].iter().all(|&x| x == w[0]), "round {round}");
            }
        }
    }

    /// On a block device, async direct writes do not drop cached pages when they complete,
    /// so `Reads` reads around the page cache there. Needs root and a loop device: skipped
    /// (and says so) without them.
    #[test]
    fn a_block_device_asked_for_reads_reads_around_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("backing");
        UringFile::create_file(&p, 4 << 20).unwrap();
        let out = match std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&p)
            .output()
        {
            Ok(o) if o.status.success() => o,
            other => {
                eprintln!("skipped: no loop device ({other:?})");
                return;
            }
        };
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", &self.0])
                    .status();
            }
        }
        let loopdev = Detach(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let d = UringFile::open_cached(Path::new(&loopdev.0), DataCache::Reads).unwrap();
        // Detached while open: the kernel frees it at the last close, even if this test is
        // killed.
        drop(loopdev);
        assert!(d.is_direct());
        assert_eq!(d.data_cache(), DataCache::None);
        assert_eq!(d.raw_fd(), d.raw_read_fd());
        // The file behind it, opened as a file, does split.
        let f = UringFile::open_cached(&p, DataCache::Reads).unwrap();
        if f.is_direct() {
            assert_eq!(f.data_cache(), DataCache::Reads);
        }
    }

    fn roundtrip(direct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        UringFile::create_file(&p, 1 << 20).unwrap();
        let d = UringFile::open_with(&p, direct).unwrap();
        if !direct {
            assert!(!d.is_direct());
        }
        assert_eq!(d.len(), 1 << 20);
        let mut a = AlignedBuf::zeroed(8192);
        a.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
        let mut b = AlignedBuf::zeroed(4096);
        b.fill(0xab);
        d.write(
            &[
                WriteSeg {
                    offset: 4096,
                    buf: &a,
                },
                WriteSeg {
                    offset: 65536,
                    buf: &b,
                },
            ],
            true,
        )
        .unwrap();
        let mut r1 = AlignedBuf::zeroed(8192);
        let mut r2 = AlignedBuf::zeroed(4096);
        d.read(&mut [
            ReadSeg {
                offset: 4096,
                buf: &mut r1,
            },
            ReadSeg {
                offset: 65536,
                buf: &mut r2,
            },
        ])
        .unwrap();
        assert_eq!(&r1[..], &a[..]);
        assert_eq!(&r2[..], &b[..]);
        d.sync().unwrap();
        // Past the end: an error, not a panic.
        let mut r3 = AlignedBuf::zeroed(4096);
        assert!(d
            .read(&mut [ReadSeg {
                offset: 2 << 20,
                buf: &mut r3
            }])
            .is_err());
        // Unaligned: refused.
        let v = vec![0u8; 100];
        assert!(d.write(&[WriteSeg { offset: 0, buf: &v }], false).is_err());
    }
}
