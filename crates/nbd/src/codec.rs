//! Pure encoding and decoding of NBD messages: bytes in, typed values or `CodecError` out.
//! No I/O and no panics on any input (fuzzed by the proptests below and by cargo-fuzz
//! targets later).

use crate::proto::*;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("{what} of {len} bytes is too long")]
    TooLong { what: &'static str, len: usize },
    #[error("trailing bytes after {0}")]
    Trailing(&'static str),
}

/// A transmission-phase request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

/// A little cursor over big-endian fields.
struct Rd<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.b.len() < n {
            return Err(CodecError::Truncated(self.what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self, len: usize, what: &'static str) -> Result<String, CodecError> {
        if len > 4096 {
            return Err(CodecError::TooLong { what, len });
        }
        let s = self.take(len)?;
        String::from_utf8(s.to_vec()).map_err(|_| CodecError::NotUtf8(what))
    }
    fn end(&self) -> Result<(), CodecError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Trailing(self.what))
        }
    }
}

pub fn parse_request(b: &[u8]) -> Result<Request, CodecError> {
    let mut r = Rd { b, what: "request" };
    let magic = r.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(CodecError::BadMagic(u64::from(magic)));
    }
    Ok(Request {
        flags: r.u16()?,
        command: r.u16()?,
        cookie: r.u64()?,
        offset: r.u64()?,
        length: r.u32()?,
    })
}

pub fn encode_request(q: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&q.flags.to_be_bytes());
    b[6..8].copy_from_slice(&q.command.to_be_bytes());
    b[8..16].copy_from_slice(&q.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&q.offset.to_be_bytes());
    b[24..28].copy_from_slice(&q.length.to_be_bytes());
    b
}

/// Header of a client option (16 bytes): magic, option, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, CodecError> {
    let mut r = Rd {
        b,
        what: "option header",
    };
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(CodecError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: r.u32()?,
        length: r.u32()?,
    })
}

/// NBD_OPT_INFO / NBD_OPT_GO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_info_request(b: &[u8]) -> Result<InfoRequest, CodecError> {
    let mut r = Rd {
        b,
        what: "NBD_OPT_INFO/GO payload",
    };
    let n = r.u32()? as usize;
    let name = r.string(n, "export name")?;
    let count = r.u16()?;
    let mut infos = Vec::new();
    for _ in 0..count {
        infos.push(r.u16()?);
    }
    r.end()?;
    Ok(InfoRequest { name, infos })
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_context_request(b: &[u8]) -> Result<MetaContextRequest, CodecError> {
    let mut r = Rd {
        b,
        what: "meta context payload",
    };
    let n = r.u32()? as usize;
    let export = r.string(n, "export name")?;
    let count = r.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = r.u32()? as usize;
        queries.push(r.string(len, "meta context query")?);
    }
    r.end()?;
    Ok(MetaContextRequest { export, queries })
}

pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut v = INFO_NAME.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [min, preferred, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// REP_SERVER payload for NBD_OPT_LIST.
pub fn server_entry(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// REP_META_CONTEXT payload.
pub fn meta_context_entry(id: u32, name: &str) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A complete NBD_REPLY_TYPE_ERROR chunk with the DONE flag.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut v = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    )
    .to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A complete NBD_REPLY_TYPE_BLOCK_STATUS chunk with the DONE flag.
pub fn block_status_chunk(cookie: u64, context: u32, runs: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * runs.len();
    let mut v = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len as u32).to_vec();
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in runs {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let q = Request {
            flags: 1,
            command: CMD_WRITE,
            cookie: 9,
            offset: 4096,
            length: 512,
        };
        let b = encode_request(&q);
        assert_eq!(parse_request(&b).unwrap(), q);
        let mut bad = b;
        bad[0] ^= 0xff;
        assert!(matches!(parse_request(&bad), Err(CodecError::BadMagic(_))));
        assert!(matches!(
            parse_request(&b[..10]),
            Err(CodecError::Truncated(_))
        ));
    }

    #[test]
    fn info_request() {
        let mut p = 3u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"vol");
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        assert_eq!(
            parse_info_request(&p).unwrap(),
            InfoRequest {
                name: "vol".into(),
                infos: vec![3, 1]
            }
        );
        p.push(0);
        assert!(parse_info_request(&p).is_err());
        // A name length pointing past the end.
        assert!(parse_info_request(&100u32.to_be_bytes()).is_err());
    }

    #[test]
    fn meta_context_request() {
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"v");
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(&15u32.to_be_bytes());
        p.extend_from_slice(b"base:allocation");
        let m = parse_meta_context_request(&p).unwrap();
        assert_eq!(m.queries, vec!["base:allocation".to_string()]);
        // A huge count with no data behind it fails without allocating.
        let mut q = 0u32.to_be_bytes().to_vec();
        q.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&q).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_request(&b);
            let _ = parse_option_header(&b);
            let _ = parse_info_request(&b);
            let _ = parse_meta_context_request(&b);
        }
    }
}
