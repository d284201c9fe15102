//! Following the Tower's change stream (`GET /v1/services?watch=1`): a
//! full document, then each change with its index, applied to the snapshot
//! in proportion to what it touches. Lines are checked before anything is
//! applied: one that does not parse, or an index that is not the next,
//! ends the stream, and the watch starts again from a full document.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::watch::{HttpClient, WatchError, MAX_DOC};
use super::Watched;
use crate::services_doc::{decode_line, Change, LineError, ServicesDoc, StreamLine};

/// The Tower pings after 10 s without a line; three times that without
/// one, the connection is taken for dead.
const SILENCE: Duration = Duration::from_secs(30);
const HEADERS: Duration = Duration::from_secs(5);

/// A stream the watch cannot go on with: it drops the stream and asks for
/// a full document, which is always safe.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("a line of the Tower's change stream is malformed")]
    Line(#[from] LineError),
    #[error("the Tower's change stream gave index {got} where {expected} was due")]
    Gap { expected: u64, got: u64 },
    #[error("the Tower's change stream began with a change, not a full document")]
    NoDocument,
    #[error("the Tower's change stream broke off in the middle of a line")]
    Truncated,
    #[error("a line of the Tower's change stream is over {MAX_DOC} bytes")]
    TooLong,
    #[error("the Tower's change stream gave index {0}, the last there can be")]
    LastIndex(u64),
}

/// How a stream ended.
#[derive(Debug)]
pub enum Ended {
    /// The connection failed or ended between lines: resume from the
    /// snapshot's index.
    Lost(WatchError),
    /// A line that cannot be trusted: start again from a full document.
    Corrupt(StreamError),
    /// The Tower answered with its plain document: it has no stream.
    NoStream(ServicesDoc),
}

/// What one stream did before it ended.
#[derive(Debug, Default)]
pub struct Progress {
    pub documents: usize,
    pub changes: usize,
}

/// The index the next change must carry, once a document set it.
#[derive(Debug, Clone, Copy)]
struct Cursor(Option<u64>);

impl Cursor {
    /// Check one line against the stream so far, and move on past it.
    fn admit(&mut self, line: &StreamLine) -> Result<(), StreamError> {
        match (line, self.0) {
            // No Tower reaches the last index; one that says so cannot be
            // followed past it.
            (StreamLine::Full(doc), _) => {
                self.0 = Some(
                    doc.index
                        .checked_add(1)
                        .ok_or(StreamError::LastIndex(doc.index))?,
                );
                Ok(())
            }
            (StreamLine::Change { .. } | StreamLine::Ping { .. }, None) => {
                Err(StreamError::NoDocument)
            }
            (StreamLine::Change { index, .. }, Some(next)) if *index == next => {
                self.0 = Some(next.checked_add(1).ok_or(StreamError::LastIndex(next))?);
                Ok(())
            }
            (StreamLine::Ping { index }, Some(next)) if index.checked_add(1) == Some(next) => {
                Ok(())
            }
            (StreamLine::Change { index, .. } | StreamLine::Ping { index }, Some(next)) => {
                Err(StreamError::Gap {
                    expected: next,
                    got: *index,
                })
            }
        }
    }
}

/// Complete lines out of the bytes as they come.
#[derive(Debug, Default)]
struct Lines {
    buf: BytesMut,
    /// Bytes already searched for a newline.
    scanned: usize,
}

impl Lines {
    fn push(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.buf.extend_from_slice(data);
        if self.buf.len() > MAX_DOC {
            return Err(StreamError::TooLong);
        }
        Ok(())
    }

    fn next_line(&mut self) -> Option<BytesMut> {
        let Some(end) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
            self.scanned = self.buf.len();
            return None;
        };
        let mut line = self.buf.split_to(self.scanned + end + 1);
        self.scanned = 0;
        line.truncate(line.len() - 1);
        Some(line)
    }

    /// No part of a line is waiting for the rest of it.
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// One stream: open it (resuming after `resume`'s index when given), apply
/// what it says until it ends, and say how it ended.
pub async fn follow(
    client: &HttpClient,
    addr: SocketAddr,
    watched: &Watched,
    resume: Option<(u64, u64)>,
    progress: &mut Progress,
) -> Ended {
    let uri = match resume {
        Some((index, epoch)) => {
            format!("http://{addr}/v1/services?watch=1&index={index}&epoch={epoch}")
        }
        None => format!("http://{addr}/v1/services?watch=1"),
    };
    let Ok(uri) = uri.parse::<http::Uri>() else {
        return Ended::Lost(WatchError::Timeout(addr));
    };
    let resp = match tokio::time::timeout(HEADERS, client.get(uri)).await {
        Err(_) => return Ended::Lost(WatchError::Timeout(addr)),
        Ok(Err(e)) => return Ended::Lost(WatchError::Connect(addr, e)),
        Ok(Ok(r)) => r,
    };
    if resp.status() != http::StatusCode::OK {
        return Ended::Lost(WatchError::Status(resp.status()));
    }
    let is_stream = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/x-ndjson"));
    if !is_stream {
        return plain_document(addr, resp.into_body()).await;
    }
    let mut cursor = Cursor(resume.and_then(|(index, _)| index.checked_add(1)));
    if resume.is_some() {
        // The Tower took our index: the table is current until it says more.
        let was_synced = watched.is_synced();
        watched.mark_synced();
        log_synced(watched, was_synced);
    }
    read_lines(addr, resp.into_body(), watched, &mut cursor, progress).await
}

