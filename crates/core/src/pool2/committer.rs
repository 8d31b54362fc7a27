//! The committer (docs/format2.md §4.1): the one thread that changes format-2 metadata.
//!
//! Writers allocate, write their data, then submit a [`Work`] and wait for its answer.
//! The committer takes every queued Txn, applies consecutive writes as one group (one store
//! batch, synced if any member asked for FUA), runs each management operation as a group of
//! its own, and when idle (or every 8th group) one reclaim step. Catalog changes are
//! published after their batch is in the store; frees go to the allocator as pending, tagged
//! with the sync generation current after the commit.
//!
//! Fail-stop: once a commit fails (or a management step fails after changing the engine),
//! every later Txn is answered with an error until the pool is reopened (format2.md C3).
//!
//! Threading: callers block on their Txn's answer, or go on and have the committer call
//! them back (`submit_then`: a frontend that replies from the callback); the committer
//! never waits for a caller.
//! Snapshot create may *defer* a lineage: its writes wait in `held` until the snapshot
//! commits (format2.md §3.3), other volumes go on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::keys::VolId;
use crate::v2::{Edit, Epoch, Group, LineageId, Meta2};

use super::catalog::Catalog;
use super::plan::Settle;
use super::{lock, Pool2};

/// Blocks `lba..lba+len`, mapped to new data at `pba` with one CRC per block, or unmapped.
pub(crate) type Edits = Vec<(u64, u64, Option<(u64, Vec<u32>)>)>;

pub(crate) type MgmtFn = Box<dyn FnOnce(&mut MgmtCtx<'_>) -> Result<Outcome> + Send>;

pub(crate) enum Work {
    /// A request's mapping changes. `counter`: the device sync counter read after its data
    /// write completed (0 for FUA writes: already durable).
    Write {
        vol: VolId,
        edits: Edits,
        fua: bool,
        counter: u64,
        /// Blocks reserved against the volume's quota: released with the publication of
        /// the commit's owned counts (one `usage` lock, so no writer counts them twice),
        /// or when the write is refused.
        reserved: u64,
    },
    Mgmt(MgmtFn),
    /// A durable group, even if empty: makes every earlier commit durable.
    Flush,
}

/// What a management step sees. `parts()` marks the engine as touched: an error after that
/// stops the engine, since its memory may no longer match the store.
pub(crate) struct MgmtCtx<'a> {
    meta: &'a mut Meta2,
    pub group: &'a mut Group,
    pub catalog: &'a Catalog,
    /// Highest device sync counter of the writes applied so far, per lineage.
    pub written: &'a HashMap<LineageId, u64>,
    touched: bool,
}

impl MgmtCtx<'_> {
    /// The engine, to look at only (does not mark the step as touched).
    pub fn meta(&self) -> &Meta2 {
        self.meta
    }
    /// The engine and this step's group, to apply an engine operation.
    pub fn parts(&mut self) -> (&mut Meta2, &mut Group) {
        self.touched = true;
        (self.meta, self.group)
    }
}

pub(crate) type CatalogChange = Box<dyn FnOnce(&mut Catalog) + Send>;

pub(crate) enum Outcome {
    Done {
        apply: CatalogChange,
        value: u64,
        /// Lineages whose held writes may go on now.
        undefer: Vec<LineageId>,
        /// Sync the store with this step (management operations); reclaim steps need not.
        durable: bool,
    },
    /// The snapshot of these lineages must wait for another device sync; their writes are
    /// held meanwhile.
    Retry(Vec<LineageId>),
}

/// The answer to a Txn.
#[derive(Debug)]
pub(crate) enum Answer {
    Value(u64),
    Retry,
    /// Nothing was applied (validation failed): blocks the Txn referenced are unused.
    Rejected(Error),
    /// The commit failed; the engine stopped.
    Failed(Error),
}

/// Called with a Txn's answer on the committer thread (after the pool is released): must
/// not block.
pub(crate) type Then = Box<dyn FnOnce(Answer) + Send>;

