//! The PROXY protocol (HAProxy's; v1 text, v2 binary) on connections from
//! the front proxies `--proxy-protocol-from` names. Such a connection opens
//! with a header naming the client, who then stands for the connection in
//! X-Forwarded-For, X-Real-IP and the access log.
//!
//! `ppp` parses a whole header. Where a header ends, in bytes as they
//! arrive, is ours and pure (`HeaderReader`), and `read_header` moves the
//! bytes: it takes exactly the header off the socket, so that what follows
//! (a request, the h2c preface, a TLS ClientHello) is left to whatever
//! reads the connection next.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::cidr::Cidr;

/// The longest v1 header, its CRLF included (the specification's 107
/// bytes: `PROXY TCP6` and two full IPv6 addresses and ports).
pub const V1_MAX: usize = 107;

/// The fixed part of a v2 header: the signature, version and command,
/// address family and protocol, and the length of the rest.
pub const V2_FIXED: usize = 16;

/// The longest v2 header taken: the fixed part, the addresses (216 bytes
/// at most, for AF_UNIX) and the TLVs a front proxy adds (TLS details, a
/// cloud load balancer's endpoint id: tens of bytes each). The protocol
/// allows 64 KiB; a front proxy that sends more than this is refused.
pub const V2_MAX: usize = 4096;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The networks whose connections must open with a PROXY header.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Arc<[Cidr]>);

impl TrustedProxies {
    pub fn new(networks: Vec<Cidr>) -> Self {
        Self(networks.into())
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn networks(&self) -> &[Cidr] {
        &self.0
    }
}

/// What is wrong with the bytes a connection opened with.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection does not open with a PROXY protocol header")]
    Missing,
    #[error("PROXY protocol v1 header without its CRLF within {V1_MAX} bytes")]
    V1TooLong,
    #[error("PROXY protocol v2 header of {0} bytes, over the {V2_MAX} taken")]
    V2TooLong(usize),
    #[error("malformed PROXY protocol v1 header")]
    V1(#[source] ppp::v1::BinaryParseError),
    #[error("malformed PROXY protocol v2 header")]
    V2(#[source] ppp::v2::ParseError),
}

/// Why a connection from a trusted proxy was closed before any request.
/// Nothing was forwarded: the front proxy may retry the connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("the connection ended inside its PROXY protocol header")]
    Ended,
    #[error("reading the PROXY protocol header failed")]
    Io(#[source] io::Error),
    #[error("no whole PROXY protocol header within {0:?} (--header-timeout)")]
    Timeout(Duration),
}

impl ReadError {
    /// The `reason` label of `portico_proxy_protocol_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Header(HeaderError::Missing) => "missing",
            Self::Header(_) => "malformed",
            Self::Ended | Self::Io(_) => "incomplete",
            Self::Timeout(_) => "timeout",
        }
    }
}

/// Whom a header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    /// The client, by its address and port.
    Client(SocketAddr),
    /// Nobody: v2's LOCAL (the front proxy's own health check), v1's
    /// UNKNOWN, or an address that is not TCP over IP. The connection's
    /// own peer stands for the client, as the specification says.
    Peer,
}

/// Whether a connection's first bytes are a PROXY header (or its start):
/// from a source not trusted, that is a client choosing its own address.
pub fn opens_with_header(first: &[u8]) -> bool {
    first.starts_with(V1_PREFIX) || first.starts_with(V2_SIGNATURE)
}

/// The length of the header at the start of `bytes`, once they tell it;
/// `None` while they are a header's beginning that does not tell yet.
pub fn header_len(bytes: &[u8]) -> Result<Option<usize>, HeaderError> {
    if bytes.starts_with(V2_SIGNATURE) {
        let Some(fixed) = bytes.get(..V2_FIXED) else {
            return Ok(None);
        };
        let total = V2_FIXED + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        if total > V2_MAX {
            return Err(HeaderError::V2TooLong(total));
        }
        return Ok(Some(total));
    }
    if bytes.starts_with(V1_PREFIX) {
        return match bytes.windows(2).position(|w| w == b"\r\n") {
            Some(cr) if cr + 2 <= V1_MAX => Ok(Some(cr + 2)),
            Some(_) => Err(HeaderError::V1TooLong),
            None if bytes.len() >= V1_MAX => Err(HeaderError::V1TooLong),
            None => Ok(None),
        };
    }
    if V2_SIGNATURE.starts_with(bytes) || V1_PREFIX.starts_with(bytes) {
        Ok(None)
    } else {
        Err(HeaderError::Missing)
    }
}

