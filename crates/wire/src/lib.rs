//! The Tower wire protocol, byte-compatible with the seed's C Tower: one text
//! datagram each way, fields separated by `|`.
//!
//! Pure on purpose: no sockets, no clock, no panics, so the decoder can be
//! fuzzed directly and the registry can be tested without a network.
//!
//! | request                      | success reply                         |
//! |------------------------------|---------------------------------------|
//! | `REGISTER\|name\|ip\|port`   | `OK\|REGISTERED\|name`                |
//! | `LOOKUP\|name`               | `OK\|LOOKUP\|name\|ip\|port`          |
//! | `DEREGISTER\|name\|ip\|port` | `OK\|DEREGISTERED\|name`              |
//! | `LIST`                       | `OK\|LIST\|n\|name:ip:port:ttl,...`   |
//! | `PING`                       | `OK\|PONG\|tower`                     |
//!
//! A LIST reply that would not fit [`MAX_UDP_REPLY_LEN`] carries the first
//! entries that fit and a trailing field: `OK|LIST|n|entries|TRUNCATED|total`,
//! where `n` counts the entries in this datagram (so a parser that checks
//! `n` against the entries, or reads only the fourth field, still works) and
//! `total` how many are live. The whole list is on the HTTP API, and in one
//! datagram of up to [`MAX_UDP_PAYLOAD`] bytes for a signed LIST
//! (`LIST|<ts_ms>|<hmac>`, see [`Signature`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Longest service name the seed accepts (its buffers hold 128 bytes with the NUL).
pub const MAX_NAME_LEN: usize = 127;

/// Longest request datagram we decode. The longest valid one (REGISTER with a
/// 127-byte name and a full IPv6 address) is well under this; anything longer
/// is refused rather than parsed.
pub const MAX_REQUEST_LEN: usize = 512;

/// Largest reply we put in one datagram. The UDP payload limit over IPv4 is
/// 65,507 bytes; replies longer than this are refused with an error reply
/// instead of being cut (the caller should use the HTTP API).
pub const MAX_REPLY_LEN: usize = 65_000;

/// Largest reply the Tower sends to an unauthenticated datagram: DNS's safe
/// UDP size (no fragmentation on any path with an MTU of 1280, IPv6's
/// minimum), and a bound on how much a spoofed request can reflect.
pub const MAX_UDP_REPLY_LEN: usize = 1232;

/// The largest UDP payload over IPv4 (65,535 less the IP and UDP headers):
/// the bound on a signed LIST's reply.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// The field that marks a LIST reply cut to fit one datagram.
pub const TRUNCATED: &str = "TRUNCATED";

/// A validated service name: 1..=127 bytes of visible ASCII, none of which is
/// `|`, `:` or `,` (those delimit fields of REGISTER and of the LIST reply).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '|' | ':' | ','))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ServiceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("service name is empty")]
    Empty,
    #[error("service name is {0} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("service name contains {0:?}; use visible ASCII other than '|', ':' and ','")]
    BadChar(char),
}

/// One replica of a service: its name and where it listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Registration {
    pub name: ServiceName,
    pub addr: SocketAddr,
}

/// A request datagram, as sent by workloads, ingresses and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Register(Registration),
    Lookup(ServiceName),
    Deregister(Registration),
    List,
    Ping,
}

/// One line of a LIST reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub name: ServiceName,
    pub addr: SocketAddr,
    /// Whole seconds until the entry expires unless refreshed.
    pub ttl_left_secs: u64,
}

/// A reply datagram from the Tower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Registered(ServiceName),
    Lookup(Registration),
    Deregistered(ServiceName),
    List(Vec<ListEntry>),
    /// The first entries of a LIST that did not fit one datagram, and how
    /// many are live in all (`OK|LIST|n|entries|TRUNCATED|total`).
    ListPart {
        entries: Vec<ListEntry>,
        total: usize,
    },
    Pong,
    Error(ErrorReply),
}

impl Reply {
    /// The entries of a LIST reply, whole or cut.
    pub fn list_entries(self) -> Option<Vec<ListEntry>> {
        match self {
            Reply::List(entries) | Reply::ListPart { entries, .. } => Some(entries),
            _ => None,
        }
    }
}

