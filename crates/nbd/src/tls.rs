//! TLS for NBD over TCP (NBD_OPT_STARTTLS), with rustls.
//!
//! A listener with TLS configured requires it: before STARTTLS a client may only ABORT
//! (every other option gets NBD_REP_ERR_TLS_REQD, see `handshake.rs`). After the ACK the
//! TLS handshake runs on the socket, then option haggling starts again over the encrypted
//! stream and transmission follows as usual.
//!
//! Threading: the NBD code reads and writes a connection from different threads (the
//! connection thread reads requests, workers write replies), while a rustls connection is
//! one state machine. [`start`] therefore hands the NBD code one end of a socket pair and
//! runs two pump threads on the other: `nbd-tls-rx` (socket -> decrypt -> NBD) and
//! `nbd-tls-tx` (NBD -> encrypt -> socket). Both use the rustls state under one mutex; see
//! [`Shared`] for how records keep their order without a blocked socket write stalling the
//! other direction. Either side closing ends both pumps: the peer's close or a TLS error
//! gives the NBD reader end-of-file; the NBD side closing sends close_notify.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

/// Option haggling before STARTTLS and the TLS handshake each must finish within this (a
/// client that stalls must not hold a thread forever).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {why}", path.display())]
    File { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The server side of TLS: certificate chain and key (PEM), and optionally the CA whose
/// client certificates are required (mutual TLS; without it any client may connect).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| file_err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// The rustls state (one state machine for both directions) and the socket's write side.
/// Lock order: `conn`, then `out`. Records are taken from rustls under `conn` and `out` is
/// locked before `conn` is released, so records reach the socket in the order rustls made
/// them, while a blocked socket write (a client not reading yet) never stops the other
/// direction from decrypting.
struct Shared {
    conn: Mutex<ServerConnection>,
    out: Mutex<TcpStream>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends whatever encrypted records rustls has queued; releases `conn` before writing.
fn send_queued(shared: &Shared, mut conn: MutexGuard<'_, ServerConnection>) -> io::Result<()> {
    let mut records = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut records)?;
    }
    if records.is_empty() {
        return Ok(());
    }
    let mut out = lock(&shared.out);
    drop(conn);
    out.write_all(&records)
}

/// Runs the TLS handshake on `tcp` and starts the pumps; returns the plaintext end for
/// the NBD code.
pub(crate) fn start(mut tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<UnixStream> {
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    while conn.is_handshaking() {
        // One deadline for the whole handshake, however slowly the client trickles bytes.
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake: timed out"))?;
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))?;
        if let Err(e) = conn.complete_io(&mut tcp) {
            // Tell the client why (a TLS alert), if rustls has one queued.
            while conn.wants_write() && conn.write_tls(&mut tcp).is_ok() {}
            return Err(io::Error::new(e.kind(), format!("TLS handshake: {e}")));
        }
    }
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    // The client's first options may have arrived with its last handshake message: rustls
    // holds them already, and no more socket data may come until they are answered.
    let mut early = Vec::new();
    let st = conn.process_new_packets().map_err(io::Error::other)?;
    if st.plaintext_bytes_to_read() > 0 {
        early.resize(st.plaintext_bytes_to_read(), 0);
        conn.reader().read_exact(&mut early)?;
    }
    let (app, pump) = UnixStream::pair()?;
    let rx_tcp = tcp.try_clone()?;
    let tx_pump = pump.try_clone()?;
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        out: Mutex::new(tcp),
    });
    let s2 = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("nbd-tls-rx".into())
        .spawn(move || receive(rx_tcp, &shared, pump, early))?;
    std::thread::Builder::new()
        .name("nbd-tls-tx".into())
        .spawn(move || transmit(tx_pump, &s2))?;
    Ok(app)
}

/// Socket -> rustls -> NBD, until the peer closes or TLS fails.
fn receive(mut tcp: TcpStream, shared: &Shared, mut app: UnixStream, early: Vec<u8>) {
    if app.write_all(&early).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 << 10];
    'outer: loop {
        let n = match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut plain = Vec::new();
        let mut closed = false;
        let mut conn = lock(&shared.conn);
        let mut input = &buf[..n];
        while !input.is_empty() {
            match conn.read_tls(&mut input) {
                // Ok(0): rustls takes nothing more after the peer's close_notify.
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
            }
            match conn.process_new_packets() {
                Ok(st) => {
                    let k = st.plaintext_bytes_to_read();
                    if k > 0 {
                        let start = plain.len();
                        plain.resize(start + k, 0);
                        if conn.reader().read_exact(&mut plain[start..]).is_err() {
                            break 'outer;
                        }
                    }
                    if st.peer_has_closed() {
                        closed = true;
                        break;
                    }
                }
                Err(e) => {
                    log::info!("nbd TLS: {e}");
                    let _ = send_queued(shared, conn);
                    // A broken session: end both directions (the transmit pump wakes).
                    let _ = lock(&shared.out).shutdown(Shutdown::Both);
                    break 'outer;
                }
            }
        }
        if send_queued(shared, conn).is_err() {
            break;
        }
        if !plain.is_empty() && app.write_all(&plain).is_err() {
            break;
        }
        if closed {
            break;
        }
    }
    // End of file for the NBD reader; the transmit pump ends when the NBD side closes.
    let _ = app.shutdown(Shutdown::Write);
}

/// NBD -> rustls -> socket, until the NBD side closes; then close_notify.
fn transmit(mut app: UnixStream, shared: &Shared) {
    let mut buf = vec![0u8; 64 << 10];
    'outer: loop {
        let n = match app.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let mut conn = lock(&shared.conn);
            match conn.writer().write(rest) {
                Ok(0) if !conn.wants_write() => break 'outer,
                Ok(k) => rest = &rest[k..],
                Err(_) => break 'outer,
            }
            if send_queued(shared, conn).is_err() {
                break 'outer;
            }
        }
    }
    let mut conn = lock(&shared.conn);
    conn.send_close_notify();
    let _ = send_queued(shared, conn);
    let _ = lock(&shared.out).shutdown(Shutdown::Both);
    // Whatever still reads or writes the NBD end fails at once instead of waiting on a
    // pair nobody serves (the receive pump holds the other handle of this end).
    let _ = app.shutdown(Shutdown::Both);
}
