//! Power-loss simulation: a data device and a metadata store that keep what was written but
//! not yet made durable, and lose or tear it at a simulated power cut.
//!
//! * [`SimDevice`]: writes land in a volatile view at once (reads see them) and in a list of
//!   pending block writes. `sync` makes all pending writes durable; a FUA write is durable
//!   when it returns (and supersedes older pending writes of the same blocks). At a cut,
//!   each pending block write independently survives, vanishes, or is torn: only its first
//!   `k` bytes land, `k` not a multiple of the sector size (partial sector writes).
//! * [`SimStore`]: batches apply to a volatile map at once and are appended to a log of
//!   unsynced batches; `sync` and `commit(durable = true)` make the whole log durable. At a
//!   cut a random prefix of the log survives, whole batches only: the guarantee RocksDB's
//!   WAL gives with `WALRecoveryMode::PointInTime` (set in snapblk-rocks).
//! * [`PowerLoss::arm`]: the machine dies after `n` more mutating calls (writes, syncs,
//!   commits) across both, so a cut can fall inside any operation; every call after that
//!   fails, as on a machine that lost power.
//!
//! * [`PowerLoss::set_sync_time`]: a device `sync` takes that long, like a real
//!   `fdatasync`: it covers the writes pending when it began and they become durable only
//!   when it ends, so a cut while it runs loses them (and concurrent callers can observe
//!   the window). [`PowerLoss::fail_next_commits`]: the next commits reach the log (so a
//!   cut may keep them) and then report failure, as RocksDB does when a WAL write lands
//!   but its fsync fails.
//!
//! A cut produces a new [`Machine`] built from the durable state only. Handles of the old
//! machine keep failing forever, so a pool still holding them cannot touch the new state.
//!
//! Threading: everything is behind one mutex; any thread may call.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use snapblk_core::device::{DataDevice, ReadSeg, WriteSeg, BLOCK_SIZE};
use snapblk_core::meta::{
    apply_op, DerivedMap, MapView, MetaRead, MetaStore, ScanVisitor, WriteBatch,
    MEM_DERIVED_ENTRIES,
};
use snapblk_core::StoreError;

/// A small deterministic generator (splitmix64), so a failing seed replays exactly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

struct State {
    epoch: u64,
    /// Mutating calls left before the power fails; `None`: never.
    budget: Option<u64>,
    dead: bool,
    // Data device.
    durable: Vec<u8>,
    view: Vec<u8>,
    /// Unsynced block writes: (sequence number, byte offset, data).
    pending: Vec<(u64, usize, Vec<u8>)>,
    next_seq: u64,
    sync_time: Duration,
    /// Commits left that land in the log and then report failure.
    failing_commits: u64,
    // Metadata store.
    meta_durable: BTreeMap<Vec<u8>, Vec<u8>>,
    meta_view: BTreeMap<Vec<u8>, Vec<u8>>,
    log: Vec<WriteBatch>,
    /// Derived entries: a cut keeps each or loses it at random (puts skip any log).
    derived: Arc<DerivedMap>,
}

/// What the last cut did.
#[derive(Debug, Default, Clone)]
pub struct CutStats {
    /// Byte offsets of the device blocks whose pending write was dropped or torn: the only
    /// blocks whose contents may now disagree with a checksum written for them.
    pub lost: std::collections::BTreeSet<usize>,
    pub blocks_kept: u64,
    pub blocks_dropped: u64,
    pub blocks_torn: u64,
    pub batches_kept: u64,
    pub batches_dropped: u64,
}

/// The shared state of one simulated machine (device + metadata store).
#[derive(Clone)]
pub struct PowerLoss {
    st: Arc<Mutex<State>>,
}

/// The device and store handles of one boot of the machine.
pub struct Machine {
    pub dev: Arc<SimDevice>,
    pub store: Arc<SimStore>,
    pub power: PowerLoss,
}

fn apply(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, batch: &WriteBatch) {
    for op in &batch.ops {
        apply_op(map, op.clone());
    }
}

fn dead() -> io::Error {
    io::Error::other("power failed (simulated)")
}

