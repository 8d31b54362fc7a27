//! The pool against a simple in-memory model: random sequences of write / trim /
//! write_zeroes / snapshot / clone / rollback / delete / resize / reclaim / reopen, with every
//! volume and snapshot compared byte for byte after every step and `pool check` clean.

use std::sync::Arc;

use proptest::prelude::*;
use snapblk_core::device::{DataDevice, BLOCK_SIZE};
use snapblk_core::pool2::Pool2;
use snapblk_core::MetaStore;
use snapblk_core::{Error, Pool, Pool1, Target};

use crate::PoolEnv;

/// What the model needs of a pool, so that the same run checks both metadata formats.
pub trait ModelPool {
    fn target_size(&self, t: &Target) -> Result<u64, Error>;
    fn read(&self, t: &Target, offset: u64, out: &mut [u8]) -> Result<(), Error>;
    fn volume_id(&self, name: &str) -> Result<u64, Error>;
    fn volume_count(&self) -> usize;
    fn snapshot_count(&self) -> usize;
    fn check_errors(&self) -> Vec<String>;
    fn create_volume(&self, name: &str, size: u64) -> Result<(), Error>;
    fn write(&self, vol: u64, offset: u64, data: &[u8], fua: bool) -> Result<(), Error>;
    /// A write answered the way the NBD server's are where the pool can (format 2:
    /// `write_then`, the committer settling the write and calling back after its group
    /// commits), waited for here; format 1: `write`.
    fn write_answered(&self, vol: u64, offset: u64, data: &[u8], fua: bool) -> Result<(), Error>;
    fn zero(&self, vol: u64, offset: u64, len: u64, fua: bool) -> Result<(), Error>;
    fn trim(&self, vol: u64, offset: u64, len: u64, fua: bool) -> Result<(), Error>;
    fn create_snapshot(&self, vol: &str, snap: &str) -> Result<(), Error>;
    fn clone_snapshot(&self, vol: &str, snap: &str, new: &str) -> Result<(), Error>;
    fn rollback(&self, vol: &str, snap: &str) -> Result<(), Error>;
    fn delete_snapshot(&self, vol: &str, snap: &str) -> Result<(), Error>;
    fn delete_volume(&self, name: &str, recursive: bool) -> Result<(), Error>;
    fn resize_volume(&self, name: &str, size: u64, force: bool) -> Result<(), Error>;
    fn rename_volume(&self, old: &str, new: &str) -> Result<(), Error>;
    fn reclaim_all(&self) -> Result<(), Error>;
    fn sync(&self) -> Result<(), Error>;
    /// (bytes in use, hidden layers or lineages left over)
    fn usage(&self) -> (u64, usize);
    fn resolve_target(&self, name: &str) -> Result<Target, Error>;
    fn block_location(&self, t: &Target, lba: u64) -> Result<Option<u64>, Error>;
    fn volume_names(&self) -> Vec<String>;
    fn volume_size(&self, name: &str) -> Result<u64, Error>;
    fn snapshot_names(&self, vol: &str) -> Result<Vec<String>, Error>;
    fn shutdown(&self) -> Result<(), Error>;
    fn format_on(store: &dyn MetaStore, dev: &dyn DataDevice) -> Result<String, Error>
    where
        Self: Sized;
    fn open_on(store: Arc<dyn MetaStore>, dev: Arc<dyn DataDevice>) -> Result<Arc<Self>, Error>
    where
        Self: Sized;
    /// Starts background reclaim and periodic sync where the pool does not run them always.
    fn start_background(self: &Arc<Self>)
    where
        Self: Sized;
}

