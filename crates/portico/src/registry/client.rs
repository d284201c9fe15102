//! A client of the Tower's UDP protocol, used by the ingress (per-request
//! LOOKUP), `portico register` and `portico services`.
//!
//! Sockets are connected to the Tower, so the kernel drops datagrams from
//! anyone else, and reused from a small pool. A reply is taken only if it
//! answers the request (a LOOKUP's reply names the service asked about);
//! anything else is skipped. Before each request the socket is drained of
//! leftovers, and a socket whose request timed out is dropped. A late,
//! duplicated or spoofed datagram can then never be read as the answer to a
//! later request.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use portico_wire::{decode_reply, encode_request, ErrorReply, Reply, ReplyDecodeError, Request};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::worker::PerWorker;

/// Why the Tower gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum TowerError {
    #[error("no reply from the Tower at {addr} within {timeout:?} ({tries} tries); is `portico tower` running there?")]
    Timeout {
        addr: SocketAddr,
        timeout: Duration,
        tries: u32,
    },
    #[error("cannot reach the Tower at {addr}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the Tower at {addr} sent a reply Portico does not understand")]
    BadReply {
        addr: SocketAddr,
        #[source]
        source: ReplyDecodeError,
    },
}

#[derive(Debug)]
pub struct TowerClient {
    addr: SocketAddr,
    timeout: Duration,
    tries: u32,
    /// Kept per worker thread (`crate::worker`): a socket is reused only
    /// where it was opened, where its event loop watches it, and one busy
    /// worker cannot fill the others' room.
    idle: PerWorker<Mutex<Vec<UdpSocket>>>,
}

/// Sockets each worker keeps for reuse; more may be open at once under
/// load, the rest are closed after use.
const MAX_IDLE_SOCKETS: usize = 64;

impl TowerClient {
    pub fn new(addr: SocketAddr, timeout: Duration, tries: u32) -> Self {
        Self {
            addr,
            timeout,
            tries: tries.max(1),
            idle: PerWorker::new(1, Mutex::default),
        }
    }

