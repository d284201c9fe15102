//! Everything that can go wrong on the request path, who failed, and the
//! two decisions made from it in one place each: the status and text the
//! client gets (`ProxyError::response_parts`), and whether a failed attempt
//! may go again (`AttemptError::next`).

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};
use portico_wire::ServiceName;

use super::route::AmbiguousPath;
use crate::discovery::DiscoveryError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request target is over the limit (`--max-uri-bytes`).
    #[error("request target over the limit")]
    UriTooLong,
    /// The request head is over the limit (`--max-header-bytes`).
    #[error("request head over the limit")]
    HeadersTooLarge,
    /// The client's request cannot be routed as sent.
    #[error("bad request: {0}")]
    BadRequest(#[from] BadRequest),
    #[error("no route for this path")]
    NoRoute,
    #[error("request body over the --max-body-bytes limit")]
    BodyTooLarge,
    /// The request body's framing is broken (or it was cut short): the
    /// client's error, whether found before or while it was forwarded.
    #[error("the request body is malformed")]
    MalformedBody,
    /// A Transfer-Encoding other than `chunked` alone: the body's coding
    /// would be dropped when it is re-framed for the backend (RFC 9112
    /// section 6.1: 501).
    #[error("a transfer coding other than chunked")]
    UnsupportedTransferCoding,
    /// An extended CONNECT (RFC 8441) for a protocol other than
    /// `websocket`, which has no HTTP/1.1 form to give a backend.
    #[error("extended CONNECT for a protocol other than websocket")]
    UnsupportedProtocol,
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// Replicas exist but none could be connected to.
    #[error("no replica of '{service}' answered ({attempts} attempts; last tried {last_addr})")]
    Unreachable {
        service: ServiceName,
        attempts: u32,
        last_addr: SocketAddr,
        #[source]
        source: UpstreamError,
    },
    /// The backend was reached but failed the exchange.
    #[error("backend {addr} of '{service}' failed")]
    Backend {
        service: ServiceName,
        addr: SocketAddr,
        #[source]
        source: UpstreamError,
    },
    #[error("backend {addr} of '{service}' did not start its response within {timeout:?}")]
    Timeout {
        service: ServiceName,
        addr: SocketAddr,
        timeout: Duration,
    },
}

/// Why a request is refused with 400: what the client can fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("HTTP/1.1 without a Host header")]
    MissingHost,
    #[error("userinfo in the Host header")]
    HostUserinfo,
    #[error("malformed Host header")]
    MalformedHost,
    #[error("the request target and Host name different hosts")]
    HostMismatch,
    #[error("the request target is not an absolute path")]
    RelativePath,
    #[error("malformed request target")]
    MalformedTarget,
    #[error("ambiguous path: {0:?}")]
    AmbiguousPath(AmbiguousPath),
}

impl BadRequest {
    /// The client's answer, one line.
    pub fn message(self) -> &'static str {
        match self {
            Self::DuplicateHost => "Bad request: more than one Host header.\n",
            Self::MissingHost => "Bad request: HTTP/1.1 requires a Host header.\n",
            Self::HostUserinfo => "Bad request: userinfo in the Host header.\n",
            Self::MalformedHost => "Bad request: malformed Host header.\n",
            Self::HostMismatch => {
                "Bad request: the request target and Host name different hosts.\n"
            }
            Self::RelativePath => "Bad request: the request target must be an absolute path.\n",
            Self::MalformedTarget => "Bad request: the request target is malformed.\n",
            Self::AmbiguousPath(why) => why.message(),
        }
    }
}

/// How a client's request body failed: the client's doing, never the
/// backend's, whichever client path was streaming it when it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyFault {
    #[error("request body over the --max-body-bytes limit")]
    TooLarge,
    /// Malformed framing (a bad chunk size or line end), or cut short.
    #[error("the client's request body is malformed or cut short")]
    Malformed,
}

/// A failure talking to one backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
    /// hyper's clients failed the request; `unsent` when they gave it back
    /// untouched (nothing of it was written).
    #[error("request failed")]
    Request {
        #[source]
        source: hyper::Error,
        unsent: bool,
    },
    #[error("the backend switched protocols though the client asked for no upgrade")]
    UnaskedUpgrade,
    #[error("the backend's response has both Content-Length and Transfer-Encoding")]
    AmbiguousFraming,
    #[error("the HTTP/1.1 exchange with the backend failed")]
    Exchange(#[source] super::h1::client::ExchangeError),
    #[error("no response head within {0:?}")]
    Timeout(Duration),
    /// The backend switched to WebSocket without the accept value our key
    /// asks for (RFC 6455 section 4.2.2): not a WebSocket server we can
    /// vouch for.
    #[error("the backend's Sec-WebSocket-Accept does not answer our key")]
    WebSocketAccept,
    /// The backend answered a WebSocket upgrade with a success that
    /// switched nothing.
    #[error("the backend answered the WebSocket upgrade without switching protocols")]
    NotUpgraded,
    /// A try found no request to send: the last went out and could not be
    /// copied. The failover loop stops before this; it is a guard.
    #[error("the request was sent and cannot be sent again")]
    Spent,
}

