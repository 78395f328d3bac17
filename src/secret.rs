//! Secrets (passwords) that must never reach logs, `--check-config` output or process arguments.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

/// A password: [`secrecy::SecretString`], which zeroes its memory when dropped and has no
/// `Display` (its `Debug` prints `[REDACTED]`), plus our `Display` of `REDACTED` so a secret can
/// sit in a rendered message without being in it. What connects copies it (lapin's URI,
/// tokio-postgres' config); those copies are theirs, which is why the process also never dumps core
/// ([`crate::daemon::no_core_dumps`]).
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The secret itself. Call only where it leaves the process towards the server that needs it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(REDACTED)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("REDACTED")
    }
}

/// Where a password was found, for the log line that says so (never the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Credential(PathBuf),
}

/// The password of a [`load`], after logging where it came from (never the value).
pub fn loaded(what: &'static str, password: Option<(Secret, SecretSource)>) -> Option<Secret> {
    let (secret, source) = password?;
    tracing::info!(message = "Using a password from a file.", what, source = ?source);
    Some(secret)
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read `{key}` from {path}: {source}")]
pub struct SecretError {
    pub key: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Finds a password: the file named by the config key `key` if set, otherwise the systemd
/// credential `credential` in `$CREDENTIALS_DIRECTORY` if present, otherwise none.
/// One trailing newline is stripped, so `echo secret > file` works.
pub fn load(
    key: &'static str,
    file: Option<&Path>,
    credential: &str,
    credentials_dir: Option<&Path>,
) -> Result<Option<(Secret, SecretSource)>, SecretError> {
    let (path, source) = match (file, credentials_dir) {
        (Some(file), _) => (file.to_path_buf(), SecretSource::File(file.to_path_buf())),
        (None, Some(dir)) if dir.join(credential).is_file() => {
            let path = dir.join(credential);
            (path.clone(), SecretSource::Credential(path))
        }
        (None, _) => return Ok(None),
    };
    // Zeroed when dropped, like the secret made from it.
    let text =
        zeroize::Zeroizing::new(
            std::fs::read_to_string(&path).map_err(|source| SecretError {
                key,
                path: path.clone(),
                source,
            })?,
        );
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Ok(Some((Secret::new(text), source)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(REDACTED) REDACTED");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_wins_over_credential_and_newline_is_stripped() {
        let dir = std::env::temp_dir().join(format!("secret-test-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "from-file\n").unwrap();
        std::fs::write(dir.join("amqp-password"), "from-credential").unwrap();
        let (s, src) = load(
            "amqp.password_file",
            Some(&dir.join("pw")),
            "amqp-password",
            Some(&dir),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.expose(), "from-file");
        assert_eq!(src, SecretSource::File(dir.join("pw")));
        let (s, src) = load("amqp.password_file", None, "amqp-password", Some(&dir))
            .unwrap()
            .unwrap();
        assert_eq!(s.expose(), "from-credential");
        assert_eq!(src, SecretSource::Credential(dir.join("amqp-password")));
        assert!(load("k", None, "absent", Some(&dir)).unwrap().is_none());
        let err = load("amqp.password_file", Some(&dir.join("missing")), "x", None).unwrap_err();
        assert!(err.to_string().contains("amqp.password_file"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
