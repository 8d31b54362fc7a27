//! Test bodies shared by every implementation: each takes a factory, so the same
//! assertions run against `MemStore` and RocksDB, `MemDevice` and the io_uring file.

pub mod cells;
pub mod conformance;
pub mod counting;
pub mod model;
pub mod powerloss;

use std::sync::Arc;

use snapblk_core::device::DataDevice;
use snapblk_core::{MetaStore, Pool};

/// A place a pool lives, that can be closed and opened again.
pub trait PoolEnv {
    /// Opens the pool (formatting it on first use). The previous pool must be dropped.
    fn open(&mut self) -> Arc<Pool>;
}

/// A `PoolEnv` from two factories; `make_store` is called for every (re)open.
pub struct FactoryEnv<S, D> {
    pub make_store: S,
    pub make_dev: D,
    pub formatted: bool,
}

impl<S, D> PoolEnv for FactoryEnv<S, D>
where
    S: FnMut() -> Arc<dyn MetaStore>,
    D: FnMut() -> Arc<dyn DataDevice>,
{
    fn open(&mut self) -> Arc<Pool> {
        let store = (self.make_store)();
        let dev = (self.make_dev)();
        if !self.formatted {
            Pool::format(&*store, &*dev).expect("format");
            self.formatted = true;
        }
        Pool::open(store, dev).expect("open")
    }
}

/// An environment in memory; reopening keeps the same store and device.
pub fn mem_env(device_bytes: u64) -> impl PoolEnv {
    let store: Arc<dyn MetaStore> = Arc::new(snapblk_core::MemStore::new());
    let dev: Arc<dyn DataDevice> =
        Arc::new(snapblk_core::device::mem::MemDevice::new(device_bytes));
    FactoryEnv {
        make_store: move || Arc::clone(&store),
        make_dev: move || Arc::clone(&dev),
        formatted: false,
    }
}
