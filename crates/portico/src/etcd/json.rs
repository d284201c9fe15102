//! etcd's JSON gateway, as Rust types: int64 as strings, bytes as base64,
//! zero values left out. Pure decoding and encoding; the client is in mod.rs.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize};

use super::prefix_end;

fn i64_str<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(i64),
    }
    match N::deserialize(d)? {
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
        N::I(i) => Ok(i),
    }
}

fn ser_i64_str<S: serde::Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

fn b64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    B64.decode(s).map_err(serde::de::Error::custom)
}

#[derive(Debug, Deserialize)]
pub(super) struct GatewayError {
    #[serde(default)]
    pub(super) error: Option<String>,
    #[serde(default)]
    pub(super) message: Option<String>,
    #[serde(default)]
    pub(super) code: i32,
}

#[derive(Deserialize)]
pub(super) struct AuthenticateResponse {
    #[serde(default)]
    pub(super) token: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct Header {
    #[serde(default, deserialize_with = "i64_str")]
    pub revision: i64,
}

#[derive(Debug, Deserialize)]
pub(super) struct HeaderOnly {
    #[serde(default)]
    pub(super) header: Header,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KeyValue {
    #[serde(deserialize_with = "b64")]
    pub key: Vec<u8>,
    #[serde(default, deserialize_with = "b64")]
    pub value: Vec<u8>,
    #[serde(default, deserialize_with = "i64_str")]
    pub mod_revision: i64,
    #[serde(default, deserialize_with = "i64_str")]
    pub lease: i64,
}

#[derive(Debug, Serialize)]
pub(super) struct RangeRequest {
    pub(super) key: String,
    pub(super) range_end: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) count_only: bool,
}

impl RangeRequest {
    pub(super) fn prefix(prefix: &[u8], count_only: bool) -> Self {
        Self {
            key: B64.encode(prefix),
            range_end: B64.encode(prefix_end(prefix)),
            count_only,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct RangeResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub kvs: Vec<KeyValue>,
}

#[derive(Debug, Serialize)]
pub(super) struct PutRequest {
    pub(super) key: String,
    pub(super) value: String,
    #[serde(serialize_with = "ser_i64_str")]
    pub(super) lease: i64,
}

#[derive(Debug, Serialize)]
pub(super) struct DeleteRequest {
    pub(super) key: String,
}

#[derive(Debug, Serialize)]
pub(super) struct LeaseGrantRequest {
    #[serde(rename = "TTL", serialize_with = "ser_i64_str")]
    pub(super) ttl: i64,
    #[serde(rename = "ID", serialize_with = "ser_i64_str")]
    pub(super) id: i64,
}

#[derive(Debug, Deserialize)]
pub(super) struct LeaseGrantResponse {
    #[serde(rename = "ID", deserialize_with = "i64_str")]
    pub(super) id: i64,
}

#[derive(Debug, Serialize)]
pub(super) struct LeaseId {
    #[serde(rename = "ID", serialize_with = "ser_i64_str")]
    pub(super) id: i64,
}

#[derive(Debug, Deserialize)]
pub(super) struct KeepAliveResponse {
    #[serde(default)]
    pub(super) result: Option<KeepAliveResult>,
}

#[derive(Debug, Deserialize)]
pub(super) struct KeepAliveResult {
    #[serde(default)]
    pub(super) header: Header,
    #[serde(rename = "TTL", default, deserialize_with = "i64_str")]
    pub(super) ttl: i64,
}

/// What a lease renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseCheck {
    pub alive: bool,
    /// etcd's revision when it answered (0 if it did not say): a lease
    /// found dead had its keys deleted at or before it.
    pub revision: i64,
}

#[derive(Debug, Serialize)]
pub(super) struct WatchRequest {
    pub(super) create_request: WatchCreate,
}

#[derive(Debug, Serialize)]
pub(super) struct WatchCreate {
    pub(super) key: String,
    pub(super) range_end: String,
    #[serde(serialize_with = "ser_i64_str")]
    pub(super) start_revision: i64,
}

#[derive(Debug, Deserialize)]
pub(super) struct WatchAnswer {
    #[serde(default)]
    pub(super) result: Option<WatchResult>,
    #[serde(default)]
    pub(super) error: Option<GatewayError>,
}

#[derive(Debug, Deserialize)]
pub struct WatchResult {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub canceled: bool,
    #[serde(default, deserialize_with = "i64_str")]
    pub compact_revision: i64,
    #[serde(default)]
    pub cancel_reason: Option<String>,
    #[serde(default)]
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// "DELETE", or left out for a put.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub kv: KeyValue,
}

impl Event {
    pub fn is_delete(&self) -> bool {
        self.kind.as_deref() == Some("DELETE")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn gateway_json_decodes() {
        let line = br#"{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"YQ==","create_revision":"2","mod_revision":"2","version":"1","value":"e30=","lease":"7"}},{"type":"DELETE","kv":{"key":"YQ==","mod_revision":"3"}}]}}"#;
        let a: WatchAnswer = serde_json::from_slice(line).unwrap();
        let r = a.result.unwrap();
        assert_eq!(r.header.revision, 3);
        assert_eq!(r.events.len(), 2);
        assert!(!r.events[0].is_delete());
        assert_eq!(r.events[0].kv.lease, 7);
        assert_eq!(r.events[0].kv.key, b"a");
        assert!(r.events[1].is_delete());
        let c: WatchAnswer = serde_json::from_slice(
            br#"{"result":{"header":{"raft_term":"2"},"canceled":true,"compact_revision":"4"}}"#,
        )
        .unwrap();
        let c = c.result.unwrap();
        assert!(c.canceled);
        assert_eq!(c.compact_revision, 4);
    }
}
