//! Portico: an HTTP ingress that finds its backends in a service registry,
//! the Tower, at run time.
//!
//! # Layout
//! - `cli`, `config`: flags -> validated settings.
//! - `cmd`: one composition root per subcommand (`ingress`, `tower`, `up`,
//!   `register`, `services`).
//! - `ingress`: the data plane. `ingress::serve` accepts, `ingress::conn`
//!   supervises a connection, `ingress::handler` is the request path.
//! - `discovery`: where replicas come from (UDP LOOKUP or the local table)
//!   and passive health.
//! - `registry`: the Tower: a pure table, its UDP and HTTP servers, signed
//!   writes, a client.
//! - `etcd`: the etcd client (JSON gateway), key layout and list-then-watch,
//!   for a Tower whose registrations live in etcd and an ingress watching it.
//! - `acme`: automatic certificates: orders, renewal, the state directory;
//!   it fills the TLS resolver and the front door's HTTP-01 tokens.
//! - `admin`: metrics, health, the status page.
//! - `api_server`: the accept loop and timeouts of the Tower's HTTP API and
//!   the admin listener.
//!
//! The wire protocol itself is the `portico-wire` crate. ARCHITECTURE.md
//! walks the request and Tower paths in order.

pub mod acme;
pub mod admin;
pub mod api_server;
pub mod backoff;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod config_file;
pub mod discovery;
pub mod etcd;
pub mod ingress;
pub mod netio;
pub mod registry;
