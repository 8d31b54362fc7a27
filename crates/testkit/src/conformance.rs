//! Conformance of a `MetaStore` implementation: the invariants in `snapblk_core::meta`.

use std::ops::ControlFlow;

use snapblk_core::meta::{try_scan, MetaRead};
use snapblk_core::{MetaStore, StoreError, WriteBatch};

fn collect(s: &(impl MetaRead + ?Sized), from: &[u8], to: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    s.scan(from, to, &mut |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        ControlFlow::Continue(())
    })
    .expect("scan");
    out
}

/// Runs every check against a fresh, empty store.
pub fn run_all(s: &dyn MetaStore) {
    // Empty store.
    assert_eq!(s.get(b"a").unwrap(), None);
    assert!(collect(s, b"", b"\xff").is_empty());

    // Batches apply in order, atomically.
    let mut b = WriteBatch::new();
    b.put(b"k1".to_vec(), b"v1".to_vec());
    b.put(b"k2".to_vec(), b"v2".to_vec());
    b.put(b"k1".to_vec(), b"v1b".to_vec());
    b.delete(b"k2".to_vec());
    b.put(b"k3".to_vec(), Vec::new());
    s.commit(b, false).unwrap();
    assert_eq!(s.get(b"k1").unwrap().as_deref(), Some(&b"v1b"[..]));
    assert_eq!(s.get(b"k2").unwrap(), None);
    assert_eq!(s.get(b"k3").unwrap().as_deref(), Some(&b""[..]));

    // Ordered, half-open ranges with binary keys.
    let mut b = WriteBatch::new();
    for i in [5u64, 1, 256, 255, 0, u64::MAX] {
        let mut k = vec![b'M'];
        k.extend_from_slice(&i.to_be_bytes());
        b.put(k, i.to_le_bytes().to_vec());
    }
    s.commit(b, true).unwrap();
    let key = |i: u64| {
        let mut k = vec![b'M'];
        k.extend_from_slice(&i.to_be_bytes());
        k
    };
    let got: Vec<u64> = collect(s, &key(1), &key(256))
        .iter()
        .map(|(_, v)| u64::from_le_bytes(v[..8].try_into().unwrap()))
        .collect();
    assert_eq!(got, vec![1, 5, 255]);
    assert_eq!(collect(s, b"M", b"N").len(), 6);
    assert!(collect(s, &key(7), &key(7)).is_empty());
    assert!(collect(s, &key(9), &key(3)).is_empty());

    // Early stop.
    let mut n = 0;
    s.scan(b"M", b"N", &mut |_, _| {
        n += 1;
        if n == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(n, 2);

    // Empty batch and sync.
    s.commit(WriteBatch::new(), true).unwrap();
    s.sync().unwrap();

    // A large batch is applied whole.
    let mut b = WriteBatch::new();
    for i in 0..10_000u64 {
        let mut k = vec![b'Z'];
        k.extend_from_slice(&i.to_be_bytes());
        b.put(k, vec![7u8; 12]);
    }
    s.commit(b, false).unwrap();
    assert_eq!(
        collect(s, b"Z", b"["),
        (0..10_000u64)
            .map(|i| {
                let mut k = vec![b'Z'];
                k.extend_from_slice(&i.to_be_bytes());
                (k, vec![7u8; 12])
            })
            .collect::<Vec<_>>()
    );

    views_and_ranges(s);
    readers(s);
    readers_under_commits(s);
}

type Model = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

/// Readers (`MetaStore::reader`) read one state, as of when each was taken, however the
/// store reuses what backs them: a batch committed after a reader was taken (range deletes
/// included) is not seen by it and is seen by the next one.
fn readers(s: &dyn MetaStore) {
    let k = |i: u8| vec![b'Q', i];
    let mut model = Model::new();
    let mut b = WriteBatch::new();
    for i in 0..8 {
        b.put(k(i), vec![i]);
        model.insert(k(i), vec![i]);
    }
    s.commit(b, false).unwrap();
    let check = |r: &dyn MetaRead, m: &Model| {
        for i in 0..20 {
            assert_eq!(r.get(&k(i)).unwrap(), m.get(&k(i)).cloned(), "key {i}");
        }
        let want: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(collect(r, b"Q", b"R"), want);
        let part: Vec<_> = m
            .range(k(1)..k(5))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(collect(r, &k(1), &k(5)), part);
        assert!(collect(r, &k(5), &k(5)).is_empty());
        assert_eq!(r.get(b"Q").unwrap(), None);
        assert_eq!(r.get(b"R\xff").unwrap(), None);
    };
    for round in 0..4u8 {
        let before = model.clone();
        let r = s.reader().unwrap();
        let other = s.reader().unwrap();
        let mut b = WriteBatch::new();
        b.delete_range(k(round), k(round + 3));
        b.put(k(round + 1), vec![100 + round]);
        b.delete(k(7 - round));
        b.put(k(10 + round), vec![round]);
        s.commit(b, round % 2 == 0).unwrap();
        if round == 2 {
            // Past a small store's memtable (RocksDB with `Memory::ONE_SHOT`): the range
            // deletes above then reach the readers from an immutable memtable or, once the
            // background flush ran, a table file (which of the two is up to RocksDB).
            let mut b = WriteBatch::new();
            for i in 0..64u8 {
                b.put(vec![b'V', i], vec![i; 32 << 10]);
            }
            s.commit(b, false).unwrap();
        }
        model.retain(|key, _| !(k(round)..k(round + 3)).contains(key));
        model.insert(k(round + 1), vec![100 + round]);
        model.remove(&k(7 - round));
        model.insert(k(10 + round), vec![round]);
        check(&*r, &before);
        check(&*other, &before);
        drop(r);
        drop(other);
        check(&*s.reader().unwrap(), &model);
    }
}

/// Readers taken while another thread commits see whole batches only, never one older
/// than a batch committed before they were taken; 12 MiB go by, so a RocksDB store with
/// small memtables (`Memory::ONE_SHOT`) switches them often (kept iterators are rebuilt,
/// not only moved on).
fn readers_under_commits(s: &dyn MetaStore) {
    const BATCHES: u64 = 1_500;
    let done = std::sync::atomic::AtomicBool::new(false);
    let seen = |r: &dyn MetaRead| -> u64 {
        let a = r.get(b"Ua").unwrap();
        let mut b = None;
        r.scan(b"Ub", b"Uc", &mut |_, v| {
            b = Some(v.to_vec());
            ControlFlow::Break(())
        })
        .unwrap();
        assert_eq!(a, b, "a reader saw half a batch");
        a.map_or(0, |v| u64::from_le_bytes(v[..8].try_into().unwrap()))
    };
    std::thread::scope(|t| {
        for _ in 0..2 {
            t.spawn(|| {
                let mut last = 0;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let n = seen(&*s.reader().unwrap());
                    assert!(n >= last, "a later reader saw batch {n} after {last}");
                    last = n;
                }
            });
        }
        for n in 1..=BATCHES {
            let mut v = vec![0u8; 4 << 10];
            v[..8].copy_from_slice(&n.to_le_bytes());
            let mut b = WriteBatch::new();
            b.put(b"Ua".to_vec(), v.clone());
            b.put(b"Ub".to_vec(), v);
            s.commit(b, false).unwrap();
            assert_eq!(
                seen(&*s.reader().unwrap()),
                n,
                "a reader missed a committed batch"
            );
        }
        done.store(true, std::sync::atomic::Ordering::Release);
    });
}

fn keys_of(v: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    v.iter().map(|(k, _)| k.clone()).collect()
}

/// Views see one point in time; range deletes are half-open and ordered within a batch;
/// a visitor's error ends a scan and is returned.
fn views_and_ranges(s: &dyn MetaStore) {
    let k = |i: u8| vec![b'R', i];
    let mut b = WriteBatch::new();
    for i in 0..10 {
        b.put(k(i), vec![i]);
    }
    s.commit(b, false).unwrap();

    let view = s.view().unwrap();
    let mut b = WriteBatch::new();
    b.delete_range(k(2), k(5)); // removes 2, 3, 4
    b.put(k(3), b"again".to_vec()); // after the range delete: stays
    b.put(k(7), b"new".to_vec());
    b.delete_range(k(7), k(8)); // removes the put just before it
    b.delete_range(k(9), k(9)); // empty: nothing
    b.delete_range(k(6), k(5)); // inverted: nothing
    b.delete(k(0));
    s.commit(b, true).unwrap();

    let now: Vec<Vec<u8>> = keys_of(&collect(s, b"R", b"S"));
    assert_eq!(now, vec![k(1), k(3), k(5), k(6), k(8), k(9)]);
    assert_eq!(s.get(&k(3)).unwrap().as_deref(), Some(&b"again"[..]));
    assert_eq!(s.get(&k(7)).unwrap(), None);
    // The view still sees the store as it was before that batch.
    let then = collect(&*view, b"R", b"S");
    assert_eq!(keys_of(&then), (0..10).map(k).collect::<Vec<_>>());
    assert_eq!(view.get(&k(3)).unwrap().as_deref(), Some(&[3u8][..]));
    assert_eq!(view.get(&k(0)).unwrap().as_deref(), Some(&[0u8][..]));
    drop(view);

    // A failing visitor stops the scan; its error comes back.
    let mut seen = 0;
    let r = try_scan(s, b"R", b"S", |_, _| {
        seen += 1;
        if seen == 2 {
            Err(StoreError::Backend("visitor gave up".into()))
        } else {
            Ok(std::ops::ControlFlow::Continue(()))
        }
    });
    assert!(matches!(r, Err(StoreError::Backend(m)) if m == "visitor gave up"));
    assert_eq!(seen, 2);
}

/// Checks, on a store reopened after `run_all`, that committed data survived the close.
pub fn persisted(s: &dyn MetaStore) {
    assert_eq!(s.get(b"k1").unwrap().as_deref(), Some(&b"v1b"[..]));
    assert_eq!(collect(s, b"Z", b"[").len(), 10_000);
}
