//! The CLI's side of the control socket (protocol and framing: crates/control; the
//! daemon's listener: crates/daemon server.rs).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::progress::{show_relayed, Bar};
use snapblk_control::Command;

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
