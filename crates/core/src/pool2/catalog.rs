//! The format-2 catalog: volumes, names and snapshots (`v`, `n`, `s`, `i` records), as
//! readers see it. Only the committer changes it, after the batch that records a change is
//! in the store, so a reader never finds a volume or snapshot the store does not have.
//!
//! Threading: the pool keeps it in an `RwLock`; readers hold the read side for a lookup
//! (µs) and clone the `Arc` of lineage bases for page reads, never holding the lock across
//! store or device I/O.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::{decode_record, encode_record, Incomplete, VolId};
use crate::meta::{try_scan, MetaRead};
use crate::pool::Target;
use crate::v2::lineage::Lineage;
use crate::v2::read::Bases;
use crate::v2::{Epoch, LineageId};

pub const K_VOLUME: u8 = b'v';
pub const K_NAME: u8 = b'n';
pub const K_SNAPSHOT: u8 = b's';
pub const K_IDS: u8 = b'i';

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolRec {
    pub id: VolId,
    pub name: String,
    pub size: u64,
    pub lineage: LineageId,
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<Incomplete>,
    /// Bytes the volume and its snapshots may hold (space.rs); `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapRec {
    pub id: u64,
    pub vol: VolId,
    pub name: String,
    pub lineage: LineageId,
    pub epoch: Epoch,
    pub size: u64,
    pub created: u64,
    /// Bytes written between the previous snapshot and this one (still live then).
    #[serde(default)]
    pub written: u64,
    /// Protected (`snapshot protect`): deleting it is refused, and no retention or space
    /// guard picks it, until it is unprotected (as `zfs hold`, `rbd snap protect`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protected: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ids {
    pub volume: u64,
    pub snapshot: u64,
}

pub fn volume_key(id: VolId) -> Vec<u8> {
    let mut k = vec![K_VOLUME];
    k.extend_from_slice(&id.to_be_bytes());
    k
}
pub fn name_key(name: &str) -> Vec<u8> {
    let mut k = vec![K_NAME];
    k.extend_from_slice(name.as_bytes());
    k
}
pub fn snapshot_key(vol: VolId, name: &str) -> Vec<u8> {
    let mut k = vec![K_SNAPSHOT];
    k.extend_from_slice(&vol.to_be_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}
pub fn ids_key() -> Vec<u8> {
    vec![K_IDS]
}
pub fn encode<T: Serialize>(r: &T) -> Vec<u8> {
    encode_record(r)
}

/// Where a target reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub lineage: LineageId,
    /// `None`: the live content of the volume.
    pub at: Option<Epoch>,
    pub size: u64,
}

#[derive(Debug, Default, Clone)]
pub struct Catalog {
    pub volumes: BTreeMap<VolId, VolRec>,
    pub names: BTreeMap<String, VolId>,
    pub snapshots: BTreeMap<(VolId, String), SnapRec>,
    pub ids: Ids,
    /// Lineage bases for page reads (copy-on-write: readers clone the Arc).
    pub bases: Arc<HashMap<LineageId, Option<(LineageId, Epoch)>>>,
    /// Incremented by every change the committer publishes (caches key on it).
    pub gen: u64,
}

/// The bases of one moment, as page reads use them.
pub struct BaseMap(pub Arc<HashMap<LineageId, Option<(LineageId, Epoch)>>>);

impl Bases for BaseMap {
    fn base(&self, l: LineageId) -> Result<Option<(LineageId, Epoch)>> {
        self.0
            .get(&l)
            .copied()
            .ok_or_else(|| Error::Corrupt(format!("lineage {l} is not in the catalog")))
    }
}

impl Catalog {
    pub fn load<S: MetaRead + ?Sized>(
        store: &S,
        lineages: &BTreeMap<LineageId, Lineage>,
    ) -> Result<Catalog> {
        let mut c = Catalog::default();
        if let Some(v) = store.get(&ids_key())? {
            c.ids = decode_record("ids", &ids_key(), &v)?;
        }
        try_scan(store, &[K_VOLUME], &[K_VOLUME + 1], |k, v| {
            let r: VolRec = decode_record("volume", k, v)?;
            c.names.insert(r.name.clone(), r.id);
            c.volumes.insert(r.id, r);
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        try_scan(store, &[K_SNAPSHOT], &[K_SNAPSHOT + 1], |k, v| {
            let r: SnapRec = decode_record("snapshot", k, v)?;
            c.snapshots.insert((r.vol, r.name.clone()), r);
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        for r in c.volumes.values() {
            if !lineages.contains_key(&r.lineage) {
                return Err(Error::Corrupt(format!(
                    "volume '{}' uses lineage {}, which has no record",
                    r.name, r.lineage
                )));
            }
        }
        c.bases = Arc::new(lineages.iter().map(|(l, x)| (*l, x.base)).collect());
        Ok(c)
    }

    pub fn volume_id(&self, name: &str) -> Result<VolId> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| Error::not_found("volume", name))
    }
    pub fn volume(&self, id: VolId) -> Result<&VolRec> {
        self.volumes
            .get(&id)
            .ok_or_else(|| Error::not_found("volume", format!("#{id}")))
    }
    pub fn snapshot(&self, vol: VolId, name: &str) -> Result<&SnapRec> {
        self.snapshots.get(&(vol, name.to_string())).ok_or_else(|| {
            let v = self.volumes.get(&vol).map_or("?", |v| v.name.as_str());
            Error::not_found("snapshot", format!("{v}@{name}"))
        })
    }
    pub fn snapshots_of(&self, vol: VolId) -> impl Iterator<Item = &SnapRec> {
        self.snapshots
            .range((vol, String::new())..)
            .take_while(move |((v, _), _)| *v == vol)
            .map(|(_, s)| s)
    }
    pub fn source(&self, t: &Target) -> Result<Source> {
        Ok(match t {
            Target::Volume(id) => {
                let v = self.volume(*id)?;
                Source {
                    lineage: v.lineage,
                    at: None,
                    size: v.size,
                }
            }
            Target::Snapshot(id, s) => {
                let s = self.snapshot(*id, s)?;
                Source {
                    lineage: s.lineage,
                    at: Some(s.epoch),
                    size: s.size,
                }
            }
        })
    }
    pub fn add_lineage(&mut self, l: LineageId, base: Option<(LineageId, Epoch)>) {
        Arc::make_mut(&mut self.bases).insert(l, base);
    }
}
