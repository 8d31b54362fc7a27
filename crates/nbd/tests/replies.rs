//! Write replies are sent from the pool's committer thread once the write commits
//! (`Export::write_then`), which serves every volume of the pool: a client that stops
//! reading its replies must stall only its own connection, and its replies must all
//! arrive, whole, once it reads again.
//!
//! Checked to fail when `Conn::send_nowait` sends with a blocking write instead: the
//! committer then blocks on the stalled client's full socket, and the other client's
//! writes time out. And replies never interleave when the committer (write replies) and
//! the workers (read and flush replies) answer one connection at once.

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

/// A block's content, different for every (block, version).
fn block(lba: u64, version: u64) -> Vec<u8> {
    let mut x =
        lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xA24B_AED4_963E_E407);
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn request(command: u16, cookie: u64, lba: u64, data: Option<&[u8]>) -> Vec<u8> {
    let length = match command {
        CMD_READ | CMD_WRITE => BLOCK as u32,
        _ => 0,
    };
    let offset = if length == 0 { 0 } else { lba * BLOCK as u64 };
    let mut b = encode_request(&Request {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    })
    .to_vec();
    if let Some(d) = data {
        b.extend_from_slice(d);
    }
    b
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

/// Serves `pool`'s volumes on a Unix socket in `dir`, `workers` per connection.
fn serve(dir: &tempfile::TempDir, pool: &Arc<Pool>, workers: usize) -> std::path::PathBuf {
    let sock = dir.path().join("nbd.sock");
    let server = Server::new(Arc::new(PoolExports(Arc::clone(pool))), workers).expect("server");
    let listener = UnixListener::bind(&sock).expect("bind");
    std::thread::spawn(move || serve_unix(server, listener));
    sock
}

#[test]
fn a_client_that_stops_reading_replies_stalls_only_itself() {
    let (dir, pool) = (tempfile::tempdir().expect("tempdir"), pool());
    let sock = serve(&dir, &pool, 4);

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

/// One connection, requests pipelined: writes (answered by the committer), reads and
/// flushes (answered by the workers) at once. Every reply arrives whole and once, reads
/// return their blocks exactly, and every write is there afterwards.
#[test]
fn mixed_replies_on_one_connection_never_interleave() {
    let (dir, pool) = (tempfile::tempdir().expect("tempdir"), pool());
    let sock = serve(&dir, &pool, 16);

    // Blocks 2048.. are read in the mixed phase: fill them first.
    let mut c = connect(&sock, "a");
    for lba in 2048..4096u64 {
        c.write_all(&request(CMD_WRITE, lba, lba, Some(&block(lba, 0))))
            .expect("fill");
        assert_eq!(reply(&mut c), (0, lba), "fill of block {lba}");
    }

    // Cookie = request number * 4 + kind (0 write, 1 read, 2 flush); writes go to blocks
    // 0..2048, each once, reads to 2048.. (not written meanwhile).
    const N: u64 = 6000;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut reqs = Vec::new();
    let mut writes = 0u64;
    for i in 0..N {
        let r = next();
        let kind = match r % 10 {
            0 => 2,
            1..=4 if writes < 2048 => 0,
            _ => 1,
        };
        let lba = match kind {
            0 => {
                writes += 1;
                writes - 1
            }
            1 => 2048 + (r >> 8) % 2048,
            _ => 0,
        };
        reqs.push((i * 4 + kind, lba));
    }
    let expected: std::collections::HashMap<u64, u64> = reqs.iter().copied().collect();
    let mut send = c.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        for (cookie, lba) in reqs {
            let b = match cookie % 4 {
                0 => request(CMD_WRITE, cookie, lba, Some(&block(lba, 1))),
                1 => request(CMD_READ, cookie, lba, None),
                _ => request(CMD_FLUSH, cookie, 0, None),
            };
            send.write_all(&b).expect("send");
        }
    });
    let mut seen = std::collections::HashSet::new();
    let mut data = vec![0u8; BLOCK];
    for i in 0..N {
        // Reading slowly now and then lets the socket fill: replies are then sent in
        // parts, and the committer finds the writer busy or the socket full.
        if i % 32 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let (err, cookie) = reply(&mut c);
        assert_eq!(err, 0, "request {cookie} failed");
        let lba = *expected
            .get(&cookie)
            .unwrap_or_else(|| panic!("reply with an unknown cookie {cookie:#x}"));
        assert!(seen.insert(cookie), "two replies to {cookie}");
        if cookie % 4 == 1 {
            c.read_exact(&mut data).expect("read data");
            assert!(
                data == block(lba, 0),
                "read of block {lba} (request {cookie})"
            );
        }
    }
    sender.join().expect("sender");
    let t = pool.resolve_target("a").expect("a");
    let mut buf = vec![0u8; BLOCK];
    for lba in 0..writes {
        pool.read(&t, lba * BLOCK as u64, &mut buf).expect("read a");
        assert!(buf == block(lba, 1), "block {lba} after its write");
    }
}
