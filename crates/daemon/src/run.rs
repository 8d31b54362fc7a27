//! `snapblk daemon`: holds the pool, serves NBD (Unix socket and TCP) and the control
//! socket, runs background reclaim and the periodic sync, and shuts down cleanly (sync,
//! remove sockets) on SIGTERM or SIGINT.
//!
//! Threading: the main thread starts everything, then waits for a signal; shutdown stops
//! the policies and lazy restores, then detaches the ublk devices (or keeps them, see
//! `ublk_on_stop`) and syncs the pool. NBD and control connections each run on their own
//! thread; the process exits once everything acknowledged is durable.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use snapblk_core::device::uring::DataCache;
use snapblk_core::Pool;

use crate::devices::Devices;
use crate::error::{DaemonError, Result};
use crate::open::open_pool;
use crate::{server, sockets};

pub const DEFAULT_NBD_SOCKET: &str = "/run/snapblk/nbd.sock";
/// NBD over TCP is opt-in (`--nbd-tcp ADDR`): plain NBD has no authentication, and any
/// local user or container sharing the host network could reach a TCP port.
pub const DEFAULT_NBD_TCP: &str = "none";
/// Largest `snapshot_cache` accepted (a typo's "64T" must not be taken as a cap).
const MAX_SNAPSHOT_CACHE: u64 = 64 << 30;
/// Smallest non-zero `snapshot_cache`: room for a page with 64 scattered blocks per shard.
const MIN_SNAPSHOT_CACHE: u64 = 64 << 10;
/// `snapshot_cache_disk` bounds: below 64 MiB a few table files would be the whole space;
/// past 64 GiB its pinned filters and indexes (~1.3%) would take GiBs of RAM, and its
/// ~64 table files per GiB the process's open files.
const MIN_SNAPSHOT_CACHE_DISK: u64 = 64 << 20;
const MAX_SNAPSHOT_CACHE_DISK: u64 = 64 << 30;

/// Daemon settings: from the TOML config file, overridden by command-line flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    pub meta: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub nbd_socket: Option<PathBuf>,
    /// "host:port", or "none" (the default) to disable TCP.
    pub nbd_tcp: Option<String>,
    /// Group (name or gid) allowed to use the NBD Unix socket; without it only root can.
    pub nbd_group: Option<String>,
    /// NBD connections served at once; more are closed at once.
    pub max_connections: Option<usize>,
    /// Allow plain TCP on a non-loopback address.
    pub insecure: Option<bool>,
    pub workers: Option<usize>,
    /// TLS certificate chain and key (PEM) for NBD over TCP: TLS is then required there.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA whose client certificates TCP clients must present (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// "host:port" of the Prometheus endpoint (`GET /metrics`), or "none" (the default).
    pub metrics_listen: Option<String>,
    /// What a clean stop does with attached ublk devices: "detach" (the default: I/O
    /// drains, the devices go) or "keep" (the pool is synced and the devices stay, their
    /// I/O held by the kernel until the next daemon takes them back, as after a crash).
    pub ublk_on_stop: Option<String>,
    /// RAM for page contents of snapshots and clone bases as reads resolved them (a
    /// size, e.g. "64M", the default; "0" turns it off; at most 64G).
    pub snapshot_cache: Option<String>,
    /// Metadata-disk space for the same contents past the RAM (a size: "1G", the
    /// default; "0" turns it off; 64M to 64G), in `<meta>/db/derived`.
    pub snapshot_cache_disk: Option<String>,
    /// Data I/O: "reads" (the default: writes O_DIRECT, reads through the host's page
    /// cache), "none" (O_DIRECT both ways) or "host" (both through the page cache).
    pub data_cache: Option<String>,
}

impl DaemonConfig {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(DaemonError::io(format!(
            "reading config {}",
            path.display()
        )))?;
        toml::from_str(&text)
            .map_err(|e| DaemonError::Invalid(format!("config {}: {e}", path.display())))
    }

    /// `other` (the command line) wins where it is set.
    pub fn merge(self, other: DaemonConfig) -> DaemonConfig {
        DaemonConfig {
            meta: other.meta.or(self.meta),
            data: other.data.or(self.data),
            socket: other.socket.or(self.socket),
            nbd_socket: other.nbd_socket.or(self.nbd_socket),
            nbd_tcp: other.nbd_tcp.or(self.nbd_tcp),
            nbd_group: other.nbd_group.or(self.nbd_group),
            max_connections: other.max_connections.or(self.max_connections),
            insecure: other.insecure.or(self.insecure),
            workers: other.workers.or(self.workers),
            tls_cert: other.tls_cert.or(self.tls_cert),
            tls_key: other.tls_key.or(self.tls_key),
            tls_client_ca: other.tls_client_ca.or(self.tls_client_ca),
            metrics_listen: other.metrics_listen.or(self.metrics_listen),
            ublk_on_stop: other.ublk_on_stop.or(self.ublk_on_stop),
            snapshot_cache: other.snapshot_cache.or(self.snapshot_cache),
            snapshot_cache_disk: other.snapshot_cache_disk.or(self.snapshot_cache_disk),
            data_cache: other.data_cache.or(self.data_cache),
        }
    }
}

