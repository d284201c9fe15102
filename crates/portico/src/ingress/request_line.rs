//! The request target's limit, checked on an HTTP/1.1 request line's bytes
//! as they are read, before hyper parses them. hyper holds a request head
//! in a buffer of `--max-header-bytes` and answers 431 when it fills
//! before the head ends: a target too long for that buffer would get 431
//! where 414 is due (RFC 9110 section 15.5.15). Pure: the connection
//! (`conn::Tracked`) feeds it the bytes and writes the answer.

/// The answer to a target over the limit: the handler's own 414, and the
/// connection closes, as after any refused head.
pub const URI_TOO_LONG: &[u8] = b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 25\r\nconnection: close\r\n\r\nRequest target too long.\n";

/// Where in a request line the bytes read so far end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Not in a request line: between the line and the next head.
    Idle,
    /// In the method, before the first space.
    Method,
    /// In the target, this many bytes of it so far.
    Target(usize),
}

/// Watches the request line of each head for a target over `max_target`.
#[derive(Debug, Clone, Copy)]
pub struct LineGuard {
    max_target: usize,
    scan: Scan,
}

impl LineGuard {
    /// A guard for a new connection, whose first bytes begin a head.
    pub fn new(max_target: usize) -> Self {
        Self {
            max_target,
            scan: Scan::Method,
        }
    }

    /// A guard that never refuses (HTTP/2: no request line).
    pub fn off() -> Self {
        Self {
            max_target: usize::MAX,
            scan: Scan::Idle,
        }
    }

    /// The next bytes begin a new request head.
    pub fn arm(&mut self) {
        if self.max_target != usize::MAX {
            self.scan = Scan::Method;
        }
    }

    /// The next bytes read. True when the target is over the limit: the
    /// request is to be answered `URI_TOO_LONG`. Only the request line is
    /// scanned; the rest of the head is hyper's.
    pub fn over_limit(&mut self, mut bytes: &[u8]) -> bool {
        loop {
            match self.scan {
                Scan::Idle => return false,
                Scan::Method => match bytes.iter().position(|&b| b == b' ' || b == b'\n') {
                    Some(i) if bytes[i] == b' ' => {
                        self.scan = Scan::Target(0);
                        bytes = &bytes[i + 1..];
                    }
                    // A line without a target is hyper's to refuse.
                    Some(_) => self.scan = Scan::Idle,
                    None => return false,
                },
                Scan::Target(seen) => {
                    let end = bytes.iter().position(|&b| b == b' ' || b == b'\n');
                    let seen = seen + end.unwrap_or(bytes.len());
                    if seen > self.max_target {
                        self.scan = Scan::Idle;
                        return true;
                    }
                    self.scan = match end {
                        Some(_) => Scan::Idle,
                        None => Scan::Target(seen),
                    };
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fed whole and a byte at a time, the same verdict.
    fn verdict(max: usize, input: &[u8]) -> bool {
        let whole = LineGuard::new(max).over_limit(input);
        let mut g = LineGuard::new(max);
        let bytewise = input.chunks(1).any(|b| g.over_limit(b));
        assert_eq!(whole, bytewise, "{:?}", String::from_utf8_lossy(input));
        whole
    }

    #[test]
    fn only_the_target_counts() {
        assert!(!verdict(8, b"GET /1234567 HTTP/1.1\r\n"));
        assert!(!verdict(8, b"GET /2345678 HTTP/1.1\r\n"));
        assert!(verdict(8, b"GET /23456789 HTTP/1.1\r\n"));
        // Still arriving: refused once past the limit, not at the line's end.
        assert!(verdict(8, b"GET /23456789"));
        assert!(!verdict(8, b"GET /2345678"));
        // A long method or version is not the target's.
        assert!(!verdict(8, b"PROPPATCHANDMORE /x HTTP/1.1\r\n"));
        assert!(!verdict(8, b"GET /x HTTP/1.1 and much more\r\n"));
        // The HTTP/2 preface, and a line with no target.
        assert!(!verdict(8, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!verdict(8, b"HELLO\r\nGET /23456789 HTTP/1.1\r\n"));
        // Header lines after the request line are hyper's.
        assert!(!verdict(
            8,
            b"GET / HTTP/1.1\r\nX-Long: 123456789012345\r\n"
        ));
    }

    #[test]
    fn each_armed_head_is_checked() {
        let mut g = LineGuard::new(8);
        assert!(!g.over_limit(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!g.over_limit(b"GET /23456789 HTTP/1.1\r\n"), "not armed");
        g.arm();
        assert!(g.over_limit(b"GET /23456789 HTTP/1.1\r\n"));
        let mut off = LineGuard::off();
        off.arm();
        assert!(!off.over_limit(b"GET /23456789 HTTP/1.1\r\n"));
    }
}
