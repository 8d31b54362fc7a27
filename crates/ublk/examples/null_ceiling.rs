//! Benchmark helper (benches/ublk_vm.sh): a ublk device served by this crate's queues over
//! an export that does nothing (reads return zeros, writes are dropped), so fio against it
//! measures the ceiling of ublk plus our queue code on this machine, with no pool, metadata
//! or data device behind it. Prints the device path, serves until stdin closes, detaches.
//! Usage: null_ceiling SIZE_MIB [QUEUES] [DEPTH]

use std::io::Read;
use std::sync::Arc;

use snapblk_core::export::{Export, StatusRun};

struct Null {
    size: u64,
}

impl Export for Null {
    fn size(&self) -> snapblk_core::Result<u64> {
        Ok(self.size)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn name(&self) -> &str {
        "null"
    }
    fn read(&self, _: u64, buf: &mut [u8]) -> snapblk_core::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> snapblk_core::Result<()> {
        Ok(())
    }
    fn flush(&self) -> snapblk_core::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> snapblk_core::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> snapblk_core::Result<()> {
        Ok(())
    }
    fn block_status(&self, _: u64, len: u64) -> snapblk_core::Result<Vec<StatusRun>> {
        Ok(vec![(len, 3)])
    }
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map(|a| {
            a.parse().unwrap_or_else(|_| {
                eprintln!("null_ceiling: '{a}' is not a number");
                std::process::exit(2)
            })
        })
        .unwrap_or(default)
}

fn main() {
    let size = arg(1, 256) << 20;
    let opts = snapblk_ublk::Options {
        queues: arg(2, 2) as u16,
        depth: arg(3, 64) as u16,
        ..Default::default()
    };
    let dev = match snapblk_ublk::attach(Arc::new(Null { size }), "null-ceiling", opts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("null_ceiling: {e}");
            std::process::exit(1)
        }
    };
    println!("{}", dev.path);
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    if let Err(e) = dev.detach() {
        eprintln!("null_ceiling: {e}");
        std::process::exit(1)
    }
}