/// An old Tower's answer to `?watch=1`: the document, as a plain GET.
async fn plain_document(addr: SocketAddr, body: Incoming) -> Ended {
    let read = tokio::time::timeout(HEADERS, Limited::new(body, MAX_DOC).collect()).await;
    let body = match read {
        Err(_) => return Ended::Lost(WatchError::Timeout(addr)),
        Ok(Err(e)) => return Ended::Lost(WatchError::Body(e)),
        Ok(Ok(b)) => b.to_bytes(),
    };
    match serde_json::from_slice(&body) {
        Ok(doc) => Ended::NoStream(doc),
        Err(e) => Ended::Lost(WatchError::Json(e)),
    }
}

async fn read_lines(
    addr: SocketAddr,
    mut body: Incoming,
    watched: &Watched,
    cursor: &mut Cursor,
    progress: &mut Progress,
) -> Ended {
    let mut lines = Lines::default();
    let mut changes: Vec<Change> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(SILENCE, body.frame()).await {
            Err(_) => return Ended::Lost(WatchError::Timeout(addr)),
            Ok(Some(Ok(frame))) => frame,
            // Between lines the stream can be resumed; within one, a line
            // was lost.
            Ok(_) if !lines.is_empty() => return Ended::Corrupt(StreamError::Truncated),
            Ok(Some(Err(e))) => return Ended::Lost(WatchError::Body(Box::new(e))),
            Ok(None) => return Ended::Lost(WatchError::Ended),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Err(e) = lines.push(&data) {
            return Ended::Corrupt(e);
        }
        if let Err(e) = take_lines(&mut lines, watched, cursor, &mut changes, progress) {
            return Ended::Corrupt(e);
        }
    }
}

/// Apply every complete line received so far: changes in one batch, one
/// swap for all of them. A bad line stops it before anything after the
/// last good one is applied.
fn take_lines(
    lines: &mut Lines,
    watched: &Watched,
    cursor: &mut Cursor,
    changes: &mut Vec<Change>,
    progress: &mut Progress,
) -> Result<(), StreamError> {
    let mut pinged = false;
    let mut result = Ok(());
    while let Some(bytes) = lines.next_line() {
        let line = match decode_line(&bytes) {
            Ok(line) => line,
            Err(e) => {
                result = Err(e.into());
                break;
            }
        };
        if let Err(e) = cursor.admit(&line) {
            result = Err(e);
            break;
        }
        match line {
            StreamLine::Full(doc) => {
                changes.clear();
                install(watched, &doc);
                progress.documents += 1;
            }
            StreamLine::Change { change, .. } => changes.push(change),
            StreamLine::Ping { .. } => pinged = true,
        }
    }
    if !changes.is_empty() {
        let index = cursor.0.map_or(0, |next| next - 1);
        watched.apply(changes, index);
        progress.changes += changes.len();
        changes.clear();
    } else if pinged {
        watched.mark_synced();
    }
    result
}

pub(super) fn install(watched: &Watched, doc: &ServicesDoc) {
    let was_synced = watched.is_synced();
    watched.install(doc);
    log_synced(watched, was_synced);
}

