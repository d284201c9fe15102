//! The data plane: the accept loops (one per listener, plain or TLS),
//! connection limits and draining. The request path itself is `handler`;
//! `front` answers the few requests that never reach it.

pub mod access_log;
pub mod body;
pub mod checks;
pub mod compress;
pub mod conn;
pub mod error;
pub mod failover;
pub mod fast;
pub mod front;
pub mod h1;
pub mod handler;
pub mod headers;
pub mod proxy_protocol;
mod quickack;
pub mod request_line;
pub mod route;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod websocket_h2;
pub mod workers;

use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::either::Either;

use conn::{ConnState, ConnTimeouts, Slot, StreamExec, Tracked};
use handler::{Client, Shared};

/// How client connections are served.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub max_connections: usize,
    pub timeouts: ConnTimeouts,
    pub drain_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_h2_streams: u32,
    /// Sources whose connections open with a PROXY protocol header.
    pub proxy_protocol_from: proxy_protocol::TrustedProxies,
    /// Worker threads (`workers`), each accepting on every listener.
    pub workers: usize,
}

/// TLS termination, and how long a handshake may take.
#[derive(Clone)]
pub struct TlsTermination {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsTermination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTermination")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 13\r\nconnection: close\r\n\r\nAt capacity.\n";

/// The answer to a PROXY protocol header where none may be: a client
/// choosing its own address, or a front proxy Portico was not told of.
const UNTRUSTED_HEADER: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 57\r\nconnection: close\r\n\r\nPROXY protocol header from a source that is not trusted.\n";

/// Connections past the limit that may be getting their 503 at once; beyond
/// this they are closed without one, so a flood costs bounded memory.
const MAX_REFUSING: usize = 1024;

/// One listening socket, and its TLS termination when it serves HTTPS.
pub struct Listener {
    pub socket: TcpListener,
    pub tls: Option<TlsTermination>,
}

/// What every accept loop shares: the protocol settings, the front door,
/// and the connection slots (one limit across all listeners).
struct Serving {
    protocols: Protocols,
    front: Arc<front::FrontDoor>,
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    timeouts: ConnTimeouts,
    proxy_protocol_from: proxy_protocol::TrustedProxies,
    /// The shutdown as connections see it (fired from the watch).
    stop: Arc<conn::Shutdown>,
    /// Our HTTP/1.1 path's limits on a request head, as hyper's.
    max_head: usize,
    max_headers: usize,
    /// Whether other workers accept on the same listeners.
    shared_accept: bool,
}

/// Serve clients from `listeners` until `shutdown` flips to true, then stop
/// accepting and give open connections (upgraded tunnels too) up to the
/// drain timeout to finish; whatever is left is closed as the process exits.
pub async fn serve(
    listeners: Vec<Listener>,
    proxy: Arc<Shared>,
    settings: ServeSettings,
    front: Arc<front::FrontDoor>,
    shutdown: watch::Receiver<bool>,
) {
    let workers = workers::start(settings.workers);
    let serving = Arc::new(Serving {
        protocols: Protocols::new(&settings),
        front,
        slots: Arc::new(Semaphore::new(settings.max_connections)),
        refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
        timeouts: settings.timeouts,
        proxy_protocol_from: settings.proxy_protocol_from.clone(),
        stop: Arc::new(conn::Shutdown::default()),
        max_head: settings.max_header_bytes.max(8192),
        max_headers: settings.max_headers,
        shared_accept: workers.len() > 1,
    });
    let sweeper = tokio::spawn(sweep_pool(proxy.upstream.pool.clone()));
    let stop = serving.stop.clone();
    let mut signal = shutdown.clone();
    let relay = tokio::spawn(async move {
        // A sender gone counts as a shutdown, as the signal itself does.
        let _ = signal.wait_for(|stop| *stop).await;
        stop.fire();
    });
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let tls = listener.tls.map(Arc::new);
        // Every worker accepts on the same socket (a copy of its
        // descriptor, in its own epoll): whichever is free first takes the
        // connection, as nginx's workers share theirs.
        for handle in &workers[1..] {
            let socket = match socket2::SockRef::from(&listener.socket).try_clone() {
                Ok(socket) => std::net::TcpListener::from(socket),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot share a listener with a worker thread; it serves the others");
                    continue;
                }
            };
            let (serving, proxy, shutdown) = (serving.clone(), proxy.clone(), shutdown.clone());
            let tls = tls.clone();
            loops.spawn_on(
                async move {
                    match TcpListener::from_std(socket) {
                        Ok(socket) => accept_loop(socket, tls, serving, proxy, shutdown).await,
                        Err(e) => tracing::warn!(error = %e, "a worker thread cannot watch a listener; the others serve it"),
                    }
                },
                handle,
            );
        }
        loops.spawn(accept_loop(
            listener.socket,
            tls,
            serving.clone(),
            proxy.clone(),
            shutdown.clone(),
        ));
    }
    // Told as soon as it happens, not at shutdown: the other workers go on
    // accepting on that listener meanwhile.
    while let Some(ended) = loops.join_next().await {
        if let Err(e) = ended {
            tracing::error!(error = %e, "an accept loop ended abnormally; the other workers go on accepting");
        }
    }
    sweeper.abort();
    // The accept loops end on the signal, or (a fault) without it: either
    // way the connections are asked to finish now (again is harmless).
    serving.stop.fire();
    relay.abort();

    let slots = &serving.slots;
    let open = settings.max_connections - slots.available_permits();
    if open > 0 {
        tracing::info!(open, timeout = ?settings.drain_timeout, "draining connections");
    }
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(settings.drain_timeout, slots.acquire_many(all)).await;
    match drained {
        Ok(_) => tracing::info!("drained"),
        Err(_) => tracing::warn!(
            left = settings.max_connections - slots.available_permits(),
            "drain timeout passed; closing the remaining connections"
        ),
    }
}

