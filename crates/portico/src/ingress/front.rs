//! The front door: the requests answered before the request path. On any
//! listener, an ACME HTTP-01 challenge whose token the certificate manager
//! left here; on plain-HTTP listeners, the redirect to HTTPS
//! (`--redirect-https`, or a route's `redirect_https`), never for the
//! challenge path. The decisions are pure functions (`challenge_token`,
//! `https_location`); `FrontDoor::answer` applies them. A request they do
//! not answer, or that is malformed, goes on to `handler` unchanged, which
//! routes it or gives the 400.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Body;

use super::body::{Completion, DownstreamBody};
use super::handler::{Client, Shared};
use super::route;
use crate::metrics::RouteStats;

/// Where HTTP-01 challenges are fetched (RFC 8555 section 8.3).
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Key authorizations of the HTTP-01 challenges being validated, by token:
/// put here by the ACME manager for the length of an order.
#[derive(Debug, Default)]
pub struct Http01Tokens {
    pending: Mutex<HashMap<String, Bytes>>,
}

impl Http01Tokens {
    pub fn insert(&self, token: &str, key_authorization: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(
                token.to_owned(),
                Bytes::copy_from_slice(key_authorization.as_bytes()),
            );
        }
    }

    pub fn remove(&self, token: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(token);
        }
    }

    fn get(&self, token: &str) -> Option<Bytes> {
        self.pending.lock().ok()?.get(token).cloned()
    }
}

/// Where plain-HTTP clients are sent.
#[derive(Debug, Clone, Copy)]
pub struct Redirect {
    /// `--redirect-https`: what a route that says nothing gets.
    pub default: bool,
    /// The HTTPS listener's port.
    pub https_port: u16,
}

#[derive(Debug, Default)]
pub struct FrontDoor {
    /// `None` without an HTTPS listener.
    redirect: Option<Redirect>,
    /// `None` unless ACME answers HTTP-01 challenges.
    tokens: Option<Arc<Http01Tokens>>,
}

impl FrontDoor {
    pub fn new(redirect: Option<Redirect>, tokens: Option<Arc<Http01Tokens>>) -> Self {
        Self { redirect, tokens }
    }

    /// The answer to `req`, when the front door gives it.
    pub fn answer<B: Body>(
        &self,
        proxy: &Shared,
        client: &Client,
        req: &Request<B>,
    ) -> Option<Response<DownstreamBody>> {
        if self.redirect.is_none() && self.tokens.is_none() {
            return None;
        }
        if let Some(token) = challenge_token(req.uri().path()) {
            // A token we do not hold may be a backend's own (its own ACME
            // client behind us): routed as usual, never redirected.
            let key_authorization = self.tokens.as_ref()?.get(token)?;
            let mut resp = Response::new(DownstreamBody::bytes(key_authorization));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return Some(finish(resp, proxy.metrics.unrouted().clone(), client, req));
        }
        let redirect = self.redirect.filter(|_| !client.tls)?;
        self.redirect(redirect, proxy, client, req)
    }

    fn redirect<B: Body>(
        &self,
        redirect: Redirect,
        proxy: &Shared,
        client: &Client,
        req: &Request<B>,
    ) -> Option<Response<DownstreamBody>> {
        let live = proxy.routes.load();
        if !redirect.default && !live.table.redirects() {
            return None;
        }
        let authority = request_authority(req)?;
        let raw_path = req.uri().path();
        if route::ambiguous_path(raw_path, proxy.path_escapes).is_some() {
            return None;
        }
        let path = route::normalise_path(raw_path)?;
        let host = authority.as_ref().map(|a| a.host());
        let found = live.table.find_indexed(host, &path);
        let choice = found.and_then(|(_, r)| r.options.redirect_https);
        if !choice.unwrap_or(redirect.default) {
            return None;
        }
        let stats = match found {
            Some((index, _)) => live.stats[index].clone(),
            None => proxy.metrics.unrouted().clone(),
        };
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let location =
            authority.and_then(|a| https_location(a.host(), target, redirect.https_port));
        let resp = match location {
            Some(location) => {
                let mut resp = super::handler::local_response(
                    StatusCode::PERMANENT_REDIRECT,
                    "Moved to HTTPS.\n",
                );
                resp.headers_mut().insert(header::LOCATION, location);
                resp
            }
            // HTTP/1.0 may name no host, and there is no URL to send it to.
            None => super::handler::local_response(
                StatusCode::BAD_REQUEST,
                "Bad request: this address redirects to HTTPS, which needs the Host header.\n",
            ),
        };
        Some(finish(resp, stats, client, req))
    }
}

