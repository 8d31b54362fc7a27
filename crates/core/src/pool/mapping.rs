//! Reading the extent map: one layer's entries, and the visible entries through a chain.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use crate::error::{Error, Result};
use crate::keys::{self, LayerId, MapValue};
use crate::meta::{try_scan, MetaRead, MetaStore};

/// Calls `f(lba, value)` for each entry of `layer` with lba in `[from, to)`, ascending.
pub(crate) fn scan_layer(
    store: &(impl MetaRead + ?Sized),
    layer: LayerId,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, MapValue),
) -> Result<()> {
    if from >= to {
        return Ok(());
    }
    if to - from == 1 {
        // One block (the common 4K request): a point lookup, which the store can answer
        // from bloom filters, is much cheaper than setting up a range iterator.
        if let Some(v) = store.get(&keys::map_key(layer, from))? {
            f(from, MapValue::decode(&v)?);
        }
        return Ok(());
    }
    let (a, b) = keys::map_range(layer, from, to);
    try_scan(store, &a, &b, |k, v| {
        let (_, lba) = keys::decode_map_key(k)?;
        f(lba, MapValue::decode(v)?);
        Ok::<_, Error>(ControlFlow::Continue(()))
    })
}

/// The visible entry of each lba in `[from, to)` through `chain` (nearest layer first).
/// Lbas absent from the result read as zeros.
pub(crate) fn resolve(
    store: &dyn MetaStore,
    chain: &[LayerId],
    from: u64,
    to: u64,
) -> Result<BTreeMap<u64, MapValue>> {
    let mut out = BTreeMap::new();
    let want = to.saturating_sub(from);
    for &layer in chain {
        if out.len() as u64 >= want {
            break;
        }
        scan_layer(store, layer, from, to, |lba, mv| {
            out.entry(lba).or_insert(mv);
        })?;
    }
    Ok(out)
}

/// Lbas in `[from, to)` whose visible value through `chain` is data (not zero, not absent).
pub(crate) fn visible_data(
    store: &dyn MetaStore,
    chain: &[LayerId],
    from: u64,
    to: u64,
) -> Result<std::collections::BTreeSet<u64>> {
    Ok(resolve(store, chain, from, to)?
        .into_iter()
        .filter(|(_, v)| matches!(v, MapValue::Data { .. }))
        .map(|(l, _)| l)
        .collect())
}
