//! Store conformance for keys in read groups (`v2::keys::read_group`: a format-2 page's
//! record, dead records and checkpoints), which a store may index by group (RocksDB:
//! prefix bloom filters). Scans across groups read in total order everywhere; a reader
//! answers within one group exactly and may refuse a scan that leaves its group.
//!
//! `layer` writes the groups of one lineage in interleaved batches (page `i` in batch
//! `i % BATCHES`), with deletes and range deletes of earlier batches' keys (one over
//! several groups): a store that puts each batch in a table file of its own (RocksDB
//! reopened between them, some compacted into a lower level) then has files that hold some
//! groups and not others, which is where a seek by group could skip a file it must read.

use std::ops::ControlFlow;

use snapblk_core::meta::MetaRead;
use snapblk_core::v2::ids::{Epoch, LineageId, PageNo};
use snapblk_core::v2::keys;
use snapblk_core::{MetaStore, WriteBatch};

pub type Model = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

/// Batches `layer` writes (0..BATCHES).
pub const BATCHES: u64 = 6;
const PAGES: u64 = 60;
const L: LineageId = LineageId(7);

/// Page `i` of the layered groups: odd ones end in 0xff bytes (0xff, 0x1ff, ...), whose
/// group's successor carries into the byte before.
fn pno(i: u64) -> PageNo {
    PageNo(i * 128 + 127 * (i % 2))
}

fn collect(s: &(impl MetaRead + ?Sized), from: &[u8], to: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    s.scan(from, to, &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        ControlFlow::Continue(())
    })
    .expect("scan");
    out
}

fn want(m: &Model, from: &[u8], to: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    m.range(from.to_vec()..to.to_vec())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Commits batch `n` of the layered groups to `s` and to `m`: pages `i ≡ n (mod
/// BATCHES)` get a record and dead records at epochs 1..=i%5 (with a checkpoint at 2);
/// from the second batch on it also deletes the record of every 4th page of the batch
/// before, and the dead records of every 5th from epoch 2.
pub fn layer(s: &dyn MetaStore, m: &mut Model, n: u64) {
    let mut b = WriteBatch::new();
    let mut put = |b: &mut WriteBatch, k: Vec<u8>, v: Vec<u8>| {
        m.insert(k.clone(), v.clone());
        b.put(k, v);
    };
    for i in (0..PAGES).filter(|i| i % BATCHES == n) {
        let p = pno(i);
        put(&mut b, keys::page(L, p), vec![n as u8; 40]);
        for e in 1..=i % 5 {
            put(&mut b, keys::dead(L, p, Epoch(e)), vec![e as u8; 24]);
            if e == 2 {
                put(&mut b, keys::checkpoint(L, p, Epoch(e)), vec![0xc; 30]);
            }
        }
    }
    if n == 4 {
        // One range tombstone over several groups' records (of pages from batches 0-2).
        let (from, to) = (keys::page(L, pno(9)), keys::page(L, pno(14)));
        b.delete_range(from.clone(), to.clone());
        m.retain(|k, _| !(from.clone()..to.clone()).contains(k));
    }
    if n > 0 {
        for i in (0..PAGES).filter(|i| i % BATCHES == n - 1) {
            let p = pno(i);
            if i % 4 == 0 {
                b.delete(keys::page(L, p));
                m.remove(&keys::page(L, p));
            }
            if i % 5 == 0 {
                let (from, to) = keys::deads_from(L, p, Epoch(2));
                b.delete_range(from.clone(), to.clone());
                m.retain(|k, _| !(from.clone()..to.clone()).contains(k));
            }
        }
    }
    s.commit(b, false).unwrap();
}

/// Every page's group through readers and views, and scans across groups through the
/// store and views, against `m`.
pub fn check(s: &dyn MetaStore, m: &Model) {
    for i in 0..PAGES + 2 {
        let p = pno(i);
        let r = s.reader().unwrap();
        let page = keys::page(L, p);
        assert_eq!(r.get(&page).unwrap(), m.get(&page).cloned(), "page {i}");
        for e in [0, 2, 3] {
            let (from, to) = keys::reads_from(L, p, Epoch(e));
            assert_eq!(
                collect(&*r, &from, &to),
                want(m, &from, &to),
                "page {i} at {e}"
            );
        }
        let (from, to) = keys::deads_from(L, p, Epoch(0));
        assert_eq!(collect(&*r, &from, &to), want(m, &from, &to), "page {i}");
        let k = keys::dead(L, p, Epoch(3));
        assert_eq!(r.get(&k).unwrap(), m.get(&k).cloned(), "page {i}");
    }
    // Across groups, each scan starting in one.
    let (_, end) = keys::pages(L, PageNo(0), pno(PAGES + 1));
    let (dead_from, _) = keys::deads_from(L, pno(1), Epoch(1));
    let (_, dead_to) = keys::deads(L);
    let view = s.view().unwrap();
    for from in [1, 2, 3, 4, 8, 31] {
        let start = keys::page(L, pno(from));
        assert_eq!(
            collect(s, &start, &end),
            want(m, &start, &end),
            "pages {from}.."
        );
        assert_eq!(collect(&*view, &start, &end), want(m, &start, &end));
        let d = keys::dead(L, pno(from), Epoch(1));
        assert_eq!(
            collect(s, &d, &dead_to),
            want(m, &d, &dead_to),
            "deads {from}.."
        );
        assert_eq!(collect(&*view, &d, &dead_to), want(m, &d, &dead_to));
    }
    assert_eq!(
        collect(s, &dead_from, &dead_to),
        want(m, &dead_from, &dead_to)
    );
    // A reader refuses a scan that leaves its group or starts outside one and meets group
    // keys, or answers it exactly.
    let r = s.reader().unwrap();
    for (start, end) in [
        (keys::page(L, pno(1)), end.clone()),
        (keys::deads(L).0, keys::deads(L).1),
        (keys::all_pages(L).0, keys::all_pages(L).1),
    ] {
        let mut got = Vec::new();
        let res = r.scan(&start, &end, &mut |k, v| {
            got.push((k.to_vec(), v.to_vec()));
            ControlFlow::Continue(())
        });
        if res.is_ok() {
            assert_eq!(got, want(m, &start, &end));
        }
    }
}

/// The layered groups, written in one store without reopening it.
pub fn grouped(s: &dyn MetaStore) {
    let mut m = Model::new();
    for n in 0..BATCHES {
        layer(s, &mut m, n);
        check(s, &m);
    }
}