impl From<ClientBodyFault> for ProxyError {
    fn from(fault: ClientBodyFault) -> Self {
        match fault {
            ClientBodyFault::TooLarge => ProxyError::BodyTooLarge,
            ClientBodyFault::Malformed => ProxyError::MalformedBody,
        }
    }
}

/// What a failed attempt allows, from what of the request may have
/// reached the backend (Pingora's `RetryType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryType {
    /// Not one byte of it went out: any request may go again, anywhere.
    Safe,
    /// It went out on a connection that failed before any byte of an
    /// answer: most often a pooled connection the backend closed as we
    /// sent. A replayable request may go again, first on a new connection
    /// to the same replica when the failed one was reused.
    IfReused,
    /// It went out and failed after: only a replayable request (idempotent
    /// and bodiless) may go again, to the next replica.
    IfIdempotent,
    /// An answer began, or the backend broke the protocol, or took too
    /// long: the client gets an error.
    Never,
}

impl UpstreamError {
    /// THE classification, one exhaustive match for every client path.
    pub fn retry_type(&self) -> RetryType {
        match self {
            UpstreamError::Connect(_)
            | UpstreamError::ConnectTimeout(_)
            | UpstreamError::Handshake(_)
            | UpstreamError::Request { unsent: true, .. } => RetryType::Safe,
            UpstreamError::Exchange(e) if !e.sent() => RetryType::Safe,
            UpstreamError::Request { unsent: false, .. } => RetryType::IfReused,
            UpstreamError::Exchange(e) if e.before_response() => RetryType::IfReused,
            UpstreamError::Exchange(_) => RetryType::IfIdempotent,
            UpstreamError::UnaskedUpgrade
            | UpstreamError::AmbiguousFraming
            | UpstreamError::Timeout(_)
            | UpstreamError::WebSocketAccept
            | UpstreamError::NotUpgraded
            | UpstreamError::Spent => RetryType::Never,
        }
    }

    /// The replica answered, though not as it should: it is reachable,
    /// whatever passive health thought.
    pub fn answered(&self) -> bool {
        matches!(self, UpstreamError::AmbiguousFraming)
    }

    /// The replica could not be reached at all (nothing was sent): it is
    /// set aside for a while.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_)
                | UpstreamError::ConnectTimeout(_)
                | UpstreamError::Handshake(_)
        )
    }
}

/// One failed try of one replica, and whether its connection was reused.
#[derive(Debug, thiserror::Error)]
#[error("the try on a {} connection failed", if *reused { "reused" } else { "new" })]
pub struct AttemptError {
    #[source]
    pub error: UpstreamError,
    pub reused: bool,
}

/// What the failover loop does after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Once more on a new connection to the same replica.
    FreshConnection,
    NextReplica,
    GiveUp,
}

impl AttemptError {
    pub fn new(error: UpstreamError, reused: bool) -> Self {
        Self { error, reused }
    }

    /// THE rule for sending a failed request again, for every client
    /// path: a request nothing of which went out may; one that went out
    /// only if it is `replayable` (idempotent, RFC 9110 section 9.2.2, and
    /// without a body, which is gone once streamed).
    pub fn next(&self, replayable: bool) -> Next {
        match (self.error.retry_type(), self.reused, replayable) {
            (RetryType::Safe, true, _) | (RetryType::IfReused, true, true) => Next::FreshConnection,
            (RetryType::Safe, false, _)
            | (RetryType::IfReused, false, true)
            | (RetryType::IfIdempotent, _, true) => Next::NextReplica,
            (RetryType::IfReused | RetryType::IfIdempotent, _, false)
            | (RetryType::Never, _, _) => Next::GiveUp,
        }
    }
}

