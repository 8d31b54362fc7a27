//! The cost of per-block checksums on the write path: CRC32C of a block alone versus a
//! whole pool write of the same size (allocation, data write, metadata batch) on in-memory
//! backends, where nothing hides the CPU cost. `cargo bench -p snapblk-core`; results in
//! docs/benchmarks.md.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use snapblk_core::device::mem::MemDevice;
use snapblk_core::{MemStore, Pool};

fn bench(c: &mut Criterion) {
    let store = Arc::new(MemStore::new());
    let dev = Arc::new(MemDevice::new((1 << 20) + (256 << 20)));
    Pool::format(&*store, &*dev).expect("format");
    let pool = Pool::open(store, dev).expect("open");
    pool.create_volume("v", 64 << 20).expect("volume");
    let vol = pool.volume_id("v").expect("id");
    let mut g = c.benchmark_group("write_path");
    for size in [4096usize, 65536] {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + 1) as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("crc32c", size), &data, |b, d| {
            b.iter(|| d.chunks(4096).map(crc32c::crc32c).fold(0u32, |a, x| a ^ x))
        });
        let mut off = 0u64;
        g.bench_with_input(BenchmarkId::new("pool_write", size), &data, |b, d| {
            b.iter(|| {
                pool.write(vol, off, d, false).expect("write");
                off = (off + size as u64) % (64 << 20);
                if off == 0 {
                    // Return overwritten blocks to the allocator.
                    pool.sync().expect("sync");
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
