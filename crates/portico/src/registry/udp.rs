//! The Tower's UDP server: socket -> `wire::decode_envelope` ->
//! `Registry::handle(.., now)` -> `wire::encode_reply` -> per-source reply
//! rate limit -> socket. The clock is read here, at the edge, and
//! nowhere in the table. No reply is larger than `MAX_UDP_REPLY_LEN`
//! (LIST is cut with a marker) unless it answers a signed LIST that
//! verified, and garbage, or a signed LIST that did not verify, gets no
//! more bytes back than it sent, so the Tower is no amplifier for forged
//! datagrams.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use portico_wire::{decode_envelope, encode_error_within, encode_refusal, encode_reply, Request};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::ratelimit::{ReplyLimit, ReplyLimiter};
use super::{unix_ms, Registry};

/// The receive buffer the Tower asks for: room for tens of thousands of
/// heartbeats queued while the loop is off the CPU (the kernel's default,
/// about 200 KiB, holds some 300 datagrams: a few milliseconds of 40,000
/// replicas heartbeating). Memory is taken only as datagrams queue.
pub const RECV_BUFFER: usize = 8 << 20;

/// Widen the socket's receive buffer to `RECV_BUFFER`, as far as the
/// kernel allows (`net.core.rmem_max` caps it); says once when it is
/// capped, since a burst past it is dropped before the Tower sees it.
pub fn widen_receive_buffer(socket: &UdpSocket) {
    let raw = socket2::SockRef::from(socket);
    if let Err(e) = raw.set_recv_buffer_size(RECV_BUFFER) {
        tracing::warn!(error = %e, "tower: cannot widen the UDP receive buffer; bursts of registrations may be dropped");
        return;
    }
    // Linux grants twice what is asked (room for its per-datagram overhead)
    // and reports that: below RECV_BUFFER, the cap cut it to under half.
    match raw.recv_buffer_size() {
        Ok(got) if got < RECV_BUFFER => tracing::warn!(
            kib = got / 1024,
            "tower: the kernel caps the UDP receive buffer below {} KiB; bursts of registrations past it are dropped (raise net.core.rmem_max)",
            RECV_BUFFER / 1024
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "tower: UDP receive buffer size unknown"),
    }
}

/// Serve the UDP protocol until `shutdown` flips to true.
pub async fn serve(
    socket: UdpSocket,
    registry: Registry,
    limit: ReplyLimit,
    mut shutdown: watch::Receiver<bool>,
) {
    // Large enough for any datagram, so that an oversized one is seen whole
    // and refused by its length instead of being parsed truncated.
    let mut buf = vec![0u8; 65_536];
    let mut limiter = ReplyLimiter::new(limit);
    let mut last_error_log: Option<Instant> = None;
    let mut last_limit_log: Option<Instant> = None;
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (len, from) = match received {
            Ok(x) => x,
            Err(e) => {
                // ICMP port-unreachable from an earlier reply surfaces here as
                // ECONNREFUSED on Linux; it says nothing about this socket.
                if e.kind() != io::ErrorKind::ConnectionRefused && due(&mut last_error_log) {
                    tracing::warn!(error = %e, "tower: receive failed; continuing");
                }
                continue;
            }
        };
        let now = Instant::now();
        // Handled whatever the limit: a forged flood in a workload's name
        // must not keep its heartbeats from the table (and expire it); only
        // the replies it would aim at that address are held back.
        let Some(bytes) = answer(&registry, &buf[..len], from, now) else {
            continue;
        };
        if !limiter.allow(from.ip(), now) {
            if due(&mut last_limit_log) {
                tracing::warn!(%from, "tower: replies over --udp-reply-rate not sent (the requests were handled)");
            }
            continue;
        }
        if let Err(e) = socket.send_to(&bytes, from).await {
            tracing::debug!(%from, error = %e, "tower: reply not sent");
        }
    }
}

/// True at most once every 10 s: a flood must not flood the log too.
fn due(last: &mut Option<Instant>) -> bool {
    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
        return false;
    }
    *last = Some(Instant::now());
    true
}

/// The reply to one datagram, if it gets one.
fn answer(registry: &Registry, datagram: &[u8], from: SocketAddr, now: Instant) -> Option<Bytes> {
    match decode_envelope(datagram) {
        // Encoded once per change, shared by every LIST until the next.
        Ok(envelope) if envelope.request == Request::List => {
            let signed = &datagram[..envelope.signed_len];
            match registry.list_reply(envelope.signature, signed, now, unix_ms()) {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    tracing::debug!(%from, error = %e, "tower: signed LIST refused");
                    encode_error_within(&e, datagram.len()).map(Bytes::from)
                }
            }
        }
        Ok(envelope) => {
            tracing::debug!(%from, request = ?envelope.request, "tower request");
            let signed = &datagram[..envelope.signed_len];
            let reply = registry.handle(envelope, signed, from.ip(), now, unix_ms());
            Some(Bytes::from(encode_reply(&reply)))
        }
        Err(e) => {
            tracing::debug!(%from, error = %e, "tower: malformed datagram");
            registry.count_malformed();
            encode_refusal(&e, datagram.len()).map(Bytes::from)
        }
    }
}

/// Drop expired entries until shutdown: at every expiry (so that watchers
/// hear of it at once) and at least every `period`.
pub async fn reap(registry: Registry, period: Duration, mut shutdown: watch::Receiver<bool>) {
    // Expiries come one instant at a time; the log says how many at most
    // every 10 s.
    let mut unlogged = 0;
    let mut last_log: Option<Instant> = None;
    loop {
        let (reaped, next) = registry.reap(Instant::now(), period);
        unlogged += reaped;
        if unlogged > 0 && due(&mut last_log) {
            tracing::info!(expired = unlogged, "tower: reaped expired registrations");
            unlogged = 0;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// The longest the reaper sleeps: 10 s, or a third of the TTL when shorter.
pub fn reap_period(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(50), Duration::from_secs(10))
}