pub fn run(cfg: DaemonConfig) -> Result<()> {
    let (Some(meta), Some(data)) = (cfg.meta.clone(), cfg.data.clone()) else {
        return invalid("the daemon needs --meta and --data (or both in the config file)".into());
    };
    let socket = cfg.socket.clone().unwrap_or_else(server::default_socket);
    let nbd_socket = cfg
        .nbd_socket
        .clone()
        .or_else(|| std::env::var_os("SNAPBLK_NBD_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_NBD_SOCKET));
    let nbd_tcp = cfg
        .nbd_tcp
        .clone()
        .unwrap_or_else(|| DEFAULT_NBD_TCP.to_string());

    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(snapblk_nbd::tls::server_config(
            cert,
            key,
            cfg.tls_client_ca.as_deref(),
        )?),
        (None, None) if cfg.tls_client_ca.is_none() => None,
        _ => {
            return invalid(
                "TLS needs both tls_cert and tls_key (tls_client_ca is optional)".into(),
            )
        }
    };
    if nbd_tcp != "none" {
        let auth = match (&tls, &cfg.tls_client_ca) {
            (None, _) => TcpAuth::Plain,
            (Some(_), None) => TcpAuth::TlsAnyClient,
            (Some(_), Some(_)) => TcpAuth::TlsClientCerts,
        };
        check_tcp_address(&nbd_tcp, auth, cfg.insecure == Some(true))?;
    }
    let nbd_gid = cfg
        .nbd_group
        .as_deref()
        .map(sockets::group_id)
        .transpose()?;
    if cfg.max_connections == Some(0) {
        return invalid("max_connections must be at least 1".into());
    }
    let snapshot_cache = snapshot_cache_bytes(cfg.snapshot_cache.as_deref())?;
    let snapshot_cache_disk = snapshot_cache_disk_bytes(cfg.snapshot_cache_disk.as_deref())?;
    let data_cache = data_cache_mode(cfg.data_cache.as_deref())?;
    let keep_devices = match cfg.ublk_on_stop.as_deref().unwrap_or("detach") {
        "detach" => false,
        "keep" => true,
        other => {
            return invalid(format!(
                "ublk_on_stop must be \"detach\" or \"keep\", not {other:?}"
            ))
        }
    };

    // Handlers are installed before any thread starts; SIGTERM/SIGINT then only wake the
    // iterator below instead of killing the process mid-write.
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(DaemonError::io("installing signal handlers"))?;
    let opened = open_pool(
        &meta,
        &data,
        "snapblk daemon",
        crate::open::OpenSettings {
            memory: crate::open::Memory {
                derived: snapshot_cache_disk,
                ..crate::open::Memory::DAEMON
            },
            snapshot_cache: Some(snapshot_cache),
            data_cache,
        },
    )?;
    let pool = Arc::clone(&opened.pool);
    pool.start_background();

    private_mount_namespace();
    let devices = Arc::new(Devices::new(Arc::clone(&pool), meta.join("restores")));
    let metrics = crate::metrics::install(&devices, &pool)?;
    devices.recover_all();
    let policies = crate::policies::PolicyService::open(Arc::clone(&pool))?;
    let _ = devices.policies.set(Arc::clone(&policies));
    let _ = policies.metrics.set(Arc::clone(&metrics));
    policies.start()?;
    policies.start_guard(&pool)?;
    let ctl = sockets::bind_unix(&socket, 0o600, None)?;
    let workers = cfg.workers.unwrap_or(16);
    let nbd = match &tls {
        Some(t) => snapblk_nbd::Server::with_tls(devices.nbd_exports(), workers, Arc::clone(t)),
        None => snapblk_nbd::Server::new(devices.nbd_exports(), workers),
    }
    .map_err(DaemonError::io("starting the NBD server"))?;
    nbd.admission().set_max(
        cfg.max_connections
            .unwrap_or(snapblk_nbd::admission::DEFAULT_MAX_CONNECTIONS),
    );
    // Root only, unless a group is named: the socket then belongs to it, mode 0660.
    let nbd_unix = match nbd_gid {
        Some(gid) => sockets::bind_unix(&nbd_socket, 0o660, Some(gid))?,
        None => sockets::bind_unix(&nbd_socket, 0o600, None)?,
    };
    {
        let s = Arc::clone(&nbd);
        std::thread::Builder::new()
            .name("nbd-unix".into())
            .spawn(move || snapblk_nbd::serve_unix(s, nbd_unix))
            .map_err(DaemonError::io("starting the NBD accept thread"))?;
    }
    if nbd_tcp != "none" {
        let l = TcpListener::bind(&nbd_tcp)
            .map_err(DaemonError::io(format!("binding NBD TCP {nbd_tcp}")))?;
        let s = Arc::clone(&nbd);
        std::thread::Builder::new()
            .name("nbd-tcp".into())
            .spawn(move || snapblk_nbd::serve_tcp(s, l))
            .map_err(DaemonError::io("starting the NBD TCP accept thread"))?;
    }
    {
        let (p, d) = (Arc::clone(&pool), Arc::clone(&devices));
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || server::serve(p, d, ctl))
            .map_err(DaemonError::io("starting the control accept thread"))?;
    }
    let metrics_listen = cfg.metrics_listen.as_deref().unwrap_or("none");
    let endpoint = match metrics_listen {
        "none" => None,
        addr => Some(snapblk_metrics::http::Endpoint::start(
            addr,
            Arc::clone(&metrics),
        )?),
    };
    let notifier = Arc::new(crate::notify::Notifier::from_env());
    notifier.send(&format!(
        "READY=1\nSTATUS={}\nMAINPID={}",
        status_line(&pool, &devices),
        std::process::id()
    ));
    if let Some(every) = crate::notify::Notifier::watchdog_interval() {
        let (n, p, d) = (
            Arc::clone(&notifier),
            Arc::clone(&pool),
            Arc::clone(&devices),
        );
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                // Only a pool that answers is alive: a hung committer or a stopped engine
                // lets systemd's watchdog restart the daemon.
                match p.health() {
                    Ok(()) => n.send(&format!("WATCHDOG=1\nSTATUS={}", status_line(&p, &d))),
                    Err(e) => n.send(&format!("STATUS=pool not answering: {e}")),
                }
                std::thread::sleep(every);
            })
            .map_err(DaemonError::io("starting the watchdog thread"))?;
    }
    log::info!(
        "snapblk daemon: pool {} ready; control {}, NBD {}{}",
        pool.uuid(),
        socket.display(),
        nbd_socket.display(),
        match (nbd_tcp.as_str(), tls.is_some()) {
            ("none", _) => String::new(),
            (t, true) => format!(" and {t} (TLS required)"),
            (t, false) => format!(" and {t}"),
        }
    );
    if let Some(e) = &endpoint {
        log::info!("snapblk daemon: metrics on http://{}/metrics", e.addr);
    }
    if let Some(sig) = signals.forever().next() {
        log::info!("snapblk daemon: signal {sig}, shutting down");
    }
    notifier.send("STOPPING=1\nSTATUS=shutting down: draining I/O, detaching devices");
    policies.stop();
    devices.restores.stop_all();
    if keep_devices {
        // As after a crash, but with everything acknowledged synced: the kernel holds
        // the devices' I/O until the next daemon recovers them (UBLK_F_USER_RECOVERY).
        let n = devices.count();
        pool.sync()
            .map_err(|e| DaemonError::from(e).context("final sync"))?;
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&nbd_socket);
        log::info!("snapblk daemon: {n} ublk device(s) left for the next daemon to recover");
        // SAFETY: _exit has no preconditions. It skips atexit handlers and C++ static
        // destructors on purpose: the queues still run and RocksDB is still open (its
        // writes are synced above), so the process must end the way a crash does, which
        // the kernel's user recovery is built for.
        unsafe { libc::_exit(0) }
    }
    devices.detach_all();
    let r = pool.shutdown();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&nbd_socket);
    r.map_err(|e| DaemonError::from(e).context("final sync"))?;
    drop(opened);
    // Connection threads may still hold the pool; everything is durable, so exit now.
    std::process::exit(0);
}

