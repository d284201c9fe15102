//! Automatic certificates (ACME, RFC 8555), through instant-acme. One task
//! per name keeps a certificate: the stored one is served from the start
//! (before the first connection, with the CA away or not); an order runs
//! when there is none or a third of its lifetime is left; a failed order
//! is logged and tried again after a back-off that doubles up to a day.
//! A new certificate goes into the SNI resolver (`ingress::tls::Certs`)
//! in one atomic swap: new handshakes get it, open connections keep theirs.
//!
//! Layout: `schedule` (when, pure), `order` (one order's flow), `store`
//! (the state directory), `http` (the client instant-acme sends through).
//! This module feeds the data plane (the resolver, the front door's
//! HTTP-01 tokens); the data plane never calls it.

mod http;
mod order;
pub mod schedule;
mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{Account, NewAccount};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use tokio::sync::watch;

use crate::ingress::front::Http01Tokens;
use crate::ingress::tls::Certs;
use schedule::Validity;
use store::{Pem, Store};

pub use http::CaCertError;
pub use store::StoreError;

/// Let's Encrypt's production directory, the default of `--acme-directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory: untrusted certificates, generous limits.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// The longest a task sleeps before looking at the clock again (a clock
/// that jumped, a machine that slept).
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// The shortest time between two orders of a name that succeeded.
const MIN_RENEWAL_GAP: Duration = Duration::from_secs(5);
/// One order, from new order to chain.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);

/// How the CA is to check that we answer for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Challenge {
    /// A token fetched over plain HTTP (port 80 for a real CA).
    #[value(name = "http-01")]
    Http01,
    /// A certificate shown to a TLS handshake that offers `acme-tls/1`
    /// (port 443 for a real CA).
    #[value(name = "tls-alpn-01")]
    TlsAlpn01,
}

impl Challenge {
    pub fn name(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// The validated ACME flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub directory: String,
    pub email: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// `--acme-domain` names; route hosts are added at start.
    pub domains: Vec<String>,
    pub challenge: Challenge,
    /// The wait after a first failed order.
    pub retry: Duration,
}

/// Why ACME cannot start; every later failure is an order's, retried.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    CaCert(#[from] CaCertError),
}

/// What the data plane lends the manager, and the metrics it moves.
pub struct Parts {
    pub certs: Arc<Certs>,
    pub tokens: Arc<Http01Tokens>,
    pub expiry: Family<Vec<(&'static str, String)>, Gauge>,
    pub orders: Family<Vec<(&'static str, String)>, Counter>,
}

/// One name as the status page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NameStatus {
    pub name: String,
    /// `valid` (a certificate is served), `obtaining` (none yet, ordering),
    /// `failing` (the last order failed; a served certificate stays).
    pub state: &'static str,
    /// Unix time; `None` without a certificate.
    pub not_after: Option<u64>,
    pub renew_at: Option<u64>,
    pub failures: u32,
    pub last_error: Option<String>,
    pub next_attempt: Option<u64>,
}

/// Every managed name's state, for the admin listener.
#[derive(Debug, Default)]
pub struct Status {
    names: Mutex<BTreeMap<String, NameStatus>>,
}

impl Status {
    pub fn snapshot(&self) -> Vec<NameStatus> {
        self.names
            .lock()
            .map(|n| n.values().cloned().collect())
            .unwrap_or_default()
    }

    fn has(&self, name: &str) -> bool {
        self.names.lock().is_ok_and(|n| n.contains_key(name))
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut NameStatus)) {
        let Ok(mut names) = self.names.lock() else {
            return;
        };
        let entry = names.entry(name.to_owned()).or_insert_with(|| NameStatus {
            name: name.to_owned(),
            state: "obtaining",
            not_after: None,
            renew_at: None,
            failures: 0,
            last_error: None,
            next_attempt: None,
        });
        f(entry);
    }
}

/// Whether a CA can be asked for `name`: a DNS name of two labels or
/// more (no IP address, no wildcard, no `localhost`).
pub fn is_certifiable(name: &str) -> bool {
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    labels_ok
        && name.len() <= 253
        && name.contains('.')
        && name.parse::<std::net::IpAddr>().is_err()
        && !name
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
}

/// The names to manage: `domains`, then the route hosts a CA can be asked
/// for, each once; and the route hosts it cannot (to be logged).
pub fn names<'a>(
    domains: &[String],
    route_hosts: impl IntoIterator<Item = &'a str>,
) -> (Vec<String>, Vec<String>) {
    let mut managed: Vec<String> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut consider = |name: &str| {
        if managed.iter().chain(&skipped).any(|seen| seen == name) {
            return;
        }
        match is_certifiable(name) {
            true => managed.push(name.to_owned()),
            false => skipped.push(name.to_owned()),
        }
    };
    domains.iter().for_each(|d| consider(d));
    route_hosts.into_iter().for_each(&mut consider);
    (managed, skipped)
}

