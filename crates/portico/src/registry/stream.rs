//! The body of a change stream (`GET /v1/services?watch=1`): a `full`
//! document, then each change's line from the registry's log, in order,
//! with a `ping` after a silence. A watcher holds only its place in the
//! shared log (lines encoded once, shared by every watcher) and a timer;
//! whatever its reading pace, it costs the Tower no memory of its own
//! beyond one batch: when its place falls out of the log it gets one
//! `full` at the index of then and goes on from there.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Sleep;
use tokio_util::sync::ReusableBoxFuture;

use super::Registry;
use crate::services_doc::{encode_ping, FULL_PREFIX};

/// How long a stream stays silent before a `ping`, at most.
pub const PING_EVERY: Duration = Duration::from_secs(10);

/// Lines taken out of the log at once, and sent as one frame: a watcher
/// catching up writes large frames, not one per change.
const BATCH_LINES: usize = 128;

/// One watcher's stream.
pub struct WatchBody {
    registry: Registry,
    /// The index of the next change this watcher is owed.
    next: u64,
    /// Frames taken out, not yet handed to hyper (one batch, or a `full`).
    queued: VecDeque<Bytes>,
    /// Lines read from the log, before they become one frame.
    scratch: Vec<Bytes>,
    wake: ReusableBoxFuture<'static, Wake>,
    ping: Pin<Box<Sleep>>,
    ping_every: Duration,
    ended: bool,
    /// The stream's place under `--http-max-watches`.
    _slot: OwnedSemaphorePermit,
}

enum Wake {
    Changed(watch::Receiver<u64>, watch::Receiver<bool>),
    Stop,
}

/// Until the registry's revision moves (or the Tower stops).
async fn wait(mut changes: watch::Receiver<u64>, mut shutdown: watch::Receiver<bool>) -> Wake {
    let stop = tokio::select! {
        r = changes.changed() => r.is_err(),
        _ = shutdown.wait_for(|stop| *stop) => true,
    };
    if stop {
        Wake::Stop
    } else {
        Wake::Changed(changes, shutdown)
    }
}

impl WatchBody {
    /// A stream from change `resume + 1` when the log still holds every
    /// change after it (the caller checked that it is of this run), else
    /// from a `full` document.
    pub fn start(
        registry: Registry,
        resume: Option<u64>,
        slot: OwnedSemaphorePermit,
        shutdown: watch::Receiver<bool>,
        ping_every: Duration,
    ) -> Self {
        // Subscribed before the place is taken: a change after it wakes us.
        let changes = registry.subscribe();
        registry.counters().streams.fetch_add(1, Relaxed);
        let mut body = Self {
            registry,
            next: 0,
            queued: VecDeque::new(),
            scratch: Vec::new(),
            wake: ReusableBoxFuture::new(wait(changes, shutdown)),
            ping: Box::pin(tokio::time::sleep(ping_every)),
            ping_every,
            ended: false,
            _slot: slot,
        };
        match resume.filter(|n| body.registry.log_covers(*n)) {
            Some(n) => body.next = n + 1,
            None => body.queue_full(),
        }
        body
    }

    /// The whole document as of now, as three frames sharing the cached
    /// document's bytes.
    fn queue_full(&mut self) {
        let (index, doc) = self.registry.document(Instant::now());
        self.next = index + 1;
        self.queued.push_back(Bytes::from_static(FULL_PREFIX));
        self.queued.push_back(doc.slice(1.min(doc.len())..));
        self.queued.push_back(Bytes::from_static(b"\n"));
    }

    /// Take what the log holds from our place on; true if anything was
    /// queued.
    fn fill(&mut self) -> bool {
        self.scratch.clear();
        match self
            .registry
            .read_log(self.next, BATCH_LINES, &mut self.scratch)
        {
            Ok(_) if self.scratch.is_empty() => false,
            Ok(next) => {
                self.next = next;
                let frame = batch(&mut self.scratch);
                self.queued.push_back(frame);
                true
            }
            Err(super::Behind) => {
                self.registry.counters().resyncs.fetch_add(1, Relaxed);
                self.queue_full();
                true
            }
        }
    }

    fn rearm_ping(&mut self) {
        let at = tokio::time::Instant::now() + self.ping_every;
        self.ping.as_mut().reset(at);
    }
}

/// Lines as one frame: one line as it is, several copied together.
fn batch(lines: &mut Vec<Bytes>) -> Bytes {
    if lines.len() == 1 {
        return lines.pop().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(lines.iter().map(Bytes::len).sum());
    for line in lines.drain(..) {
        out.extend_from_slice(&line);
    }
    out.freeze()
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.queued.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            if this.fill() {
                this.rearm_ping();
                continue;
            }
            match this.wake.poll(cx) {
                Poll::Ready(Wake::Changed(changes, shutdown)) => {
                    this.wake.set(wait(changes, shutdown));
                    continue;
                }
                Poll::Ready(Wake::Stop) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {}
            }
            if this.ping.as_mut().poll(cx).is_ready() {
                this.queued.push_back(encode_ping(this.next - 1));
                this.rearm_ping();
                continue;
            }
            return Poll::Pending;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.queued.is_empty()
    }
}

