//! Metadata cost per request on the real store (RocksDB) with no data I/O: the mapping
//! lookup of a 4 KiB read of the volume, and — after 200 snapshots with ~1% random churn
//! before each, the volume never rewritten — of the volume again, of its oldest snapshot
//! (one page get plus a scan of dead records up to the first read checkpoint) and of a
//! clone of it; then the commit of a write of 1 block versus 8 blocks in one group (per
//! block).
//! `cargo bench -p snapblk-testkit --bench metadata`; results in docs/benchmarks.md.
//! `SNAPBLK_BENCH_MIB` (default 64) and `SNAPBLK_BENCH_SNAPSHOTS` (default 200) scale the
//! volume and the snapshots kept: at 64 MiB the whole map stays in RocksDB's memtable;
//! at a few GiB it is spread over table files, as on a real pool.
//! `SNAPBLK_BENCH_CONTENT_CACHE_MIB` sizes the cache of snapshot page contents (default:
//! the daemon's, 64; 0 turns it off, so every snapshot lookup reads the store).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use snapblk_core::device::uring::UringFile;
use snapblk_core::export::Export;
use snapblk_core::{Pool, VolumeHandle};
use snapblk_rocks::RocksStore;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let volume = env_u64("SNAPBLK_BENCH_MIB", 64).clamp(4, 64 << 10) << 20;
    let snaps = env_u64("SNAPBLK_BENCH_SNAPSHOTS", 200).clamp(1, 10_000);
    let blocks = volume / 4096;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data");
    // The fill, each snapshot's 1% churn, and room for the write benches.
    let data = volume + snaps * (volume / 100 + (1 << 20)) + (512 << 20);
    UringFile::create_file(&path, data).expect("data file");
    let dev = Arc::new(UringFile::open(&path).expect("open data"));
    let store = Arc::new(RocksStore::open(&dir.path().join("meta"), true).expect("store"));
    Pool::format(&*store, &*dev).expect("format");
    let opts = snapblk_core::pool2::OpenOptions {
        content_cache: env_u64(
            "SNAPBLK_BENCH_CONTENT_CACHE_MIB",
            snapblk_core::pool2::CONTENT_CACHE as u64 >> 20,
        )
        .min(4 << 10) as usize
            * (1 << 20),
        ..Default::default()
    };
    let pool = Pool::open_with(store, dev, &opts).expect("open");
    pool.create_volume("v", volume).expect("volume");
    let h = VolumeHandle::open(&pool, "v").expect("handle");
    let mib = vec![5u8; 1 << 20];
    for i in 0..volume >> 20 {
        h.write(i << 20, &mib, false).expect("fill");
    }
    pool.sync().expect("sync");
    // Lookups of what the fill wrote go through checksum blocks (format2.md §9b) once
    // consolidation caught up (10 s at most).
    let t0 = std::time::Instant::now();
    while pool.checksum_stats().blocks_moved < blocks && t0.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let d = h.direct().expect("direct I/O");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % blocks
    };
    let mut g = c.benchmark_group("metadata");
    g.throughput(Throughput::Elements(1));
    g.bench_function("read_lookup_4k", |b| {
        b.iter(|| drop(d.plan_read(next() * 4096, 4096).expect("plan")))
    });
    let churn = vec![9u8; 4096];
    for s in 0..snaps {
        pool.create_snapshot("v", &format!("s{s}"))
            .expect("snapshot");
        for _ in 0..blocks / 100 {
            h.write(next() * 4096, &churn, false).expect("churn");
        }
    }
    pool.clone_snapshot("v", "s0", "c").expect("clone");
    for (name, target) in [
        ("live", "v"),
        ("oldest_snapshot", "v@s0"),
        ("clone_of_oldest", "c"),
    ] {
        let t = VolumeHandle::open(&pool, target).expect("handle");
        let td = t.direct().expect("direct I/O");
        g.bench_function(format!("read_lookup_4k_{snaps}_snapshots_{name}"), |b| {
            b.iter(|| drop(td.plan_read(next() * 4096, 4096).expect("plan")))
        });
    }
    let mut commits = 0u64;
    for blocks in [1usize, 8] {
        let data = vec![7u8; blocks * 4096];
        g.throughput(Throughput::Elements(blocks as u64));
        g.bench_with_input(
            BenchmarkId::new("write_commit", blocks),
            &data,
            |b, data| {
                b.iter(|| {
                    let lba = next() / blocks as u64 * blocks as u64;
                    let plan = d.plan_write(lba * 4096, data, false).expect("plan");
                    // No data I/O: this measures allocation, checksums and the commit only.
                    d.finish_write(plan, Ok(())).expect("commit");
                    commits += 1;
                    if commits.is_multiple_of(4096) {
                        pool.sync().expect("sync"); // return overwritten blocks
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
