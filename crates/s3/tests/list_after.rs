//! `list_after` (S3's `StartAfter`) and `exists` (HEAD) against a real S3-compatible
//! server: s3s-fs on 127.0.0.1, installed by scripts/setup.sh (the test command runs it
//! first). The listing crosses S3's 1,000-key page, so the paginator must carry
//! `StartAfter` and the continuation token together, and keys under the store's own
//! prefix must be compared with the prefix added (a wrong `StartAfter` lists from the
//! bucket's start, or skips everything).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapblk_backup::ObjectStore;
use snapblk_s3::{S3Options, S3Store, StaticCredentials};

struct Server {
    child: Child,
    _root: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> (Server, u16) {
    let bin = std::env::var("S3S_FS").unwrap_or("/var/cache/snapblk/tools/bin/s3s-fs".into());
    assert!(
        std::path::Path::new(&bin).exists(),
        "s3s-fs not found at {bin} (run scripts/setup.sh)"
    );
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bucket")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "test", "--secret-key", "test-secret"])
        .arg(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "s3s-fs did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Server { child, _root: root }, port)
}

fn store(port: u16, prefix: &str) -> S3Store {
    let mut o = S3Options::from_url(&format!("s3://bucket/{prefix}")).unwrap();
    o.endpoint = Some(format!("http://127.0.0.1:{port}"));
    o.region = Some("us-east-1".into());
    o.credentials = Some(StaticCredentials {
        access_key_id: "test".into(),
        secret_access_key: "test-secret".into(),
        session_token: None,
    });
    S3Store::new(o).unwrap()
}

fn keys(mut v: Vec<snapblk_backup::ObjectMeta>) -> Vec<String> {
    v.sort_by(|a, b| a.key.cmp(&b.key));
    v.into_iter().map(|o| o.key).collect()
}

#[test]
fn list_after_crosses_pages_and_exists_answers_heads() {
    let (_server, port) = start();
    let s = store(port, "repo/");
    // Keys before and after the prefix in the bucket's order, which must not show.
    let other = store(port, "");
    other.put("aaa/ix/0", b"x").unwrap();
    other.put("zzz/ix/0", b"x").unwrap();
    let n = 1_250;
    let all: Vec<String> = (0..n).map(|i| format!("ix/{:013}-p{i}", i * 10)).collect();
    std::thread::scope(|sc| {
        for part in all.chunks(n / 8 + 1) {
            let s = &s;
            sc.spawn(move || part.iter().for_each(|k| s.put(k, b"i").unwrap()));
        }
    });
    s.put("iy/0", b"x").unwrap();
    assert_eq!(keys(s.list("ix/").unwrap()), all);
    // `ix/<t>` sorts before `ix/<t>-...`: a cut at t lists the keys stamped t and later.
    for cut in [0usize, 7, 999, 1_100, n - 1] {
        let after = format!("ix/{:013}", cut * 10);
        assert_eq!(
            keys(s.list_after("ix/", &after).unwrap()),
            all[cut..].to_vec(),
            "after {after}"
        );
    }
    assert!(s.list_after("ix/", "ix/9").unwrap().is_empty());
    assert_eq!(keys(s.list_after("ix/", "").unwrap()), all);

    assert!(s.exists(&all[3]).unwrap());
    assert!(
        !s.exists("ix/0000000000030").unwrap(),
        "a prefix of a key is no object"
    );
    assert!(!s.exists("packs/aa/none").unwrap());
    assert!(
        !other.exists("ix/0000000000000-p0").unwrap(),
        "the prefix is part of the key"
    );
}