/// Whom a whole header (exactly its bytes) names.
pub fn parse(header: &[u8]) -> Result<Named, HeaderError> {
    use ppp::v2::{Addresses, Command, Protocol};
    if header.starts_with(V2_SIGNATURE) {
        let h = ppp::v2::Header::try_from(header).map_err(HeaderError::V2)?;
        if let Some(Err(e)) = h.tlvs().find(Result::is_err) {
            return Err(HeaderError::V2(e));
        }
        return Ok(match (h.command, h.protocol, h.addresses) {
            (Command::Proxy, Protocol::Stream, Addresses::IPv4(a)) => {
                Named::Client((a.source_address, a.source_port).into())
            }
            (Command::Proxy, Protocol::Stream, Addresses::IPv6(a)) => {
                Named::Client((a.source_address, a.source_port).into())
            }
            _ => Named::Peer,
        });
    }
    let h = ppp::v1::Header::try_from(header).map_err(HeaderError::V1)?;
    Ok(match h.addresses {
        ppp::v1::Addresses::Tcp4(a) => Named::Client((a.source_address, a.source_port).into()),
        ppp::v1::Addresses::Tcp6(a) => Named::Client((a.source_address, a.source_port).into()),
        ppp::v1::Addresses::Unknown => Named::Peer,
    })
}

/// Finds the end of a header in bytes offered as they arrive, and keeps
/// the header's bytes, never one past it. No I/O: the socket's side is
/// `read_header`, and the fuzz target offers the same bytes in any cuts.
#[derive(Debug, Default)]
pub struct HeaderReader {
    header: Vec<u8>,
    /// The header's length, once its bytes so far tell it.
    total: Option<usize>,
}

impl HeaderReader {
    /// The most bytes that may still belong to the header (0 once whole).
    pub fn wants(&self) -> usize {
        self.total.unwrap_or(V1_MAX) - self.header.len()
    }

    /// Offer the bytes waiting on the connection: how many of them, from
    /// the first, are the header's (and kept). The rest are not to be
    /// consumed.
    pub fn offer(&mut self, waiting: &[u8]) -> Result<usize, HeaderError> {
        let had = self.header.len();
        let waiting = &waiting[..waiting.len().min(self.wants())];
        self.header.extend_from_slice(waiting);
        if self.total.is_none() {
            self.total = header_len(&self.header)?;
        }
        // Bytes before a decision are all the header's: a v2 header's
        // first 16, or a v1 line without its CRLF yet. Once decided, the
        // length is past them (the CRLF, or the 16 bytes, had not come).
        let end = self
            .total
            .map_or(self.header.len(), |t| t.min(self.header.len()));
        self.header.truncate(end);
        Ok(end - had)
    }

    /// Whom the header names, once it is whole.
    pub fn finish(&self) -> Option<Result<Named, HeaderError>> {
        (self.total == Some(self.header.len())).then(|| parse(&self.header))
    }
}

/// Take the PROXY header off `stream`, exactly its bytes: each round looks
/// at what is waiting (MSG_PEEK), then consumes the header's part of it.
/// Bytes that are all the header's are consumed, so the next look waits
/// for more rather than finding the same bytes again.
pub async fn read_header(stream: &mut TcpStream) -> Result<Named, ReadError> {
    let mut reader = HeaderReader::default();
    let mut scratch = vec![0; V1_MAX];
    loop {
        let wants = reader.wants();
        if scratch.len() < wants {
            scratch.resize(wants, 0);
        }
        let waiting = stream
            .peek(&mut scratch[..wants])
            .await
            .map_err(ReadError::Io)?;
        if waiting == 0 {
            return Err(ReadError::Ended);
        }
        let take = reader.offer(&scratch[..waiting])?;
        // The bytes just looked at: waiting in the kernel, so at once.
        stream
            .read_exact(&mut scratch[..take])
            .await
            .map_err(ReadError::Io)?;
        if let Some(named) = reader.finish() {
            return Ok(named?);
        }
    }
}

