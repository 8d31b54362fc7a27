//! `snapblk mount VOL@SNAP DIR` / `snapblk umount DIR`: file-level restore from a snapshot.
//!
//! The snapshot (or a volume, read-only) becomes a kernel block device — a ublk device
//! through the daemon where the kernel has ublk, else NBD through nbdfuse and a read-only
//! loop device (partitions scanned) — its filesystem is found (the whole device, or the
//! first partition holding one, or `--partition N`), and it is mounted read-only without
//! journal replay (`noload` for ext3/4, `norecovery,nouuid` for xfs, so the snapshot of a
//! mounted xfs mounts beside it). What was set up is recorded in
//! `/run/snapblk/mounts/<name>.json` (`$SNAPBLK_RUN_DIR`), so `umount` undoes exactly that:
//! unmount, loop device, nbdfuse (or the ublk device). A failure part way undoes the
//! steps done.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What `mount` set up, for `umount`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Mounted {
    pub dir: PathBuf,
    pub target: String,
    /// The device mounted (a partition, or the whole device).
    pub device: String,
    pub fstype: String,
    /// NBD path: the loop device and the file nbdfuse serves.
    pub loop_dev: Option<String>,
    pub fuse_file: Option<PathBuf>,
    /// ublk path: the device the daemon attached.
    pub ublk: Option<String>,
    /// A backup's mount: the temporary lazily restored volume (deleted by umount).
    #[serde(default)]
    pub lazy_volume: Option<String>,
}

fn run_dir() -> PathBuf {
    std::env::var_os("SNAPBLK_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/snapblk"))
        .join("mounts")
}

/// The record's name for `dir` (its absolute path, `/` as `-`).
fn record_path(dir: &Path) -> PathBuf {
    let name: String = dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    run_dir().join(format!("{name}.json"))
}

