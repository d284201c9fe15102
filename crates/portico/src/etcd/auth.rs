//! etcd's user and password authentication: the credentials (read from a
//! file or the environment, never a flag, so they stay out of `ps`), and
//! the token etcd gives for them, shared by every call and replaced when
//! etcd no longer takes it. Neither is ever printed.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::HeaderValue;

/// The environment variable a password may come from.
pub const PASSWORD_ENV: &str = "PORTICO_ETCD_PASSWORD";

/// A user and its password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Why the password could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("cannot read --etcd-password-file {0}")]
    Read(String, #[source] std::io::Error),
    #[error("--etcd-password-file {0} is empty; write the etcd user's password in it")]
    Empty(String),
    #[error("{PASSWORD_ENV} is set but empty; set it to the etcd user's password")]
    EmptyEnv,
    #[error("--etcd-user needs a password: --etcd-password-file FILE, or the {PASSWORD_ENV} environment variable")]
    Missing,
    #[error("both --etcd-password-file and {PASSWORD_ENV} give a password; keep one")]
    Both,
    #[error("a password is given (--etcd-password-file or {PASSWORD_ENV}) but no --etcd-user to use it with")]
    NoUser,
}

impl Credentials {
    /// The credentials for `user`, the password from `file` or `env` (the
    /// value of PASSWORD_ENV): exactly one of them.
    pub fn load(
        user: Option<&str>,
        file: Option<&Path>,
        env: Option<String>,
    ) -> Result<Option<Self>, PasswordError> {
        let password = match (file, env) {
            (Some(_), Some(_)) => return Err(PasswordError::Both),
            (Some(path), None) => Some(read_password(path)?),
            (None, Some(p)) if p.is_empty() => return Err(PasswordError::EmptyEnv),
            (None, Some(p)) => Some(p),
            (None, None) => None,
        };
        match (user, password) {
            (Some(user), Some(password)) => Ok(Some(Self {
                user: user.to_owned(),
                password,
            })),
            (Some(_), None) => Err(PasswordError::Missing),
            (None, Some(_)) => Err(PasswordError::NoUser),
            (None, None) => Ok(None),
        }
    }

    /// The body of `/v3/auth/authenticate`.
    pub(super) fn request_body(&self) -> Vec<u8> {
        serde_json::json!({ "name": self.user, "password": self.password })
            .to_string()
            .into_bytes()
    }
}

/// The file's content, less the line end an editor or `echo` leaves.
fn read_password(path: &Path) -> Result<String, PasswordError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| PasswordError::Read(name.clone(), e))?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(PasswordError::Empty(name));
    }
    warn_if_others_may_read(path);
    Ok(password.to_owned())
}

/// A password file others may read is a password others know: said at
/// start, not refused (a container's secret mount may be shared on purpose).
fn warn_if_others_may_read(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "etcd: the password file is readable by group or others; chmod 600 it"
            );
        }
    }
}

/// The credentials and the token etcd last gave for them.
#[derive(Debug)]
pub(super) struct Auth {
    pub creds: Credentials,
    token: ArcSwapOption<HeaderValue>,
    /// Held while authenticating, so that the calls that found the token
    /// stale at the same time get one new token between them.
    pub renewing: tokio::sync::Mutex<()>,
}

impl Auth {
    pub fn new(creds: Credentials) -> Self {
        Self {
            creds,
            token: ArcSwapOption::empty(),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn token(&self) -> Option<Arc<HeaderValue>> {
        self.token.load_full()
    }

    /// Keep `token`; None when it cannot be a header value.
    pub fn store(&self, token: &str) -> Option<Arc<HeaderValue>> {
        let mut value = HeaderValue::from_str(token).ok()?;
        // Kept out of any Debug output of the request.
        value.set_sensitive(true);
        let value = Arc::new(value);
        self.token.store(Some(value.clone()));
        Some(value)
    }
}

/// Whether etcd's error says the token it was sent is no longer good:
/// expired or unknown (etcd restarted: simple tokens live in memory), or
/// issued before a change to users and roles. A new token fixes these.
pub(super) fn token_refused(code: i32, message: &str) -> bool {
    code == 16
        || message.contains("invalid auth token")
        || message.contains("revision of auth store is old")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temp_file(content: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "portico-etcd-pw-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn the_password_comes_from_the_file_or_the_environment() {
        let file = temp_file("s3cret\n");
        let c = Credentials::load(Some("portico"), Some(&file), None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_str()),
            ("portico", "s3cret")
        );
        let c = Credentials::load(Some("portico"), None, Some("from env".into()))
            .unwrap()
            .unwrap();
        assert_eq!(c.password, "from env");
        let crlf = temp_file("pw\r\n");
        let c = Credentials::load(Some("u"), Some(&crlf), None)
            .unwrap()
            .unwrap();
        assert_eq!(c.password, "pw");
        assert!(Credentials::load(None, None, None).unwrap().is_none());
        for f in [file, crlf] {
            std::fs::remove_file(f).unwrap();
        }
    }

    #[test]
    fn a_missing_or_ambiguous_password_is_refused() {
        let empty = temp_file("\n");
        let missing = std::path::Path::new("/nonexistent/portico-password");
        let cases = [
            (Credentials::load(Some("u"), None, None), "needs a password"),
            (
                Credentials::load(None, None, Some("pw".into())),
                "no --etcd-user",
            ),
            (Credentials::load(Some("u"), Some(&empty), None), "is empty"),
            (
                Credentials::load(Some("u"), None, Some(String::new())),
                "set but empty",
            ),
            (
                Credentials::load(Some("u"), Some(&empty), Some("pw".into())),
                "keep one",
            ),
            (
                Credentials::load(Some("u"), Some(missing), None),
                "cannot read",
            ),
        ];
        for (got, want) in cases {
            let e = got.unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
        std::fs::remove_file(empty).unwrap();
    }

    #[test]
    fn the_password_is_not_in_debug_output() {
        let c = Credentials {
            user: "portico".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn stale_tokens_are_told_from_other_refusals() {
        assert!(token_refused(16, "etcdserver: invalid auth token"));
        assert!(token_refused(
            3,
            "etcdserver: revision of auth store is old"
        ));
        assert!(token_refused(
            0,
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
        ));
        assert!(!token_refused(
            3,
            "etcdserver: authentication failed, invalid user ID or password"
        ));
        assert!(!token_refused(7, "etcdserver: permission denied"));
    }
}
