//! TLS and basic authentication for `/metrics`, configured as the Prometheus exporters are: a
//! `web.config.file` in the exporter-toolkit's format
//! (<https://prometheus.io/docs/prometheus/latest/configuration/https/>):
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /run/credentials/consumer.service/metrics-tls-cert
//!   key_file: /run/credentials/consumer.service/metrics-tls-key
//!   client_auth_type: RequireAndVerifyClientCert   # optional
//!   client_ca_file: /etc/ssl/scrapers-ca.pem         # with client_auth_type
//! basic_auth_users:
//!   prometheus: $2y$10$…                            # bcrypt (htpasswd -nBC 10 prometheus)
//! ```
//!
//! What this daemon cannot honour is refused by name at start (exit 78): the inline `cert` and
//! `key` (a key belongs in a file, a credential), `client_auth_type`s other than `NoClientCert`,
//! `VerifyClientCertIfGiven` and `RequireAndVerifyClientCert`, TLS versions and cipher lists,
//! `http_server_config`, and any key the toolkit does not know.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
}

/// The web configuration, loaded: a TLS acceptor and the users.
pub struct Web {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    users: BTreeMap<String, String>,
    /// Credentials that passed bcrypt, as SHA-256 digests of user, password and hash: bcrypt
    /// costs tens of milliseconds by design, and Prometheus sends the same ones every scrape.
    verified: Mutex<Vec<[u8; 32]>>,
    /// When the next bcrypt check of credentials not yet verified may run ([`BCRYPT_INTERVAL`]);
    /// a request before then is refused at once, with nothing queued: a flood of wrong passwords
    /// costs a bounded share of a core and delays nobody once it stops.
    next_bcrypt: Mutex<std::time::Instant>,
    /// Checked for a user we do not know, so that an unknown name costs what a known one does.
    decoy: String,
}

/// At most this many credentials are remembered as verified.
const VERIFIED_KEPT: usize = 16;

/// Unverified credentials are checked at most every this long (4 a second).
pub const BCRYPT_INTERVAL: Duration = Duration::from_millis(250);

/// The highest bcrypt cost accepted: each check runs on the metrics thread, and cost 12 already
/// takes a few hundred milliseconds.
pub const MAX_BCRYPT_COST: u32 = 12;

/// The problem with a web configuration file, for the `metrics.web_config_file` error.
fn bad(path: &Path, what: impl std::fmt::Display) -> String {
    format!("{}: {what}", path.display())
}

impl Web {
    /// Reads and checks the file, and the certificate and key it names.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| bad(path, format!("cannot read it: {e}")))?;
        // serde's messages name the unknown or missing key and its line, not the values.
        let file: File = serde_yaml_ng::from_str(&text).map_err(|e| bad(path, e))?;
        for (user, hash) in &file.basic_auth_users {
            let parts = hash.parse::<bcrypt::HashParts>().map_err(|_| {
                bad(
                    path,
                    format!("basic_auth_users.{user}: not a bcrypt hash ($2y$…)"),
                )
            })?;
            if parts.get_cost() > MAX_BCRYPT_COST {
                return Err(bad(path, format!(
                    "basic_auth_users.{user}: bcrypt cost {} is above {MAX_BCRYPT_COST} (each check would hold the metrics thread for seconds)",
                    parts.get_cost()
                )));
            }
        }
        let tls = match file.tls_server_config {
            None => None,
            Some(t) => Some(acceptor(path, &t)?),
        };
        if tls.is_none() && file.basic_auth_users.is_empty() {
            return Err(bad(
                path,
                "neither tls_server_config nor basic_auth_users: it protects nothing",
            ));
        }
        let decoy = file
            .basic_auth_users
            .values()
            .next()
            .cloned()
            .unwrap_or_default();
        Ok(Self {
            tls,
            users: file.basic_auth_users,
            verified: Mutex::default(),
            next_bcrypt: Mutex::new(std::time::Instant::now()),
            decoy,
        })
    }

    /// Whether a request with this `Authorization` header may read `/metrics`. Without users,
    /// any request may. Credentials verified before pass at once; others wait for no one: past
    /// the bcrypt pace ([`BCRYPT_INTERVAL`]) they are refused, to be tried at the next scrape.
    pub fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return false;
        };
        let known = self.users.get(&user);
        let hash = known.unwrap_or(&self.decoy);
        let digest = {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            for part in [
                user.as_bytes(),
                b"\0",
                password.as_bytes(),
                b"\0",
                hash.as_bytes(),
            ] {
                ctx.update(part);
            }
            let mut out = [0u8; 32];
            out.copy_from_slice(ctx.finish().as_ref());
            out
        };
        // The locks are poisoned only by a panic, which aborts the process (panic = "abort").
        if known.is_some()
            && self
                .verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&digest)
        {
            return true;
        }
        {
            let mut next = self
                .next_bcrypt
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = std::time::Instant::now();
            if now < *next {
                return false;
            }
            *next = now + BCRYPT_INTERVAL;
        }
        // An unknown user is checked against a known user's hash too, and refused whatever the
        // result: the answer takes as long either way.
        let ok = bcrypt::verify(password.as_bytes(), hash).unwrap_or(false) && known.is_some();
        if ok {
            let mut verified = self
                .verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if verified.len() >= VERIFIED_KEPT {
                verified.remove(0);
            }
            verified.push(digest);
        }
        ok
    }
}

