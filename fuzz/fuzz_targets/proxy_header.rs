//! A PROXY protocol header (v1 or v2) read from arbitrary bytes as the
//! ingress reads it off a socket: look at what is waiting (at most what
//! the reader wants), hand it over, consume what the reader took. No
//! panic; never a byte consumed past the header; and the same outcome
//! whether the bytes arrive at once or in pieces (the first two bytes say
//! where to cut: once, then every N bytes). A reader that took part of a
//! request, or whose answer depended on how reads fall, could be steered
//! by the client behind a front proxy.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portico::ingress::proxy_protocol::{header_len, parse, HeaderReader, V1_MAX, V2_MAX};

#[derive(Debug, PartialEq)]
enum Outcome {
    Named(String, usize),
    Refused(String),
    /// The bytes ended inside the header, all of them taken.
    Incomplete(usize),
}

fn read(wire: &[u8], arrivals: &[usize]) -> Outcome {
    let mut reader = HeaderReader::default();
    let mut arrivals = arrivals.iter().copied().chain([wire.len()]);
    let (mut consumed, mut arrived) = (0, 0);
    loop {
        if consumed == arrived {
            match arrivals.next() {
                Some(a) if a > arrived => arrived = a.min(wire.len()),
                Some(_) => continue,
                None => return Outcome::Incomplete(consumed),
            }
            continue;
        }
        let waiting = (arrived - consumed).min(reader.wants());
        assert!(waiting > 0, "a reader not done wants more");
        let take = match reader.offer(&wire[consumed..consumed + waiting]) {
            Ok(n) => n,
            Err(e) => return Outcome::Refused(format!("{e:?}")),
        };
        assert!(take <= waiting);
        consumed += take;
        if let Some(named) = reader.finish() {
            let header = &wire[..consumed];
            assert_eq!(header_len(header).ok().flatten(), Some(consumed));
            assert!(consumed <= V1_MAX.max(V2_MAX));
            let whole = format!("{:?}", parse(header));
            let named = format!("{named:?}");
            assert_eq!(named, whole, "the reader parses what it took");
            return Outcome::Named(named, consumed);
        }
        assert_eq!(
            take, waiting,
            "bytes before the header's end are all its own"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let [cut, step, wire @ ..] = data else {
        return;
    };
    let cut = usize::from(*cut).min(wire.len());
    let step = usize::from(*step).max(1);
    let pieces: Vec<usize> = (cut..wire.len()).step_by(step).collect();
    assert_eq!(
        read(wire, &[]),
        read(wire, &pieces),
        "cut at {cut}, then every {step}"
    );
});
