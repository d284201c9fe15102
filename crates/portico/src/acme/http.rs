//! The HTTP client instant-acme sends through: hyper-util's pooled client
//! over the TLS connector etcd uses (tokio-rustls, ring), trusting the
//! built-in web roots and `--acme-ca-cert`. Every exchange has a deadline
//! and a bounded body: a CA that hangs or answers garbage costs a failed
//! order, not a stuck task or memory.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::etcd::connect::Connector;

/// One request and its whole response.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// ACME's answers are JSON documents and certificate chains: kilobytes.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaCertError {
    #[error("cannot read --acme-ca-cert {path}")]
    Read {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("--acme-ca-cert {path} holds no certificate rustls can use as a root")]
    Unusable { path: String },
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the request failed")]
    Send(#[source] hyper_util::client::legacy::Error),
    #[error("the answer's body could not be read (or was over {MAX_BODY} bytes)")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

#[derive(Clone)]
pub struct AcmeHttp {
    client: Client<Connector, BodyWrapper<Bytes>>,
}

impl AcmeHttp {
    /// Trusting the built-in roots, and `ca_cert`'s certificates when given.
    pub fn new(ca_cert: Option<&Path>) -> Result<Self, CaCertError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_cert {
            let shown = path.display().to_string();
            let read = |source| CaCertError::Read {
                path: shown.clone(),
                source,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(read)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read)?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(CaCertError::Unusable { path: shown });
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|_| CaCertError::Unusable {
                path: "(built-in roots)".into(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = Connector::new(Some(Arc::new(tls)), Duration::from_secs(10));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self { client })
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let sent = self.client.request(req);
        Box::pin(async move {
            let exchange = async {
                let resp = sent.await.map_err(ExchangeError::Send)?;
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, MAX_BODY)
                    .collect()
                    .await
                    .map_err(ExchangeError::Body)?
                    .to_bytes();
                Ok(BytesResponse {
                    parts,
                    body: Box::new(body),
                })
            };
            tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
                .await
                .unwrap_or(Err(ExchangeError::Timeout(EXCHANGE_TIMEOUT)))
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))
        })
    }
}
