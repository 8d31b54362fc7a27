//! Conformance of a `MetaStore` implementation: the invariants in `snapblk_core::meta`.

use std::ops::ControlFlow;

use snapblk_core::{MetaStore, WriteBatch};

fn collect(s: &dyn MetaStore, from: &[u8], to: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
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
}

/// Checks, on a store reopened after `run_all`, that committed data survived the close.
pub fn persisted(s: &dyn MetaStore) {
    assert_eq!(s.get(b"k1").unwrap().as_deref(), Some(&b"v1b"[..]));
    assert_eq!(collect(s, b"Z", b"[").len(), 10_000);
}
