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
