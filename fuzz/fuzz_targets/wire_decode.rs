//! The Tower's wire decoder: any bytes, no panic; whatever decodes encodes
//! back to something that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portico_wire::{decode_envelope, decode_reply, decode_request, encode_reply, encode_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode_request(data) {
        let again = decode_request(&encode_request(&request)).expect("re-encoded request decodes");
        assert_eq!(again, request);
    }
    if let Ok(env) = decode_envelope(data) {
        assert!(env.signed_len <= data.len());
    }
    if let Ok(reply) = decode_reply(data) {
        let bytes = encode_reply(&reply);
        assert!(bytes.len() <= portico_wire::MAX_REPLY_LEN);
        let _ = decode_reply(&bytes);
    }
});
