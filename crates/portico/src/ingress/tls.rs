//! TLS termination with rustls: TLS 1.2 and 1.3 only, ALPN h2 and
//! http/1.1, one or more certificate pairs chosen by SNI (the first pair
//! when no name matches), reloaded from disk without a restart: a new
//! connection gets the new certificate, open ones keep theirs.

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

/// The certificates in use, chosen per handshake by SNI.
pub struct Certs {
    pairs: Vec<CertPair>,
    loaded: ArcSwap<Vec<Loaded>>,
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
        }))
    }

    fn reload(&self) -> Result<(), TlsError> {
        let loaded = self.pairs.iter().map(load).collect::<Result<Vec<_>, _>>()?;
        self.loaded.store(Arc::new(loaded));
        Ok(())
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded.load();
        if let Some(name) = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n).ok())
        {
            for l in loaded.iter() {
                let Some(end_entity) = l.certified.cert.first() else {
                    continue;
                };
                let Ok(cert) = webpki::EndEntityCert::try_from(end_entity) else {
                    continue;
                };
                if cert.verify_is_valid_for_subject_name(&name).is_ok() {
                    return Some(l.certified.clone());
                }
            }
        }
        loaded.first().map(|l| l.certified.clone())
    }
}

/// A server config over `certs`: TLS 1.2 and 1.3, ALPN h2 then http/1.1.
pub fn server_config(certs: Arc<Certs>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
