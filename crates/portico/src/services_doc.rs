//! The document of the Tower's `GET /v1/services` and the lines of its
//! change stream (`?watch=1`): the Tower writes them (`registry::http`), an
//! ingress's watch reads them and etcd discovery builds them
//! (`discovery`). A leaf both sides share, so neither imports the other's
//! server or client to speak it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use portico_wire::ServiceName;
use serde::{Deserialize, Serialize};

/// Every live endpoint, by service, at one revision of the registry.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServicesDoc {
    /// The registry's revision; a blocking query answers when it changes.
    pub index: u64,
    /// One run of the Tower: an index means something only within it.
    pub epoch: u64,
    /// The Tower has been up for a TTL, so every live workload has had
    /// time to heartbeat to it.
    pub warm: bool,
    pub services: BTreeMap<String, Vec<EndpointDoc>>,
}

/// One replica of a service.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointDoc {
    pub ip: IpAddr,
    pub port: u16,
    /// Time left before the registration expires, unless renewed.
    pub ttl_left_ms: u64,
}

/// What one change of the registry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A replica appeared (or an expired one came back before it was reaped).
    Add {
        service: ServiceName,
        addr: SocketAddr,
        /// Time left at the change: the whole TTL for a new registration.
        ttl_ms: u64,
    },
    /// A replica went: deregistered, expired, or gone from etcd.
    Remove {
        service: ServiceName,
        addr: SocketAddr,
    },
    /// The Tower's warm-up ended: from now on, what it lacks does not exist.
    Warm,
}

/// The first bytes of a `full` line. The rest is the document's own JSON
/// after its `{`, so a document encoded once serves the plain answer and
/// every stream.
pub const FULL_PREFIX: &[u8] = b"{\"type\":\"full\",";

/// A change or ping line as written: `type` first, so a reader can tell it
/// from the first bytes.
#[derive(Serialize)]
struct ChangeOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
}

/// One change as a stream line, `\n` included: encoded once per change
/// and shared by every watcher.
pub fn encode_change(index: u64, change: &Change) -> Bytes {
    let out = match change {
        Change::Add {
            service,
            addr,
            ttl_ms,
        } => ChangeOut {
            kind: "add",
            index,
            service: Some(service.as_str()),
            ip: Some(addr.ip()),
            port: Some(addr.port()),
            ttl_ms: Some(*ttl_ms),
        },
        Change::Remove { service, addr } => ChangeOut {
            kind: "remove",
            index,
            service: Some(service.as_str()),
            ip: Some(addr.ip()),
            port: Some(addr.port()),
            ttl_ms: None,
        },
        Change::Warm => ChangeOut {
            kind: "warm",
            index,
            service: None,
            ip: None,
            port: None,
            ttl_ms: None,
        },
    };
    line(&out)
}

/// The keep-alive line: nothing changed since `index`.
pub fn encode_ping(index: u64) -> Bytes {
    line(&ChangeOut {
        kind: "ping",
        index,
        service: None,
        ip: None,
        port: None,
        ttl_ms: None,
    })
}

fn line(out: &ChangeOut<'_>) -> Bytes {
    let mut buf = Vec::with_capacity(96);
    // A struct of strings and numbers always serialises.
    let _ = serde_json::to_writer(&mut buf, out);
    buf.push(b'\n');
    Bytes::from(buf)
}

/// One line of the stream, read.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamLine {
    Full(ServicesDoc),
    Change { index: u64, change: Change },
    Ping { index: u64 },
}

/// Why a stream line was not understood: the reader drops the stream and
/// starts again from a full document (safe to retry).
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("the line is not JSON of the change stream: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown line type '{0}'")]
    UnknownType(String),
    #[error("a '{0}' line lacks its '{1}' field")]
    Missing(&'static str, &'static str),
    #[error("bad service name in a change: {0}")]
    Name(#[from] portico_wire::NameError),
}

/// Every field any line has: one pass over the bytes, whatever the type.
#[derive(Deserialize)]
struct LineIn {
    #[serde(rename = "type")]
    kind: String,
    index: u64,
    epoch: Option<u64>,
    warm: Option<bool>,
    services: Option<BTreeMap<String, Vec<EndpointDoc>>>,
    service: Option<String>,
    ip: Option<IpAddr>,
    port: Option<u16>,
    ttl_ms: Option<u64>,
}