/// The `ERR|...` replies. The first four carry the seed's exact wording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorReply {
    /// `ERR|REGISTER syntax: name|ip|port`
    RegisterSyntax,
    /// `ERR|DEREGISTER syntax: name|ip|port`
    DeregisterSyntax,
    /// `ERR|registry full`
    RegistryFull,
    /// `ERR|NOT_FOUND|<name>`; the name is kept verbatim (it may not be a
    /// valid service name: LOOKUP of a malformed name is simply not found).
    NotFound(String),
    /// `ERR|unknown command`
    UnknownCommand,
    /// `ERR|LOOKUP syntax: name`
    LookupSyntax,
    /// `ERR|request too long: limit <n> bytes`
    RequestTooLong,
    /// `ERR|request is not UTF-8 text`
    NotText,
    /// `ERR|reply too large for one datagram: <n> entries; use the HTTP API`
    ReplyTooLarge { entries: usize },
    /// `ERR|unauthorized: <why>`: a write without a valid signature on a
    /// Tower that requires one.
    Unauthorized(String),
    /// `ERR|REGISTER refused: <why>`: an address that can never be a
    /// backend, or one outside the Tower's `--allow-register` networks.
    RegisterRefused(String),
    /// Any other `ERR|...` text, kept so that a client can show it.
    Other(String),
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorReply::RegisterSyntax => f.write_str("REGISTER syntax: name|ip|port"),
            ErrorReply::DeregisterSyntax => f.write_str("DEREGISTER syntax: name|ip|port"),
            ErrorReply::RegistryFull => f.write_str("registry full"),
            ErrorReply::NotFound(name) => write!(f, "NOT_FOUND|{name}"),
            ErrorReply::UnknownCommand => f.write_str("unknown command"),
            ErrorReply::LookupSyntax => f.write_str("LOOKUP syntax: name"),
            ErrorReply::RequestTooLong => {
                write!(f, "request too long: limit {MAX_REQUEST_LEN} bytes")
            }
            ErrorReply::NotText => f.write_str("request is not UTF-8 text"),
            ErrorReply::ReplyTooLarge { entries } => write!(
                f,
                "reply too large for one datagram: {entries} entries; use the HTTP API"
            ),
            ErrorReply::Unauthorized(why) => write!(f, "unauthorized: {why}"),
            ErrorReply::RegisterRefused(why) => write!(f, "REGISTER refused: {why}"),
            ErrorReply::Other(text) => f.write_str(text),
        }
    }
}

/// Why a request datagram could not be decoded. Each maps to the `ERR|...`
/// reply the Tower sends back (see [`DecodeError::reply`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram of {0} bytes exceeds the {MAX_REQUEST_LEN}-byte limit")]
    TooLong(usize),
    #[error("datagram is not UTF-8 text")]
    NotText,
    #[error("unknown command")]
    UnknownCommand,
    #[error("malformed REGISTER; expected REGISTER|name|ip|port")]
    Register,
    #[error("malformed DEREGISTER; expected DEREGISTER|name|ip|port")]
    Deregister,
    #[error("malformed LOOKUP; expected LOOKUP|name")]
    Lookup,
}

impl DecodeError {
    /// The reply the Tower sends for this error.
    pub fn reply(&self) -> ErrorReply {
        match self {
            DecodeError::TooLong(_) => ErrorReply::RequestTooLong,
            DecodeError::NotText => ErrorReply::NotText,
            DecodeError::UnknownCommand => ErrorReply::UnknownCommand,
            DecodeError::Register => ErrorReply::RegisterSyntax,
            DecodeError::Deregister => ErrorReply::DeregisterSyntax,
            DecodeError::Lookup => ErrorReply::LookupSyntax,
        }
    }
}

/// The shortest error reply: what garbage gets when its `ERR|...` would be
/// longer than the garbage itself.
pub const BARE_ERR: &[u8] = b"ERR";

/// The reply to a datagram of `len` bytes that did not decode. A malformed
/// REGISTER, DEREGISTER or LOOKUP gets its syntax (a few dozen bytes, worth
/// it to the person who typed it). Anything else gets no more bytes than it
/// sent, so that garbage with a forged source reflects nothing larger: its
/// `ERR|...` when that fits, else a bare `ERR`, else (shorter than `ERR`)
/// no reply at all.
pub fn encode_refusal(error: &DecodeError, len: usize) -> Option<Vec<u8>> {
    let names_a_command = matches!(
        error,
        DecodeError::Register | DecodeError::Deregister | DecodeError::Lookup
    );
    if names_a_command {
        Some(encode_reply(&Reply::Error(error.reply())))
    } else {
        encode_error_within(&error.reply(), len)
    }
}

