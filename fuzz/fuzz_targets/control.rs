//! The control-socket protocol: any byte stream gets one JSON reply per request line (or
//! ends the connection after an overlong line), never a panic; every command that parses
//! survives a serialize/parse round trip unchanged (the CLI and daemon agree on it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapblk_control::{serve_lines, Command};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let mut requests = 0usize;
    serve_lines(&mut &data[..], &mut out, |c| {
        requests += 1;
        let text = serde_json::to_string(c).map_err(|e| e.to_string())?;
        let back: Command = serde_json::from_str(&text).expect("a command re-parses");
        assert_eq!(&back, c, "round trip changed a command");
        Ok(serde_json::Value::Null)
    });
    let replies = std::str::from_utf8(&out).expect("replies are UTF-8");
    for line in replies.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("replies are JSON");
        assert!(v.get("ok").is_some_and(|ok| ok.is_boolean()), "reply without ok: {line}");
    }
    assert!(replies.lines().count() >= requests);
});
