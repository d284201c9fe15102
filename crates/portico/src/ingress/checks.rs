//! The checks a request passes before it is routed, and the target the
//! backend will see: limits, the host it addressed, the path it is routed
//! on. Pure: no I/O, no clock, so each rule has a unit test.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Authority;
use http::{Uri, Version};

use super::error::{BadRequest, ProxyError};
use super::headers;
use super::route::{self, PathEscapes};

/// The request limits of `--max-uri-bytes`, `--max-header-bytes` and
/// `--max-body-bytes`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request target accepted; longer gets 414.
    pub max_uri_bytes: usize,
    /// Largest request head (target and header fields); larger gets 431.
    pub max_header_bytes: usize,
    /// Request bodies past this get 413.
    pub max_body_bytes: Option<u64>,
}

/// What can be refused from the head alone, before anything moves: the
/// target's length (414), the head's size (431), a declared body over the
/// limit (413), a transfer coding we cannot re-frame (501).
pub fn within_limits(
    uri: &Uri,
    headers: &HeaderMap,
    declared_body: Option<u64>,
    limits: &Limits,
) -> Result<(), ProxyError> {
    let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > limits.max_uri_bytes {
        return Err(ProxyError::UriTooLong);
    }
    // hyper bounds the head only while it is incomplete: a head that
    // arrives whole in one read can pass its buffer limit. The limit is ours.
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if target + fields > limits.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    if let (Some(limit), Some(len)) = (limits.max_body_bytes, declared_body) {
        if len > limit {
            return Err(ProxyError::BodyTooLarge);
        }
    }
    if !headers::only_chunked(headers) {
        return Err(ProxyError::UnsupportedTransferCoding);
    }
    Ok(())
}

/// The host a request addressed, as routing and the backend's Host need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressed {
    /// The one Host field, if the client sent one.
    pub host_header: Option<HeaderValue>,
    /// What routes match on: an absolute-form target's authority or
    /// :authority if present, else the Host field's.
    pub authority: Option<Authority>,
    /// RFC 9112 3.2.2 and RFC 9113 8.3.1: the Host a backend sees is made
    /// from an absolute-form target or :authority, not forwarded.
    pub target_host: Option<HeaderValue>,
}

impl Addressed {
    pub fn host(&self) -> Option<&str> {
        self.authority.as_ref().map(Authority::host)
    }
}

/// Set the Host the backend's request carries, and return the one to name
/// in X-Forwarded-Host: the one the target named, else the client's. With
/// neither (HTTP/1.0 may name no host, but the backend's request is
/// HTTP/1.1 and must, RFC 9112 section 3.2) the service's name, as nginx
/// sends its upstream's name (`$proxy_host`), and none to forward.
pub fn set_backend_host(
    headers: &mut HeaderMap,
    addressed: &Addressed,
    service: &str,
) -> Option<HeaderValue> {
    if let Some(host) = &addressed.target_host {
        headers.insert(header::HOST, host.clone());
        return Some(host.clone());
    }
    if let Some(host) = &addressed.host_header {
        // Already the request's one Host field.
        return Some(host.clone());
    }
    if let Ok(name) = HeaderValue::from_str(service) {
        headers.insert(header::HOST, name);
    }
    None
}

/// The Host rules: one Host field at most, and one at least on HTTP/1.1
/// (RFC 9112 section 3.2); well-formed; naming the same host as an
/// absolute-form target.
pub fn addressed(
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Addressed, BadRequest> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_header = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(BadRequest::DuplicateHost);
    }
    if host_header.is_none() && version == Version::HTTP_11 {
        return Err(BadRequest::MissingHost);
    }
    let authority = request_authority(uri, host_header.as_ref())?;
    let target_host = uri.authority().map(host_field).transpose()?;
    Ok(Addressed {
        host_header,
        authority,
        target_host,
    })
}

