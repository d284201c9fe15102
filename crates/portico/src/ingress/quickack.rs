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
use std::task::Poll;

use tokio::net::TcpStream;

use crate::netio::{Tap, Tapped};

/// A backend TCP stream that sends the pending ACK when a read that
/// brought data is followed by a wait.
pub type QuickAck = Tapped<Unacked>;

/// Whether data came in since the last wait.
#[derive(Debug, Default)]
pub struct Unacked(bool);

impl QuickAck {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            io: stream,
            tap: Unacked::default(),
        }
    }
}

impl Tap for Unacked {
    fn read(&mut self, io: &TcpStream, polled: &Poll<io::Result<()>>, grew: bool) {
        if polled.is_pending() {
            if std::mem::take(&mut self.0) {
                // A failure costs at most the delay this avoids.
                let _ = socket2::SockRef::from(io).set_tcp_quickack(true);
            }
        } else {
            self.0 |= grew;
        }
    }
}
