//! Routes: `--route [HOST]PREFIX:SERVICE`, path normalisation, and matching.
//! Pure: the table is built once and read by every request.
//!
//! Matching: longest prefix wins, on path segment boundaries (`/api` matches
//! `/api`, `/api/`, `/api/x`, not `/apiary`); at equal length a route with a
//! host beats one without. The query string never takes part. Requests are
//! matched on the normalised path, so `/api/../admin` is `/admin`.

use std::fmt;

use portico_wire::ServiceName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    /// Normalised, without a trailing slash unless it is `/` itself.
    pub prefix: String,
    pub service: ServiceName,
    pub options: RouteOptions,
}

/// What a route may set beyond its target (from the config file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteOptions {
    /// Cut the prefix off the path before the backend sees it
    /// (`/api/users` on route `/api` reaches the backend as `/users`).
    pub strip_prefix: bool,
    /// This route's --backend-timeout.
    pub backend_timeout: Option<std::time::Duration>,
    /// The protocol spoken to the route's backends.
    pub upstream: UpstreamProtocol,
    /// Whether a plain-HTTP request is sent to HTTPS (308); `None`: as
    /// `--redirect-https` says.
    pub redirect_https: Option<bool>,
    /// Compress this route's responses (`None`: as --compress says).
    pub compress: Option<bool>,
}

/// How the ingress talks to a route's backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with pooled keep-alive connections (the default).
    #[default]
    Http1,
    /// HTTP/2 without TLS (prior knowledge), one multiplexed connection per
    /// replica: for gRPC and other h2-only services.
    H2c,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}:{}",
            self.host.as_deref().unwrap_or(""),
            self.prefix,
            self.service
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("invalid --route {0:?}: expected [HOST]PREFIX:SERVICE, e.g. /api:api-service or example.com/v1:api")]
    Shape(String),
    #[error("invalid --route {route:?}: {source}")]
    Service {
        route: String,
        #[source]
        source: portico_wire::NameError,
    },
    #[error("invalid --route {0:?}: the host may hold only letters, digits, '-' and '.'")]
    Host(String),
    #[error("--route {0:?} is given twice")]
    Duplicate(String),
}

impl Route {
    pub fn parse(spec: &str) -> Result<Self, RouteError> {
        // Service names never contain ':', so the last ':' splits the two.
        let (target, service) = spec
            .rsplit_once(':')
            .ok_or_else(|| RouteError::Shape(spec.to_owned()))?;
        let service = ServiceName::parse(service).map_err(|source| RouteError::Service {
            route: spec.to_owned(),
            source,
        })?;
        let (host, path) = match target.find('/') {
            Some(0) => (None, target),
            Some(i) => (Some(&target[..i]), &target[i..]),
            None if !target.is_empty() => (Some(target), "/"),
            None => return Err(RouteError::Shape(spec.to_owned())),
        };
        let host = host
            .map(|h| {
                let h = h.to_ascii_lowercase();
                let valid = !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
                if valid {
                    Ok(h)
                } else {
                    Err(RouteError::Host(spec.to_owned()))
                }
            })
            .transpose()?;
        let mut prefix = normalise_path(path).ok_or_else(|| RouteError::Shape(spec.to_owned()))?;
        if prefix.len() > 1 && prefix.ends_with('/') {
            prefix.pop();
        }
        Ok(Self {
            host,
            prefix,
            service,
            options: RouteOptions::default(),
        })
    }