/// The authority the client addressed: an absolute-form target or
/// :authority if present, else the Host header. A target whose host
/// differs from the Host header is refused (RFC 9112 section 3.2.2 lets a
/// proxy pick either; a mismatch is a classic routing-confusion probe).
/// Hosts compare without regard to case, as routes match them.
fn request_authority(
    uri: &Uri,
    host_header: Option<&HeaderValue>,
) -> Result<Option<Authority>, BadRequest> {
    if host_header.is_some_and(|v| v.as_bytes().contains(&b'@')) {
        // RFC 9110 section 7.2: Host carries no userinfo; a backend might
        // take the part before `@` for the host.
        return Err(BadRequest::HostUserinfo);
    }
    let from_header = match host_header {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<Authority>().ok())
                .ok_or(BadRequest::MalformedHost)?,
        ),
        None => None,
    };
    match (uri.authority(), from_header) {
        (Some(a), Some(h)) if !a.host().eq_ignore_ascii_case(h.host()) => {
            Err(BadRequest::HostMismatch)
        }
        (Some(a), _) => Ok(Some(a.clone())),
        (None, h) => Ok(h),
    }
}

/// A Host field for `authority`: host and port as the client sent them, any
/// userinfo left out (RFC 9110 section 7.2).
fn host_field(authority: &Authority) -> Result<HeaderValue, BadRequest> {
    let value = match authority.port() {
        Some(port) => HeaderValue::from_str(&format!("{}:{}", authority.host(), port.as_str())),
        None => HeaderValue::from_str(authority.host()),
    };
    value.map_err(|_| BadRequest::MalformedTarget)
}

/// The path a request is routed on: refused if `escapes` finds it
/// ambiguous, else normalised (dot segments, repeated slashes), borrowed
/// when it already is.
pub fn routing_path(raw: &str, escapes: PathEscapes) -> Result<Cow<'_, str>, BadRequest> {
    if let Some(why) = route::ambiguous_path(raw, escapes) {
        return Err(BadRequest::AmbiguousPath(why));
    }
    if route::is_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    route::normalise_path(raw)
        .map(Cow::Owned)
        .ok_or(BadRequest::RelativePath)
}

/// `path` with the route's `prefix` cut (`strip_prefix`), still absolute.
pub fn strip_prefix<'a>(path: Cow<'a, str>, prefix: &str) -> Cow<'a, str> {
    if prefix == "/" {
        return path;
    }
    let rest = &path[prefix.len()..];
    Cow::Owned(if rest.starts_with('/') {
        rest.to_owned()
    } else {
        format!("/{rest}")
    })
}

