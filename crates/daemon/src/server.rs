//! The daemon's control-socket listener (protocol and framing: crates/control). The socket
//! file is mode 0600 (root only).
//!
//! Threading: one accept thread; one thread per connection runs its commands in order,
//! each through [`admin::execute`]; a long job's progress goes back on its own handle on
//! the connection ([`Relay`]).

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use snapblk_core::Pool;

use crate::admin::execute;
use crate::devices::Devices;
use crate::relay::Relay;

pub const DEFAULT_SOCKET: &str = "/run/snapblk/control.sock";

/// `$SNAPBLK_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn default_socket() -> PathBuf {
    std::env::var_os("SNAPBLK_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Serves every connection `listener` accepts, each on a thread of its own.
pub fn serve(pool: Arc<Pool>, devices: Arc<Devices>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (pool, devices) = (Arc::clone(&pool), Arc::clone(&devices));
        let _ = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || handle(&pool, &devices, conn));
    }
}

fn handle(pool: &Arc<Pool>, devices: &Devices, conn: UnixStream) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let relay_to = match w.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    snapblk_control::serve_lines(&mut r, &mut w, |cmd| {
        let out = execute(pool, Some(devices), cmd, &*relay(&relay_to));
        // Progress writes give up on a client that stopped reading (a write timeout on the
        // socket); the reply waits for it as long as it takes.
        let _ = relay_to.set_write_timeout(None);
        out.map(|r| r.to_value())
            .map_err(|e| snapblk_control::Failure {
                message: e.to_string(),
                kind: e.kind(),
            })
    });
}

/// Progress lines go to the client through their own handle on the connection.
fn relay(w: &UnixStream) -> Box<dyn snapblk_backup::Progress> {
    match w.try_clone() {
        Ok(c) => Box::new(Relay::new(c)),
        Err(_) => Box::new(snapblk_backup::NoProgress),
    }
}
