//! Helpers shared by the backup engine's integration tests: an in-memory pool, reproducible
//! random contents, and reading a volume or snapshot whole.
#![allow(dead_code)] // each test binary uses its own subset

use std::sync::Arc;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::{Export, MemStore, Pool, VolumeHandle};

pub const MIB: u64 = 1 << 20;

/// A formatted pool in memory with a data device of `device_bytes`.
pub fn pool(device_bytes: u64) -> Arc<Pool> {
    let store = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new(device_bytes));
    Pool::format(&*store, &*dev).unwrap();
    Pool::open(store, dev).unwrap()
}

/// `len` bytes that never repeat a chunk (xorshift from `seed`): incompressible, no dedup.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` at `off` of volume `vol`.
pub fn put(pool: &Arc<Pool>, vol: &str, off: u64, data: &[u8]) {
    VolumeHandle::open(pool, vol)
        .unwrap()
        .write(off, data, false)
        .unwrap();
}

/// The whole contents of a volume or `vol@snap`.
pub fn image(pool: &Arc<Pool>, name: &str) -> Vec<u8> {
    let h = VolumeHandle::open(pool, name).unwrap();
    let mut b = vec![0u8; h.size().unwrap() as usize];
    for (i, c) in b.chunks_mut(MIB as usize).enumerate() {
        h.read(i as u64 * MIB, c).unwrap();
    }
    b
}

/// A failure of `op` on `key`, as a store reports one (for hooks to return).
pub fn store_failure(op: &'static str, key: &str, detail: &str) -> snapblk_backup::StoreError {
    snapblk_backup::StoreError::Failed {
        store: "hooked (test)".into(),
        op,
        key: key.to_string(),
        detail: detail.to_string(),
    }
}

/// One store operation, as a [`Hooked`] store's hook sees it.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    Get(&'a str),
    GetRange {
        key: &'a str,
        offset: u64,
        len: u64,
    },
    Put(&'a str),
    PutNew(&'a str),
    List(&'a str),
    /// A listing of the keys under a prefix after a key (S3's `StartAfter`).
    ListAfter {
        prefix: &'a str,
        after: &'a str,
    },
    /// A HEAD.
    Exists(&'a str),
    Delete(&'a str),
}

/// When a [`Hooked`] store calls its hook.
pub enum Call<'a, 'b> {
    /// Before the operation: an error fails it (the inner store never sees it).
    Before(Op<'a>),
    /// After the operation returned (whatever it returned): an error replaces its result.
    After(Op<'a>),
    /// A listing of `prefix` succeeded: the hook may change what the caller sees.
    Listed(&'a str, &'b mut Vec<snapblk_backup::ObjectMeta>),
}

type HookFn = dyn Fn(Call<'_, '_>) -> Result<(), snapblk_backup::StoreError> + Send + Sync;

/// A store that runs every operation through `inner`, calling a test's hook around each:
/// to fail, count, pause or reorder what the engine sees.
pub struct Hooked {
    pub inner: Arc<dyn snapblk_backup::ObjectStore>,
    hook: Box<HookFn>,
}

impl Hooked {
    pub fn new(
        inner: Arc<dyn snapblk_backup::ObjectStore>,
        hook: impl Fn(Call<'_, '_>) -> Result<(), snapblk_backup::StoreError> + Send + Sync + 'static,
    ) -> Hooked {
        Hooked {
            inner,
            hook: Box::new(hook),
        }
    }

    fn around<T>(
        &self,
        op: Op<'_>,
        f: impl FnOnce() -> Result<T, snapblk_backup::StoreError>,
    ) -> Result<T, snapblk_backup::StoreError> {
        (self.hook)(Call::Before(op))?;
        let r = f();
        (self.hook)(Call::After(op))?;
        r
    }
}

impl snapblk_backup::ObjectStore for Hooked {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn get(&self, key: &str, max: u64) -> Result<Vec<u8>, snapblk_backup::StoreError> {
        self.around(Op::Get(key), || self.inner.get(key, max))
    }
    fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, snapblk_backup::StoreError> {
        let op = Op::GetRange { key, offset, len };
        self.around(op, || self.inner.get_range(key, offset, len))
    }
    fn put(&self, key: &str, data: &[u8]) -> Result<(), snapblk_backup::StoreError> {
        self.around(Op::Put(key), || self.inner.put(key, data))
    }
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool, snapblk_backup::StoreError> {
        self.around(Op::PutNew(key), || self.inner.put_new(key, data))
    }
    fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<snapblk_backup::ObjectMeta>, snapblk_backup::StoreError> {
        let mut v = self.around(Op::List(prefix), || self.inner.list(prefix))?;
        (self.hook)(Call::Listed(prefix, &mut v))?;
        Ok(v)
    }
    fn list_after(
        &self,
        prefix: &str,
        after: &str,
    ) -> Result<Vec<snapblk_backup::ObjectMeta>, snapblk_backup::StoreError> {
        let op = Op::ListAfter { prefix, after };
        let mut v = self.around(op, || self.inner.list_after(prefix, after))?;
        (self.hook)(Call::Listed(prefix, &mut v))?;
        Ok(v)
    }
    fn exists(&self, key: &str) -> Result<bool, snapblk_backup::StoreError> {
        self.around(Op::Exists(key), || self.inner.exists(key))
    }
    fn delete(&self, key: &str) -> Result<(), snapblk_backup::StoreError> {
        self.around(Op::Delete(key), || self.inner.delete(key))
    }
}

/// Whether two volumes or snapshots hold the same bytes (read a MiB at a time).
pub fn same(pool: &Arc<Pool>, a: &str, b: &str) -> bool {
    let (ha, hb) = (
        VolumeHandle::open(pool, a).unwrap(),
        VolumeHandle::open(pool, b).unwrap(),
    );
    let size = ha.size().unwrap();
    if hb.size().unwrap() < size {
        return false;
    }
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        ha.read(off, &mut x[..n]).unwrap();
        hb.read(off, &mut y[..n]).unwrap();
        if x[..n] != y[..n] {
            return false;
        }
        off += n as u64;
    }
    true
}