impl Drop for WatchBody {
    fn drop(&mut self) {
        self.registry.counters().streams.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::registry::admit::Admission;
    use crate::registry::Limits;
    use crate::services_doc::{decode_line, Change, StreamLine};
    use http_body_util::BodyExt;
    use portico_wire::{decode_envelope, Reply};
    use std::net::IpAddr;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn send(r: &Registry, datagram: &str) -> Reply {
        let e = decode_envelope(datagram.as_bytes()).unwrap();
        r.handle(e, &[], LOCAL, Instant::now(), 0)
    }

    fn slot() -> OwnedSemaphorePermit {
        Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap()
    }

    /// Frames until `n` whole lines are in, decoded.
    async fn lines(body: &mut WatchBody, n: usize) -> Vec<StreamLine> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while out.len() < n {
            let frame = body.frame().await.unwrap().unwrap();
            buf.extend_from_slice(frame.data_ref().unwrap());
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                out.push(decode_line(&buf[..end]).unwrap());
                buf.drain(..=end);
            }
        }
        assert!(buf.is_empty());
        out
    }

    fn index(line: &StreamLine) -> u64 {
        match line {
            StreamLine::Full(doc) => doc.index,
            StreamLine::Change { index, .. } | StreamLine::Ping { index } => *index,
        }
    }

    #[tokio::test]
    async fn full_then_changes_then_a_resync_when_the_log_moved_on() {
        let r = Registry::new(Limits::default(), None, Admission::default());
        r.set_watch_log(16);
        send(&r, "REGISTER|web|10.0.0.1|80");
        let (_stop, shutdown) = watch::channel(false);
        let mut body = WatchBody::start(r.clone(), None, slot(), shutdown, PING_EVERY);
        let first = lines(&mut body, 1).await;
        let StreamLine::Full(doc) = &first[0] else {
            panic!("{first:?}")
        };
        assert_eq!((doc.index, doc.services["web"].len()), (1, 1));
        send(&r, "REGISTER|web|10.0.0.2|80");
        send(&r, "DEREGISTER|web|10.0.0.1|80");
        let got = lines(&mut body, 2).await;
        assert_eq!(got.iter().map(index).collect::<Vec<_>>(), [2, 3]);
        assert!(matches!(
            &got[1],
            StreamLine::Change {
                change: Change::Remove { .. },
                ..
            }
        ));
        // More changes than the log keeps, while the watcher reads nothing.
        for i in 0..20 {
            send(&r, &format!("REGISTER|many|10.0.1.{}|80", i + 1));
        }
        let got = lines(&mut body, 1).await;
        let StreamLine::Full(doc) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(doc.index, 23);
        assert_eq!(doc.services["many"].len(), 20);
        assert_eq!(r.counters().resyncs.load(Relaxed), 1);
        send(&r, "DEREGISTER|web|10.0.0.2|80");
        assert_eq!(index(&lines(&mut body, 1).await[0]), 24);
    }

    #[tokio::test]
    async fn a_resume_starts_after_its_index_and_a_stop_ends_the_body() {
        let r = Registry::new(Limits::default(), None, Admission::default());
        for i in 1..=3 {
            send(&r, &format!("REGISTER|web|10.0.0.{i}|80"));
        }
        let (stop, shutdown) = watch::channel(false);
        let mut body = WatchBody::start(r.clone(), Some(1), slot(), shutdown.clone(), PING_EVERY);
        let got = lines(&mut body, 2).await;
        assert_eq!(got.iter().map(index).collect::<Vec<_>>(), [2, 3]);
        // An index from the future is no place in this run: a full.
        let mut future = WatchBody::start(r.clone(), Some(99), slot(), shutdown, PING_EVERY);
        assert!(matches!(
            lines(&mut future, 1).await[0],
            StreamLine::Full(_)
        ));
        assert_eq!(r.counters().streams.load(Relaxed), 2);
        stop.send(true).unwrap();
        assert!(body.frame().await.is_none(), "ends cleanly at shutdown");
        drop((body, future));
        assert_eq!(r.counters().streams.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn silence_gets_a_ping_at_the_watchers_place() {
        let r = Registry::new(Limits::default(), None, Admission::default());
        send(&r, "REGISTER|web|10.0.0.1|80");
        let (_stop, shutdown) = watch::channel(false);
        let every = Duration::from_millis(20);
        let mut body = WatchBody::start(r.clone(), Some(1), slot(), shutdown, every);
        assert_eq!(lines(&mut body, 1).await, [StreamLine::Ping { index: 1 }]);
        send(&r, "REGISTER|web|10.0.0.2|80");
        assert_eq!(index(&lines(&mut body, 1).await[0]), 2);
        assert_eq!(lines(&mut body, 1).await, [StreamLine::Ping { index: 2 }]);
    }
}