/// Accept on one listener until shutdown; the loop never ends on an error.
/// `tls` is shared: every connection's task holds a pointer to it.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<TlsTermination>>,
    serving: Arc<Serving>,
    proxy: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let mut accept_shutdown = shutdown.clone();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = accept_shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of descriptors or memory: wait for connections to end
                // instead of spinning; the loop itself never ends on an error.
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed: out of resources");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "accept failed; continuing");
                continue;
            }
        };
        if !cfg!(target_os = "linux") {
            let _ = stream.set_nodelay(true);
        }
        match serving.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let from_proxy = serving.proxy_protocol_from.trusts(peer.ip());
                let serving = serving.clone();
                let proxy = proxy.clone();
                proxy.metrics.connections.inc();
                // Given back when the connection is gone, however it ends
                // (an upgraded one when its tunnel closes).
                let slot = Slot::new(permit, proxy.metrics.active_connections.clone());
                let tls = tls.clone();
                // The task's future is the connection's whole state, in
                // the task's own allocation: each value in it once.
                let shared_accept = serving.shared_accept;
                tokio::spawn(serve_client(
                    stream, peer, from_proxy, slot, tls, serving, proxy,
                ));
                if shared_accept {
                    // One connection per turn, as nginx's workers take one
                    // per wake-up: a worker that emptied the queue alone
                    // would keep a burst of keep-alive clients to itself.
                    tokio::task::yield_now().await;
                }
            }
            Err(_) => {
                proxy.metrics.refused_at_capacity.inc();
                if let Ok(permit) = serving.refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse_at_capacity(stream).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737): the handshake
/// is the whole exchange, no HTTP follows.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A TLS connection: the handshake under its timeout, then HTTP/1.1 or
/// HTTP/2 as ALPN chose.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    tls: Arc<TlsTermination>,
    serving: &Serving,
    proxy: Arc<Shared>,
) {
    let limit = tls.handshake_timeout;
    match tokio::time::timeout(limit, tls.acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let alpn = tls.get_ref().1.alpn_protocol();
            if alpn == Some(ACME_TLS_ALPN) {
                tracing::debug!(%peer, "acme-tls/1 handshake done (TLS-ALPN-01 validation)");
                return;
            }
            // HTTP/2 over TLS is chosen by ALPN.
            let h2 = alpn == Some(b"h2");
            let (state, client) = client_state(peer, slot, true);
            serve_hyper(tls, Bytes::new(), state, client, h2, serving, proxy).await
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tls handshake failed")
        }
        Err(_) => {
            tracing::debug!(%peer, ?limit, "tls handshake timed out")
        }
    }
}

/// The client a trusted front proxy's header names (the PROXY protocol,
/// before TLS or HTTP), or `None` when the connection is closed for a
/// missing or bad header.
async fn client_of(
    stream: &mut TcpStream,
    peer: SocketAddr,
    limit: Duration,
    proxy: &Shared,
) -> Option<SocketAddr> {
    match proxy_protocol::client_of(stream, peer, limit).await {
        Ok(client) => {
            tracing::trace!(%client, proxy = %peer, "PROXY protocol header");
            Some(client)
        }
        Err(e) => {
            proxy.metrics.proxy_protocol_refused(e.reason());
            tracing::debug!(%peer, error = %crate::error_chain::chain(&e), "closing connection from a trusted proxy");
            None
        }
    }
}

