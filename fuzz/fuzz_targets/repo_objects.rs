//! Backup repository objects as read back from a bucket: the repository config, a pack's
//! index (plain and sealed), a manifest table and a table frame, a sealed chunk, a manifest
//! header. Any bytes
//! must give a typed error or a value, never a panic; tables that decode re-encode to an
//! equal table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapblk_backup::config::RepoConfig;
use snapblk_backup::crypto::Keys;
use snapblk_backup::manifest::{Header, Table};
use snapblk_backup::{chunk, frame, pack};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let keys = Keys::from_master(&[7u8; 32]);
    match which % 6 {
        0 => {
            let _ = RepoConfig::parse(body);
        }
        1 => {
            let _ = pack::decode_index(body, Some(body.len() as u64 * 4));
            let _ = pack::decode_index(body, None);
        }
        2 => {
            let _ = pack::index_from_pack(&keys, "00", body);
            let _ = pack::names("00", body);
        }
        3 => {
            if let Ok(t) = Table::decode(body) {
                let n = t.cell_count();
                if n > 0 {
                    let _ = t.cell_len(n - 1);
                }
                let again = Table::decode(&t.encode()).expect("a decoded table re-decodes");
                assert_eq!(again.encode(), t.encode(), "table round trip");
            }
            // The same bytes as a table frame (format 2) at a position the input picks.
            if body.len() > 5 {
                let cells = u64::from(u32::from_le_bytes([body[0], body[1], body[2], body[3]]));
                let (k, bytes) = (u64::from(body[4]), &body[5..]);
                if let Ok(f) = frame::Frame::decode(bytes, cells, k) {
                    assert_eq!(f.encode(), bytes, "a frame's encoding is canonical");
                }
            }
        }
        4 => {
            let id = keys.chunk_id(b"x");
            let _ = chunk::decode(&keys, &id, body, 1 << 20);
        }
        _ => {
            let _ = serde_json::from_slice::<Header>(body);
        }
    }
});
