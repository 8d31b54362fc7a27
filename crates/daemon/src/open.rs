//! Creating and opening a pool from paths: the RocksDB store in `<meta>/db`, the data
//! device, and the exclusive lock (held as long as the returned [`Opened`] lives).

use std::path::Path;
use std::sync::Arc;

use snapblk_core::device::uring::{DataCache, UringFile};
use snapblk_core::device::{AlignedBuf, DataDevice, DeviceHeader, ReadSeg, BLOCK_SIZE};
use snapblk_core::lock::PoolLock;
use snapblk_core::Pool;
pub use snapblk_rocks::Memory;
use snapblk_rocks::RocksStore;

use crate::error::{DaemonError, Result};

pub struct Opened {
    pub pool: Arc<Pool>,
    _lock: PoolLock,
}

/// How an open pool uses RAM and the data device.
#[derive(Debug, Clone, Copy)]
pub struct OpenSettings {
    /// What the metadata store may hold (a daemon's, or a one-shot command's).
    pub memory: Memory,
    /// Bytes of snapshot page contents kept (`None`: a quarter of the store's block cache).
    pub snapshot_cache: Option<usize>,
    /// How data I/O uses the host's page cache (`data_cache`).
    pub data_cache: DataCache,
}

impl OpenSettings {
    /// A one-shot command's: small caches, O_DIRECT data.
    pub const ONE_SHOT: OpenSettings = OpenSettings {
        memory: Memory::ONE_SHOT,
        snapshot_cache: None,
        data_cache: DataCache::None,
    };
}

/// Opens the pool under its lock, with `settings`.
pub fn open_pool(meta: &Path, data: &Path, holder: &str, settings: OpenSettings) -> Result<Opened> {
    let memory = settings.memory;
    let snapshot_cache = settings.snapshot_cache;
    if !meta.is_dir() {
        return Err(DaemonError::Invalid(format!(
            "metadata directory {} does not exist (create the pool with `snapblk pool create`)",
            meta.display()
        )));
    }
    let lock = PoolLock::acquire(meta, holder)?;
    crate::media::set_pool_paths(meta, data);
    let (store, dev) = open_parts(meta, data, memory, settings.data_cache)?;
    match (settings.data_cache, dev.data_cache()) {
        (DataCache::Reads, DataCache::None) => log::info!(
            "{}: a block device: reads with O_DIRECT too, since its direct writes do not drop \
             cached pages when they complete (data_cache = \"none\")",
            data.display()
        ),
        (asked, got) if asked != got => log::info!(
            "{}: O_DIRECT not supported here; using buffered I/O",
            data.display()
        ),
        (DataCache::None, _) => log::info!(
            "{}: data I/O with O_DIRECT (data_cache = \"none\")",
            data.display()
        ),
        (DataCache::Reads, _) => log::info!(
            "{}: data writes with O_DIRECT, reads through the host page cache (data_cache = \"reads\")",
            data.display()
        ),
        (DataCache::Host, _) => log::info!(
            "{}: data I/O through the host page cache (data_cache = \"host\")",
            data.display()
        ),
    }
    // Page contents at retained epochs (snapshot and clone reads) get by default a
    // quarter of what the store caches: 64 MiB in a daemon, 512 KiB in a one-shot command.
    let opts = snapblk_core::pool2::OpenOptions {
        content_cache: snapshot_cache.unwrap_or(memory.block_cache / 4),
        ..Default::default()
    };
    let pool = Pool::open_with(Arc::new(store), Arc::new(dev), &opts).map_err(|e| {
        DaemonError::from(e).context(format!(
            "opening pool (meta {}, data {})",
            meta.display(),
            data.display()
        ))
    })?;
    Ok(Opened { pool, _lock: lock })
}

/// The metadata store in `<meta>/db` and the data device (the caller holds the lock).
fn open_parts(
    meta: &Path,
    data: &Path,
    memory: Memory,
    cache: DataCache,
) -> Result<(RocksStore, UringFile)> {
    let store = RocksStore::open_with(&meta.join("db"), false, memory)
        .map_err(|e| pool_err(e).context(format!("opening metadata in {}", meta.display())))?;
    let dev = UringFile::open_cached(data, cache).map_err(DaemonError::io(format!(
        "opening data device {}",
        data.display()
    )))?;
    Ok((store, dev))
}

/// `pool upgrade`: converts a format-1 pool in place, under the pool lock.
pub fn upgrade_pool(
    meta: &Path,
    data: &Path,
    progress: &dyn Fn(&str),
) -> Result<snapblk_core::upgrade::UpgradeReport> {
    if !meta.is_dir() {
        return Err(DaemonError::Invalid(format!(
            "metadata directory {} does not exist",
            meta.display()
        )));
    }
    let _lock = PoolLock::acquire(meta, "snapblk pool upgrade")?;
    let (store, dev) = open_parts(meta, data, Memory::DAEMON, DataCache::None)?;
    snapblk_core::upgrade::upgrade(Arc::new(store), Arc::new(dev), progress).map_err(|e| {
        DaemonError::from(e).context(format!(
            "upgrading pool (meta {}, data {})",
            meta.display(),
            data.display()
        ))
    })
}

fn has_header(dev: &UringFile) -> bool {
    let mut b = AlignedBuf::zeroed(BLOCK_SIZE);
    dev.read(&mut [ReadSeg {
        offset: 0,
        buf: &mut b,
    }])
    .is_ok()
        && DeviceHeader::decode(&b, "").is_ok()
}

pub fn create_pool(meta: &Path, data: &Path, size: Option<u64>, force: bool) -> Result<String> {
    std::fs::create_dir_all(meta)
        .map_err(DaemonError::io(format!("creating {}", meta.display())))?;
    let _lock = PoolLock::acquire(meta, "snapblk pool create")?;
    let db = meta.join("db");
    if db.join("CURRENT").exists() {
        return Err(DaemonError::Exists(format!(
            "{} already holds a pool's metadata",
            meta.display()
        )));
    }
    let is_file = || {
        data.metadata()
            .map(|m| m.is_file())
            .map_err(DaemonError::io(format!("reading {}", data.display())))
    };
    let invalid = |m: String| Err(DaemonError::Invalid(m));
    match (data.exists(), size) {
        (false, Some(sz)) => UringFile::create_file(data, sz)
            .map_err(DaemonError::io(format!("creating {}", data.display())))?,
        (false, None) => {
            return invalid(format!(
                "{} does not exist: give --size to create a data file",
                data.display()
            ))
        }
        (true, Some(_)) if is_file()? && !force => {
            return Err(DaemonError::Exists(format!(
                "{} already exists; refusing to overwrite it without --force",
                data.display()
            )))
        }
        (true, Some(sz)) if is_file()? => {
            UringFile::create_file(data, sz)
                .map_err(DaemonError::io(format!("recreating {}", data.display())))?;
        }
        (true, Some(_)) => {
            return invalid(format!(
                "--size applies to data files only; {} is a device",
                data.display()
            ))
        }
        (true, None) => {}
    }
    let dev =
        UringFile::open(data).map_err(DaemonError::io(format!("opening {}", data.display())))?;
    if has_header(&dev) && !force {
        return Err(DaemonError::Exists(format!(
            "{} already holds a snapblk pool; refusing to overwrite it without --force",
            data.display()
        )));
    }
    let store = RocksStore::open(&db, true)
        .map_err(|e| pool_err(e).context(format!("creating metadata in {}", db.display())))?;
    Ok(Pool::format(&store, &dev)?)
}

fn pool_err(e: snapblk_core::StoreError) -> DaemonError {
    DaemonError::Pool(e.into())
}
