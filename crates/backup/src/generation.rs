//! Index generations (repository format 5; docs/design.md §12 "Index generations"): the
//! compacted view of which packs exist that gc writes, so a job lists only the index
//! objects written since, never `index/` or `packs/` whole.
//!
//! Objects: parts `gen/<g:016x>.<k>` then the head `gen/<g:016x>` (create-only), each
//! sealed under its name. The head (JSON, small) holds the generation's number, its cut
//! (milliseconds: index objects stamped at or after it are not in the generation and
//! are listed by every job), the hash of the previous head, and the hash and record count
//! of each part. A part is zstd-compressed fixed 57-byte records sorted by pack id:
//! kind (0: a pack, 1: a pack deleted by a recent gc run), the pack id (32 bytes), then
//! three u64: for a pack its index object's stamp (`u64::MAX`: an `index/` key), the
//! index object's store time (what ranks copies, crate::index::PackInfo::rank) and the
//! pack's size; for a deleted pack the number of the generation that recorded it.
//!
//! Invariants: a reader takes nothing from a part whose hash is not the one its
//! authenticated head names, so parts are immutable in effect and cached by hash
//! (`gen/<hash>`); every count and size read is bounded before it sizes anything
//! ([`MAX_HEAD`], [`MAX_PARTS`], [`PART_RECORDS`]).
//!
//! Threading: plain functions, no shared state.

use std::collections::BTreeMap;

use crate::error::{BackupError, Result};
use crate::repo::Repository;

pub const GEN: &str = "gen/";
/// Largest head object read.
pub const MAX_HEAD: u64 = 1 << 20;
/// Records per part (57 MiB of records before compression).
pub const PART_RECORDS: usize = 1 << 20;
/// Parts a head may name.
pub const MAX_PARTS: usize = 4096;
/// Gc runs whose deletions a generation keeps listing.
pub const KEEP_DELETED_RUNS: u64 = 8;
const RECORD: usize = 57;
const MAGIC: &[u8; 4] = b"SBGN";
const NO_STAMP: u64 = u64::MAX;

/// A pack a generation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pack {
    pub id: [u8; 32],
    /// Its index object's `ix/` stamp; None for `index/<id>`.
    pub stamp: Option<u64>,
    /// Its index object's store time (seconds).
    pub modified: u64,
    /// The pack object's size in bytes.
    pub size: u64,
}

/// One generation, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generation {
    pub number: u64,
    /// Milliseconds: index objects stamped at or after it are not in `packs`.
    pub cut_ms: u64,
    /// Seconds since the Unix epoch, by the writing gc's clock.
    pub created: u64,
    /// Sorted by id, distinct.
    pub packs: Vec<Pack>,
    /// Packs deleted by recent gc runs (id, number of the generation that recorded it),
    /// sorted by id, distinct.
    pub deleted: Vec<([u8; 32], u64)>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Head {
    number: u64,
    cut_ms: u64,
    created: u64,
    /// Hash of the previous generation's head (None for the first).
    prev: Option<String>,
    parts: Vec<PartRef>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PartRef {
    hash: String,
    records: u64,
}

/// A generation as read: with the hash of its head and the hash its head names for its
/// predecessor.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub generation: Generation,
    pub head_hash: String,
    pub prev: Option<String>,
    /// The hashes of its parts (what the local cache keeps them under, `gen/<hash>`).
    pub parts: Vec<String>,
}

pub fn head_key(number: u64) -> String {
    format!("{GEN}{number:016x}")
}

fn part_key(number: u64, k: usize) -> String {
    format!("{GEN}{number:016x}.{k}")
}

fn aad(key: &str) -> Vec<u8> {
    format!("snapblk index generation {key}").into_bytes()
}

/// The generation number a listed key of a head names (None for parts and other keys).
pub fn head_number(key: &str) -> Option<u64> {
    let hex = key.strip_prefix(GEN)?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// A pack id (64 lowercase hex digits) as bytes; None for any other name.
pub fn id_bytes(id: &str) -> Option<[u8; 32]> {
    if id.len() != 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(id, &mut out).ok()?;
    Some(out)
}

pub fn id_string(id: &[u8; 32]) -> String {
    hex::encode(id)
}

fn record(kind: u8, id: &[u8; 32], a: u64, b: u64, c: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0] = kind;
    r[1..33].copy_from_slice(id);
    r[33..41].copy_from_slice(&a.to_le_bytes());
    r[41..49].copy_from_slice(&b.to_le_bytes());
    r[49..57].copy_from_slice(&c.to_le_bytes());
    r
}

