//! The transmission phase. Threading (as nbdkit does it): one thread per connection reads
//! requests (and WRITE payloads) in order and hands them to that connection's own workers,
//! which execute them and write each reply whole under the connection's writer mutex, so
//! replies may complete out of order (as NBD allows) but never interleave.
//!
//! Writes on a plain socket are the exception: the worker writes the data and goes on to
//! its next request; the reply is sent by the pool's committer thread once the write's
//! metadata group commits (`Export::write_then`), which saves each write a sleep and a
//! wake-up. That thread serves every volume, so it never blocks on a socket
//! (`Conn::send_nowait`: MSG_DONTWAIT, and only when it gets the writer mutex at once);
//! what it cannot send goes to the connection's `late` queue, which the next worker reply
//! or the connection's flusher thread sends first. A client that stops reading its
//! replies therefore stalls only its own connection. On TLS (and on a caller's own
//! stream) a write's worker waits for the commit and replies itself.
//!
//! A per-connection budget (bytes and requests, counted until the reply is written)
//! bounds the memory held by requests in flight, and `admission` bounds how many
//! connections are served at once, so the whole server holds at most `max_connections` x
//! `CONN_BUDGET` of payload. A connection ends only once every reply it owes was sent.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use snapblk_core::device::AlignedBuf;
use snapblk_core::export::{IoKind, IoMeter};
use snapblk_core::{Export, ExportProvider};

use crate::admission::{Admission, Slot, DEFAULT_MAX_CONNECTIONS};
use crate::codec::{self, Request};
use crate::handshake::{negotiate, Session};
use crate::proto::*;

/// Payload bytes one connection may hold in flight.
pub const CONN_BUDGET: u64 = 64 << 20;

/// A client must finish option haggling (or, on a TLS listener, reach STARTTLS) within
/// this, or it is disconnected: an idle half-open connection must not hold a thread.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Server {
    provider: Arc<dyn ExportProvider>,
    workers: usize,
    handshake_timeout: Duration,
    admission: Arc<Admission>,
    /// TLS for TCP connections (then required there); Unix sockets stay plain.
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ServerConfig>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Maps an errno from the volume API to the NBD error set.
pub fn nbd_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC => ENOSPC,
        libc::ENOMEM => ENOMEM,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Requests one connection may have in flight.
const CONN_MAX_REQUESTS: usize = 256;
/// Room before a read reply's data for its header: the data then starts block-aligned.
const REPLY_PAD: usize = snapblk_core::device::BLOCK_SIZE;
/// Read replies up to this size reuse their worker's buffer (16 workers: 16 MiB per busy
/// connection at most); larger ones get a buffer of their own.
const REPLY_KEEP: usize = REPLY_PAD + (1 << 20);

/// A worker's read-reply buffer, reused from request to request: a fresh 1 MiB allocation
/// per read cost page faults and zeroing (a third of the daemon's time in 1 MiB reads). The
/// reply is sent before the next request is taken, and every read fills its whole range,
/// so what a buffer held before never reaches the client.
#[derive(Default)]
struct ReplyBuf {
    kept: Option<AlignedBuf>,
    big: Option<AlignedBuf>,
}

impl ReplyBuf {
    /// A block-aligned buffer of at least `len` bytes, sliced to `len`.
    fn get(&mut self, len: usize) -> &mut [u8] {
        if len > REPLY_KEEP {
            return &mut self.big.insert(AlignedBuf::zeroed(len))[..];
        }
        self.big = None;
        let buf = self
            .kept
            .get_or_insert_with(|| AlignedBuf::zeroed(REPLY_KEEP));
        &mut buf[..len]
    }
}

struct Conn {
    writer: Mutex<Box<dyn Write + Send>>,
    /// Set after a failed write: later replies are dropped (the client is gone).
    broken: AtomicBool,
    budget: Budget,
    /// The socket once more, for replies sent without blocking ([`Conn::send_nowait`]).
    /// `None` (TLS, or a caller's own stream): a write's worker waits for its commit and
    /// replies itself.
    nowait: Option<OwnedFd>,
    /// Replies (or a reply's unsent tail) that could not go out without blocking, in
    /// order: the next sender, or the connection's flusher thread, sends them first.
    late: Mutex<Late>,
    late_cv: Condvar,
}

