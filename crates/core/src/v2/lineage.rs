//! Lineage records `l`+id: base, current epoch, closed-at epoch and the retained multiset.
//! The lineage record is the one home of R(L): snapshot records name an epoch, but the count
//! that keeps data alive is here, changed in the same batch.

use serde::{Deserialize, Serialize};

use super::ids::{Epoch, LineageId};
use super::retained::{Count, Retained};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub id: LineageId,
    /// Clone or rollback origin: pages this lineage never wrote read from here.
    pub base: Option<(LineageId, Epoch)>,
    /// Births of writes applied now.
    pub epoch: Epoch,
    /// `Some(E_close)` once the lineage backs no volume (rollback, volume delete).
    pub closed: Option<Epoch>,
    pub retained: Retained,
    /// Owned blocks born in the current epoch that are still live (the volume's "written
    /// since the last snapshot"); kept in the lineage's `k` record, changed by writes.
    pub born_now: u64,
    /// Blocks this lineage owns (live pages and dead records; I1 puts each in one place):
    /// the space it holds, for quotas. Kept in the `k` record beside `born_now`.
    pub owned: u64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    id: LineageId,
    base: Option<(LineageId, Epoch)>,
    epoch: Epoch,
    closed: Option<Epoch>,
    /// (epoch, snapshots, holds)
    retained: Vec<(Epoch, u32, u32)>,
}

impl Lineage {
    pub fn new(id: LineageId, base: Option<(LineageId, Epoch)>) -> Lineage {
        Lineage {
            id,
            base,
            epoch: Epoch::FIRST,
            closed: None,
            retained: Retained::default(),
            born_now: 0,
            owned: 0,
        }
    }

    /// The epoch that bounds live pieces: `E_close` if closed, else "never" (u64::MAX).
    pub fn live_until(&self) -> Epoch {
        self.closed.unwrap_or(Epoch(u64::MAX))
    }

    pub fn encode(&self) -> Vec<u8> {
        let rec = Record {
            id: self.id,
            base: self.base,
            epoch: self.epoch,
            closed: self.closed,
            retained: self
                .retained
                .counts()
                .map(|(e, c)| (e, c.snapshots, c.holds))
                .collect(),
        };
        serde_json::to_vec(&rec).expect("lineage record serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Lineage, String> {
        let rec: Record = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if rec.epoch < Epoch::FIRST {
            return Err("epoch 0".into());
        }
        if let Some(c) = rec.closed {
            if c != rec.epoch {
                return Err(format!("closed at {c} but epoch is {}", rec.epoch));
            }
        }
        for (e, s, h) in &rec.retained {
            if *e >= rec.epoch || *e < Epoch::FIRST || s + h == 0 {
                return Err(format!(
                    "retained epoch {e} ({s}, {h}) invalid at epoch {}",
                    rec.epoch
                ));
            }
        }
        Ok(Lineage {
            id: rec.id,
            base: rec.base,
            epoch: rec.epoch,
            closed: rec.closed,
            born_now: 0,
            owned: 0,
            retained: Retained::from_counts(rec.retained.into_iter().map(|(e, s, h)| {
                (
                    e,
                    Count {
                        snapshots: s,
                        holds: h,
                    },
                )
            })),
        })
    }
}
