//! The `snapblk` binary: parses the command line, sends the command to the daemon (or runs
//! it on a directly opened pool: crates/daemon), and renders the reply. `snapblk daemon`
//! runs crates/daemon's `run`.

mod cli;
mod control;
mod exit;
mod freeze;
mod heap;
mod logging;
mod manpages;
mod mount;
mod progress;
mod render;
mod repo_cmds;
mod repos;

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;

use cli::{
    BackupArgs, Cli, Cmd, GroupCmd, JobsCmd, NotifyCmd, PolicyCmd, PoolCmd, RepoCmd, SnapshotCmd,
    VolumeCmd,
};
use snapblk_control::human::{self as human, parse_size};
use snapblk_control::Command;
use snapblk_control::Reply;
use snapblk_daemon::{admin, open, run as daemon};

/// `println!` that takes a closed stdout (`snapblk ... | grep -q x`, `| head -1`) as the
/// reader's choice: exit 0 quietly instead of panicking.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            return Err(e.into());
        }
    }};
}

fn command(cmd: &Cmd) -> Result<Command> {
    Ok(match cmd {
        Cmd::Pool(PoolCmd::Info) => Command::PoolInfo,
        Cmd::Pool(PoolCmd::Check) => Command::PoolCheck,
        Cmd::Pool(PoolCmd::Scrub) => Command::PoolScrub,
        Cmd::Pool(PoolCmd::Compact) => Command::PoolCompact,
        Cmd::Volume(VolumeCmd::Create { name, size }) => Command::VolumeCreate {
            name: name.clone(),
            size: parse_size(size)?,
        },
        Cmd::Volume(VolumeCmd::List) => Command::VolumeList,
        Cmd::Volume(VolumeCmd::SetDefault { name, clear }) => Command::VolumeSetDefault {
            name: name.clone(),
            clear: *clear,
        },
        Cmd::Volume(VolumeCmd::Info { name }) => Command::VolumeInfo { name: name.clone() },
        Cmd::Volume(VolumeCmd::SetQuota { name, size }) => Command::VolumeSetQuota {
            name: name.clone(),
            quota: match size.as_str() {
                "none" => None,
                s => Some(parse_size(s)?),
            },
        },
        Cmd::Snapshot(SnapshotCmd::Protect { snapshot }) => Command::SnapshotProtect {
            snapshot: snapshot.clone(),
            protect: true,
        },
        Cmd::Snapshot(SnapshotCmd::Unprotect { snapshot }) => Command::SnapshotProtect {
            snapshot: snapshot.clone(),
            protect: false,
        },
        Cmd::Pool(PoolCmd::Guard {
            min_free,
            target_free,
            off,
        }) => Command::SpaceGuard {
            min_free: *min_free,
            target_free: *target_free,
            off: *off,
        },
        Cmd::Volume(VolumeCmd::Resize { name, size, force }) => Command::VolumeResize {
            name: name.clone(),
            size: parse_size(size)?,
            force: *force,
        },
        Cmd::Volume(VolumeCmd::Rename { old, new }) => Command::VolumeRename {
            old: old.clone(),
            new: new.clone(),
        },
        Cmd::Volume(VolumeCmd::Delete { name, recursive }) => Command::VolumeDelete {
            name: name.clone(),
            recursive: *recursive,
        },
        Cmd::Snapshot(SnapshotCmd::Create {
            snapshot, group, ..
        }) => Command::SnapshotCreate {
            snapshot: snapshot.clone(),
            group: *group,
        },
        Cmd::Group(GroupCmd::Create { name, volumes }) => Command::GroupSet {
            name: name.clone(),
            volumes: volumes.clone(),
        },
        Cmd::Group(GroupCmd::List) => Command::GroupList,
        Cmd::Group(GroupCmd::Delete { name }) => Command::GroupDelete { name: name.clone() },
        Cmd::Snapshot(SnapshotCmd::List { volume }) => Command::SnapshotList {
            volume: volume.clone(),
        },
        Cmd::Snapshot(SnapshotCmd::Info { snapshot }) => Command::SnapshotInfo {
            snapshot: snapshot.clone(),
        },
        Cmd::Snapshot(SnapshotCmd::Delete { snapshot }) => Command::SnapshotDelete {
            snapshot: snapshot.clone(),
        },
        Cmd::Clone { snapshot, name } => Command::Clone {
            snapshot: snapshot.clone(),
            name: name.clone(),
        },
        Cmd::Rollback { snapshot } => Command::Rollback {
            snapshot: snapshot.clone(),
        },
        Cmd::Diff { from, to } => Command::Diff {
            from: from.clone(),
            to: to.clone(),
        },
        Cmd::Attach {
            target,
            read_only,
            queues,
            depth,
        } => Command::Attach {
            target: target.clone(),
            read_only: *read_only,
            queues: *queues,
            depth: *depth,
        },
        Cmd::Detach { what } => Command::Detach { what: what.clone() },
        Cmd::List => Command::List,
        Cmd::Backup(BackupArgs {
            cmd: None,
            snapshot: Some(snapshot),
            to: Some(to),
            full,
            repo,
        }) => Command::Backup {
            snapshot: snapshot.clone(),
            repo: repo.spec(to)?,
            full: *full,
        },
        Cmd::Restore {
            target,
            backup,
            name,
            lazy,
            from,
            repo,
        } => Command::Restore {
            repo: repo.spec(target)?,
            backup: backup.clone(),
            name: name.clone(),
            lazy: *lazy,
            from: from.clone(),
        },
        Cmd::RestoreStatus => Command::RestoreStatus,
        Cmd::RestoreCancel { volume } => Command::RestoreCancel {
            volume: volume.clone(),
        },
        Cmd::Policy(PolicyCmd::Set(a)) => Command::PolicySet {
            name: a.name.clone(),
            policy: serde_json::json!({
                "volumes": a.volumes,
                "groups": a.groups,
                "timezone": a.timezone,
                "snapshots": {
                    "schedule": a.schedule,
                    "prefix": a.prefix.clone().unwrap_or_default(),
                    "persistent": !a.no_catch_up,
                    "random_delay_secs": a.random_delay,
                    "hooks": {
                        "pre": a.pre_hook.as_ref().map(|c| vec!["/bin/sh", "-c", c]).unwrap_or_default(),
                        "post": a.post_hook.as_ref().map(|c| vec!["/bin/sh", "-c", c]).unwrap_or_default(),
                        "timeout_secs": a.hook_timeout,
                        "on_pre_failure": a.on_pre_hook_failure,
                    },
                    "keep": a.keep.json(),
                },
            }),
        },
        Cmd::Policy(PolicyCmd::List) => Command::PolicyList,
        Cmd::Policy(PolicyCmd::Show { name }) => Command::PolicyShow { name: name.clone() },
        Cmd::Policy(PolicyCmd::Delete { name }) => Command::PolicyDelete { name: name.clone() },
        Cmd::Policy(PolicyCmd::Plan { name }) => Command::PolicyPlan { name: name.clone() },
        Cmd::Policy(PolicyCmd::BackupTo(a)) => Command::PolicyBackupSet {
            policy: a.policy.clone(),
            rule: serde_json::json!({
                "repository": a.repository,
                "schedule": a.schedule,
                "keep": a.keep.json(),
                "always": a.always,
                "rpo_secs": a.rpo.as_deref().map(human::parse_duration).transpose()?.unwrap_or(0),
                "persistent": !a.no_catch_up,
                "random_delay_secs": a.random_delay,
            }),
        },
        Cmd::Policy(PolicyCmd::BackupRemove { policy, repository }) => {
            Command::PolicyBackupDelete {
                policy: policy.clone(),
                repository: repository.clone(),
            }
        }
        Cmd::Repo(RepoCmd::Add(a)) if a.copy_from.is_none() && a.keep.any() => {
            anyhow::bail!("--keep-* on a repository is the retention of its copies: give --copy-from and --copy too")
        }
        Cmd::Repo(RepoCmd::Add(a)) => Command::RepoSet {
            name: a.name.clone(),
            repo: serde_json::json!({
                "url": a.url,
                "key_file": a.key_file,
                "passphrase_file": a.passphrase_file,
                "endpoint": a.endpoint,
                "region": a.region,
                "gc": a.gc.as_ref().map(|s| Ok::<_, anyhow::Error>(serde_json::json!({
                    "schedule": s, "grace_secs": human::parse_duration(&a.gc_grace)?,
                }))).transpose()?,
                "verify": a.verify.as_ref().map(|s| serde_json::json!({
                    "schedule": s, "read_data_runs": a.verify_read_runs,
                })),
                "copy": a.copy.as_ref().map(|s| serde_json::json!({
                    "schedule": s, "from": a.copy_from, "keep": a.keep.json(),
                })),
            }),
        },
        Cmd::Repo(RepoCmd::List) => Command::RepoList,
        Cmd::Notify(NotifyCmd::Set { webhook, command }) => Command::NotifySet {
            webhook: webhook.clone(),
            command: command.clone(),
        },
        Cmd::Notify(NotifyCmd::Show) => Command::NotifyShow,
        Cmd::Notify(NotifyCmd::Test) => Command::NotifyTest,
        Cmd::Status { volume } => Command::Status {
            volume: volume.clone(),
        },
        Cmd::Repo(RepoCmd::Remove { name }) => Command::RepoDelete { name: name.clone() },
        Cmd::Jobs { cmd: None } => Command::Jobs,
        Cmd::Jobs {
            cmd: Some(JobsCmd::Run { name }),
        } => Command::JobRun { name: name.clone() },
        Cmd::Pool(PoolCmd::Create { .. })
        | Cmd::Pool(PoolCmd::Upgrade)
        | Cmd::Daemon(_)
        | Cmd::UdevName { .. }
        | Cmd::Completions { .. }
        | Cmd::Mount { .. }
        | Cmd::Umount { .. }
        | Cmd::Manpages { .. }
        | Cmd::Repo(_)
        | Cmd::Backup(_) => {
            bail!("not a management command")
        }
    })
}

