//! Logging: the `log` macros of every crate, through `tracing-subscriber` to stderr.
//!
//! - `--log-format text` (default): human lines with time, level and target; when stderr
//!   is the journal (systemd sets `JOURNAL_STREAM` to its device and inode), no time (the
//!   journal adds it) and an sd-daemon(3) `<N>` priority prefix, so `journalctl -p warning`
//!   filters by level.
//! - `--log-format json`: one JSON object per line (`timestamp`, `level`, `target`,
//!   `message`, and any fields), for log shippers.
//!
//! `RUST_LOG` overrides the filter (`warn`, and `info` for the daemon's own messages).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the logger; `daemon` also shows the daemon's info messages by default.
pub fn init(format: LogFormat, daemon: bool) {
    // rustls warns about every client that sends an IP address as SNI (libnbd does).
    let default = if daemon {
        "warn,snapblk=info,rustls::msgs::handshake=error"
    } else {
        "warn,rustls::msgs::handshake=error"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let r = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text if stderr_is_journal() => builder.event_format(Journal).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    if let Err(e) = r {
        eprintln!("snapblk: logging not set up: {e}");
    }
}

/// Whether stderr is the stream systemd connected to the journal (`JOURNAL_STREAM` =
/// "DEVICE:INODE" of it).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// `<priority>target: message fields`: what the journal parses from a stream.
struct Journal;

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let priority = match *meta.level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(w, "<{priority}>{}: ", meta.target())?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}
