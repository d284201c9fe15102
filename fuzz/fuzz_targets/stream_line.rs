//! A line of the Tower's change stream, as an ingress reads it: any bytes,
//! no panic; a change read encodes back to a line that reads the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portico::services_doc::{decode_line, encode_change, StreamLine};

fuzz_target!(|data: &[u8]| {
    if let Ok(StreamLine::Change { index, change }) = decode_line(data) {
        let line = encode_change(index, &change);
        assert_eq!(line.last(), Some(&b'\n'));
        let again = decode_line(&line[..line.len() - 1]).expect("an encoded change reads");
        assert_eq!(again, StreamLine::Change { index, change });
    }
});
