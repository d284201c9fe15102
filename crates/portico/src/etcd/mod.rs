//! etcd as the registry's shared store, spoken to through etcd's JSON
//! gateway (`/v3/...`) with the same hyper client the rest of Portico uses:
//! no gRPC stack, no protoc, and every call can be replayed with curl.
//!
//! - `keys`: the key layout and the pure cache a list-then-watch keeps.
//! - `watch`: the list-then-watch loop, shared by the Tower and the ingress.
//! - `connect`: TCP or TLS (rustls) to a member.
//! - `auth`: the user, its password and the token etcd gives for them.
//! - `json`: the gateway's JSON types.
//! - this file: the client, which tries the configured members in turn.

pub mod auth;
pub mod connect;
mod json;
pub mod keys;
pub mod watch;

use json::{
    AuthenticateResponse, DeleteRequest, GatewayError, HeaderOnly, KeepAliveResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseId, PutRequest, RangeRequest, WatchAnswer,
    WatchCreate, WatchRequest,
};
pub use json::{Event, Header, KeyValue, LeaseCheck, RangeResponse, WatchResult};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use auth::{Auth, Credentials};
use connect::Connector;

/// Time allowed for one unary call to one member. A member cut off from its
/// quorum holds a linearizable request until etcd's own timeout (seconds);
/// giving up sooner moves on to a member that can answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer read from etcd (a range over every registration).
const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint given; pass --etcd http://HOST:PORT[,https://HOST:PORT...]")]
    NoEndpoints,
    #[error("bad etcd endpoint '{0}': expected http://HOST:PORT or https://HOST:PORT")]
    BadEndpoint(String),
    /// The endpoint itself is not repeated: it holds a password.
    #[error("an etcd endpoint carries credentials (USER:PASSWORD@), which would show in logs and `ps`: give the user with --etcd-user and the password with --etcd-password-file or PORTICO_ETCD_PASSWORD")]
    EndpointCredentials,
    #[error("cannot reach etcd at {0}")]
    Connect(String, #[source] hyper_util::client::legacy::Error),
    #[error("TLS with etcd at {at} failed ({advice})")]
    Tls {
        at: String,
        advice: &'static str,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("etcd at {at} refused the user '{user}': wrong user or password; check --etcd-user and the password in --etcd-password-file or {}", auth::PASSWORD_ENV)]
    AuthFailed { at: String, user: String },
    #[error("etcd at {0} requires authentication; pass --etcd-user, with the password in --etcd-password-file or {env}", env = auth::PASSWORD_ENV)]
    AuthRequired(String),
    #[error("etcd at {at} denied the user '{user}' access: {message}; grant its role readwrite on the key prefix (etcdctl role grant-permission ROLE readwrite --prefix=true PREFIX)")]
    Denied {
        at: String,
        user: String,
        message: String,
    },
    #[error("etcd at {0} gave no token for the user and password")]
    NoToken(String),
    #[error("etcd at {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("etcd at {at} refused the call: {message} (gRPC code {code})")]
    Server {
        at: String,
        code: i32,
        message: String,
    },
    #[error("etcd at {0} answered HTTP {1}: {2}")]
    Status(String, StatusCode, String),
    #[error("etcd's answer from {0} broke off")]
    Body(
        String,
        #[source] Box<dyn std::error::Error + Send + Sync + 'static>,
    ),
    #[error("etcd's answer from {0} is not the JSON expected")]
    Json(String, #[source] serde_json::Error),
    #[error("the watch on etcd at {0} was cancelled: {1}")]
    WatchCancelled(String, String),
}

impl EtcdError {
    /// Whether another member might answer where this one did not.
    fn try_next(&self) -> bool {
        match self {
            // 14: Unavailable ("no leader", "request timed out"), 4: deadline.
            EtcdError::Server { code, .. } => matches!(code, 4 | 14),
            EtcdError::Status(_, s, _) => s.is_server_error(),
            EtcdError::NoEndpoints
            | EtcdError::BadEndpoint(_)
            | EtcdError::EndpointCredentials
            | EtcdError::AuthFailed { .. }
            | EtcdError::AuthRequired(_)
            | EtcdError::Denied { .. } => false,
            _ => true,
        }
    }

    /// Whether this says the flags are wrong (TLS files, user, password,
    /// permissions) rather than that etcd is away: worth stopping a start.
    pub fn is_misconfiguration(&self) -> bool {
        match self {
            EtcdError::Tls { .. }
            | EtcdError::AuthFailed { .. }
            | EtcdError::AuthRequired(_)
            | EtcdError::Denied { .. }
            | EtcdError::NoToken(_) => true,
            EtcdError::Status(_, s, _) => s.is_client_error(),
            _ => false,
        }
    }

    /// Whether the token sent is no longer good and a new one may do.
    fn token_refused(&self) -> bool {
        matches!(self, EtcdError::Server { code, message, .. } if auth::token_refused(*code, message))
    }

    /// etcd's own error, worded for the operator where it is about access.
    fn from_gateway(at: String, e: GatewayError, creds: Option<&Credentials>) -> Self {
        let message = e.message.or(e.error).unwrap_or_default();
        if message.contains("authentication failed") {
            let user = creds.map(|c| c.user.clone()).unwrap_or_default();
            return EtcdError::AuthFailed { at, user };
        }
        // With auth on, etcd refuses a call without a token as from no
        // user, or as denied to no one in particular.
        let denied = e.code == 7;
        match creds {
            None if denied || message.contains("user name is empty") => {
                return EtcdError::AuthRequired(at)
            }
            Some(c) if denied => {
                return EtcdError::Denied {
                    at,
                    user: c.user.clone(),
                    message,
                }
            }
            _ => {}
        }
        EtcdError::Server {
            at,
            code: e.code,
            message,
        }
    }
}

/// Parse `--etcd`: comma-separated `http://HOST:PORT` or `https://HOST:PORT`
/// URLs.
pub fn parse_endpoints(list: &str) -> Result<Vec<Uri>, EtcdError> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if part.contains('@') {
            return Err(EtcdError::EndpointCredentials);
        }
        let uri: Uri = part
            .parse()
            .map_err(|_| EtcdError::BadEndpoint(part.to_owned()))?;
        let scheme = matches!(uri.scheme_str(), Some("http" | "https"));
        let no_path = matches!(uri.path(), "" | "/") && uri.query().is_none();
        if !scheme || uri.authority().is_none() || !no_path {
            return Err(EtcdError::BadEndpoint(part.to_owned()));
        }
        out.push(uri);
    }
    if out.is_empty() {
        return Err(EtcdError::NoEndpoints);
    }
    Ok(out)
}

