//! Signed writes. With a key configured, REGISTER and DEREGISTER must carry
//! `|<ts_ms>|<hmac>`: HMAC-SHA256 under the shared key over everything before
//! the MAC. A write is accepted once, within `WINDOW` of the Tower's clock;
//! replays inside the window are refused, and older ones fail the window.
//! A LIST may carry the same, checked the same way, for a larger reply.
//! Pure: the caller passes the time.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use portico_wire::{hex, signing_prefix, Request, Signature};
use sha2::Sha256;

/// How far a signed write's timestamp may be from the Tower's clock.
pub const WINDOW: Duration = Duration::from_secs(30);
const MIN_KEY_LEN: usize = 16;
/// Signatures remembered for replay detection; past this the oldest go.
const MAX_SEEN: usize = 1 << 17;

/// The shared secret, as read from a key file (surrounding whitespace trimmed).
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the key in {0} is shorter than {MIN_KEY_LEN} bytes; generate one with e.g. `head -c 32 /dev/urandom | base64 > FILE`")]
    TooShort(String),
}

impl Key {
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(shown));
        }
        Ok(Self(trimmed.to_vec()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length; this cannot fail.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

/// The datagram for a signed write.
pub fn sign(key: &Key, request: &Request, ts_ms: u64) -> Vec<u8> {
    let mut out = signing_prefix(request, ts_ms);
    let mut mac = key.mac();
    mac.update(&out);
    let tag = mac.finalize().into_bytes();
    out.push(b'|');
    out.extend_from_slice(hex(&tag).as_bytes());
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this Tower requires signed writes: REGISTER|name|ip|port|ts_ms|hmac (use portico register --key-file)")]
    Unsigned,
    #[error("bad signature (is the key the Tower's?)")]
    BadSignature,
    #[error("timestamp outside the {}s window (are the clocks in sync?)", WINDOW.as_secs())]
    Stale,
    #[error("replayed signature")]
    Replayed,
}

#[derive(Debug, Default)]
pub struct Verifier {
    key: Option<Key>,
    /// MAC -> its timestamp, for the replay window.
    seen: HashMap<[u8; 32], u64>,
}

impl Verifier {
    pub fn new(key: Option<Key>) -> Self {
        Self {
            key,
            seen: HashMap::new(),
        }
    }

    pub fn requires_signatures(&self) -> bool {
        self.key.is_some()
    }

    /// Check a write. `signed` is the span the signature covers; `now_ms`
    /// the Tower's Unix time in milliseconds.
    pub fn check(
        &mut self,
        signature: Option<Signature>,
        signed: &[u8],
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        let sig = signature.ok_or(AuthError::Unsigned)?;
        let window = WINDOW.as_millis() as u64;
        if sig.ts_ms.abs_diff(now_ms) > window {
            return Err(AuthError::Stale);
        }
        let mut mac = key.mac();
        mac.update(signed);
        mac.verify_slice(&sig.mac)
            .map_err(|_| AuthError::BadSignature)?;
        if self.seen.contains_key(&sig.mac) {
            return Err(AuthError::Replayed);
        }
        if self.seen.len() >= MAX_SEEN {
            // Anything older than the window fails the timestamp check anyway.
            let horizon = now_ms.saturating_sub(window);
            self.seen.retain(|_, ts| *ts >= horizon);
        }
        self.seen.insert(sig.mac, sig.ts_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use portico_wire::decode_envelope;

    fn req() -> Request {
        portico_wire::decode_request(b"REGISTER|api|127.0.0.1|80").unwrap()
    }

    fn verify(v: &mut Verifier, dgram: &[u8], now: u64) -> Result<(), AuthError> {
        let e = decode_envelope(dgram).unwrap();
        v.check(e.signature, &dgram[..e.signed_len], now)
    }

    #[test]
    fn signed_write_accepted_once() {
        let key = Key::from_bytes(b"0123456789abcdef0123");
        let mut v = Verifier::new(Some(key.clone()));
        let now = 1_700_000_000_000;
        let d = sign(&key, &req(), now);
        assert_eq!(verify(&mut v, &d, now + 5), Ok(()));
        assert_eq!(verify(&mut v, &d, now + 10), Err(AuthError::Replayed));
        let d2 = sign(&key, &req(), now + 1);
        assert_eq!(verify(&mut v, &d2, now + 10), Ok(()));
    }

    #[test]
    fn unsigned_stale_and_forged_writes_refused() {
        let key = Key::from_bytes(b"0123456789abcdef0123");
        let mut v = Verifier::new(Some(key.clone()));
        let now = 1_700_000_000_000;
        assert_eq!(
            verify(&mut v, b"REGISTER|api|127.0.0.1|80", now),
            Err(AuthError::Unsigned)
        );
        let old = sign(&key, &req(), now - 31_000);
        assert_eq!(verify(&mut v, &old, now), Err(AuthError::Stale));
        let other = sign(
            &Key::from_bytes(b"another key of enough length"),
            &req(),
            now,
        );
        assert_eq!(verify(&mut v, &other, now), Err(AuthError::BadSignature));
        // A signature moved onto another registration does not verify.
        let good = sign(&key, &req(), now);
        let text = String::from_utf8(good).unwrap().replace("|80|", "|81|");
        assert_eq!(
            verify(&mut v, text.as_bytes(), now),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn without_a_key_everything_passes() {
        let mut v = Verifier::new(None);
        assert_eq!(verify(&mut v, b"REGISTER|api|127.0.0.1|80", 0), Ok(()));
    }
}
