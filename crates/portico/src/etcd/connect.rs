//! TCP or TLS to an etcd member: a connector for hyper-util's client that
//! opens TCP with its HttpConnector and, for an `https://` member, runs a
//! rustls handshake on it (tokio-rustls), verifying etcd's certificate
//! against `--etcd-ca-cert` and presenting `--etcd-cert` when given.
//! Small on purpose: hyper-rustls would bring its own tree for this.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The TLS files given by flags: the CA that signed etcd's certificate, and
/// optionally our own certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client: Option<(PathBuf, PathBuf)>,
}

/// A TLS file that cannot be used, worded with the flag that named it.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {flag} {path}")]
    Read {
        flag: &'static str,
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no certificate in {flag} {path}; expected PEM (-----BEGIN CERTIFICATE-----)")]
    NoCert { flag: &'static str, path: String },
    #[error("--etcd-ca-cert {path}: not a CA certificate rustls can use")]
    BadCa {
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("--etcd-cert {cert} and --etcd-key {key} cannot be used together")]
    ClientPair {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
}

fn certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let read = |source| TlsFileError::Read {
        flag,
        path: path.display().to_string(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsFileError::NoCert {
            flag,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

impl TlsFiles {
    /// The rustls client configuration: TLS 1.2 and 1.3 with the ring
    /// provider, as the listener. No ALPN: etcd's gateway speaks HTTP/1.1,
    /// and a Go server refuses a client whose protocols it does not share.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsFileError> {
        let mut roots = RootCertStore::empty();
        for ca in certs("--etcd-ca-cert", &self.ca)? {
            roots.add(ca).map_err(|source| TlsFileError::BadCa {
                path: self.ca.display().to_string(),
                source,
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsFileError::BadCa {
                path: self.ca.display().to_string(),
                source,
            })?
            .with_root_certificates(roots);
        let Some((cert, key)) = &self.client else {
            return Ok(builder.with_no_client_auth());
        };
        let chain = certs("--etcd-cert", cert)?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsFileError::Read {
            flag: "--etcd-key",
            path: key.display().to_string(),
            source,
        })?;
        builder
            .with_client_auth_cert(chain, key_der)
            .map_err(|source| TlsFileError::ClientPair {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
                source,
            })
    }
}

/// Why a connection to a member could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect failed")]
    Tcp(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("an https:// member, but no --etcd-ca-cert to verify it with")]
    NoTls,
    #[error("'{0}' is not a name TLS can verify")]
    Name(String),
    #[error("TLS handshake failed")]
    Handshake(#[source] io::Error),
}

/// Opens plain TCP for `http://` members and TLS for `https://` ones.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // The scheme is ours to act on: https means TLS on the same TCP.
        http.enforce_http(false);
        Self {
            http,
            tls: tls.map(TlsConnector::from),
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.http
            .poll_ready(cx)
            .map_err(|e| ConnectError::Tcp(e.into()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let host = uri.host().unwrap_or_default();
            // An IPv6 literal comes bracketed; TLS verifies the bare address.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let tcp = http
                .call(uri)
                .await
                .map_err(|e| ConnectError::Tcp(e.into()))?
                .into_inner();
            if !https {
                return Ok(TokioIo::new(Stream::Plain(tcp)));
            }
            let tls = tls.ok_or(ConnectError::NoTls)?;
            let name = ServerName::try_from(host.clone()).map_err(|_| ConnectError::Name(host))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(ConnectError::Handshake)?;
            Ok(TokioIo::new(Stream::Tls(Box::new(stream))))
        })
    }
}

/// A connection to a member, with or without TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What an operator should check when TLS with etcd failed for `e`, found
/// anywhere in its chain (rustls' error sits inside an io::Error, which
/// does not list it as a source).
pub fn tls_advice(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return Some(advice_for(tls));
        }
        if let Some(ConnectError::NoTls) = err.downcast_ref::<ConnectError>() {
            return Some("pass --etcd-ca-cert FILE, the CA that signed etcd's certificate");
        }
        cur = err.source();
    }
    None
}

fn advice_for(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C};
    match e {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "etcd's certificate is not for the host in --etcd; use a name or address its subjectAltName lists"
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "etcd's certificate has expired"
        }
        rustls::Error::InvalidCertificate(_) => {
            "etcd's certificate is not signed by the CA in --etcd-ca-cert; give the CA that signed it"
        }
        rustls::Error::AlertReceived(
            A::BadCertificate | A::CertificateRequired | A::UnknownCA | A::CertificateUnknown,
        ) => "etcd refused our client certificate; pass --etcd-cert and --etcd-key signed by the CA etcd trusts (--trusted-ca-file)",
        _ => "check that the member speaks TLS and that --etcd-ca-cert is the CA that signed its certificate",
    }
}