/// `ERR|<error>` when it is at most `len` bytes long, else a bare `ERR`,
/// else (`len` under 3) nothing: for a request whose sender may be forged,
/// so that the answer reflects no more bytes than came in.
pub fn encode_error_within(error: &ErrorReply, len: usize) -> Option<Vec<u8>> {
    let full = encode_reply(&Reply::Error(error.clone()));
    if full.len() <= len {
        Some(full)
    } else if BARE_ERR.len() <= len {
        Some(BARE_ERR.to_vec())
    } else {
        None
    }
}

/// Why a reply datagram could not be decoded (client side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyDecodeError {
    #[error("reply is not UTF-8 text")]
    NotText,
    #[error("reply is not of the Tower protocol: {0:?}")]
    Malformed(String),
}

/// Workloads often send with `echo`, which appends a newline; the seed's
/// `printf` does not. Both are accepted.
fn trim_line_end(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &bytes[..end]
}

fn parse_endpoint(ip: &str, port: &str) -> Option<SocketAddr> {
    // The seed writes IPv4 dotted quads; IPv6 may come bare or in brackets.
    let ip = ip
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(ip);
    let ip: IpAddr = ip.parse().ok()?;
    // Digits only: u16::from_str would accept a leading '+'.
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    if port == 0 {
        return None;
    }
    Some(SocketAddr::new(ip, port))
}

fn parse_registration(fields: &[&str]) -> Option<Registration> {
    match fields {
        [name, ip, port] => Some(Registration {
            name: ServiceName::parse(name).ok()?,
            addr: parse_endpoint(ip, port)?,
        }),
        _ => None,
    }
}

/// The signature a write (REGISTER, DEREGISTER) or a LIST may carry:
/// `REGISTER|name|ip|port|<ts_ms>|<hmac>`, `LIST|<ts_ms>|<hmac>`, where
/// `hmac` is the lower-case hex HMAC-SHA256, under the Tower's key, of
/// every byte before its own `|`, and `ts_ms` is the sender's Unix time in
/// milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    pub ts_ms: u64,
    pub mac: [u8; 32],
}

/// A decoded request with its signature, if it carried one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub request: Request,
    pub signature: Option<Signature>,
    /// How many leading bytes of the datagram the signature covers.
    pub signed_len: usize,
}

/// 64 hex digits (either case) as 32 bytes, as signatures are written.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Lower-case hex, as signatures are written.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `<ts_ms>|<hmac>` fields that end a signed request.
fn parse_signature(ts: &str, mac: &str) -> Option<Signature> {
    if ts.is_empty() || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Signature {
        ts_ms: ts.parse().ok()?,
        mac: parse_hex32(mac)?,
    })
}

/// Split `name|ip|port[|ts|hmac]` into the registration and its signature.
fn parse_write(fields: &[&str]) -> Option<(Registration, Option<Signature>)> {
    match fields {
        [_, _, _] => Some((parse_registration(fields)?, None)),
        [name, ip, port, ts, mac] => Some((
            parse_registration(&[name, ip, port])?,
            Some(parse_signature(ts, mac)?),
        )),
        _ => None,
    }
}

/// Decode one request datagram, keeping its signature.
pub fn decode_envelope(datagram: &[u8]) -> Result<Envelope, DecodeError> {
    if datagram.len() > MAX_REQUEST_LEN {
        return Err(DecodeError::TooLong(datagram.len()));
    }
    let trimmed = trim_line_end(datagram);
    let text = std::str::from_utf8(trimmed).map_err(|_| DecodeError::NotText)?;
    let mut fields = text.split('|');
    let command = fields.next().unwrap_or_default();
    let rest: Vec<&str> = fields.collect();
    let signed_len = |signature: &Option<Signature>| match signature {
        Some(_) => text.rfind('|').unwrap_or(text.len()),
        None => text.len(),
    };
    let write = |make: fn(Registration) -> Request, err: DecodeError| {
        let (registration, signature) = parse_write(&rest).ok_or(err)?;
        Ok(Envelope {
            request: make(registration),
            signed_len: signed_len(&signature),
            signature,
        })
    };
    match (command, rest.as_slice()) {
        ("REGISTER", _) => write(Request::Register, DecodeError::Register),
        ("DEREGISTER", _) => write(Request::Deregister, DecodeError::Deregister),
        // A signed LIST; a malformed one is an unknown command, as any
        // other LIST with fields was before (garbage, for its reply's size).
        ("LIST", [ts, mac]) => {
            let signature = Some(parse_signature(ts, mac).ok_or(DecodeError::UnknownCommand)?);
            Ok(Envelope {
                request: Request::List,
                signed_len: signed_len(&signature),
                signature,
            })
        }
        _ => decode_plain(command, &rest).map(|request| Envelope {
            request,
            signature: None,
            signed_len: text.len(),
        }),
    }
}

