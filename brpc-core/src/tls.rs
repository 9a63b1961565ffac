//! TLS for brpc: TLS 1.3 only, ALPN `brpc/1`, certificates always verified.
//!
//! Dev mode: [`DevCertificate`] makes a self-signed certificate with rcgen and the
//! client trusts exactly that certificate (pinning). Production: PEM chains and
//! keys. This module builds quinn configs; it does not open sockets.

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The ALPN protocol id of brpc over QUIC.
pub const ALPN: &[u8] = b"brpc/1";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen could not generate a certificate.
    #[error("cannot generate a dev certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificates, key or settings.
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A PEM file could not be read or held nothing usable.
    #[error("cannot load {what} from {path}: {message}")]
    Pem {
        /// What was being loaded.
        what: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// quinn refused the rustls configuration (e.g. no TLS 1.3 cipher suite).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
}

/// The crypto provider brpc uses (ring).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate and its key, for development and tests.
///
/// ```
/// use brpc_core::tls::DevCertificate;
/// let dir = std::env::temp_dir().join(format!("brpc-doc-{}", std::process::id()));
/// let path = dir.join("server.pem");
/// let first = DevCertificate::load_or_create(&path)?; // created
/// let again = DevCertificate::load_or_create(&path)?; // the same one
/// assert_eq!(first.certificate(), again.certificate());
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), brpc_core::tls::TlsError>(())
/// ```
pub struct DevCertificate {
    certificate: CertificateDer<'static>,
    pem: String,
    key: PrivatePkcs8KeyDer<'static>,
    key_pem: String,
}

impl Clone for DevCertificate {
    fn clone(&self) -> Self {
        DevCertificate {
            certificate: self.certificate.clone(),
            pem: self.pem.clone(),
            key: self.key.clone_key(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl std::fmt::Debug for DevCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("DevCertificate")
            .field("certificate_pem", &self.pem)
            .finish_non_exhaustive()
    }
}

impl DevCertificate {
    /// A certificate for `localhost`, `127.0.0.1` and `::1`.
    ///
    /// # Errors
    /// [`TlsError::Generate`] if key generation fails.
    pub fn generate() -> Result<Self, TlsError> {
        Self::generate_for(["localhost", "127.0.0.1", "::1"])
    }

    /// A certificate for the given DNS names or IP addresses.
    ///
    /// # Errors
    /// [`TlsError::Generate`] if key generation fails or a name is invalid.
    pub fn generate_for<I, S>(names: I) -> Result<Self, TlsError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;
        Ok(DevCertificate {
            certificate: cert.der().clone(),
            pem: cert.pem(),
            key: PrivatePkcs8KeyDer::from(signing_key.serialize_der()),
            key_pem: signing_key.serialize_pem(),
        })
    }

    /// The dev certificate kept in `certificate_file` (PEM), with its key
    /// beside it in the same path with the extension `.key`: loaded if both
    /// exist, else generated (for `localhost`, `127.0.0.1` and `::1`) and
    /// written there (the key readable by its owner only). A server that
    /// restarts with the same file presents the same certificate, so clients
    /// that pinned it (`pin_certificate_file(certificate_file)`) reconnect.
    /// Give clients the certificate file, never the key.
    ///
    /// # Errors
    /// [`TlsError::Pem`] if a file exists but cannot be read or parsed, or
    /// cannot be written; [`TlsError::Generate`] if generation fails.
    pub fn load_or_create(certificate_file: impl AsRef<Path>) -> Result<Self, TlsError> {
        let cert_path = certificate_file.as_ref();
        let key_path = cert_path.with_extension("key");
        if cert_path.exists() && key_path.exists() {
            let pem = std::fs::read_to_string(cert_path).map_err(|e| TlsError::Pem {
                what: "dev certificate",
                path: cert_path.display().to_string(),
                message: e.to_string(),
            })?;
            let certificate = load_certificate_file(cert_path)?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(|e| TlsError::Pem {
                what: "dev certificate key",
                path: key_path.display().to_string(),
                message: e.to_string(),
            })?;
            let key = match load_private_key_pem(&key_path)? {
                PrivateKeyDer::Pkcs8(key) => key,
                _ => {
                    return Err(TlsError::Pem {
                        what: "dev certificate key",
                        path: key_path.display().to_string(),
                        message: "not a PKCS#8 key (as brpc writes)".into(),
                    });
                }
            };
            return Ok(DevCertificate {
                certificate,
                pem,
                key,
                key_pem,
            });
        }
        let dev = Self::generate()?;
        let written = |path: &Path, what: &'static str, e: std::io::Error| TlsError::Pem {
            what,
            path: path.display().to_string(),
            message: format!("cannot write: {e}"),
        };
        if let Some(dir) = cert_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| written(dir, "dev certificate", e))?;
        }
        write_private(&key_path, dev.key_pem.as_bytes())
            .map_err(|e| written(&key_path, "dev certificate key", e))?;
        std::fs::write(cert_path, dev.pem.as_bytes())
            .map_err(|e| written(cert_path, "dev certificate", e))?;
        Ok(dev)
    }

    /// The certificate (DER), which clients pin.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The certificate as PEM text.
    pub fn certificate_pem(&self) -> String {
        self.pem.clone()
    }

    /// The private key (DER).
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Whether a QUIC error code is a TLS alert about a certificate (bad,
/// unsupported, revoked, expired, unknown, issued by an unknown CA, or
/// missing where one is required): the handshake failed on certificate
/// checks, on this side or the other.
pub fn is_certificate_alert(code: quinn::TransportErrorCode) -> bool {
    // TLS alert numbers (RFC 8446 §6): bad_certificate 42,
    // unsupported_certificate 43, certificate_revoked 44,
    // certificate_expired 45, certificate_unknown 46, unknown_ca 48,
    // certificate_required 116.
    [42u8, 43, 44, 45, 46, 48, 116]
        .into_iter()
        .any(|alert| code == quinn::TransportErrorCode::crypto(alert))
}

/// What to check, in a sentence, for the common certificate failures whose
/// rustls names say little (`UnknownIssuer`, `CaUsedAsEndEntity`, …), given
/// the error's text; `None` when there is nothing to add.
pub fn explain_certificate_error(error: &str) -> Option<&'static str> {
    const HINTS: &[(&str, &str)] = &[
        (
            "CaUsedAsEndEntity",
            "a CA certificate was presented as a leaf certificate: present a certificate \
             signed by the CA, not the CA itself (nor a self-signed one)",
        ),
        (
            "UnknownIssuer",
            "the certificate was not issued by a trusted CA: check the CA bundle on the \
             verifying side (trust_pem_file / client_ca_pem_file) and that the chain is complete",
        ),
        (
            "BadSignature",
            "the certificate's signature does not verify against the trusted certificate: it \
             was issued by another key of the same name (a regenerated CA or dev certificate?)",
        ),
        (
            "Expired",
            "the certificate has expired (or this machine's clock is wrong): renew it",
        ),
        (
            "NotValidYet",
            "the certificate is not valid yet (or this machine's clock is wrong)",
        ),
        (
            "not valid for name",
            "the certificate does not carry the name dialled: dial a name it carries, or set \
             server_name(..)",
        ),
        (
            "CertificateRequired",
            "the server requires mutual TLS: present a client certificate (identity_pem_files)",
        ),
        (
            "InvalidPurpose",
            "the certificate's extended key usage does not allow this role (serverAuth for a \
             server, clientAuth for a client)",
        ),
        (
            "NoCertificatesPresented",
            "the client presented no certificate, and this server requires mutual TLS",
        ),
    ];
    HINTS
        .iter()
        .find(|(needle, _)| error.contains(needle))
        .map(|(_, hint)| *hint)
}

