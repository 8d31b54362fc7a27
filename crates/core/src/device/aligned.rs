//! A heap buffer aligned to the block size, as O_DIRECT requires.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::BLOCK_SIZE;

/// A byte buffer whose start is `BLOCK_SIZE`-aligned, every byte initialised (zeroed, or
/// copied in at allocation).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Vec<u8>), so moving it to or sharing
// it with another thread is as safe as for Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8]; mutation requires &mut self.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` may be 0).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    /// A buffer holding a copy of `data`, written once: no zeroing pass first (a
    /// zeroed allocation of this alignment is memset by the allocator, then overwritten:
    /// the write path copies every block it writes).
    pub fn copy_of(data: &[u8]) -> Self {
        let len = data.len();
        if len == 0 {
            return AlignedBuf::zeroed(0);
        }
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: `raw` is a fresh allocation of `len` bytes, `data` is `len` readable bytes
        // elsewhere (no overlap); after the copy every byte of the buffer is initialised, as
        // Deref requires.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), raw, len) };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, BLOCK_SIZE) {
            Ok(l) => l,
            // Only reachable for len > isize::MAX - 4095, which no caller can allocate anyway.
            Err(_) => alloc::handle_alloc_error(Layout::new::<[u8; BLOCK_SIZE]>()),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised (zeroed at allocation) bytes owned by self, or
        // is dangling with len 0, which from_raw_parts allows for a well-aligned pointer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr was allocated (by alloc or alloc_zeroed) with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

/// A growable byte buffer whose start is `BLOCK_SIZE`-aligned: a writer that builds its
/// data in one hands the pool memory it can send to the device as it is (the pool copies
/// unaligned data into an [`AlignedBuf`] first). Kept and reused, it costs no allocation
/// per write.
#[derive(Default)]
pub struct AlignedVec {
    buf: Option<AlignedBuf>,
    len: usize,
}

impl AlignedVec {
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `total` bytes in all (rounded up to whole blocks) at once, so a
    /// buffer whose largest use is known is allocated once at that size and never grows
    /// through the smaller sizes (each growth frees the last buffer into the allocator's
    /// arenas, where its pages may stay resident).
    pub fn reserve_total(&mut self, total: usize) {
        let cap = self.buf.as_ref().map_or(0, |b| b.len());
        if total > cap {
            let b = AlignedBuf::zeroed(total.div_ceil(BLOCK_SIZE).max(1) * BLOCK_SIZE);
            self.replace(b);
        }
    }

    /// Moves the contents into `b` (at least `len` bytes) and keeps `b`.
    fn replace(&mut self, mut b: AlignedBuf) {
        if let Some(old) = &self.buf {
            b[..self.len].copy_from_slice(&old[..self.len]);
        }
        self.buf = Some(b);
    }

    /// Appends `data`, growing the buffer (to a power of two blocks) if it must.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        let need = self.len + data.len();
        let cap = self.buf.as_ref().map_or(0, |b| b.len());
        if need > cap {
            let new_cap = need.next_power_of_two().max(BLOCK_SIZE);
            self.replace(AlignedBuf::zeroed(new_cap));
        }
        if let Some(b) = &mut self.buf {
            b[self.len..need].copy_from_slice(data);
        }
        self.len = need;
    }
}

impl Deref for AlignedVec {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b[..self.len])
    }
}

/// Whether `data` may go to an O_DIRECT device as it is: its start is `BLOCK_SIZE`-aligned
/// in memory.
pub fn is_aligned(data: &[u8]) -> bool {
    (data.as_ptr() as usize).is_multiple_of(BLOCK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_vec_grows_keeps_and_stays_aligned() {
        let mut v = AlignedVec::default();
        assert!(v.is_empty());
        let mut want = Vec::new();
        for i in 0..40u32 {
            let piece: Vec<u8> = (0..(i as usize * 1000 + 1))
                .map(|k| (k as u32 ^ i) as u8)
                .collect();
            v.extend_from_slice(&piece);
            want.extend_from_slice(&piece);
            assert_eq!(&v[..], &want[..]);
            assert!(is_aligned(&v));
        }
        v.clear();
        assert!(v.is_empty());
        v.extend_from_slice(b"abc");
        assert_eq!(&v[..], b"abc");
    }

    #[test]
    fn reserved_total_is_allocated_once_and_keeps_contents() {
        let mut v = AlignedVec::default();
        v.extend_from_slice(b"head");
        v.reserve_total(3 * BLOCK_SIZE + 1);
        assert_eq!(&v[..], b"head");
        assert!(is_aligned(&v));
        let at = v.as_ptr();
        // Everything up to the reserved total fits without another allocation.
        v.extend_from_slice(&vec![7u8; 4 * BLOCK_SIZE - 4]);
        assert_eq!(v.as_ptr(), at);
        assert_eq!(v.len(), 4 * BLOCK_SIZE);
        assert_eq!(&v[..4], b"head");
        // A smaller reservation changes nothing; past it the buffer grows as before.
        v.reserve_total(BLOCK_SIZE);
        assert_eq!(v.as_ptr(), at);
        v.extend_from_slice(b"x");
        assert_eq!(v.len(), 4 * BLOCK_SIZE + 1);
        assert_eq!(v[4 * BLOCK_SIZE], b'x');
        assert!(is_aligned(&v));
    }

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 4096, 3 * 4096 + 17] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % BLOCK_SIZE, 0);
                b[len - 1] = 9;
                assert_eq!(b[len - 1], 9);
            }
        }
    }

    #[test]
    fn copies_are_aligned_and_exact() {
        for len in [0, 1, 4096, 3 * 4096 + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let b = AlignedBuf::copy_of(&data);
            assert_eq!(&b[..], &data[..]);
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % BLOCK_SIZE, 0);
            }
        }
    }
}