/// Decode one request datagram (a signature, if any, is dropped).
pub fn decode_request(datagram: &[u8]) -> Result<Request, DecodeError> {
    decode_envelope(datagram).map(|e| e.request)
}

/// What a signer signs: the request's datagram and `|<ts_ms>`. The datagram
/// to send is this, `|`, and the hex MAC over it.
pub fn signing_prefix(request: &Request, ts_ms: u64) -> Vec<u8> {
    let mut out = encode_request(request);
    out.extend_from_slice(format!("|{ts_ms}").as_bytes());
    out
}

fn decode_plain(command: &str, rest: &[&str]) -> Result<Request, DecodeError> {
    match command {
        "LOOKUP" => match rest {
            [name] => ServiceName::parse(name)
                .map(Request::Lookup)
                .map_err(|_| DecodeError::Lookup),
            _ => Err(DecodeError::Lookup),
        },
        "LIST" if rest.is_empty() => Ok(Request::List),
        "PING" if rest.is_empty() => Ok(Request::Ping),
        _ => Err(DecodeError::UnknownCommand),
    }
}

/// Encode a request datagram.
pub fn encode_request(request: &Request) -> Vec<u8> {
    match request {
        Request::Register(r) => format!("REGISTER|{}|{}|{}", r.name, r.addr.ip(), r.addr.port()),
        Request::Deregister(r) => {
            format!("DEREGISTER|{}|{}|{}", r.name, r.addr.ip(), r.addr.port())
        }
        Request::Lookup(name) => format!("LOOKUP|{name}"),
        Request::List => "LIST".to_owned(),
        Request::Ping => "PING".to_owned(),
    }
    .into_bytes()
}

/// Encode a reply datagram. A LIST reply that would exceed [`MAX_REPLY_LEN`]
/// becomes `ERR|reply too large ...` instead of being cut.
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    let text = match reply {
        Reply::Registered(name) => format!("OK|REGISTERED|{name}"),
        Reply::Deregistered(name) => format!("OK|DEREGISTERED|{name}"),
        Reply::Lookup(r) => format!("OK|LOOKUP|{}|{}|{}", r.name, r.addr.ip(), r.addr.port()),
        Reply::Pong => "OK|PONG|tower".to_owned(),
        Reply::List(entries) => {
            let mut out = format!("OK|LIST|{}|", entries.len());
            for (i, e) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_entry(&mut out, e);
                if out.len() > MAX_REPLY_LEN {
                    let too_large = ErrorReply::ReplyTooLarge {
                        entries: entries.len(),
                    };
                    return format!("ERR|{too_large}").into_bytes();
                }
            }
            out
        }
        Reply::ListPart { entries, total } => {
            let body: Vec<String> = entries.iter().map(entry_text).collect();
            format!(
                "OK|LIST|{}|{}|{TRUNCATED}|{total}",
                entries.len(),
                body.join(",")
            )
        }
        Reply::Error(e) => format!("ERR|{e}"),
    };
    text.into_bytes()
}

fn entry_text(e: &ListEntry) -> String {
    let mut out = String::new();
    push_entry(&mut out, e);
    out
}

fn push_entry(out: &mut String, e: &ListEntry) {
    use fmt::Write;
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{}:{}:{}:{}",
        e.name,
        e.addr.ip(),
        e.addr.port(),
        e.ttl_left_secs
    );
}

/// The LIST reply for one datagram of at most `cap` bytes: the whole list
/// when it fits, else the first entries that fit with the `TRUNCATED`
/// marker. `cap` below the marker's own size yields a reply with no entries
/// (still a valid, if longer, reply).
pub fn encode_list(entries: &[ListEntry], cap: usize) -> Vec<u8> {
    let total = entries.len();
    // Room for the header and the marker at their longest (n <= total).
    let fixed = format!("OK|LIST|{total}||{TRUNCATED}|{total}").len();
    let mut body = String::new();
    let mut fitted = 0;
    for e in entries {
        let item = entry_text(e);
        let comma = usize::from(fitted > 0);
        if fixed + body.len() + comma + item.len() > cap {
            break;
        }
        if comma == 1 {
            body.push(',');
        }
        body.push_str(&item);
        fitted += 1;
    }
    if fitted == total {
        let whole = format!("OK|LIST|{total}|{body}");
        if whole.len() <= cap {
            return whole.into_bytes();
        }
    }
    format!("OK|LIST|{fitted}|{body}|{TRUNCATED}|{total}").into_bytes()
}

