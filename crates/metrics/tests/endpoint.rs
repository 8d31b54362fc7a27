//! The metrics crate against a real (in-memory) pool and its own HTTP endpoint:
//! * a meter counts requests, bytes, errors and latencies per volume, op and frontend;
//! * pool and volume gauges follow the pool (a deleted volume's series go);
//! * what the daemon's sources report shows as backup ages and lazy-restore progress;
//! * the endpoint answers GET /metrics only.

use std::sync::Arc;
use std::time::Duration;

use snapblk_core::device::mem::MemDevice;
use snapblk_core::export::IoKind;
use snapblk_core::{MemStore, Pool};
use snapblk_metrics::http::Endpoint;
use snapblk_metrics::{BackupAge, LazyProgress, Metrics, Outcome, Sources};

fn pool() -> Arc<Pool> {
    let store = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new(256 << 20));
    Pool::format(&*store, &*dev).unwrap();
    Pool::open(store, dev).unwrap()
}

struct Fixed;

impl Sources for Fixed {
    fn backup_ages(&self) -> Vec<BackupAge> {
        vec![BackupAge {
            volume: "a".into(),
            repository: "offsite".into(),
            age_secs: 3600,
        }]
    }
    fn lazy_restores(&self) -> Vec<LazyProgress> {
        vec![LazyProgress {
            volume: "r".into(),
            size: 1000,
            remaining: 250,
        }]
    }
    fn jobs_running(&self) -> usize {
        2
    }
}

/// The value of the one sample named `series` exactly (name and labels as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn meters_gauges_and_sources_render_as_prometheus_text() {
    let p = pool();
    p.create_volume("a", 64 << 20).unwrap();
    p.create_volume("gone", 4 << 20).unwrap();
    p.create_snapshot("a", "s").unwrap();
    let m = Metrics::new(Arc::clone(&p), Arc::new(Fixed)).unwrap();
    let io = m.io.meter("a", "nbd");
    for _ in 0..3 {
        io.record(IoKind::Write, 65536, Duration::from_micros(300), true);
    }
    io.record(IoKind::Write, 4096, Duration::from_millis(2), false);
    io.record(IoKind::Flush, 0, Duration::from_millis(5), true);
    m.io.meter("a", "ublk")
        .record(IoKind::Read, 4096, Duration::from_micros(60), true);
    m.jobs.finished("backup", Outcome::Ok, 12.0);
    m.jobs.backed_up("offsite", 1, 5000);
    p.delete_volume("gone", false).unwrap();
    let t = m.render();
    let l = r#"{frontend="nbd",op="write",volume="a"}"#;
    assert_eq!(
        sample(&t, &format!("snapblk_io_requests_total{l}")),
        Some(4.0),
        "{t}"
    );
    assert_eq!(
        sample(&t, &format!("snapblk_io_errors_total{l}")),
        Some(1.0)
    );
    assert_eq!(
        sample(&t, &format!("snapblk_io_bytes_total{l}")),
        Some(196608.0)
    );
    assert_eq!(
        sample(&t, &format!("snapblk_io_duration_seconds_count{l}")),
        Some(4.0)
    );
    // 3 of the 4 took 300 us: in the 312.5 us bucket, not in the 125 us one.
    let b = |le: &str| {
        sample(
            &t,
            &format!(
                r#"snapblk_io_duration_seconds_bucket{{frontend="nbd",op="write",volume="a",le="{le}"}}"#
            ),
        )
    };
    assert_eq!(b("0.000125"), Some(0.0), "{t}");
    assert_eq!(b("0.0003125"), Some(3.0));
    assert_eq!(b("+Inf"), Some(4.0));
    let ublk = r#"{frontend="ublk",op="read",volume="a"}"#;
    assert_eq!(
        sample(&t, &format!("snapblk_io_bytes_total{ublk}")),
        Some(4096.0)
    );
    assert_eq!(
        sample(&t, r#"snapblk_jobs_total{kind="backup",outcome="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &t,
            r#"snapblk_backup_uploaded_bytes_total{repository="offsite"}"#
        ),
        Some(5000.0)
    );
    assert_eq!(
        sample(&t, r#"snapblk_volume_size_bytes{volume="a"}"#),
        Some(67108864.0)
    );
    assert_eq!(
        sample(&t, r#"snapblk_volume_snapshots{volume="a"}"#),
        Some(1.0)
    );
    assert!(
        !t.contains(r#"volume="gone""#),
        "a deleted volume's gauges stayed:\n{t}"
    );
    assert_eq!(sample(&t, "snapblk_pool_volumes"), Some(1.0));
    assert_eq!(sample(&t, "snapblk_pool_snapshots"), Some(1.0));
    assert_eq!(
        sample(&t, "snapblk_pool_capacity_bytes"),
        Some(p.info().capacity as f64)
    );
    assert_eq!(
        sample(
            &t,
            r#"snapblk_backup_age_seconds{repository="offsite",volume="a"}"#
        ),
        Some(3600.0)
    );
    assert_eq!(
        sample(&t, r#"snapblk_lazy_restore_remaining_bytes{volume="r"}"#),
        Some(250.0)
    );
    assert_eq!(sample(&t, "snapblk_jobs_running"), Some(2.0));
    // Two 4K reads of the snapshot's one page: a miss, then a hit.
    let snap = p.resolve_target("a@s").unwrap();
    let mut b = vec![0u8; 4096];
    p.read(&snap, 0, &mut b).unwrap();
    p.read(&snap, 4096, &mut b).unwrap();
    let t = m.render();
    assert_eq!(sample(&t, "snapblk_snapshot_cache_hits_total"), Some(1.0));
    assert_eq!(sample(&t, "snapblk_snapshot_cache_misses_total"), Some(1.0));
    assert_eq!(sample(&t, "snapblk_snapshot_cache_entries"), Some(1.0));
    assert!(sample(&t, "snapblk_snapshot_cache_bytes").unwrap() > 0.0);
    assert!(sample(&t, "process_resident_memory_bytes").unwrap() > 1e6);
    // Every family has its help and type; counters end in _total.
    for line in t.lines().filter(|l| l.starts_with("# TYPE")) {
        let w: Vec<&str> = line.split(' ').collect();
        assert!(t.contains(&format!("# HELP {} ", w[2])), "{line}");
        if w[3] == "counter" {
            assert!(w[2].ends_with("_total"), "{line}");
        }
    }
}

#[test]
fn the_endpoint_serves_get_metrics_only() {
    let p = pool();
    p.create_volume("v", 1 << 20).unwrap();
    let m = Metrics::new(p, Arc::new(snapblk_metrics::state::NoSources)).unwrap();
    let e = Endpoint::start("127.0.0.1:0", m).unwrap();
    let url = format!("http://{}/metrics", e.addr);
    let mut r = ureq::get(&url).call().unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let body = r.body_mut().read_to_string().unwrap();
    assert!(
        body.contains(r#"snapblk_volume_size_bytes{volume="v"} 1048576"#),
        "{body}"
    );
    let status = |res: Result<_, ureq::Error>| match res {
        Err(ureq::Error::StatusCode(c)) => c,
        Ok(_) => 200,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        status(ureq::get(&format!("http://{}/", e.addr)).call()),
        404
    );
    assert_eq!(status(ureq::post(&url).send("x")), 405);
    e.stop();
    assert!(
        ureq::get(&url).call().is_err(),
        "the endpoint still answers after stop"
    );
}
