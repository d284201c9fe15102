//! One order for one name (RFC 8555 section 7.4): new order -> answer
//! each pending authorization's challenge (HTTP-01 through the front
//! door's tokens, TLS-ALPN-01 through the SNI resolver's challenge
//! certificates) -> wait for the order to be ready -> finalize with a CSR
//! for a new P-256 key -> the chain. The challenge answers are withdrawn
//! however the order ends.

use std::sync::Arc;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, Order, OrderStatus,
    RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;

use super::store::Pem;
use super::Challenge;
use crate::ingress::front::Http01Tokens;
use crate::ingress::tls::Certs;

/// Why an order brought no certificate. Each is retried, after a back-off.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("the CA refused or could not be reached")]
    Acme(#[from] instant_acme::Error),
    #[error("the CA offers no {0} challenge for this name (--acme-challenge chooses the kind)")]
    NoChallenge(&'static str),
    #[error("the CA's authorization is {0}, neither pending nor valid")]
    Authorization(String),
    #[error("the CA could not validate the name: {0}")]
    Invalid(String),
    #[error("cannot make a key, a CSR or a challenge certificate")]
    Keys(#[from] rcgen::Error),
    #[error("the challenge certificate is not usable: {0}")]
    ChallengeCert(rustls::Error),
}

/// Where challenge answers are put for the listeners to give.
pub struct Answers<'a> {
    pub kind: Challenge,
    pub tokens: &'a Http01Tokens,
    pub certs: &'a Certs,
}

/// The challenge answers of one order, withdrawn when it ends.
struct Published<'a> {
    answers: &'a Answers<'a>,
    name: &'a str,
    tokens: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.answers.tokens.remove(t);
        }
        if self.answers.kind == Challenge::TlsAlpn01 {
            self.answers.certs.set_challenge(self.name, None);
        }
    }
}

/// A certificate for `name`, and its new key.
pub async fn obtain(
    account: &Account,
    name: &str,
    answers: &Answers<'_>,
) -> Result<Pem, OrderError> {
    let identifiers = [Identifier::Dns(name.to_owned())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut published = Published {
        answers,
        name,
        tokens: Vec::new(),
    };
    let challenge_type = match answers.kind {
        Challenge::Http01 => ChallengeType::Http01,
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(OrderError::Authorization(
                    format!("{other:?}").to_lowercase(),
                ))
            }
        }
        let mut challenge = authz
            .challenge(challenge_type.clone())
            .ok_or(OrderError::NoChallenge(answers.kind.name()))?;
        let key_authorization = challenge.key_authorization();
        match answers.kind {
            Challenge::Http01 => {
                answers
                    .tokens
                    .insert(&challenge.token, key_authorization.as_str());
                published.tokens.push(challenge.token.clone());
            }
            Challenge::TlsAlpn01 => {
                let cert = alpn_certificate(name, key_authorization.digest().as_ref())?;
                answers.certs.set_challenge(name, Some(cert));
            }
        }
        challenge.set_ready().await?;
    }
    let retries = RetryPolicy::default();
    if order.poll_ready(&retries).await? != OrderStatus::Ready {
        return Err(OrderError::Invalid(
            why_invalid(&mut order, challenge_type).await,
        ));
    }
    drop(published);
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let key = rcgen::KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    order.finalize_csr(csr.der()).await?;
    let chain = order.poll_certificate(&retries).await?;
    Ok(Pem {
        chain,
        key: key.serialize_pem(),
    })
}

/// The CA's own words on the failed challenge, for the log.
async fn why_invalid(order: &mut Order, challenge_type: ChallengeType) -> String {
    let mut why = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if authz.refresh().await.is_err() {
            continue;
        }
        let problems = authz
            .challenges
            .iter()
            .filter(|c| c.r#type == challenge_type)
            .filter_map(|c| c.error.as_ref().map(ToString::to_string));
        why.extend(problems);
    }
    if why.is_empty() {
        "the order became invalid".to_owned()
    } else {
        why.join("; ")
    }
}

/// The self-signed certificate TLS-ALPN-01 validates (RFC 8737 section
/// 3): the name, and the key authorization's digest in a critical
/// acmeIdentifier extension.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, OrderError> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    // Not `CertifiedKey::from_der`: its check parses the certificate with
    // webpki, which refuses the critical extension RFC 8737 requires.
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(OrderError::ChallengeCert)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}
