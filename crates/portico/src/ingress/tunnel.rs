//! Upgraded connections (WebSocket and other `Upgrade`s, after the 101):
//! bytes both ways until either side closes, half-closes passed on, and the
//! idle timeout applied to the pair (quiet in both directions). A tunnel
//! keeps its client connection's slot (`conn::Slot`) until it ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::conn::ConnState;

const BUF: usize = 16 * 1024;

/// Wait for both upgrades, then carry bytes until done or idle. `_conn`,
/// the client connection's state, is held to the end: with it the
/// connection's place under `--max-connections`, its count as active, and
/// the drain's wait for it. (The upgraded socket holds it too; this says so
/// where it matters.)
pub async fn run(client: OnUpgrade, backend: OnUpgrade, idle: Duration, _conn: Arc<ConnState>) {
    let (client, backend) = match tokio::join!(client, backend) {
        (Ok(c), Ok(b)) => (TokioIo::new(c), TokioIo::new(b)),
        (c, b) => {
            tracing::debug!(
                client_ok = c.is_ok(),
                backend_ok = b.is_ok(),
                "upgrade did not complete"
            );
            return;
        }
    };
    let base = Instant::now();
    let last = AtomicU64::new(0);
    let (cr, cw) = tokio::io::split(client);
    let (br, bw) = tokio::io::split(backend);
    // Both directions until both end; a half-close passes on and the other
    // direction goes on. An error ends both at once: a side that reset is
    // gone, and the other must not hold its connection (and the client's
    // slot, and the drain) until the idle timeout.
    let both = async {
        let up = pump(cr, bw, &last, base);
        let down = pump(br, cw, &last, base);
        match tokio::try_join!(up, down) {
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "tunnel ended with an error"),
        }
    };
    let watchdog = async {
        loop {
            let quiet_until = base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until.into()).await;
        }
    };
    tokio::select! {
        _ = both => {}
        _ = watchdog => tracing::debug!(?idle, "tunnel closed: idle"),
    }
}

/// Copy one direction; on end of input, pass the half-close on.
async fn pump<R, W>(mut from: R, mut to: W, last: &AtomicU64, base: Instant) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        last.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
