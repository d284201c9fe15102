//! Our HTTP/1.1 server path against hyper's server, on the same bytes.
//! Ours may hand anything to hyper; what it takes as its own, hyper must
//! take too, as the same request (method, target, fields, in order).
//! Ours may be stricter than hyper, never looser: a request hyper would
//! refuse must never reach a backend through our path.
#![no_main]
use std::cell::RefCell;
use std::convert::Infallible;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Uri};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use portico::ingress::h1::server::{parse_head, Head};
use tokio::io::AsyncWriteExt;

/// As the ingress configures hyper (`ingress::Protocols`) by default.
const MAX_BUF: usize = 8192;
const MAX_HEADERS: usize = 100;

type Seen = (Method, Uri, HeaderMap);

thread_local! {
    static RT: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"),
    );
}

/// The request hyper's server hands its service for `bytes`, or `None`
/// if it refuses them.
fn hyper_sees(bytes: Bytes) -> Option<Seen> {
    RT.with(|rt| {
        rt.borrow().block_on(async move {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (parts, _) = req.into_parts();
                let _ = tx.send((parts.method, parts.uri, parts.headers));
                async { Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new())) }
            });
            let mut builder = http1::Builder::new();
            builder.max_buf_size(MAX_BUF).max_headers(MAX_HEADERS);
            let conn = builder.serve_connection(TokioIo::new(server), service);
            // The client's side stays open: hyper serves what it was given
            // and waits for more, or refuses it and ends.
            client.write_all(&bytes).await.expect("duplex write");
            tokio::select! {
                seen = rx.recv() => seen,
                _ = conn => rx.try_recv().ok(),
            }
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let Head::Fast { request, len, .. } = parse_head(&mut buf, MAX_BUF, MAX_HEADERS) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let ours = (parts.method, parts.uri, parts.headers);
    let theirs = hyper_sees(Bytes::copy_from_slice(&data[..len]));
    assert_eq!(Some(&ours), theirs.as_ref(), "ours took a head hyper {}", match theirs {
        None => "refuses",
        Some(_) => "reads otherwise",
    });
});