    /// Keep idle sockets apart for each of `workers` worker threads.
    pub fn per_worker(self, workers: usize) -> Self {
        Self {
            idle: PerWorker::new(workers, Mutex::default),
            ..self
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Send one request and wait for its reply, retrying on silence (UDP may
    /// drop either datagram).
    pub async fn call(&self, request: &Request) -> Result<Reply, TowerError> {
        let bytes = encode_request(request);
        self.call_with(request, || bytes.clone()).await
    }

    /// As `call`, with one try: for a question whose answer is merely
    /// welcome, that must cost a request at most one `timeout`.
    pub async fn call_once(&self, request: &Request) -> Result<Reply, TowerError> {
        self.exchange_on_pooled(request, &encode_request(request))
            .await?
            .ok_or(TowerError::Timeout {
                addr: self.addr,
                timeout: self.timeout,
                tries: 1,
            })
    }

    /// As `call`, with the datagram made anew for each try: a signed write
    /// gets a fresh timestamp, so a retry is not refused as a replay.
    pub async fn call_with(
        &self,
        request: &Request,
        datagram: impl Fn() -> Vec<u8>,
    ) -> Result<Reply, TowerError> {
        for _ in 0..self.tries {
            if let Some(reply) = self.exchange_on_pooled(request, &datagram()).await? {
                return Ok(reply);
            }
        }
        Err(TowerError::Timeout {
            addr: self.addr,
            timeout: self.timeout,
            tries: self.tries,
        })
    }

    /// One try on a pooled socket; `None` when it timed out. A socket that
    /// timed out is dropped rather than pooled: the late reply must not
    /// linger in it.
    async fn exchange_on_pooled(
        &self,
        request: &Request,
        bytes: &[u8],
    ) -> Result<Option<Reply>, TowerError> {
        let socket = self.socket().await?;
        let reply = self.exchange(&socket, request, bytes).await?;
        if reply.is_some() {
            self.give_back(socket);
        }
        Ok(reply)
    }

    /// Send `bytes` and wait, until the timeout, for a datagram that answers
    /// `request`. Others are leftovers of earlier exchanges (a duplicate, a
    /// reply to a retry) or forged, and are skipped. One that does not
    /// decode is skipped too, but reported if nothing better came.
    async fn exchange(
        &self,
        socket: &UdpSocket,
        request: &Request,
        bytes: &[u8],
    ) -> Result<Option<Reply>, TowerError> {
        let io_err = |source| TowerError::Io {
            addr: self.addr,
            source,
        };
        // Only LIST replies can be long; the rest fit in a few hundred bytes.
        let mut buf = vec![
            0u8;
            match request {
                Request::List => 65_536,
                _ => 1024,
            }
        ];
        drain(socket, &mut buf);
        socket.send(bytes).await.map_err(io_err)?;
        let deadline = Instant::now() + self.timeout;
        let mut garbled = None;
        loop {
            let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                Err(_elapsed) => break,
                Ok(Err(e)) => return Err(io_err(e)),
                Ok(Ok(n)) => n,
            };
            match decode_reply(&buf[..n]) {
                Ok(reply) if answers(request, &reply) => return Ok(Some(reply)),
                Ok(reply) => {
                    tracing::debug!(tower = %self.addr, ?reply, "skipped a datagram that does not answer the request")
                }
                Err(source) => garbled = Some(source),
            }
        }
        match garbled {
            Some(source) => Err(TowerError::BadReply {
                addr: self.addr,
                source,
            }),
            None => Ok(None),
        }
    }

    async fn socket(&self) -> Result<UdpSocket, TowerError> {
        {
            let mut idle = self.idle.lock_mine();
            if let Some(socket) = idle.pop() {
                return Ok(socket);
            }
        }
        let io_err = |source| TowerError::Io {
            addr: self.addr,
            source,
        };
        let local: SocketAddr = if self.addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await.map_err(io_err)?;
        socket.connect(self.addr).await.map_err(io_err)?;
        Ok(socket)
    }

    fn give_back(&self, socket: UdpSocket) {
        // A reply that came after its request was answered (the Tower
        // answered a datagram twice, or someone forged one) waits in the
        // socket; `exchange` drains it before the next request.
        let mut idle = self.idle.lock_mine();
        if idle.len() < MAX_IDLE_SOCKETS {
            idle.push(socket);
        }
    }
}

/// Read and drop whatever already waits in `socket`. A direct non-blocking
/// read: tokio's `try_recv` would skip the system call while its readiness
/// flag is clear, and a datagram that arrived since would stay.
fn drain(socket: &UdpSocket, buf: &mut [u8]) {
    let raw = socket2::SockRef::from(socket);
    let mut reads = 0;
    // Bounded: a peer flooding the socket cannot keep a request here.
    while reads < MAX_DRAINED && (&*raw).read(buf).is_ok() {
        reads += 1;
    }
}

/// Datagrams dropped before one request at most.
const MAX_DRAINED: usize = 64;

/// Whether `reply` can be the Tower's answer to `request`. A reply that
/// names a service must name the one in the request; an error that names
/// none must be one this command can get. The catch-all errors (an
/// unknown command, a datagram too long or not text, any other text) can
/// answer anything.
pub(crate) fn answers(request: &Request, reply: &Reply) -> bool {
    use ErrorReply as E;
    match (request, reply) {
        (Request::Lookup(name), Reply::Lookup(r)) => r.name == *name,
        (Request::Register(r), Reply::Registered(name)) => r.name == *name,
        (Request::Deregister(r), Reply::Deregistered(name)) => r.name == *name,
        (Request::List, Reply::List(_) | Reply::ListPart { .. }) | (Request::Ping, Reply::Pong) => {
            true
        }
        (Request::Lookup(name), Reply::Error(E::NotFound(n))) => name.as_str() == n,
        (Request::Deregister(r), Reply::Error(E::NotFound(n))) => r.name.as_str() == n,
        (Request::Lookup(_), Reply::Error(E::LookupSyntax))
        | (
            Request::Register(_),
            Reply::Error(E::RegisterSyntax | E::RegistryFull | E::RegisterRefused(_)),
        )
        | (Request::Deregister(_), Reply::Error(E::DeregisterSyntax))
        | (
            Request::Register(_) | Request::Deregister(_) | Request::List,
            Reply::Error(E::Unauthorized(_)),
        )
        | (Request::List, Reply::Error(E::ReplyTooLarge { .. })) => true,
        (_, Reply::Error(E::UnknownCommand | E::RequestTooLong | E::NotText | E::Other(_))) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use portico_wire::decode_request;

    fn answers_text(request: &str, reply: &str) -> bool {
        answers(
            &decode_request(request.as_bytes()).unwrap(),
            &decode_reply(reply.as_bytes()).unwrap(),
        )
    }

    #[test]
    fn a_reply_must_name_the_service_asked_about() {
        assert!(answers_text("LOOKUP|a", "OK|LOOKUP|a|127.0.0.1|80"));
        assert!(answers_text("LOOKUP|a", "ERR|NOT_FOUND|a"));
        assert!(!answers_text("LOOKUP|a", "OK|LOOKUP|other|127.0.0.1|1"));
        assert!(!answers_text("LOOKUP|a", "ERR|NOT_FOUND|other"));
        assert!(answers_text("REGISTER|a|127.0.0.1|80", "OK|REGISTERED|a"));
        assert!(answers_text(
            "REGISTER|a|0.0.0.0|80",
            "ERR|REGISTER refused: 0.0.0.0 is an unspecified address, never a backend"
        ));
        assert!(answers_text(
            "LIST",
            "OK|LIST|1|a:10.0.0.1:80:29|TRUNCATED|40"
        ));
        assert!(!answers_text(
            "PING",
            "OK|LIST|1|a:10.0.0.1:80:29|TRUNCATED|40"
        ));
        assert!(!answers_text("REGISTER|a|127.0.0.1|80", "OK|REGISTERED|b"));
        assert!(answers_text("DEREGISTER|a|127.0.0.1|80", "ERR|NOT_FOUND|a"));
        assert!(!answers_text(
            "DEREGISTER|a|127.0.0.1|80",
            "OK|DEREGISTERED|b"
        ));
    }

    #[test]
    fn a_reply_of_another_command_is_no_answer() {
        assert!(!answers_text("LOOKUP|a", "OK|PONG|tower"));
        assert!(!answers_text("LOOKUP|a", "OK|REGISTERED|a"));
        assert!(!answers_text("LOOKUP|a", "ERR|registry full"));
        assert!(!answers_text("PING", "OK|LOOKUP|a|127.0.0.1|80"));
        assert!(!answers_text("LIST", "OK|PONG|tower"));
        assert!(answers_text("PING", "OK|PONG|tower"));
        assert!(answers_text("LIST", "OK|LIST|0|"));
        // A signed LIST that did not verify.
        assert!(answers_text("LIST", "ERR|unauthorized: replayed signature"));
        assert!(!answers_text(
            "PING",
            "ERR|unauthorized: replayed signature"
        ));
        // Errors that name nothing can answer any command.
        assert!(answers_text("LOOKUP|a", "ERR|unknown command"));
        assert!(answers_text("PING", "ERR|something new"));
    }
}