/// The HTTP/1.1 and HTTP/2 server settings, built once.
struct Protocols {
    h1: http1::Builder,
    h2: http2::Builder<StreamExec>,
}

impl Protocols {
    fn new(settings: &ServeSettings) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // The connection watchdog keeps the header and idle timeouts.
            .header_read_timeout(None)
            .max_buf_size(settings.max_header_bytes.max(8192))
            .max_headers(settings.max_headers)
            // The head and the body copied into one buffer and written
            // with one call, rather than queued and written as a vector:
            // the queue's bookkeeping costs more than the copy, and for a
            // large body the copy costs less than the writes it saves.
            .writev(false)
            .keep_alive(true);
        // Each stream's task is dropped when its client takes none of its
        // response for the idle timeout (PINGs do not count).
        let mut h2 = http2::Builder::new(StreamExec::new(settings.timeouts.idle));
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(settings.max_h2_streams)
            // Bounds a header block across CONTINUATION frames (CONTINUATION
            // flood) as the HTTP/1.1 head is bounded.
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
            // Rapid reset (CVE-2023-44487): streams a client opens and resets
            // before they are served; past this the connection gets GOAWAY.
            .max_pending_accept_reset_streams(20)
            // Streams we had to reset for the client's errors; past this, GOAWAY.
            .max_local_error_reset_streams(1024)
            // WebSocket over HTTP/2 (RFC 8441): extended CONNECT.
            .enable_connect_protocol();
        Self { h1, h2 }
    }
}

/// The client preface of HTTP/2 with prior knowledge (RFC 9113 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first read of a plain connection. Sized for a whole request head
/// of a usual size, so that hyper need not read again for it.
const FIRST_READ: usize = 4096;

/// Read what a plain connection sends first and tell whether it starts
/// with the HTTP/2 preface. The bytes read are handed to the protocol
/// through `Tracked`: peeking them instead would cost every new connection
/// one more system call. `None` if the client closed or the socket failed.
async fn read_first(stream: &mut TcpStream) -> Option<(Bytes, bool)> {
    let mut first = BytesMut::new();
    loop {
        match std::future::poll_fn(|cx| poll_read_some(stream, cx, &mut first)).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {
                let n = first.len().min(H2_PREFACE.len());
                if first[..n] != H2_PREFACE[..n] {
                    return Some((first.freeze(), false));
                }
                if n == H2_PREFACE.len() {
                    return Some((first.freeze(), true));
                }
                // A prefix of the preface so far (a slow client): wait for
                // more.
            }
        }
    }
}

/// One read into a scratch buffer on the stack; the bytes are kept in an
/// allocation of their own size (a usual request head: a few hundred
/// bytes). A read-sized block kept until hyper had the bytes is not all
/// given back by the allocator, and idle connections would hold the rest.
/// The scratch is on the stack because a heap block over 1 KiB takes the
/// allocator's slow path, at every connection; it is left uninitialised
/// (zeroing 4 KiB would be work for nothing), and `ReadBuf` hands out only
/// the bytes the kernel wrote. The scratch lives only within one poll, so
/// it is never part of the connection's future.
///
/// Through `AsyncRead`, not `try_read`: a short read then clears the
/// socket's readiness, so hyper's next read waits for the next event,
/// rather than making a system call that finds nothing (would block).
fn poll_read_some(
    stream: &mut TcpStream,
    cx: &mut std::task::Context<'_>,
    into: &mut BytesMut,
) -> std::task::Poll<io::Result<usize>> {
    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
    let mut buf = tokio::io::ReadBuf::uninit(&mut scratch);
    std::task::ready!(std::pin::Pin::new(stream).poll_read(cx, &mut buf))?;
    into.extend_from_slice(buf.filled());
    std::task::Poll::Ready(Ok(buf.filled().len()))
}

