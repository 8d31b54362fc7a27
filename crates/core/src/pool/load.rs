//! Formatting a new pool and opening an existing one (loading the tree, rebuilding the
//! allocator from the extent map).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use crate::alloc::Allocator;
use crate::device::{DataDevice, DeviceHeader, BLOCK_SIZE, BLOCK_SIZE_U64, DATA_START};
use crate::error::{Error, Result};
use crate::keys::{
    self, LayerRecord, MapValue, SnapshotRecord, SuperRecord, VolumeRecord, FORMAT_VERSION,
};
use crate::meta::{try_scan, MetaRead, MetaStore, WriteBatch};

use super::{Pool, Tree, STRIPES};

impl Pool {
    /// Formats an empty store and a data device as a new pool; returns its uuid.
    pub fn format(store: &dyn MetaStore, dev: &dyn DataDevice) -> Result<String> {
        if store.get(&keys::super_key())?.is_some() {
            return Err(Error::exists(
                "pool",
                "metadata directory already holds a pool",
            ));
        }
        let len = dev.len();
        if len < DATA_START + 16 * BLOCK_SIZE_U64 {
            return Err(Error::invalid(
                "data device size",
                format!(
                    "{len} bytes is too small (minimum {} bytes)",
                    DATA_START + 16 * BLOCK_SIZE_U64
                ),
            ));
        }
        let uuid = uuid::Uuid::new_v4();
        let header = DeviceHeader {
            format_version: FORMAT_VERSION,
            block_size: BLOCK_SIZE as u32,
            pool_uuid: *uuid.as_bytes(),
            data_start: DATA_START,
            size_at_format: len,
        };
        crate::identity::write_header(dev, &header)?;
        let sup = SuperRecord {
            format_version: FORMAT_VERSION,
            pool_uuid: uuid.to_string(),
            block_size: BLOCK_SIZE as u32,
            data_start: DATA_START,
            data_blocks: (len - DATA_START) / BLOCK_SIZE_U64,
            created: keys::now_secs(),
        };
        let mut b = WriteBatch::new();
        b.put(keys::super_key(), keys::encode_record(&sup));
        b.put(keys::next_id_key(), 1u64.to_be_bytes().to_vec());
        crate::failpoint!("format.before_commit");
        store.commit(b, true)?;
        Ok(sup.pool_uuid)
    }

    /// Reads and checks the superblock and the device header.
    fn check_identity(store: &dyn MetaStore, dev: &dyn DataDevice) -> Result<SuperRecord> {
        crate::identity::check(store, dev, FORMAT_VERSION)
    }

    /// Loads names and layers from the store.
    pub(crate) fn load_tree(store: &(impl MetaRead + ?Sized)) -> Result<Tree> {
        let mut tree = Tree::default();
        let nk = keys::next_id_key();
        tree.next_id = match store.get(&nk)? {
            Some(v) if v.len() == 8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&v);
                u64::from_be_bytes(a)
            }
            Some(v) => {
                return Err(Error::Corrupt(format!(
                    "next-id record of {} bytes",
                    v.len()
                )))
            }
            None => 1,
        };
        let mut layers = Vec::new();
        let (a, b) = keys::prefix_range(keys::K_LAYER);
        try_scan(store, &a, &b, |k, v| {
            layers.push(keys::decode_record::<LayerRecord>("layer", k, v)?);
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        let (a, b) = keys::prefix_range(keys::K_VOLUME);
        try_scan(store, &a, &b, |k, v| {
            let r: VolumeRecord = keys::decode_record("volume", k, v)?;
            tree.names.insert(r.name.clone(), r.id);
            tree.volumes.insert(r.id, r);
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        let (a, b) = keys::prefix_range(keys::K_SNAPSHOT);
        try_scan(store, &a, &b, |k, v| {
            let vol = keys::decode_u64_suffix(k, keys::K_SNAPSHOT)?;
            let r: SnapshotRecord = keys::decode_record("snapshot", k, v)?;
            tree.snapshots.insert((vol, r.name.clone()), r);
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        for l in &layers {
            tree.layers.insert(
                l.id,
                super::tree::LayerInfo {
                    rec: l.clone(),
                    children: Default::default(),
                    entries: 0,
                    data_blocks: 0,
                },
            );
        }
        for l in &layers {
            if let Some(p) = l.parent {
                match tree.layers.get_mut(&p) {
                    Some(pl) => {
                        pl.children.insert(l.id);
                    }
                    None => {
                        return Err(Error::Corrupt(format!(
                            "layer {} has missing parent {p}",
                            l.id
                        )))
                    }
                }
            }
        }
        Ok(tree)
    }

    /// Opens a formatted pool: checks identity, loads the tree, rebuilds the allocator and
    /// per-layer counts from the extent map, and queues reclaim of unreferenced layers.
    pub fn open(store: Arc<dyn MetaStore>, dev: Arc<dyn DataDevice>) -> Result<Arc<Pool>> {
        let sup = Self::check_identity(&*store, &*dev)?;
        let mut tree = Self::load_tree(&*store)?;
        let mut alloc = Allocator::new(sup.data_blocks);
        let mut counts: HashMap<u64, (u64, u64)> = HashMap::new();
        let (a, b) = keys::prefix_range(keys::K_MAP);
        try_scan(&*store, &a, &b, |k, v| {
            let (layer, lba) = keys::decode_map_key(k)?;
            let mv = MapValue::decode(v)?;
            let c = counts.entry(layer).or_default();
            c.0 += 1;
            if let Some(pba) = mv.pba() {
                c.1 += 1;
                if !alloc.mark_used(pba) {
                    return Err(Error::Corrupt(format!(
                        "block {pba} (layer {layer}, lba {lba}) is out of range or mapped twice; run `snapblk pool check`"
                    )));
                }
            }
            Ok(ControlFlow::Continue(()))
        })?;
        for (layer, (entries, data)) in counts {
            match tree.layers.get_mut(&layer) {
                Some(l) => {
                    l.entries = entries;
                    l.data_blocks = data;
                }
                None => {
                    return Err(Error::Corrupt(format!(
                        "{entries} map entries belong to missing layer {layer}; run `snapblk pool check`"
                    )))
                }
            }
        }
        let pool = Arc::new(Pool {
            store,
            dev,
            sup,
            tree: RwLock::new(tree),
            alloc: Mutex::new(alloc),
            pins: Default::default(),
            generation: AtomicU64::new(1),
            sync_lock: Mutex::new(()),
            device_sync: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            open_targets: Mutex::new(HashMap::new()),
            resize_lock: Mutex::new(()),
            wake: (Mutex::new(false), Condvar::new()),
            shutdown: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            data_dirty: AtomicBool::new(true),
            background: Mutex::new(None),
        });
        Ok(pool)
    }
}