/// A client for a set of etcd members. Calls go to the member that last
/// answered and move on to the next one when it cannot.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    endpoints: Vec<Uri>,
    current: AtomicUsize,
    http: Client<Connector, Full<Bytes>>,
    auth: Option<Auth>,
}

/// How to reach etcd beyond its addresses: TLS for `https://` members, a
/// user to authenticate as.
#[derive(Debug, Default)]
pub struct Access {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub creds: Option<Credentials>,
}

impl EtcdClient {
    pub fn new(endpoints: Vec<Uri>, access: Access) -> Self {
        let connector = Connector::new(access.tls, Duration::from_secs(1));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self {
            inner: Arc::new(ClientInner {
                endpoints,
                current: AtomicUsize::new(0),
                http,
                auth: access.creds.map(Auth::new),
            }),
        }
    }

    /// One call at start, so that wrong TLS files, a wrong password or
    /// missing permissions stop the start with their reason. An etcd that
    /// is away is not an error here: the loops wait for it, and say so.
    pub async fn check(&self, prefix: &[u8]) -> Result<(), EtcdError> {
        let req = RangeRequest::prefix(prefix, true);
        let check = self.call::<_, RangeResponse>("/v3/kv/range", &req);
        match tokio::time::timeout(CALL_TIMEOUT * 2, check).await {
            Ok(Err(e)) if e.is_misconfiguration() => Err(e),
            _ => Ok(()),
        }
    }

    pub fn endpoints(&self) -> &[Uri] {
        &self.inner.endpoints
    }

    /// The member calls go to first.
    pub fn current(&self) -> usize {
        self.inner.current.load(Ordering::Relaxed) % self.inner.endpoints.len()
    }

