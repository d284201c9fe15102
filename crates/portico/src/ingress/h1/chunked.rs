//! The chunked transfer coding of a response body (RFC 9112 section 7.1),
//! decoded from a buffer the caller fills: the data of each chunk as it
//! arrives (not held back until the chunk is whole), then the trailer
//! fields, if any.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// A chunk-size line, extensions included. hyper allows 4 KiB of
/// extensions per body; one line past this is surely not a size.
pub const MAX_SIZE_LINE: usize = 4096;
/// The trailer section, in bytes and fields.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;
pub const MAX_TRAILERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("the backend sent an invalid chunk size")]
    BadSize,
    #[error("the backend's chunk-size line is over {MAX_SIZE_LINE} bytes")]
    SizeLineTooLong,
    #[error("the backend's chunk data is not followed by CRLF")]
    BadChunkEnd,
    #[error("the backend's trailer fields are malformed or over {MAX_TRAILER_BYTES} bytes or {MAX_TRAILERS} fields")]
    BadTrailers,
}

/// What `Decoder::decode` found.
#[derive(Debug, PartialEq)]
pub enum Chunk {
    Data(Bytes),
    /// The trailer fields; the body ends with them.
    Trailers(HeaderMap),
    /// The last chunk and an empty trailer section: the body is complete.
    End,
}

