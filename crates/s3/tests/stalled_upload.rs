//! An upload over a link that stops taking bytes for longer than the stalled-stream grace
//! period (the attempt timeout, 3 s here) but well within its deadline (attempt timeout +
//! bytes at `min_rate`) must complete: on a slow link the HTTP client does not poll the
//! body while the kernel's send buffer drains, which the SDK's upload protection took for
//! a stall (s3_faults' slow-link step failed at random in CI). Checked by turning upload
//! protection back on (`upload_enabled(true)` in `S3Store::new`): this test then fails
//! with "timed out: minimum throughput was specified at 1 B/s, but throughput of 0 B/s
//! was observed".
//!
//! The server is a raw HTTP/1.1 listener on 127.0.0.1 (S3's answer to a PUT is just a
//! status line), so the pause is exact.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapblk_backup::ObjectStore;
use snapblk_s3::{S3Options, S3Store, StaticCredentials};

const BODY: usize = 32 << 20;
const PAUSE: Duration = Duration::from_secs(8);

/// Reads one request head; returns it and the body bytes that came with it.
fn read_head(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Some((String::from_utf8_lossy(&buf).to_lowercase(), rest));
        }
        assert!(buf.len() < 64 << 10, "request head too long");
    }
}

/// Answers every PUT after holding its body back for `PAUSE` (reads nothing meanwhile).
fn serve(l: TcpListener, requests: Arc<AtomicUsize>) {
    for conn in l.incoming() {
        let Ok(mut s) = conn else { return };
        let requests = requests.clone();
        std::thread::spawn(move || {
            while let Some((head, got)) = read_head(&mut s) {
                requests.fetch_add(1, Ordering::SeqCst);
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if head.contains("expect: 100-continue") {
                    let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                std::thread::sleep(PAUSE);
                let mut left = len.saturating_sub(got.len());
                let mut b = vec![0u8; 1 << 20];
                while left > 0 {
                    match s.read(&mut b[..left.min(1 << 20)]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left -= n,
                    }
                }
                let ok = "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\n\r\n";
                if s.write_all(ok.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}

#[test]
fn an_upload_paused_past_the_sdk_grace_period_completes_within_our_deadline() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let requests = Arc::new(AtomicUsize::new(0));
    let r = requests.clone();
    std::thread::spawn(move || serve(l, r));

    let mut o = S3Options::from_url("s3://bucket/p/").unwrap();
    o.endpoint = Some(format!("http://127.0.0.1:{port}"));
    o.region = Some("us-east-1".into());
    o.max_attempts = 1;
    o.attempt_timeout = Duration::from_secs(3);
    o.credentials = Some(StaticCredentials {
        access_key_id: "test".into(),
        secret_access_key: "test-secret".into(),
        session_token: None,
    });
    let store = S3Store::new(o).unwrap();
    // A pack is streamed from its spool file, in chunks the client polls one by one (a
    // body in memory is one chunk: the client takes it at once and never looks stalled).
    let dir = std::env::temp_dir().join(format!("snapblk-stalled-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pack = dir.join("pack");
    std::fs::write(&pack, vec![7u8; BODY]).unwrap();
    let t0 = Instant::now();
    let put = store.put_file("packs/aa/slow", &pack, BODY as u64);
    let _ = std::fs::remove_dir_all(&dir);
    put.expect("an upload that pauses for 8 s within a 3 s + 32 MiB at 32 KiB/s deadline");
    assert!(t0.elapsed() >= PAUSE, "the server did not pause");
    assert_eq!(requests.load(Ordering::SeqCst), 1, "one attempt");
}