/// Replies waiting for the socket, each with the budget bytes it releases once sent.
#[derive(Default)]
struct Late {
    queue: VecDeque<(Vec<u8>, u64)>,
    /// Set when the connection ends: the flusher exits once the queue is empty.
    stop: bool,
}

/// (payload bytes in flight, requests in flight); a request counts until its reply has been
/// written.
struct Budget {
    inflight: Mutex<(u64, usize)>,
    cv: Condvar,
}

impl Conn {
    fn new(writer: Box<dyn Write + Send>, nowait: Option<OwnedFd>) -> Conn {
        Conn {
            writer: Mutex::new(writer),
            broken: AtomicBool::new(false),
            budget: Budget {
                inflight: Mutex::new((0, 0)),
                cv: Condvar::new(),
            },
            nowait,
            late: Mutex::new(Late::default()),
            late_cv: Condvar::new(),
        }
    }

    /// Sends a reply whole, blocking while the socket is full (a worker's replies).
    fn send(&self, bytes: u64, parts: &[&[u8]]) {
        {
            let mut w = lock(&self.writer);
            self.send_late(&mut w);
            if !self.broken.load(Ordering::Acquire) {
                let r = parts
                    .iter()
                    .try_for_each(|p| w.write_all(p))
                    .and_then(|()| w.flush());
                if let Err(e) = r {
                    log::debug!("nbd: reply not sent: {e}");
                    self.broken.store(true, Ordering::Release);
                }
            }
        }
        self.budget.done(bytes);
    }

    /// Sends the replies that wait in `late`, with the writer held (so no other reply
    /// starts meanwhile; one queued there may be the tail of a reply already begun).
    fn send_late(&self, w: &mut Box<dyn Write + Send>) {
        loop {
            let queued = std::mem::take(&mut lock(&self.late).queue);
            if queued.is_empty() {
                return;
            }
            for (msg, bytes) in queued {
                if !self.broken.load(Ordering::Acquire) {
                    if let Err(e) = w.write_all(&msg).and_then(|()| w.flush()) {
                        log::debug!("nbd: reply not sent: {e}");
                        self.broken.store(true, Ordering::Release);
                    }
                }
                self.budget.done(bytes);
            }
        }
    }

    /// Sends a reply without ever blocking (from the pool's committer thread, which
    /// serves every volume: a client that stops reading must stall only itself). When
    /// the writer is busy, earlier replies wait, or the socket is full, the reply (or its
    /// unsent tail) joins `late` for the flusher.
    fn send_nowait(&self, bytes: u64, msg: &[u8]) {
        let Some(fd) = &self.nowait else {
            return self.send(bytes, &[msg]);
        };
        let writer = match self.writer.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let mut late = lock(&self.late);
        let mut at = 0;
        if writer.is_some() && late.queue.is_empty() {
            if self.broken.load(Ordering::Acquire) {
                drop((late, writer));
                return self.budget.done(bytes);
            }
            let sock = socket2::SockRef::from(fd);
            while at < msg.len() {
                match sock.send_with_flags(&msg[at..], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
                    Ok(n) => at += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::debug!("nbd: reply not sent: {e}");
                        self.broken.store(true, Ordering::Release);
                        at = msg.len();
                    }
                }
            }
            if at == msg.len() {
                drop((late, writer));
                return self.budget.done(bytes);
            }
        }
        late.queue.push_back((msg[at..].to_vec(), bytes));
        drop((late, writer));
        self.late_cv.notify_one();
    }

    /// The connection's flusher: sends what `send_nowait` left in `late` until the
    /// connection ends.
    fn flusher(&self) {
        loop {
            {
                let mut late = lock(&self.late);
                while late.queue.is_empty() && !late.stop {
                    late = self.late_cv.wait(late).unwrap_or_else(|p| p.into_inner());
                }
                if late.queue.is_empty() {
                    return;
                }
            }
            let mut w = lock(&self.writer);
            self.send_late(&mut w);
        }
    }

    fn stop_flusher(&self) {
        lock(&self.late).stop = true;
        self.late_cv.notify_all();
    }
}

