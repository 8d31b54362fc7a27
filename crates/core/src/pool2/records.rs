//! Application records kept with the pool: small named values the daemon stores next to the
//! volumes they concern (protection policies, job state and history), so they move, get
//! backed up and survive restarts with the pool. Key `a` + name (format2.md §2); the pool
//! does not interpret the values.
//!
//! Writes are management steps (one durable batch each, in order with other management);
//! reads scan the store directly (a record is written whole in one batch, so a read sees
//! it whole or not at all).

use std::ops::ControlFlow;

use crate::error::{Error, Result};
use crate::meta::{try_scan, BatchOp};

use super::committer::Outcome;
use super::{lock, Pool2};

const K_RECORD: u8 = b'a';
/// Longest record name.
pub const MAX_RECORD_NAME: usize = 255;
/// Largest record value.
pub const MAX_RECORD_VALUE: usize = 1 << 20;

fn key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(K_RECORD);
    k.extend_from_slice(name.as_bytes());
    k
}

impl Pool2 {
    /// Writes (`Some`) or deletes (`None`) record `name`, durably.
    pub fn put_record(&self, name: &str, value: Option<Vec<u8>>) -> Result<()> {
        if name.is_empty() || name.len() > MAX_RECORD_NAME {
            return Err(Error::invalid(
                "record name",
                format!("'{name}': 1 to {MAX_RECORD_NAME} bytes"),
            ));
        }
        if value.as_ref().is_some_and(|v| v.len() > MAX_RECORD_VALUE) {
            return Err(Error::invalid(
                "record",
                format!("'{name}' is larger than {MAX_RECORD_VALUE} bytes"),
            ));
        }
        let _m = lock(&self.mgmt);
        let k = key(name);
        self.run(Box::new(move |ctx| {
            ctx.group.extra(match value {
                Some(v) => BatchOp::Put(k, v),
                None => BatchOp::Delete(k),
            });
            Ok(Outcome::Done {
                apply: Box::new(|_| {}),
                value: 0,
                undefer: Vec::new(),
                durable: true,
            })
        }))?;
        Ok(())
    }

    /// The records whose names start with `prefix`, in name order.
    pub fn records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let from = key(prefix);
        let mut to = from.clone();
        // Every name with this prefix sorts before prefix + 0xff... + 1: bump the last byte
        // that can be bumped (the record prefix byte itself at worst).
        while let Some(last) = to.pop() {
            if last < u8::MAX {
                to.push(last + 1);
                break;
            }
        }
        let mut out = Vec::new();
        try_scan(&**self.store(), &from, &to, |k, v| {
            let name = String::from_utf8(k[1..].to_vec())
                .map_err(|_| Error::Corrupt(format!("record key {:?} is not UTF-8", &k[1..])))?;
            out.push((name, v.to_vec()));
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        Ok(out)
    }
}

/// Consistency groups: named sets of volumes snapshotted together
/// ([`Pool2::create_snapshots`]), kept as records `group/NAME` (a JSON list of volume
/// names).
impl Pool2 {
    /// Creates or replaces group `name`; every member must exist.
    pub fn set_group(&self, name: &str, volumes: &[String]) -> Result<()> {
        crate::names::validate_name("group name", name)?;
        if volumes.is_empty() {
            return Err(Error::invalid("group", format!("'{name}' has no volume")));
        }
        for (i, v) in volumes.iter().enumerate() {
            self.volume_id(v)?;
            if volumes[..i].contains(v) {
                return Err(Error::invalid("group", format!("'{name}' names {v} twice")));
            }
        }
        let v = serde_json::to_vec(volumes).expect("a list of names serialises");
        self.put_record(&format!("group/{name}"), Some(v))
    }

    /// The members of group `name`.
    pub fn group(&self, name: &str) -> Result<Vec<String>> {
        let key = format!("group/{name}");
        let rec = self
            .records(&key)?
            .into_iter()
            .find(|(k, _)| *k == key)
            .ok_or_else(|| Error::not_found("group", name.to_string()))?;
        serde_json::from_slice(&rec.1).map_err(|e| Error::Corrupt(format!("record {key}: {e}")))
    }

    /// Every group and its members.
    pub fn groups(&self) -> Result<Vec<(String, Vec<String>)>> {
        self.records("group/")?
            .into_iter()
            .map(|(k, v)| {
                let members = serde_json::from_slice(&v)
                    .map_err(|e| Error::Corrupt(format!("record {k}: {e}")))?;
                Ok((k["group/".len()..].to_string(), members))
            })
            .collect()
    }

    pub fn delete_group(&self, name: &str) -> Result<()> {
        self.group(name)?;
        self.put_record(&format!("group/{name}"), None)
    }

    /// Snapshots every member of group `name` as `snap`, as one cut.
    pub fn create_group_snapshot(
        &self,
        name: &str,
        snap: &str,
    ) -> Result<Vec<crate::pool::SnapshotInfo>> {
        let members = self.group(name)?;
        let refs: Vec<&str> = members.iter().map(String::as_str).collect();
        self.create_snapshots(&refs, snap)
    }
}

const DEFAULT_VOLUME: &str = "default-volume";

/// The default volume: what an NBD client gets when it asks for the empty export name
/// (as ZeroFS's default dataset). Record `default-volume`.
impl Pool2 {
    /// Sets (or with `None` clears) the default volume; it must exist.
    pub fn set_default_volume(&self, name: Option<&str>) -> Result<()> {
        match name {
            Some(n) => {
                self.volume_id(n)?;
                self.put_record(DEFAULT_VOLUME, Some(n.as_bytes().to_vec()))
            }
            None => self.put_record(DEFAULT_VOLUME, None),
        }
    }

    pub fn default_volume(&self) -> Result<Option<String>> {
        Ok(self
            .records(DEFAULT_VOLUME)?
            .into_iter()
            .find(|(k, _)| k == DEFAULT_VOLUME)
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The export name a client asked for, with the empty name resolved to the default
    /// volume (an error says none is set).
    pub fn export_name(&self, name: &str) -> Result<String> {
        if !name.is_empty() {
            return Ok(name.to_string());
        }
        self.default_volume()?.ok_or_else(|| {
            Error::not_found(
                "export",
                "'' (no default volume: `snapblk volume set-default NAME`)".to_string(),
            )
        })
    }
}