#[derive(Debug, Default)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    /// Bytes of the current chunk still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl Decoder {
    /// The body is complete: every byte after it belongs to the connection.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode from the front of `buf`, taking what is used. `Ok(None)`: more
    /// bytes are needed. After `End` or `Trailers`, returns `End`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, ChunkError> {
        loop {
            match self.state {
                State::Size => {
                    let Some(first) = buf.first() else {
                        return Ok(None);
                    };
                    // httparse reads an empty size as zero: the last chunk.
                    if !first.is_ascii_hexdigit() {
                        return Err(ChunkError::BadSize);
                    }
                    match httparse::parse_chunk_size(buf) {
                        // Checked complete too: whether a line is refused
                        // must not depend on how the reads fell.
                        Ok(httparse::Status::Complete((used, _))) if used > MAX_SIZE_LINE => {
                            return Err(ChunkError::SizeLineTooLong)
                        }
                        // httparse lets an extension hold any byte, a bare
                        // LF too; a reader that ends the line there takes
                        // what follows for chunk data ("funky chunks").
                        Ok(httparse::Status::Complete((used, _)))
                            if has_bare_lf(&buf[..used - 2]) =>
                        {
                            return Err(ChunkError::BadSize)
                        }
                        Ok(httparse::Status::Complete((used, size))) => {
                            buf.advance(used);
                            self.state = if size == 0 {
                                State::Trailers
                            } else {
                                State::Data(size)
                            };
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_SIZE_LINE => {
                            return Err(ChunkError::SizeLineTooLong)
                        }
                        // Refused as soon as seen, as when the line is whole.
                        Ok(httparse::Status::Partial) if has_bare_lf(buf) => {
                            return Err(ChunkError::BadSize)
                        }
                        Ok(httparse::Status::Partial) => return Ok(None),
                        Err(_) => return Err(ChunkError::BadSize),
                    }
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(Some(Chunk::Data(data)));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        // A wrong first byte is wrong already.
                        if buf.first().is_some_and(|b| *b != b'\r') {
                            return Err(ChunkError::BadChunkEnd);
                        }
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkError::BadChunkEnd);
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => return self.trailers(buf),
                State::Done => return Ok(Some(Chunk::End)),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, ChunkError> {
        // httparse takes a bare LF for a line end; the chunk lines are held
        // to CRLF, and so is the trailer section, so that no reading of the
        // body's end can differ from ours.
        if buf.first() == Some(&b'\n') {
            return Err(ChunkError::BadTrailers);
        }
        if buf.len() < 2 {
            if buf.first().is_some_and(|b| *b != b'\r' && !is_token(*b)) {
                return Err(ChunkError::BadTrailers);
            }
            return Ok(None);
        }
        if &buf[..2] == b"\r\n" {
            buf.advance(2);
            self.state = State::Done;
            return Ok(Some(Chunk::End));
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
        match httparse::parse_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete((used, parsed))) => {
                let bare_lf = buf[..used]
                    .iter()
                    .enumerate()
                    .any(|(i, b)| *b == b'\n' && (i == 0 || buf[i - 1] != b'\r'));
                if used > MAX_TRAILER_BYTES || bare_lf {
                    return Err(ChunkError::BadTrailers);
                }
                let mut map = HeaderMap::with_capacity(parsed.len());
                for f in parsed {
                    // Trailers are rare: their values are copied.
                    let name = HeaderName::from_bytes(f.name.as_bytes())
                        .map_err(|_| ChunkError::BadTrailers)?;
                    let value =
                        HeaderValue::from_bytes(f.value).map_err(|_| ChunkError::BadTrailers)?;
                    map.append(name, value);
                }
                buf.advance(used);
                self.state = State::Done;
                Ok(Some(Chunk::Trailers(map)))
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILER_BYTES => {
                Err(ChunkError::BadTrailers)
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(_) => Err(ChunkError::BadTrailers),
        }
    }
}

/// A LF in a chunk-size line before its CRLF (the line's only LF).
fn has_bare_lf(line: &[u8]) -> bool {
    line.contains(&b'\n')
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The body's data, its trailers, and the bytes after it.
    type Decoded = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

    /// Feed `wire` in pieces cut at `cuts`; the body's data, its trailers,
    /// and the bytes after it (read or not).
    fn run(wire: &[u8], cuts: &[usize]) -> Result<Decoded, ChunkError> {
        let mut d = Decoder::default();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut at = 0;
        let mut bounds: Vec<usize> = cuts.iter().copied().filter(|c| *c <= wire.len()).collect();
        bounds.push(wire.len());
        for end in bounds {
            if end < at {
                continue;
            }
            buf.extend_from_slice(&wire[at..end]);
            at = end;
            while let Some(chunk) = d.decode(&mut buf)? {
                match chunk {
                    Chunk::Data(b) => {
                        assert!(!b.is_empty());
                        data.extend_from_slice(&b);
                    }
                    Chunk::Trailers(t) => {
                        assert!(d.is_done());
                        assert_eq!(d.decode(&mut buf).unwrap(), Some(Chunk::End));
                        return Ok((data, Some(t), [&buf[..], &wire[at..]].concat()));
                    }
                    Chunk::End => return Ok((data, None, [&buf[..], &wire[at..]].concat())),
                }
            }
        }
        panic!("incomplete body: {:?}", String::from_utf8_lossy(wire));
    }

    fn encode(chunks: &[&[u8]], trailers: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("0\r\n{trailers}\r\n").as_bytes());
        out
    }

    #[test]
    fn a_body_split_at_every_byte_decodes_the_same() {
        let mut wire = encode(&[b"hello", &[b'x'; 300], b"!"], "");
        wire.extend_from_slice(b"NEXT");
        let want: Vec<u8> = [&b"hello"[..], &[b'x'; 300], b"!"].concat();
        for cut in 0..wire.len() {
            let (data, trailers, rest) = run(&wire, &[cut]).unwrap();
            assert_eq!(data, want, "cut at {cut}");
            assert!(trailers.is_none());
            assert_eq!(rest, b"NEXT", "cut at {cut}");
        }
        let all: Vec<usize> = (0..wire.len()).collect();
        assert_eq!(run(&wire, &all).unwrap().0, want, "one byte at a time");
    }

    #[test]
    fn random_bodies_in_random_pieces_round_trip() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            let chunks: Vec<Vec<u8>> = (0..rng.usize(0..6))
                .map(|_| (0..rng.usize(1..200)).map(|_| rng.u8(..)).collect())
                .collect();
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let wire = encode(&refs, if rng.bool() { "X-Sum: 1\r\n" } else { "" });
            let mut cuts: Vec<usize> = (0..rng.usize(0..8))
                .map(|_| rng.usize(0..=wire.len()))
                .collect();
            cuts.sort_unstable();
            let (data, _, rest) = run(&wire, &cuts).unwrap();
            assert_eq!(data, chunks.concat());
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn extensions_and_trailers_are_read() {
        let wire =
            b"5;name=\"v\"\r\nhello\r\n3 ; x\r\nabc\r\n0\r\nX-Checksum: 42\r\nX-Other: a\r\n\r\n";
        let (data, trailers, _) = run(wire, &[]).unwrap();
        assert_eq!(data, b"helloabc");
        let t = trailers.unwrap();
        assert_eq!(t["x-checksum"], "42");
        assert_eq!(t.len(), 2);
        assert_eq!(
            run(b"A\r\n0123456789\r\n0\r\n\r\n", &[]).unwrap().0,
            b"0123456789"
        );
    }

    #[test]
    fn malformed_bodies_are_errors_not_guesses() {
        let err = |wire: &[u8]| {
            let mut d = Decoder::default();
            let mut buf = BytesMut::from(wire);
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(Chunk::Data(_))) => {}
                    Ok(other) => return Err(other),
                    Err(e) => return Ok(e),
                }
            }
        };
        assert_eq!(
            err(b"\r\n"),
            Ok(ChunkError::BadSize),
            "an empty size is not the last chunk"
        );
        assert_eq!(err(b"g\r\n"), Ok(ChunkError::BadSize));
        assert_eq!(err(b"-1\r\n"), Ok(ChunkError::BadSize));
        assert_eq!(err(b" 5\r\nhello\r\n"), Ok(ChunkError::BadSize));
        assert_eq!(
            err(b"10000000000000000\r\n"),
            Ok(ChunkError::BadSize),
            "over 64 bits"
        );
        assert_eq!(err(b"5\nhello\r\n"), Ok(ChunkError::BadSize), "a bare LF");
        assert_eq!(
            err(b"5;x\nfoo\r\nhello\r\n0\r\n\r\n"),
            Ok(ChunkError::BadSize),
            "a bare LF in an extension"
        );
        assert_eq!(
            err(b"5;x\nfo"),
            Ok(ChunkError::BadSize),
            "a bare LF in an unfinished extension"
        );
        assert_eq!(err(b"5\r\nhelloX\r\n"), Ok(ChunkError::BadChunkEnd));
        assert_eq!(err(b"5\r\nhello\rX"), Ok(ChunkError::BadChunkEnd));
        assert_eq!(err(b"5\r\nhello\n"), Ok(ChunkError::BadChunkEnd));
        assert_eq!(
            err(b"0\r\nBad Name: x\r\n\r\n"),
            Ok(ChunkError::BadTrailers)
        );
        assert_eq!(err(b"0\r\n\x01"), Ok(ChunkError::BadTrailers));
        assert_eq!(
            err(b"0\r\n\n"),
            Ok(ChunkError::BadTrailers),
            "a bare LF ends nothing"
        );
        assert_eq!(err(b"0\r\nX-A: 1\n\r\n"), Ok(ChunkError::BadTrailers));
        assert_eq!(err(b"0\r\nX-A: 1\r\n\n"), Ok(ChunkError::BadTrailers));
        let mut long = b"5;".to_vec();
        long.extend_from_slice(&[b'a'; MAX_SIZE_LINE]);
        assert_eq!(err(&long), Ok(ChunkError::SizeLineTooLong), "unfinished");
        long.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(err(&long), Ok(ChunkError::SizeLineTooLong), "whole");
        let mut big = b"0\r\nX-Big: ".to_vec();
        big.extend_from_slice(&[b'a'; MAX_TRAILER_BYTES]);
        assert_eq!(err(&big), Ok(ChunkError::BadTrailers));
        let many: String = (0..=MAX_TRAILERS)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        assert_eq!(
            err(format!("0\r\n{many}\r\n").as_bytes()),
            Ok(ChunkError::BadTrailers)
        );
    }

    #[test]
    fn a_chunk_larger_than_memory_streams() {
        let mut d = Decoder::default();
        let mut buf = BytesMut::from(&b"fffffffffffffff\r\nabc"[..]);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Some(Chunk::Data(Bytes::from_static(b"abc"))))
        );
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert!(!d.is_done());
    }
}
