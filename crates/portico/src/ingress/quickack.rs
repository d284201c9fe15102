//! A backend socket under hyper's clients that acknowledges a partly
//! received message at once. Our own HTTP/1.1 client does the same in its
//! reader (`h1::client`); this is the wrapper for the paths hyper drives
//! (requests with a body, upgrades, h2c).
//!
//! Why: a backend without TCP_NODELAY that writes a head and a body apart
//! (python's http.server) holds the body under Nagle until the head is
//! acknowledged, and Linux delays that ACK by up to 40 ms on a connection
//! past its first exchanges. TCP_QUICKACK sends the pending ACK now; Linux
//! does not keep it set, so it is asked for at each wait that follows data.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A backend TCP stream that sends the pending ACK when a read that
/// brought data is followed by a wait.
#[derive(Debug)]
pub struct QuickAck {
    stream: TcpStream,
    unacked: bool,
}

impl QuickAck {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            unacked: false,
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => {
                if std::mem::take(&mut this.unacked) {
                    // A failure costs at most the delay this avoids.
                    let _ = socket2::SockRef::from(&this.stream).set_tcp_quickack(true);
                }
                Poll::Pending
            }
            Poll::Ready(r) => {
                this.unacked |= buf.filled().len() > before;
                Poll::Ready(r)
            }
        }
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
