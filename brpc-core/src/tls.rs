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
#[derive(Debug)]
pub struct DevCertificate {
    certificate: CertificateDer<'static>,
    pem: String,
    key: PrivatePkcs8KeyDer<'static>,
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
        })
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
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        crypto_provider(),
    )
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
