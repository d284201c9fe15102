//! A backend's response (head, then a chunked body when the head says so)
//! from arbitrary bytes: no panic, and the same outcome whether the bytes
//! arrive at once or split where the first byte says. A decoder whose
//! answer depended on how reads fall could be steered by a backend.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portico::ingress::h1::chunked::{Chunk, Decoder};
use portico::ingress::h1::{parse_head, Framing};

#[derive(Debug, PartialEq)]
enum Outcome {
    /// Which limit or rule refused it may depend on where the bytes were
    /// cut (a head too large, or malformed past the limit); that it was
    /// refused may not.
    Refused,
    Incomplete { head: String, body: Vec<u8> },
    Complete { head: String, body: Vec<u8>, end: String },
}

fn decode(pieces: &[&[u8]]) -> Outcome {
    let mut buf = BytesMut::new();
    let mut rest = pieces.iter();
    let head = loop {
        match parse_head(&mut buf, false, 8192) {
            Ok(Some(h)) => break h,
            Ok(None) => match rest.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return Outcome::Incomplete { head: String::new(), body: Vec::new() },
            },
            Err(_) => return Outcome::Refused,
        }
    };
    let chunked = head.framing == Framing::Chunked;
    let head = format!("{} {:?} {:?} {}", head.status, head.framing, head.headers, head.reusable);
    let mut body = Vec::new();
    if !chunked {
        return Outcome::Complete { head, body, end: String::new() };
    }
    let mut decoder = Decoder::default();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(Chunk::Data(d))) => body.extend_from_slice(&d),
            Ok(Some(Chunk::Trailers(t))) => {
                return Outcome::Complete { head, body, end: format!("trailers {t:?}") }
            }
            Ok(Some(Chunk::End)) => {
                let after: Vec<u8> =
                    std::iter::once(&buf[..]).chain(rest.copied()).flatten().copied().collect();
                return Outcome::Complete { head, body, end: format!("end, then {after:?}") };
            }
            Ok(None) => match rest.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return Outcome::Incomplete { head, body },
            },
            Err(_) => return Outcome::Refused,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, wire)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(wire.len());
    assert_eq!(decode(&[wire]), decode(&[&wire[..cut], &wire[cut..]]), "cut at {cut}");
});