/// How a Txn's answer reaches its caller.
enum Reply {
    /// The caller waits on the slot.
    Wait(Arc<(Mutex<Option<Answer>>, Condvar)>),
    /// The caller went on; the committer calls this.
    Call(Then),
}

struct Txn {
    work: Work,
    reply: Reply,
    /// A write's blocks and reservation, settled by the committer once answered (for a
    /// caller that does not wait).
    settle: Option<Settle>,
}

impl Txn {
    fn answer(self, a: Answer) {
        match self.reply {
            Reply::Wait(slot) => {
                let (m, cv) = &*slot;
                *lock(m) = Some(a);
                cv.notify_all();
            }
            Reply::Call(f) => {
                // A callback that panics must not take the committer (every volume's
                // writes) down with it. The frontends' callbacks fail their request if
                // dropped uncalled (NBD `WriteReply`, ublk `Answer`), so none waits forever.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(a))).is_err() {
                    log::error!("a write's completion callback panicked");
                }
            }
        }
    }
}

#[derive(Default)]
struct Queue {
    txns: VecDeque<Txn>,
    shutdown: bool,
}

#[derive(Default)]
pub(crate) struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
    /// Idle reclaim and the periodic sync run (`Pool2::start_background`). Read without
    /// taking the pool, so idle threads never hold it: a dropped pool is released by the
    /// thread that dropped it.
    pub(crate) background: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Queues `work` and waits for its answer.
    pub(crate) fn submit(&self, work: Work) -> Answer {
        let reply = Arc::new((Mutex::new(None), Condvar::new()));
        {
            let mut q = lock(&self.queue);
            if q.shutdown {
                return Answer::Rejected(Error::Shutdown);
            }
            q.txns.push_back(Txn {
                work,
                reply: Reply::Wait(Arc::clone(&reply)),
                settle: None,
            });
        }
        self.cv.notify_all();
        let (m, cv) = &*reply;
        let mut slot = lock(m);
        loop {
            if let Some(a) = slot.take() {
                return a;
            }
            slot = cv.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Queues `work` and returns at once; the committer settles `settle` and then calls
    /// `then` with the answer. After shutdown, hands both back.
    pub(crate) fn submit_then(
        &self,
        work: Work,
        settle: Settle,
        then: Then,
    ) -> std::result::Result<(), (Settle, Then)> {
        {
            let mut q = lock(&self.queue);
            if q.shutdown {
                return Err((settle, then));
            }
            q.txns.push_back(Txn {
                work,
                reply: Reply::Call(then),
                settle: Some(settle),
            });
        }
        self.cv.notify_all();
        Ok(())
    }

    pub(crate) fn shutdown(&self) {
        lock(&self.queue).shutdown = true;
        self.cv.notify_all();
    }

    pub(crate) fn is_shutdown(&self) -> bool {
        lock(&self.queue).shutdown
    }

    pub(crate) fn background_on(&self) -> bool {
        self.background.load(std::sync::atomic::Ordering::Acquire)
    }

    fn take(&self, idle: Duration) -> (VecDeque<Txn>, bool) {
        let mut q = lock(&self.queue);
        if q.txns.is_empty() && !q.shutdown {
            q = self
                .cv
                .wait_timeout(q, idle)
                .map(|r| r.0)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        (std::mem::take(&mut q.txns), q.shutdown)
    }
}

/// Reclaim budget per step, in pages (or keys for a destroy).
const RECLAIM_BUDGET: usize = 64;

struct State {
    /// Answers of this round, delivered after the pool is released (so the committer never
    /// holds the last reference to a pool its callers dropped).
    out: Vec<(Txn, Answer)>,
    written: HashMap<LineageId, u64>,
    deferred: HashSet<LineageId>,
    held: VecDeque<(LineageId, Txn)>,
    groups: u64,
}

/// A group of writes being built.
struct Pending {
    group: Group,
    members: Vec<Txn>,
    /// Large writes to offer for checksum consolidation once committed: lineage, birth,
    /// lba, pba, CRCs.
    offers: Vec<(LineageId, Epoch, u64, u64, Vec<u32>)>,
}

pub(crate) fn run(pool: Weak<Pool2>, shared: Arc<Shared>, mut meta: Meta2) {
    let mut st = State {
        out: Vec::new(),
        written: HashMap::new(),
        deferred: HashSet::new(),
        held: VecDeque::new(),
        groups: 0,
    };
    loop {
        // With reclaim work and background on, steps follow each other while nothing else
        // is queued; otherwise wait for work.
        let busy = shared.background_on() && meta.pending_jobs() > 0 && meta.failed().is_none();
        let (batch, shutdown) = shared.take(Duration::from_millis(if busy { 0 } else { 20 }));
        if batch.is_empty() {
            if shutdown {
                let held = st.held.drain(..).map(|(_, t)| t).collect();
                fail_all(held, Error::Shutdown, pool.upgrade());
                return;
            }
            if !(shared.background_on() && meta.pending_jobs() > 0 && meta.failed().is_none()) {
                continue;
            }
            let Some(pool) = pool.upgrade() else { return };
            pool.reclaim_once(&mut meta);
            continue;
        }
        let Some(pool) = pool.upgrade() else {
            fail_all(batch, Error::Shutdown, None);
            return;
        };
        // Every 8th group, a reclaim step first, while the batch's callers wait: nothing
        // runs after the last answer, so a caller that drops the pool (and opens the store
        // again) never races work of this pool.
        st.groups += 1;
        if st.groups.is_multiple_of(8) && meta.pending_jobs() > 0 && meta.failed().is_none() {
            pool.reclaim_once(&mut meta);
        }
        pool.process(&mut meta, &mut st, batch);
        for (t, a) in &mut st.out {
            pool.release_reservation(t, a);
            if let Some(s) = t.settle.take() {
                pool.settle(s, a);
            }
        }
        drop(pool);
        for (t, a) in st.out.drain(..) {
            t.answer(a);
        }
    }
}

/// Refuses `txns`; writes' blocks and reservations are settled first while the pool is
/// still there (after `shutdown` on a pool still in use; a dropped pool's go with it),
/// and the pool is released before any answer.
fn fail_all(txns: VecDeque<Txn>, e: Error, pool: Option<Arc<Pool2>>) {
    let refused = || Answer::Rejected(Error::Busy(e.to_string()));
    let mut txns = txns;
    if let Some(pool) = pool {
        for t in &mut txns {
            pool.release_reservation(t, &refused());
            if let Some(s) = t.settle.take() {
                pool.settle(s, &refused());
            }
        }
    }
    for t in txns {
        t.answer(refused());
    }
}

fn stopped(meta: &Meta2) -> Error {
    Error::Corrupt(format!(
        "metadata engine stopped after a failed commit ({}); reopen the pool",
        meta.failed().unwrap_or("unknown")
    ))
}

impl Pool2 {
    fn process(&self, meta: &mut Meta2, st: &mut State, mut batch: VecDeque<Txn>) {
        let mut pending: Option<Pending> = None;
        while let Some(txn) = batch.pop_front() {
            if meta.failed().is_some() {
                st.out.push((txn, Answer::Failed(stopped(meta))));
                continue;
            }
            match txn.work {
                Work::Write { vol, .. } => {
                    let lineage = match self.resolve_write(&txn.work) {
                        Ok(l) => l,
                        Err(e) => {
                            st.out.push((txn, Answer::Rejected(e)));
                            continue;
                        }
                    };
                    if st.deferred.contains(&lineage) {
                        st.held.push_back((lineage, txn));
                        continue;
                    }
                    let _ = vol;
                    let p = pending.get_or_insert_with(|| Pending {
                        group: Group::default(),
                        members: Vec::new(),
                        offers: Vec::new(),
                    });
                    let Work::Write {
                        edits,
                        fua,
                        counter,
                        ..
                    } = &txn.work
                    else {
                        unreachable!("matched above")
                    };
                    let mut r = Ok(());
                    for (lba, len, map) in edits {
                        r = meta.apply(
                            &mut p.group,
                            &Edit {
                                lineage,
                                lba: *lba,
                                len: *len,
                                map: map.clone(),
                            },
                        );
                        if r.is_err() {
                            break;
                        }
                    }
                    match r {
                        Ok(()) => {
                            if self.consolidator.is_some() {
                                let birth = meta.lineage(lineage).map(|l| l.epoch).ok();
                                for (lba, len, map) in edits {
                                    if let (Some((pba, crcs)), Some(birth)) = (map, birth) {
                                        if *len >= super::consolidate::OFFER_MIN {
                                            p.offers.push((
                                                lineage,
                                                birth,
                                                *lba,
                                                *pba,
                                                crcs.clone(),
                                            ));
                                        }
                                    }
                                }
                            }
                            let w = st.written.entry(lineage).or_insert(0);
                            *w = (*w).max(*counter);
                            if *fua {
                                p.group.set_durable();
                            }
                            p.members.push(txn);
                        }
                        Err(e) if meta.failed().is_some() => st.out.push((txn, Answer::Failed(e))),
                        Err(e) => st.out.push((txn, Answer::Rejected(e))),
                    }
                }
                Work::Flush => {
                    let p = pending.get_or_insert_with(|| Pending {
                        group: Group::default(),
                        members: Vec::new(),
                        offers: Vec::new(),
                    });
                    p.group.set_durable();
                    p.members.push(txn);
                }
                Work::Mgmt(_) => {
                    if let Some(p) = pending.take() {
                        self.commit_writes(meta, st, p);
                    }
                    let Work::Mgmt(f) = txn.work else {
                        unreachable!("matched above")
                    };
                    let reply = Txn {
                        work: Work::Flush,
                        reply: txn.reply,
                        settle: None,
                    };
                    let released = self.run_mgmt(meta, st, f, reply);
                    if !released.is_empty() {
                        // Held writes of the released lineages go first, in their order.
                        let mut front: VecDeque<Txn> = VecDeque::new();
                        let mut rest = VecDeque::new();
                        for (hl, t) in st.held.drain(..) {
                            if released.contains(&hl) {
                                front.push_back(t);
                            } else {
                                rest.push_back((hl, t));
                            }
                        }
                        st.held = rest;
                        front.extend(batch.drain(..));
                        batch = front;
                    }
                }
            }
        }
        if let Some(p) = pending.take() {
            self.commit_writes(meta, st, p);
        }
    }

    /// The lineage a write goes to, after checking its range against the volume's size now.
    fn resolve_write(&self, w: &Work) -> Result<LineageId> {
        let Work::Write { vol, edits, .. } = w else {
            return Err(Error::invalid("txn", "not a write"));
        };
        let cat = self.catalog_read();
        let v = cat.volume(*vol)?;
        let blocks = v.size / crate::device::BLOCK_SIZE_U64;
        for (lba, len, _) in edits {
            if lba.checked_add(*len).is_none_or(|end| end > blocks) {
                return Err(Error::OutOfRange {
                    offset: lba * crate::device::BLOCK_SIZE_U64,
                    len: len * crate::device::BLOCK_SIZE_U64,
                    size: v.size,
                });
            }
        }
        Ok(v.lineage)
    }

    fn commit_writes(&self, meta: &mut Meta2, st: &mut State, p: Pending) {
        match meta.commit(p.group) {
            Ok(done) => {
                let released: Vec<(VolId, u64)> = p
                    .members
                    .iter()
                    .filter_map(|t| match &t.work {
                        Work::Write { vol, reserved, .. } => Some((*vol, *reserved)),
                        _ => None,
                    })
                    .collect();
                self.committed_releasing(&done, &released);
                for t in p.members {
                    st.out.push((t, Answer::Value(0)));
                }
                if let Some(c) = &self.consolidator {
                    c.committed();
                    for (l, birth, lba, pba, crcs) in &p.offers {
                        c.offer(*l, *birth, *lba, *pba, crcs);
                    }
                }
            }
            Err(e) => {
                // The first member gets the error itself (its kind tells what failed), the
                // others a copy of its message.
                let msg = e.to_string();
                let mut first = Some(e);
                for t in p.members {
                    let err = first.take().unwrap_or_else(|| Error::Corrupt(msg.clone()));
                    st.out.push((t, Answer::Failed(err)));
                }
            }
        }
    }

    /// Runs one management step as its own group; returns the lineages it undefers.
    fn run_mgmt(&self, meta: &mut Meta2, st: &mut State, f: MgmtFn, reply: Txn) -> Vec<LineageId> {
        let mut group = match meta.begin() {
            Ok(g) => g,
            Err(e) => {
                st.out.push((reply, Answer::Failed(e)));
                return Vec::new();
            }
        };
        let cat = self.catalog_read();
        let mut ctx = MgmtCtx {
            meta,
            group: &mut group,
            catalog: &cat,
            written: &st.written,
            touched: false,
        };
        let out = f(&mut ctx);
        let touched = ctx.touched;
        drop(cat);
        match out {
            Err(e) => {
                if touched {
                    meta.stop(&e.to_string());
                    st.out.push((reply, Answer::Failed(e)));
                } else {
                    st.out.push((reply, Answer::Rejected(e)));
                }
                Vec::new()
            }
            Ok(Outcome::Retry(ls)) => {
                st.deferred.extend(ls);
                st.out.push((reply, Answer::Retry));
                Vec::new()
            }
            Ok(Outcome::Done {
                apply,
                value,
                undefer,
                durable,
            }) => {
                if durable {
                    group.set_durable();
                }
                match meta.commit(group) {
                    Ok(done) => {
                        // Order matters (format2.md §8b): the catalog shows the step
                        // before any block it releases is deferred (here, or by a later
                        // reclaim step on this thread), so a reader that resolved a
                        // target before the release holds a pin older than every such
                        // free — what keeps blocks named by the content cache, or by a
                        // store read racing a delete, from reuse while it reads.
                        {
                            let mut cat = self.catalog_write();
                            apply(&mut cat);
                            cat.gen += 1;
                        }
                        self.committed(&done);
                        st.out.push((reply, Answer::Value(value)));
                        for l in &undefer {
                            st.deferred.remove(l);
                        }
                        undefer
                    }
                    Err(e) => {
                        st.out.push((reply, Answer::Failed(e)));
                        Vec::new()
                    }
                }
            }
        }
    }

    /// A write's quota reservation when it is answered other than by its commit (which
    /// released it already).
    fn release_reservation(&self, t: &Txn, a: &Answer) {
        if let (Work::Write { vol, reserved, .. }, false) = (&t.work, matches!(a, Answer::Value(_)))
        {
            self.unreserve(*vol, *reserved);
        }
    }

    /// After any commit: frees become pending, destroyed lineages leave the catalog.
    fn committed(&self, done: &crate::v2::engine::Committed) {
        self.committed_releasing(done, &[]);
    }

    /// [`Pool2::committed`], releasing the committed writes' quota reservations as their
    /// blocks are published.
    fn committed_releasing(&self, done: &crate::v2::engine::Committed, released: &[(VolId, u64)]) {
        self.defer_frees(&done.freed);
        self.publish_owned(&done.owned, released);
        if !done.destroyed.is_empty() {
            let mut c = self.catalog_write();
            c.gen += 1;
            let bases = std::sync::Arc::make_mut(&mut c.bases);
            for l in &done.destroyed {
                bases.remove(l);
            }
        }
        self.mark_dirty();
    }

    fn reclaim_once(&self, meta: &mut Meta2) {
        let mut g = match meta.begin() {
            Ok(g) => g,
            Err(_) => return,
        };
        if let Err(e) = meta.reclaim_step(&mut g, RECLAIM_BUDGET) {
            log::error!("reclaim step: {e}");
            return;
        }
        match meta.commit(g) {
            Ok(done) => self.committed(&done),
            Err(e) => log::error!("reclaim commit: {e}"),
        }
    }
}
