//! TLS to RabbitMQ and PostgreSQL: rustls with the ring provider, one client configuration per
//! connection, built from files named in the server's URL (RabbitMQ's `cacertfile`, `certfile`,
//! `keyfile`; libpq's `sslrootcert`, `sslcert`, `sslkey`). The files are read at every connection,
//! so a renewed certificate is used from the next reconnection on; a key is only ever read from
//! its file (a systemd credential under NixOS), never from the configuration itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How much of the server's certificate chain is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Signed by the CA, in its validity period, and issued for the host name we connect to
    /// (RabbitMQ's `verify_peer`, libpq's `verify-full`).
    Full,
    /// Signed by the CA and in its validity period, whatever name it is for (libpq's `verify-ca`,
    /// and `require` given `sslrootcert`, as libpq does).
    Chain,
    /// Nothing: encryption only, which a man in the middle defeats (libpq's `require` and `prefer`
    /// without `sslrootcert`). The handshake's signatures are still checked against the
    /// certificate presented.
    Nothing,
}

/// Which URL parameter names a file, for errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keys {
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
}

/// A TLS client as a URL describes it: paths, not contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub verify: Verify,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub keys: Keys,
}

/// A file named in the URL that cannot be used. Names the parameter and the path, never content.
#[derive(Debug, thiserror::Error)]
#[error("{key}={}: {reason}", path.display())]
pub struct FileError {
    pub key: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

impl Client {
    /// Checks what the URL asked for, before any file is read: a client certificate needs its key
    /// and the other way round; full or chain verification needs a CA.
    pub fn check(&self) -> Result<(), String> {
        match (&self.cert, &self.key) {
            (Some(_), None) => {
                return Err(format!("`{}` needs `{}`", self.keys.cert, self.keys.key))
            }
            (None, Some(_)) => {
                return Err(format!("`{}` needs `{}`", self.keys.key, self.keys.cert))
            }
            _ => {}
        }
        if self.verify != Verify::Nothing && self.ca.is_none() {
            return Err(format!(
                "checking the server's certificate needs `{}`, the file of the CA that signed it",
                self.keys.ca
            ));
        }
        Ok(())
    }

    /// The rustls configuration: reads the CA, the certificate and the key.
    pub fn config(&self) -> Result<ClientConfig, FileError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match (&self.ca, self.verify) {
            (_, Verify::Nothing) | (None, _) => Arc::new(Relaxed {
                chain: None,
                provider: provider.clone(),
            }),
            (Some(ca), verify) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(self.keys.ca, ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| file_error(self.keys.ca, ca, e))?;
                }
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| file_error(self.keys.ca, ca, e))?;
                match verify {
                    Verify::Chain => Arc::new(Relaxed {
                        chain: Some(webpki),
                        provider: provider.clone(),
                    }),
                    _ => webpki,
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| file_error(self.keys.ca, Path::new(""), e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                check_key_permissions(self.keys.key, key)?;
                let chain = read_certs(self.keys.cert, cert)?;
                let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    file_error(
                        self.keys.key,
                        key,
                        pem_reason(e, "private key (PEM: PKCS#8, PKCS#1 or SEC1)"),
                    )
                })?;
                builder.with_client_auth_cert(chain, private).map_err(|e| {
                    file_error(
                        self.keys.key,
                        key,
                        format!("does not go with {}: {e}", self.keys.cert),
                    )
                })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

fn file_error(key: &'static str, path: &Path, reason: impl std::fmt::Display) -> FileError {
    FileError {
        key,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn pem_reason(e: rustls::pki_types::pem::Error, wanted: &str) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => format!("cannot read it: {io}"),
        rustls::pki_types::pem::Error::NoItemsFound => format!("holds no {wanted}"),
        // Not the details: some quote the offending line, which may be key material.
        _ => "is not valid PEM".to_owned(),
    }
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(key, path, pem_reason(e, "certificate (PEM)")))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "holds no certificate (PEM)"));
    }
    Ok(certs)
}

/// [`Verify::Chain`] (with the webpki verifier: a certificate issued for another name accepted;
/// webpki checks the name last, after the chain and the validity period) and [`Verify::Nothing`]
/// (without: any certificate). Either way the handshake's signatures must match the certificate.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A URL's query parameters as the servers' own clients read them: the name and the value
/// percent-decoded (a `+` stays a `+`, as in libpq and tokio-postgres, not a space as in HTML
/// forms), each with its raw text to pass on unchanged.
pub fn query_parameters(url: &url::Url) -> Vec<(String, String, &str)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    url.query()
        .unwrap_or("")
        .split('&')
        .filter(|raw| !raw.is_empty())
        .map(|raw| {
            let (k, v) = raw.split_once('=').unwrap_or((raw, ""));
            (decode(k), decode(v), raw)
        })
        .collect()
}

/// The first parameter given twice among `names`, which the two parsers of a URL (ours, and
/// lapin's or tokio-postgres's) might read differently.
pub fn repeated<'a>(params: &[(String, String, &str)], names: &[&'a str]) -> Option<&'a str> {
    names
        .iter()
        .find(|n| params.iter().filter(|(k, _, _)| k == *n).count() > 1)
        .copied()
}

/// A private key file must be readable by its owner only (or, owned by root, by its group too),
/// as libpq requires of `sslkey`: anything looser is refused, not used.
pub fn check_key_permissions(key: &'static str, path: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| file_error(key, path, format!("cannot read it: {e}")))?;
    let (mode, owner) = (meta.mode() & 0o777, meta.uid());
    let allowed = if owner == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(file_error(
            key,
            path,
            format!("is readable by others (mode {mode:04o}): a private key must be 0600, or 0640 if owned by root"),
        ));
    }
    Ok(())
}

/// The TLS check that failed, if `e` (or an error it wraps) is a failed handshake: a short
/// phrase for logs and the status line.
pub fn failed_check(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(check_of(tls));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(check) = failed_check(inner) {
                    return Some(check);
                }
            }
        }
        if e.to_string() == "server does not support TLS" {
            return Some(NOT_TLS);
        }
        next = e.source();
    }
    None
}

const NOT_TLS: &str = "the server does not speak TLS there (a plain-text port?)";

fn check_of(e: &rustls::Error) -> &'static str {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => {
                "the server's certificate is not signed by the configured CA"
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the server's certificate is not issued for the name we connect to"
            }
            C::Expired | C::ExpiredContext { .. } => "the server's certificate has expired",
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet"
            }
            C::Revoked => "the server's certificate is revoked",
            _ => "the server's certificate is not acceptable",
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => NOT_TLS,
        rustls::Error::AlertReceived(_) => {
            "the server refused the handshake (our client certificate?)"
        }
        rustls::Error::NoCertificatesPresented => "the server presented no certificate",
        _ => "the TLS handshake failed",
    }
}