/// Read one line of the stream (without its `\n`).
pub fn decode_line(bytes: &[u8]) -> Result<StreamLine, LineError> {
    let l: LineIn = serde_json::from_slice(bytes)?;
    let endpoint = |kind: &'static str| -> Result<(ServiceName, SocketAddr), LineError> {
        let service = l
            .service
            .as_deref()
            .ok_or(LineError::Missing(kind, "service"))?;
        let ip = l.ip.ok_or(LineError::Missing(kind, "ip"))?;
        let port = l.port.ok_or(LineError::Missing(kind, "port"))?;
        Ok((ServiceName::parse(service)?, SocketAddr::new(ip, port)))
    };
    let change = match l.kind.as_str() {
        "ping" => return Ok(StreamLine::Ping { index: l.index }),
        "full" => {
            return Ok(StreamLine::Full(ServicesDoc {
                index: l.index,
                epoch: l.epoch.ok_or(LineError::Missing("full", "epoch"))?,
                warm: l.warm.ok_or(LineError::Missing("full", "warm"))?,
                services: l.services.ok_or(LineError::Missing("full", "services"))?,
            }))
        }
        "add" => {
            let (service, addr) = endpoint("add")?;
            let ttl_ms = l.ttl_ms.ok_or(LineError::Missing("add", "ttl_ms"))?;
            Change::Add {
                service,
                addr,
                ttl_ms,
            }
        }
        "remove" => {
            let (service, addr) = endpoint("remove")?;
            Change::Remove { service, addr }
        }
        "warm" => Change::Warm,
        other => return Err(LineError::UnknownType(other.to_owned())),
    };
    Ok(StreamLine::Change {
        index: l.index,
        change,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn web(addr: &str) -> (ServiceName, SocketAddr) {
        (ServiceName::parse("web").unwrap(), addr.parse().unwrap())
    }

    #[test]
    fn changes_read_back_as_written() {
        let (service, addr) = web("[::1]:8080");
        for change in [
            Change::Add {
                service: service.clone(),
                addr,
                ttl_ms: 30_000,
            },
            Change::Remove { service, addr },
            Change::Warm,
        ] {
            let line = encode_change(42, &change);
            assert_eq!(line.last(), Some(&b'\n'));
            let read = decode_line(&line[..line.len() - 1]).unwrap();
            assert_eq!(read, StreamLine::Change { index: 42, change });
        }
        let ping = encode_ping(7);
        assert_eq!(&ping[..], b"{\"type\":\"ping\",\"index\":7}\n");
        assert_eq!(
            decode_line(&ping[..ping.len() - 1]).unwrap(),
            StreamLine::Ping { index: 7 }
        );
    }

    #[test]
    fn a_full_line_is_the_prefix_and_the_document() {
        let mut services = BTreeMap::new();
        services.insert(
            "web".to_owned(),
            vec![EndpointDoc {
                ip: "10.0.0.1".parse().unwrap(),
                port: 80,
                ttl_left_ms: 5,
            }],
        );
        let doc = ServicesDoc {
            index: 3,
            epoch: 9,
            warm: false,
            services,
        };
        let json = serde_json::to_vec(&doc).unwrap();
        let mut line = FULL_PREFIX.to_vec();
        line.extend_from_slice(&json[1..]);
        assert_eq!(decode_line(&line).unwrap(), StreamLine::Full(doc));
    }

    #[test]
    fn bad_lines_are_errors_not_changes() {
        for bad in [
            &b""[..],
            b"{\"type\":\"add\",\"index\":1,\"service\":\"web\",\"ip\":\"10.0.0.1\"",
            b"{\"type\":\"add\",\"index\":1,\"service\":\"web\",\"ip\":\"10.0.0.1\",\"port\":80}",
            b"{\"type\":\"remove\",\"index\":1,\"service\":\"we b\",\"ip\":\"10.0.0.1\",\"port\":80}",
            b"{\"type\":\"remove\",\"index\":1,\"service\":\"web\",\"ip\":\"10.0.0.1\",\"port\":70000}",
            b"{\"type\":\"rename\",\"index\":1}",
            b"{\"type\":\"full\",\"index\":1,\"epoch\":2}",
            b"{\"type\":\"warm\"}",
        ] {
            assert!(decode_line(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
