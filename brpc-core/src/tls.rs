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
#[non_exhaustive]
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

/// The crypto provider brpc uses: ring, with TLS 1.3's AES-128-GCM suite
/// first, as Go's crypto/tls and BoringSSL order them (rustls puts
/// AES-256-GCM first). Every TLS 1.3 suite stays allowed; a brpc client
/// offers this order and a brpc server follows the client's. AES-128 runs
/// 10 rounds per block against AES-256's 14, and its key schedule hashes
/// with SHA-256 instead of SHA-384: less CPU for every byte a connection
/// carries and for every handshake.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the other suites keep rustls's order.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
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

/// quinn server crypto: TLS 1.3, ALPN `brpc/1`, no client certificates;
/// session tickets whose key is derived from `key` and `chain` (and changes
/// every 6 hours), so a server restarted with the same certificate and key
/// resumes the sessions of its predecessor's clients (PROTOCOL.md §1).
///
/// # Errors
/// [`TlsError`] if rustls refuses the chain or key.
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<QuicServerConfig>, TlsError> {
    quic_server_config(server_rustls(chain, key, None)?)
}

/// The rustls config of a brpc server: TLS 1.3, ALPN `brpc/1`, no early
/// data, [`StableTickets`]; with `client_auth`, client certificates
/// verified against its roots (required, or optional).
fn server_rustls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_auth: Option<(RootCertStore, bool)>,
) -> Result<rustls::ServerConfig, TlsError> {
    let tickets = StableTickets::new(&chain, &key, client_auth.as_ref());
    let builder = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match client_auth {
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
        Some((roots, required)) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                crypto_provider(),
            );
            let verifier = if required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    config.ticketer = Arc::new(tickets);
    Ok(config)
}

fn quic_server_config(config: rustls::ServerConfig) -> Result<Arc<QuicServerConfig>, TlsError> {
    let quic = QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// Session tickets a restarted server still accepts: TLS 1.3 resumption
/// lets a client that connected before skip the certificate exchange
/// (the server's signature, the client's verification of the chain and of
/// that signature), which is what a fleet reconnecting to a restarted
/// server does all at once.
///
/// The ticket key is derived from the server's private key and certificate
/// chain (and, with client certificates, from the roots they are verified
/// against) and from the time: a new key every [`TICKET_EPOCH_SECS`], the
/// previous one still accepted. So a server restarted with the same
/// certificate, key and client roots resumes its predecessor's sessions; one
/// with any of them changed cannot decrypt their tickets and makes a full
/// handshake (a pinned client then sees the new certificate). Resumption
/// in TLS 1.3 as rustls does it always makes a fresh key exchange
/// (`psk_dhe_ke`), and brpc accepts no early data, so whoever learns a
/// ticket key cannot read connections by watching them; they could pose as
/// the server to clients resuming with its tickets, as anyone holding the
/// private key the ticket key comes from could. A resumed session keeps the
/// identity of its first handshake (the client certificate a server saw,
/// the server certificate a client verified) for at most the ticket's life.
#[derive(Debug)]
struct StableTickets {
    /// What every epoch's key is derived from.
    secret: ring::digest::Digest,
}

/// How long one ticket key is used for new tickets; a ticket stays valid for
/// the rest of that epoch and the next one.
const TICKET_EPOCH_SECS: u64 = 6 * 60 * 60;

/// Tickets longer than this are refused before decrypting (a ticket holds
/// the session's secrets and the client's certificate chain, if any).
const MAX_TICKET_LEN: usize = 16 * 1024;

const TICKET_AEAD: &ring::aead::Algorithm = &ring::aead::CHACHA20_POLY1305;

impl StableTickets {
    /// The tickets of a server with this chain and key, and `client_auth`:
    /// the roots client certificates are verified against and whether one
    /// is required (a session resumed under other rules would skip them).
    fn new(
        chain: &[CertificateDer<'_>],
        key: &PrivateKeyDer<'_>,
        client_auth: Option<&(RootCertStore, bool)>,
    ) -> Self {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        digest.update(b"brpc session ticket secret v1\0");
        digest.update(key.secret_der());
        for certificate in chain {
            digest.update(&(certificate.len() as u64).to_be_bytes());
            digest.update(certificate);
        }
        // No client certificates, optional ones, required ones.
        digest.update(&[match client_auth {
            None => 0,
            Some((_, false)) => 1,
            Some((_, true)) => 2,
        }]);
        for root in client_auth.iter().flat_map(|(roots, _)| roots.roots.iter()) {
            for part in [
                root.subject.as_ref(),
                root.subject_public_key_info.as_ref(),
                root.name_constraints.as_deref().unwrap_or_default(),
            ] {
                digest.update(&(part.len() as u64).to_be_bytes());
                digest.update(part);
            }
        }
        StableTickets {
            secret: digest.finish(),
        }
    }

    /// The epoch of the time now (0 if the clock is before 1970).
    fn epoch_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs() / TICKET_EPOCH_SECS)
    }

    /// The key of `epoch` and its 16-byte name (sent in the clear at the
    /// ticket's start, to pick the key).
    fn key(&self, epoch: u64) -> Option<(ring::aead::LessSafeKey, [u8; 16])> {
        let derive = |label: &[u8]| {
            let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
            digest.update(label);
            digest.update(self.secret.as_ref());
            digest.update(&epoch.to_be_bytes());
            digest.finish()
        };
        let key = derive(b"key");
        let name = derive(b"name");
        let mut key_name = [0u8; 16];
        key_name.copy_from_slice(&name.as_ref()[..16]);
        // A SHA-256 digest is a ChaCha20-Poly1305 key: this does not fail.
        let key = ring::aead::UnboundKey::new(TICKET_AEAD, key.as_ref()).ok()?;
        Some((ring::aead::LessSafeKey::new(key), key_name))
    }

    /// A ticket for `plain` under the key of `epoch`.
    fn encrypt_in(&self, epoch: u64, plain: &[u8]) -> Option<Vec<u8>> {
        use ring::rand::SecureRandom;
        let (key, key_name) = self.key(epoch)?;
        // A random nonce: a counter would tell clients how many tickets
        // this server issued, and would repeat after a restart.
        let mut nonce = [0u8; 12];
        ring::rand::SystemRandom::new().fill(&mut nonce).ok()?;
        // key name (16) | nonce (12) | sealed session (plain + 16-byte tag)
        let mut ticket = Vec::with_capacity(16 + 12 + plain.len() + TICKET_AEAD.tag_len());
        ticket.extend_from_slice(&key_name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(key_name),
                &mut ticket[28..],
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }
}

impl rustls::server::ProducesTickets for StableTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_EPOCH_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_in(Self::epoch_now(), plain)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() > MAX_TICKET_LEN || ticket.len() < 28 + TICKET_AEAD.tag_len() {
            return None;
        }
        let (name, rest) = ticket.split_at(16);
        let (nonce, sealed) = rest.split_at(12);
        let now = Self::epoch_now();
        // This epoch's key, or the previous one's.
        let (key, key_name) = [now, now.saturating_sub(1)]
            .into_iter()
            .filter_map(|epoch| self.key(epoch))
            // The name is no secret (every ticket carries it in the clear);
            // the AEAD tag is what authenticates.
            .find(|(_, key_name)| key_name[..] == *name)?;
        let mut plain = sealed.to_vec();
        let opened = key
            .open_in_place(
                ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?,
                ring::aead::Aad::from(key_name),
                &mut plain,
            )
            .ok()?
            .len();
        plain.truncate(opened);
        Some(plain)
    }
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
    quic_server_config(server_rustls(chain, key, Some((client_roots, required)))?)
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
    let config = client_rustls(roots, identity)?;
    let quic = QuicClientConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// The rustls config of a brpc client: TLS 1.3, ALPN `brpc/1`, trusting