/// Stops the connection's flusher when dropped.
struct StopFlusher<'a>(&'a Conn);

impl Drop for StopFlusher<'_> {
    fn drop(&mut self) {
        self.0.stop_flusher();
    }
}

impl Budget {
    fn admit(&self, bytes: u64) {
        let mut g = lock(&self.inflight);
        while g.1 > 0 && (g.0 + bytes > CONN_BUDGET || g.1 >= CONN_MAX_REQUESTS) {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.0 += bytes;
        g.1 += 1;
    }

    fn done(&self, bytes: u64) {
        let mut g = lock(&self.inflight);
        g.0 -= bytes;
        g.1 -= 1;
        self.cv.notify_all();
    }

    /// Waits until every admitted request has been answered.
    fn drain(&self) {
        let mut g = lock(&self.inflight);
        while g.1 > 0 {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

struct Duplex<R, W> {
    r: R,
    w: W,
}
impl<R: Read, W> Read for Duplex<R, W> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.r.read(b)
    }
}
impl<R, W: Write> Write for Duplex<R, W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.w.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl Server {
    /// A server whose connections each get `workers` threads executing their requests.
    pub fn new(provider: Arc<dyn ExportProvider>, workers: usize) -> io::Result<Arc<Server>> {
        Ok(Arc::new(Server {
            provider,
            workers: workers.max(1),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            admission: Admission::new(DEFAULT_MAX_CONNECTIONS),
            #[cfg(feature = "tls")]
            tls: None,
        }))
    }

    /// How many connections are served at once and how many were refused.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Like [`Server::new`], with TLS required on TCP connections.
    #[cfg(feature = "tls")]
    pub fn with_tls(
        provider: Arc<dyn ExportProvider>,
        workers: usize,
        tls: Arc<rustls::ServerConfig>,
    ) -> io::Result<Arc<Server>> {
        Ok(Arc::new(Server {
            provider,
            workers: workers.max(1),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            admission: Admission::new(DEFAULT_MAX_CONNECTIONS),
            tls: Some(tls),
        }))
    }

    /// Serves one TCP connection that must switch to TLS (STARTTLS) before it may choose an
    /// export.
    #[cfg(feature = "tls")]
    fn serve_tls(&self, mut tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
        use crate::handshake::{greet, haggle, Outcome, TlsState};
        // A client must get to STARTTLS promptly; afterwards the session has no timeout.
        tcp.set_read_timeout(Some(self.handshake_timeout))?;
        let g = greet(&mut tcp)?;
        if !g.fixed {
            // Without fixed newstyle the client cannot negotiate TLS (NOTLS mode only).
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "client without fixed newstyle on a TLS-only listener",
            ));
        }
        match haggle(&mut tcp, &*self.provider, g.no_zeroes, TlsState::Required)? {
            Outcome::StartTls => {}
            Outcome::Done => return Ok(()),
            Outcome::Session(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "export chosen without TLS on a TLS-only listener",
                ))
            }
        }
        let mut app = crate::tls::start(tcp, config)?;
        match haggle(&mut app, &*self.provider, g.no_zeroes, TlsState::Active)? {
            Outcome::Session(session) => {
                let writer = app.try_clone()?;
                self.transmit(session, app, Box::new(writer), None)
            }
            Outcome::StartTls | Outcome::Done => Ok(()),
        }
    }

    /// Serves one socket connection: the handshake must finish within the handshake
    /// timeout; transmission then has none (clients may idle between requests).
    fn serve_socket<S: Stream>(&self, s: S) -> io::Result<()> {
        s.read_timeout(Some(self.handshake_timeout))?;
        let writer = s.clone_stream()?;
        let nowait = Some(s.clone_stream()?.into());
        let mut d = Duplex {
            r: s,
            w: Box::new(writer) as Box<dyn Write + Send>,
        };
        let Some(session) = negotiate(&mut d, &*self.provider)? else {
            return Ok(());
        };
        d.r.read_timeout(None)?;
        self.transmit(session, d.r, d.w, nowait)
    }

    /// Serves one connection to the end: handshake, then requests until NBD_CMD_DISC or
    /// the client goes away. In-flight requests finish before this returns.
    pub fn serve(&self, reader: impl Read, writer: Box<dyn Write + Send>) -> io::Result<()> {
        let mut d = Duplex {
            r: reader,
            w: writer,
        };
        let Some(session) = negotiate(&mut d, &*self.provider)? else {
            return Ok(());
        };
        self.transmit(session, d.r, d.w, None)
    }

    /// The transmission phase of a negotiated connection; in-flight requests finish before
    /// this returns.
    fn transmit(
        &self,
        session: Session,
        mut reader: impl Read,
        writer: Box<dyn Write + Send>,
        nowait: Option<OwnedFd>,
    ) -> io::Result<()> {
        let conn = Arc::new(Conn::new(writer, nowait));
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        std::thread::scope(|scope| {
            let mut workers = Vec::with_capacity(self.workers);
            for i in 0..self.workers {
                let rx = rx.clone();
                let (conn, session) = (&conn, &session);
                let spawned = std::thread::Builder::new()
                    .name(format!("nbd-worker-{i}"))
                    .spawn_scoped(scope, move || {
                        let mut reply = ReplyBuf::default();
                        for (req, payload, bytes, arrived) in rx {
                            let (kind, len) = (io_kind(req.command), u64::from(req.length));
                            let job = (req, payload, bytes, arrived);
                            // `None`: the reply (and its report) comes later.
                            let Some(ok) = handle(conn, session, job, &mut reply) else {
                                continue;
                            };
                            if let (Some(m), Some(kind)) = (session.export.meter(), kind) {
                                m.record(kind, len, arrived.elapsed(), ok);
                            }
                        }
                    });
                match spawned {
                    Ok(h) => workers.push(h),
                    Err(e) if i == 0 => return Err(e),
                    Err(_) => break,
                }
            }
            let flusher = std::thread::Builder::new()
                .name("nbd-flusher".into())
                .spawn_scoped(scope, || conn.flusher());
            let flusher = match flusher {
                Ok(h) => h,
                Err(e) => {
                    drop(tx);
                    for h in workers {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            };
            // Dropped also while a panic unwinds: the scope would wait for the flusher.
            let stop = StopFlusher(&conn);
            let r = self.transmission(&mut reader, &conn, &tx);
            // Closing the queue ends the workers once they have drained it. Joining them
            // here (rather than leaving it to the scope) waits until each thread has fully
            // exited, so nothing of the connection outlives this call.
            drop(tx);
            for h in workers {
                if let Err(panic) = h.join() {
                    std::panic::resume_unwind(panic);
                }
            }
            // Writes answered after their commit still hold the connection.
            conn.budget.drain();
            drop(stop);
            if let Err(panic) = flusher.join() {
                std::panic::resume_unwind(panic);
            }
            r
        })
    }

    fn transmission(
        &self,
        reader: &mut impl Read,
        conn: &Conn,
        jobs: &Sender<Job>,
    ) -> io::Result<()> {
        loop {
            let mut hdr = [0u8; codec::REQUEST_LEN];
            match reader.read_exact(&mut hdr) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let req = codec::parse_request(&hdr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("request: {e}")))?;
            // Block-aligned: the pool writes whole blocks from it without copying them.
            let mut payload = AlignedBuf::zeroed(0);
            if req.command == CMD_WRITE {
                if req.length > MAX_PAYLOAD {
                    // The payload cannot be skipped safely; say why, then hang up.
                    conn.budget.admit(0);
                    conn.send(0, &[&codec::simple_reply(EOVERFLOW, req.cookie)]);
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("write of {} bytes", req.length),
                    ));
                }
                payload = AlignedBuf::zeroed(req.length as usize);
                reader.read_exact(&mut payload)?;
            }
            if req.command == CMD_DISC {
                return Ok(());
            }
            let bytes = match req.command {
                CMD_READ | CMD_WRITE => u64::from(req.length),
                _ => 0,
            };
            let arrived = Instant::now();
            conn.budget.admit(bytes);
            if jobs.send((req, payload, bytes, arrived)).is_err() {
                conn.budget.done(bytes);
                return Err(io::Error::other("connection workers stopped"));
            }
        }
    }
}