    /// Prefer the member after `failed` from now on (unless another call
    /// already moved on).
    pub fn rotate_from(&self, failed: usize) {
        let next = (failed + 1) % self.inner.endpoints.len();
        let _ =
            self.inner
                .current
                .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn label(&self, i: usize) -> String {
        self.inner.endpoints[i].to_string()
    }

    /// POST to member `i`, with the token when etcd wants one: a token
    /// etcd no longer takes (expired, or lost in a restart) is replaced and
    /// the call made once more.
    async fn post(&self, i: usize, path: &str, body: Vec<u8>) -> Result<Incoming, EtcdError> {
        let body = Bytes::from(body);
        let Some(auth) = &self.inner.auth else {
            return self.send(i, path, body, None).await;
        };
        let token = match auth.token() {
            Some(t) => t,
            None => self.authenticate(i, None).await?,
        };
        match self.send(i, path, body.clone(), Some(&token)).await {
            Err(e) if e.token_refused() => {
                let fresh = self.authenticate(i, Some(&token)).await?;
                self.send(i, path, body, Some(&fresh)).await
            }
            other => other,
        }
    }

    /// A token for the credentials, from member `i`. `stale` is the token
    /// the caller found refused: when another call has already replaced
    /// it, that replacement is used.
    async fn authenticate(
        &self,
        i: usize,
        stale: Option<&Arc<http::HeaderValue>>,
    ) -> Result<Arc<http::HeaderValue>, EtcdError> {
        let at = self.label(i);
        let Some(auth) = &self.inner.auth else {
            return Err(EtcdError::AuthRequired(at));
        };
        let _renewing = auth.renewing.lock().await;
        if let Some(current) = auth.token() {
            if stale.is_none_or(|s| !Arc::ptr_eq(s, &current)) {
                return Ok(current);
            }
        }
        let incoming = self
            .send(
                i,
                "/v3/auth/authenticate",
                Bytes::from(auth.creds.request_body()),
                None,
            )
            .await?;
        let bytes = read_body(&at, incoming).await?;
        let answer: AuthenticateResponse =
            serde_json::from_slice(&bytes).map_err(|e| EtcdError::Json(at.clone(), e))?;
        let token = auth
            .store(&answer.token)
            .ok_or_else(|| EtcdError::NoToken(at.clone()))?;
        tracing::debug!(member = %at, user = %auth.creds.user, renewed = stale.is_some(), "etcd: authenticated");
        Ok(token)
    }

    /// One POST to member `i`, as it is.
    async fn send(
        &self,
        i: usize,
        path: &str,
        body: Bytes,
        token: Option<&http::HeaderValue>,
    ) -> Result<Incoming, EtcdError> {
        let at = self.label(i);
        let base = &self.inner.endpoints[i];
        let uri = format!(
            "{}://{}{}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map(|a| a.as_str()).unwrap_or_default(),
            path
        );
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            // etcd's gateway passes Authorization on as the token.
            req = req.header(http::header::AUTHORIZATION, token.clone());
        }
        let req = req
            .body(Full::new(body))
            .map_err(|_| EtcdError::BadEndpoint(at.clone()))?;
        let resp = match tokio::time::timeout(CALL_TIMEOUT, self.inner.http.request(req)).await {
            Err(_) => return Err(EtcdError::Timeout(at, CALL_TIMEOUT)),
            Ok(Err(e)) => return Err(connect_error(at, e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status == StatusCode::OK {
            return Ok(resp.into_body());
        }
        // The gateway maps gRPC errors to HTTP statuses with a JSON body;
        // etcd's own HTTP layer answers some refusals in plain text.
        let body = read_body(&at, resp.into_body()).await?;
        match serde_json::from_slice::<GatewayError>(&body) {
            Ok(e) => Err(EtcdError::from_gateway(
                at,
                e,
                self.inner.auth.as_ref().map(|a| &a.creds),
            )),
            Err(_) => Err(EtcdError::Status(at, status, plain_text(&body))),
        }
    }

    /// One call to member `i`.
    async fn call_at<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        i: usize,
        path: &str,
        req: &Req,
    ) -> Result<Resp, EtcdError> {
        let at = self.label(i);
        let body = serde_json::to_vec(req).map_err(|e| EtcdError::Json(at.clone(), e))?;
        let incoming = self.post(i, path, body).await?;
        let bytes = read_body(&at, incoming).await?;
        serde_json::from_slice(&bytes).map_err(|e| EtcdError::Json(at, e))
    }

    /// One call, trying each member in turn from the current one.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, EtcdError> {
        let n = self.inner.endpoints.len();
        let first = self.current();
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            match self.call_at(i, path, req).await {
                Ok(r) => {
                    self.inner.current.store(i, Ordering::Relaxed);
                    return Ok(r);
                }
                Err(e) if e.try_next() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(EtcdError::NoEndpoints))
    }

    /// Every key under `prefix`, linearizable (so a member cut off from its
    /// quorum fails rather than answering with old data).
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<RangeResponse, EtcdError> {
        self.call("/v3/kv/range", &RangeRequest::prefix(prefix, false))
            .await
    }

    /// A linearizable read of member `i` alone: can it reach its quorum?
    pub async fn probe(&self, i: usize, prefix: &[u8]) -> Result<(), EtcdError> {
        let _: RangeResponse = self
            .call_at(i, "/v3/kv/range", &RangeRequest::prefix(prefix, true))
            .await?;
        Ok(())
    }

    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        // etcd leases count whole seconds; round up so a lease never ends
        // before the registration it carries.
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let resp: LeaseGrantResponse = self
            .call("/v3/lease/grant", &LeaseGrantRequest { ttl: secs, id: 0 })
            .await?;
        Ok(resp.id)
    }

