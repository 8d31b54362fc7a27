//! Fixed-newstyle option negotiation. Ends with an export to serve, or with the client
//! leaving. Every malformed option gets the protocol's error reply; only a broken option
//! header (bad magic) or an oversized option ends the connection.

use std::io::{self, Read, Write};
use std::sync::Arc;

use snapblk_core::{Export, ExportProvider};

use crate::codec::{self, CodecError};
use crate::proto::*;

pub struct Session {
    pub export: Arc<dyn Export>,
    pub structured: bool,
    /// Whether base:allocation was selected with SET_META_CONTEXT.
    pub allocation_context: bool,
}

fn invalid(e: CodecError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Transmission flags for an export.
pub fn transmission_flags(export: &dyn Export) -> u16 {
    let mut f =
        TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if export.read_only() {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    f
}

fn reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&codec::option_reply(opt, kind, data))
}

fn reply_err(w: &mut impl Write, opt: u32, kind: u32, msg: &str) -> io::Result<()> {
    log::debug!("nbd option {opt}: error {kind:#x}: {msg}");
    reply(w, opt, kind, msg.as_bytes())
}

/// Where a connection stands with TLS (NBD_OPT_STARTTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    /// This listener has no TLS: STARTTLS is refused by policy.
    Unavailable,
    /// TLS is configured and required: until STARTTLS only ABORT is allowed.
    Required,
    /// The connection is already encrypted.
    Active,
}

/// How option haggling ended.
pub enum Outcome {
    /// Transmission starts on this export.
    Session(Session),
    /// The client asked for TLS and got the ACK: the caller runs the TLS handshake on the
    /// socket and calls [`haggle`] again on the encrypted stream, with fresh option state.
    StartTls,
    /// The client aborted or went away cleanly.
    Done,
}

/// Runs the whole handshake on a stream without TLS. `Ok(None)`: the client aborted or
/// went away cleanly.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    provider: &dyn ExportProvider,
) -> io::Result<Option<Session>> {
    let g = greet(s)?;
    match haggle(s, provider, g.no_zeroes, TlsState::Unavailable)? {
        Outcome::Session(session) => Ok(Some(session)),
        Outcome::StartTls | Outcome::Done => Ok(None),
    }
}

/// What the client said in its flags.
pub struct Greeting {
    /// NBD_FLAG_C_FIXED_NEWSTYLE: option replies (and so STARTTLS) are understood.
    pub fixed: bool,
    /// NBD_FLAG_C_NO_ZEROES: no 124 zero bytes after EXPORT_NAME's reply.
    pub no_zeroes: bool,
}