fn invalid<T>(message: String) -> Result<T> {
    Err(DaemonError::Invalid(message))
}

/// How TCP clients are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpAuth {
    /// Plain NBD: no encryption, no authentication.
    Plain,
    /// TLS without client certificates: encrypted, but any client may connect.
    TlsAnyClient,
    /// Mutual TLS: only clients with a certificate from `--tls-client-ca`.
    TlsClientCerts,
}

/// Refuses NBD over TCP on anything but loopback unless clients must authenticate (mutual
/// TLS) or `insecure` is set: plain NBD, and TLS without client certificates, let anyone
/// who can reach the address read and write every volume.
fn check_tcp_address(addr: &str, auth: TcpAuth, insecure: bool) -> Result<()> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| {
            DaemonError::Invalid(format!(
                "NBD TCP address {addr:?} (expected host:port or none): {e}"
            ))
        })?
        .collect();
    if auth == TcpAuth::TlsClientCerts {
        return Ok(());
    }
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        if auth == TcpAuth::TlsAnyClient && !insecure {
            return invalid(format!(
                "refusing to serve NBD over TLS on {a}, which is not a loopback address, without \
                 client authentication: TLS without --tls-client-ca encrypts the traffic but lets \
                 any client that can reach it read and write every volume; add --tls-client-ca \
                 (config: tls_client_ca) so clients must present a certificate, or pass --insecure \
                 (config: insecure = true) to do it anyway"
            ));
        }
        if auth == TcpAuth::TlsAnyClient {
            log::warn!("serving NBD over TLS on {a} without client certificates (--insecure)");
            return Ok(());
        }
        if !insecure {
            return invalid(format!(
                "refusing to serve NBD over plain TCP on {a}, which is not a loopback address: \
                 NBD has no authentication or encryption here, so anyone who can reach it could \
                 read and write every volume; use a loopback address or the Unix socket, require \
                 TLS (--tls-cert/--tls-key), or pass --insecure (config: insecure = true) to do \
                 it anyway"
            ));
        }
        log::warn!("serving NBD over plain TCP on {a} (--insecure)");
    }
    Ok(())
}

