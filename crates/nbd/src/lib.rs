//! snapblk-nbd: an NBD server (fixed newstyle, structured replies, base:allocation) over
//! `snapblk_core::ExportProvider`. `codec` is pure; `handshake` and `server` do the I/O.
//! See docs/design.md §7.

pub mod admission;
pub mod codec;
pub mod handshake;
pub mod proto;
pub mod server;
#[cfg(feature = "tls")]
pub mod tls;

pub use server::{serve_tcp, serve_unix, Server};