macro_rules! model_pool {
    ($t:ty, $open:expr) => {
        impl ModelPool for $t {
            fn target_size(&self, t: &Target) -> Result<u64, Error> {
                <$t>::target_size(self, t)
            }
            fn read(&self, t: &Target, offset: u64, out: &mut [u8]) -> Result<(), Error> {
                <$t>::read(self, t, offset, out)
            }
            fn volume_id(&self, name: &str) -> Result<u64, Error> {
                <$t>::volume_id(self, name)
            }
            fn volume_count(&self) -> usize {
                <$t>::list_volumes(self).len()
            }
            fn snapshot_count(&self) -> usize {
                <$t>::list_snapshots(self, None)
                    .expect("list snapshots")
                    .len()
            }
            fn check_errors(&self) -> Vec<String> {
                <$t>::check(self).expect("check runs").errors
            }
            fn create_volume(&self, name: &str, size: u64) -> Result<(), Error> {
                <$t>::create_volume(self, name, size).map(drop)
            }
            fn write(&self, vol: u64, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
                <$t>::write(self, vol, offset, data, fua)
            }
            fn write_answered(
                &self,
                vol: u64,
                offset: u64,
                data: &[u8],
                fua: bool,
            ) -> Result<(), Error> {
                Answered::write_answered(self, vol, offset, data, fua)
            }
            fn zero(&self, vol: u64, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
                <$t>::zero(self, vol, offset, len, fua)
            }
            fn trim(&self, vol: u64, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
                <$t>::trim(self, vol, offset, len, fua)
            }
            fn create_snapshot(&self, vol: &str, snap: &str) -> Result<(), Error> {
                <$t>::create_snapshot(self, vol, snap).map(drop)
            }
            fn clone_snapshot(&self, vol: &str, snap: &str, new: &str) -> Result<(), Error> {
                <$t>::clone_snapshot(self, vol, snap, new).map(drop)
            }
            fn rollback(&self, vol: &str, snap: &str) -> Result<(), Error> {
                <$t>::rollback(self, vol, snap).map(drop)
            }
            fn delete_snapshot(&self, vol: &str, snap: &str) -> Result<(), Error> {
                <$t>::delete_snapshot(self, vol, snap)
            }
            fn delete_volume(&self, name: &str, recursive: bool) -> Result<(), Error> {
                <$t>::delete_volume(self, name, recursive)
            }
            fn resize_volume(&self, name: &str, size: u64, force: bool) -> Result<(), Error> {
                <$t>::resize_volume(self, name, size, force).map(drop)
            }
            fn rename_volume(&self, old: &str, new: &str) -> Result<(), Error> {
                <$t>::rename_volume(self, old, new).map(drop)
            }
            fn reclaim_all(&self) -> Result<(), Error> {
                <$t>::reclaim_all(self)
            }
            fn sync(&self) -> Result<(), Error> {
                <$t>::sync(self)
            }
            fn usage(&self) -> (u64, usize) {
                let i = <$t>::info(self);
                (i.used, i.hidden_layers)
            }
            fn resolve_target(&self, name: &str) -> Result<Target, Error> {
                <$t>::resolve_target(self, name)
            }
            fn block_location(&self, t: &Target, lba: u64) -> Result<Option<u64>, Error> {
                <$t>::block_location(self, t, lba)
            }
            fn volume_names(&self) -> Vec<String> {
                <$t>::list_volumes(self)
                    .into_iter()
                    .map(|v| v.name)
                    .collect()
            }
            fn volume_size(&self, name: &str) -> Result<u64, Error> {
                <$t>::volume_info(self, name).map(|v| v.size)
            }
            fn snapshot_names(&self, vol: &str) -> Result<Vec<String>, Error> {
                Ok(<$t>::list_snapshots(self, Some(vol))?
                    .into_iter()
                    .map(|s| s.name)
                    .collect())
            }
            fn shutdown(&self) -> Result<(), Error> {
                <$t>::shutdown(self)
            }
            fn format_on(store: &dyn MetaStore, dev: &dyn DataDevice) -> Result<String, Error> {
                <$t>::format(store, dev)
            }
            fn open_on(
                store: Arc<dyn MetaStore>,
                dev: Arc<dyn DataDevice>,
            ) -> Result<Arc<Self>, Error> {
                ($open)(store, dev)
            }
            fn start_background(self: &Arc<Self>) {
                start_background_of(self)
            }
        }
    };
}
model_pool!(Pool1, Pool1::open);
// A read checkpoint every 2 dead records (the pool's default is 16), so that model and
// power-loss runs read old snapshots both through checkpoints and past the newest one;
// a content cache of 64 KiB (a few dozen pages), so that reads are answered both from it
// and from the store, and entries are evicted; a checksum block as soon as 16 blocks of
// large writes are queued, so that consolidation races the runs' writes, snapshots and
// deletes (format2.md §9b).
model_pool!(Pool2, |s, d| Pool2::open_with(
    s,
    d,
    &snapblk_core::pool2::OpenOptions {
        checkpoint_every: 2,
        content_cache: 64 << 10,
        consolidate: Some(16),
    }
));

