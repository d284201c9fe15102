//! TLS termination with rustls: TLS 1.2 and 1.3 only, ALPN h2 and
//! http/1.1, one or more certificate pairs chosen by SNI (the first pair
//! when no name matches), reloaded from disk without a restart: a new
//! connection gets the new certificate, open ones keep theirs. With ACME,
//! the certificates it obtains (chosen by exact name, before the files)
//! and, for a handshake that offers only `acme-tls/1`, the TLS-ALPN-01
//! challenge certificate of its name (RFC 8737).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::watch;

/// One `--tls-cert` / `--tls-key` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate file {0}: {1}")]
    Cert(String, String),
    #[error("no certificate in {0}; expected PEM (-----BEGIN CERTIFICATE-----)")]
    NoCert(String),
    #[error("cannot read a private key from {0}: {1}; expected PEM (PKCS#8, PKCS#1 or SEC1)")]
    Key(String, String),
    #[error("the certificate {cert} and the key {key} do not belong together: {why}")]
    Mismatch {
        cert: String,
        key: String,
        why: String,
    },
    #[error("TLS setup failed: {0}")]
    Config(String),
}

struct Loaded {
    certified: Arc<CertifiedKey>,
}

fn load(pair: &CertPair) -> Result<Loaded, TlsError> {
    let cert_name = pair.cert.display().to_string();
    let key_name = pair.key.display().to_string();
    let chain = CertificateDer::pem_file_iter(&pair.cert)
        .map_err(|e| TlsError::Cert(cert_name.clone(), e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert(cert_name.clone(), e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCert(cert_name));
    }
    let key = PrivateKeyDer::from_pem_file(&pair.key)
        .map_err(|e| TlsError::Key(key_name.clone(), e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified =
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| TlsError::Mismatch {
            cert: cert_name,
            key: key_name,
            why: e.to_string(),
        })?;
    Ok(Loaded {
        certified: Arc::new(certified),
    })
}

/// Certificates by lower-case name.
type ByName = HashMap<String, Arc<CertifiedKey>>;

/// The certificates in use, chosen per handshake by SNI.
pub struct Certs {
    pairs: Vec<CertPair>,
    loaded: ArcSwap<Vec<Loaded>>,
    /// Obtained by ACME; replaced one name at a time, by a new map.
    issued: ArcSwap<ByName>,
    /// TLS-ALPN-01 challenge certificates while their orders are validated.
    challenges: ArcSwap<ByName>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs").field("pairs", &self.pairs).finish()
    }
}

impl Certs {
    /// Load every pair; any error stops the start with its reason.
    pub fn load(pairs: Vec<CertPair>) -> Result<Arc<Self>, TlsError> {
        let loaded = pairs.iter().map(load).collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Self {
            pairs,
            loaded: ArcSwap::from_pointee(loaded),
            issued: ArcSwap::default(),
            challenges: ArcSwap::default(),
        }))
    }

    /// Serve `certified` for `name` from the next handshake on; open
    /// connections keep the certificate they had.
    pub fn set_issued(&self, name: &str, certified: Arc<CertifiedKey>) {
        set(&self.issued, name, Some(certified));
    }

    /// Answer TLS-ALPN-01 validation for `name` with `certified` (`None`:
    /// stop).
    pub fn set_challenge(&self, name: &str, certified: Option<Arc<CertifiedKey>>) {
        set(&self.challenges, name, certified);
    }

    /// Whether a certificate file given by flag is valid for `name`.
    pub fn file_covers(&self, name: &str) -> bool {
        let Ok(name) = ServerName::try_from(name) else {
            return false;
        };
        self.loaded.load().iter().any(|l| valid_for(l, &name))
    }

    fn reload(&self) -> Result<(), TlsError> {
        let loaded = self.pairs.iter().map(load).collect::<Result<Vec<_>, _>>()?;
        self.loaded.store(Arc::new(loaded));
        Ok(())
    }
}

fn set(map: &ArcSwap<ByName>, name: &str, certified: Option<Arc<CertifiedKey>>) {
    let name = name.to_ascii_lowercase();
    map.rcu(|old| {
        let mut new = ByName::clone(old);
        match &certified {
            Some(c) => new.insert(name.clone(), c.clone()),
            None => new.remove(&name),
        };
        new
    });
}

fn valid_for(l: &Loaded, name: &ServerName<'_>) -> bool {
    let Some(end_entity) = l.certified.cert.first() else {
        return false;
    };
    webpki::EndEntityCert::try_from(end_entity)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        let acme_tls = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == super::ACME_TLS_ALPN));
        if acme_tls {
            // Only the challenge certificate answers a validation.
            return self.challenges.load().get(sni.as_deref()?).cloned();
        }
        if let Some(issued) = sni
            .as_deref()
            .and_then(|n| self.issued.load().get(n).cloned())
        {
            return Some(issued);
        }
        let loaded = self.loaded.load();
        if let Some(name) = sni.and_then(|n| ServerName::try_from(n).ok()) {
            if let Some(l) = loaded.iter().find(|l| valid_for(l, &name)) {
                return Some(l.certified.clone());
            }
        }
        loaded.first().map(|l| l.certified.clone())
    }
}

/// A server config over `certs`: TLS 1.2 and 1.3, ALPN h2 then http/1.1,
/// and `acme-tls/1` for TLS-ALPN-01 when `acme` is on.
pub fn server_config(certs: Arc<Certs>, acme: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme {
        config.alpn_protocols.push(super::ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(config))
}

fn stamp(paths: &[&Path]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Reload the certificates when their files change (checked every
/// `every`). A set that does not load is refused with the reason; the
/// certificates in use stay.
pub async fn watch_files(certs: Arc<Certs>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let paths: Vec<&Path> = certs
        .pairs
        .iter()
        .flat_map(|p| [p.cert.as_path(), p.key.as_path()])
        .collect();
    let mut last = stamp(&paths);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let now = stamp(&paths);
        if now == last {
            continue;
        }
        last = now;
        match certs.reload() {
            Ok(()) => tracing::info!("tls: certificates reloaded; new connections get them"),
            Err(e) => tracing::warn!("tls: certificates not reloaded, the ones in use stay: {e}"),
        }
    }
}
