//! The Tower's wire decoder: any bytes, no panic; whatever decodes encodes
//! back to something that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portico_wire::{
    decode_envelope, decode_reply, decode_request, encode_refusal, encode_reply, encode_request,
    DecodeError,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode_request(data) {
        let again = decode_request(&encode_request(&request)).expect("re-encoded request decodes");
        assert_eq!(again, request);
    }
    // Garbage never gets more bytes back than it sent; only a malformed
    // command gets its (short) syntax.
    if let Err(e) = decode_request(data) {
        if let Some(reply) = encode_refusal(&e, data.len()) {
            let syntax = matches!(
                e,
                DecodeError::Register | DecodeError::Deregister | DecodeError::Lookup
            );
            assert!(syntax || reply.len() <= data.len());
        }
    }
    if let Ok(env) = decode_envelope(data) {
        assert!(env.signed_len <= data.len());
        // A signature (a write's or a LIST's) covers everything before the
        // `|` that opens its MAC.
        if env.signature.is_some() {
            assert_eq!(data[env.signed_len], b'|');
        }
    }
    if let Ok(reply) = decode_reply(data) {
        let bytes = encode_reply(&reply);
        assert!(bytes.len() <= portico_wire::MAX_REPLY_LEN);
        let _ = decode_reply(&bytes);
    }
});
