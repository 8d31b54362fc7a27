//! Metadata cost per request on the real store (RocksDB) with no data I/O: the mapping
//! lookup of a 4 KiB read of the volume, and — after 200 snapshots with ~1% random churn
//! before each, the volume never rewritten — of the volume again, of its oldest snapshot
//! (one page get plus a scan of dead records up to the first read checkpoint) and of a
//! clone of it; then the commit of a write of 1 block versus 8 blocks in one group (per
//! block).
//! `cargo bench -p snapblk-testkit --bench metadata`; results in docs/benchmarks.md.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use snapblk_core::device::uring::UringFile;
use snapblk_core::export::Export;
use snapblk_core::{Pool, VolumeHandle};
use snapblk_rocks::RocksStore;

const VOLUME: u64 = 64 << 20;
const BLOCKS: u64 = VOLUME / 4096;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data");
    UringFile::create_file(&path, (1 << 20) + (512 << 20)).expect("data file");
    let dev = Arc::new(UringFile::open(&path).expect("open data"));
    let store = Arc::new(RocksStore::open(&dir.path().join("meta"), true).expect("store"));
    Pool::format(&*store, &*dev).expect("format");
    let pool = Pool::open(store, dev).expect("open");
    pool.create_volume("v", VOLUME).expect("volume");
    let h = VolumeHandle::open(&pool, "v").expect("handle");
    let mib = vec![5u8; 1 << 20];
    for i in 0..VOLUME >> 20 {
        h.write(i << 20, &mib, false).expect("fill");
    }
    pool.sync().expect("sync");
    let d = h.direct().expect("direct I/O");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % BLOCKS
    };
    let mut g = c.benchmark_group("metadata");
    g.throughput(Throughput::Elements(1));
    g.bench_function("read_lookup_4k", |b| {
        b.iter(|| drop(d.plan_read(next() * 4096, 4096).expect("plan")))
    });
    let churn = vec![9u8; 4096];
    for s in 0..200 {
        pool.create_snapshot("v", &format!("s{s}"))
            .expect("snapshot");
        for _ in 0..BLOCKS / 100 {
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
        g.bench_function(format!("read_lookup_4k_200_snapshots_{name}"), |b| {
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