/// Moves the daemon into its own mount namespace with private propagation, so that
/// filesystems users mount on its ublk devices are never mounted in the daemon's namespace:
/// otherwise tearing that namespace down at exit would need I/O from the exiting daemon
/// (the deadlock libublk warns about). Needs root; without it, say so and go on.
fn private_mount_namespace() {
    // SAFETY: unshare and mount take no Rust-owned memory besides the static C strings,
    // which outlive the calls.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if !ok {
        log::warn!(
            "could not make a private mount namespace ({}); do not mount ublk devices in the daemon's namespace",
            std::io::Error::last_os_error()
        );
        return;
    }
    // A daemon restarted to recover devices copied the users' mounts of them into its new
    // namespace; those copies would keep each device open after the users unmount it, so
    // deleting it (detach) would wait forever. Drop them here (only in this namespace).
    for target in ublk_mounts(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
    {
        let Ok(c) = std::ffi::CString::new(target.clone()) else {
            continue;
        };
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            log::warn!(
                "could not drop the mount of a ublk device at {target} from the daemon's namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Mount points (deepest first) of filesystems on ublk block devices, from mountinfo.
fn ublk_mounts(mountinfo: &str) -> Vec<String> {
    let mut out: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            // Fields: id parent major:minor root mount-point options ... - fstype source ...
            let dash = f.iter().position(|x| *x == "-")?;
            let source = f.get(dash + 2)?;
            let target = f.get(4)?;
            source
                .starts_with("/dev/ublkb")
                .then(|| unescape_mountinfo(target))
        })
        .collect();
    out.sort_by_key(|t| std::cmp::Reverse(t.len()));
    out
}

/// mountinfo escapes space, tab, newline and backslash as \ooo (octal).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of what the daemon serves, for systemd's STATUS=.
fn status_line(pool: &Pool, devices: &Devices) -> String {
    let info = pool.info();
    let n = |k: u64, one: &str, many: &str| format!("{k} {}", if k == 1 { one } else { many });
    let devs = devices.count() as u64;
    format!(
        "{}, {}, {} attached, {} free",
        n(info.volumes as u64, "volume", "volumes"),
        n(info.snapshots as u64, "snapshot", "snapshots"),
        n(devs, "ublk device", "ublk devices"),
        snapblk_control::human::format_size(info.free)
    )
}

/// The `snapshot_cache` setting in bytes: the default when absent; 0, or 64 KiB to 64 GiB
/// (a smaller cache could not hold a page per shard: refused rather than silently off).
fn snapshot_cache_bytes(v: Option<&str>) -> Result<usize> {
    let bytes = match v {
        None => return Ok(snapblk_core::pool2::CONTENT_CACHE),
        Some(s) => snapblk_control::human::parse_size(s)
            .map_err(|e| DaemonError::Invalid(format!("snapshot_cache: {e}")))?,
    };
    if bytes != 0 && !(MIN_SNAPSHOT_CACHE..=MAX_SNAPSHOT_CACHE).contains(&bytes) {
        return invalid(format!(
            "snapshot_cache {} must be 0 (off) or between 64K and 64G",
            v.unwrap_or_default()
        ));
    }
    usize::try_from(bytes).map_err(|_| {
        DaemonError::Invalid(format!(
            "snapshot_cache {} does not fit this machine's address space",
            v.unwrap_or_default()
        ))
    })
}

/// The `snapshot_cache_disk` setting in bytes: the default when absent; 0, or 64 MiB to
/// 64 GiB.
fn snapshot_cache_disk_bytes(v: Option<&str>) -> Result<u64> {
    let bytes = match v {
        None => return Ok(snapblk_rocks::DERIVED),
        Some(s) => snapblk_control::human::parse_size(s)
            .map_err(|e| DaemonError::Invalid(format!("snapshot_cache_disk: {e}")))?,
    };
    if bytes != 0 && !(MIN_SNAPSHOT_CACHE_DISK..=MAX_SNAPSHOT_CACHE_DISK).contains(&bytes) {
        return invalid(format!(
            "snapshot_cache_disk {} must be 0 (off) or between 64M and 64G",
            v.unwrap_or_default()
        ));
    }
    Ok(bytes)
}

/// The `data_cache` setting: how data I/O uses the host page cache.
fn data_cache_mode(v: Option<&str>) -> Result<DataCache> {
    match v.unwrap_or("reads") {
        "none" => Ok(DataCache::None),
        "reads" => Ok(DataCache::Reads),
        "host" => Ok(DataCache::Host),
        other => invalid(format!(
            "data_cache must be \"none\", \"reads\" or \"host\", not {other:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_cache_disk_is_a_bounded_size() {
        assert_eq!(
            snapshot_cache_disk_bytes(None).unwrap(),
            snapblk_rocks::DERIVED
        );
        assert_eq!(snapshot_cache_disk_bytes(Some("0")).unwrap(), 0);
        assert_eq!(snapshot_cache_disk_bytes(Some("64M")).unwrap(), 64 << 20);
        assert_eq!(snapshot_cache_disk_bytes(Some("64G")).unwrap(), 64 << 30);
        for bad in ["1M", "65G", "16T", "lots", "-1G"] {
            let e = snapshot_cache_disk_bytes(Some(bad))
                .unwrap_err()
                .to_string();
            assert!(e.contains("snapshot_cache_disk"), "{bad}: {e}");
        }
    }

    #[test]
    fn snapshot_cache_is_a_bounded_size() {
        assert_eq!(
            snapshot_cache_bytes(None).unwrap(),
            snapblk_core::pool2::CONTENT_CACHE
        );
        assert_eq!(snapshot_cache_bytes(Some("0")).unwrap(), 0);
        assert_eq!(snapshot_cache_bytes(Some("256M")).unwrap(), 256 << 20);
        assert_eq!(snapshot_cache_bytes(Some("64G")).unwrap(), 64 << 30);
        assert_eq!(snapshot_cache_bytes(Some("64K")).unwrap(), 64 << 10);
        for bad in [
            "65G",
            "1T",
            "lots",
            "-1",
            "99999999999999999999",
            "1",
            "63K",
        ] {
            let e = snapshot_cache_bytes(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("snapshot_cache"), "{bad}: {e}");
        }
        // The smallest accepted size turns the cache on.
        let c = snapblk_core::v2::cache::ContentCache::new(MIN_SNAPSHOT_CACHE as usize);
        assert!(c.enabled());
    }

    #[test]
    fn data_cache_is_none_reads_or_host() {
        assert_eq!(data_cache_mode(None).unwrap(), DataCache::Reads);
        assert_eq!(data_cache_mode(Some("none")).unwrap(), DataCache::None);
        assert_eq!(data_cache_mode(Some("reads")).unwrap(), DataCache::Reads);
        assert_eq!(data_cache_mode(Some("host")).unwrap(), DataCache::Host);
        for bad in ["Host", "writeback", "", "read"] {
            let e = data_cache_mode(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("data_cache"), "{bad}: {e}");
        }
    }

    #[test]
    fn finds_ublk_mounts_deepest_first() {
        let mi = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                  40 22 259:0 / /mnt/a rw,relatime - ext4 /dev/ublkb0 rw\n\
                  41 40 259:1 / /mnt/a/b\\040c rw - xfs /dev/ublkb1 rw\n\
                  42 22 7:0 / /mnt/loop rw - ext4 /dev/loop0 rw\n";
        assert_eq!(
            ublk_mounts(mi),
            vec!["/mnt/a/b c".to_string(), "/mnt/a".to_string()]
        );
    }
}
