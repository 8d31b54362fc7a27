//! The systemd service protocol (sd_notify(3)) without libsystemd: datagrams to the socket
//! named by $NOTIFY_SOCKET (a path, or an abstract name written `@name`). Outside systemd
//! (no $NOTIFY_SOCKET) every call does nothing.
//!
//! The daemon sends READY=1 once its control socket and NBD listeners serve, STATUS= lines
//! with what it serves, WATCHDOG=1 at half of $WATCHDOG_USEC while the pool answers (its
//! committer thread runs and its engine has not stopped), and STOPPING=1 when it begins to
//! shut down.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let bytes = path.as_encoded_bytes();
            let addr = match bytes.strip_prefix(b"@") {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    SocketAddr::from_abstract_name(name).ok()?
                }
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        Notifier { target }
    }

    /// Sends `state` (newline-separated `KEY=value` lines); failures are logged only.
    pub fn send(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                log::warn!("sd_notify '{}': {e}", state.lines().next().unwrap_or(""));
            }
        }
    }

    /// How often to send WATCHDOG=1 (half the watchdog timeout), if systemd asked for it
    /// for this process.
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}
