//! Chunk encoding: `seal(payload || flag)` with the chunk id as associated data, where
//! flag 0 means the payload is the raw cell and flag 1 a zstd frame of it (the flag is last
//! so a raw payload is used in place, without a copy). Decoding checks
//! the seal, decompresses (bounded by the chunk size) and recomputes the keyed hash, so a
//! chunk that decodes is exactly the data that was backed up.

use crate::crypto::{ChunkId, Keys};

const RAW: u8 = 0;
const ZSTD: u8 = 1;

/// Compresses and seals one cell's data. Returns its id and the sealed blob.
pub fn encode(keys: &Keys, level: i32, data: &[u8]) -> (ChunkId, Vec<u8>) {
    let id = keys.chunk_id(data);
    let plain = match zstd::bulk::compress(data, level) {
        Ok(mut z) if z.len() < data.len() => {
            z.push(ZSTD);
            z
        }
        _ => {
            let mut p = Vec::with_capacity(data.len() + 1);
            p.extend_from_slice(data);
            p.push(RAW);
            p
        }
    };
    (id, keys.seal(&plain, &id.0))
}

/// Opens, decompresses and verifies a sealed chunk; the error says what failed. A copying
/// front of [`decode_in_place`] (one copy of the sealed bytes, as opening into a new
/// buffer costs), for callers that want the data owned.
pub fn decode(keys: &Keys, id: &ChunkId, sealed: &[u8], max_len: usize) -> Result<Vec<u8>, String> {
    let mut buf = sealed.to_vec();
    let mut out = Vec::new();
    match decode_in_place(keys, id, &mut buf, max_len, &mut out)? {
        Decoded::InPlace(r) => {
            buf.truncate(r.end);
            buf.drain(..r.start);
            Ok(buf)
        }
        // `out` started empty, so the appended range is all of it.
        Decoded::Appended(_) => Ok(out),
    }
}

/// Where [`decode_in_place`] left a chunk's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// In the sealed blob's own bytes (a raw chunk): this range of them.
    InPlace(std::ops::Range<usize>),
    /// Appended to the caller's buffer (a compressed chunk): this range of it.
    Appended(std::ops::Range<usize>),
}

/// [`decode`] without copies: opens `sealed` where it lies; a raw chunk's data stays
/// there, a compressed one is decompressed onto the end of `out` (at most `max_len`
/// bytes). The data is verified against `id` either way.
pub fn decode_in_place(
    keys: &Keys,
    id: &ChunkId,
    sealed: &mut [u8],
    max_len: usize,
    out: &mut Vec<u8>,
) -> Result<Decoded, String> {
    let plain = keys
        .open_in_place(sealed, &id.0)
        .ok_or("authentication failed: the stored bytes were altered (or belong to another key)")?;
    if plain.is_empty() {
        return Err("empty chunk".into());
    }
    let payload = plain.start..plain.end - 1;
    let (data, at) = match sealed[plain.end - 1] {
        RAW => (&sealed[payload.clone()], Decoded::InPlace(payload)),
        ZSTD => {
            let z = zstd::bulk::decompress(&sealed[payload], max_len)
                .map_err(|e| format!("zstd frame does not decompress: {e}"))?;
            let start = out.len();
            out.extend_from_slice(&z);
            (&out[start..], Decoded::Appended(start..out.len()))
        }
        f => return Err(format!("unknown chunk encoding {f}")),
    };
    if data.len() > max_len {
        return Err(format!("{} bytes, larger than a chunk", data.len()));
    }
    if keys.chunk_id(data) != *id {
        return Err("content does not match the chunk id".into());
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random_bytes;

    #[test]
    fn round_trip_compressible_and_random() {
        let k = Keys::from_master(&random_bytes());
        let text = b"snapblk ".repeat(8192);
        let noise: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for data in [&text[..], &noise[..]] {
            let (id, sealed) = encode(&k, 3, data);
            assert_eq!(decode(&k, &id, &sealed, 65536).unwrap(), data);
        }
        let (id, sealed) = encode(&k, 3, &text);
        assert!(
            sealed.len() < text.len() / 10,
            "compressible data compresses"
        );
        let mut bad = sealed.clone();
        bad[40] ^= 0x80;
        assert!(decode(&k, &id, &bad, 65536)
            .unwrap_err()
            .contains("altered"));
        let other = k.chunk_id(b"other");
        assert!(decode(&k, &other, &sealed, 65536).is_err());
    }

    /// The in-place decoder agrees with `decode` on raw and compressed chunks laid side by
    /// side in one buffer (as a ranged GET brings them), and refuses what `decode` refuses.
    #[test]
    fn in_place_decoding_matches() {
        let k = Keys::from_master(&random_bytes());
        let text = b"snapblk ".repeat(8192);
        let noise: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut body = Vec::new();
        let mut at = Vec::new();
        for data in [&noise[..], &text[..], &noise[1..], &text[3..]] {
            let (id, sealed) = encode(&k, 3, data);
            at.push((id, body.len()..body.len() + sealed.len(), data));
            body.extend_from_slice(&sealed);
        }
        let mut extra = vec![7u8; 5];
        let mut got = Vec::new();
        for (id, r, _) in &at {
            let d = decode_in_place(&k, id, &mut body[r.clone()], 65536, &mut extra).unwrap();
            got.push(match d {
                Decoded::InPlace(x) => body[r.start + x.start..r.start + x.end].to_vec(),
                Decoded::Appended(x) => extra[x].to_vec(),
            });
        }
        for ((_, _, data), g) in at.iter().zip(&got) {
            assert_eq!(&g[..], *data);
        }
        assert_eq!(&extra[..5], &[7u8; 5], "appends, never overwrites");
        // Tampered, wrong id, too large for the limit: refused like `decode`.
        let (id, sealed) = encode(&k, 3, &text);
        let mut bad = sealed.clone();
        bad[40] ^= 0x80;
        assert!(decode_in_place(&k, &id, &mut bad, 65536, &mut Vec::new())
            .unwrap_err()
            .contains("altered"));
        let other = k.chunk_id(b"other");
        assert!(decode_in_place(&k, &other, &mut sealed.clone(), 65536, &mut Vec::new()).is_err());
        assert!(decode_in_place(&k, &id, &mut sealed.clone(), 1024, &mut Vec::new()).is_err());
        let (id, sealed) = encode(&k, 3, &noise);
        assert!(decode_in_place(&k, &id, &mut sealed.clone(), 1024, &mut Vec::new()).is_err());
        assert!(
            decode_in_place(&k, &id, &mut sealed[..30].to_vec(), 65536, &mut Vec::new()).is_err()
        );
    }
}