fn malformed(text: &str) -> ReplyDecodeError {
    ReplyDecodeError::Malformed(text.chars().take(200).collect())
}

fn parse_list_entry(item: &str) -> Option<ListEntry> {
    // name:ip:port:ttl, where an IPv6 ip itself contains ':'; the name has none.
    let (name, rest) = item.split_once(':')?;
    let (rest, ttl) = rest.rsplit_once(':')?;
    let (ip, port) = rest.rsplit_once(':')?;
    Some(ListEntry {
        name: ServiceName::parse(name).ok()?,
        addr: parse_endpoint(ip, port)?,
        ttl_left_secs: ttl.parse().ok()?,
    })
}

/// Decode one reply datagram (what the Tower sends back).
pub fn decode_reply(datagram: &[u8]) -> Result<Reply, ReplyDecodeError> {
    let text =
        std::str::from_utf8(trim_line_end(datagram)).map_err(|_| ReplyDecodeError::NotText)?;
    if text.as_bytes() == BARE_ERR {
        return Ok(Reply::Error(ErrorReply::Other(String::new())));
    }
    if let Some(err) = text.strip_prefix("ERR|") {
        let reply = match err {
            "REGISTER syntax: name|ip|port" => ErrorReply::RegisterSyntax,
            "DEREGISTER syntax: name|ip|port" => ErrorReply::DeregisterSyntax,
            "registry full" => ErrorReply::RegistryFull,
            "unknown command" => ErrorReply::UnknownCommand,
            "LOOKUP syntax: name" => ErrorReply::LookupSyntax,
            "request is not UTF-8 text" => ErrorReply::NotText,
            other => {
                if let Some(name) = other.strip_prefix("NOT_FOUND|") {
                    ErrorReply::NotFound(name.to_owned())
                } else if let Some(why) = other.strip_prefix("unauthorized: ") {
                    ErrorReply::Unauthorized(why.to_owned())
                } else if let Some(why) = other.strip_prefix("REGISTER refused: ") {
                    ErrorReply::RegisterRefused(why.to_owned())
                } else {
                    ErrorReply::Other(other.to_owned())
                }
            }
        };
        return Ok(Reply::Error(reply));
    }
    let fields: Vec<&str> = text.split('|').collect();
    let name = |s: &str| ServiceName::parse(s).map_err(|_| malformed(text));
    match fields.as_slice() {
        ["OK", "REGISTERED", n] => Ok(Reply::Registered(name(n)?)),
        ["OK", "DEREGISTERED", n] => Ok(Reply::Deregistered(name(n)?)),
        ["OK", "PONG", "tower"] => Ok(Reply::Pong),
        ["OK", "LOOKUP", n, ip, port] => Ok(Reply::Lookup(Registration {
            name: name(n)?,
            addr: parse_endpoint(ip, port).ok_or_else(|| malformed(text))?,
        })),
        ["OK", "LIST", count, rest @ ..] if rest.len() <= 1 => {
            let items = rest.first().copied().unwrap_or("");
            Ok(Reply::List(list_items(text, count, items)?))
        }
        ["OK", "LIST", count, items, marker, total] if *marker == TRUNCATED => {
            let entries = list_items(text, count, items)?;
            let total: usize = total.parse().map_err(|_| malformed(text))?;
            if total < entries.len() {
                return Err(malformed(text));
            }
            Ok(Reply::ListPart { entries, total })
        }
        _ => Err(malformed(text)),
    }
}

/// The entries of a LIST reply, checked against its count.
fn list_items(text: &str, count: &str, items: &str) -> Result<Vec<ListEntry>, ReplyDecodeError> {
    let count: usize = count.parse().map_err(|_| malformed(text))?;
    let entries = items
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|item| parse_list_entry(item).ok_or_else(|| malformed(text)))
        .collect::<Result<Vec<_>, _>>()?;
    if entries.len() != count {
        return Err(malformed(text));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests;
