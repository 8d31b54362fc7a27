//! The control socket (protocol and framing: crates/control): the daemon's listener and
//! the CLI's client. The socket file is mode 0600.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use snapblk_core::Pool;

use crate::admin::execute;
use crate::devices::Devices;
use crate::progress::{show_relayed, Bar};
use snapblk_control::Command;

pub const DEFAULT_SOCKET: &str = "/run/snapblk/control.sock";

pub fn default_socket() -> PathBuf {
    std::env::var_os("SNAPBLK_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

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
                message: format!("{e:#}"),
                kind: crate::exit::kind_of(&e),
            })
    });
}

/// Progress lines go to the client through their own handle on the connection.
fn relay(w: &UnixStream) -> Box<dyn snapblk_backup::Progress> {
    match w.try_clone() {
        Ok(c) => Box::new(crate::progress::Relay::new(c)),
        Err(_) => Box::new(snapblk_backup::NoProgress),
    }
}

/// Connects to a daemon; `None` when nothing listens at `path`.
pub fn connect(path: &Path) -> Option<UnixStream> {
    UnixStream::connect(path).ok()
}

/// Sends one command and returns its result, or the daemon's error; progress lines that
/// come first are shown on `bar`.
pub fn call(conn: &UnixStream, cmd: &Command, bar: &Bar) -> Result<Value> {
    let mut w = conn;
    writeln!(w, "{}", serde_json::to_string(cmd)?)?;
    // Long jobs send progress at least every few seconds; a silent daemon is stuck.
    conn.set_read_timeout(Some(Duration::from_secs(3600)))?;
    let mut r = BufReader::new(conn);
    let v = loop {
        let mut line = String::new();
        if r.read_line(&mut line)
            .context("reading the daemon's reply")?
            == 0
        {
            bail!("the daemon closed the connection without replying");
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| anyhow!("bad reply from daemon: {e}"))?;
        if !show_relayed(bar, &v) {
            break v;
        }
    };
    bar.finish();
    if v["ok"].as_bool() == Some(true) {
        Ok(v["result"].clone())
    } else {
        let kind =
            serde_json::from_value(v["kind"].clone()).unwrap_or(snapblk_control::ErrorKind::Other);
        Err(crate::exit::Failed {
            message: v["error"]
                .as_str()
                .unwrap_or("unknown error from daemon")
                .to_string(),
            kind: crate::exit::Kind::Reply(kind),
        }
        .into())
    }
}