impl PowerLoss {
    /// A new machine with a zeroed data device of `len` bytes and an empty store.
    pub fn machine(len: usize) -> Machine {
        let st = State {
            epoch: 0,
            budget: None,
            dead: false,
            durable: vec![0; len],
            view: vec![0; len],
            pending: Vec::new(),
            next_seq: 0,
            sync_time: Duration::ZERO,
            failing_commits: 0,
            meta_durable: BTreeMap::new(),
            meta_view: BTreeMap::new(),
            log: Vec::new(),
            derived: Arc::new(DerivedMap::new(MEM_DERIVED_ENTRIES)),
        };
        PowerLoss {
            st: Arc::new(Mutex::new(st)),
        }
        .boot()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn boot(&self) -> Machine {
        let epoch = self.lock().epoch;
        Machine {
            dev: Arc::new(SimDevice {
                power: self.clone(),
                epoch,
            }),
            store: Arc::new(SimStore {
                power: self.clone(),
                epoch,
            }),
            power: self.clone(),
        }
    }

    /// The power fails after `n` more mutating calls.
    pub fn arm(&self, n: u64) {
        self.lock().budget = Some(n);
    }

    /// Device syncs take `t` from now on (see the module doc).
    pub fn set_sync_time(&self, t: Duration) {
        self.lock().sync_time = t;
    }

    /// The next `n` commits are logged (a cut may keep them) but report failure.
    pub fn fail_next_commits(&self, n: u64) {
        self.lock().failing_commits = n;
    }

    /// Whether the power has failed (an armed budget ran out).
    pub fn failed(&self) -> bool {
        self.lock().dead
    }

    /// Cuts the power now: unsynced writes survive, vanish or tear as `rng` decides, a
    /// prefix of the unsynced metadata batches survives; returns the rebooted machine.
    pub fn cut(&self, rng: &mut Rng) -> (Machine, CutStats) {
        let stats = {
            let mut st = self.lock();
            let mut stats = CutStats::default();
            for (_, off, data) in std::mem::take(&mut st.pending) {
                match rng.below(10) {
                    0..=3 => {
                        st.durable[off..off + data.len()].copy_from_slice(&data);
                        stats.blocks_kept += 1;
                        stats.lost.remove(&off);
                    }
                    4..=7 => {
                        stats.blocks_dropped += 1;
                        stats.lost.insert(off);
                    }
                    _ => {
                        // A tear that ends inside a sector.
                        let k = 1 + rng.below(data.len() as u64 - 1) as usize;
                        let k = if k.is_multiple_of(512) { k - 1 } else { k };
                        st.durable[off..off + k].copy_from_slice(&data[..k]);
                        stats.blocks_torn += 1;
                        stats.lost.insert(off);
                    }
                }
            }
            let log = std::mem::take(&mut st.log);
            let keep = rng.below(log.len() as u64 + 1) as usize;
            for b in &log[..keep] {
                apply(&mut st.meta_durable, b);
            }
            st.derived.retain(|| rng.below(2) == 0);
            stats.batches_kept = keep as u64;
            stats.batches_dropped = (log.len() - keep) as u64;
            st.view = st.durable.clone();
            st.meta_view = st.meta_durable.clone();
            st.epoch += 1;
            st.budget = None;
            st.dead = false;
            st.failing_commits = 0;
            stats
        };
        (self.boot(), stats)
    }

    /// Checks the handle's boot is current and takes one unit of the armed budget.
    fn mutate(&self, epoch: u64) -> Result<MutexGuard<'_, State>, io::Error> {
        let mut st = self.lock();
        if st.epoch != epoch || st.dead {
            return Err(dead());
        }
        if let Some(b) = st.budget {
            if b == 0 {
                st.dead = true;
                return Err(dead());
            }
            st.budget = Some(b - 1);
        }
        Ok(st)
    }

    fn live(&self, epoch: u64) -> Result<MutexGuard<'_, State>, io::Error> {
        let st = self.lock();
        if st.epoch != epoch || st.dead {
            return Err(dead());
        }
        Ok(st)
    }
}

impl State {
    /// Makes the pending writes issued before sequence number `before` durable.
    fn persist_device(&mut self, before: u64) {
        let (done, left): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(seq, _, _)| *seq < before);
        self.pending = left;
        for (_, off, data) in done {
            self.durable[off..off + data.len()].copy_from_slice(&data);
        }
    }
    fn persist_meta(&mut self) {
        for b in std::mem::take(&mut self.log) {
            apply(&mut self.meta_durable, &b);
        }
    }
}

/// The data device of one boot of a [`PowerLoss`] machine.
pub struct SimDevice {
    power: PowerLoss,
    epoch: u64,
}

