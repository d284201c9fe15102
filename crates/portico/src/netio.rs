//! Small socket helpers shared by the data plane (`ingress`) and the small
//! HTTP servers (`api_server`). Neutral: it imports neither.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Write a client's whole answer (one that says `connection: close`), then
/// close. What the client still sends is read and dropped for a moment (up
/// to 64 KiB, within a second in all) so that the close does not turn into
/// a reset that would destroy the answer before the client reads it.
pub async fn answer_and_close(stream: &mut TcpStream, answer: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if stream.write_all(answer).await.is_err() {
            return;
        }
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while let Ok(n) = stream.read(&mut sink).await {
            total += n;
            if n == 0 || total > 64 * 1024 {
                break;
            }
        }
    })
    .await;
}

/// What a [`Tapped`] stream tells of the I/O under it.
pub trait Tap: Unpin {
    /// A read was polled; `grew` says whether it brought bytes.
    fn read(&mut self, io: &TcpStream, polled: &Poll<io::Result<()>>, grew: bool);

    /// A write (plain or vectored) was polled.
    fn wrote(&mut self, _polled: &Poll<io::Result<usize>>) {}
}

/// A TCP stream whose reads and writes are told to `tap`; everything else
/// goes straight through.
#[derive(Debug)]
pub struct Tapped<T> {
    pub io: TcpStream,
    pub tap: T,
}

impl<T: Tap> AsyncRead for Tapped<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.tap
            .read(&this.io, &polled, buf.filled().len() > before);
        polled
    }
}

impl<T: Tap> AsyncWrite for Tapped<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.tap.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.tap.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
