//! A client of the Tower's UDP protocol, used by the ingress (per-request
//! LOOKUP), `portico register` and `portico services`.
//!
//! Sockets are connected to the Tower and reused from a small pool; a socket
//! whose request timed out is dropped, so a late reply can never be read as
//! the answer to a later request.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use portico_wire::{decode_reply, encode_request, Reply, ReplyDecodeError, Request};
use tokio::net::UdpSocket;

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
    idle: Mutex<Vec<UdpSocket>>,
}

/// Sockets kept for reuse; more may be open at once under load, the rest are
/// closed after use.
const MAX_IDLE_SOCKETS: usize = 64;

impl TowerClient {
    pub fn new(addr: SocketAddr, timeout: Duration, tries: u32) -> Self {
        Self {
            addr,
            timeout,
            tries: tries.max(1),
            idle: Mutex::new(Vec::new()),
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

    /// As `call`, with the datagram made anew for each try: a signed write
    /// gets a fresh timestamp, so a retry is not refused as a replay.
    pub async fn call_with(
        &self,
        request: &Request,
        datagram: impl Fn() -> Vec<u8>,
    ) -> Result<Reply, TowerError> {
        // Only LIST replies can be long; the rest fit in a few hundred bytes.
        let reply_cap = match request {
            Request::List => 65_536,
            _ => 1024,
        };
        for _ in 0..self.tries {
            let socket = self.socket().await?;
            match self.exchange(&socket, &datagram(), reply_cap).await {
                Ok(Some(reply)) => {
                    self.give_back(socket);
                    return Ok(reply);
                }
                // Timed out: drop the socket, a late reply must not linger in it.
                Ok(None) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(TowerError::Timeout {
            addr: self.addr,
            timeout: self.timeout,
            tries: self.tries,
        })
    }

    async fn exchange(
        &self,
        socket: &UdpSocket,
        bytes: &[u8],
        reply_cap: usize,
    ) -> Result<Option<Reply>, TowerError> {
        let io_err = |source| TowerError::Io {
            addr: self.addr,
            source,
        };
        socket.send(bytes).await.map_err(io_err)?;
        let mut buf = vec![0u8; reply_cap];
        match tokio::time::timeout(self.timeout, socket.recv(&mut buf)).await {
            Err(_elapsed) => Ok(None),
            Ok(Err(e)) => Err(io_err(e)),
            Ok(Ok(n)) => decode_reply(&buf[..n])
                .map(Some)
                .map_err(|source| TowerError::BadReply {
                    addr: self.addr,
                    source,
                }),
        }
    }

    async fn socket(&self) -> Result<UdpSocket, TowerError> {
        if let Some(s) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(s);
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
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_SOCKETS {
            idle.push(socket);
        }
    }
}