/// A request queued for the connection's workers: the request, its payload, the bytes of
/// budget it holds, and when it arrived (for the export's meter).
type Job = (Request, AlignedBuf, u64, Instant);

/// What a command is, for the export's meter (`None`: not metered: cache, block status).
fn io_kind(command: u16) -> Option<IoKind> {
    match command {
        CMD_READ => Some(IoKind::Read),
        CMD_WRITE => Some(IoKind::Write),
        CMD_FLUSH => Some(IoKind::Flush),
        CMD_TRIM => Some(IoKind::Trim),
        CMD_WRITE_ZEROES => Some(IoKind::WriteZeroes),
        _ => None,
    }
}

/// Queues an error reply; returns false (the request failed).
fn error_reply(
    conn: &Conn,
    session: &Session,
    req: &Request,
    bytes: u64,
    err: u32,
    msg: &str,
) -> bool {
    let structured_cmd = matches!(req.command, CMD_READ | CMD_BLOCK_STATUS);
    if session.structured && structured_cmd {
        conn.send(bytes, &[&codec::error_chunk(req.cookie, err, msg)]);
    } else {
        conn.send(bytes, &[&codec::simple_reply(err, req.cookie)]);
    }
    false
}

/// Executes one request and queues exactly one reply (which releases `bytes` of budget);
/// returns whether it succeeded, or `None` for a write whose reply (and report to the
/// export's meter) is sent once it commits (`Export::write_then`).
fn handle(conn: &Arc<Conn>, session: &Session, job: Job, reply: &mut ReplyBuf) -> Option<bool> {
    let (req, payload, bytes, arrived) = job;
    let export: &dyn Export = &*session.export;
    if req.flags & !CMD_FLAGS_KNOWN != 0 {
        return Some(error_reply(
            conn,
            session,
            &req,
            bytes,
            EINVAL,
            "unknown command flags",
        ));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    if req.command == CMD_WRITE && conn.nowait.is_some() {
        let answer = WriteReply {
            conn: Some(Arc::clone(conn)),
            meter: export.meter(),
            name: export.name().to_string(),
            cookie: req.cookie,
            off: req.offset,
            len: u64::from(req.length),
            bytes,
            arrived,
        };
        export.write_then(req.offset, &payload, fua, Box::new(move |r| answer.send(r)));
        return None;
    }
    Some(handle_sync(conn, session, req, &payload, bytes, fua, reply))
}

/// The reply of a write answered after its commit, sent exactly once: with the write's
/// outcome, or with EIO if the callback holding it is dropped uncalled (a committer that
/// panicked or stopped), so the connection never waits for it forever.
struct WriteReply {
    conn: Option<Arc<Conn>>,
    meter: Option<Arc<dyn IoMeter>>,
    name: String,
    cookie: u64,
    off: u64,
    len: u64,
    bytes: u64,
    arrived: Instant,
}

impl WriteReply {
    fn send(mut self, r: snapblk_core::Result<()>) {
        let err = match r {
            Ok(()) => 0,
            Err(e) => {
                log::debug!("nbd {}: write at {}+{}: {e}", self.name, self.off, self.len);
                nbd_error(e.errno())
            }
        };
        self.finish(err);
    }

    fn finish(&mut self, err: u32) {
        let Some(conn) = self.conn.take() else { return };
        // Recorded before the reply: once the last reply is out the connection may end,
        // and its requests should all be counted by then.
        if let Some(m) = &self.meter {
            m.record(IoKind::Write, self.len, self.arrived.elapsed(), err == 0);
        }
        conn.send_nowait(self.bytes, &codec::simple_reply(err, self.cookie));
    }
}

impl Drop for WriteReply {
    fn drop(&mut self) {
        if self.conn.is_some() {
            log::error!("nbd {}: a write's answer was lost; failing it", self.name);
            self.finish(EIO);
        }
    }
}

/// Executes a request other than a write; see [`handle`].
fn handle_sync(
    conn: &Conn,
    session: &Session,
    req: Request,
    payload: &[u8],
    bytes: u64,
    fua: bool,
    reply: &mut ReplyBuf,
) -> bool {
    let export: &dyn Export = &*session.export;
    let (off, len) = (req.offset, u64::from(req.length));
    let result = match req.command {
        CMD_READ => {
            if req.length > MAX_PAYLOAD {
                return error_reply(
                    conn,
                    session,
                    &req,
                    bytes,
                    EINVAL,
                    "read larger than the maximum block size",
                );
            }
            // The reply header and the data share one buffer: the data is read in place, at a
            // block-aligned address so that the pool's device reads go straight into it.
            let hdr = if session.structured { 28 } else { 16 };
            let buf = &mut reply.get(REPLY_PAD + req.length as usize)[REPLY_PAD - hdr..];
            match export.read(off, &mut buf[hdr..]) {
                Ok(()) if req.length == 0 && session.structured => {
                    conn.send(
                        bytes,
                        &[&codec::chunk_header(
                            REPLY_FLAG_DONE,
                            REPLY_TYPE_NONE,
                            req.cookie,
                            0,
                        )],
                    );
                    return true;
                }
                Ok(()) => {
                    if session.structured {
                        let h = codec::chunk_header(
                            REPLY_FLAG_DONE,
                            REPLY_TYPE_OFFSET_DATA,
                            req.cookie,
                            req.length + 8,
                        );
                        buf[..20].copy_from_slice(&h);
                        buf[20..28].copy_from_slice(&off.to_be_bytes());
                    } else {
                        buf[..16].copy_from_slice(&codec::simple_reply(0, req.cookie));
                    }
                    conn.send(bytes, &[buf]);
                    return true;
                }
                Err(e) => Err(e),
            }
        }
        CMD_WRITE => export.write(off, payload, fua),
        CMD_FLUSH => export.flush(),
        CMD_TRIM => export.trim(off, len, fua),
        CMD_WRITE_ZEROES => export.write_zeroes(off, len, fua, req.flags & CMD_FLAG_FAST_ZERO != 0),
        CMD_CACHE => export.size().and_then(|size| match off.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(snapblk_core::Error::OutOfRange {
                offset: off,
                len,
                size,
            }),
        }),
        CMD_BLOCK_STATUS => {
            if !session.structured || !session.allocation_context {
                return error_reply(
                    conn,
                    session,
                    &req,
                    bytes,
                    EINVAL,
                    "base:allocation was not negotiated",
                );
            }
            match export.block_status(off, len) {
                Ok(runs) => {
                    let mut descs: Vec<(u32, u32)> = runs
                        .into_iter()
                        .filter(|(l, _)| *l > 0)
                        .map(|(l, f)| (l.min(u64::from(u32::MAX) & !4095) as u32, f))
                        .collect();
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        descs.truncate(1);
                    }
                    if descs.is_empty() {
                        return error_reply(conn, session, &req, bytes, EINVAL, "empty range");
                    }
                    conn.send(
                        bytes,
                        &[&codec::block_status_chunk(
                            req.cookie,
                            BASE_ALLOCATION_ID,
                            &descs,
                        )],
                    );
                    return true;
                }
                Err(e) => Err(e),
            }
        }
        other => {
            return error_reply(
                conn,
                session,
                &req,
                bytes,
                EINVAL,
                &format!("unknown command {other}"),
            );
        }
    };
    match result {
        Ok(()) => {
            conn.send(bytes, &[&codec::simple_reply(0, req.cookie)]);
            true
        }
        Err(e) => {
            log::debug!(
                "nbd {}: command {} at {off}+{len}: {e}",
                export.name(),
                req.command
            );
            error_reply(
                conn,
                session,
                &req,
                bytes,
                nbd_error(e.errno()),
                &e.to_string(),
            )
        }
    }
}

