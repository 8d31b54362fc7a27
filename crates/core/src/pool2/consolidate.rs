//! Checksum consolidation (format2.md §9b): the inline CRCs of large writes move into
//! checksum blocks on the data device, so the metadata store keeps ~12 bytes per piece
//! instead of 4 bytes per block.
//!
//! Flow: the committer offers the pieces of each committed write of at least
//! [`OFFER_MIN`] blocks (in commit order); the worker thread packs them into
//! 1024 slots, writes the block durably (FUA) into a freshly allocated data block, and
//! only then submits a management step in which the engine rewrites those pieces still
//! live as committed to name the block (`Meta2::consolidate`). A step that rewrote
//! nothing returns the block to the allocator.
//!
//! Crash consistency: before the step's batch is in the store, the block is free in the
//! region records, so a crash leaves the pieces inline and the block free; after it, the
//! block was durable first. Nothing here blocks writers: offers are dropped when the
//! queue is full (those pieces keep inline CRCs for now).
//!
//! Sweeps: what was never offered or not consolidated — offers dropped, offers still
//! queued when the pool closed, pools written before consolidation existed or converted by
//! `pool upgrade` — is found by a sweep over the live pages, which offers every owned
//! piece of at least [`OFFER_MIN`] blocks with inline CRCs in lineages still open. One
//! pass is due after open and after any offer was dropped; it runs only while background
//! work is on (a daemon's pool, not a one-shot command) and no write group committed for
//! [`IDLE`], [`SWEEP_PAGES`] pages per step, [`SWEEP_PAUSE`] apart, as bulk reads (not
//! kept in the store's cache). A swept candidate is checked by the engine like any other
//! (still live as read, else skipped), so a page changed since the sweep read it costs a
//! slot, nothing more.
//!
//! Threading: one worker thread per pool; the queue's mutex is held for µs, never across
//! I/O or a submit.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::alloc::Allocator;
use crate::device::{AlignedBuf, DataDevice, WriteSeg};
use crate::error::Error;
use crate::meta::MetaStore;
use crate::v2::engine::Candidate;
use crate::v2::keys;
use crate::v2::lineage::Lineage;
use crate::v2::page::Page;
use crate::v2::piece::{SumRef, Sums, SUM_SLOTS};
use crate::v2::sums::{self, SumBlock};
use crate::v2::{Epoch, LineageId, PageNo, Piece, PieceFlags, PAGE_BLOCKS};

use super::committer::{Answer, Outcome, Shared, Work};
use super::sums::DeviceSums;
use super::{lock, Pool2};

/// Checksum blocks written at most per FUA write and management step (64 MiB of data):
/// a FUA write costs a device flush, so one per 4 MiB would let the writers outrun it.
const BATCH: usize = 16;
/// Below this many free blocks (64 MiB, or an eighth of a smaller device) no checksum
/// block is allocated.
const FREE_FLOOR: u64 = 16 * 1024;
/// The allocator stream of checksum blocks (volume ids never reach it).
const SUM_STREAM: u64 = u64::MAX;
/// Writes of at least this many blocks (64 KiB) are offered: what sequential writers send.
/// Smaller ones keep inline CRCs (random 4 KiB writes would scatter checksum blocks).
pub const OFFER_MIN: u64 = 16;
/// Blocks waiting at most (1 GiB of data, ~1.5 MiB of RAM); more offers are dropped.
const MAX_QUEUED: u64 = 256 * SUM_SLOTS as u64;
/// A partly filled block is written once offers stopped for this long, if it has at least
/// [`PARTIAL_MIN`] slots (below that, 4 KiB of data device for less than 1 KiB of store).
const IDLE: Duration = Duration::from_secs(1);
const PARTIAL_MIN: u64 = 256;
/// Live pages a sweep reads per step (at most 64 Ki slots, 64 checksum blocks, offered),
/// and the pause between its steps: a pass over 1 TiB of data (4 Mi pages) takes ~1.5
/// minutes of mostly sleeping.
const SWEEP_PAGES: usize = 1024;
const SWEEP_PAUSE: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Queue {
    items: VecDeque<Candidate>,
    blocks: u64,
    last_offer: Option<Instant>,
    shutdown: bool,
    /// A sweep pass is wanted (format2.md §9b): set at open and when an offer is dropped.
    sweep_due: bool,
    /// The page key the pass in progress goes on from; `None` between passes.
    sweep_at: Option<Vec<u8>>,
}