/// Runs a management command through the daemon, or on a directly opened pool.
fn run_command(cli: &Cli, cmd: &Command) -> Result<Reply> {
    let v = run_command_raw(cli, cmd)?;
    parse_reply(cmd, v)
}

/// The typed reply; an error says the command itself ran (a daemon of another version
/// may answer with a shape this CLI does not know).
fn parse_reply(cmd: &Command, v: serde_json::Value) -> Result<Reply> {
    Reply::parse(cmd, v).map_err(|e| {
        anyhow::anyhow!("{e} (the command ran; is the daemon another snapblk version?)")
    })
}

/// The reply's JSON as the daemon sent it (or as a direct run produced it).
fn run_command_raw(cli: &Cli, cmd: &Command) -> Result<serde_json::Value> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(snapblk_daemon::server::default_socket);
    if let Some(conn) = control::connect(&socket) {
        return control::call(&conn, cmd, &progress::Bar::new(cli.json));
    }
    let (Some(meta), Some(data)) = (&cli.meta, &cli.data) else {
        return Err(exit::Failed {
            message: format!(
                "no daemon answers at {} and no --meta/--data were given to open the pool directly",
                socket.display()
            ),
            kind: exit::Kind::NoDaemon,
        }
        .into());
    };
    let opened = open::open_pool(meta, data, "snapblk CLI", open::OpenSettings::ONE_SHOT)?;
    let report = std::env::var_os("SNAPBLK_MEMORY_REPORT").is_some();
    let rss_open = if report { memory_baseline() } else { 0 };
    let store_open = opened.pool.store().memory() / 1024;
    let bar = progress::Local::new(cli.json);
    let r = admin::execute(&opened.pool, None, cmd, &bar);
    bar.bar.finish();
    if report {
        // For benches/backup_scale.sh: what the command held beyond the open pool, and
        // what the pool's store held in RAM (its write buffers and caches, bounded by
        // its configuration) when the pool was opened and when the command ended.
        eprintln!(
            "snapblk memory: {rss_open} KiB resident after opening the pool, peak {} KiB; store {store_open} KiB at open, {} KiB at end",
            proc_status_kib("VmHWM"),
            opened.pool.store().memory() / 1024
        );
    }
    if admin::mutates(cmd) {
        opened.pool.reclaim_all()?;
    }
    opened.pool.shutdown()?;
    Ok(r?.to_value())
}

