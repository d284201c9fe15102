//! The access log: one line per request, written when its response ends
//! (so bytes and duration are the real ones), in Apache's combined format
//! or as JSON. A writer thread does the I/O: a request only formats its line
//! and hands it over; when the writer falls behind, lines are dropped and
//! counted, rather than slowing requests down.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Uri, Version};
use prometheus_client::metrics::counter::Counter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Combined,
    Json,
    Off,
}

/// Lines waiting for the writer; past this they are dropped.
const QUEUE: usize = 65_536;
/// How long a line may wait before it is written.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct AccessLog {
    format: Format,
    tx: SyncSender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// Start the writer: `None` path means stdout.
    pub fn start(
        format: Format,
        path: Option<PathBuf>,
        dropped: Counter,
    ) -> std::io::Result<Option<Self>> {
        if format == Format::Off {
            return Ok(None);
        }
        let out: Box<dyn Write + Send> = match &path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_batches(rx, out))?;
        Ok(Some(Self {
            format,
            tx,
            dropped,
        }))
    }

    fn write(&self, line: String) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            self.dropped.inc();
        }
    }
}

/// Write in batches on a short cadence, as nginx's buffer= and flush= do:
/// waking per line would cost a context switch per request on a busy proxy.
fn write_batches(rx: std::sync::mpsc::Receiver<String>, mut out: Box<dyn Write + Send>) {
    use std::sync::mpsc::TryRecvError;
    let mut buf = std::io::BufWriter::with_capacity(256 * 1024, &mut out);
    loop {
        std::thread::sleep(FLUSH_EVERY);
        let closed = loop {
            match rx.try_recv() {
                Ok(line) => {
                    let _ = buf.write_all(line.as_bytes());
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        let _ = buf.flush();
        if closed {
            return;
        }
    }
}

/// What one line says, gathered along the request path.
#[derive(Debug)]
pub struct Record {
    pub sink: AccessLog,
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    pub route: Option<String>,
    pub service: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub attempts: u32,
}

fn text(v: &Option<HeaderValue>) -> &str {
    v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-")
}

impl Record {
    pub fn finish(self, status: u16, bytes: u64, took: Duration) {
        let line = match self.sink.format {
            Format::Combined => format!(
                "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\" route={} service={} endpoint={} attempts={} request_id={} duration_ms={:.3}\n",
                self.client.ip(),
                clf_time_cached(self.time),
                self.method,
                // A path may hold `"` (hyper and `http` accept it).
                escape(&self.uri.to_string()),
                self.version,
                status,
                bytes,
                escape(text(&self.referer)),
                escape(text(&self.user_agent)),
                self.route.as_deref().unwrap_or("-"),
                self.service.as_deref().unwrap_or("-"),
                self.endpoint.map_or("-".to_owned(), |e| e.to_string()),
                self.attempts,
                // Unquoted: only a valid id is kept from the client
                // (`headers::is_valid_request_id`), never one with a space.
                text(&self.request_id),
                took.as_secs_f64() * 1000.0,
            ),
            Format::Json => {
                let mut v = serde_json::json!({
                    "time": humantime::format_rfc3339_millis(self.time).to_string(),
                    "client": self.client.ip().to_string(),
                    "method": self.method.as_str(),
                    "uri": self.uri.to_string(),
                    "version": format!("{:?}", self.version),
                    "status": status,
                    "bytes": bytes,
                    "duration_ms": took.as_secs_f64() * 1000.0,
                    "route": self.route,
                    "service": self.service,
                    "endpoint": self.endpoint.map(|e| e.to_string()),
                    "attempts": self.attempts,
                    "request_id": self.request_id.as_ref().and_then(|v| v.to_str().ok()),
                    "referer": self.referer.as_ref().and_then(|v| v.to_str().ok()),
                    "user_agent": self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
                })
                .to_string();
                v.push('\n');
                v
            }
            Format::Off => return,
        };
        self.sink.write(line);
    }
}

/// A client's text inside the combined format's quotes: `"` and `\` are
/// escaped with a backslash, as nginx does, so that a value can neither end
/// its quotes early nor turn our escape of its quote into a literal
/// backslash (`x\" a=b` would otherwise close them and add a field).
fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['"', '\\']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    std::borrow::Cow::Owned(out)
}

thread_local! {
    /// The formatted time of the current second, per worker thread.
    static CLF_NOW: std::cell::RefCell<(u64, String)> =
        const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

fn clf_time_cached(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CLF_NOW.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            *c = (secs, clf_time(t));
        }
        c.1.clone()
    })
}

/// `26/Nov/2026:16:40:00 +0000`, the Common Log Format's time, in UTC.
fn clf_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_cannot_end_their_quotes() {
        assert_eq!(escape("curl/8"), "curl/8");
        assert_eq!(escape(r#"a"b"#), r#"a\"b"#);
        // The backslash is escaped too, or `\"` would read as an escaped
        // backslash followed by the closing quote.
        assert_eq!(escape(r#"x\" a=b"#), r#"x\\\" a=b"#);
        assert_eq!(escape(r"\"), r"\\");
    }

    #[test]
    fn clf_time_is_utc_calendar_time() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_710_000);
        assert_eq!(clf_time(t), "26/Nov/2026:16:20:00 +0000");
        assert_eq!(clf_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(clf_time(leap), "29/Feb/2000:00:00:00 +0000");
    }
}