    fn matches_path(&self, path: &str) -> bool {
        if self.prefix == "/" {
            return true;
        }
        match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// All routes, ordered so that the first match is the right one.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Some route asks for plain HTTP to be redirected to HTTPS.
    redirects: bool,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Result<Self, RouteError> {
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(b.host.is_some().cmp(&a.host.is_some()))
                .then(a.prefix.cmp(&b.prefix))
                .then(a.host.cmp(&b.host))
        });
        for pair in routes.windows(2) {
            if pair[0].host == pair[1].host && pair[0].prefix == pair[1].prefix {
                return Err(RouteError::Duplicate(pair[1].to_string()));
            }
        }
        let redirects = routes
            .iter()
            .any(|r| r.options.redirect_https == Some(true));
        Ok(Self { routes, redirects })
    }

    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<Self, RouteError> {
        let routes = specs
            .iter()
            .map(|s| Route::parse(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(routes)
    }

    /// The route for a request. `host` is the request's host without port,
    /// `path` its normalised path.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.find_indexed(host, path).map(|(_, r)| r)
    }

    /// As `find`, with the route's position in `routes()`.
    pub fn find_indexed(&self, host: Option<&str>, path: &str) -> Option<(usize, &Route)> {
        self.routes.iter().enumerate().find(|(_, r)| {
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            host_ok && r.matches_path(path)
        })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Whether some route has `redirect_https = true`.
    pub fn redirects(&self) -> bool {
        self.redirects
    }
}

/// Normalise an origin-form path for routing: percent-encoded unreserved
/// characters are decoded (so `%2e%2e` is `..`), `.` and `..` segments are
/// removed (RFC 3986 section 5.2.4, never climbing above the root) and runs
/// of `/` are merged. Returns `None` when the path does not start with `/`.
/// Other percent-encodings, `%2F` among them, are kept as they are, so they
/// never create a segment boundary.
pub fn normalise_path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    // A trailing slash (or a trailing dot segment) names a directory: keep it.
    let ends_as_dir = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if out.is_empty() || (ends_as_dir && !segments.is_empty()) {
        out.push('/');
    }
    Some(out)
}

/// What to do with a path that common backends resolve otherwise than we
/// route it (`--path-escapes`), as Envoy's `path_with_escaped_slashes_action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PathEscapes {
    /// Forward every path byte for byte (the behaviour before issue 18).
    Keep,
    /// Refuse dot segments with parameters (`/..;/`: Tomcat drops the
    /// parameters and climbs) and backslashes (WHATWG URL parsers read `\`
    /// as `/`); keep `%2F` and `%5C`, which real APIs use.
    #[default]
    KeepEncoded,
    /// As `keep-encoded`, and refuse `%2F` and `%5C` too (backends that
    /// decode them before resolving dot segments).
    Reject,
}

/// Why a path is refused under `PathEscapes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmbiguousPath {
    Backslash,
    DotSegmentWithParameters,
    EncodedSeparator,
}

impl AmbiguousPath {
    /// The client's answer (400).
    pub fn message(self) -> &'static str {
        match self {
            Self::Backslash => "Bad request: a backslash in the path.\n",
            Self::DotSegmentWithParameters => {
                "Bad request: a dot segment with parameters (..;) in the path.\n"
            }
            Self::EncodedSeparator => "Bad request: an encoded slash (%2F or %5C) in the path.\n",
        }
    }
}

/// Whether `mode` refuses `path` (a raw origin-form path, before
/// normalisation), and why. Such a path is routed on one prefix and resolved
/// by the backend under another: `/public/..;/admin` matches the route
/// `/public`, and Tomcat serves `/admin`. One pass over the bytes; most
/// paths hold none of `\`, `;` and `%`.
pub fn ambiguous_path(path: &str, mode: PathEscapes) -> Option<AmbiguousPath> {
    if mode == PathEscapes::Keep {
        return None;
    }
    let bytes = path.as_bytes();
    let mut parameters = false;
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Some(AmbiguousPath::Backslash),
            b';' => parameters = true,
            b'%' if mode == PathEscapes::Reject => {
                let escape = bytes.get(i + 1..i + 3).map(|e| e.to_ascii_uppercase());
                if matches!(escape.as_deref(), Some(b"2F" | b"5C")) {
                    return Some(AmbiguousPath::EncodedSeparator);
                }
            }
            _ => {}
        }
    }
    let dot_with_parameters = |segment: &str| {
        segment
            .split_once(';')
            .is_some_and(|(name, _)| matches!(&*decode_unreserved(name), "." | ".."))
    };
    (parameters && path.split('/').any(dot_with_parameters))
        .then_some(AmbiguousPath::DotSegmentWithParameters)
}

/// Whether `path` is already in normal form: the common case, checked
/// without allocating.
pub fn is_normal(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains("//")
        && !path.contains("/./")
        && !path.contains("/../")
        && !path.ends_with("/.")
        && !path.ends_with("/..")
        && !path.contains('%')
}