/// Runs a tool; its stderr is the error.
fn tool(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn is_mountpoint(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == want)
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !ok() {
        if t0.elapsed() > limit {
            bail!("{what} did not happen within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The filesystem type on `dev` (None: no filesystem).
fn fstype(dev: &str) -> Option<String> {
    tool("blkid", &["-p", "-s", "TYPE", "-o", "value", dev])
        .ok()
        .filter(|t| !t.is_empty())
}

/// The device holding the filesystem: `dev` itself, its partition `partition`, or its
/// first partition holding one.
fn find_fs(dev: &str, partition: Option<u32>) -> Result<(String, String)> {
    let base = dev.trim_start_matches("/dev/");
    let part_name = |n: u32| {
        if base.ends_with(|c: char| c.is_ascii_digit()) {
            format!("/dev/{base}p{n}")
        } else {
            format!("/dev/{base}{n}")
        }
    };
    if let Some(n) = partition {
        let p = part_name(n);
        let t = fstype(&p).ok_or_else(|| anyhow::anyhow!("{p}: no filesystem found"))?;
        return Ok((p, t));
    }
    if let Some(t) = fstype(dev) {
        return Ok((dev.to_string(), t));
    }
    // Partitions the kernel found (the loop device was set up with a partition scan;
    // some kernels skip it: partx asks for them explicitly, and may find them added).
    let _ = tool("partx", &["-a", dev]);
    let mut parts: Vec<u32> = std::fs::read_dir(format!("/sys/block/{base}"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.strip_prefix(base)
                        .map(|r| r.trim_start_matches('p').to_string())
                        .and_then(|r| r.parse().ok())
                })
                .collect()
        })
        .unwrap_or_default();
    parts.sort_unstable();
    for n in parts {
        let p = part_name(n);
        if let Some(t) = fstype(&p) {
            return Ok((p, t));
        }
    }
    bail!("{dev}: no filesystem on the device or any of its partitions")
}

/// Read-only mount options that replay no journal.
fn ro_options(fstype: &str) -> &'static str {
    match fstype {
        "ext3" | "ext4" => "ro,noload",
        "xfs" => "ro,norecovery,nouuid",
        _ => "ro",
    }
}

/// The NBD URI of `target` on the daemon's socket.
fn nbd_uri(socket: &Path, target: &str) -> String {
    format!("nbd+unix:///{target}?socket={}", socket.display())
}

/// Steps done so far, undone in reverse if a later one fails.
fn undo(m: &Mounted) {
    if is_mountpoint(&m.dir) {
        let _ = tool("umount", &[&m.dir.to_string_lossy()]);
    }
    if let Some(l) = &m.loop_dev {
        let _ = tool("losetup", &["-d", l]);
    }
    if let Some(f) = &m.fuse_file {
        let f = f.to_string_lossy().to_string();
        let _ = wait_for("nbdfuse unmount", Duration::from_secs(10), || {
            tool("fusermount3", &["-u", &f]).is_ok() || !is_mountpoint(Path::new(&f))
        });
        let _ = std::fs::remove_file(&f);
        let _ = std::fs::remove_file(Path::new(&f).with_extension("log"));
    }
}

/// Mounts `target` read-only at `dir` through NBD (`socket`) or, with `ublk`, a ublk
/// device the caller attached (`attach` returns its path).
pub fn mount(
    target: &str,
    dir: &Path,
    partition: Option<u32>,
    socket: &Path,
    ublk: Option<&dyn Fn() -> Result<String>>,
    lazy_volume: Option<&str>,
) -> Result<Mounted> {
    let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    if is_mountpoint(&dir) {
        bail!("{} is already a mount point", dir.display());
    }
    let rec = record_path(&dir);
    if rec.exists() {
        bail!(
            "{} has a snapblk mount record already ({}): snapblk umount it first",
            dir.display(),
            rec.display()
        );
    }
    std::fs::create_dir_all(run_dir()).context("creating the mount records directory")?;
    let mut m = Mounted {
        dir: dir.clone(),
        target: target.to_string(),
        lazy_volume: lazy_volume.map(str::to_string),
        ..Default::default()
    };
    let result = (|| -> Result<()> {
        let dev = match ublk {
            Some(attach) => {
                let d = attach()?;
                m.ublk = Some(d.clone());
                d
            }
            None => {
                let file = rec.with_extension("nbd");
                std::fs::File::create(&file)
                    .with_context(|| format!("creating {}", file.display()))?;
                m.fuse_file = Some(file.clone());
                let log = std::fs::File::create(rec.with_extension("log"))?;
                // Its own process group: it outlives this command, and a terminal's
                // Ctrl-C or hangup does not take the mount down.
                let mut child = Command::new("nbdfuse")
                    .process_group(0)
                    .args(["-r"])
                    .arg(&file)
                    .arg(nbd_uri(socket, target))
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .context("starting nbdfuse (is it installed?)")?;
                let mut exited = false;
                let served = wait_for(
                    "nbdfuse serving the snapshot",
                    Duration::from_secs(10),
                    || {
                        exited = matches!(child.try_wait(), Ok(Some(_)));
                        exited || is_mountpoint(&file)
                    },
                );
                if exited || served.is_err() {
                    let said =
                        std::fs::read_to_string(rec.with_extension("log")).unwrap_or_default();
                    bail!("nbdfuse could not serve {target}: {}", said.trim());
                }
                let l = tool(
                    "losetup",
                    &[
                        "-f",
                        "--show",
                        "-r",
                        "-P",
                        "--direct-io=off",
                        &file.to_string_lossy(),
                    ],
                )?;
                m.loop_dev = Some(l.clone());
                l
            }
        };
        let (fsdev, fst) = find_fs(&dev, partition)?;
        tool(
            "mount",
            &[
                "-t",
                &fst,
                "-o",
                ro_options(&fst),
                &fsdev,
                &dir.to_string_lossy(),
            ],
        )?;
        m.device = fsdev;
        m.fstype = fst;
        std::fs::write(&rec, serde_json::to_vec_pretty(&m)?)
            .with_context(|| format!("writing {}", rec.display()))?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(m),
        Err(e) => {
            undo(&m);
            Err(e)
        }
    }
}

/// Undoes `mount` of `dir`; `detach` detaches a ublk device. Returns what was undone.
pub fn umount(dir: &Path, detach: &dyn Fn(&str) -> Result<()>) -> Result<Mounted> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let rec = record_path(&dir);
    let m: Mounted = serde_json::from_slice(
        &std::fs::read(&rec)
            .with_context(|| format!("{} was not mounted by snapblk mount", dir.display()))?,
    )
    .with_context(|| format!("reading {}", rec.display()))?;
    if is_mountpoint(&m.dir) {
        tool("umount", &[&m.dir.to_string_lossy()])?;
    }
    if let Some(l) = &m.loop_dev {
        // Already gone (a reboot) is fine.
        let _ = tool("losetup", &["-d", l]);
    }
    if let Some(f) = &m.fuse_file {
        let fs = f.to_string_lossy().to_string();
        wait_for("nbdfuse to unmount", Duration::from_secs(10), || {
            !is_mountpoint(f) || tool("fusermount3", &["-u", &fs]).is_ok()
        })?;
        let _ = std::fs::remove_file(f);
    }
    if let Some(u) = &m.ublk {
        detach(u)?;
    }
    let _ = std::fs::remove_file(rec.with_extension("log"));
    std::fs::remove_file(&rec).with_context(|| format!("removing {}", rec.display()))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_record_names() {
        assert_eq!(ro_options("ext4"), "ro,noload");
        assert_eq!(ro_options("xfs"), "ro,norecovery,nouuid");
        assert_eq!(ro_options("vfat"), "ro");
        assert!(record_path(Path::new("/mnt/a b/c")).ends_with("mnt-a-b-c.json"));
    }
}
