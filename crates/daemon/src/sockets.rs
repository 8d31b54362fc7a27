//! Unix sockets the daemon listens on (control, NBD): created with their final owner and
//! mode before anyone can reach them.
//!
//! A socket is bound inside a fresh directory only root can enter (mode 0700), given its
//! mode and group there, and then renamed into place: a client can only ever connect to a
//! socket that already has its final permissions (binding in place and then chmod'ing
//! leaves a window in which the umask's permissions apply and a connection is queued).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::error::{DaemonError, Result};

/// Binds a Unix socket at `path` with `mode` (and group `gid`, if given), replacing a stale
/// socket file but refusing to steal one that a live process still answers on.
pub fn bind_unix(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(DaemonError::io(format!("creating {}", dir.display())))?;
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::InUse(format!(
                "{} is in use by another running process",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(DaemonError::io(format!(
            "removing stale socket {}",
            path.display()
        )))?;
    }
    let name = path
        .file_name()
        .ok_or_else(|| DaemonError::Invalid(format!("{} names no socket file", path.display())))?;
    let private = dir.join(format!(
        ".{}.bind-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(DaemonError::io(format!("creating {}", private.display())))?;
    let staged = private.join("s");
    let r = (|| -> Result<UnixListener> {
        let l = UnixListener::bind(&staged)
            .map_err(DaemonError::io(format!("binding {}", path.display())))?;
        if let Some(g) = gid {
            std::os::unix::fs::chown(&staged, None, Some(g)).map_err(DaemonError::io(format!(
                "giving {} to group {g}",
                path.display()
            )))?;
        }
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).map_err(
            DaemonError::io(format!("setting the mode of {}", path.display())),
        )?;
        std::fs::rename(&staged, path).map_err(DaemonError::io(format!(
            "moving the socket to {}",
            path.display()
        )))?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&private);
    r
}

/// A group's id from its name (or a number).
pub fn group_id(name: &str) -> Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let cname = std::ffi::CString::new(name)
        .map_err(|_| DaemonError::Invalid(format!("group name {name:?} holds a NUL byte")))?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: an all-zero `group` is a valid value of this plain C struct; getgrnam_r only
    // writes into it and into `buf` (whose length we pass), and `result` points at `grp`
    // or is null when it returns.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `cname` is NUL-terminated and lives
    // across it, `grp`, `buf` (with its true length) and `result` are ours.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        return Err(DaemonError::Io {
            what: format!("looking up group {name:?}"),
            error: std::io::Error::from_raw_os_error(rc),
        });
    }
    if result.is_null() {
        return Err(DaemonError::NotFound(format!(
            "no group named {name:?} (--nbd-group)"
        )));
    }
    Ok(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_appears_with_its_final_mode() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("x.sock");
        let _l = bind_unix(&p, 0o600, None).expect("bind");
        let m = std::fs::metadata(&p).expect("stat").permissions().mode();
        assert_eq!(m & 0o777, 0o600);
        assert!(
            bind_unix(&p, 0o600, None).is_err(),
            "a live socket is not stolen"
        );
        let left: Vec<_> = std::fs::read_dir(d.path()).expect("ls").collect();
        assert_eq!(left.len(), 1, "no staging directory left behind");
    }

    #[test]
    fn groups_resolve_by_name_and_number() {
        assert_eq!(group_id("0").expect("gid"), 0);
        assert_eq!(group_id("root").expect("root group"), 0);
        assert!(group_id("no-such-group-snapblk").is_err());
    }
}