/// The byte range of an I/O; whole blocks inside the device only.
fn range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad simulated I/O: offset {offset}, {n} bytes"),
        )
    };
    let start = usize::try_from(offset).map_err(|_| bad())?;
    match start.checked_add(n) {
        Some(end)
            if end <= len && start.is_multiple_of(BLOCK_SIZE) && n.is_multiple_of(BLOCK_SIZE) =>
        {
            Ok(start..end)
        }
        _ => Err(bad()),
    }
}

impl DataDevice for SimDevice {
    fn len(&self) -> u64 {
        self.power.lock().view.len() as u64
    }

    fn read(&self, segs: &mut [ReadSeg<'_>]) -> io::Result<()> {
        let st = self.power.live(self.epoch)?;
        for s in segs.iter_mut() {
            let r = range(st.view.len(), s.offset, s.buf.len())?;
            s.buf.copy_from_slice(&st.view[r]);
        }
        Ok(())
    }

    fn write(&self, segs: &[WriteSeg<'_>], fua: bool) -> io::Result<()> {
        let mut st = self.power.mutate(self.epoch)?;
        for s in segs {
            let r = range(st.view.len(), s.offset, s.buf.len())?;
            st.view[r.clone()].copy_from_slice(s.buf);
            for (i, block) in s.buf.chunks(BLOCK_SIZE).enumerate() {
                let off = r.start + i * BLOCK_SIZE;
                if fua {
                    st.pending.retain(|(_, o, _)| *o != off);
                    st.durable[off..off + BLOCK_SIZE].copy_from_slice(block);
                } else {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.pending.push((seq, off, block.to_vec()));
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let (before, t) = {
            let st = self.power.live(self.epoch)?;
            (st.next_seq, st.sync_time)
        };
        if !t.is_zero() {
            std::thread::sleep(t);
        }
        let mut st = self.power.mutate(self.epoch)?;
        st.persist_device(before);
        Ok(())
    }
}

/// The metadata store of one boot of a [`PowerLoss`] machine.
pub struct SimStore {
    power: PowerLoss,
    epoch: u64,
}

impl MetaStore for SimStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let st = self.power.live(self.epoch)?;
        Ok(st.meta_view.get(key).cloned())
    }

    fn scan(&self, from: &[u8], to: &[u8], visit: &mut ScanVisitor<'_>) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        // Copy the range out so the visitor may call back into the store.
        let items: Vec<(Vec<u8>, Vec<u8>)> = {
            let st = self.power.live(self.epoch)?;
            st.meta_view
                .range(from.to_vec()..to.to_vec())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, v) in items {
            if visit(&k, &v).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn view(&self) -> Result<Box<dyn MetaRead + '_>, StoreError> {
        let st = self.power.live(self.epoch)?;
        Ok(Box::new(MapView(Arc::new(st.meta_view.clone()))))
    }

    fn commit(&self, batch: WriteBatch, durable: bool) -> Result<(), StoreError> {
        let mut st = self.power.mutate(self.epoch)?;
        if st.failing_commits > 0 {
            // Logged (a cut may keep it) but not applied to the view this boot reads:
            // a store that reports failure is not read from again by a careful caller.
            st.failing_commits -= 1;
            st.log.push(batch);
            return Err(StoreError::Backend(
                "commit failed after its log record was written (simulated)".into(),
            ));
        }
        apply(&mut st.meta_view, &batch);
        st.log.push(batch);
        if durable {
            st.persist_meta();
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        let mut st = self.power.mutate(self.epoch)?;
        st.persist_meta();
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        0
    }

    fn derived(&self) -> bool {
        true
    }
    fn derived_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.derived_map()?.get(key))
    }
    fn derived_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.derived_map()?.put(key, value);
        Ok(())
    }
    fn derived_scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: &mut ScanVisitor<'_>,
    ) -> Result<(), StoreError> {
        self.derived_map()?.scan(from, to, visit);
        Ok(())
    }
    fn derived_delete_ranges(&self, ranges: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        let map = self.derived_map()?;
        for (from, to) in ranges {
            map.delete_range(from, to);
        }
        Ok(())
    }
}

impl SimStore {
    /// The derived entries, while this boot is live (outside the state lock after).
    fn derived_map(&self) -> Result<Arc<DerivedMap>, io::Error> {
        Ok(Arc::clone(&self.power.live(self.epoch)?.derived))
    }
}