/// Writes a file only its owner can read (on Unix).
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(contents)
}

/// Reads every certificate in a PEM file.
///
/// # Errors
/// [`TlsError::Pem`] if the file cannot be read or holds no certificate.
pub fn load_certificates_pem(
    path: impl AsRef<Path>,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = path.as_ref();
    let err = |message: String| TlsError::Pem {
        what: "certificates",
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
///
/// # Errors
/// [`TlsError::Pem`] if the file cannot be read or holds no key.
pub fn load_private_key_pem(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>, TlsError> {
    let path = path.as_ref();
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// A certificate from PEM text or a file holding DER or PEM.
///
/// # Errors
/// [`TlsError::Pem`] if the file cannot be read or parsed.
pub fn load_certificate_file(path: impl AsRef<Path>) -> Result<CertificateDer<'static>, TlsError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| TlsError::Pem {
        what: "certificate",
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    if bytes.starts_with(b"-----BEGIN") {
        CertificateDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
            what: "certificate",
            path: path.display().to_string(),
            message: e.to_string(),
        })
    } else {
        Ok(CertificateDer::from(bytes))
    }
}

/// quinn server crypto: TLS 1.3, ALPN `brpc/1`, no client certificates.
///
/// # Errors
/// [`TlsError`] if rustls refuses the chain or key.
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<QuicServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// quinn server crypto for mutual TLS: like [`server_crypto`], and every client
/// must present a certificate chain that verifies against `client_roots`
/// (validity dates included); others are refused during the handshake.
///
/// # Errors
/// [`TlsError`] if rustls refuses the chain, key or roots.
pub fn server_crypto_mtls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: RootCertStore,
) -> Result<Arc<QuicServerConfig>, TlsError> {
    server_crypto_client_auth(chain, key, client_roots, true)
}