/// Whether a request may go again once it went out, known before it is
/// sent: only such a request needs a copy kept for a replay.
pub fn replayable(method: &Method, bodiless: bool) -> bool {
    bodiless && is_idempotent(method)
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl ProxyError {
    /// The status and plain-text body the client gets. Seed wording where the
    /// seed had one.
    pub fn response_parts(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::UriTooLong => (StatusCode::URI_TOO_LONG, "Request target too long.\n"),
            ProxyError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request header fields too large.\n",
            ),
            ProxyError::BadRequest(why) => (StatusCode::BAD_REQUEST, why.message()),
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "No route for this path.\n"),
            ProxyError::MalformedBody => (
                StatusCode::BAD_REQUEST,
                "Bad request: malformed request body.\n",
            ),
            ProxyError::UnsupportedTransferCoding => (
                StatusCode::NOT_IMPLEMENTED,
                "Not implemented: a Transfer-Encoding other than chunked.\n",
            ),
            ProxyError::UnsupportedProtocol => (
                StatusCode::NOT_IMPLEMENTED,
                "Not implemented: extended CONNECT for a protocol other than websocket.\n",
            ),
            ProxyError::BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload too large: the request body is over the limit.\n",
            ),
            ProxyError::Discovery(e) => match e {
                DiscoveryError::NotFound(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service not found in Tower\n",
                ),
                DiscoveryError::Exhausted(_) => (
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway: no replica answered.\n",
                ),
                DiscoveryError::Tower(_) | DiscoveryError::TowerRefused(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Tower unreachable: cannot look up the service.\n",
                ),
                DiscoveryError::NotSynced => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Registry unavailable: etcd has not been read yet.\n",
                ),
            },
            ProxyError::Unreachable { .. } => (
                StatusCode::BAD_GATEWAY,
                "Bad gateway: no replica answered.\n",
            ),
            ProxyError::Backend { .. } => (
                StatusCode::BAD_GATEWAY,
                "Bad gateway: the backend failed to answer.\n",
            ),
            ProxyError::Timeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "Gateway timeout: the backend did not answer in time.\n",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::h1::client::ExchangeError;
    use std::io::ErrorKind;

    fn attempt(error: UpstreamError, reused: bool) -> AttemptError {
        AttemptError::new(error, reused)
    }

    #[test]
    fn nothing_sent_goes_anywhere_whatever_the_request() {
        let refused = UpstreamError::Connect(ErrorKind::ConnectionRefused.into());
        let unsent =
            || UpstreamError::Exchange(ExchangeError::Unsent(ErrorKind::BrokenPipe.into()));
        for replayable in [true, false] {
            assert_eq!(
                attempt(
                    UpstreamError::Connect(ErrorKind::ConnectionRefused.into()),
                    false
                )
                .next(replayable),
                Next::NextReplica
            );
            assert_eq!(attempt(unsent(), false).next(replayable), Next::NextReplica);
            assert_eq!(
                attempt(unsent(), true).next(replayable),
                Next::FreshConnection
            );
        }
        assert!(refused.is_connect());
    }

    #[test]
    fn a_sent_request_goes_again_only_if_replayable() {
        let unanswered = || UpstreamError::Exchange(ExchangeError::ClosedBeforeResponse(None));
        assert_eq!(
            attempt(unanswered(), true).next(false),
            Next::GiveUp,
            "may have charged"
        );
        assert_eq!(attempt(unanswered(), false).next(false), Next::GiveUp);
        assert_eq!(
            attempt(unanswered(), true).next(true),
            Next::FreshConnection
        );
        assert_eq!(attempt(unanswered(), false).next(true), Next::NextReplica);
        let broken =
            || UpstreamError::Exchange(ExchangeError::Io(ErrorKind::ConnectionReset.into()));
        assert_eq!(attempt(broken(), true).next(true), Next::NextReplica);
        assert_eq!(attempt(broken(), true).next(false), Next::GiveUp);
    }

    #[test]
    fn a_started_or_broken_answer_never_goes_again() {
        for e in [
            UpstreamError::AmbiguousFraming,
            UpstreamError::UnaskedUpgrade,
            UpstreamError::Timeout(std::time::Duration::from_secs(1)),
        ] {
            assert_eq!(attempt(e, true).next(true), Next::GiveUp);
        }
    }

    #[test]
    fn replayable_means_idempotent_and_bodiless() {
        assert!(replayable(&Method::GET, true));
        assert!(replayable(&Method::DELETE, true));
        assert!(!replayable(&Method::PUT, false), "its body is gone");
        assert!(!replayable(&Method::POST, true));
        assert!(!replayable(&Method::PATCH, true));
    }

    #[test]
    fn every_refusal_has_its_own_status() {
        assert_eq!(
            ProxyError::UriTooLong.response_parts().0,
            StatusCode::URI_TOO_LONG
        );
        assert_eq!(
            ProxyError::HeadersTooLarge.response_parts().0,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let (status, text) = ProxyError::BadRequest(BadRequest::MissingHost).response_parts();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(text, "Bad request: HTTP/1.1 requires a Host header.\n");
    }
}