/// The resident set once the pool is open, as the base of a job's peak: memory the open
/// freed is first handed back (glibc keeps it otherwise, and a job reusing it would look
/// smaller by what the open happened to free, which differs from pool to pool), and the
/// peak (VmHWM) is reset so that it covers the job alone.
fn memory_baseline() -> u64 {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it has no
    // preconditions and touches no memory the program holds.
    unsafe {
        libc::malloc_trim(0);
    }
    // "5" resets the peak resident set size (proc(5), Linux >= 4.0); without it the
    // report's peak may be the open's.
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        log::warn!("memory report: the peak could not be reset: {e}");
    }
    proc_status_kib("VmRSS")
}

/// A `kB` field of /proc/self/status (0 when absent).
fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.cmd {
        Cmd::Daemon(a) => {
            let base = match &a.config {
                Some(p) => daemon::DaemonConfig::load(p)?,
                None => daemon::DaemonConfig::default(),
            };
            let cfg = base.merge(daemon::DaemonConfig {
                meta: cli.meta.clone(),
                data: cli.data.clone(),
                socket: cli.socket.clone(),
                nbd_socket: a.nbd_socket.clone(),
                nbd_tcp: a.nbd_tcp.clone(),
                nbd_group: a.nbd_group.clone(),
                max_connections: a.max_connections,
                insecure: a.insecure.then_some(true),
                workers: a.workers,
                tls_cert: a.tls_cert.clone(),
                tls_key: a.tls_key.clone(),
                tls_client_ca: a.tls_client_ca.clone(),
                metrics_listen: a.metrics_listen.clone(),
                ublk_on_stop: a.ublk_on_stop.clone(),
                snapshot_cache: a.snapshot_cache.clone(),
                snapshot_cache_disk: a.snapshot_cache_disk.clone(),
                data_cache: a.data_cache.clone(),
            });
            daemon::run(cfg)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Repo(
            c @ (RepoCmd::Init { .. } | RepoCmd::Repair { .. } | RepoCmd::Upgrade { .. }),
        ) => print_outcome(&cli, repo_cmds::repo(c)?),
        Cmd::Backup(BackupArgs { cmd: Some(c), .. }) => {
            let bar = progress::Local::new(cli.json);
            let out = repo_cmds::backup(c, &bar);
            bar.bar.finish();
            let out = out?;
            // Backups removed by hand: a running daemon's jobs re-read what the repository
            // holds (the 3-2-1 report reads their records). Best effort.
            let changed = match c {
                cli::BackupCmd::Forget { target, .. } => Some(target),
                cli::BackupCmd::Prune {
                    target,
                    dry_run: false,
                    ..
                } => Some(target),
                _ => None,
            };
            if let Some(url) = changed {
                let socket = cli
                    .socket
                    .clone()
                    .unwrap_or_else(snapblk_daemon::server::default_socket);
                if let Some(conn) = control::connect(&socket) {
                    let cmd = Command::BackupsChanged { url: url.clone() };
                    if let Err(e) = control::call(&conn, &cmd, &progress::Bar::new(true)) {
                        log::warn!(
                            "telling the daemon about the removed backups: {}",
                            exit::message(&e)
                        );
                    }
                }
            }
            print_outcome(&cli, out)
        }
        Cmd::Mount {
            target,
            dir,
            partition,
            nbd_socket,
            from,
            pool,
            repo,
        } => {
            // A backup: restored lazily into a temporary volume, which is what is mounted.
            let lazy = match from {
                Some(url) => {
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos());
                    let tmp = format!("snapblk-mount-{}-{nanos:08x}", std::process::id());
                    run_command(
                        &cli,
                        &Command::Restore {
                            repo: repo.spec(url)?,
                            backup: target.clone(),
                            name: tmp.clone(),
                            lazy: true,
                            from: pool.clone(),
                        },
                    )?;
                    Some(tmp)
                }
                None => None,
            };
            let source = lazy.clone().unwrap_or_else(|| target.clone());
            let ublk = std::path::Path::new("/dev/ublk-control").exists();
            let attach = || -> Result<String> {
                let v = run_command(
                    &cli,
                    &Command::Attach {
                        target: source.clone(),
                        read_only: true,
                        queues: 1,
                        depth: 64,
                    },
                )?;
                match v {
                    Reply::Device(d) => Ok(d.path),
                    _ => Err(anyhow::anyhow!("attach returned no device")),
                }
            };
            let mounted = mount::mount(
                &source,
                dir,
                *partition,
                nbd_socket,
                if ublk { Some(&attach) } else { None },
                lazy.as_deref(),
            );
            let m = match mounted {
                Ok(m) => m,
                Err(e) => {
                    if let Some(tmp) = &lazy {
                        drop_restore(&cli, tmp);
                    }
                    return Err(e);
                }
            };
            if cli.json {
                say!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                say!(
                    "mounted {} ({} on {}) read-only at {}",
                    m.target,
                    m.fstype,
                    m.device,
                    m.dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Umount { dir } => {
            let detach = |dev: &str| -> Result<()> {
                run_command(
                    &cli,
                    &Command::Detach {
                        what: dev.to_string(),
                    },
                )
                .map(|_| ())
            };
            let m = mount::umount(dir, &detach)?;
            if let Some(tmp) = &m.lazy_volume {
                drop_restore(&cli, tmp);
            }
            if cli.json {
                say!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                say!("unmounted {} from {}", m.target, m.dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => {
            manpages::completions(*shell)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Manpages { dir } => {
            let files = manpages::write_all(dir)?;
            if cli.json {
                say!("{}", serde_json::json!({ "dir": dir, "pages": files }));
            } else {
                say!("wrote {} man pages into {}", files.len(), dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::UdevName { kernel_name } => {
            say!("{}", snapblk_ublk::export_of_device(kernel_name)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pool(PoolCmd::Upgrade) => {
            let (Some(meta), Some(data)) = (&cli.meta, &cli.data) else {
                bail!("pool upgrade needs --meta DIR and --data PATH (and no daemon running)");
            };
            let json = cli.json;
            let rep = open::upgrade_pool(meta, data, &|step| {
                if !json {
                    eprintln!("pool upgrade: {step}");
                }
            })?;
            if cli.json {
                say!("{}", serde_json::to_string(&rep)?);
            } else if rep.from_format == 1 {
                say!(
                    "upgraded pool to metadata format 2: {} volumes, {} snapshots, {} lineages, {} map entries; {} blocks verified",
                    rep.volumes, rep.snapshots, rep.lineages, rep.entries, rep.blocks_verified
                );
            } else {
                say!("the pool already uses metadata format 2");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pool(PoolCmd::Create { size, force }) => {
            let (Some(meta), Some(data)) = (&cli.meta, &cli.data) else {
                bail!("pool create needs --meta DIR and --data PATH");
            };
            let size = size.as_deref().map(parse_size).transpose()?;
            let uuid = open::create_pool(meta, data, size, *force)?;
            if cli.json {
                say!(
                    "{}",
                    serde_json::json!({ "uuid": uuid, "meta": meta, "data": data })
                );
            } else {
                say!(
                    "created pool {uuid} (meta {}, data {})",
                    meta.display(),
                    data.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let cmd = command(other)?;
            let frozen = match other {
                Cmd::Snapshot(SnapshotCmd::Create {
                    freeze: Some(m), ..
                }) => Some(freeze::freeze(m)?),
                _ => None,
            };
            let result = run_command_raw(&cli, &cmd);
            drop(frozen);
            let v = result?;
            if cli.json {
                // As sent: printed even if this CLI cannot read it.
                say!("{}", serde_json::to_string_pretty(&v)?);
            }
            let r = parse_reply(&cmd, v)?;
            if !cli.json {
                say!("{}", render::render(&cmd, &r));
            }
            let clean = match &r {
                Reply::Check(c) => c.is_clean(),
                Reply::Scrub(s) => s.is_clean(),
                Reply::Protection(p) => return Ok(ExitCode::from(p.exit_code)),
                _ => true,
            };
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Stops the temporary lazy restore `volume` of a backup mount and deletes it (the
/// hydration lets go of the volume a moment after it is stopped).
fn drop_restore(cli: &Cli, volume: &str) {
    let _ = run_command(
        cli,
        &Command::RestoreCancel {
            volume: volume.to_string(),
        },
    );
    let delete = Command::VolumeDelete {
        name: volume.to_string(),
        recursive: false,
    };
    for _ in 0..100 {
        if run_command(cli, &delete).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if let Err(e) = run_command(cli, &delete) {
        eprintln!(
            "snapblk: the temporary volume {volume} is left: {} (delete it with `snapblk volume delete {volume}`)",
            exit::message(&e)
        );
    }
}

fn print_outcome(cli: &Cli, out: repo_cmds::Outcome) -> Result<ExitCode> {
    if cli.json {
        say!("{}", serde_json::to_string_pretty(&out.json)?);
    } else {
        say!("{}", out.text);
    }
    Ok(if out.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    heap::return_freed_memory();
    let cli = Cli::parse();
    logging::init(cli.log_format, matches!(cli.cmd, Cmd::Daemon(_)));
    match run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("snapblk: error: {}", exit::message(&e));
            ExitCode::from(exit::code(&e))
        }
    }
}