/// One accepted connection, its whole life: the PROXY protocol header
/// from a trusted front proxy, then TLS, or plain HTTP/1.1 (our path, then
/// hyper's if it must) or h2c with prior knowledge. Only the first of
/// these is this future's own state; TLS, h2c and hyper's HTTP/1.1 are
/// boxed, so that an idle plain connection holds little.
#[allow(clippy::too_many_arguments)]
async fn serve_client(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    from_proxy: bool,
    slot: Slot,
    tls: Option<Arc<TlsTermination>>,
    serving: Arc<Serving>,
    proxy: Arc<Shared>,
) {
    if from_proxy {
        // Boxed: only connections from a front proxy pay for the header's
        // reading state.
        let read = client_of(&mut stream, peer, serving.timeouts.header, &proxy);
        match Box::pin(read).await {
            Some(client) => peer = client,
            None => return,
        }
    }
    if let Some(tls) = tls {
        // The handshake runs here, off the accept loop. Boxed: a TLS
        // session is kilobytes.
        let tls = serve_tls(stream, peer, slot, tls, &serving, proxy);
        return Box::pin(tls).await;
    }
    let Some((first, h2)) = sniff(&mut stream, &peer, &serving, &proxy).await else {
        return;
    };
    let (state, client) = client_state(peer, slot, false);
    let first = match h2 {
        false => match serve_fast(&stream, first, &state, &client, &serving, &proxy).await {
            Some(fast::Ended::HandOver(read)) => Some(read),
            Some(fast::Ended::Refused(answer)) => {
                // Boxed: its drain buffer would otherwise be part of every
                // connection's future.
                Box::pin(crate::netio::answer_and_close(&mut stream, answer)).await;
                None
            }
            Some(fast::Ended::Closed) | None => None,
        },
        true => Some(first),
    };
    if let Some(first) = first {
        // Boxed: hyper's connection state is kilobytes, and only the
        // connections that need hyper pay for it.
        let hyper = serve_hyper(stream, first, state, client, h2, &serving, proxy);
        Box::pin(hyper).await
    }
}

/// The first bytes of a plain connection, and whether they are the HTTP/2
/// preface; `None` when the connection is done (closed, silent past the
/// header timeout, shut down, or refused for a PROXY protocol header).
async fn sniff(
    stream: &mut TcpStream,
    peer: &SocketAddr,
    serving: &Serving,
    proxy: &Shared,
) -> Option<(Bytes, bool)> {
    let sniffed = tokio::select! {
        s = tokio::time::timeout(serving.timeouts.header, read_first(stream)) => s,
        _ = serving.stop.asked(usize::from(peer.port())) => return None,
    };
    let (first, h2) = match sniffed {
        Ok(Some(read)) => read,
        Ok(None) => return None,
        Err(_) => {
            tracing::debug!(%peer, "closing connection: nothing sent within the header timeout");
            return None;
        }
    };
    // From a trusted proxy its header is read by now: another one is the
    // client's own, behind the proxy.
    if proxy_protocol::opens_with_header(&first) {
        proxy.metrics.proxy_protocol_refused("untrusted");
        tracing::debug!(%peer, "refusing a PROXY protocol header from a source not trusted");
        // Boxed: its drain buffer would otherwise be part of every
        // connection's future.
        Box::pin(crate::netio::answer_and_close(stream, UNTRUSTED_HEADER)).await;
        return None;
    }
    Some((first, h2))
}

/// A plain HTTP/1.1 connection on our own path, under the watchdog; how
/// it ended (`None`: a timeout or a failure closed it).
async fn serve_fast(
    stream: &TcpStream,
    first: Bytes,
    state: &Arc<ConnState>,
    client: &Client,
    serving: &Serving,
    proxy: &Arc<Shared>,
) -> Option<fast::Ended> {
    let conn = fast::FastConn {
        stream,
        state,
        client,
        proxy,
        front: &serving.front,
        max_head: serving.max_head,
        max_headers: serving.max_headers,
    };
    // On shutdown the fast path closes between requests: at once when
    // idle, after the response otherwise.
    let graceful = |_: Pin<&mut _>| state.close_gracefully();
    let fast = pin!(fast::serve(&conn, first));
    let (timeouts, stop) = (&serving.timeouts, &serving.stop);
    conn::supervise(fast, graceful, state, timeouts, &client.addr, stop).await
}

/// A client connection's shared state, holding its slot, and what the
/// request path knows of it.
fn client_state(peer: SocketAddr, slot: Slot, tls: bool) -> (Arc<ConnState>, Client) {
    let state = ConnState::holding(slot);
    let client = Client {
        addr: peer,
        state: state.clone(),
        tls,
        ip: headers::address_value(peer.ip()),
    };
    (state, client)
}

