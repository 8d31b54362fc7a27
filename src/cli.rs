//! Command-line definitions (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::repos::RepoArgs;

#[derive(Parser, Debug)]
#[command(
    name = "snapblk",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SNAPBLK_COMMIT"), ")"),
    about = "Thin volumes with O(1) snapshots, served over NBD"
)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "SNAPBLK_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Metadata directory (SSD), to open the pool directly when no daemon runs.
    #[arg(long, global = true, env = "SNAPBLK_META")]
    pub meta: Option<PathBuf>,
    /// Data file or block device (HDD), to open the pool directly when no daemon runs.
    #[arg(long, global = true, env = "SNAPBLK_DATA")]
    pub data: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log lines on stderr: text (journald-aware) or json (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SNAPBLK_LOG_FORMAT"
    )]
    pub log_format: crate::logging::LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Cmd {
    /// Create, inspect and check the pool.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Run the daemon in the foreground: holds the pool, serves NBD and the control socket.
    Daemon(DaemonArgs),
    /// Thin volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Read-only point-in-time snapshots (VOLUME@SNAPSHOT).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Create a writable volume sharing all data with a snapshot.
    Clone {
        /// VOLUME@SNAPSHOT
        snapshot: String,
        /// Name of the new volume.
        name: String,
    },
    /// Return a volume to a snapshot's contents (later snapshots are kept).
    Rollback {
        /// VOLUME@SNAPSHOT
        snapshot: String,
    },
    /// Attach a volume (read-write) or snapshot (read-only) as a ublk block device
    /// (/dev/ublkbN); needs the daemon and the ublk_drv kernel module.
    Attach {
        /// VOLUME or VOLUME@SNAPSHOT
        target: String,
        /// Attach a volume read-only.
        #[arg(long)]
        read_only: bool,
        /// Hardware queues (one thread each).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: u16,
        /// Requests in flight per queue.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=4096))]
        depth: u16,
    },
    /// Detach a ublk device (by VOLUME, VOLUME@SNAPSHOT or /dev/ublkbN); in-flight I/O drains.
    Detach { what: String },
    /// Attached ublk devices.
    List,
    /// Consistency groups: volumes snapshotted together as one cut
    /// (`snapshot create GROUP@NAME --group`).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (snapblk.1, snapblk-volume.1, ...) for every command into DIR.
    Manpages { dir: PathBuf },
    /// Protection policies: snapshots on a schedule, kept by retention rules.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Where the daemon sends notifications (a job failing or recovering, a volume's
    /// protection violated or recovered): a webhook (HTTP POST of the event as JSON) and/or
    /// a command (the JSON on stdin, SNAPBLK_EVENT=kind).
    #[command(subcommand)]
    Notify(NotifyCmd),
    /// Mount a snapshot's filesystem read-only at DIR to restore files from it (no journal
    /// replay; the whole device or its first partition holding a filesystem). Through a
    /// ublk device where the kernel has ublk, else NBD via nbdfuse and a loop device.
    Mount {
        /// VOLUME@SNAPSHOT (or VOLUME, read-only); with --from, a backup's VOLUME@SNAPSHOT.
        target: String,
        dir: PathBuf,
        /// Mount a backup from this repository (s3://... or file://...): served through a
        /// temporary lazy restore that fetches only what is read; umount removes it.
        #[arg(long, value_name = "REPO")]
        from: Option<String>,
        /// With --from: the pool or host whose backup (default: as `restore` chooses).
        #[arg(long, value_name = "HOST|POOL", requires = "from")]
        pool: Option<String>,
        #[command(flatten)]
        repo: RepoArgs,
        /// Mount partition N instead of the first one holding a filesystem.
        #[arg(long)]
        partition: Option<u32>,
        /// The daemon's NBD socket.
        #[arg(long, env = "SNAPBLK_NBD_SOCKET", default_value = snapblk_daemon::run::DEFAULT_NBD_SOCKET)]
        nbd_socket: PathBuf,
    },
    /// Undo `snapblk mount DIR`: unmount, and remove the devices it set up.
    Umount { dir: PathBuf },
    /// Is each volume safe? Copies, media and off-site copies (the 3-2-1 rule) and each
    /// backup target's age against its RPO; exits 0 compliant, 1 at risk, 2 violated (for
    /// monitoring, as sanoid's --monitor-* do).
    Status {
        /// Only this volume.
        volume: Option<String>,
    },
    /// The policies' scheduled jobs: last and next run, history (`jobs run NAME` runs one now).
    Jobs {
        #[command(subcommand)]
        cmd: Option<JobsCmd>,
    },
    /// For udev rules: print the export a ublk device serves (`udev-name ublkb0`).
    #[command(hide = true)]
    UdevName { kernel_name: String },
    /// Create backup repositories (s3://BUCKET/PREFIX or file:///PATH).
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Back up a snapshot (`backup VOL@SNAP --to TARGET`), or list, verify, prune and
    /// garbage-collect a repository's backups.
    Backup(BackupArgs),
    /// Restore a backed-up snapshot as a new volume.
    Restore {
        /// Repository: s3://BUCKET/PREFIX or file:///PATH
        target: String,
        /// VOLUME@SNAPSHOT as backed up (the newest such backup), or a backup id.
        backup: String,
        /// Name of the new volume.
        #[arg(long = "as", value_name = "NEWVOL")]
        name: String,
        /// Return at once: the volume can be attached and mounted while its data is
        /// fetched (on demand first, the rest in the background). Needs the daemon.
        #[arg(long)]
        lazy: bool,
        /// Restore a backup taken by another pool: its host name or pool uuid (default:
        /// this pool's backup of that name, else the one pool that has one).
        #[arg(long, value_name = "HOST|POOL")]
        from: Option<String>,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Progress of lazy restores.
    RestoreStatus,
    /// Stop a lazy restore: the volume is then an interrupted restore, to delete (or to
    /// resume with the same `restore --lazy`).
    RestoreCancel { volume: String },
    /// List the byte ranges that differ between two snapshots, or a snapshot and a volume.
    Diff {
        /// VOLUME@SNAPSHOT (or VOLUME)
        from: String,
        /// VOLUME@SNAPSHOT or VOLUME
        to: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Format a new pool: metadata in --meta, data in --data.
    Create {
        /// Size of the data file to create (e.g. 100G); not for block devices.
        #[arg(long)]
        size: Option<String>,
        /// Overwrite an existing data file or pool header.
        #[arg(long)]
        force: bool,
    },
    /// Capacity, usage and metadata size.
    Info,
    /// Verify every metadata invariant; exits 1 on any violation.
    Check,
    /// Read every stored data block and verify its checksum; exit 1 naming each bad
    /// block and the volumes and snapshots it can affect.
    Scrub,
    /// Rewrite the metadata store so it holds only live entries (a full RocksDB
    /// compaction), then print `pool info`: frees the metadata disk after many deletes,
    /// and makes `metadata_size` what the metadata takes. I/O goes on meanwhile.
    Compact,
    /// Show or set the space guard: when free space falls under --min-free percent of the
    /// pool, the daemon deletes the oldest snapshots policies made that nothing needs
    /// (never protected ones, backup bases, a policy's newest or hand-made ones) until
    /// --target-free; a write that finds the pool full waits for it. Alerts when nothing
    /// is left to delete.
    Guard {
        /// Percent of the pool to keep free (e.g. 10).
        #[arg(long)]
        min_free: Option<f64>,
        /// Percent to free up to once triggered (default: min-free + 5).
        #[arg(long, requires = "min_free")]
        target_free: Option<f64>,
        /// Turn the guard off.
        #[arg(long, conflicts_with = "min_free")]
        off: bool,
    },
    /// Convert a pool made by an earlier snapblk (metadata format 1) to format 2, in place
    /// and offline (stop the daemon first). Every volume and snapshot is compared with the
    /// old metadata before the switch; an interrupted upgrade is finished by running it again.
    Upgrade,
}

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// TOML file with meta, data, socket, nbd_socket, nbd_tcp, nbd_group, max_connections,
    /// insecure, workers, tls_cert, tls_key, tls_client_ca, metrics_listen, ublk_on_stop,
    /// snapshot_cache, snapshot_cache_disk, data_cache.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Unix socket for NBD clients.
    #[arg(long, env = "SNAPBLK_NBD_SOCKET")]
    pub nbd_socket: Option<PathBuf>,
    /// Also serve NBD on this TCP address (host:port); default "none": TCP is opt-in.
    #[arg(long)]
    pub nbd_tcp: Option<String>,
    /// Group (name or gid) that may use the NBD Unix socket (mode 0660); without it the
    /// socket is root's only (0600).
    #[arg(long)]
    pub nbd_group: Option<String>,
    /// NBD connections served at once (Unix and TCP together); more are closed at once.
    /// Default 64.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Serve NBD on a non-loopback TCP address without client authentication (plain NBD,
    /// or TLS without --tls-client-ca): anyone who can reach it can read and write every
    /// volume.
    #[arg(long)]
    pub insecure: bool,
    /// Worker threads executing NBD requests.
    #[arg(long)]
    pub workers: Option<usize>,
    /// TLS certificate chain (PEM) for NBD over TCP; with --tls-key, TCP clients must use
    /// TLS (NBD STARTTLS). A non-loopback address also needs --tls-client-ca.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) matching --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM): TCP clients must present a certificate it signed.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address (host:port); default
    /// "none". Volume names and sizes are visible to whoever reaches it.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// What a clean stop (SIGTERM) does with attached ublk devices: detach them (default),
    /// or keep them, their I/O held by the kernel, for the next daemon to take back.
    #[arg(long, value_parser = ["detach", "keep"])]
    pub ublk_on_stop: Option<String>,
    /// RAM for the page contents of snapshots and clone bases that reads resolved (e.g.
    /// 64M, the default; 0 turns it off; at most 64G). Reads it answers skip the metadata
    /// store; ~450 bytes hold the map of 256 KiB of sequentially written data. Other
    /// than 0, at least 64K.
    #[arg(long)]
    pub snapshot_cache: Option<String>,
    /// Metadata-disk space (in <meta>/db/derived) for the same contents past the RAM, so
    /// that snapshot reads beyond it cost one lookup like a volume's (e.g. 1G, the
    /// default; 0 turns it off; 64M to 64G). The oldest entries go first past it; ~1.3% of
    /// it is held in RAM (filters). Count it in the metadata disk's size.
    #[arg(long)]
    pub snapshot_cache_disk: Option<String>,
    /// Data I/O: "reads" (default: writes O_DIRECT, reads through the host's page cache:
    /// repeated reads from RAM and read-ahead for large reads, at the cost of RAM; on a
    /// block device reads stay O_DIRECT), "none"
    /// (O_DIRECT both ways, like qemu's cache=none: the volumes' users cache) or "host"
    /// (reads and writes through the page cache, like qemu's cache=writeback; syncs write
    /// back what is dirty).
    #[arg(long, value_parser = ["none", "reads", "host"])]
    pub data_cache: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a thin volume.
    Create {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Every volume: size, space used, quota, snapshots, origin, state.
    List,
    /// One volume in detail.
    Info { name: String },
    /// Grow a volume (shrinking needs --force and discards the cut-off data).
    Resize {
        name: String,
        #[arg(long)]
        size: String,
        #[arg(long)]
        force: bool,
    },
    /// Rename a volume; its snapshots follow it.
    Rename { old: String, new: String },
    /// Limit the space a volume and its snapshots may hold (as ZFS's quota): writes that
    /// would go beyond it fail with ENOSPC for this volume only. SIZE `none` removes it.
    SetQuota { name: String, size: String },
    /// Delete a volume (with --recursive also its snapshots).
    Delete {
        name: String,
        #[arg(long, short)]
        recursive: bool,
    },
    /// The volume NBD clients get when they ask for the empty export name (shown without
    /// arguments; --clear removes it).
    SetDefault {
        #[arg(conflicts_with = "clear")]
        name: Option<String>,
        #[arg(long)]
        clear: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot in O(1).
    Create {
        /// VOLUME@SNAPSHOT (with --group: GROUP@SNAPSHOT)
        snapshot: String,
        /// Freeze the filesystem mounted here around the snapshot (like fsfreeze).
        #[arg(long)]
        freeze: Option<PathBuf>,
        /// Snapshot every volume of the consistency group as one cut (one metadata commit).
        #[arg(long)]
        group: bool,
    },
    /// Snapshots of one volume, or of all.
    List { volume: Option<String> },
    /// One snapshot in detail, with the space deleting it would free.
    Info { snapshot: String },
    /// Delete a snapshot; its space is reclaimed in the background.
    Delete { snapshot: String },
    /// Protect a snapshot: deleting it (by hand, retention or the space guard) is refused
    /// until it is unprotected.
    Protect { snapshot: String },
    /// Lift a snapshot's protection.
    Unprotect { snapshot: String },
}

#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Create an encrypted repository at TARGET (creates the S3 bucket if missing).
    Init {
        /// s3://BUCKET/PREFIX or file:///PATH
        target: String,
        /// Chunk (dedup unit) size: a power of two, 4K .. 4M.
        #[arg(long, default_value = "64K")]
        chunk_size: String,
        /// Target pack object size, 1M .. 256M.
        #[arg(long, default_value = "8M")]
        pack_size: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Make the pack indexes agree with the packs: rebuild a missing index from its pack,
    /// remove indexes whose pack is gone; report backups that reference chunks no pack
    /// holds (exit 1). Writes only index objects.
    Repair {
        /// s3://BUCKET/PREFIX or file:///PATH
        target: String,
        /// Say what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Register a repository with the daemon for scheduled jobs (policies back up to it by
    /// NAME); give it its own gc and verify schedules. The key stays in its file, read at
    /// each job; S3 credentials come from the daemon's own environment.
    Add(Box<RepoAddArgs>),
    /// Registered repositories.
    List,
    /// Unregister a repository (its backups stay in it).
    Remove { name: String },
    /// Convert a repository to the current format (4): authenticates a format-1 config as
    /// stored now, writes format 2's missing catalogs, then raises the version, after which
    /// new backup tables are stored in frames and older snapblk refuses the repository
    /// (upgrade every host sharing it first). Run it where you trust the repository.
    Upgrade {
        /// s3://BUCKET/PREFIX or file:///PATH
        target: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
}

#[derive(Args, Debug)]
pub struct RepoAddArgs {
    /// Name policies use for it.
    pub name: String,
    /// s3://BUCKET/PREFIX or file:///PATH (created with `repo init`).
    pub url: String,
    /// File holding the repository key (absolute path, readable by the daemon).
    #[arg(long, required_unless_present = "passphrase_file")]
    pub key_file: Option<String>,
    /// Or a file whose first line is the passphrase.
    #[arg(long, conflicts_with = "key_file")]
    pub passphrase_file: Option<String>,
    /// S3-compatible endpoint URL.
    #[arg(long, env = "SNAPBLK_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    #[arg(long, env = "SNAPBLK_S3_REGION")]
    pub region: Option<String>,
    /// Garbage-collect on this schedule (systemd OnCalendar, e.g. "Sun 04:00").
    #[arg(long, value_name = "SCHEDULE")]
    pub gc: Option<String>,
    /// Grace period of scheduled gc runs.
    #[arg(long, default_value = "1d", value_name = "DURATION")]
    pub gc_grace: String,
    /// Verify on this schedule.
    #[arg(long, value_name = "SCHEDULE")]
    pub verify: Option<String>,
    /// Each scheduled verify also downloads and checks 1/N of the packs, a different part
    /// each run, so all data is re-read every N runs (0: structure only; 1: all each run).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub verify_read_runs: u32,
    /// Copy this pool's backups from another registered repository into this one on
    /// the --copy schedule (`backup copy`: no volume is read; e.g. a USB disk's backups
    /// taken off site).
    #[arg(long, value_name = "REPOSITORY", requires = "copy")]
    pub copy_from: Option<String>,
    #[arg(long, value_name = "SCHEDULE", requires = "copy_from")]
    pub copy: Option<String>,
    /// With --copy-from: this repository's own retention of the copies (the newest per
    /// volume always stays; none: keep every copy). Source backups it would not keep are
    /// not copied.
    #[command(flatten)]
    pub keep: KeepArgs,
}

/// Retention: the newest item of each of the last N hours, days, ISO weeks, months, years
/// that have one, and the N newest (all 0: keep everything).
#[derive(Args, Debug, Clone)]
pub struct KeepArgs {
    #[arg(long, default_value_t = 0)]
    pub keep_last: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_hourly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_daily: u32,
    /// ISO weeks.
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_yearly: u32,
}

impl KeepArgs {
    /// Whether any rule was given.
    pub fn any(&self) -> bool {
        [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ]
        .iter()
        .any(|n| *n > 0)
    }
    /// As snapblk_policy::Keep's JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "last": self.keep_last, "hourly": self.keep_hourly, "daily": self.keep_daily,
            "weekly": self.keep_weekly, "monthly": self.keep_monthly, "yearly": self.keep_yearly,
        })
    }
}

#[derive(Args, Debug)]
pub struct PolicyBackupArgs {
    pub policy: String,
    /// A registered repository (`snapblk repo add`).
    pub repository: String,
    /// When to back up, as systemd OnCalendar (e.g. daily, "Sun 03:00"): each run backs up
    /// the newest snapshot the policy took of each volume.
    #[arg(long)]
    pub schedule: String,
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Back up even when the volume did not change since the last backup there.
    #[arg(long)]
    pub always: bool,
    /// Recovery point objective (e.g. 26h): `snapblk status` reports a volume whose newest
    /// backup here is older as violated (default: twice the schedule's interval).
    #[arg(long, value_name = "DURATION")]
    pub rpo: Option<String>,
    /// Do not catch up a run missed while the daemon was down.
    #[arg(long)]
    pub no_catch_up: bool,
    #[arg(long, default_value_t = 0)]
    pub random_delay: u32,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub cmd: Option<BackupCmd>,
    /// VOLUME@SNAPSHOT to back up.
    #[arg(required = true)]
    pub snapshot: Option<String>,
    /// Repository: s3://BUCKET/PREFIX or file:///PATH.
    #[arg(long, value_name = "TARGET", required = true)]
    pub to: Option<String>,
    /// Read the whole snapshot even if an earlier one of its lineage is backed up.
    #[arg(long)]
    pub full: bool,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Copy backups from one repository (SOURCE) into another (DEST) without reading any
    /// volume: incremental (only chunks DEST lacks travel), resumable, keeping each
    /// backup's pool, host and names. The key options name SOURCE's key; DEST's is the same
    /// unless --dest-key-file or --dest-passphrase-file.
    Copy {
        source: String,
        dest: String,
        /// Only the backups of this host name or pool uuid.
        #[arg(long, value_name = "HOST|POOL")]
        from: Option<String>,
        /// Only the backups of this volume.
        #[arg(long)]
        volume: Option<String>,
        #[arg(long, conflicts_with = "dest_passphrase_file")]
        dest_key_file: Option<std::path::PathBuf>,
        #[arg(long)]
        dest_passphrase_file: Option<std::path::PathBuf>,
        /// DEST's S3 endpoint (default: the source's).
        #[arg(long)]
        dest_endpoint: Option<String>,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Backups in a repository, with sizes, hosts and the dedup ratio.
    List {
        target: String,
        /// Only the backups of this host name or pool uuid.
        #[arg(long, value_name = "HOST|POOL")]
        from: Option<String>,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Check that every referenced chunk is stored; with --read-data, download, decrypt
    /// and hash every chunk. Exits 1 naming each bad chunk and the backups it affects.
    Verify {
        target: String,
        #[arg(long)]
        read_data: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Remove backups by retention policy, then garbage-collect (unless --no-gc).
    Prune {
        target: String,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        /// Prune the backups of this host name or pool uuid only (needed when several
        /// pools back up into the repository, unless --all-pools).
        #[arg(long, value_name = "HOST|POOL", conflicts_with = "all_pools")]
        from: Option<String>,
        /// Apply the policy to every pool's backups.
        #[arg(long)]
        all_pools: bool,
        /// Show what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        no_gc: bool,
        #[command(flatten)]
        gc: GcArgs,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Remove backups by name (`vol@snap`, the newest of that name, or a backup id), e.g.
    /// one whose objects were lost from the store; gc then frees their data.
    Forget {
        target: String,
        #[arg(required = true)]
        backups: Vec<String>,
        /// The host name or pool uuid whose backup of that name is meant.
        #[arg(long, value_name = "HOST|POOL")]
        from: Option<String>,
        /// Also remove a backup an unfinished lazy restore holds (it can then not be
        /// resumed).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Delete chunks no backup references (safe while backups run, see --grace).
    Gc {
        target: String,
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        gc: GcArgs,
        #[command(flatten)]
        repo: RepoArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct GcArgs {
    /// How long unreferenced packs stay marked before deletion (e.g. 1d, 6h, 0 when no
    /// backup can be running).
    #[arg(long, default_value = "1d")]
    pub grace: String,
    /// Repack packs with more than this percentage of unreferenced bytes.
    #[arg(long, default_value_t = 10.0)]
    pub max_unused: f64,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Create or replace a policy (its job keeps its history).
    Set(Box<PolicySetArgs>),
    /// Every policy.
    List,
    /// One policy, with its job.
    Show { name: String },
    /// Delete a policy and its job (the snapshots it took stay).
    Delete { name: String },
    /// What the policy's retention would keep and delete now, and why (changes nothing).
    Plan { name: String },
    /// Add (or replace) a backup target: the policy's snapshots go to a registered
    /// repository on their own schedule and retention (`policy set` keeps the targets).
    BackupTo(Box<PolicyBackupArgs>),
    /// Remove a policy's backup target (the backups stay).
    BackupRemove { policy: String, repository: String },
}

#[derive(Args, Debug)]
pub struct PolicySetArgs {
    /// Policy name.
    pub name: String,
    /// A volume the policy protects (repeat for more).
    #[arg(long = "volume", required_unless_present = "groups")]
    pub volumes: Vec<String>,
    /// A consistency group the policy protects: its members are snapshotted as one cut
    /// (repeat for more).
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// When to snapshot, as systemd OnCalendar: hourly, daily, "*-*-* 02:00",
    /// "Mon..Fri 18:00", "*:0/15" (local time).
    #[arg(long)]
    pub schedule: String,
    /// Snapshot names are PREFIX-YYYYMMDD-HHMMSS (UTC; PREFIX defaults to the policy's
    /// name); retention only touches those.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Read the schedules and retention periods in this IANA time zone (e.g.
    /// Europe/Berlin; default: the host's).
    #[arg(long)]
    pub timezone: Option<String>,
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Do not catch up a run missed while the daemon was down.
    #[arg(long)]
    pub no_catch_up: bool,
    /// Delay each run by up to this many seconds (spreads hosts with the same policy).
    #[arg(long, default_value_t = 0)]
    pub random_delay: u32,
    /// Shell command run before the snapshots (e.g. quiesce an application); sees
    /// SNAPBLK_POLICY, SNAPBLK_PHASE, SNAPBLK_SNAPSHOT, SNAPBLK_VOLUMES.
    #[arg(long)]
    pub pre_hook: Option<String>,
    /// Shell command run after the snapshots (whenever the pre hook ran).
    #[arg(long)]
    pub post_hook: Option<String>,
    /// Seconds a hook may run before it is killed.
    #[arg(long, default_value_t = 60)]
    pub hook_timeout: u32,
    /// If the pre hook fails: abort (no snapshot) or continue (crash-consistent).
    #[arg(long, default_value = "abort", value_parser = ["abort", "continue"])]
    pub on_pre_hook_failure: String,
}

#[derive(Subcommand, Debug)]
pub enum NotifyCmd {
    /// Set the webhook and/or the command ("" clears one).
    Set {
        #[arg(long)]
        webhook: Option<String>,
        /// Run with /bin/sh -c; the event's JSON is its stdin.
        #[arg(long)]
        command: Option<String>,
    },
    /// Where notifications go now.
    Show,
    /// Send a test event now and say whether it was delivered.
    Test,
}

#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// Run a job now, outside its schedule (e.g. `snapshot:POLICY`).
    Run { name: String },
}

#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Create or replace a group of existing volumes.
    Create {
        name: String,
        #[arg(required = true)]
        volumes: Vec<String>,
    },
    /// Every group and its volumes.
    List,
    /// Delete a group (its volumes and snapshots stay).
    Delete { name: String },
}