trait Answered {
    fn write_answered(&self, vol: u64, offset: u64, data: &[u8], fua: bool) -> Result<(), Error>;
}
impl Answered for Pool1 {
    fn write_answered(&self, vol: u64, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
        self.write(vol, offset, data, fua)
    }
}
impl Answered for Pool2 {
    fn write_answered(&self, vol: u64, offset: u64, data: &[u8], fua: bool) -> Result<(), Error> {
        // Block-aligned memory, as the NBD server's payloads are: whole-block writes then
        // take the path that does not wait for the commit.
        let data = snapblk_core::device::AlignedBuf::copy_of(data);
        let (tx, rx) = std::sync::mpsc::channel();
        self.write_then(
            vol,
            offset,
            &data,
            fua,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv()
            .unwrap_or_else(|_| Err(Error::Busy("a write's answer was lost".into())))
    }
}

trait Background {
    fn start(self: &Arc<Self>);
}
impl Background for Pool1 {
    fn start(self: &Arc<Self>) {
        Pool1::start_background(self)
    }
}
impl Background for Pool2 {
    fn start(self: &Arc<Self>) {
        Pool2::start_background(self)
    }
}
fn start_background_of<P: Background>(p: &Arc<P>) {
    p.start()
}

/// Blocks per volume at creation; small so that operations collide often.
pub const VOL_BLOCKS: u64 = 16;
const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
pub enum Op {
    Create,
    Write {
        vol: usize,
        sector: u64,
        sectors: u64,
        seed: u8,
        zeros: bool,
        fua: bool,
    },
    Zero {
        vol: usize,
        sector: u64,
        sectors: u64,
    },
    Trim {
        vol: usize,
        sector: u64,
        sectors: u64,
    },
    Snapshot {
        vol: usize,
    },
    Clone {
        snap: usize,
    },
    Rollback {
        snap: usize,
    },
    DeleteSnapshot {
        snap: usize,
    },
    DeleteVolume {
        vol: usize,
        recursive: bool,
    },
    Resize {
        vol: usize,
        blocks: u64,
    },
    Rename {
        vol: usize,
    },
    Reclaim,
    Sync,
    Reopen,
}

pub fn op_strategy() -> impl Strategy<Value = Op> {
    let span = VOL_BLOCKS * (BLOCK_SIZE as u64) / SECTOR;
    prop_oneof![
        1 => Just(Op::Create),
        8 => (any::<usize>(), 0..span, 1..=24u64, any::<u8>(), prop::bool::weighted(0.1), any::<bool>())
            .prop_map(|(vol, sector, sectors, seed, zeros, fua)| Op::Write { vol, sector, sectors, seed, zeros, fua }),
        3 => (any::<usize>(), 0..span, 1..=40u64).prop_map(|(vol, sector, sectors)| Op::Zero { vol, sector, sectors }),
        2 => (any::<usize>(), 0..span, 1..=40u64).prop_map(|(vol, sector, sectors)| Op::Trim { vol, sector, sectors }),
        3 => any::<usize>().prop_map(|vol| Op::Snapshot { vol }),
        1 => any::<usize>().prop_map(|snap| Op::Clone { snap }),
        1 => any::<usize>().prop_map(|snap| Op::Rollback { snap }),
        2 => any::<usize>().prop_map(|snap| Op::DeleteSnapshot { snap }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(vol, recursive)| Op::DeleteVolume { vol, recursive }),
        1 => (any::<usize>(), 1..=(2 * VOL_BLOCKS)).prop_map(|(vol, blocks)| Op::Resize { vol, blocks }),
        1 => any::<usize>().prop_map(|vol| Op::Rename { vol }),
        1 => Just(Op::Reclaim),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
    ]
}

/// What every volume and snapshot should read as.
#[derive(Default, Clone)]
pub struct Model {
    /// (name, contents)
    pub volumes: Vec<(String, Vec<u8>)>,
    /// (volume name, snapshot name, contents)
    pub snapshots: Vec<(String, String, Vec<u8>)>,
    counter: u64,
}

impl Model {
    fn fresh(&mut self, p: &str) -> String {
        self.counter += 1;
        format!("{p}{}", self.counter)
    }
}

fn pattern(seed: u8, len: usize, zeros: bool) -> Vec<u8> {
    if zeros {
        return vec![0; len];
    }
    (0..len)
        .map(|i| {
            seed.wrapping_add((i / 7) as u8)
                .wrapping_mul(31)
                .wrapping_add(1)
        })
        .collect()
}

fn read_all<P: ModelPool + ?Sized>(pool: &P, t: &Target) -> Vec<u8> {
    let size = pool.target_size(t).expect("size");
    let mut buf = vec![0xeeu8; size as usize];
    // Read in uneven pieces to exercise partial-block reads.
    let mut off = 0u64;
    let mut step = 3 * SECTOR;
    while off < size {
        let n = step.min(size - off);
        pool.read(t, off, &mut buf[off as usize..(off + n) as usize])
            .expect("read");
        off += n;
        step = step * 2 + SECTOR;
    }
    buf
}

/// Checks every volume and snapshot of `pool` byte for byte against `m`, and `pool check`.
pub fn verify<P: ModelPool + ?Sized>(pool: &P, m: &Model) {
    for (name, data) in &m.volumes {
        let id = pool.volume_id(name).expect("volume exists");
        let got = read_all(pool, &Target::Volume(id));
        assert!(got == *data, "volume {name} differs from the model");
    }
    for (vol, snap, data) in &m.snapshots {
        let id = pool.volume_id(vol).expect("volume of snapshot exists");
        let got = read_all(pool, &Target::Snapshot(id, snap.clone()));
        assert!(got == *data, "snapshot {vol}@{snap} differs from the model");
    }
    assert_eq!(pool.volume_count(), m.volumes.len());
    assert_eq!(pool.snapshot_count(), m.snapshots.len());
    let errors = pool.check_errors();
    assert!(errors.is_empty(), "pool check: {errors:?}");
}

/// Applies `ops` to a pool from `env` and to the model, verifying after every step; at
/// the end deletes everything and checks that all space comes back.
pub fn run(env: &mut dyn PoolEnv, ops: &[Op]) {
    run_with(&mut || env.open(), ops)
}

/// `run` for any pool: `open` (re)opens it, formatting on first use.
pub fn run_with<P: ModelPool>(open: &mut dyn FnMut() -> Arc<P>, ops: &[Op]) {
    let (pool, mut m) = build(open, ops);
    finish(&*pool, &mut m);
}

/// Applies `ops` (verifying after each) and returns the pool and what it should hold.
pub fn build<P: ModelPool>(open: &mut dyn FnMut() -> Arc<P>, ops: &[Op]) -> (Arc<P>, Model) {
    let mut pool = open();
    let mut m = Model::default();
    let bs = BLOCK_SIZE as u64;
    for op in ops {
        match op.clone() {
            Op::Create => {
                let name = m.fresh("v");
                pool.create_volume(&name, VOL_BLOCKS * bs).unwrap();
                m.volumes.push((name, vec![0; (VOL_BLOCKS * bs) as usize]));
            }
            Op::Write {
                vol,
                sector,
                sectors,
                seed,
                zeros,
                fua,
            } => {
                if m.volumes.is_empty() {
                    continue;
                }
                let n = m.volumes.len();
                let (name, data) = &mut m.volumes[vol % n];
                let id = pool.volume_id(name).unwrap();
                let off = sector * SECTOR;
                let len = sectors * SECTOR;
                let buf = pattern(seed, len as usize, zeros);
                // Every other seed's write is answered as the NBD server's are.
                let r = if seed % 2 == 0 {
                    pool.write(id, off, &buf, fua)
                } else {
                    pool.write_answered(id, off, &buf, fua)
                };
                if off + len > data.len() as u64 {
                    assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
                } else {
                    r.unwrap();
                    data[off as usize..(off + len) as usize].copy_from_slice(&buf);
                }
            }
            Op::Zero {
                vol,
                sector,
                sectors,
            } => {
                if m.volumes.is_empty() {
                    continue;
                }
                let n = m.volumes.len();
                let (name, data) = &mut m.volumes[vol % n];
                let id = pool.volume_id(name).unwrap();
                let (off, len) = (sector * SECTOR, sectors * SECTOR);
                let r = pool.zero(id, off, len, false);
                if off + len > data.len() as u64 {
                    assert!(r.is_err());
                } else {
                    r.unwrap();
                    data[off as usize..(off + len) as usize].fill(0);
                }
            }
            Op::Trim {
                vol,
                sector,
                sectors,
            } => {
                if m.volumes.is_empty() {
                    continue;
                }
                let n = m.volumes.len();
                let (name, data) = &mut m.volumes[vol % n];
                let id = pool.volume_id(name).unwrap();
                let (off, len) = (sector * SECTOR, sectors * SECTOR);
                let r = pool.trim(id, off, len, false);
                if off + len > data.len() as u64 {
                    assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
                } else {
                    r.unwrap();
                    // Whole blocks inside the range read as zeros; partial edges are kept.
                    let b0 = off.div_ceil(bs);
                    let b1 = (off + len) / bs;
                    if b0 < b1 {
                        data[(b0 * bs) as usize..(b1 * bs) as usize].fill(0);
                    }
                }
            }
            Op::Snapshot { vol } => {
                if m.volumes.is_empty() {
                    continue;
                }
                let snap = m.fresh("s");
                let (name, data) = &m.volumes[vol % m.volumes.len()];
                pool.create_snapshot(name, &snap).unwrap();
                m.snapshots.push((name.clone(), snap, data.clone()));
            }
            Op::Clone { snap } => {
                if m.snapshots.is_empty() {
                    continue;
                }
                let new = m.fresh("c");
                let (vol, s, data) = m.snapshots[snap % m.snapshots.len()].clone();
                pool.clone_snapshot(&vol, &s, &new).unwrap();
                m.volumes.push((new, data));
            }
            Op::Rollback { snap } => {
                if m.snapshots.is_empty() {
                    continue;
                }
                let (vol, s, data) = m.snapshots[snap % m.snapshots.len()].clone();
                pool.rollback(&vol, &s).unwrap();
                if let Some(v) = m.volumes.iter_mut().find(|(n, _)| *n == vol) {
                    v.1 = data;
                }
            }
            Op::DeleteSnapshot { snap } => {
                if m.snapshots.is_empty() {
                    continue;
                }
                let (vol, s, _) = m.snapshots.remove(snap % m.snapshots.len());
                pool.delete_snapshot(&vol, &s).unwrap();
            }
            Op::DeleteVolume { vol, recursive } => {
                if m.volumes.is_empty() {
                    continue;
                }
                let i = vol % m.volumes.len();
                let name = m.volumes[i].0.clone();
                let has_snaps = m.snapshots.iter().any(|(v, _, _)| *v == name);
                let r = pool.delete_volume(&name, recursive);
                if has_snaps && !recursive {
                    assert!(matches!(r, Err(Error::Busy(_))), "{r:?}");
                } else {
                    r.unwrap();
                    m.volumes.remove(i);
                    m.snapshots.retain(|(v, _, _)| *v != name);
                }
            }
            Op::Resize { vol, blocks } => {
                if m.volumes.is_empty() {
                    continue;
                }
                let n = m.volumes.len();
                let (name, data) = &mut m.volumes[vol % n];
                let new = (blocks * bs) as usize;
                let r = pool.resize_volume(name, new as u64, false);
                if new < data.len() {
                    assert!(r.is_err());
                    pool.resize_volume(name, new as u64, true).unwrap();
                } else {
                    r.unwrap();
                }
                data.resize(new, 0);
            }
            Op::Rename { vol } => {
                if m.volumes.is_empty() {
                    continue;
                }
                let new = m.fresh("r");
                let i = vol % m.volumes.len();
                let old = m.volumes[i].0.clone();
                pool.rename_volume(&old, &new).unwrap();
                m.volumes[i].0 = new.clone();
                for s in m.snapshots.iter_mut().filter(|s| s.0 == old) {
                    s.0 = new.clone();
                }
            }
            Op::Reclaim => pool.reclaim_all().unwrap(),
            Op::Sync => pool.sync().unwrap(),
            Op::Reopen => {
                drop(pool);
                pool = open();
            }
        }
        verify(&*pool, &m);
    }
    (pool, m)
}

/// Deletes everything; all space must come back.
pub fn finish<P: ModelPool + ?Sized>(pool: &P, m: &mut Model) {
    for (vol, s, _) in std::mem::take(&mut m.snapshots) {
        pool.delete_snapshot(&vol, &s).unwrap();
    }
    for (name, _) in std::mem::take(&mut m.volumes) {
        pool.delete_volume(&name, false).unwrap();
    }
    pool.reclaim_all().unwrap();
    pool.sync().unwrap();
    let (used, hidden) = pool.usage();
    assert_eq!(used, 0, "space leaked: {used} bytes in use");
    assert_eq!(hidden, 0, "{hidden} hidden layers or lineages leaked");
    verify(pool, m);
}

/// Blocks of the device a model run needs at most (writes, frees pending until sync).
pub fn device_bytes() -> u64 {
    64 << 20
}

/// Convenience for callers that hold an `Arc<Pool>` already.
pub fn verify_pool(pool: &Arc<Pool>) {
    let r = pool.check().expect("check");
    assert!(r.is_clean(), "{:?}", r.errors);
}