/// Sends the server greeting and reads the client flags.
pub fn greet<S: Read + Write>(s: &mut S) -> io::Result<Greeting> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown client flags {client_flags:#x}"),
        ));
    }
    Ok(Greeting {
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Option haggling, until an export is chosen, TLS is started, or the client leaves.
pub fn haggle<S: Read + Write>(
    s: &mut S,
    provider: &dyn ExportProvider,
    no_zeroes: bool,
    tls: TlsState,
) -> io::Result<Outcome> {
    let mut structured = false;
    // The export SET_META_CONTEXT selected base:allocation for; it applies only if GO or
    // EXPORT_NAME then names the same export.
    let mut allocation_for: Option<String> = None;
    loop {
        let mut hdr = [0u8; 16];
        match s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Done),
            Err(e) => return Err(e),
        }
        let h = codec::parse_option_header(&hdr).map_err(invalid)?;
        if h.length > MAX_OPTION_LEN {
            // We cannot reply to NBD_OPT_EXPORT_NAME; for others say why, then hang up.
            if h.option != OPT_EXPORT_NAME {
                let _ = reply_err(s, h.option, REP_ERR_TOO_BIG, "option payload too large");
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option of {} bytes", h.length),
            ));
        }
        let mut data = vec![0u8; h.length as usize];
        s.read_exact(&mut data)?;
        let opt = h.option;
        if tls == TlsState::Required && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                // No reply is possible to EXPORT_NAME: hang up.
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only listener",
                ));
            }
            reply_err(
                s,
                opt,
                REP_ERR_TLS_REQD,
                "this server requires TLS: use STARTTLS",
            )?;
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "export name is not UTF-8")
                })?;
                let export = provider.open(&name).map_err(|e| {
                    io::Error::new(io::ErrorKind::NotFound, format!("export '{name}': {e}"))
                })?;
                let size = export.size().map_err(|e| io::Error::other(e.to_string()))?;
                let mut v = size.to_be_bytes().to_vec();
                v.extend_from_slice(&transmission_flags(&*export).to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&v)?;
                let allocation_context = allocation_for.as_deref() == Some(name.as_str());
                return Ok(Outcome::Session(Session {
                    export,
                    structured,
                    allocation_context,
                }));
            }
            OPT_ABORT => {
                let _ = reply(s, opt, REP_ACK, &[]);
                return Ok(Outcome::Done);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(s, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for name in provider.list() {
                    reply(s, opt, REP_SERVER, &codec::server_entry(&name))?;
                }
                reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let req = match codec::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply_err(s, opt, REP_ERR_INVALID, &e.to_string())?;
                        continue;
                    }
                };
                let export = match provider.open(&req.name) {
                    Ok(e) => e,
                    Err(e) => {
                        reply_err(
                            s,
                            opt,
                            REP_ERR_UNKNOWN,
                            &format!("export '{}': {e}", req.name),
                        )?;
                        continue;
                    }
                };
                let size = match export.size() {
                    Ok(sz) => sz,
                    Err(e) => {
                        reply_err(s, opt, REP_ERR_UNKNOWN, &e.to_string())?;
                        continue;
                    }
                };
                reply(
                    s,
                    opt,
                    REP_INFO,
                    &codec::info_export(size, transmission_flags(&*export)),
                )?;
                if req.infos.contains(&INFO_NAME) {
                    reply(s, opt, REP_INFO, &codec::info_name(export.name()))?;
                }
                reply(
                    s,
                    opt,
                    REP_INFO,
                    &codec::info_block_size(MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD),
                )?;
                reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    let allocation_context = allocation_for.as_deref() == Some(req.name.as_str());
                    return Ok(Outcome::Session(Session {
                        export,
                        structured,
                        allocation_context,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else {
                    structured = true;
                    reply(s, opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    reply_err(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        "negotiate NBD_OPT_STRUCTURED_REPLY first",
                    )?;
                    continue;
                }
                let req = match codec::parse_meta_context_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply_err(s, opt, REP_ERR_INVALID, &e.to_string())?;
                        continue;
                    }
                };
                if let Err(e) = provider.open(&req.export) {
                    reply_err(
                        s,
                        opt,
                        REP_ERR_UNKNOWN,
                        &format!("export '{}': {e}", req.export),
                    )?;
                    continue;
                }
                let set = opt == OPT_SET_META_CONTEXT;
                let matches = |q: &str| q == BASE_ALLOCATION || (!set && q == "base:");
                let selected = if req.queries.is_empty() {
                    !set
                } else {
                    req.queries.iter().any(|q| matches(q))
                };
                if set {
                    allocation_for = selected.then(|| req.export.clone());
                }
                if selected {
                    reply(
                        s,
                        opt,
                        REP_META_CONTEXT,
                        &codec::meta_context_entry(BASE_ALLOCATION_ID, BASE_ALLOCATION),
                    )?;
                }
                reply(s, opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS => match tls {
                _ if !data.is_empty() => {
                    reply_err(s, opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?
                }
                TlsState::Unavailable => reply_err(
                    s,
                    opt,
                    REP_ERR_POLICY,
                    "TLS is not configured on this listener",
                )?,
                TlsState::Active => reply_err(s, opt, REP_ERR_INVALID, "TLS is already active")?,
                TlsState::Required => {
                    reply(s, opt, REP_ACK, &[])?;
                    s.flush()?;
                    return Ok(Outcome::StartTls);
                }
            },
            _ => reply_err(
                s,
                opt,
                REP_ERR_UNSUP,
                &format!("option {opt} is not supported"),
            )?,
        }
    }
}