/// The target the backend sees: the path routed on and the query as sent,
/// in origin form. `None` when the request's own target is exactly that
/// already (an origin-form target whose path needed no change), as most are.
pub fn backend_target(uri: &Uri, path: Cow<'_, str>) -> Result<Option<Uri>, BadRequest> {
    if matches!(path, Cow::Borrowed(_)) && uri.authority().is_none() {
        return Ok(None);
    }
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    Uri::try_from(target)
        .map(Some)
        .map_err(|_| BadRequest::MalformedTarget)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LIMITS: Limits = Limits {
        max_uri_bytes: 32,
        max_header_bytes: 64,
        max_body_bytes: Some(10),
    };

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn limits_refuse_each_with_its_own_status() {
        let short: Uri = "/a".parse().unwrap();
        let long: Uri = format!("/{}", "a".repeat(40)).parse().unwrap();
        let ok = headers(&[("host", "x")]);
        assert!(within_limits(&short, &ok, Some(10), &LIMITS).is_ok());
        assert!(matches!(
            within_limits(&long, &ok, None, &LIMITS),
            Err(ProxyError::UriTooLong)
        ));
        let big = headers(&[("x-big", &"b".repeat(60))]);
        assert!(matches!(
            within_limits(&short, &big, None, &LIMITS),
            Err(ProxyError::HeadersTooLarge)
        ));
        assert!(matches!(
            within_limits(&short, &ok, Some(11), &LIMITS),
            Err(ProxyError::BodyTooLarge)
        ));
        let gzip = headers(&[("transfer-encoding", "gzip, chunked")]);
        assert!(matches!(
            within_limits(&short, &gzip, None, &LIMITS),
            Err(ProxyError::UnsupportedTransferCoding)
        ));
    }

    #[test]
    fn host_rules() {
        let origin: Uri = "/p".parse().unwrap();
        let one = headers(&[("host", "Example.com:8080")]);
        let a = addressed(Version::HTTP_11, &origin, &one).unwrap();
        assert_eq!(a.host(), Some("Example.com"));
        let mut sent = one.clone();
        assert_eq!(
            set_backend_host(&mut sent, &a, "svc").as_ref(),
            one.get("host")
        );
        assert_eq!(sent, one, "the client's Host goes as it came");
        assert_eq!(
            addressed(Version::HTTP_11, &origin, &HeaderMap::new()),
            Err(BadRequest::MissingHost)
        );
        assert!(addressed(Version::HTTP_10, &origin, &HeaderMap::new()).is_ok());
        let two = headers(&[("host", "a"), ("host", "b")]);
        assert_eq!(
            addressed(Version::HTTP_11, &origin, &two),
            Err(BadRequest::DuplicateHost)
        );
        let userinfo = headers(&[("host", "evil@a")]);
        assert_eq!(
            addressed(Version::HTTP_11, &origin, &userinfo),
            Err(BadRequest::HostUserinfo)
        );
        let malformed = headers(&[("host", "a b")]);
        assert_eq!(
            addressed(Version::HTTP_11, &origin, &malformed),
            Err(BadRequest::MalformedHost)
        );
    }

    #[test]
    fn an_absolute_target_names_the_host_the_backend_sees() {
        let absolute: Uri = "http://user@API.example:81/p?q".parse().unwrap();
        let same = headers(&[("host", "api.example")]);
        let a = addressed(Version::HTTP_11, &absolute, &same).unwrap();
        let mut sent = same.clone();
        let forwarded = set_backend_host(&mut sent, &a, "svc").unwrap();
        assert_eq!(forwarded, "API.example:81");
        assert_eq!(
            sent["host"], "API.example:81",
            "no userinfo, the target's port"
        );
        let other = headers(&[("host", "other.example")]);
        assert_eq!(
            addressed(Version::HTTP_11, &absolute, &other),
            Err(BadRequest::HostMismatch)
        );
    }

    #[test]
    fn without_a_host_the_backend_hears_the_service_name() {
        let a = addressed(Version::HTTP_10, &"/p".parse().unwrap(), &HeaderMap::new()).unwrap();
        let mut sent = HeaderMap::new();
        assert_eq!(set_backend_host(&mut sent, &a, "api-service"), None);
        assert_eq!(sent["host"], "api-service");
    }

    #[test]
    fn the_path_routed_on_is_normal_and_unambiguous() {
        assert!(matches!(
            routing_path("/a/b", PathEscapes::KeepEncoded),
            Ok(Cow::Borrowed("/a/b"))
        ));
        assert_eq!(
            routing_path("/a/./b/../c", PathEscapes::KeepEncoded).unwrap(),
            "/a/c"
        );
        assert_eq!(
            routing_path("/a\\b", PathEscapes::KeepEncoded),
            Err(BadRequest::AmbiguousPath(route::AmbiguousPath::Backslash))
        );
        assert!(routing_path("/a%2Fb", PathEscapes::KeepEncoded).is_ok());
        assert!(routing_path("/a%2Fb", PathEscapes::Reject).is_err());
    }

    #[test]
    fn a_stripped_prefix_leaves_an_absolute_path() {
        assert_eq!(strip_prefix(Cow::Borrowed("/api/v1"), "/api"), "/v1");
        assert_eq!(strip_prefix(Cow::Borrowed("/api"), "/api"), "/");
        assert_eq!(strip_prefix(Cow::Borrowed("/apix"), "/api"), "/x");
        assert!(matches!(
            strip_prefix(Cow::Borrowed("/a"), "/"),
            Cow::Borrowed("/a")
        ));
    }

    #[test]
    fn the_backend_target_is_rebuilt_only_when_it_changed() {
        let uri: Uri = "/a?q=1".parse().unwrap();
        assert_eq!(backend_target(&uri, Cow::Borrowed("/a")).unwrap(), None);
        assert_eq!(
            backend_target(&uri, Cow::Owned("/b".into()))
                .unwrap()
                .unwrap(),
            "/b?q=1"
        );
        let absolute: Uri = "http://h/a?q".parse().unwrap();
        assert_eq!(
            backend_target(&absolute, Cow::Borrowed("/a"))
                .unwrap()
                .unwrap(),
            "/a?q"
        );
    }
}
