//! The NBD server, handshake and transmission, fed one client byte stream: options
//! (including malformed lengths, unknown options, INFO/GO/LIST/META_CONTEXT), then requests
//! of every kind with arbitrary flags, offsets and lengths. It must never panic or hang;
//! the pool behind it must stay consistent.
#![no_main]

use std::io;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use snapblk_core::device::mem::MemDevice;
use snapblk_core::{MemStore, Pool, PoolExports};
use snapblk_nbd::server::Server;

fn server() -> &'static (Arc<Pool>, Arc<Server>) {
    static S: OnceLock<(Arc<Pool>, Arc<Server>)> = OnceLock::new();
    S.get_or_init(|| {
        let store = Arc::new(MemStore::new());
        let dev = Arc::new(MemDevice::new((1 << 20) + (4 << 20)));
        Pool::format(&*store, &*dev).expect("format");
        let pool = Pool::open(store, dev).expect("open");
        pool.create_volume("vol", 1 << 20).expect("volume");
        pool.create_snapshot("vol", "snap").expect("snapshot");
        let provider = Arc::new(PoolExports(Arc::clone(&pool)));
        let server = Server::new(provider, 2).expect("server");
        (pool, server)
    })
}

fuzz_target!(|data: &[u8]| {
    let (pool, server) = server();
    let _ = server.serve(io::Cursor::new(data.to_vec()), Box::new(io::sink()));
    // Frees return to the allocator only after a sync; keep the small pool from filling.
    pool.sync().expect("sync");
    assert!(pool.check().expect("check").is_clean(), "pool inconsistent");
});
