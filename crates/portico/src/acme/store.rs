//! The state directory (`--acme-state`, mode 0700). Per ACME directory
//! (so that staging certificates are never served once production is
//! configured), the account's credentials, and per name its certificate
//! chain and key (mode 0600):
//!
//! ```text
//! STATE/acme-v02.api.letsencrypt.org_directory/account.json
//! STATE/acme-v02.api.letsencrypt.org_directory/app.example.com/cert.pem
//! STATE/acme-v02.api.letsencrypt.org_directory/app.example.com/key.pem
//! ```
//!
//! Each file is written whole (a temporary file, then renamed), so a crash
//! never leaves half a certificate.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the ACME state directory {path} ({source}); give a writable one with --acme-state DIR")]
    Dir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A certificate chain and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    pub chain: String,
    pub key: String,
}

impl Store {
    /// The store for `directory` under `state`, created (mode 0700) if
    /// missing.
    pub fn open(state: &Path, directory: &str) -> Result<Self, StoreError> {
        let root = state.join(slug(directory));
        let dir_error = |source| StoreError::Dir {
            path: state.display().to_string(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(dir_error)?;
        // A directory made before (by hand, or by a packaging script) may
        // be open to others. It is the operator's to change, not ours: it
        // may be a directory they use for more than this.
        let mode = std::fs::metadata(state)
            .map_err(dir_error)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %state.display(),
                mode = format!("{:o}", mode & 0o777),
                "acme: the state directory holds private keys but others may read it; chmod 700 it"
            );
        }
        Ok(Self { root })
    }

    pub fn account(&self) -> Result<Option<AccountCredentials>, StoreError> {
        let path = self.root.join("account.json");
        let Some(text) = read(&path)? else {
            return Ok(None);
        };
        match serde_json::from_str(&text) {
            Ok(creds) => Ok(Some(creds)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "acme: the stored account is not readable; a new account will be made");
                Ok(None)
            }
        }
    }

    pub fn save_account(&self, creds: &AccountCredentials) -> Result<(), StoreError> {
        let text = serde_json::to_string(creds).unwrap_or_default();
        write(&self.root.join("account.json"), text.as_bytes())
    }

    pub fn certificate(&self, name: &str) -> Result<Option<Pem>, StoreError> {
        let dir = self.root.join(name);
        match (read(&dir.join("cert.pem"))?, read(&dir.join("key.pem"))?) {
            (Some(chain), Some(key)) => Ok(Some(Pem { chain, key })),
            _ => Ok(None),
        }
    }

    /// Key first: a chain on disk always has its key beside it.
    pub fn save_certificate(&self, name: &str, pem: &Pem) -> Result<(), StoreError> {
        let dir = self.root.join(name);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StoreError::Write {
                path: dir.display().to_string(),
                source,
            })?;
        write(&dir.join("key.pem"), pem.key.as_bytes())?;
        write(&dir.join("cert.pem"), pem.chain.as_bytes())
    }
}

/// A directory URL as a file name: `https://acme-v02.api.letsencrypt.org/directory`
/// is `acme-v02.api.letsencrypt.org_directory`.
fn slug(directory: &str) -> String {
    let rest = directory
        .split_once("://")
        .map_or(directory, |(_, rest)| rest);
    rest.trim_end_matches('/')
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' => c,
            _ => '_',
        })
        .collect()
}

fn read(path: &Path) -> Result<Option<String>, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let error = |source| StoreError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&tmp, path).map_err(error)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn directories_become_file_names() {
        assert_eq!(
            slug("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(slug("https://127.0.0.1:14000/dir"), "127.0.0.1_14000_dir");
        assert_eq!(slug("https://x/../y"), "x_.._y");
    }

    #[test]
    fn certificates_are_kept_private_and_whole() {
        let state = std::env::temp_dir().join(format!("portico-store-{}", fastrand::u32(..)));
        let store = Store::open(&state, "https://ca.test/dir").unwrap();
        assert!(store.certificate("a.test").unwrap().is_none());
        let pem = Pem {
            chain: "CHAIN".into(),
            key: "KEY".into(),
        };
        store.save_certificate("a.test", &pem).unwrap();
        let back = store.certificate("a.test").unwrap().unwrap();
        assert_eq!((back.chain.as_str(), back.key.as_str()), ("CHAIN", "KEY"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        let key = state.join("ca.test_dir/a.test/key.pem");
        assert_eq!(mode(&key), 0o600);
        assert!(!key.with_extension("tmp").exists());
        let _ = std::fs::remove_dir_all(&state);
    }
}
