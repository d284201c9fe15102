//! The client's request body on its way to a backend: capped by
//! `--max-body-bytes`, its faults told apart as the client's, and read
//! ahead (chunked) before a backend is chosen.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::ingress::conn::ConnState;
use crate::ingress::error::ClientBodyFault;

/// What read ahead of a request body holds at most before a backend is
/// chosen: the rest streams as it comes.
const READ_AHEAD_BYTES: usize = 64 * 1024;

/// Where the body notes its fault for the handler: the send that failed
/// through it reports hyper's error, which tells nothing of who failed.
#[derive(Debug, Default)]
pub struct FaultNote(std::sync::atomic::AtomicU8);

impl FaultNote {
    fn set(&self, fault: ClientBodyFault) {
        let code = match fault {
            ClientBodyFault::TooLarge => 1,
            ClientBodyFault::Malformed => 2,
        };
        self.0.store(code, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<ClientBodyFault> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Some(ClientBodyFault::TooLarge),
            2 => Some(ClientBodyFault::Malformed),
            _ => None,
        }
    }
}

/// The body of a client's request: hyper's, or none at all (a request our
/// own HTTP/1.1 path parsed, which takes only bodiless requests).
#[derive(Debug)]
pub enum ClientBody {
    Hyper(Incoming),
    None,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            ClientBody::None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::None => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::None => SizeHint::with_exact(0),
        }
    }
}

/// A client's request body with a byte limit (`--max-body-bytes`), whose
/// errors are the client's. Past the limit, or on bad framing, the body
/// fails, which aborts the upstream request and discards its connection,
/// and the note says why, so the client gets 413 or 400 rather than 502.
pub struct Capped {
    inner: ClientBody,
    /// Frames `read_ahead` took before a backend was chosen; sent first.
    ahead: std::collections::VecDeque<Frame<Bytes>>,
    /// `inner` ended during `read_ahead`.
    ended: bool,
    left: u64,
    /// `None` for a body that had ended before it was read, which cannot
    /// fail: most requests, spared an allocation.
    fault: Option<Arc<FaultNote>>,
    /// The client connection, told when the body has been read to its end
    /// (`ConnState::body_ended`); `None` once told, or if it had ended.
    conn: Option<Arc<ConnState>>,
}

impl Capped {
    pub fn new(inner: ClientBody, limit: u64) -> (Self, Option<Arc<FaultNote>>) {
        let fault = (!inner.is_end_stream()).then(|| Arc::new(FaultNote::default()));
        let capped = Self {
            inner,
            ahead: Default::default(),
            ended: false,
            left: limit,
            fault: fault.clone(),
            conn: None,
        };
        (capped, fault)
    }

    /// Tell `conn` when this body has been read to its end.
    pub fn ending_for(mut self, conn: &Arc<ConnState>) -> Self {
        if !self.is_end_stream() {
            conn.body_held();
            self.conn = Some(conn.clone());
        }
        self
    }

    fn note_trailers(&self, frame: &Frame<Bytes>) {
        if let (true, Some(conn)) = (frame.is_trailers(), &self.conn) {
            conn.saw_trailers();
        }
    }

    fn note_end(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.body_let_go(true);
        }
    }

    fn fail(&self, fault: ClientBodyFault) -> ClientBodyFault {
        if let Some(note) = &self.fault {
            note.set(fault);
        }
        fault
    }

    /// Take what of the body has already come, before any backend is
    /// contacted, so that bad framing already in hand is refused with
    /// nothing forwarded. hyper hands a body over one frame at a time,
    /// decoded by the connection as the frame is asked for: each frame in
    /// hand costs a yield to it, and the first that is not costs one more.
    /// For chunked HTTP/1.1 bodies only: a Content-Length body has no
    /// framing to get wrong.
    pub async fn read_ahead(&mut self) -> Result<(), ClientBodyFault> {
        let mut held = 0u64;
        let mut yielded = false;
        while held < READ_AHEAD_BYTES as u64 && !self.ended {
            let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut self.inner).poll_frame(cx))).await;
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    self.note_trailers(&frame);
                    held += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if held > self.left {
                        return Err(self.fail(ClientBodyFault::TooLarge));
                    }
                    self.ahead.push_back(frame);
                    yielded = false;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "request body failed before a backend was chosen");
                    return Err(self.fail(ClientBodyFault::Malformed));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    self.note_end();
                }
                Poll::Pending if yielded => break,
                Poll::Pending => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Capped {
    /// Let go before its end (an early answer, a failed send): hyper drains
    /// the rest once.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.body_let_go(false);
        }
    }
}

impl Body for Capped {
    type Data = Bytes;
    type Error = ClientBodyFault;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyFault>>> {
        let frame = match self.ahead.pop_front() {
            Some(frame) => frame,
            None if self.ended => return Poll::Ready(None),
            None => match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    self.note_trailers(&frame);
                    frame
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed while streaming");
                    return Poll::Ready(Some(Err(self.fail(ClientBodyFault::Malformed))));
                }
                None => {
                    self.note_end();
                    return Poll::Ready(None);
                }
            },
        };
        if self.inner.is_end_stream() {
            self.note_end();
        }
        let len = frame.data_ref().map_or(0, |d| d.len() as u64);
        if len > self.left {
            return Poll::Ready(Some(Err(self.fail(ClientBodyFault::TooLarge))));
        }
        self.left -= len;
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_empty() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // Read ahead of a chunked body only, which stays chunked: the
        // inner hint (unknown) is still the right one.
        self.inner.size_hint()
    }
}
