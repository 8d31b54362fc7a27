//! `snapblk manpages DIR` and `snapblk completions SHELL`: generated from the clap
//! definitions (clap_mangen, clap_complete), so they never drift from the CLI.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::Cli;

/// Writes `snapblk.1` and one page per subcommand (`snapblk-volume-create.1`, ...) into
/// `dir`; returns the file names written.
pub fn write_all(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    let mut root = Cli::command();
    root.build();
    write_page(dir, &root, "snapblk", &mut out)?;
    Ok(out)
}

fn write_page(dir: &Path, cmd: &clap::Command, name: &str, out: &mut Vec<String>) -> Result<()> {
    // Hidden commands and clap's generated `help` subcommands get no page.
    if cmd.is_hide_set() || cmd.get_name() == "help" {
        return Ok(());
    }
    let page = cmd.clone().name(name.to_string());
    let file = format!("{name}.1");
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut buf)
        .with_context(|| format!("rendering {file}"))?;
    std::fs::write(dir.join(&file), buf).with_context(|| format!("writing {file}"))?;
    out.push(file);
    for sub in cmd.get_subcommands() {
        write_page(dir, sub, &format!("{name}-{}", sub.get_name()), out)?;
    }
    Ok(())
}

/// Prints the completion script for `shell` to stdout (a closed pipe is an error, not a
/// panic).
pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "snapblk", &mut buf);
    match std::io::Write::write_all(&mut std::io::stdout().lock(), &buf) {
        // `snapblk completions bash | head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing the completion script"),
    }
}
