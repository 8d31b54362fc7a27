//! Write replies are sent from the pool's committer thread once the write commits
//! (`Export::write_then`), which serves every volume of the pool: a client that stops
//! reading its replies must stall only its own connection, and its replies must all
//! arrive, whole, once it reads again.
//!
//! Checked to fail when `Conn::send_nowait` sends with a blocking write instead: the
//! committer then blocks on the stalled client's full socket, and the other client's
//! writes time out.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapblk_core::device::mem::MemDevice;
use snapblk_core::device::DataDevice;
use snapblk_core::{MemStore, Pool, PoolExports};
use snapblk_nbd::codec::{encode_request, Request};
use snapblk_nbd::proto::*;
use snapblk_nbd::{serve_unix, Server};

const BLOCK: usize = 4096;

fn pool() -> Arc<Pool> {
    let dev: Arc<dyn DataDevice> = Arc::new(MemDevice::new(64 << 20));
    let store = Arc::new(MemStore::new());
    Pool::format(&*store, &*dev).expect("format");
    let p = Pool::open(store, dev).expect("open pool");
    p.create_volume("a", 16 << 20).expect("volume a");
    p.create_volume("b", 16 << 20).expect("volume b");
    p
}

/// Connects and negotiates `export` (fixed newstyle, NBD_OPT_EXPORT_NAME, no zeroes).
fn connect(sock: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .expect("client flags");
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).expect("export name");
    let mut info = [0u8; 10];
    s.read_exact(&mut info).expect("export info");
    s
}

fn write_request(cookie: u64, offset: u64, fill: u8) -> Vec<u8> {
    let mut b = encode_request(&Request {
        flags: 0,
        command: CMD_WRITE,
        cookie,
        offset,
        length: BLOCK as u32,
    })
    .to_vec();
    b.extend(std::iter::repeat_n(fill, BLOCK));
    b
}

/// Reads one simple reply: (error, cookie).
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).expect("reply");
    assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes(), "reply magic");
    let err = u32::from_be_bytes(r[4..8].try_into().expect("4 bytes"));
    (
        err,
        u64::from_be_bytes(r[8..16].try_into().expect("8 bytes")),
    )
}

#[test]
fn a_client_that_stops_reading_replies_stalls_only_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nbd.sock");
    let pool = pool();
    let server = Server::new(Arc::new(PoolExports(Arc::clone(&pool))), 4).expect("server");
    let listener = UnixListener::bind(&sock).expect("bind");
    std::thread::spawn(move || serve_unix(server, listener));

    // Client A sends writes and never reads: its replies fill the socket, then wait in
    // the server (its budget of requests in flight stops the server reading more).
    const STALLED: u64 = 3000;
    let a = connect(&sock, "a");
    let mut a_send = a.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        for i in 0..STALLED {
            let off = i * BLOCK as u64;
            if a_send
                .write_all(&write_request(i, off, (i % 251) as u8))
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    });
    // Let A's replies back up before B starts.
    std::thread::sleep(Duration::from_millis(500));

    // Client B, on another volume of the same pool, must still get every reply.
    let mut b = connect(&sock, "b");
    let t0 = Instant::now();
    for i in 0..200u64 {
        b.write_all(&write_request(i, i * BLOCK as u64, 7))
            .expect("b write");
        assert_eq!(reply(&mut b), (0, i), "client b's write {i}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "client b took {:?} behind a stalled client",
        t0.elapsed()
    );

    // A reads again: every reply arrives whole, once, without error.
    let mut a = a;
    let mut seen = vec![false; STALLED as usize];
    let mut got = 0u64;
    while got < STALLED {
        let (err, cookie) = reply(&mut a);
        assert_eq!(err, 0, "write {cookie} failed");
        assert!(cookie < STALLED, "unknown cookie {cookie}");
        assert!(!seen[cookie as usize], "reply {cookie} twice");
        seen[cookie as usize] = true;
        got += 1;
    }
    assert_eq!(sender.join().expect("sender"), STALLED);
    // Each write went to a block of its own: all of them are there.
    let t = pool.resolve_target("a").expect("a");
    let mut buf = vec![0u8; BLOCK];
    for i in 0..STALLED {
        pool.read(&t, i * BLOCK as u64, &mut buf).expect("read a");
        assert!(
            buf.iter().all(|&x| x == (i % 251) as u8),
            "block of write {i}"
        );
    }
}