/// The token of an HTTP-01 challenge request's path: base64url characters
/// only (RFC 8555 section 8.1), so that nothing else (`..`, an encoded
/// slash) passes under the challenge's exemption from the redirect.
pub fn challenge_token(path: &str) -> Option<&str> {
    path.strip_prefix(ACME_CHALLENGE_PREFIX).filter(|t| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The https:// URL a plain-HTTP request is sent to: its host (the port it
/// named dropped), `https_port` unless 443, its path and query as sent.
/// `None` for a target that is not a path (`*`).
pub fn https_location(host: &str, path_and_query: &str, https_port: u16) -> Option<HeaderValue> {
    if !path_and_query.starts_with('/') || host.is_empty() {
        return None;
    }
    let host = host.to_ascii_lowercase();
    let url = match https_port {
        443 => format!("https://{host}{path_and_query}"),
        port => format!("https://{host}:{port}{path_and_query}"),
    };
    HeaderValue::from_str(&url).ok()
}

/// The host the client addressed: the target's authority (absolute form,
/// HTTP/2's :authority) or the one Host field; `Some(None)` when there is
/// neither, `None` when it is malformed (left to the request path's 400).
fn request_authority<B>(req: &Request<B>) -> Option<Option<Authority>> {
    if let Some(a) = req.uri().authority() {
        return Some(Some(a.clone()));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return Some(None);
    };
    if hosts.next().is_some() || host.as_bytes().contains(&b'@') {
        return None;
    }
    host.to_str().ok()?.parse().ok().map(Some)
}

/// The answer with its completion: the request counts as in flight until
/// the answer is written, and in its route's metrics.
fn finish<B: Body>(
    resp: Response<DownstreamBody>,
    stats: Arc<RouteStats>,
    client: &Client,
    req: &Request<B>,
) -> Response<DownstreamBody> {
    let body_open = !req.body().is_end_stream();
    let in_flight = client.state.begin_request(req.version(), body_open);
    let status = resp.status().as_u16();
    let mut resp = resp.map(|b| {
        b.on_completion(Completion {
            in_flight,
            stats,
            status,
            started: Instant::now(),
            log: None,
            bytes: 0,
        })
    });
    if body_open && req.version() < Version::HTTP_2 {
        // The body is not read: the connection cannot carry another request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(host: &str, target: &str, port: u16) -> Option<String> {
        https_location(host, target, port).map(|v| v.to_str().unwrap_or("?").to_owned())
    }

    #[test]
    fn the_location_keeps_path_and_query_and_names_the_https_port() {
        assert_eq!(
            location("App.Example.com", "/a/b?x=1&y=%20", 443).as_deref(),
            Some("https://app.example.com/a/b?x=1&y=%20")
        );
        assert_eq!(
            location("example.com", "/", 8443).as_deref(),
            Some("https://example.com:8443/")
        );
        assert_eq!(
            location("[::1]", "/x", 8443).as_deref(),
            Some("https://[::1]:8443/x")
        );
        assert_eq!(location("example.com", "*", 443), None);
        assert_eq!(location("", "/", 443), None);
    }

    #[test]
    fn challenge_paths_are_told_apart() {
        assert_eq!(
            challenge_token("/.well-known/acme-challenge/abc-_1"),
            Some("abc-_1")
        );
        assert_eq!(challenge_token("/.well-known/acme-challenge/"), None);
        assert_eq!(challenge_token("/.well-known/acme-challenge/a/b"), None);
        // Nothing that climbs or hides a separator is a token, so nothing
        // of the kind escapes the redirect to HTTPS.
        assert_eq!(challenge_token("/.well-known/acme-challenge/.."), None);
        assert_eq!(
            challenge_token("/.well-known/acme-challenge/..%2F..%2Fadmin"),
            None
        );
        assert_eq!(challenge_token("/.well-known/acme-challenge/a.b"), None);
        assert_eq!(challenge_token("/.well-known/other"), None);
    }

    #[test]
    fn the_authority_comes_from_the_target_or_the_one_host_field() {
        let req = |target: &str, hosts: &[&str]| {
            let mut b = Request::builder().uri(target);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap_or_default()
        };
        let host = |r: &Request<()>| request_authority(r).map(|a| a.map(|a| a.host().to_owned()));
        assert_eq!(
            host(&req("/x", &["a.test:8080"])),
            Some(Some("a.test".into()))
        );
        assert_eq!(
            host(&req("http://b.test/x", &["a.test"])),
            Some(Some("b.test".into()))
        );
        assert_eq!(host(&req("/x", &[])), Some(None));
        assert_eq!(host(&req("/x", &["a.test", "b.test"])), None);
        assert_eq!(host(&req("/x", &["u@a.test"])), None);
    }
}