/// The client of a connection from a trusted proxy: the address its
/// header names, or `peer` when it names none; within `limit`.
pub async fn client_of(
    stream: &mut TcpStream,
    peer: SocketAddr,
    limit: Duration,
) -> Result<SocketAddr, ReadError> {
    match tokio::time::timeout(limit, read_header(stream)).await {
        Ok(Ok(Named::Client(addr))) => Ok(addr),
        Ok(Ok(Named::Peer)) => Ok(peer),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ReadError::Timeout(limit)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn v2(command: u8, family: u8, rest: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&u16::try_from(rest.len()).unwrap().to_be_bytes());
        h.extend_from_slice(rest);
        h
    }

    fn v2_tcp4(command: u8) -> Vec<u8> {
        v2(
            command,
            0x11,
            &[203, 0, 113, 7, 10, 0, 0, 1, 0x30, 0x39, 0, 80],
        )
    }

    /// Offer `input` cut after each of `cuts` bytes, consuming what the
    /// reader takes, as `read_header` does.
    fn read_in_cuts(input: &[u8], cuts: &[usize]) -> (Result<Named, HeaderError>, usize) {
        let mut r = HeaderReader::default();
        let mut pos = 0;
        let mut arrived = 0;
        let mut cuts = cuts.iter().copied().chain(std::iter::repeat(input.len()));
        loop {
            arrived = (arrived + cuts.next().unwrap()).min(input.len());
            assert!(pos < input.len(), "the input ended inside the header");
            if pos == arrived {
                continue;
            }
            match r.offer(&input[pos..arrived]) {
                Err(e) => return (Err(e), pos),
                Ok(n) => pos += n,
            }
            if let Some(named) = r.finish() {
                return (named, pos);
            }
        }
    }

    #[test]
    fn v1_names_the_client_and_leaves_the_request() {
        let input = b"PROXY TCP4 203.0.113.7 10.0.0.1 12345 80\r\nGET / HTTP/1.1\r\n\r\n";
        let header_end = input.iter().position(|&b| b == b'\n').unwrap() + 1;
        for cuts in [&[200][..], &[1; 60], &[6, 10, 30], &[41]] {
            let (named, consumed) = read_in_cuts(input, cuts);
            assert_eq!(
                named.unwrap(),
                Named::Client("203.0.113.7:12345".parse().unwrap()),
                "{cuts:?}"
            );
            assert_eq!(consumed, header_end, "{cuts:?}");
        }
        let six = b"PROXY TCP6 2001:db8::7 2001:db8::1 443 8443\r\n";
        assert_eq!(
            parse(six).unwrap(),
            Named::Client("[2001:db8::7]:443".parse().unwrap())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), Named::Peer);
    }

    #[test]
    fn v2_names_the_client_and_local_keeps_the_peer() {
        let mut input = v2_tcp4(1);
        let len = input.len();
        input.extend_from_slice(b"\x16\x03\x01 a ClientHello");
        for cuts in [&[500][..], &[1; 40], &[12, 4, 3], &[16]] {
            let (named, consumed) = read_in_cuts(&input, cuts);
            assert_eq!(
                named.unwrap(),
                Named::Client("203.0.113.7:12345".parse().unwrap())
            );
            assert_eq!(consumed, len, "{cuts:?}");
        }
        assert_eq!(parse(&v2_tcp4(0)).unwrap(), Named::Peer, "LOCAL");
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap(), Named::Peer);
        let mut with_tlv = v2_tcp4(1);
        with_tlv[15] += 5;
        with_tlv.extend_from_slice(&[0x04, 0, 2, 0, 0]);
        assert!(matches!(parse(&with_tlv), Ok(Named::Client(_))));
    }

    #[test]
    fn what_is_not_a_header_is_refused_at_its_first_wrong_byte() {
        for bad in [&b"GET / HTTP/1.1\r\n"[..], b"PROXZ", b"\r\n\r\n\x01"] {
            assert!(
                matches!(header_len(bad), Err(HeaderError::Missing)),
                "{bad:?}"
            );
        }
        assert!(matches!(header_len(b"PROX"), Ok(None)));
        assert!(matches!(header_len(b"\r\n\r\n\0"), Ok(None)));
        // A v1 line that does not end within the limit.
        let long = [&b"PROXY "[..], &[b'1'; 200]].concat();
        let (named, consumed) = read_in_cuts(&long, &[50, 50, 50]);
        assert!(matches!(named, Err(HeaderError::V1TooLong)));
        assert!(consumed < V1_MAX);
        // A v2 length over the limit, told by the fixed part alone.
        let mut big = v2(1, 0x11, &[]);
        big[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(header_len(&big), Err(HeaderError::V2TooLong(_))));
    }

    #[test]
    fn malformed_headers_are_errors() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \xff\r\n",
        ] {
            assert!(matches!(parse(bad), Err(HeaderError::V1(_))), "{bad:?}");
        }
        // Version 3, AF 0x4, addresses shorter than the family's.
        let mut version = v2_tcp4(1);
        version[12] = 0x31;
        let family = v2(1, 0x41, &[0; 12]);
        let short = v2(1, 0x11, &[0; 4]);
        let mut bad_tlv = v2_tcp4(1);
        bad_tlv[15] += 2;
        bad_tlv.extend_from_slice(&[0x04, 0]);
        for bad in [version, family, short, bad_tlv] {
            assert!(matches!(parse(&bad), Err(HeaderError::V2(_))), "{bad:?}");
        }
    }

    #[test]
    fn trusted_networks() {
        let t = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(t.trusts("10.1.2.3".parse().unwrap()));
        assert!(t.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!t.trusts("192.0.2.1".parse().unwrap()));
        assert!(!TrustedProxies::default().trusts("10.1.2.3".parse().unwrap()));
    }
}
