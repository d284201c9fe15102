//! Portico: an HTTP ingress that finds its backends in a service registry,
//! the Tower, at run time.
//!
//! # Layout
//! - `cli`, `config`: flags -> validated settings.
//! - `cmd`: one composition root per subcommand (`ingress`, `tower`, `up`,
//!   `register`, `services`).
//! - `ingress`: the data plane. `ingress::serve` accepts, `ingress::conn`
//!   supervises a connection, `ingress::handler` is the request path.
//! - `discovery`: where replicas come from: the Tower's HTTP watch into a
//!   lock-free snapshot, a UDP LOOKUP per request, the local table (`up`),
//!   or etcd watched directly; passive and active health.
//! - `registry`: the Tower: a pure table, its UDP and HTTP servers, signed
//!   writes, a client.
//! - `etcd`: the etcd client (JSON gateway), key layout and list-then-watch,
//!   for a Tower whose registrations live in etcd and an ingress watching it.
//! - `acme`: automatic certificates: orders, renewal, the state directory;
//!   it fills the TLS resolver and the front door's HTTP-01 tokens.
//! - `admin`: health, the status page, `/metrics` rendered.
//! - `api_server`: the accept loop and timeouts of the Tower's HTTP API and
//!   the admin listener.
//! - Leaves, which import nothing of the crate: `metrics` (the Prometheus
//!   registry, recorded by the ingress), `services_doc` (the Tower's
//!   `/v1/services` document), `units` (durations as people write them),
//!   `error_chain` (an error and its causes on one line), `cidr` (networks as
//!   ADDR/PREFIX), `backoff`, `netio`.
//!
//! Imports point one way, from `cmd` down to the leaves. ARCHITECTURE.md
//! gives that order and walks the request and Tower paths. The wire
//! protocol itself is the `portico-wire` crate.

pub mod acme;
pub mod admin;
pub mod api_server;
pub mod backoff;
pub mod cidr;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod config_file;
pub mod discovery;
pub mod error_chain;
pub mod etcd;
pub mod ingress;
pub mod metrics;
pub mod netio;
pub mod registry;
pub mod services_doc;
pub mod units;
pub mod worker;