/// `Basic base64(user:password)`.
fn basic_credentials(header: &[u8]) -> Option<(String, zeroize::Zeroizing<String>)> {
    use base64::Engine;
    let encoded = header.strip_prefix(b"Basic ")?;
    let decoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?,
    );
    let text = std::str::from_utf8(&decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((
        user.to_owned(),
        zeroize::Zeroizing::new(password.to_owned()),
    ))
}

fn acceptor(path: &Path, t: &TlsFile) -> Result<tokio_rustls::TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(&t.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|_| {
            bad(
                path,
                format!(
                    "tls_server_config.cert_file {}: cannot read a PEM certificate from it",
                    t.cert_file.display()
                ),
            )
        })?;
    if certs.is_empty() {
        return Err(bad(
            path,
            format!(
                "tls_server_config.cert_file {}: holds no certificate",
                t.cert_file.display()
            ),
        ));
    }
    crate::tls::check_key_permissions("tls_server_config.key_file", &t.key_file)
        .map_err(|e| bad(path, e))?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file).map_err(|_| {
        bad(
            path,
            format!(
                "tls_server_config.key_file {}: cannot read a PEM private key from it",
                t.key_file.display()
            ),
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(path, e))?;
    let mode = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match (mode, &t.client_ca_file) {
        // As the exporter-toolkit: a CA that no policy uses would only seem to check clients.
        ("NoClientCert", Some(_)) => {
            return Err(bad(path, "tls_server_config.client_ca_file without client_auth_type: name the policy (RequireAndVerifyClientCert)"))
        }
        ("NoClientCert", None) => builder.with_no_client_auth(),
        ("VerifyClientCertIfGiven" | "RequireAndVerifyClientCert", Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|_| bad(path, format!("tls_server_config.client_ca_file {}: cannot read a PEM certificate from it", ca.display())))?
            {
                roots.add(cert).map_err(|e| bad(path, format!("tls_server_config.client_ca_file: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match mode {
                "VerifyClientCertIfGiven" => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| bad(path, format!("tls_server_config.client_ca_file: {e}")))?)
        }
        ("VerifyClientCertIfGiven" | "RequireAndVerifyClientCert", None) => {
            return Err(bad(path, format!("tls_server_config.client_auth_type {mode} needs client_ca_file")))
        }
        (other, _) => {
            return Err(bad(path, format!(
                "tls_server_config.client_auth_type {other} is not supported: NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
            )))
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        bad(
            path,
            format!("tls_server_config.key_file does not go with cert_file: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
