//! The document of the Tower's `GET /v1/services`: the Tower writes it
//! (`registry::http`), an ingress's watch reads it and etcd discovery
//! builds one (`discovery`). A leaf both sides share, so neither imports
//! the other's server or client to speak it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Every live endpoint, by service, at one revision of the registry.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServicesDoc {
    /// The registry's revision; a blocking query answers when it changes.
    pub index: u64,
    /// One run of the Tower: an index means something only within it.
    pub epoch: u64,
    /// The Tower has been up for a TTL, so every live workload has had
    /// time to heartbeat to it.
    pub warm: bool,
    pub services: BTreeMap<String, Vec<EndpointDoc>>,
}

/// One replica of a service.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointDoc {
    pub ip: IpAddr,
    pub port: u16,
    /// Time left before the registration expires, unless renewed.
    pub ttl_left_ms: u64,
}