/// What the worker does next.
enum Next {
    /// Write and name these checksum blocks (each one's candidates).
    Blocks(Vec<Vec<Candidate>>),
    /// Read the live pages from this key on and offer what they hold inline.
    Sweep(Vec<u8>),
}

pub(crate) struct Consolidator {
    /// Queued slots that make a block (`OpenOptions::consolidate`).
    fill: u64,
    queue: Mutex<Queue>,
    cv: Condvar,
    /// Checksum blocks written / pieces' blocks rewritten to name them / offers dropped.
    pub(crate) blocks_written: AtomicU64,
    pub(crate) blocks_moved: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// Blocks sweeps offered, and sweep passes completed.
    pub(crate) swept: AtomicU64,
    pub(crate) sweeps: AtomicU64,
    /// When a write group last committed: milliseconds since `born`, plus one (0: never).
    born: Instant,
    last_commit: AtomicU64,
}

impl Consolidator {
    pub(crate) fn new(fill: u64) -> Consolidator {
        Consolidator {
            fill: fill.clamp(1, SUM_SLOTS as u64),
            queue: Mutex::new(Queue {
                sweep_due: true,
                ..Queue::default()
            }),
            cv: Condvar::new(),
            blocks_written: AtomicU64::new(0),
            blocks_moved: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            swept: AtomicU64::new(0),
            sweeps: AtomicU64::new(0),
            born: Instant::now(),
            last_commit: AtomicU64::new(0),
        }
    }

    /// Offers the pieces of a committed write: `len` blocks of `l` at `lba`, stored at
    /// `pba` with `crcs`, born at `birth` (committer; never blocks beyond the queue lock).
    pub(crate) fn offer(&self, l: LineageId, birth: Epoch, lba: u64, pba: u64, crcs: &[u32]) {
        let len = crcs.len() as u64;
        if len < OFFER_MIN {
            return;
        }
        let mut q = lock(&self.queue);
        if q.shutdown || q.blocks + len > MAX_QUEUED {
            // A later sweep finds these pieces.
            q.sweep_due = true;
            drop(q);
            self.dropped.fetch_add(len, Ordering::Relaxed);
            return;
        }
        let mut b = lba;
        while b < lba + len {
            let page = b / PAGE_BLOCKS;
            let to = (lba + len).min((page + 1) * PAGE_BLOCKS);
            let skip = (b - lba) as usize;
            let n = (to - b) as usize;
            q.items.push_back(Candidate {
                lineage: l,
                page: PageNo(page),
                piece: Piece {
                    off: (b - page * PAGE_BLOCKS) as u8,
                    len: n as u8,
                    pba: pba + skip as u64,
                    birth,
                    flags: PieceFlags::OWN,
                    sums: Sums::Inline(crcs[skip..skip + n].iter().copied().collect()),
                },
                slot: 0,
            });
            b = to;
        }
        q.blocks += len;
        q.last_offer = Some(Instant::now());
        if q.blocks >= self.fill {
            self.cv.notify_all();
        }
    }

    /// A write group committed (committer): sweeps wait until writes pause for [`IDLE`].
    pub(crate) fn committed(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_commit.store(ms + 1, Ordering::Relaxed);
    }

    /// No write group committed for [`IDLE`].
    fn writes_idle(&self) -> bool {
        match self.last_commit.load(Ordering::Relaxed) {
            0 => true,
            t => {
                let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
                now.saturating_sub(t - 1) >= IDLE.as_millis() as u64
            }
        }
    }

    pub(crate) fn shutdown(&self) {
        lock(&self.queue).shutdown = true;
        self.cv.notify_all();
    }

