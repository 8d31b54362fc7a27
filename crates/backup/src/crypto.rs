//! Keys and sealing.
//!
//! A repository has one random 256-bit master key. It is stored only wrapped: sealed with
//! a key-encryption key derived by Argon2id from the user's secret (a passphrase or the
//! contents of a key file) and a random salt. From the master key, BLAKE3 `derive_key`
//! gives two independent subkeys: one keys the chunk-id hash (so ids reveal nothing about
//! contents to whoever holds the bucket), the other the XChaCha20-Poly1305 cipher that
//! seals every chunk, index and manifest. Sealed blobs are `nonce (24) || ciphertext ||
//! tag (16)` with a random nonce; the associated data binds each blob to its name, so a
//! blob moved to another name fails to open.

use argon2::{Algorithm, Argon2, Params, Version};
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// A 32-byte keyed content hash naming a chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.hex()[..16])
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS RNG failing is not something a backup can continue without.
    if let Err(e) = getrandom::fill(&mut b) {
        panic!("operating system random number generator failed: {e}");
    }
    b
}

/// A wrapped copy of the master key, as stored in the repository config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeySlot {
    /// Always "argon2id".
    pub kdf: String,
    /// Argon2 memory cost in KiB, iterations and lanes.
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    /// Base64 salt (16 bytes).
    pub salt: String,
    /// Base64 sealed master key (AAD "snapblk key slot").
    pub wrapped: String,
}

const SLOT_AAD: &[u8] = b"snapblk key slot";

/// Argon2id cost for new slots: the OWASP minimum (19 MiB, 2 passes).
pub const KDF_M_KIB: u32 = 19 * 1024;
pub const KDF_T: u32 = 2;
/// Bounds on a key slot's Argon2 cost (checked before running it).
pub const MAX_KDF_M_KIB: u32 = 1 << 20;
pub const MAX_KDF_T: u32 = 10;
pub const MAX_KDF_P: u32 = 8;

fn kek(secret: &[u8], slot_salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; 32]> {
    let params = Params::new(m, t, p, Some(32))
        .map_err(|e| BackupError::Unsupported(format!("argon2 parameters: {e}")))?;
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(secret, slot_salt, &mut out)
        .map_err(|e| BackupError::Unsupported(format!("argon2: {e}")))?;
    Ok(out)
}

fn cipher(key: &[u8; 32]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(key.into())
}

fn seal_with(c: &XChaCha20Poly1305, plain: &[u8], aad: &[u8]) -> Vec<u8> {
    let nonce: [u8; NONCE_LEN] = random_bytes();
    let ct = c
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        .expect("XChaCha20-Poly1305 seals any message shorter than 256 GiB");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

fn open_with(c: &XChaCha20Poly1305, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < SEAL_OVERHEAD {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    // One copy of the ciphertext, decrypted in place.
    let mut buf = ct.to_vec();
    c.decrypt_in_place(XNonce::from_slice(nonce), aad, &mut buf)
        .ok()?;
    Some(buf)
}

/// Wraps `master` for `secret` into a new slot.
pub fn wrap_master(master: &[u8; 32], secret: &[u8]) -> Result<KeySlot> {
    let salt: [u8; 16] = random_bytes();
    let k = kek(secret, &salt, KDF_M_KIB, KDF_T, 1)?;
    Ok(KeySlot {
        kdf: "argon2id".into(),
        m_kib: KDF_M_KIB,
        t: KDF_T,
        p: 1,
        salt: B64.encode(salt),
        wrapped: B64.encode(seal_with(&cipher(&k), master, SLOT_AAD)),
    })
}

/// Unwraps the master key from `slot`; `None` when `secret` is not the slot's.
pub fn unwrap_master(slot: &KeySlot, secret: &[u8]) -> Result<Option<[u8; 32]>> {
    if slot.kdf != "argon2id" {
        return Err(BackupError::Unsupported(format!(
            "key derivation {:?}",
            slot.kdf
        )));
    }
    // The config is authenticated only after a slot opens, so bound what trying one can
    // cost before running Argon2: at most 1 GiB of memory, 10 passes, 8 lanes (ours: 19 MiB,
    // 2 passes, 1 lane).
    if slot.m_kib > MAX_KDF_M_KIB || slot.t > MAX_KDF_T || slot.p == 0 || slot.p > MAX_KDF_P {
        return Err(BackupError::Unsupported(format!(
            "argon2 cost m={} KiB t={} p={}",
            slot.m_kib, slot.t, slot.p
        )));
    }
    let bad = |what: &str| BackupError::corrupt("config", format!("key slot {what} is not base64"));
    let salt = B64.decode(&slot.salt).map_err(|_| bad("salt"))?;
    let wrapped = B64.decode(&slot.wrapped).map_err(|_| bad("key"))?;
    let k = kek(secret, &salt, slot.m_kib, slot.t, slot.p)?;
    Ok(open_with(&cipher(&k), &wrapped, SLOT_AAD).and_then(|m| <[u8; 32]>::try_from(m).ok()))
}

/// The working keys of an open repository.
#[derive(Clone)]
pub struct Keys {
    id_key: [u8; 32],
    config_key: [u8; 32],
    seal: XChaCha20Poly1305,
}

impl Keys {
    pub fn from_master(master: &[u8; 32]) -> Keys {
        Keys {
            id_key: blake3::derive_key("snapblk backup 2026 chunk id", master),
            config_key: blake3::derive_key("snapblk backup 2026 config mac", master),
            seal: cipher(&blake3::derive_key("snapblk backup 2026 seal", master)),
        }
    }

    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    /// The config's mac (hex) over `bytes` (`RepoConfig::mac_input`).
    pub fn config_mac(&self, bytes: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.config_key, bytes)
    }

    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Vec<u8> {
        seal_with(&self.seal, plain, aad)
    }

    /// Opens a sealed blob; `None` if it was altered, sealed under another key or name.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        open_with(&self.seal, sealed, aad)
    }

    /// Opens the sealed blob `sealed` where it lies, without a copy: on success its
    /// plaintext is `sealed[NONCE_LEN..sealed.len() - TAG_LEN]` (the range returned). On
    /// failure the bytes in that range are unspecified.
    pub fn open_in_place(&self, sealed: &mut [u8], aad: &[u8]) -> Option<std::ops::Range<usize>> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let end = sealed.len() - TAG_LEN;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[..NONCE_LEN]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&sealed[end..]);
        self.seal
            .decrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                aad,
                &mut sealed[NONCE_LEN..end],
                (&tag).into(),
            )
            .ok()?;
        Some(NONCE_LEN..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_round_trip_and_wrong_secret() {
        let master: [u8; 32] = random_bytes();
        let slot = wrap_master(&master, b"correct horse").unwrap();
        assert_eq!(
            unwrap_master(&slot, b"correct horse").unwrap(),
            Some(master)
        );
        assert_eq!(unwrap_master(&slot, b"wrong horse").unwrap(), None);
    }

    #[test]
    fn sealed_blobs_bind_their_name_and_detect_flips() {
        let k = Keys::from_master(&random_bytes());
        let s = k.seal(b"hello", b"a");
        assert_eq!(k.open(&s, b"a").as_deref(), Some(&b"hello"[..]));
        assert!(k.open(&s, b"b").is_none());
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 1;
            assert!(k.open(&t, b"a").is_none(), "flip at {i} not detected");
        }
        assert!(k.open(&s[..10], b"a").is_none());
    }
}