/// `roots`, presenting `identity` if given.
fn client_rustls(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
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
    /// Whether the certificate carries `name`: as its common name, a DNS
    /// name or a URI.
    pub fn carries(&self, name: &str) -> bool {
        self.common_name.as_deref() == Some(name)
            || self.dns_names.iter().any(|n| n == name)
            || self.uris.iter().any(|u| u == name)
    }

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
    use rustls::server::ProducesTickets;

    /// Runs a TLS handshake between `client` and `server` in memory, and the
    /// server's session tickets after it.
    fn handshake(
        client: &mut rustls::ClientConnection,
        server: &mut rustls::ServerConnection,
    ) -> Result<(), rustls::Error> {
        fn pass(
            from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
            to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
        ) -> Result<bool, rustls::Error> {
            let mut bytes = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut bytes)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                to.read_tls(&mut rest)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                to.process_new_packets()?;
            }
            Ok(!bytes.is_empty())
        }
        for _ in 0..10 {
            let sent = pass(client, server)?;
            let answered = pass(server, client)?;
            if !sent && !answered && !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("the handshake did not end".into()))
    }

    /// A brpc client's rustls config pinning `trusted`.
    fn client_config(trusted: &DevCertificate) -> Arc<rustls::ClientConfig> {
        Arc::new(client_rustls(pinned_roots(trusted.certificate()).unwrap(), None).unwrap())
    }

    /// One connection from `client` to a server with `server`'s config,
    /// after its handshake.
    fn connection(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(client.clone(), name)?;
        let mut server = rustls::ServerConnection::new(server.clone())?;
        handshake(&mut client, &mut server)?;
        Ok((client, server))
    }

    /// One connection from `client` to a server with `server`'s config:
    /// whether it resumed a session.
    fn connect(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> Result<rustls::HandshakeKind, rustls::Error> {
        let (client, _) = connection(client, server)?;
        Ok(client.handshake_kind().unwrap())
    }

    fn server_config(dev: &DevCertificate) -> Arc<rustls::ServerConfig> {
        Arc::new(server_rustls(vec![dev.certificate().clone()], dev.private_key(), None).unwrap())
    }

    #[test]
    fn a_server_restarted_with_the_same_certificate_resumes_its_predecessors_sessions() {
        let dev = DevCertificate::generate().unwrap();
        let client = client_config(&dev);
        let first = server_config(&dev);
        assert_eq!(
            connect(&client, &first).unwrap(),
            rustls::HandshakeKind::Full
        );
        // The same process's server, then a new one (a restart: a config
        // built again from the same certificate and key).
        assert_eq!(
            connect(&client, &first).unwrap(),
            rustls::HandshakeKind::Resumed
        );
        let restarted = server_config(&dev);
        assert_eq!(
            connect(&client, &restarted).unwrap(),
            rustls::HandshakeKind::Resumed
        );
    }

    #[test]
    fn brpc_peers_negotiate_aes_128_gcm() {
        let dev = DevCertificate::generate().unwrap();
        let (client, server) = connection(&client_config(&dev), &server_config(&dev)).unwrap();
        for suite in [
            client.negotiated_cipher_suite(),
            server.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|suite| suite.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    #[test]
    fn a_server_with_another_key_makes_a_full_handshake_and_a_pinned_client_refuses_it() {
        let dev = DevCertificate::generate().unwrap();
        let client = client_config(&dev);
        assert_eq!(
            connect(&client, &server_config(&dev)).unwrap(),
            rustls::HandshakeKind::Full
        );
        // A new dev certificate: its tickets key differs, so the client's
        // ticket is not accepted and the certificate is checked again.
        let other = DevCertificate::generate().unwrap();
        let refused = connect(&client, &server_config(&other)).unwrap_err();
        assert!(
            matches!(refused, rustls::Error::InvalidCertificate(_)),
            "{refused:?}"
        );
    }

    #[test]
    fn a_resumed_session_keeps_the_client_certificate_of_its_first_handshake() {
        let server_dev = DevCertificate::generate().unwrap();
        let client_dev = DevCertificate::generate().unwrap();
        let client_roots = pinned_roots(client_dev.certificate()).unwrap();
        let server = Arc::new(
            server_rustls(
                vec![server_dev.certificate().clone()],
                server_dev.private_key(),
                Some((client_roots.clone(), true)),
            )
            .unwrap(),
        );
        let client = Arc::new(
            client_rustls(
                pinned_roots(server_dev.certificate()).unwrap(),
                Some((
                    vec![client_dev.certificate().clone()],
                    client_dev.private_key(),
                )),
            )
            .unwrap(),
        );
        for expected in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
            let (c, s) = connection(&client, &server).unwrap();
            assert_eq!(c.handshake_kind(), Some(expected));
            assert_eq!(
                s.peer_certificates().unwrap(),
                std::slice::from_ref(client_dev.certificate())
            );
        }
        // The same server certificate and key under other client
        // certificate rules: the ticket is not accepted.
        let other_roots = pinned_roots(DevCertificate::generate().unwrap().certificate()).unwrap();
        let tickets = |client_auth: Option<&(RootCertStore, bool)>| {
            StableTickets::new(
                &[server_dev.certificate().clone()],
                &server_dev.private_key(),
                client_auth,
            )
        };
        let required = tickets(Some(&(client_roots.clone(), true)));
        let ticket = required.encrypt(b"session").unwrap();
        assert_eq!(required.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        // Other roots, certificates made optional, or none asked for.
        for other in [
            tickets(Some(&(other_roots, true))),
            tickets(Some(&(client_roots, false))),
            tickets(None),
        ] {
            assert_eq!(other.decrypt(&ticket), None);
        }
    }

    #[test]
    fn tickets_are_accepted_for_two_epochs_and_refused_when_altered() {
        let dev = DevCertificate::generate().unwrap();
        let tickets = StableTickets::new(&[dev.certificate().clone()], &dev.private_key(), None);
        let now = StableTickets::epoch_now();
        let plain = b"a session's secrets";
        for (epoch, accepted) in [
            (now, true),
            (now - 1, true),
            (now - 2, false),
            (now + 1, false),
        ] {
            let ticket = tickets.encrypt_in(epoch, plain).unwrap();
            assert_eq!(
                tickets.decrypt(&ticket).as_deref(),
                accepted.then_some(&plain[..]),
                "epoch {epoch} (now {now})"
            );
        }
        let ticket = tickets.encrypt(plain).unwrap();
        for at in [0, 16, 28, ticket.len() - 1] {
            let mut altered = ticket.clone();
            altered[at] ^= 1;
            assert_eq!(tickets.decrypt(&altered), None, "byte {at} altered");
        }
        assert_eq!(tickets.decrypt(&ticket[..ticket.len() - 1]), None);
        assert_eq!(tickets.decrypt(&ticket[..20]), None);
        assert_eq!(tickets.decrypt(&[]), None);
        assert_eq!(tickets.decrypt(&vec![0; MAX_TICKET_LEN + 1]), None);
    }

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
