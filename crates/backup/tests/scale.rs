//! Requests a job makes do not grow with what the repository already holds (issue 12):
//! with 50 and then 200 backups of three pools stored, a 1% incremental backup, a listing
//! of backups and a restore each make about the same number of store requests (ratio at
//! most 1.2). What makes it so: catalogs (one GET per pool lists its backups) and the
//! local cache of immutable objects (pack indexes and tables are downloaded once).
//! Listings count as pages of 1,000 keys, as S3 answers them.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{put, random_bytes, Call, Hooked, Op, MIB};
use snapblk_backup::cache::ObjectCache;
use snapblk_backup::catalog::Catalogs;
use snapblk_backup::file::FileStore;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::volume::{backup_snapshot, restore_volume};
use snapblk_backup::{NoProgress, Repository};
use snapblk_core::Pool;

#[derive(Default)]
struct Counts {
    get: AtomicU64,
    list: AtomicU64,
    put: AtomicU64,
    delete: AtomicU64,
}

/// A directory store counting its requests in `n` (a listing as its pages).
fn counting(dir: &std::path::Path, n: &Arc<Counts>) -> Hooked {
    let n = Arc::clone(n);
    Hooked::new(Arc::new(FileStore::new(dir)), move |c| {
        let (counter, by) = match c {
            Call::Before(Op::Get(_) | Op::GetRange { .. }) => (&n.get, 1),
            Call::Before(Op::Put(_) | Op::PutNew(_)) => (&n.put, 1),
            Call::Before(Op::Delete(_)) => (&n.delete, 1),
            Call::Listed(_, v) => (&n.list, (v.len() as u64).div_ceil(1000).max(1)),
            _ => return Ok(()),
        };
        counter.fetch_add(by, Ordering::Relaxed);
        Ok(())
    })
}

impl Counts {
    fn total(&self) -> u64 {
        self.get.load(Ordering::Relaxed)
            + self.list.load(Ordering::Relaxed)
            + self.put.load(Ordering::Relaxed)
            + self.delete.load(Ordering::Relaxed)
    }
}

struct Fleet {
    repo: Repository,
    n: Arc<Counts>,
    pools: Vec<Arc<Pool>>,
    backups: u64,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Fleet {
    /// Changes about 1% of pool `p`'s volume (one 64 KiB cell of 6 MiB), snapshots it and
    /// backs it up.
    fn incremental(&mut self, p: usize) {
        let pool = &self.pools[p];
        self.backups += 1;
        let b = self.backups;
        put(
            pool,
            "v",
            (b % 96) * (64 << 10),
            &random_bytes(64 << 10, 1000 + b),
        );
        let s = format!("s{b}");
        pool.create_snapshot("v", &s).unwrap();
        backup_snapshot(pool, &self.repo, &format!("v@{s}"), false, &NoProgress).unwrap();
    }

    /// Store requests `f` makes.
    fn requests(&mut self, f: impl FnOnce(&mut Fleet)) -> u64 {
        let before = self.n.total();
        f(self);
        self.n.total() - before
    }

    fn measure(&mut self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        // Several in a row: a backup that compacts its packs (crate::compact) uploads a few
        // more, every few backups; the amortised cost is what must not grow.
        m.insert(
            "8 incremental backups",
            self.requests(|f| {
                for _ in 0..8 {
                    f.incremental(0);
                }
            }),
        );
        m.insert(
            "backup list",
            self.requests(|f| {
                Catalogs::load(&f.repo).unwrap();
            }),
        );
        // The newest backup of pool 0: its chain grows from ~17 to ~67 incrementals, and
        // compaction keeps it in as few packs as at the start (crate::compact).
        let newest = format!("v@s{}", self.backups - 2);
        m.insert(
            "restore of the newest",
            self.requests(|f| {
                restore_volume(&f.pools[0], &f.repo, &newest, None, "r", &NoProgress).unwrap();
                f.pools[0].delete_volume("r", false).unwrap();
            }),
        );
        // The same backup each time (pool 0's first): what it costs must not depend on
        // how much else is stored, nor on how often later backups compacted its chunks.
        m.insert(
            "restore of the first",
            self.requests(|f| {
                let name = "v@s1".to_string();
                restore_volume(&f.pools[0], &f.repo, &name, None, "r", &NoProgress).unwrap();
                f.pools[0].delete_volume("r", false).unwrap();
            }),
        );
        m
    }
}

#[test]
fn requests_do_not_grow_with_backups_stored() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let n = Arc::new(Counts::default());
    let store = counting(dir.path(), &n);
    let opts = InitOptions {
        chunk_size: 64 << 10,
        pack_size: 1 << 20,
        ..Default::default()
    };
    let repo = Repository::init(Arc::new(store), b"k", &opts)
        .unwrap()
        .with_cache(Some(ObjectCache::new(cache.path())));
    let pools: Vec<Arc<Pool>> = (0..3).map(|_| common::pool(256 * MIB)).collect();
    for (i, p) in pools.iter().enumerate() {
        p.create_volume("v", 6 * MIB).unwrap();
        put(p, "v", 0, &random_bytes(6 * MIB as usize, i as u64));
    }
    let mut f = Fleet {
        repo,
        n,
        pools,
        backups: 0,
        _dirs: (dir, cache),
    };
    while f.backups < 50 {
        let p = (f.backups % 3) as usize;
        f.incremental(p);
    }
    let at50 = f.measure();
    while f.backups < 200 {
        let p = (f.backups % 3) as usize;
        f.incremental(p);
    }
    let at200 = f.measure();
    eprintln!("requests at 50 backups: {at50:?}; at 200: {at200:?}");
    for (op, n50) in &at50 {
        let n200 = at200[op];
        assert!(
            n200 as f64 <= 1.2 * *n50 as f64,
            "{op}: {n50} requests with 50 backups stored, {n200} with 200"
        );
    }
}
