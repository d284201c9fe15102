//! The accept loop shared by the two small HTTP servers, the Tower's API
//! and the admin listener: a cap on open connections (503 past it), and a
//! watchdog per connection for the header and idle timeouts. The data plane
//! has its own loop, tuned for throughput (`ingress::serve`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::netio::{answer_and_close, Tap, Tapped};

/// hyper's read and write buffers at most: a request head is refused (431)
/// past it.
const MAX_BUF: usize = 64 * 1024;

/// The send buffer of each connection (the kernel doubles it).
const SEND_BUFFER: usize = 128 * 1024;

/// How long a client may hold one connection, and how many it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// From the first byte of a request head to its end.
    pub header_timeout: Duration,
    /// No request in flight and no byte moving for this long: closed.
    pub idle_timeout: Duration,
    /// Open connections at most; past it a client gets a 503 and a close.
    pub max_connections: usize,
}

impl ServerLimits {
    /// The admin listener's. Its clients are a scraper and a few status
    /// pages (one keep-alive connection each), so these are not flags.
    pub const ADMIN: Self = Self {
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 256,
    };
}

/// Connections past the cap that may be getting their 503 at once; beyond
/// this they are closed without one, so a flood costs bounded memory.
const MAX_REFUSING: usize = 64;

/// Serve `handler` on `listener` until shutdown. `what` names the listener
/// in logs; `refusal` is the whole HTTP/1.1 response a client past the cap
/// gets (it must say `connection: close`). The handler is told each
/// request's peer address; its body type is its own (a whole buffer, or
/// the Tower's change stream).
pub async fn serve<H, F, B>(
    listener: TcpListener,
    what: &'static str,
    limits: ServerLimits,
    refusal: &'static [u8],
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(IpAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "{what}: accept failed");
                // Out of descriptors: give connections a moment to close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A client that stops reading (a stalled watcher) holds at most this
        // much of the Tower's memory in the kernel, not the autotuned 4 MiB.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    connection(stream, peer.ip(), what, limits, handler).await;
                    drop(slot);
                });
            }
            Err(_) => {
                tracing::debug!(max = limits.max_connections, "{what}: at capacity");
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, refusal).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

/// One connection: hyper's HTTP/1.1 or HTTP/2, closed by the watchdog when
/// a head is slow or nothing happens.
async fn connection<H, F, B>(
    stream: TcpStream,
    peer: IpAddr,
    what: &'static str,
    limits: ServerLimits,
    handler: H,
) where
    H: Fn(IpAddr, Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        io: stream,
        tap: activity.clone(),
    });
    let marks = activity.clone();
    let service = hyper::service::service_fn(move |req| {
        let in_flight = marks.request_started();
        let answer = handler(peer, req);
        async move {
            let resp = answer.await;
            drop(in_flight);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // The watchdog times heads: hyper's timer would also cut the wait for
    // the next request on a keep-alive connection, which the idle timeout owns.
    builder.http1().header_read_timeout(None);
    // Requests here are small; a client that stops reading (a stalled
    // watcher) leaves at most this much queued in hyper, not 400 KB.
    builder.http1().max_buf_size(MAX_BUF);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    // A quarter of the shorter timeout: closes within 25% of it, and a
    // connection costs at most a few wake-ups a second.
    let period = (limits.header_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "{what}: connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep(period) => {
                if let Some(why) = activity.overdue(&limits) {
                    tracing::debug!("{what}: closing a connection: {why}");
                    return;
                }
            }
        }
    }
}

/// What the watchdog knows of a connection, in milliseconds since it
/// opened plus one (0 meaning unset): kept by the socket and the service.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    last_moved: AtomicU64,
    /// When bytes arrived with no request in flight, or the connection
    /// opened: a head is owed.
    head_began: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_moved: AtomicU64::new(1),
            // A new connection owes its first head at once: a client that
            // connects and says nothing holds a slot for the header
            // timeout, not the idle one.
            head_began: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn moved(&self, read: bool) {
        let now = self.now();
        self.last_moved.store(now, Relaxed);
        if read && self.in_flight.load(Relaxed) == 0 {
            let _ = self.head_began.compare_exchange(0, now, Relaxed, Relaxed);
        }
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        self.head_began.store(0, Relaxed);
        InFlight(self.clone())
    }

    /// Why the connection should close now, if it should. A request in
    /// flight (a blocking query may wait minutes in silence) holds it open.
    fn overdue(&self, limits: &ServerLimits) -> Option<&'static str> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        let now = self.now();
        let head = self.head_began.load(Relaxed);
        let past =
            |since: u64, limit: Duration| Duration::from_millis(now.saturating_sub(since)) >= limit;
        if head != 0 && past(head, limits.header_timeout) {
            return Some("request head not complete within the header timeout");
        }
        if past(self.last_moved.load(Relaxed), limits.idle_timeout) {
            return Some("idle");
        }
        None
    }
}

/// A request being answered; the idle time counts from its end.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_moved.store(self.0.now(), Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The socket, noting each byte moved for the watchdog.
type Tracked = Tapped<Arc<Activity>>;

impl Tap for Arc<Activity> {
    fn read(&mut self, _io: &TcpStream, _polled: &Poll<io::Result<()>>, grew: bool) {
        if grew {
            self.moved(true);
        }
    }

    fn wrote(&mut self, polled: &Poll<io::Result<usize>>) {
        if matches!(polled, Poll::Ready(Ok(n)) if *n > 0) {
            self.moved(false);
        }
    }
}

/// Tell a client past the cap why, then close. The answer waits a moment
/// for the request, so that a client sees it as the response to what it
/// sent rather than an unsolicited one.
async fn refuse(mut stream: TcpStream, refusal: &'static [u8]) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut sink)).await;
    answer_and_close(&mut stream, refusal).await;
}

/// Whether a canned refusal's content-length is its body's (for tests of
/// the constants callers pass to `serve`).
#[cfg(test)]
pub(crate) fn is_framed(refusal: &[u8]) -> bool {
    let text = String::from_utf8_lossy(refusal);
    text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
        head.contains(&format!("\r\ncontent-length: {}\r\n", body.len()))
            && head.contains("\r\nconnection: close")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ServerLimits = ServerLimits {
        header_timeout: Duration::from_millis(0),
        idle_timeout: Duration::from_secs(3600),
        max_connections: 1,
    };

    #[test]
    fn a_begun_head_is_overdue_and_a_request_in_flight_is_not() {
        let a = Arc::new(Activity::new());
        assert!(
            a.overdue(&LIMITS).is_some(),
            "a new connection owes its head at once; timeout zero"
        );
        a.moved(true);
        assert!(a.overdue(&LIMITS).is_some(), "head begun, timeout zero");
        let in_flight = a.request_started();
        a.moved(true);
        assert_eq!(a.overdue(&LIMITS), None, "a body, not a head");
        drop(in_flight);
        assert_eq!(a.overdue(&LIMITS), None, "the head was done");
    }
}
