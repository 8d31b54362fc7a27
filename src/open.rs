//! Creating and opening a pool from paths: the RocksDB store in `<meta>/db`, the data
//! device, and the exclusive lock.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use snapblk_core::device::uring::UringFile;
use snapblk_core::device::{AlignedBuf, DataDevice, DeviceHeader, ReadSeg, BLOCK_SIZE};
use snapblk_core::lock::PoolLock;
use snapblk_core::Pool;
use snapblk_rocks::RocksStore;

pub struct Opened {
    pub pool: Arc<Pool>,
    _lock: PoolLock,
}

pub fn open_pool(meta: &Path, data: &Path, holder: &str) -> Result<Opened> {
    if !meta.is_dir() {
        bail!(
            "metadata directory {} does not exist (create the pool with `snapblk pool create`)",
            meta.display()
        );
    }
    let lock = PoolLock::acquire(meta, holder)?;
    crate::media::set_pool_paths(meta, data);
    let store = RocksStore::open(&meta.join("db"), false)
        .with_context(|| format!("opening metadata in {}", meta.display()))?;
    let dev =
        UringFile::open(data).with_context(|| format!("opening data device {}", data.display()))?;
    if !dev.is_direct() {
        log::info!(
            "{}: O_DIRECT not supported here; using buffered I/O",
            data.display()
        );
    }
    let pool = Pool::open(Arc::new(store), Arc::new(dev)).with_context(|| {
        format!(
            "opening pool (meta {}, data {})",
            meta.display(),
            data.display()
        )
    })?;
    Ok(Opened { pool, _lock: lock })
}

/// `pool upgrade`: converts a format-1 pool in place, under the pool lock.
pub fn upgrade_pool(
    meta: &Path,
    data: &Path,
    progress: &dyn Fn(&str),
) -> Result<snapblk_core::upgrade::UpgradeReport> {
    if !meta.is_dir() {
        bail!("metadata directory {} does not exist", meta.display());
    }
    let _lock = PoolLock::acquire(meta, "snapblk pool upgrade")?;
    let store = RocksStore::open(&meta.join("db"), false)
        .with_context(|| format!("opening metadata in {}", meta.display()))?;
    let dev =
        UringFile::open(data).with_context(|| format!("opening data device {}", data.display()))?;
    snapblk_core::upgrade::upgrade(Arc::new(store), Arc::new(dev), progress).with_context(|| {
        format!(
            "upgrading pool (meta {}, data {})",
            meta.display(),
            data.display()
        )
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
    std::fs::create_dir_all(meta).with_context(|| format!("creating {}", meta.display()))?;
    let _lock = PoolLock::acquire(meta, "snapblk pool create")?;
    let db = meta.join("db");
    if db.join("CURRENT").exists() {
        bail!("{} already holds a pool's metadata", meta.display());
    }
    match (data.exists(), size) {
        (false, Some(sz)) => UringFile::create_file(data, sz)
            .with_context(|| format!("creating {}", data.display()))?,
        (false, None) => bail!(
            "{} does not exist: give --size to create a data file",
            data.display()
        ),
        (true, Some(_)) if data.metadata()?.is_file() && !force => {
            bail!(
                "{} already exists; refusing to overwrite it without --force",
                data.display()
            )
        }
        (true, Some(sz)) if data.metadata()?.is_file() => {
            UringFile::create_file(data, sz)?;
        }
        (true, Some(_)) => bail!(
            "--size applies to data files only; {} is a device",
            data.display()
        ),
        (true, None) => {}
    }
    let dev = UringFile::open(data).with_context(|| format!("opening {}", data.display()))?;
    if has_header(&dev) && !force {
        bail!(
            "{} already holds a snapblk pool; refusing to overwrite it without --force",
            data.display()
        );
    }
    let store = RocksStore::open(&db, true)
        .with_context(|| format!("creating metadata in {}", db.display()))?;
    Ok(Pool::format(&store, &dev)?)
}