/// Said each time the table is current again, after a start or an outage.
fn log_synced(watched: &Watched, was_synced: bool) {
    if !was_synced {
        tracing::info!(
            endpoints = watched.snapshot().endpoint_count(),
            "discovery: in sync with the Tower"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::services_doc::{encode_change, encode_ping, FULL_PREFIX};
    use portico_wire::ServiceName;

    fn full(index: u64, services: &str) -> Vec<u8> {
        let mut line = FULL_PREFIX.to_vec();
        line.extend_from_slice(
            format!("\"index\":{index},\"epoch\":1,\"warm\":true,\"services\":{services}}}\n")
                .as_bytes(),
        );
        line
    }

    fn add(index: u64, addr: &str) -> Vec<u8> {
        encode_change(
            index,
            &Change::Add {
                service: ServiceName::parse("web").unwrap(),
                addr: addr.parse().unwrap(),
                ttl_ms: 1,
            },
        )
        .to_vec()
    }

    fn endpoints(w: &Watched) -> Vec<String> {
        let s = w.snapshot();
        let mut out: Vec<String> = s
            .services()
            .flat_map(|(n, set)| {
                set.endpoints()
                    .iter()
                    .map(move |e| format!("{n} {}", e.addr))
            })
            .collect();
        out.sort();
        out
    }

    /// Feed `bytes` in pieces of `step`, as frames would bring them.
    fn feed(
        w: &Watched,
        cursor: &mut Cursor,
        bytes: &[u8],
        step: usize,
    ) -> Result<(), StreamError> {
        let mut lines = Lines::default();
        let mut changes = Vec::new();
        let mut progress = Progress::default();
        for piece in bytes.chunks(step) {
            lines.push(piece)?;
            take_lines(&mut lines, w, cursor, &mut changes, &mut progress)?;
        }
        if lines.is_empty() {
            Ok(())
        } else {
            Err(StreamError::Truncated)
        }
    }

    #[test]
    fn a_document_then_changes_in_any_framing() {
        let mut stream = full(
            5,
            r#"{"web":[{"ip":"10.0.0.1","port":80,"ttl_left_ms":1}]}"#,
        );
        stream.extend(add(6, "10.0.0.2:80"));
        stream.extend(encode_ping(6).to_vec());
        stream.extend(add(7, "10.0.0.3:80"));
        for step in [1, 7, 64, stream.len()] {
            let w = Watched::default();
            let mut cursor = Cursor(None);
            feed(&w, &mut cursor, &stream, step).unwrap();
            assert_eq!(
                endpoints(&w),
                ["web 10.0.0.1:80", "web 10.0.0.2:80", "web 10.0.0.3:80"]
            );
            assert_eq!(w.snapshot().index, 7);
        }
    }

    #[test]
    fn a_bad_line_applies_nothing_after_the_last_good_one() {
        let base = full(
            5,
            r#"{"web":[{"ip":"10.0.0.1","port":80,"ttl_left_ms":1}]}"#,
        );
        let kind = |e: &StreamError| match e {
            StreamError::Line(_) => "line",
            StreamError::Gap { .. } => "gap",
            StreamError::NoDocument => "no document",
            StreamError::Truncated => "truncated",
            StreamError::TooLong => "too long",
            StreamError::LastIndex(_) => "last index",
        };
        let cases = [
            (add(7, "10.0.0.2:80"), "gap"),
            (add(5, "10.0.0.2:80"), "gap"),
            (encode_ping(6).to_vec(), "gap"),
            (
                b"{\"type\":\"add\",\"index\":6,\"service\":\"web\"}\n".to_vec(),
                "line",
            ),
            (b"not json\n".to_vec(), "line"),
        ];
        for (bad, expected) in cases {
            let w = Watched::default();
            let mut stream = base.clone();
            stream.extend(bad);
            stream.extend(add(6, "10.0.0.3:80"));
            let err = feed(&w, &mut Cursor(None), &stream, stream.len()).unwrap_err();
            assert_eq!(kind(&err), expected, "{err:?}");
            assert_eq!(endpoints(&w), ["web 10.0.0.1:80"]);
        }
        // Cut within a line: what came before it stands, the piece is not applied.
        let w = Watched::default();
        let mut stream = base.clone();
        stream.extend(add(6, "10.0.0.2:80"));
        stream.extend(&add(7, "10.0.0.3:80")[..20]);
        let err = feed(&w, &mut Cursor(None), &stream, 9).unwrap_err();
        assert_eq!(kind(&err), "truncated");
        assert_eq!(endpoints(&w), ["web 10.0.0.1:80", "web 10.0.0.2:80"]);
        let w = Watched::default();
        let err = feed(&w, &mut Cursor(None), &add(1, "10.0.0.2:80"), 100).unwrap_err();
        assert!(matches!(err, StreamError::NoDocument));
        assert!(endpoints(&w).is_empty());
    }

    #[test]
    fn a_resumed_stream_goes_on_from_its_index() {
        let w = Watched::default();
        feed(&w, &mut Cursor(None), &full(5, "{}"), 1000).unwrap();
        let mut cursor = Cursor(Some(6));
        feed(&w, &mut cursor, &add(6, "10.0.0.2:80"), 1000).unwrap();
        assert_eq!(endpoints(&w), ["web 10.0.0.2:80"]);
        assert!(feed(&w, &mut Cursor(Some(6)), &add(8, "10.0.0.3:80"), 1000).is_err());
    }
}