/// A connection served by hyper: HTTP/2, TLS, and HTTP/1.1 from the first
/// request our own path does not take. `first`: bytes already read.
#[allow(clippy::too_many_arguments)]
async fn serve_hyper<IO>(
    stream: IO,
    first: Bytes,
    state: Arc<ConnState>,
    client: Client,
    h2: bool,
    serving: &Serving,
    proxy: Arc<Shared>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + conn::HoldWrite + Unpin + Send + 'static,
{
    let peer = client.addr;
    // The request's future is boxed: hyper keeps a slot for it for the
    // connection's whole life, and an idle keep-alive connection should not
    // hold kilobytes for a request it is not serving.
    let max_target = proxy.limits.max_uri_bytes;
    let front = serving.front.clone();
    // Most requests pass the front door (one branch when it has nothing
    // to do); the few it answers (redirects, ACME challenges) skip the
    // request path.
    let service = service_fn(move |req| match front.answer(&proxy, &client, &req) {
        Some(answer) => Either::Left(std::future::ready(Ok(answer))),
        None => Either::Right(Box::pin(handler::handle(
            proxy.clone(),
            client.clone(),
            req.map(upstream::ClientBody::Hyper),
        ))),
    });
    let mut io = Tracked::new(stream, state.clone(), first);
    if !h2 {
        io = io.limit_targets(max_target);
    }
    let io = TokioIo::new(io);
    let (protocols, timeouts) = (&serving.protocols, &serving.timeouts);
    if h2 {
        let conn = pin!(protocols.h2.serve_connection(io, service));
        conn::supervise(
            conn,
            |c| c.graceful_shutdown(),
            &state,
            timeouts,
            &peer,
            &serving.stop,
        )
        .await;
    } else {
        let conn = pin!(protocols.h1.serve_connection(io, service).with_upgrades());
        conn::supervise(
            conn,
            |c| c.graceful_shutdown(),
            &state,
            timeouts,
            &peer,
            &serving.stop,
        )
        .await;
    }
}

/// Tell a client over the limit why it is refused, then close.
async fn refuse_at_capacity(mut stream: TcpStream) {
    crate::netio::answer_and_close(&mut stream, AT_CAPACITY).await;
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}

async fn sweep_pool(pool: Arc<upstream::Pool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        pool.sweep();
    }
}

/// Bind a client listener with a deep accept queue (bursts of new
/// connections must not be dropped by the kernel), whose connections
/// acknowledge a request with its response.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one
    // setsockopt here instead of one per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    // A new connection's first segments are acknowledged at once (quick-ack
    // mode), so the request gets an ACK segment of its own just before the
    // response arrives to acknowledge it anyway. Turned off here, after
    // listen() (which resets it), accepted sockets inherit delayed ACKs:
    // one segment less per connection for both hosts, as HAProxy's
    // tcp-smart-accept. A slow answer still gets its ACK from the
    // delayed-ACK timer (40 ms at most on a fresh connection).
    if let Err(e) = socket.set_tcp_quickack(false) {
        tracing::debug!(error = %e, "quick ACKs stay on for new connections");
    }
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpStream};

    #[tokio::test]
    async fn accepted_connections_delay_their_first_ack() {
        let listener = super::bind((Ipv4Addr::LOCALHOST, 0).into()).expect("bind");
        let addr = listener.local_addr().expect("listener address");
        let _client = TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let sock = socket2::SockRef::from(&accepted);
        assert!(
            !sock.tcp_quickack().expect("read TCP_QUICKACK"),
            "an accepted connection should not acknowledge the request on its own"
        );
        assert!(sock.tcp_nodelay().expect("read TCP_NODELAY"));
    }

    /// The size of the future `f` returns, without making one.
    #[allow(clippy::type_complexity)]
    fn future_size<A, B, C, D, E, G, H, F: std::future::Future>(
        _: fn(A, B, C, D, E, G, H) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's task is this future: all of it is held for the
    /// connection's life, idle or not. Requests, TLS, h2c and hyper's
    /// connection are boxed apart, so that it stays small.
    #[test]
    fn a_connection_future_is_small() {
        let size = future_size::<
            tokio::net::TcpStream,
            std::net::SocketAddr,
            bool,
            super::Slot,
            Option<std::sync::Arc<super::TlsTermination>>,
            std::sync::Arc<super::Serving>,
            std::sync::Arc<super::Shared>,
            _,
        >(super::serve_client);
        println!("serve_client's future: {size} bytes");
        // 1120 bytes in a debug build when this was written; an idle
        // connection whose future held a buffer or hyper's state would be
        // several times that.
        assert!(size <= 1200, "serve_client's future is {size} bytes");
    }

    #[test]
    fn canned_answers_give_their_body_length() {
        for answer in [super::AT_CAPACITY, super::UNTRUSTED_HEADER] {
            let text = std::str::from_utf8(answer).expect("text");
            let (head, body) = text.split_once("\r\n\r\n").expect("head");
            let length = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("content-length");
            assert_eq!(length.parse::<usize>().ok(), Some(body.len()), "{text}");
        }
    }
}