/// Accepts connections on a Unix socket forever, one thread per admitted connection.
pub fn serve_unix(server: Arc<Server>, listener: UnixListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let Some(slot) = server.admission.try_enter("the Unix socket") else {
                    continue;
                };
                spawn_conn(&server, s, slot)
            }
            Err(e) => log::warn!("nbd accept (unix): {e}"),
        }
    }
}

/// Accepts connections on a TCP socket forever, one thread per admitted connection.
pub fn serve_tcp(server: Arc<Server>, listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let peer = s
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "an unknown peer".into());
                let Some(slot) = server.admission.try_enter(&peer) else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                #[cfg(feature = "tls")]
                if let Some(config) = &server.tls {
                    let (server, config) = (Arc::clone(&server), Arc::clone(config));
                    let r = std::thread::Builder::new()
                        .name("nbd-conn".into())
                        .spawn(move || {
                            let _slot = slot;
                            if let Err(e) = server.serve_tls(s, config) {
                                log::info!("nbd TLS connection ended: {e}");
                            }
                        });
                    if let Err(e) = r {
                        log::warn!("nbd: cannot start connection thread: {e}");
                    }
                    continue;
                }
                spawn_conn(&server, s, slot)
            }
            Err(e) => log::warn!("nbd accept (tcp): {e}"),
        }
    }
}