    /// Renew a lease. Not alive when etcd no longer has it (expired,
    /// revoked, or a store that lost its data).
    pub async fn keep_alive(&self, lease: i64) -> Result<LeaseCheck, EtcdError> {
        let resp: KeepAliveResponse = self
            .call("/v3/lease/keepalive", &LeaseId { id: lease })
            .await?;
        Ok(resp.result.map_or(
            LeaseCheck {
                alive: false,
                revision: 0,
            },
            |r| LeaseCheck {
                alive: r.ttl > 0,
                revision: r.header.revision,
            },
        ))
    }

    /// Revoke a lease and delete every key attached to it; the revision
    /// after that. None for a lease etcd does not have: it is already gone.
    pub async fn revoke(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        match self
            .call::<_, HeaderOnly>("/v3/lease/revoke", &LeaseId { id: lease })
            .await
        {
            Ok(resp) => Ok(Some(resp.header.revision)),
            Err(EtcdError::Server { code: 5, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write `key` bound to `lease`; the revision it was written at.
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let resp: HeaderOnly = self
            .call(
                "/v3/kv/put",
                &PutRequest {
                    key: B64.encode(key),
                    value: B64.encode(value),
                    lease,
                },
            )
            .await?;
        Ok(resp.header.revision)
    }

    pub async fn delete(&self, key: &[u8]) -> Result<i64, EtcdError> {
        let resp: HeaderOnly = self
            .call(
                "/v3/kv/deleterange",
                &DeleteRequest {
                    key: B64.encode(key),
                },
            )
            .await?;
        Ok(resp.header.revision)
    }

    /// Open a watch on member `i` over every key under `prefix`, from
    /// `start_revision` on.
    pub async fn watch(
        &self,
        i: usize,
        prefix: &[u8],
        start_revision: i64,
    ) -> Result<WatchStream, EtcdError> {
        let req = WatchRequest {
            create_request: WatchCreate {
                key: B64.encode(prefix),
                range_end: B64.encode(prefix_end(prefix)),
                start_revision,
            },
        };
        let at = self.label(i);
        let body = serde_json::to_vec(&req).map_err(|e| EtcdError::Json(at.clone(), e))?;
        let stream = self.open_watch(i, body.clone()).await?;
        let Some(auth) = &self.inner.auth else {
            return Ok(stream);
        };
        // A stale token does not fail the call: etcd opens the stream and
        // cancels the watch in its first answer. Look at it, and retry
        // once with a new token when that is why.
        let mut stream = stream;
        let first = match tokio::time::timeout(CALL_TIMEOUT, stream.next()).await {
            Err(_) => return Err(EtcdError::Timeout(at, CALL_TIMEOUT)),
            Ok(None) => return Ok(stream),
            Ok(Some(first)) => first?,
        };
        let refused = first.canceled
            && first
                .cancel_reason
                .as_deref()
                .is_some_and(|r| auth::token_refused(0, r));
        if !refused {
            stream.first = Some(first);
            return Ok(stream);
        }
        let stale = auth.token();
        self.authenticate(i, stale.as_ref()).await?;
        self.open_watch(i, body).await
    }

    async fn open_watch(&self, i: usize, body: Vec<u8>) -> Result<WatchStream, EtcdError> {
        let incoming = self.post(i, "/v3/watch", body).await?;
        Ok(WatchStream {
            at: self.label(i),
            body: incoming,
            buf: BytesMut::new(),
            first: None,
        })
    }
}

/// A failed request, with what to check when TLS is why.
fn connect_error(at: String, e: hyper_util::client::legacy::Error) -> EtcdError {
    match connect::tls_advice(&e) {
        Some(advice) => EtcdError::Tls {
            at,
            advice,
            source: e,
        },
        None => EtcdError::Connect(at, e),
    }
}

/// The start of a plain-text answer, on one line, for an error message.
fn plain_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn read_body(at: &str, body: Incoming) -> Result<Bytes, EtcdError> {
    match tokio::time::timeout(CALL_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Err(_) => Err(EtcdError::Timeout(at.to_owned(), CALL_TIMEOUT)),
        Ok(Err(e)) => Err(EtcdError::Body(at.to_owned(), e)),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// The end of the key range that holds every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // A prefix of 0xff bytes only: the gateway reads "\0" as "to the end".
    vec![0]
}

/// A watch's answers, one JSON object per line.
#[derive(Debug)]
pub struct WatchStream {
    at: String,
    body: Incoming,
    buf: BytesMut,
    /// The first answer, when the client already read it.
    first: Option<WatchResult>,
}

impl WatchStream {
    /// The next answer; `None` when etcd closed the stream.
    pub async fn next(&mut self) -> Option<Result<WatchResult, EtcdError>> {
        if let Some(first) = self.first.take() {
            return Some(Ok(first));
        }
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(nl + 1);
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return Some(self.decode(line));
            }
            if self.buf.len() > MAX_BODY {
                return Some(Err(EtcdError::Body(
                    self.at.clone(),
                    "a watch answer over 64 MiB".into(),
                )));
            }
            match self.body.frame().await {
                None => {
                    // A last answer without its newline.
                    if self.buf.has_remaining() && !self.buf.trim_ascii().is_empty() {
                        let line = std::mem::take(&mut self.buf);
                        return Some(self.decode(line.trim_ascii()));
                    }
                    return None;
                }
                Some(Err(e)) => return Some(Err(EtcdError::Body(self.at.clone(), e.into()))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    fn decode(&self, line: &[u8]) -> Result<WatchResult, EtcdError> {
        let answer: WatchAnswer =
            serde_json::from_slice(line).map_err(|e| EtcdError::Json(self.at.clone(), e))?;
        match (answer.result, answer.error) {
            (Some(r), _) => Ok(r),
            (None, Some(e)) => Err(EtcdError::Server {
                at: self.at.clone(),
                code: e.code,
                message: e.message.or(e.error).unwrap_or_default(),
            }),
            (None, None) => Err(EtcdError::Body(
                self.at.clone(),
                "a watch answer with neither result nor error".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_past_the_prefix() {
        assert_eq!(prefix_end(b"/portico/v1/"), b"/portico/v10");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn endpoints_must_be_http_or_https_urls() {
        let eps = parse_endpoints("http://127.0.0.1:2379, https://10.0.0.2:2379").unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[1].scheme_str(), Some("https"));
        for bad in [
            "",
            "127.0.0.1:2379",
            "https://x:2379/v3",
            "http://x:2379/v3",
            "ftp://x",
        ] {
            assert!(parse_endpoints(bad).is_err(), "{bad}");
        }
        let err = parse_endpoints("http://admin:s3cret@127.0.0.1:2379").unwrap_err();
        assert!(matches!(err, EtcdError::EndpointCredentials));
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