struct Manager {
    settings: Settings,
    parts: Parts,
    store: Store,
    http: http::AcmeHttp,
    account: tokio::sync::Mutex<Option<Account>>,
    status: Arc<Status>,
}

/// The running manager, for the admin listener and for config reloads.
#[derive(Clone)]
pub struct Acme {
    manager: Arc<Manager>,
    shutdown: watch::Receiver<bool>,
}

/// Serve the stored certificates of `--acme-domain` and the route hosts at
/// once, then keep each name's certificate in a task of its own until
/// shutdown.
pub fn start<'a>(
    settings: Settings,
    route_hosts: impl IntoIterator<Item = &'a str>,
    parts: Parts,
    shutdown: watch::Receiver<bool>,
) -> Result<Acme, AcmeError> {
    let store = Store::open(&settings.state_dir, &settings.directory)?;
    let http = http::AcmeHttp::new(settings.ca_cert.as_deref())?;
    tracing::info!(
        directory = %settings.directory,
        challenge = settings.challenge.name(),
        state = %settings.state_dir.display(),
        "acme: managing certificates"
    );
    let acme = Acme {
        manager: Arc::new(Manager {
            settings,
            parts,
            store,
            http,
            account: tokio::sync::Mutex::new(None),
            status: Arc::new(Status::default()),
        }),
        shutdown,
    };
    acme.manage(route_hosts);
    Ok(acme)
}

impl Acme {
    pub fn status(&self) -> Arc<Status> {
        self.manager.status.clone()
    }

    /// Manage the names of `--acme-domain` and `route_hosts` not managed
    /// yet (a reloaded config file may name new hosts), less those a CA
    /// cannot sign and those a --tls-cert covers.
    pub fn manage<'a>(&self, route_hosts: impl IntoIterator<Item = &'a str>) {
        let m = &self.manager;
        let (names, skipped) = names(&m.settings.domains, route_hosts);
        for name in names {
            if m.status.has(&name) {
                continue;
            }
            if m.parts.certs.file_covers(&name) {
                tracing::info!(name, "acme: not managed: a --tls-cert covers it");
                continue;
            }
            let validity = m.load_stored(&name);
            tracing::info!(name, "acme: managing");
            tokio::spawn(keep(m.clone(), name, validity, self.shutdown.clone()));
        }
        for name in skipped {
            tracing::debug!(
                name,
                "acme: route host not managed: a CA signs only public DNS names"
            );
        }
    }
}

impl Manager {
    /// The stored certificate of `name`, served from now on.
    fn load_stored(&self, name: &str) -> Option<Validity> {
        let pem = match self.store.certificate(name) {
            Ok(Some(pem)) => pem,
            Ok(None) => {
                self.status.update(name, |_| {});
                return None;
            }
            Err(e) => {
                tracing::warn!(name, "acme: {}", crate::error_chain::chain(&e));
                self.status.update(name, |_| {});
                return None;
            }
        };
        match self.install(name, &pem) {
            Ok(v) => {
                tracing::info!(name, expires = %humantime::format_rfc3339_seconds(v.not_after), "acme: serving the stored certificate");
                Some(v)
            }
            Err(why) => {
                tracing::warn!(
                    name,
                    "acme: the stored certificate is not usable ({why}); a new one will be ordered"
                );
                self.status.update(name, |_| {});
                None
            }
        }
    }

