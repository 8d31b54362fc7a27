//! The retained multiset R(L) of a lineage: for each epoch, how many snapshots and how many
//! holds (clones and rollbacks based on it) keep it (format2.md §1). Data alive at a
//! retained epoch is never freed.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included, Unbounded};

use super::ids::Epoch;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub snapshots: u32,
    pub holds: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retained(BTreeMap<Epoch, Count>);

impl Retained {
    pub fn from_counts(counts: impl IntoIterator<Item = (Epoch, Count)>) -> Retained {
        Retained(
            counts
                .into_iter()
                .filter(|(_, c)| c.snapshots + c.holds > 0)
                .collect(),
        )
    }
    pub fn counts(&self) -> impl Iterator<Item = (Epoch, Count)> + '_ {
        self.0.iter().map(|(e, c)| (*e, *c))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn contains(&self, e: Epoch) -> bool {
        self.0.contains_key(&e)
    }
    pub fn count(&self, e: Epoch) -> Count {
        self.0.get(&e).copied().unwrap_or_default()
    }
    pub fn min(&self) -> Option<Epoch> {
        self.0.keys().next().copied()
    }
    pub fn max(&self) -> Option<Epoch> {
        self.0.keys().next_back().copied()
    }
    /// The newest retained epoch before `e`.
    pub fn before(&self, e: Epoch) -> Option<Epoch> {
        self.0.range(..e).next_back().map(|(k, _)| *k)
    }
    /// The oldest retained epoch after `e`.
    pub fn after(&self, e: Epoch) -> Option<Epoch> {
        self.0
            .range((Excluded(e), Unbounded))
            .next()
            .map(|(k, _)| *k)
    }
    /// Whether a retained epoch lies in `[from, to)`: the test that keeps a piece alive.
    pub fn any_in(&self, from: Epoch, to: Epoch) -> bool {
        from < to
            && self
                .0
                .range((Included(from), Excluded(to)))
                .next()
                .is_some()
    }
    pub fn add_snapshot(&mut self, e: Epoch) {
        self.0.entry(e).or_default().snapshots += 1;
    }
    pub fn add_hold(&mut self, e: Epoch) {
        self.0.entry(e).or_default().holds += 1;
    }
    /// Removes one snapshot of `e`; `Ok(true)` when nothing retains `e` any more.
    pub fn remove_snapshot(&mut self, e: Epoch) -> Result<bool, String> {
        self.remove(e, |c| &mut c.snapshots, "snapshot")
    }
    /// Removes one hold on `e`; `Ok(true)` when nothing retains `e` any more.
    pub fn remove_hold(&mut self, e: Epoch) -> Result<bool, String> {
        self.remove(e, |c| &mut c.holds, "hold")
    }
    /// Drops every snapshot count (volume delete --recursive); holds stay.
    pub fn remove_all_snapshots(&mut self) {
        for c in self.0.values_mut() {
            c.snapshots = 0;
        }
        self.0.retain(|_, c| c.holds > 0);
    }
    fn remove(
        &mut self,
        e: Epoch,
        field: impl Fn(&mut Count) -> &mut u32,
        what: &str,
    ) -> Result<bool, String> {
        let c = self
            .0
            .get_mut(&e)
            .ok_or_else(|| format!("epoch {e} is not retained"))?;
        let f = field(c);
        if *f == 0 {
            return Err(format!("epoch {e} has no {what} to release"));
        }
        *f -= 1;
        if c.snapshots + c.holds == 0 {
            self.0.remove(&e);
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_and_ranges() {
        let mut r = Retained::default();
        r.add_snapshot(Epoch(3));
        r.add_snapshot(Epoch(7));
        r.add_hold(Epoch(3));
        assert!(r.any_in(Epoch(1), Epoch(4)));
        assert!(!r.any_in(Epoch(4), Epoch(7)));
        assert!(r.any_in(Epoch(4), Epoch(8)));
        assert_eq!(r.remove_snapshot(Epoch(3)), Ok(false));
        assert_eq!(r.remove_hold(Epoch(3)), Ok(true));
        assert!(r.remove_hold(Epoch(3)).is_err());
        assert_eq!((r.min(), r.max()), (Some(Epoch(7)), Some(Epoch(7))));
        assert_eq!(r.before(Epoch(7)), None);
        assert_eq!(r.after(Epoch(2)), Some(Epoch(7)));
    }
}