trait Stream: Read + Write + Send + 'static + Sized + Into<OwnedFd> {
    fn read_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    fn clone_stream(&self) -> io::Result<Self>;
}
impl Stream for UnixStream {
    fn read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}
impl Stream for TcpStream {
    fn read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

fn spawn_conn<S: Stream>(server: &Arc<Server>, s: S, slot: Slot) {
    let server = Arc::clone(server);
    let r = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let _slot = slot;
            if let Err(e) = server.serve_socket(s) {
                log::info!("nbd connection ended: {e}");
            }
        });
    if let Err(e) = r {
        log::warn!("nbd: cannot start connection thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapblk_core::{Error, Export};

    struct NoExports;
    impl ExportProvider for NoExports {
        fn open(&self, name: &str) -> snapblk_core::Result<Arc<dyn Export>> {
            Err(Error::not_found("export", name))
        }
        fn list(&self) -> Vec<String> {
            Vec::new()
        }
    }

    /// A write answer whose callback is dropped uncalled (a committer that panicked or
    /// stopped) still replies, with EIO, and releases its budget.
    #[test]
    fn a_lost_write_answer_fails_the_write() {
        let (ours, mut client) = UnixStream::pair().expect("socket pair");
        let writer = ours.try_clone().expect("clone");
        let conn = Arc::new(Conn::new(Box::new(writer), Some(ours.into())));
        conn.budget.admit(4096);
        let answer = WriteReply {
            conn: Some(Arc::clone(&conn)),
            meter: None,
            name: "v".into(),
            cookie: 42,
            off: 0,
            len: 4096,
            bytes: 4096,
            arrived: Instant::now(),
        };
        let then: Box<dyn FnOnce(snapblk_core::Result<()>) + Send> =
            Box::new(move |r| answer.send(r));
        drop(then);
        let mut reply = [0u8; 16];
        client.read_exact(&mut reply).expect("a reply");
        assert_eq!(reply, codec::simple_reply(EIO, 42));
        assert_eq!(*lock(&conn.budget.inflight), (0, 0), "budget released");
    }

    #[test]
    fn a_client_that_stalls_in_the_handshake_is_dropped() {
        let server = Server {
            provider: Arc::new(NoExports),
            workers: 1,
            handshake_timeout: Duration::from_millis(200),
            admission: Admission::new(1),
            #[cfg(feature = "tls")]
            tls: None,
        };
        let (ours, mut client) = UnixStream::pair().expect("socket pair");
        let t0 = std::time::Instant::now();
        let h = std::thread::spawn(move || server.serve_socket(ours));
        let mut greeting = [0u8; 18];
        client.read_exact(&mut greeting).expect("greeting");
        // Send nothing more: the server must give up on its own.
        let r = h.join().expect("server thread");
        assert!(r.is_err(), "a stalled handshake ended without an error");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t0.elapsed()
        );
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .expect("the server closed the connection");
    }
}