    /// Serve `pem` for `name`, and show it.
    fn install(&self, name: &str, pem: &Pem) -> Result<Validity, String> {
        let chain = CertificateDer::pem_slice_iter(pem.chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("chain: {e}"))?;
        let validity = chain
            .first()
            .and_then(|c| Validity::of_der(c))
            .ok_or("no certificate in the chain")?;
        let key =
            PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|e| format!("key: {e}"))?;
        let provider = rustls::crypto::ring::default_provider();
        let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| format!("the key does not fit the certificate: {e}"))?;
        self.parts.certs.set_issued(name, Arc::new(certified));
        let not_after = schedule::unix(validity.not_after);
        self.parts
            .expiry
            .get_or_create(&vec![("name", name.to_owned())])
            .set(i64::try_from(not_after).unwrap_or(i64::MAX));
        self.status.update(name, |s| {
            s.state = "valid";
            s.not_after = Some(not_after);
            s.renew_at = Some(schedule::unix(validity.renew_at()));
        });
        Ok(validity)
    }

    /// The account, made (and stored) at the first order that needs it.
    async fn account(&self) -> Result<Account, instant_acme::Error> {
        let mut account = self.account.lock().await;
        if let Some(a) = account.as_ref() {
            return Ok(a.clone());
        }
        let builder = Account::builder_with_http(Box::new(self.http.clone()));
        let made = match self.store.account().ok().flatten() {
            Some(creds) => builder.from_credentials(creds).await?,
            None => {
                let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
                let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (made, creds) = builder
                    .create(&new, self.settings.directory.clone(), None)
                    .await?;
                match self.store.save_account(&creds) {
                    Ok(()) => tracing::info!(directory = %self.settings.directory, "acme: account created"),
                    Err(e) => tracing::warn!("acme: account created but not stored, another will be made after a restart: {}", crate::error_chain::chain(&e)),
                }
                made
            }
        };
        *account = Some(made.clone());
        Ok(made)
    }

    /// One order for `name`, stored and served when it succeeds.
    async fn renew(&self, name: &str) -> Result<Validity, String> {
        let answers = order::Answers {
            kind: self.settings.challenge,
            tokens: &self.parts.tokens,
            certs: &self.parts.certs,
        };
        let ordered = async {
            let account = self.account().await.map_err(order::OrderError::from)?;
            order::obtain(&account, name, &answers).await
        };
        let pem = match tokio::time::timeout(ORDER_TIMEOUT, ordered).await {
            Ok(Ok(pem)) => pem,
            Ok(Err(e)) => return Err(crate::error_chain::chain(&e)),
            Err(_) => return Err(format!("the order took longer than {ORDER_TIMEOUT:?}")),
        };
        let validity = self
            .install(name, &pem)
            .map_err(|why| format!("the CA's certificate is not usable: {why}"))?;
        if let Err(e) = self.store.save_certificate(name, &pem) {
            tracing::warn!(
                name,
                "acme: the new certificate is served but not stored: {}",
                crate::error_chain::chain(&e)
            );
        }
        Ok(validity)
    }
}

/// Keep `name`'s certificate until shutdown.
async fn keep(
    manager: Arc<Manager>,
    name: String,
    validity: Option<Validity>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut served = validity.is_some();
    let mut next = validity.map_or_else(SystemTime::now, |v| v.renew_at());
    let mut failures = 0u32;
    loop {
        let now = SystemTime::now();
        if let Ok(wait) = next.duration_since(now) {
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait.min(MAX_SLEEP)) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
        }
        let outcome = tokio::select! {
            o = manager.renew(&name) => o,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let now = SystemTime::now();
        let result = match outcome {
            Ok(v) => {
                failures = 0;
                served = true;
                // A CA that issues certificates of seconds must not make
                // this a busy loop.
                next = v.renew_at().max(now + MIN_RENEWAL_GAP);
                tracing::info!(
                    name,
                    expires = %humantime::format_rfc3339_seconds(v.not_after),
                    renew_at = %humantime::format_rfc3339_seconds(next),
                    "acme: certificate issued and served"
                );
                manager.status.update(&name, |s| {
                    s.failures = 0;
                    s.last_error = None;
                    s.next_attempt = None;
                });
                "issued"
            }
            Err(why) => {
                failures += 1;
                let retry = schedule::backoff(manager.settings.retry, failures);
                next = now + retry;
                tracing::warn!(
                    name,
                    failures,
                    retry_in = %humantime::format_duration(retry),
                    "acme: order failed, will retry: {why}"
                );
                manager.status.update(&name, |s| {
                    s.state = if served { "failing" } else { "obtaining" };
                    s.failures = failures;
                    s.last_error = Some(why);
                    s.next_attempt = Some(schedule::unix(next));
                });
                "failed"
            }
        };
        manager
            .parts
            .orders
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dns_names_a_ca_can_sign_are_managed() {
        for ok in ["app.example.com", "a.test", "xn--bcher-kva.example"] {
            assert!(is_certifiable(ok), "{ok}");
        }
        for bad in [
            "localhost",
            "10.0.0.1",
            "*.example.com",
            "-a.example.com",
            "a..b",
            "",
            "a.b/c",
        ] {
            assert!(!is_certifiable(bad), "{bad}");
        }
        let (managed, skipped) = names(
            &["extra.example.com".into()],
            [
                "app.example.com",
                "localhost",
                "extra.example.com",
                "app.example.com",
            ],
        );
        assert_eq!(managed, ["extra.example.com", "app.example.com"]);
        assert_eq!(skipped, ["localhost"]);
    }
}