fn u64_at(r: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&r[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Every record of `g`, packs then deleted ones, split into parts' plain bytes.
fn encode_parts(g: &Generation) -> Vec<Vec<u8>> {
    let records = g
        .packs
        .iter()
        .map(|p| record(0, &p.id, p.stamp.unwrap_or(NO_STAMP), p.modified, p.size))
        .chain(g.deleted.iter().map(|(id, by)| record(1, id, *by, 0, 0)));
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for (n, r) in records.enumerate() {
        if n % PART_RECORDS == 0 {
            let mut p = Vec::with_capacity(8 + RECORD * PART_RECORDS.min(64 << 10));
            p.extend_from_slice(MAGIC);
            p.extend_from_slice(&1u32.to_le_bytes());
            parts.push(p);
        }
        if let Some(p) = parts.last_mut() {
            p.extend_from_slice(&r);
        }
    }
    parts
}

/// Decodes one part's plain bytes into `g` (records of `expect` count).
fn decode_part(plain: &[u8], expect: u64, g: &mut Generation) -> std::result::Result<(), String> {
    let body = plain
        .strip_prefix(MAGIC.as_slice())
        .and_then(|b| b.strip_prefix(1u32.to_le_bytes().as_slice()))
        .ok_or("is not a generation part of version 1")?;
    if body.len() % RECORD != 0 || (body.len() / RECORD) as u64 != expect {
        return Err(format!(
            "holds {} bytes of records, not the {expect} records its head names",
            body.len()
        ));
    }
    for r in body.chunks_exact(RECORD) {
        let mut id = [0u8; 32];
        id.copy_from_slice(&r[1..33]);
        let (a, b, c) = (u64_at(r, 33), u64_at(r, 41), u64_at(r, 49));
        match r[0] {
            0 => g.packs.push(Pack {
                id,
                stamp: (a != NO_STAMP).then_some(a),
                modified: b,
                size: c,
            }),
            1 => g.deleted.push((id, a)),
            k => return Err(format!("holds a record of unknown kind {k}")),
        }
    }
    Ok(())
}

/// Stores generation `g` (parts first, then its head, create-only), naming `prev` (the
/// hash of the previous head). Returns the new head's hash, or None if a head of that
/// number exists already (another gc wrote it: the caller stops).
pub fn write(repo: &Repository, g: &Generation, prev: Option<&str>) -> Result<Option<String>> {
    let store = repo.store();
    let keys = repo.keys();
    let mut parts = Vec::new();
    for (k, plain) in encode_parts(g).into_iter().enumerate() {
        let records = ((plain.len() - 8) / RECORD) as u64;
        let z = zstd::bulk::compress(&plain, 3).map_err(BackupError::Io)?;
        let key = part_key(g.number, k);
        let sealed = keys.seal(&z, &aad(&key));
        let hash = blake3::hash(&sealed).to_hex().to_string();
        store.put(&key, &sealed)?;
        if let Some(c) = repo.cache() {
            c.put(repo, &format!("{GEN}{hash}"), &sealed);
        }
        parts.push(PartRef { hash, records });
    }
    let head = Head {
        number: g.number,
        cut_ms: g.cut_ms,
        created: g.created,
        prev: prev.map(str::to_string),
        parts,
    };
    let key = head_key(g.number);
    let json = serde_json::to_vec(&head).map_err(|e| BackupError::invalid(&key, e.to_string()))?;
    let sealed = keys.seal(&json, &aad(&key));
    if !store.put_new(&key, &sealed)? {
        return Ok(None);
    }
    Ok(Some(blake3::hash(&sealed).to_hex().to_string()))
}

/// What one LIST of `gen/` shows: the heads (number, store time in seconds), ascending
/// by number; and every part key, by the number it belongs to.
pub type Listed = (Vec<(u64, u64)>, BTreeMap<u64, Vec<String>>);

/// Lists `gen/` ([`Listed`]).
pub fn list(repo: &Repository) -> Result<Listed> {
    let mut heads = Vec::new();
    let mut parts: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for o in repo.store().list(GEN)? {
        if let Some(n) = head_number(&o.key) {
            heads.push((n, o.modified));
        } else if let Some(n) = o
            .key
            .strip_prefix(GEN)
            .and_then(|r| r.split_once('.'))
            .and_then(|(h, _)| head_number(&format!("{GEN}{h}")))
        {
            parts.entry(n).or_default().push(o.key);
        }
    }
    heads.sort_unstable();
    Ok((heads, parts))
}

/// Reads and authenticates generation `number` (its head from the store, its parts from
/// the local cache when there).
pub fn read(repo: &Repository, number: u64) -> Result<Loaded> {
    let key = head_key(number);
    let sealed = repo.store().get(&key, MAX_HEAD)?;
    let head_hash = blake3::hash(&sealed).to_hex().to_string();
    let json = repo.keys().open(&sealed, &aad(&key)).ok_or_else(|| {
        BackupError::corrupt(
            &key,
            "fails authentication (altered, renamed, or another repository's)",
        )
    })?;
    let head: Head = serde_json::from_slice(&json)
        .map_err(|e| BackupError::corrupt(&key, format!("is not a generation head: {e}")))?;
    if head.number != number {
        return Err(BackupError::corrupt(
            &key,
            format!("names generation {}", head.number),
        ));
    }
    if head.parts.len() > MAX_PARTS {
        return Err(BackupError::corrupt(
            &key,
            format!("names {} parts (at most {MAX_PARTS})", head.parts.len()),
        ));
    }
    let mut g = Generation {
        number,
        cut_ms: head.cut_ms,
        created: head.created,
        ..Default::default()
    };
    for (k, part) in head.parts.iter().enumerate() {
        if part.records > PART_RECORDS as u64 {
            return Err(BackupError::corrupt(
                &key,
                format!("names a part of {} records", part.records),
            ));
        }
        let pkey = part_key(number, k);
        let limit = 8 + part.records * RECORD as u64;
        let max_sealed = limit + limit / 64 + (64 << 10);
        let one = crate::cache::get_as(
            repo,
            &format!("{GEN}{}", part.hash),
            &pkey,
            max_sealed,
            |sealed| {
                if blake3::hash(sealed).to_hex().as_str() != part.hash {
                    return Err(BackupError::corrupt(
                        &pkey,
                        "is not the part its generation's head names (hash differs)",
                    ));
                }
                let z = repo
                    .keys()
                    .open(sealed, &aad(&pkey))
                    .ok_or_else(|| BackupError::corrupt(&pkey, "fails authentication"))?;
                let plain = crate::manifest::decompress(&z, limit)
                    .map_err(|e| BackupError::corrupt(&pkey, e))?;
                let mut one = Generation::default();
                decode_part(&plain, part.records, &mut one)
                    .map_err(|e| BackupError::corrupt(&pkey, e))?;
                Ok(one)
            },
        )?;
        g.packs.extend(one.packs);
        g.deleted.extend(one.deleted);
    }
    let packs_sorted = g.packs.windows(2).all(|w| w[0].id < w[1].id);
    let deleted_sorted = g.deleted.windows(2).all(|w| w[0].0 < w[1].0);
    if !packs_sorted || !deleted_sorted {
        return Err(BackupError::corrupt(
            &key,
            "lists packs out of order or twice",
        ));
    }
    Ok(Loaded {
        generation: g,
        head_hash,
        prev: head.prev,
        parts: head.parts.into_iter().map(|p| p.hash).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(n: usize, d: usize) -> Generation {
        let id = |i: usize, salt: u8| {
            let mut b = *blake3::hash(&[salt, (i >> 16) as u8, (i >> 8) as u8, i as u8]).as_bytes();
            b[0] = salt;
            b
        };
        let mut packs: Vec<Pack> = (0..n)
            .map(|i| Pack {
                id: id(i, 1),
                stamp: (i % 3 != 0).then_some(1_700_000_000_000 + i as u64),
                modified: 1_700_000_000 + i as u64,
                size: 8 << 20,
            })
            .collect();
        packs.sort_by_key(|p| p.id);
        let mut deleted: Vec<([u8; 32], u64)> = (0..d).map(|i| (id(i, 2), 7)).collect();
        deleted.sort();
        Generation {
            number: 9,
            cut_ms: 1_700_000_000_500,
            created: 1_700_000_100,
            packs,
            deleted,
        }
    }

    #[test]
    fn parts_round_trip_and_split() {
        for (n, d) in [(0, 0), (5, 3), (PART_RECORDS - 1, 2)] {
            let g = gen(n, d);
            let parts = encode_parts(&g);
            assert_eq!(parts.len(), (n + d).div_ceil(PART_RECORDS));
            let mut back = Generation {
                number: g.number,
                cut_ms: g.cut_ms,
                created: g.created,
                ..Default::default()
            };
            for p in &parts {
                let count = ((p.len() - 8) / RECORD) as u64;
                decode_part(p, count, &mut back).unwrap();
            }
            assert_eq!(back, g);
        }
    }

    #[test]
    fn a_part_with_another_count_or_kind_is_refused() {
        let g = gen(4, 1);
        let p = encode_parts(&g).remove(0);
        let mut sink = Generation::default();
        assert!(decode_part(&p, 4, &mut sink).is_err());
        let mut bad = p.clone();
        bad[8] = 7;
        assert!(decode_part(&bad, 5, &mut Generation::default()).is_err());
        assert!(decode_part(&p[..p.len() - 1], 5, &mut Generation::default()).is_err());
        assert!(decode_part(b"SBGN\x02\0\0\0", 0, &mut Generation::default()).is_err());
    }

    #[test]
    fn keys_and_ids_parse_only_their_own_form() {
        assert_eq!(head_number(&head_key(0x1f)), Some(0x1f));
        assert_eq!(head_number(&part_key(0x1f, 0)), None);
        assert_eq!(head_number("gen/1f"), None);
        let id = "ab".repeat(32);
        assert_eq!(id_string(&id_bytes(&id).unwrap()), id);
        assert!(id_bytes(&"AB".repeat(32)).is_none());
        assert!(id_bytes("abc").is_none());
    }
}
