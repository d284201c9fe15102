//! The Tower's UDP server: socket -> `wire::decode_envelope` ->
//! `Registry::handle(.., now)` -> `wire::encode_reply` -> socket. The clock
//! is read here, at the edge, and nowhere in the table.

use std::io;
use std::time::{Duration, Instant};

use portico_wire::{decode_envelope, encode_reply, Reply};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::{unix_ms, Registry};

/// Serve the UDP protocol until `shutdown` flips to true.
pub async fn serve(socket: UdpSocket, registry: Registry, mut shutdown: watch::Receiver<bool>) {
    // Large enough for any datagram, so that an oversized one is seen whole
    // and refused by its length instead of being parsed truncated.
    let mut buf = vec![0u8; 65_536];
    let mut last_error_log: Option<Instant> = None;
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
                if e.kind() != io::ErrorKind::ConnectionRefused
                    && last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    tracing::warn!(error = %e, "tower: receive failed; continuing");
                    last_error_log = Some(Instant::now());
                }
                continue;
            }
        };
        let datagram = &buf[..len];
        let reply = match decode_envelope(datagram) {
            Ok(envelope) => {
                tracing::debug!(%from, request = ?envelope.request, "tower request");
                let signed = &datagram[..envelope.signed_len];
                registry.handle(envelope, signed, Instant::now(), unix_ms())
            }
            Err(e) => {
                tracing::debug!(%from, error = %e, "tower: malformed datagram");
                registry.count_malformed();
                Reply::Error(e.reply())
            }
        };
        let bytes = encode_reply(&reply);
        if let Err(e) = socket.send_to(&bytes, from).await {
            tracing::debug!(%from, error = %e, "tower: reply not sent");
        }
    }
}

/// Drop expired entries until shutdown: at every expiry (so that watchers
/// hear of it at once) and at least every `period`.
pub async fn reap(registry: Registry, period: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (reaped, next) = registry.reap(Instant::now(), period);
        if reaped > 0 {
            tracing::info!(expired = reaped, "tower: reaped expired registrations");
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
