//! Compaction (crate::compact): the newest backup of a long incremental chain stays in a
//! bounded number of packs, so its restore's requests do not grow with the chain; every
//! backup still restores exactly, also after gc collected the superseded copies; verify
//! stays clean.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use snapblk_backup::file::FileStore;
use snapblk_backup::repo::InitOptions;
use snapblk_backup::store::ObjectStore;
use snapblk_backup::volume::{backup_snapshot, restore_volume};
use snapblk_backup::{gc, verify, NoProgress, Repository};
use snapblk_core::Pool;

mod common;
use common::{image, put, random_bytes, Call, Hooked, Op, MIB};

const CHUNK: u64 = 64 << 10;

/// Packs ranged GETs read (shared with the store's hook).
type PacksRead = Arc<Mutex<HashSet<String>>>;

/// A directory store that records the packs ranged GETs read, and lists index objects
/// with distinct, increasing times in the order they were stored (from `base`: a real
/// store's second resolution would tie the copies of a fast test).
fn watched(dir: &std::path::Path, base: u64) -> (Hooked, PacksRead) {
    let read = PacksRead::default();
    let order: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
    let seen = Arc::clone(&read);
    let store = Hooked::new(Arc::new(FileStore::new(dir)), move |c| {
        match c {
            Call::Before(Op::GetRange { key, .. }) if key.starts_with("packs/") => {
                seen.lock().unwrap().insert(key.to_string());
            }
            Call::Before(Op::Put(key)) if key.starts_with("ix/") => {
                let mut o = order.lock().unwrap();
                let n = o.len() as u64 + 1;
                o.entry(key.to_string()).or_insert(n);
            }
            Call::Listed(_, v) => {
                let o = order.lock().unwrap();
                for m in v.iter_mut() {
                    if let Some(n) = o.get(&m.key) {
                        m.modified = base + n;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    });
    (store, read)
}

/// Distinct packs a restore of `name` reads.
fn packs_read(pool: &Arc<Pool>, r: &Repository, w: &PacksRead, name: &str, as_vol: &str) -> usize {
    w.lock().unwrap().clear();
    restore_volume(pool, r, name, None, as_vol, &NoProgress).unwrap();
    assert!(
        image(pool, name) == image(pool, as_vol),
        "{as_vol} differs from {name}"
    );
    let n = w.lock().unwrap().len();
    pool.delete_volume(as_vol, false).unwrap();
    n
}

#[test]
fn the_newest_backup_of_a_long_chain_stays_in_few_packs() {
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (store, w) = watched(dir.path(), now - 1_000_000);
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let opts = InitOptions {
        chunk_size: CHUNK as u32,
        pack_size: 1 << 20,
        ..Default::default()
    };
    let r = Repository::init(store, b"test key", &opts).unwrap();
    let pool = common::pool(512 * MIB);
    pool.create_volume("v", 8 * MIB).unwrap();
    put(&pool, "v", 0, &random_bytes(8 * MIB as usize, 1));
    pool.create_snapshot("v", "s0").unwrap();
    backup_snapshot(&pool, &r, "v@s0", false, &NoProgress).unwrap();
    let mut x = 7u64;
    let mut compacted = 0;
    let mut at = HashMap::new();
    for i in 1..=60u64 {
        // Two random cells rewritten per incremental.
        for k in 0..2 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let cell = x % (8 * MIB / CHUNK);
            put(
                &pool,
                "v",
                cell * CHUNK,
                &random_bytes(CHUNK as usize, i * 10 + k),
            );
        }
        let name = format!("v@s{i}");
        pool.create_snapshot("v", &format!("s{i}")).unwrap();
        let s = backup_snapshot(&pool, &r, &name, false, &NoProgress).unwrap();
        compacted += s.stats.chunks_compacted;
        if i == 15 || i == 60 {
            at.insert(i, packs_read(&pool, &r, &w, &name, "check"));
        }
    }
    assert!(compacted > 0, "nothing was compacted");
    let (p15, p60) = (at[&15], at[&60]);
    // 8 MiB in 1 MiB packs: 8 at best.
    assert!(p60 <= 18, "the newest of 60 incrementals reads {p60} packs");
    assert!(
        p60 as f64 <= 1.2 * p15 as f64 + 1.0,
        "packs read grew from {p15} to {p60} with the chain"
    );
    // Superseded copies collected: every backup still restores.
    gc::run(
        &r,
        &gc::Options {
            grace_secs: 0,
            max_unused: 0.1,
            dry_run: false,
        },
        &NoProgress,
    )
    .unwrap();
    for name in ["v@s0", "v@s30", "v@s60"] {
        packs_read(&pool, &r, &w, name, "after-gc");
    }
    let rep = verify::run(&r, true, 4, &NoProgress).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}