/// quinn server crypto verifying client certificates against
/// `client_roots`; with `required` false a client may also present none
/// (and then has no identity), but one it presents must verify.
///
/// # Errors
/// [`TlsError`] if rustls refuses the chain, key or roots.
pub fn server_crypto_client_auth(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: RootCertStore,
    required: bool,
) -> Result<Arc<QuicServerConfig>, TlsError> {
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        crypto_provider(),
    );
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// quinn client crypto trusting `roots`: TLS 1.3, ALPN `brpc/1`, full webpki
/// verification (chain, validity dates, server name).
///
/// # Errors
/// [`TlsError`] if rustls refuses the settings.
pub fn client_crypto(roots: RootCertStore) -> Result<Arc<QuicClientConfig>, TlsError> {
    client_crypto_with_identity(roots, None)
}

/// Like [`client_crypto`], presenting `identity` (chain and key) to servers
/// that ask for a client certificate (mutual TLS).
///
/// # Errors
/// [`TlsError`] if rustls refuses the settings or the identity.
pub fn client_crypto_with_identity(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<QuicClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// The public web's root CAs (Mozilla's list, from `webpki-roots`), for
/// clients of servers with publicly trusted certificates.
pub fn webpki_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// A root store of every certificate in a PEM bundle.
///
/// # Errors
/// [`TlsError::Pem`] if the file cannot be read, or [`TlsError::Rustls`] if a
/// certificate is not a usable trust anchor.
pub fn roots_from_pem_file(path: impl AsRef<Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates_pem(path)? {
        roots.add(certificate)?;
    }
    Ok(roots)
}

/// Who a peer proved to be with its TLS client certificate (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The verified leaf certificate (DER).
    pub certificate: CertificateDer<'static>,
    /// The subject distinguished name, e.g. `CN=agent-7, O=fleet`.
    pub subject: String,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// DNS names in the subject alternative name extension.
    pub dns_names: Vec<String>,
    /// URIs in the subject alternative name extension (e.g. SPIFFE ids).
    pub uris: Vec<String>,
}

impl PeerIdentity {
    /// The identity a verified certificate carries.
    ///
    /// # Errors
    /// [`TlsError::Pem`] if the certificate cannot be parsed (rustls already
    /// verified it, so this means a bug or an exotic encoding).
    pub fn from_certificate(certificate: CertificateDer<'static>) -> Result<Self, TlsError> {
        use x509_parser::extensions::GeneralName;
        let parsed = x509_parser::parse_x509_certificate(&certificate)
            .map_err(|e| TlsError::Pem {
                what: "peer certificate",
                path: "<handshake>".into(),
                message: e.to_string(),
            })?
            .1;
        let subject = parsed.subject().to_string();
        let common_name = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut dns_names = Vec::new();
        let mut uris = Vec::new();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    _ => {}
                }
            }
        }
        Ok(PeerIdentity {
            certificate,
            subject,
            common_name,
            dns_names,
            uris,
        })
    }

    /// The identity the peer of `connection` proved, if it sent a certificate.
    pub fn of_connection(connection: &quinn::Connection) -> Option<Self> {
        let chain = connection
            .peer_identity()?
            .downcast::<Vec<CertificateDer<'static>>>()
            .ok()?;
        let leaf = chain.first()?.clone();
        Self::from_certificate(leaf).ok()
    }
}

/// A root store holding exactly `certificate`: the client accepts only a server
/// presenting it (pinning a dev certificate).
///
/// # Errors
/// [`TlsError::Rustls`] if the certificate cannot serve as a trust anchor.
pub fn pinned_roots(certificate: &CertificateDer<'_>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(certificate.clone().into_owned())?;
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dev_certificate_file_is_created_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("brpc-dev-cert-{}", std::process::id()));
        let path = dir.join("server.pem");
        let _ = std::fs::remove_dir_all(&dir);
        let first = DevCertificate::load_or_create(&path).unwrap();
        assert!(path.exists() && path.with_extension("key").exists());
        let again = DevCertificate::load_or_create(&path).unwrap();
        assert_eq!(first.certificate(), again.certificate());
        assert_eq!(first.private_key(), again.private_key());
        assert_eq!(&load_certificate_file(&path).unwrap(), first.certificate());
        assert!(!format!("{first:?}").contains("PRIVATE KEY"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path.with_extension("key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn common_certificate_errors_are_explained() {
        let hint = explain_certificate_error(
            "invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))",
        );
        assert!(hint.is_some_and(|h| h.contains("signed by the CA")));
        assert!(explain_certificate_error("invalid peer certificate: UnknownIssuer").is_some());
        assert_eq!(explain_certificate_error("connection reset"), None);
    }

    #[test]
    fn dev_certificate_pem_parses_back() {
        let dev = DevCertificate::generate().unwrap();
        let pem = dev.certificate_pem();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(&back, dev.certificate());
        assert!(server_crypto(vec![dev.certificate().clone()], dev.private_key()).is_ok());
        assert!(client_crypto(pinned_roots(dev.certificate()).unwrap()).is_ok());
    }
}