    /// Candidates a sweep found in pages up to the key before `next` (`None`: the pass
    /// ends; `finished`: it read every page). Dropped if the queue cannot take them
    /// (another pass is then due).
    fn add_swept(&self, found: Vec<Candidate>, next: Option<Vec<u8>>, finished: bool) {
        let len: u64 = found.iter().map(|c| u64::from(c.piece.len)).sum();
        let mut q = lock(&self.queue);
        if q.blocks + len > MAX_QUEUED {
            q.sweep_due = true;
        } else {
            q.items.extend(found);
            q.blocks += len;
            self.swept.fetch_add(len, Ordering::Relaxed);
        }
        if next.is_none() && finished {
            self.sweeps.fetch_add(1, Ordering::Relaxed);
        }
        q.sweep_at = next;
    }

    /// Waits `d` unless shutdown comes first (between sweep steps).
    fn pause(&self, d: Duration) {
        let q = lock(&self.queue);
        if !q.shutdown {
            let _ = self.cv.wait_timeout(q, d);
        }
    }

    /// Waits for a block's worth of candidates (or a partial one after [`IDLE`]), and
    /// takes up to [`BATCH`] blocks' worth if queued; else, once writes have offered
    /// nothing for [`IDLE`] and `sweeping()` allows, a sweep step. `None` at shutdown.
    fn next(&self, sweeping: &dyn Fn() -> bool) -> Option<Next> {
        let mut q = lock(&self.queue);
        loop {
            if q.shutdown {
                return None;
            }
            // No write offered anything for IDLE: a partial block is written, unless a
            // sweep pass is under way (it fills blocks faster than writes do).
            let quiet = q.last_offer.is_none_or(|t| t.elapsed() >= IDLE);
            let partial = quiet && q.sweep_at.is_none() && q.blocks >= PARTIAL_MIN.min(self.fill);
            if q.blocks >= self.fill || partial {
                let mut batch = vec![take_block(&mut q)];
                while batch.len() < BATCH && q.blocks >= self.fill {
                    batch.push(take_block(&mut q));
                }
                return Some(Next::Blocks(batch));
            }
            let sweep = q.sweep_due || q.sweep_at.is_some();
            if sweep && quiet && self.writes_idle() && sweeping() {
                let from = match q.sweep_at.take() {
                    Some(k) => k,
                    None => {
                        q.sweep_due = false;
                        vec![keys::K_PAGE]
                    }
                };
                return Some(Next::Sweep(from));
            }
            q = self
                .cv
                .wait_timeout(q, IDLE)
                .map(|r| r.0)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Up to 1024 slots of candidates from the front, assigning slots; a piece that does not
/// fit is split and its rest stays first in the queue.
fn take_block(q: &mut Queue) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut slot = 0usize;
    while slot < SUM_SLOTS {
        let Some(mut c) = q.items.pop_front() else {
            break;
        };
        let room = SUM_SLOTS - slot;
        if usize::from(c.piece.len) > room {
            let rest = c.piece.slice(c.piece.start() + room as u64, c.piece.end());
            c.piece = c
                .piece
                .slice(c.piece.start(), c.piece.start() + room as u64);
            q.items.push_front(Candidate {
                piece: rest,
                ..c.clone()
            });
        }
        c.slot = slot as u16;
        slot += usize::from(c.piece.len);
        q.blocks = q.blocks.saturating_sub(u64::from(c.piece.len));
        out.push(c);
    }
    out
}

/// The worker thread's parts of the pool. It holds no reference to the pool itself: a
/// pool its owner drops is dropped on the owner's thread, which stops and joins this one
/// (as the committer's callers rely on: nothing of a dropped pool runs afterwards).
pub(crate) struct Worker {
    work: Arc<Consolidator>,
    committer: Arc<Shared>,
    dev: Arc<dyn DataDevice>,
    alloc: Arc<Mutex<Allocator>>,
    sums: Arc<DeviceSums>,
    store: Arc<dyn MetaStore>,
    data_start: u64,
}

impl Worker {
    pub(crate) fn new(pool: &Pool2, work: Arc<Consolidator>) -> Worker {
        Worker {
            work,
            committer: Arc::clone(&pool.committer),
            dev: Arc::clone(&pool.dev),
            alloc: Arc::clone(&pool.alloc),
            sums: Arc::clone(&pool.sums),
            store: Arc::clone(&pool.store),
            data_start: pool.sup.data_start,
        }
    }

    /// Packs, writes and commits checksum blocks until shutdown, or until the engine
    /// stopped (a failed commit: the pool must be reopened).
    pub(crate) fn run(self) {
        let sweeping = || self.committer.background_on();
        while let Some(next) = self.work.next(&sweeping) {
            let batch = match next {
                Next::Blocks(batch) => batch,
                Next::Sweep(from) => {
                    self.sweep_step(from);
                    self.work.pause(SWEEP_PAUSE);
                    continue;
                }
            };
            match self.write_blocks(batch) {
                Ok(()) => {}
                Err(Stop(e)) => {
                    log::error!("checksum consolidation stops: {e}");
                    self.work.shutdown();
                    return;
                }
            }
        }
    }

    /// Reads up to [`SWEEP_PAGES`] live pages from key `from` on and offers their owned
    /// pieces of [`OFFER_MIN`] blocks or more that keep inline CRCs, in lineages still open
    /// (the engine consolidates no other: a closed lineage's pieces would cost slots on
    /// every pass). A page that does not decode is skipped (`pool check` reports it;
    /// consolidation leaves it alone). Bulk reads: the pages do not enter the store's cache.
    fn sweep_step(&self, from: Vec<u8>) {
        let to = [keys::K_PAGE + 1];
        let store = &*self.store;
        let mut found = Vec::new();
        let (mut pages, mut last) = (0usize, None);
        let mut visit = |k: &[u8], v: &[u8]| {
            pages += 1;
            if let (Some([l, p]), Ok(page)) = (keys::fields::<2>(k, keys::K_PAGE), Page::decode(v))
            {
                let wanted = |x: &Piece| {
                    x.owned() && x.sums.inline().is_some() && u64::from(x.len) >= OFFER_MIN
                };
                found.extend(
                    page.pieces
                        .into_iter()
                        .filter(wanted)
                        .map(|piece| Candidate {
                            lineage: LineageId(l),
                            page: PageNo(p),
                            piece,
                            slot: 0,
                        }),
                );
            }
            if pages >= SWEEP_PAGES {
                last = Some(k.to_vec());
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        };
        let scanned = crate::meta::bulk_reads(|| store.scan(&from, &to, &mut visit));
        let mut open: HashMap<LineageId, bool> = HashMap::new();
        found.retain(|c| {
            *open.entry(c.lineage).or_insert_with(|| {
                let rec = store.get(&keys::lineage(c.lineage)).ok().flatten();
                rec.and_then(|v| Lineage::decode(&v).ok())
                    .is_some_and(|x| x.closed.is_none())
            })
        });
        let finished = match scanned {
            Ok(()) => true,
            Err(e) => {
                log::warn!("checksum sweep: reading live pages: {e}; the pass ends here");
                last = None;
                false
            }
        };
        // The next step starts just past the last key read.
        let next = last.map(|mut k| {
            k.push(0);
            k
        });
        if next.is_none() {
            log::debug!("checksum sweep: pass over the live pages ended");
        }
        self.work.add_swept(found, next, finished);
    }

    /// Writes the checksum blocks of `batch` (each block's candidates) in one FUA device
    /// write, then names them in one management step.
    fn write_blocks(&self, batch: Vec<Vec<Candidate>>) -> std::result::Result<(), Stop> {
        let n = batch.len() as u64;
        // Their own stream: checksum blocks fill chunks of their own instead of holes in
        // the volumes' streams. No space (even after frees pending a sync): stay inline.
        // Nor when space is short: the last free blocks are for volumes' data.
        let runs = {
            let mut a = lock(&self.alloc);
            if a.free() < FREE_FLOOR.min(a.capacity() / 8).saturating_add(n) {
                None
            } else {
                a.alloc_streamed(SUM_STREAM, n)
            }
        };
        let Some(runs) = runs else {
            log::debug!("checksum consolidation: no free block; pieces keep inline checksums");
            return Ok(());
        };
        let at: Vec<u64> = runs.iter().flat_map(|r| r.start..r.start + r.len).collect();
        let free_now = |which: &[u64]| {
            let mut a = lock(&self.alloc);
            for b in which {
                a.free_now(*b);
            }
        };
        let mut blocks = Vec::with_capacity(batch.len());
        let mut images = Vec::with_capacity(batch.len());
        for cands in &batch {
            let mut block: SumBlock = [0; SUM_SLOTS];
            for c in cands {
                let crcs = c.piece.sums.inline().unwrap_or_default();
                let slot = usize::from(c.slot);
                if let Some(dst) = block.get_mut(slot..slot + crcs.len()) {
                    dst.copy_from_slice(crcs);
                }
            }
            images.push(AlignedBuf::copy_of(&sums::encode(&block)));
            blocks.push(Arc::new(block));
        }
        // Durable before any batch names them (format2.md §9b): one FUA write for all.
        let segs: Vec<WriteSeg<'_>> = at
            .iter()
            .zip(&images)
            .map(|(b, image)| WriteSeg {
                offset: self
                    .data_start
                    .saturating_add(b.saturating_mul(crate::device::BLOCK_SIZE_U64)),
                buf: image,
            })
            .collect();
        if let Err(e) = self.dev.write(&segs, true) {
            free_now(&at);
            log::warn!("checksum consolidation: writing {n} checksum blocks: {e}; pieces keep inline checksums");
            return Ok(());
        }
        for ((b, image), block) in at.iter().zip(&images).zip(&blocks) {
            let r = SumRef {
                at: *b,
                slot: 0,
                crc: crc32c::crc32c(image),
            };
            self.sums.written(r, Arc::clone(block));
        }
        // Blocks rewritten per checksum block, as the step reports them.
        let done = Arc::new(Mutex::new(Vec::new()));
        let (step_at, step_done) = (at.clone(), Arc::clone(&done));
        let answer = self.committer.submit(Work::Mgmt(Box::new(move |ctx| {
            // Refused before the engine is touched: a refusal never stops the pool.
            for ((b, block), cands) in step_at.iter().zip(&blocks).zip(&batch) {
                ctx.meta().check_consolidation(*b, block, cands)?;
            }
            let (meta, g) = ctx.parts();
            let mut total = 0;
            let mut each = Vec::with_capacity(step_at.len());
            for ((b, block), cands) in step_at.iter().zip(&blocks).zip(&batch) {
                let n = meta.consolidate(g, *b, block, cands)?;
                each.push(n);
                total += n;
            }
            *lock(&step_done) = each;
            Ok(Outcome::Done {
                apply: Box::new(|_| {}),
                value: total,
                undefer: Vec::new(),
                durable: false,
            })
        })));
        match answer {
            Answer::Value(_) => {
                let each = std::mem::take(&mut *lock(&done));
                let unused: Vec<u64> = at
                    .iter()
                    .zip(&each)
                    .filter(|(_, n)| **n == 0)
                    .map(|(b, _)| *b)
                    .collect();
                free_now(&unused);
                let named = each.iter().filter(|n| **n > 0).count() as u64;
                self.work.blocks_written.fetch_add(named, Ordering::Relaxed);
                self.work
                    .blocks_moved
                    .fetch_add(each.iter().sum(), Ordering::Relaxed);
            }
            Answer::Rejected(Error::Shutdown) | Answer::Retry => free_now(&at),
            Answer::Rejected(e) => {
                free_now(&at);
                log::warn!("checksum consolidation: {n} blocks refused: {e}");
            }
            // The batch may survive in the store's log: the blocks stay out of use until
            // the next open decides (as a failed write's blocks do).
            Answer::Failed(e) => return Err(Stop(e)),
        }
        Ok(())
    }
}

/// The engine stopped: consolidation ends with it.
struct Stop(Error);
