//! Distinct id types of format 2, so a lineage id is never passed where an epoch is meant.

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// One writable history of a volume (format2.md §1).
    LineageId
);
id_type!(
    /// A point in a lineage's history: writes get the lineage's current epoch as birth;
    /// a snapshot freezes the current epoch. Own data is born at epoch ≥ 1; 0 is "before
    /// anything", the birth of inherited (BASE) pieces.
    Epoch
);
id_type!(
    /// A page of the map: blocks `[n · 64, (n + 1) · 64)` of a volume.
    PageNo
);

impl Epoch {
    pub const ZERO: Epoch = Epoch(0);
    pub const FIRST: Epoch = Epoch(1);
    /// The epoch after this one (saturating: epochs come from stored records).
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}