fn decode_unreserved(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') {
        return std::borrow::Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 8);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Copy up to the next '%'; `i` is always on a character boundary.
            let next = path[i..].find('%').map_or(bytes.len(), |n| i + n);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let hex = |b: u8| (b as char).to_digit(16);
        let escaped = match (bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match escaped {
            // An unreserved character means the same escaped or not.
            Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                out.push(c as char);
            }
            // A reserved or non-ASCII byte stays escaped.
            Some(_) => out.push_str(&path[i..i + 3]),
            // A '%' that starts no valid escape is written as "%25": left
            // bare, it could join decoded characters into a new escape
            // ("%%34%31" would become "%41") and the backend would decode a
            // path other than the one we routed on.
            None => {
                out.push_str("%25");
                i += 1;
                continue;
            }
        }
        i += 3;
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn table(specs: &[&str]) -> RouteTable {
        RouteTable::parse(specs).unwrap()
    }

    fn svc(t: &RouteTable, host: Option<&str>, path: &str) -> Option<String> {
        let p = normalise_path(path).unwrap();
        t.find(host, &p).map(|r| r.service.to_string())
    }

    #[test]
    fn seed_routes() {
        let t = table(&["/api:api-service", "/:frontend"]);
        assert_eq!(svc(&t, None, "/api").as_deref(), Some("api-service"));
        assert_eq!(svc(&t, None, "/api/").as_deref(), Some("api-service"));
        assert_eq!(svc(&t, None, "/api/x/y").as_deref(), Some("api-service"));
        assert_eq!(svc(&t, None, "/apiary").as_deref(), Some("frontend"));
        assert_eq!(svc(&t, None, "/").as_deref(), Some("frontend"));
        assert_eq!(svc(&t, None, "/index.html").as_deref(), Some("frontend"));
    }

    #[test]
    fn no_catch_all_means_no_route() {
        let t = table(&["/api:api"]);
        assert_eq!(svc(&t, None, "/other"), None);
        assert_eq!(svc(&t, None, "/"), None);
    }

    #[test]
    fn longest_prefix_wins_whatever_the_order() {
        let t = table(&["/:a", "/api:b", "/api/v2:c"]);
        assert_eq!(svc(&t, None, "/api/v2/x").as_deref(), Some("c"));
        assert_eq!(svc(&t, None, "/api/v3").as_deref(), Some("b"));
        assert_eq!(svc(&t, None, "/api/v2x").as_deref(), Some("b"));
    }

    #[test]
    fn dot_segments_cannot_escape_a_route() {
        let t = table(&["/public:pub", "/admin:adm"]);
        assert_eq!(svc(&t, None, "/public/../admin").as_deref(), Some("adm"));
        assert_eq!(
            svc(&t, None, "/public/%2e%2e/admin").as_deref(),
            Some("adm")
        );
        assert_eq!(
            svc(&t, None, "/public/%2E%2E/admin").as_deref(),
            Some("adm")
        );
        assert_eq!(svc(&t, None, "//admin").as_deref(), Some("adm"));
        assert_eq!(svc(&t, None, "/./admin").as_deref(), Some("adm"));
        assert_eq!(svc(&t, None, "/../../admin/x").as_deref(), Some("adm"));
        // An encoded slash is not a separator.
        assert_eq!(svc(&t, None, "/public%2F..%2Fadmin"), None);
        assert_eq!(svc(&t, None, "/publi%63/x").as_deref(), Some("pub"));
    }

    /// Paths we route on one prefix and common backends resolve under
    /// another (issue 18): refused unless `keep`.
    #[test]
    fn ambiguous_paths_by_mode() {
        use AmbiguousPath::*;
        use PathEscapes::*;
        let cases: &[(&str, [Option<AmbiguousPath>; 3])] = &[
            ("/public/x", [None, None, None]),
            (
                "/public/..;/admin",
                [
                    None,
                    Some(DotSegmentWithParameters),
                    Some(DotSegmentWithParameters),
                ],
            ),
            (
                "/public/..;x=1/admin",
                [
                    None,
                    Some(DotSegmentWithParameters),
                    Some(DotSegmentWithParameters),
                ],
            ),
            (
                "/public/.;/admin",
                [
                    None,
                    Some(DotSegmentWithParameters),
                    Some(DotSegmentWithParameters),
                ],
            ),
            (
                "/public/%2e%2E;/admin",
                [
                    None,
                    Some(DotSegmentWithParameters),
                    Some(DotSegmentWithParameters),
                ],
            ),
            (
                "/public/..;",
                [
                    None,
                    Some(DotSegmentWithParameters),
                    Some(DotSegmentWithParameters),
                ],
            ),
            (
                "/public\\..\\admin",
                [None, Some(Backslash), Some(Backslash)],
            ),
            ("/public/..%2fadmin", [None, None, Some(EncodedSeparator)]),
            ("/public/..%5Cadmin", [None, None, Some(EncodedSeparator)]),
            ("/files/a%2Fb", [None, None, Some(EncodedSeparator)]),
            // Parameters on an ordinary segment, and escapes that are no
            // separator, are fine.
            ("/a;jsessionid=1/b", [None, None, None]),
            ("/a/...;/b", [None, None, None]),
            ("/a%20b/%25", [None, None, None]),
            ("/a%2", [None, None, None]),
        ];
        for (path, want) in cases {
            for (mode, want) in [Keep, KeepEncoded, Reject].into_iter().zip(want) {
                assert_eq!(ambiguous_path(path, mode), *want, "{path} {mode:?}");
            }
        }
        assert_eq!(PathEscapes::default(), KeepEncoded);
    }

    #[test]
    fn normalisation() {
        let n = |p: &str| normalise_path(p).unwrap();
        assert_eq!(n("/"), "/");
        assert_eq!(n("/a/b/../c"), "/a/c");
        assert_eq!(n("/a/./b/"), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/a//b"), "/a/b");
        assert_eq!(n("/%7Euser"), "/~user");
        assert_eq!(n("/a%20b"), "/a%20b");
        assert_eq!(n("/bad%zz%"), "/bad%25zz%25");
        // Found by the route_match fuzzer: a stray '%' must not join decoded
        // characters into a new escape (double decoding).
        assert_eq!(n("/%%34%31"), "/%2541");
        assert_eq!(n(&n("/%%34%31")), "/%2541");
        assert_eq!(n("/é/../x"), "/x");
        // Found by the route_match fuzzer: a multi-byte character right
        // after a decoded escape.
        assert_eq!(n("/%2e%2eÑ/y"), "/..Ñ/y");
        assert_eq!(n("/a%2eé"), "/a.é");
        assert_eq!(normalise_path("*"), None);
        assert_eq!(normalise_path("api"), None);
        for p in ["/", "/a/b", "/a/b/", "/x.y/z"] {
            assert!(is_normal(p) && n(p) == p, "{p}");
        }
        for p in ["/a/../b", "//a", "/a/.", "/%2e"] {
            assert!(!is_normal(p), "{p}");
        }
    }

    #[test]
    fn host_routes() {
        let t = table(&["api.example.com/v1:api", "/:web", "/v1:v1"]);
        assert_eq!(
            svc(&t, Some("api.example.com"), "/v1/x").as_deref(),
            Some("api")
        );
        assert_eq!(
            svc(&t, Some("API.Example.com"), "/v1").as_deref(),
            Some("api")
        );
        assert_eq!(svc(&t, Some("other.com"), "/v1").as_deref(), Some("v1"));
        assert_eq!(svc(&t, None, "/v1").as_deref(), Some("v1"));
        assert_eq!(
            svc(&t, Some("api.example.com"), "/").as_deref(),
            Some("web")
        );
        let t = table(&["example.com:site"]);
        assert_eq!(
            svc(&t, Some("example.com"), "/any").as_deref(),
            Some("site")
        );
        assert_eq!(svc(&t, Some("other.com"), "/any"), None);
    }

    #[test]
    fn trailing_slash_prefix_is_the_same_route() {
        let t = table(&["/api/:api", "/:web"]);
        assert_eq!(svc(&t, None, "/api").as_deref(), Some("api"));
        assert_eq!(svc(&t, None, "/api/x").as_deref(), Some("api"));
    }

    #[test]
    fn bad_routes_are_refused_with_the_reason() {
        for bad in [
            "",
            "/api",
            "api",
            ":svc",
            "/api:",
            "/api:a b",
            "ex ample.com/:x",
            "/api:a|b",
        ] {
            assert!(Route::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            RouteTable::parse(&["/a:x", "/a/:y"]).unwrap_err(),
            RouteError::Duplicate("/a:y".into())
        );
        let e = Route::parse("/api").unwrap_err().to_string();
        assert!(e.contains("expected [HOST]PREFIX:SERVICE"), "{e}");
    }
}
