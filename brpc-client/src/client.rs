//! The client: builder, dial (QUIC + TLS 1.3), Hello, and serving this side's
//! services on the connection it dialed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};

use brpc_core::conn::{MemoryBudget, codes};
use brpc_core::tls::{self, PeerIdentity, TlsError};
use brpc_core::wire::{HelloRequest, KeyValue};
use brpc_core::{
    CallLimits, Channel, ConnectionId, ConnectionOptions, Labels, Peer, PeerInfo, Router, Side,
};
use brpc_core::{bytestream, session};
use quinn::{Endpoint, VarInt};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tonic::Status;
use tracing::Instrument;

/// Why [`Builder::connect`](crate::Builder::connect) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No server certificate or CA to trust was configured.
    #[error(
        "no server certificate to trust: call pin_certificate(..) with the server's certificate, or trust_roots(..)"
    )]
    NoTrust,
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The address did not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// The address given.
        addr: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The local UDP socket could not be bound.
    #[error("cannot bind a local UDP socket: {0}")]
    Endpoint(std::io::Error),
    /// quinn refused to start the connection (e.g. an invalid server name).
    #[error("cannot start connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC or TLS handshake failed. A certificate that does not match the
    /// pinned one shows here as an invalid peer certificate.
    #[error("handshake with the server failed: {source}{hint}", source = .0, hint = hint(&.0.to_string()))]
    Handshake(quinn::ConnectionError),
    /// The server refused to start a handshake (QUIC `CONNECTION_REFUSED`):
    /// it had more clients waiting for a handshake than it queues
    /// (`Server::builder().max_handshakes(..)`), or it is shutting down.
    /// Transient: reconnect and `connect_with_retry` retry with backoff.
    #[error(
        "the server is busy with other clients' handshakes, or shutting down, and refused this \
         one before starting it: retry later; reconnect and connect_with_retry do so with \
         their backoff ({0})"
    )]
    Busy(quinn::ConnectionError),
    /// The server's certificate is valid, but not for the name checked
    /// (the host dialled, or [`Builder::server_name`](crate::Builder::server_name)).
    #[error(
        "the server's certificate is not valid for {server_name:?}, the name checked{}: \
         dial the host name the certificate carries, or set .server_name(..) to it ({source})",
        if *is_ip { " (an IP address: the certificate would need it as an IP subjectAltName)" } else { "" }
    )]
    CertificateName {
        /// The name the certificate was checked against.
        server_name: String,
        /// Whether that name is an IP address.
        is_ip: bool,
        /// The handshake failure, naming what the certificate is valid for.
        source: quinn::ConnectionError,
    },
    /// The server presented a certificate other than the pinned one. Not
    /// retried by reconnect unless [`Builder::retry_certificate_mismatch`](crate::Builder::retry_certificate_mismatch).
    #[error(
        "the server's certificate is not the pinned one: it changed? A server on a fresh dev \
         certificate makes a new one at every start; serve a persisted one \
         (Server::builder().dev_certificate_file(path)) and pin that file ({0})"
    )]
    NotPinned(quinn::ConnectionError),
    /// The server refused the Hello.
    #[error("server refused the session: {}", .0.message())]
    Hello(Status),
    /// The handshake and Hello did not finish in time.
    #[error(
        "no answer from {addr} within {after:?}: is a brpc server running there, is it the \
         right port, and is UDP to it open (QUIC runs over UDP; firewalls often pass only TCP)?"
    )]
    Timeout {
        /// The server address dialled.
        addr: SocketAddr,
        /// The connect timeout in force.
        after: Duration,
    },
    /// The Unix socket could not be connected to (no server there, no
    /// permission, or no answer within the connect timeout).
    #[error(
        "cannot connect to the Unix socket {}: {source} (is the server running, and may \
         this user open the socket file?)",
        path.display()
    )]
    Unix {
        /// The socket's path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server closed the connection while admitting it, and said why
    /// (e.g. at its connection limit, or not authorized).
    #[error("server refused the connection: {reason}")]
    Refused {
        /// The application close code (see `brpc_core::conn::codes`).
        code: u32,
        /// The code's meaning and the server's reason.
        reason: String,
    },
}

/// " (what to check)" for a certificate failure, or nothing.
fn hint(error: &str) -> String {
    tls::explain_certificate_error(error)
        .map(|h| format!(" ({h})"))
        .unwrap_or_default()
}

impl ConnectError {
    /// Whether retrying cannot help: the error is in this client's
    /// configuration, its certificate checks, or the server's verdict on it.
    fn is_final(&self, retry_certificate_mismatch: bool) -> bool {
        match self {
            ConnectError::NotPinned(_) => !retry_certificate_mismatch,
            ConnectError::NoTrust
            | ConnectError::Tls(_)
            | ConnectError::Connect(_)
            | ConnectError::CertificateName { .. } => true,
            ConnectError::Refused { code, .. } => *code == codes::CONN_UNAUTHORIZED,
            ConnectError::Hello(status) => matches!(
                status.code(),
                tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::FailedPrecondition
            ),
            // A certificate may be fixed on the server side (rotation), and
            // other handshake failures are transient: keep trying.
            ConnectError::Handshake(_)
            | ConnectError::Busy(_)
            | ConnectError::Resolve { .. }
            | ConnectError::Endpoint(_)
            | ConnectError::Unix { .. }
            | ConnectError::Timeout { .. } => false,
        }
    }

    /// Whether a certificate failed verification: the server's (by this
    /// client) or this client's (by a server requiring mutual TLS).
    pub fn is_certificate_error(&self) -> bool {
        match self {
            ConnectError::CertificateName { .. } | ConnectError::NotPinned(_) => true,
            ConnectError::Handshake(quinn::ConnectionError::TransportError(e)) => {
                tls::is_certificate_alert(e.code)
            }
            ConnectError::Handshake(quinn::ConnectionError::ConnectionClosed(c)) => {
                tls::is_certificate_alert(c.error_code)
            }
            _ => false,
        }
    }
}

/// Where a client's connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientState {
    /// Connected; Hello done.
    Connected {
        /// The id the server assigned to this connection.
        connection_id: ConnectionId,
    },
    /// The connection dropped (or the server is going away); reconnecting with
    /// backoff. Calls fail with `UNAVAILABLE` meanwhile (or wait, with
    /// `Channel::wait_for_ready`).
    Reconnecting {
        /// Connection attempts made since the drop.
        attempt: u32,
        /// Why the connection ended, or why the last attempt failed.
        last_error: Disconnect,
    },
    /// Closed for good: by [`Client::close`], by the server refusing this
    /// client, or with reconnect disabled.
    Closed {
        /// Why.
        reason: Disconnect,
    },
}

/// Why a client is not connected: how its connection ended, or why its
/// last attempt to connect failed. Prints as a sentence for a person; match
/// it, or ask [`connection_error`](Self::connection_error) and
/// [`connect_error`](Self::connect_error), to act on it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Disconnect {
    /// No connection was made yet.
    NotConnectedYet,
    /// The connection ended: who closed it, with which code and reason.
    Connection(brpc_core::ConnectionError),
    /// The server said it is going away (GoAway), with this reason; it
    /// closes the connection once the calls in flight are done.
    GoAway(String),
    /// The last attempt to connect failed.
    Connect(Arc<ConnectError>),
    /// The client was closed ([`Client::close`], or dropped).
    ClientClosed,
}

impl Disconnect {
    /// How the connection ended, when that is the reason.
    pub fn connection_error(&self) -> Option<&brpc_core::ConnectionError> {
        match self {
            Disconnect::Connection(e) => Some(e),
            _ => None,
        }
    }

    /// Why the last attempt to connect failed, when that is the reason.
    pub fn connect_error(&self) -> Option<&ConnectError> {
        match self {
            Disconnect::Connect(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the server is going away or closed the connection as going
    /// away (it is shutting down): reconnecting, later or elsewhere, helps.
    pub fn is_going_away(&self) -> bool {
        match self {
            Disconnect::GoAway(_) => true,
            Disconnect::Connection(e) => e.is_going_away(),
            _ => false,
        }
    }
}

impl std::fmt::Display for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disconnect::NotConnectedYet => f.write_str("not connected yet"),
            Disconnect::Connection(e) => e.fmt(f),
            Disconnect::GoAway(reason) if reason.is_empty() => {
                f.write_str("the server is going away (GoAway)")
            }
            Disconnect::GoAway(reason) => {
                write!(f, "the server is going away (GoAway): {reason}")
            }
            Disconnect::Connect(e) => e.fmt(f),
            Disconnect::ClientClosed => f.write_str("closed by the client"),
        }
    }
}

/// Two reasons are equal when they are of one kind and say the same.
impl PartialEq for Disconnect {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl Eq for Disconnect {}

/// Configures and dials a [`Client`].
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// let client = brpc_client::Client::builder()
///     .name("agent-7")
///     .trust_pem_file("fleet-ca.pem")?
///     .identity_pem_files("agent.pem", "agent.key")?
///     .reconnect_backoff(Duration::from_millis(200), Duration::from_secs(30))
///     .connect("control.example:4433") // checks the name control.example
///     .await?;
/// # drop(client); Ok(()) }
/// ```
pub struct Builder {
    router: Router,
    name: String,
    labels: Labels,
    roots: Option<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    server_name: Option<String>,
    connect_timeout: Duration,
    options: ConnectionOptions,
    /// Trust is a pinned certificate (not a CA).
    pinned: bool,
    retry_certificate_mismatch: bool,
    reconnect: bool,
    backoff_min: Duration,
    backoff_max: Duration,
    busy_backoff_min: Duration,
    busy_backoff_max: Duration,
    local_address: Option<SocketAddr>,
    resolver: Resolver,
}

/// Looks a host name up: the address as given (`"host:port"`) to the
/// addresses it names.
type Resolver = Arc<
    dyn Fn(
            String,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>,
        > + Send
        + Sync,
>;

/// The system resolver (tokio's `lookup_host`).
fn system_resolver() -> Resolver {
    Arc::new(|addr: String| {
        Box::pin(async move { Ok(tokio::net::lookup_host(addr).await?.collect()) })
    })
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            router: Router::new(),
            name: String::new(),
            labels: Labels::new(),
            roots: None,
            identity: None,
            server_name: None,
            pinned: false,
            retry_certificate_mismatch: false,
            connect_timeout: Duration::from_secs(10),
            options: ConnectionOptions::default(),
            reconnect: true,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            busy_backoff_min: Duration::from_secs(1),
            busy_backoff_max: Duration::from_secs(30),
            local_address: None,
            resolver: system_resolver(),
        }
    }
}

impl Builder {
    brpc_core::builder_setters!();

    /// The name announced in Hello (shown in the server's registry).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// A label announced in Hello, e.g. `label("region", "eu")`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Trusts exactly this certificate (a server's dev certificate).
    pub fn pin_certificate(mut self, certificate: CertificateDer<'static>) -> Self {
        let mut roots = self.roots.take().unwrap_or_else(RootCertStore::empty);
        // An unparsable certificate trusts nothing: connect then fails the
        // handshake with a certificate error rather than here
        // (`pin_certificate_file` checks it when loading).
        let _ = roots.add(certificate);
        self.roots = Some(roots);
        self.pinned = true;
        self
    }

    /// Trusts the certificate in a file (DER or PEM), as written by a server
    /// (e.g. the file a server keeps with `dev_certificate_file`).
    ///
    /// # Errors
    /// [`TlsError::Pem`] if the file cannot be read or does not hold a
    /// certificate.
    pub fn pin_certificate_file(self, path: impl AsRef<std::path::Path>) -> Result<Self, TlsError> {
        let path = path.as_ref();
        let certificate = tls::load_certificate_file(path)?;
        tls::pinned_roots(&certificate).map_err(|e| TlsError::Pem {
            what: "pinned certificate",
            path: path.display().to_string(),
            message: format!("not a usable X.509 certificate: {e}"),
        })?;
        Ok(self.pin_certificate(certificate))
    }

    /// Looks host names up with `resolve` instead of the system resolver
    /// (tokio's `lookup_host`): for service discovery of its own, or a
    /// resolver with its own cache. It is given the address as passed to
    /// `connect` (`"agents.example.com:4433"`) and returns the addresses
    /// that name stands for; the first is dialled (on a reconnect, the
    /// first the client's socket can reach: an IPv4 one for an IPv4
    /// socket). It is asked at the first connect and again before every
    /// reconnect (an error then, or no answer within the connect timeout,
    /// keeps the address last found). Addresses given as IP addresses are
    /// not looked up.
    ///
    /// ```
    /// # use std::net::SocketAddr;
    /// let builder = brpc_client::Client::builder().resolver(|addr: String| async move {
    ///     match addr.as_str() {
    ///         "control-plane:4433" => Ok(vec![SocketAddr::from(([127, 0, 0, 1], 4433))]),
    ///         _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "not registered")),
    ///     }
    /// });
    /// # let _ = builder;
    /// ```
    #[must_use]
    pub fn resolver<F, Fut>(mut self, resolve: F) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        self.resolver = Arc::new(move |addr| Box::pin(resolve(addr)));
        self
    }

    /// With a pinned certificate, keep reconnecting when the server presents
    /// a different one (default false: the client stops with
    /// [`ConnectError::NotPinned`], since a changed certificate does not
    /// change back by itself).
    pub fn retry_certificate_mismatch(mut self, retry: bool) -> Self {
        self.retry_certificate_mismatch = retry;
        self
    }

    /// Trusts these root certificates (a CA bundle).
    pub fn trust_roots(mut self, roots: RootCertStore) -> Self {
        self.roots = Some(roots);
        self.pinned = false;
        self
    }

    /// Trusts the CA certificates in a PEM bundle.
    ///
    /// # Errors
    /// [`TlsError`] if the file cannot be read or holds no usable certificate.
    pub fn trust_pem_file(self, path: impl AsRef<std::path::Path>) -> Result<Self, TlsError> {
        Ok(self.trust_roots(tls::roots_from_pem_file(path)?))
    }

    /// Trusts the public web's root CAs (Mozilla's list, built in), for a
    /// server with a publicly trusted certificate.
    pub fn trust_webpki_roots(self) -> Self {
        self.trust_roots(tls::webpki_roots())
    }

    /// Presents this certificate chain (leaf first) and key to servers that
    /// require mutual TLS.
    pub fn identity(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        self.identity = Some((chain, key));
        self
    }

    /// [`Builder::identity`] from PEM files.
    ///
    /// # Errors
    /// [`TlsError::Pem`] if a file cannot be read or parsed.
    pub fn identity_pem_files(
        self,
        chain: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
    ) -> Result<Self, TlsError> {
        let chain = tls::load_certificates_pem(chain)?;
        let key = tls::load_private_key_pem(key)?;
        Ok(self.identity(chain, key))
    }

    /// The name the server's certificate must carry. By default it is the
    /// host of the address given to [`Builder::connect`], as tonic takes the
    /// domain from the URI: `vm.example:4443` checks `vm.example`,
    /// `127.0.0.1:4443` checks the IP address (which the certificate must
    /// then carry as an IP subjectAltName; brpc's dev certificates carry
    /// `127.0.0.1` and `::1`). Set it when dialling by address a server whose
    /// certificate names a host.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Time allowed for the QUIC/TLS handshake and Hello (default 10 s).
    /// When attempts that retry (reconnect, [`Builder::connect_with_retry`])
    /// run out of it, each next one gets twice as long, up to 4× this: a
    /// server busy with a whole fleet's handshakes finishes the one it
    /// started instead of seeing it abandoned and started again.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Whether to reconnect when the connection drops (default true).
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Reconnect delays: exponential from `min` to `max`, each with up to 100%
    /// random jitter added (defaults 100 ms and 5 s), so a fleet that lost its
    /// server does not return all at once. After the server refused a
    /// handshake as busy, the [busy backoff](Builder::busy_backoff) applies
    /// instead. With [several servers](Builder::connect_any), a delay comes
    /// only after every server failed in a row. A connection lost within
    /// `max` of being made does not start the delays again from `min`: they
    /// go on growing, so a server that closes each new connection is not
    /// redialled at `min` for ever.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Delays after the server refused a handshake for load
    /// ([`ConnectError::Busy`]): `min` for the first, fifteen times as long
    /// for each next one up to `max`, each with up to 100% random jitter
    /// added (defaults 1 s and 30 s: 1–2 s, then 15–30 s, then 30–60 s),
    /// used instead of the [reconnect backoff](Builder::reconnect_backoff)
    /// for the next attempt. A server refuses for load only when more
    /// clients wait for a handshake than it queues (64 per handshake slot,
    /// or one waited half its Hello limit), or when at its connection limit
    /// with no handshake slot free: a whole fleet coming back at once.
    /// Retrying it at the reconnect backoff's pace (every 5–10 s per client)
    /// would keep it busy refusing (and the clients busy starting
    /// handshakes) instead of finishing the handshakes it admitted.
    ///
    /// The refusal does not say why: a server shutting down refuses new
    /// connections the same way. So the first delay is short (a client
    /// that reconnects while its server restarts is back within seconds)
    /// and the second long (a server still refusing is swamped). After the
    /// server ended the connection with GoAway (a graceful shutdown, which
    /// refuses for as long as its calls take), or closed it as going away
    /// (`Server::close`, or a dropped `Server`, whose endpoint refuses while
    /// it drains), the first four delays double
    /// from `min` instead (1–2 s, 2–4 s, 4–8 s, 8–16 s with the defaults),
    /// then the long ones follow (15–30 s, 30–60 s): the client comes back
    /// soon after the server's replacement starts. (100 000 agents sent
    /// away by a graceful shutdown with a 5 s grace made 4.9 attempts each
    /// and were all back 119 s after the replacement started, on the same
    /// machine as below.)
    ///
    /// With [several servers](Builder::connect_any), the next server is
    /// tried at once after a refusal, and the busy delay comes after every
    /// one of them failed in a row, once for each that refused as busy (so
    /// a round can wait several times `max`): a fleet whose servers are
    /// all swamped brings each of them no more attempts than with one
    /// server.
    ///
    /// Measured on one 2-core machine with the agents on it (BENCHMARKS.md,
    /// "The busy backoff grows fifteen-fold"), 100 000 agents reconnecting
    /// after their server was killed made 3.9–4.2 attempts each with these
    /// defaults, against 7.3–7.7 when each delay only doubled and 2.6 with
    /// `busy_backoff(15 s, 30 s)`; 1.3–2.4%, 5.9–6.9% and 0.1% of the
    /// server's calls to the agents already back failed or got no answer
    /// within 5 s (the server's socket dropped 0.7–0.9, 1.8–2.1 and 0.14
    /// million datagrams); all were back after 163–168 s, 200–220 s and
    /// 155 s. For fleets far larger than their server's queue (tens of
    /// thousands of agents per server), a longer first delay wastes less
    /// still, at a cost: such agents also wait that long after a refusal by
    /// a server shutting down.
    pub fn busy_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.busy_backoff_min = min;
        self.busy_backoff_max = max.max(min);
        self
    }

    /// The local address the client's UDP socket binds to (default: the
    /// unspecified address of the server's family, port 0, and the OS picks
    /// the source). E.g. spread many agents on one host over several source
    /// addresses, or pick the interface a multi-homed host dials from. It
    /// must be of the server's address family (an IPv4 socket cannot dial
    /// an IPv6 server: connecting fails with [`ConnectError::Connect`]), and
    /// it does not apply to [`connect_unix`](Self::connect_unix).
    pub fn local_address(mut self, addr: SocketAddr) -> Self {
        self.local_address = Some(addr);
        self
    }

    /// Dials `addr`, completes TLS and Hello, and starts serving this side's
    /// services. The first connection must succeed; later drops reconnect.
    /// For an agent that may start before its server, see
    /// [`Builder::connect_with_retry`] and [`Builder::connect_lazy`].
    ///
    /// # Errors
    /// [`ConnectError`] saying which step failed.
    pub async fn connect<A>(self, addr: A) -> Result<Client, ConnectError>
    where
        A: tokio::net::ToSocketAddrs + std::fmt::Display,
    {
        let shared = self.prepare(&addr.to_string(), false).await?;
        let peer = connect_once(&shared, shared.connect_timeout, false).await?;
        Ok(Client::start(shared, Some(peer)))
    }

    /// Like [`Builder::connect`], but a server that is not there yet (its
    /// name does not resolve yet, nothing answers at its address, or it
    /// refuses for now: at its connection limit, going away) is retried with
    /// the reconnect backoff until it answers. Returns once connected, or
    /// with the first error that retrying cannot fix: a certificate that
    /// does not verify, a refusal by the server's authorization, an unusable
    /// configuration.
    ///
    /// # Errors
    /// [`ConnectError`] that will not go away by waiting.
    pub async fn connect_with_retry<A>(self, addr: A) -> Result<Client, ConnectError>
    where
        A: tokio::net::ToSocketAddrs + std::fmt::Display,
    {
        let shared = self.prepare(&addr.to_string(), true).await?;
        let mut delays = Delays::new(&shared);
        let mut timeout = shared.connect_timeout;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // Looked up again before each attempt but the first (just done).
            let result = connect_once(&shared, timeout, attempt > 1).await;
            timeout = grown_timeout(&shared, timeout, &result);
            let delay = delays.after(&result);
            match result {
                Ok(peer) => return Ok(Client::start(shared, Some(peer))),
                Err(e) if e.is_final(shared.retry_certificate_mismatch) => return Err(e),
                Err(e) => {
                    tracing::info!(attempt, error = %e, "server not reachable yet; retrying");
                    shared.set_state(ClientState::Reconnecting {
                        attempt,
                        last_error: Disconnect::Connect(Arc::new(e)),
                    });
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Returns a client at once and connects in the background (as tonic's
    /// `connect_lazy`), retrying with the reconnect backoff. Until connected
    /// its state is [`ClientState::Reconnecting`] and calls fail with
    /// `UNAVAILABLE`, or wait with [`Channel::wait_for_ready`]. A server
    /// name that does not resolve yet is looked up again before each
    /// attempt (its local socket is then bound to `[::]`, which on Linux
    /// reaches IPv4 servers too, unless [`Builder::local_address`] says
    /// otherwise). A final error (see [`Builder::connect_with_retry`])
    /// closes it.
    ///
    /// # Errors
    /// [`ConnectError`] for what is wrong before dialling: no trust, TLS
    /// configuration, an address no lookup can complete (no port), no
    /// local socket.
    pub async fn connect_lazy<A>(self, addr: A) -> Result<Client, ConnectError>
    where
        A: tokio::net::ToSocketAddrs + std::fmt::Display,
    {
        // Its state is already `Reconnecting`, not connected yet.
        let shared = self.prepare(&addr.to_string(), true).await?;
        Ok(Client::start(shared, None))
    }

    /// Everything up to the first dial: trust, address, local endpoint.
    /// With `wait_for_name`, a name that does not resolve yet is looked up
    /// again when dialled.
    async fn prepare(self, addr: &str, wait_for_name: bool) -> Result<Arc<Shared>, ConnectError> {
        let server = resolve(addr, &self.resolver, wait_for_name).await?;
        self.prepare_all(vec![server])
    }

    /// [`Builder::prepare`] for several servers, dialled in turn.
    fn prepare_all(mut self, servers: Vec<QuicServer>) -> Result<Arc<Shared>, ConnectError> {
        let roots = self.roots.clone().ok_or(ConnectError::NoTrust)?;
        // Not resolved yet: `[::]`, which on Linux reaches IPv4 too.
        let first = servers.first().map_or_else(
            || SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            |server| {
                server
                    .remote()
                    .unwrap_or(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
            },
        );
        let crypto = tls::client_crypto_with_identity(roots, self.identity.take())?;
        let mut config = quinn::ClientConfig::new(crypto);
        config.transport_config(brpc_core::conn::transport_config(&self.options.transport));
        let local = self.local_address.unwrap_or_else(|| {
            SocketAddr::new(
                if first.is_ipv6() {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                },
                0,
            )
        });
        let mut endpoint =
            match brpc_core::conn::endpoint(local, None, &self.options.transport, None) {
                Ok(endpoint) => endpoint,
                // No IPv6 here: a server not resolved yet is dialled over IPv4.
                Err(_)
                    if self.local_address.is_none()
                        && servers.first().is_some_and(|s| s.remote().is_none()) =>
                {
                    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
                    brpc_core::conn::endpoint(v4, None, &self.options.transport, None)
                        .map_err(ConnectError::Endpoint)?
                }
                Err(e) => return Err(ConnectError::Endpoint(e)),
            };
        endpoint.set_default_client_config(config);
        let servers = servers
            .into_iter()
            .map(|mut server| {
                if let Some(name) = &self.server_name {
                    server.server_name.clone_from(name);
                }
                server
            })
            .collect();
        Ok(self.into_shared(Dial::Quic {
            endpoint,
            servers,
            turn: AtomicUsize::new(0),
        }))
    }

    /// Like [`Builder::connect`], with several servers that can each serve
    /// this client (the nodes of a cluster, say): the first that answers
    /// is used. When the connection is lost, each reconnect attempt dials
    /// the next server in turn, so a client whose server went away fails
    /// over to another one. A failed attempt moves on to the next server at
    /// once; the [reconnect](Builder::reconnect_backoff) or
    /// [busy](Builder::busy_backoff) backoff's delay comes only after every
    /// server failed in a row (a busy delay for each server that refused as
    /// busy). The addresses must be of one family (the
    /// client has one UDP socket); each is checked against its own host
    /// name unless [`Builder::server_name`] is set.
    ///
    /// # Errors
    /// [`ConnectError`] of the last server tried when none of them let this
    /// client in (each is tried once); [`ConnectError::Resolve`] when an
    /// address does not resolve or none is given. Later, while
    /// reconnecting, the client gives up only when every server in a row
    /// failed with an error retrying cannot fix.
    pub async fn connect_any<I>(self, addrs: I) -> Result<Client, ConnectError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut servers = Vec::new();
        for addr in addrs {
            servers.push(resolve(addr.as_ref(), &self.resolver, false).await?);
        }
        if servers.is_empty() {
            return Err(ConnectError::Resolve {
                addr: String::new(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no server address given",
                ),
            });
        }
        let tries = servers.len();
        let shared = self.prepare_all(servers)?;
        let mut last = None;
        for _ in 0..tries {
            // Even an error that retrying cannot fix (a certificate one
            // server gets wrong, a refusal) leaves the other servers to try.
            match connect_once(&shared, shared.connect_timeout, false).await {
                Ok(peer) => return Ok(Client::start(shared, Some(peer))),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ConnectError::NoTrust))
    }

    /// Connects to the brpc server (or plain ttrpc server) listening on the
    /// Unix socket at `path`: ttrpc over a byte stream, with no TLS (the
    /// socket file's permissions and the server's credential check guard
    /// it). Everything else is as over QUIC: the services this client hosts
    /// (a brpc server may call them; a plain ttrpc one cannot), its name and
    /// labels sent in Hello, reconnect with backoff, shutdown.
    ///
    /// # Errors
    /// [`ConnectError::Unix`] if the socket cannot be connected to.
    pub async fn connect_unix(
        self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<Client, ConnectError> {
        let shared = self.into_shared(Dial::Unix(path.as_ref().to_path_buf()));
        let peer = connect_once(&shared, shared.connect_timeout, false).await?;
        Ok(Client::start(shared, Some(peer)))
    }

    fn into_shared(self, dial: Dial) -> Arc<Shared> {
        Arc::new(Shared {
            dial,
            name: self.name,
            labels: self.labels,
            router: self.router,
            connect_timeout: self.connect_timeout,
            limits: self.options.limits,
            receive_window: self.options.transport.receive_window,
            reconnect: self.reconnect,
            backoff: exponential(self.backoff_min, self.backoff_max),
            busy_backoff_min: self.busy_backoff_min,
            busy_backoff_max: self.busy_backoff_max,
            stable_after: self.backoff_max,
            current: watch::Sender::new(None),
            // Not `Closed`: that state is final (see `Shared::set_state`).
            state: watch::Sender::new(ClientState::Reconnecting {
                attempt: 0,
                last_error: Disconnect::NotConnectedYet,
            }),
            closing: watch::Sender::new(false),
            closed_by_app: watch::Sender::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
            last_id: AtomicU64::new(0),
            pinned: self.pinned,
            retry_certificate_mismatch: self.retry_certificate_mismatch,
            buffer: self
                .options
                .limits
                .total_budget(self.options.limits.buffer_per_connection),
        })
    }
}

/// Where and how the client dials.
enum Dial {
    /// QUIC to one of `servers`: the one at `turn` (modulo their number).
    Quic {
        endpoint: Endpoint,
        servers: Vec<QuicServer>,
        turn: AtomicUsize,
    },
    /// A Unix socket (ttrpc over a byte stream).
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dial::Quic { .. } => match self.server() {
                Some(server) => match (server.remote(), &server.lookup) {
                    (Some(remote), _) => write!(f, "{remote}"),
                    (None, Some((name, _))) => f.write_str(name),
                    (None, None) => f.write_str("no address"),
                },
                None => f.write_str("no server"),
            },
            Dial::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The busy backoff's delays: from `min`, each fifteen times the one before
/// up to `max`, with jitter. The first is short, for a client that met its
/// server shutting down as it restarted; the second already long, for a
/// fleet that met its server swamped (BENCHMARKS.md, "Restart storm").
fn busy_delays(min: Duration, max: Duration) -> ExponentialBuilder {
    exponential(min, max).with_factor(15.0)
}

/// Delays from `min`, doubling up to `max`, with jitter, for ever.
fn exponential(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// A server a QUIC client may dial, with the name its certificate must carry.
struct QuicServer {
    /// The address dialled; `None` until a lookup of a name finds one.
    remote: std::sync::Mutex<Option<SocketAddr>>,
    server_name: String,
    /// The address as given, when it names a host, and what looks it up:
    /// asked again before each reconnect, so a name moved to another server
    /// is followed.
    lookup: Option<(String, Resolver)>,
}

impl std::fmt::Debug for QuicServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicServer")
            .field("remote", &self.remote())
            .field("server_name", &self.server_name)
            .field("lookup", &self.lookup.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl QuicServer {
    fn remote(&self) -> Option<SocketAddr> {
        *self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address to dial: looked up first (if the server was given by
    /// name) when `refresh` says so or none was found yet, taking the first
    /// address the local socket (`family`) can reach. A lookup that fails,
    /// or takes longer than `within`, keeps the last address found; with
    /// none, it is the error.
    async fn address(
        &self,
        refresh: bool,
        family: Family,
        within: Duration,
    ) -> Result<SocketAddr, ConnectError> {
        let last = self.remote();
        let (Some((name, resolver)), true) = (&self.lookup, refresh || last.is_none()) else {
            return last.ok_or_else(|| lookup_error(String::new(), None));
        };
        let looked_up = tokio::time::timeout(within, lookup(name, resolver, family))
            .await
            .unwrap_or_else(|_| {
                Err(lookup_error(
                    name.clone(),
                    Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {within:?}"),
                    )),
                ))
            });
        match looked_up {
            Ok(found) => {
                *self.remote.lock().unwrap_or_else(|e| e.into_inner()) = Some(found);
                Ok(found)
            }
            Err(e) => last.ok_or(e).inspect(|_| {
                tracing::debug!(%name, "lookup failed; dialling the last address");
            }),
        }
    }
}

/// Which addresses a local UDP socket can send to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    /// An IPv4 socket: IPv4 addresses only.
    V4,
    /// An IPv6 socket, which on Linux reaches IPv4 addresses too (mapped).
    Any,
}

/// The family of addresses `endpoint`'s socket can reach.
fn endpoint_family(endpoint: &quinn::Endpoint) -> Family {
    match endpoint.local_addr() {
        Ok(local) if local.is_ipv4() => Family::V4,
        _ => Family::Any,
    }
}

/// The first address `resolver` finds for `name` that a socket of
/// `family` can reach.
async fn lookup(
    name: &str,
    resolver: &Resolver,
    family: Family,
) -> Result<SocketAddr, ConnectError> {
    match resolver(name.to_owned()).await {
        Ok(found) => found
            .iter()
            .find(|a| family == Family::Any || a.is_ipv4())
            .copied()
            .ok_or_else(|| {
                let none = if found.is_empty() {
                    "no address"
                } else {
                    "no IPv4 address, and this client's socket is IPv4 (set Builder::local_address to an IPv6 one)"
                };
                lookup_error(
                    name.to_owned(),
                    Some(std::io::Error::new(std::io::ErrorKind::NotFound, none)),
                )
            }),
        Err(source) => Err(lookup_error(name.to_owned(), Some(source))),
    }
}

/// [`ConnectError::Resolve`] for `addr`: the resolver's error, or "no
/// address" when it found none.
fn lookup_error(addr: String, source: Option<std::io::Error>) -> ConnectError {
    ConnectError::Resolve {
        addr,
        source: source
            .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")),
    }
}

/// The server at `addr`: an IP address as it is, a name looked up by
/// `resolver` (its first address), and with `wait_for_name` a name that
/// does not resolve yet kept to be looked up when dialled. An address
/// with no port fails at once: no lookup can complete it.
async fn resolve(
    addr: &str,
    resolver: &Resolver,
    wait_for_name: bool,
) -> Result<QuicServer, ConnectError> {
    let (remote, lookup_by) = match addr.parse::<SocketAddr>() {
        Ok(remote) => (Some(remote), None),
        Err(_) if !has_port(addr) => {
            return Err(ConnectError::Resolve {
                addr: addr.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no port: give the address as host:port",
                ),
            });
        }
        Err(_) => match lookup(addr, resolver, Family::Any).await {
            Ok(remote) => (Some(remote), Some((addr.to_owned(), Arc::clone(resolver)))),
            Err(e) if wait_for_name => {
                tracing::info!(error = %e, "server name not found yet; looking it up again when dialling");
                (None, Some((addr.to_owned(), Arc::clone(resolver))))
            }
            Err(e) => return Err(e),
        },
    };
    Ok(QuicServer {
        remote: std::sync::Mutex::new(remote),
        server_name: host_of(addr).to_owned(),
        lookup: lookup_by,
    })
}

/// Whether `addr` ends in a port (`host:port`, `[v6]:port`).
fn has_port(addr: &str) -> bool {
    let port = match addr.strip_prefix('[') {
        Some(rest) => rest.split_once("]:").map(|(_, port)| port),
        None => addr
            .rsplit_once(':')
            .filter(|(host, _)| !host.contains(':'))
            .map(|(_, port)| port),
    };
    port.is_some_and(|port| port.parse::<u16>().is_ok())
}

impl Dial {
    /// The server the next attempt dials (QUIC only).
    fn server(&self) -> Option<&QuicServer> {
        match self {
            Dial::Quic { servers, turn, .. } if !servers.is_empty() => {
                Some(&servers[turn.load(Ordering::Relaxed) % servers.len()])
            }
            _ => None,
        }
    }

    /// How many servers there are to try.
    fn server_count(&self) -> usize {
        match self {
            Dial::Quic { servers, .. } => servers.len().max(1),
            Dial::Unix(_) => 1,
        }
    }

    /// Moves on to the next server (after a failed attempt or a lost
    /// connection); nothing changes with one server.
    fn next_server(&self) {
        if let Dial::Quic { turn, .. } = self {
            turn.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn endpoint(&self) -> Option<&Endpoint> {
        match self {
            Dial::Quic { endpoint, .. } => Some(endpoint),
            Dial::Unix(_) => None,
        }
    }
}

struct Shared {
    dial: Dial,
    name: String,
    labels: Labels,
    router: Router,
    connect_timeout: Duration,
    limits: CallLimits,
    /// Each connection's QUIC receive window.
    receive_window: u64,
    reconnect: bool,
    backoff: ExponentialBuilder,
    /// The busy backoff's shortest and longest delay (see [`busy_delays`]).
    busy_backoff_min: Duration,
    busy_backoff_max: Duration,
    /// How long a connection must last for the next reconnect to start
    /// the backoff again (the backoff's longest delay).
    stable_after: Duration,
    current: watch::Sender<Option<Peer>>,
    state: watch::Sender<ClientState>,
    closing: watch::Sender<bool>,
    /// The application closed the client ([`Client::close`], or its drop):
    /// connections the server sent away close too.
    closed_by_app: watch::Sender<bool>,
    /// A graceful shutdown is draining: do not reconnect.
    stopping: std::sync::atomic::AtomicBool,
    last_id: AtomicU64,
    pinned: bool,
    retry_certificate_mismatch: bool,
    /// What frames received from the server are charged to, across reconnects.
    buffer: MemoryBudget,
}

impl Shared {
    fn connected(&self, peer: &Peer) {
        self.last_id
            .store(peer.connection_id().0, Ordering::Relaxed);
        self.current.send_replace(Some(peer.clone()));
        self.set_state(ClientState::Connected {
            connection_id: peer.connection_id(),
        });
    }

    /// Moves to `state`, unless the client is closed: `Closed` is final,
    /// with the first reason given for it, so a supervisor step racing
    /// [`Client::close`] cannot write over it.
    fn set_state(&self, state: ClientState) {
        self.state.send_if_modified(|current| {
            if matches!(current, ClientState::Closed { .. }) {
                return false;
            }
            *current = state;
            true
        });
    }

    fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Closed for good for `reason`: no connection and no reconnect, and
    /// calls waiting for a connection (wait-for-ready) fail at once.
    fn closed(&self, reason: Disconnect) {
        self.closing.send_replace(true);
        self.current.send_replace(None);
        self.set_state(ClientState::Closed { reason });
    }

    async fn closing(&self) {
        let _ = self.closing.subscribe().wait_for(|c| *c).await;
    }
}

/// The host part of an address as given to `connect`: `name:port`,
/// `1.2.3.4:port` or `[::1]:port`.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[')
        && let Some((host, _)) = rest.split_once(']')
    {
        return host;
    }
    match addr.rsplit_once(':') {
        Some((host, _)) if !host.contains(':') => host,
        _ => addr,
    }
}

/// A failed handshake; a certificate issued for another name says which
/// name was checked and how to change it.
fn handshake_error(error: quinn::ConnectionError, server_name: &str, pinned: bool) -> ConnectError {
    let reason = match &error {
        quinn::ConnectionError::TransportError(e) => e.reason.as_str(),
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            return ConnectError::Busy(error);
        }
        _ => "",
    };
    // A certificate other than the pinned one fails as a bad signature (the
    // same issuer name, another key) or an unknown issuer.
    if pinned && (reason.contains("BadSignature") || reason.contains("UnknownIssuer")) {
        return ConnectError::NotPinned(error);
    }
    if reason.contains("not valid for name") {
        ConnectError::CertificateName {
            server_name: server_name.to_owned(),
            is_ip: server_name.parse::<IpAddr>().is_ok(),
            source: error,
        }
    } else {
        ConnectError::Handshake(error)
    }
}

/// One connection attempt: QUIC + TLS handshake and Hello, within the limit.
/// What this client says in Hello.
fn hello(shared: &Shared) -> HelloRequest {
    HelloRequest {
        protocol_version: session::PROTOCOL_VERSION,
        name: shared.name.clone(),
        labels: shared
            .labels
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect(),
    }
}

/// A failed attempt moves on to the next server, if there are several.
///
/// `timeout` bounds the handshake and Hello: the connect timeout, grown by
/// [`grown_timeout`] after attempts that ran out of time.
/// One attempt to connect, to the next server; with `refresh`, its name
/// (if it has one) is looked up again first.
async fn connect_once(
    shared: &Shared,
    timeout: Duration,
    refresh: bool,
) -> Result<Peer, ConnectError> {
    let result = Box::pin(connect_attempt(shared, timeout, refresh)).await;
    if result.is_err() {
        shared.dial.next_server();
    }
    result
}

/// The delays between connection attempts: the reconnect backoff's, or the
/// busy backoff's after a server refused a handshake for load.
///
/// With several servers, attempts go round them in turn and a failed one
/// moves on to the next server at once: the delay comes after a whole
/// round failed, so a client whose server is busy or gone fails over
/// without waiting. A round in which servers refused as busy waits one
/// busy delay for each of them, so a fleet whose servers are all swamped
/// brings each no more attempts than with one server. With one server a
/// round is one attempt.
///
/// After the server ended the connection with GoAway (a graceful shutdown:
/// it refuses new connections until it is gone, as a busy one does), the
/// first [`GOING_AWAY_DOUBLINGS`] busy delays double from the shortest
/// instead (1-2 s, 2-4 s, 4-8 s, 8-16 s with the defaults), so the client
/// comes back soon after the server's replacement starts; the fifteen-fold
/// delays' long ones follow (a replacement still refusing is swamped).
struct Delays {
    normal: backon::ExponentialBackoff,
    busy: backon::ExponentialBackoff,
    /// The doubling delays after a GoAway, started again at each.
    busy_doubling: ExponentialBuilder,
    /// The doubling delays after a GoAway, while any are left.
    going_away: Option<(backon::ExponentialBackoff, usize)>,
    /// How many servers a round tries.
    servers: usize,
    /// Attempts failed since the last delay, and how many of them a server
    /// refused for load.
    failed: usize,
    refused_busy: u32,
}

/// How many busy delays double after a GoAway before the fifteen-fold
/// ones' long delays take over: with the defaults, 15-30 s of waiting in
/// all, for a graceful shutdown's grace.
const GOING_AWAY_DOUBLINGS: usize = 4;

impl Delays {
    fn new(shared: &Shared) -> Self {
        Self::with(
            shared.backoff,
            shared.busy_backoff_min,
            shared.busy_backoff_max,
            shared.dial.server_count(),
        )
    }

    fn with(
        normal: ExponentialBuilder,
        busy_min: Duration,
        busy_max: Duration,
        servers: usize,
    ) -> Self {
        Delays {
            normal: normal.build(),
            busy: busy_delays(busy_min, busy_max).build(),
            busy_doubling: exponential(busy_min, busy_max),
            going_away: None,
            servers,
            failed: 0,
            refused_busy: 0,
        }
    }

    /// The delay before the first attempt of a reconnect, after a
    /// connection that ended with the server `going_away` or not; a round
    /// starts.
    fn first(&mut self, going_away: bool) -> Duration {
        self.failed = 0;
        self.refused_busy = 0;
        self.going_away = going_away.then(|| (self.busy_doubling.build(), GOING_AWAY_DOUBLINGS));
        self.normal.next().unwrap_or(Duration::from_secs(5))
    }

    /// The next busy delay: a doubling one after a GoAway while any are
    /// left, then the fifteen-fold ones from their second (long) delay on.
    fn next_busy(&mut self) -> Option<Duration> {
        if let Some((doubling, left)) = &mut self.going_away {
            *left -= 1;
            let delay = doubling.next();
            if *left == 0 {
                self.going_away = None;
                // The fifteen-fold delays go on from their long ones.
                self.busy.next();
            }
            return delay;
        }
        self.busy.next()
    }

    /// The delay before the attempt after one that ended with `result`:
    /// none while the round has servers left to try.
    fn after(&mut self, result: &Result<Peer, ConnectError>) -> Duration {
        let refused_busy = match result {
            // The reconnect ends; the next starts its round with `first`.
            Ok(_) => 0,
            Err(e) => {
                self.failed += 1;
                if matches!(e, ConnectError::Busy(_)) {
                    self.refused_busy += 1;
                }
                if self.failed < self.servers {
                    return Duration::ZERO;
                }
                self.failed = 0;
                std::mem::take(&mut self.refused_busy)
            }
        };
        match refused_busy {
            0 => self.normal.next(),
            n => self.next_busy().map(|delay| delay.saturating_mul(n)),
        }
        .unwrap_or(Duration::from_secs(5))
    }
}

/// The time the next attempt gets after one that ended with `result`: a
/// server so busy that handshakes time out (a fleet reconnecting at once)
/// gets twice as long each time, up to four times the connect timeout, so
/// the handshake it started is not thrown away and started again.
fn grown_timeout(
    shared: &Shared,
    timeout: Duration,
    result: &Result<Peer, ConnectError>,
) -> Duration {
    match result {
        Err(ConnectError::Timeout { .. }) => (timeout * 2).min(shared.connect_timeout * 4),
        _ => timeout,
    }
}

async fn connect_attempt(
    shared: &Shared,
    timeout: Duration,
    refresh: bool,
) -> Result<Peer, ConnectError> {
    let (endpoint, remote, server_name) = match (&shared.dial, shared.dial.server()) {
        (Dial::Quic { endpoint, .. }, Some(server)) => (
            endpoint,
            server
                .address(refresh, endpoint_family(endpoint), timeout)
                .await?,
            server.server_name.as_str(),
        ),
        (Dial::Quic { .. }, None) => {
            return Err(ConnectError::Resolve {
                addr: String::new(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no server address given",
                ),
            });
        }
        (Dial::Unix(path), _) => {
            let unix_error = |source| ConnectError::Unix {
                path: path.clone(),
                source,
            };
            let dialled = async {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(unix_error)?;
                Ok(
                    bytestream::dial(stream, hello(shared), shared.limits, shared.buffer.clone())
                        .await,
                )
            };
            return tokio::time::timeout(timeout, dialled)
                .await
                .unwrap_or_else(|_| {
                    Err(unix_error(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {timeout:?}"),
                    )))
                });
        }
    };
    let session = async {
        let connection = endpoint
            .connect(remote, server_name)?
            .await
            .map_err(|e| handshake_error(e, server_name, shared.pinned))?;
        // A handle for the Hello call alone; the one kept is made with
        // the id Hello assigns.
        let greeter = session::greeter(
            connection.clone(),
            Side::Dialer,
            shared.limits,
            shared.buffer.clone(),
        );
        let answer = match session::send_hello(&greeter, hello(shared)).await {
            Ok(answer) => answer,
            Err(status) => {
                // A connection that closed says more than the lost Hello: under
                // TLS 1.3 a server refusing our certificate does so only now.
                let refused = matches!(
                    status.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                );
                return Err(match connection.close_reason() {
                    Some(end @ quinn::ConnectionError::ApplicationClosed(_)) if !refused => {
                        let end = brpc_core::ConnectionError::from_quinn_closed(&end);
                        ConnectError::Refused {
                            code: end.code().unwrap_or(u32::MAX),
                            reason: end.to_string(),
                        }
                    }
                    Some(
                        e @ (quinn::ConnectionError::TransportError(_)
                        | quinn::ConnectionError::ConnectionClosed(_)),
                    ) => ConnectError::Handshake(e),
                    _ => ConnectError::Hello(status),
                });
            }
        };
        Ok::<_, ConnectError>((connection, answer))
    };
    let (connection, answer) =
        tokio::time::timeout(timeout, session)
            .await
            .map_err(|_| ConnectError::Timeout {
                addr: remote,
                after: timeout,
            })??;
    let info = PeerInfo {
        connection_id: ConnectionId(answer.connection_id),
        name: String::new(),
        labels: Labels::new(),
        connected_at: SystemTime::now(),
        identity: PeerIdentity::of_connection(&connection),
    };
    Ok(Peer::new(
        connection,
        Side::Dialer,
        info,
        shared.limits,
        shared.buffer.clone(),
        Some(shared.receive_window),
    ))
}

/// How one connection's life ended.
enum Ended {
    /// The client is closing.
    Closing,
    /// Dropped or going away: reconnect.
    Lost(Disconnect),
    /// The server refused this client: do not come back.
    Refused(Disconnect),
}

/// Serves one connection until it ends. On GoAway, the old connection keeps
/// serving its calls in flight in the background while the client reconnects.
async fn run_connection(shared: &Shared, peer: &Peer) -> Ended {
    let span =
        tracing::info_span!("brpc.connection", id = %peer.connection_id(), server = %shared.dial);
    let mut serving =
        Box::pin(brpc_core::serve(peer.clone(), shared.router.clone()).instrument(span));
    tokio::select! {
        () = &mut serving => {}
        () = peer.going_away() => {
            // It serves on until the server closes it, or until the
            // application closes the client (or drops it): then it goes
            // too, like the current connection. A client that stops for
            // another reason (it does not reconnect, or is shutting down)
            // lets its calls in flight finish, as GoAway promises.
            let mut closed = shared.closed_by_app.subscribe();
            let old = peer.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = serving => {}
                    _ = closed.wait_for(|closed| *closed) => {
                        old.close(codes::CONN_NORMAL, "client closed");
                    }
                }
            });
            let reason = peer.going_away_reason().unwrap_or_default();
            return Ended::Lost(Disconnect::GoAway(reason));
        }
        () = shared.closing() => return Ended::Closing,
    }
    // Serving stops when the connection ends: how it ended is known (or
    // about to be).
    let end = tokio::select! {
        () = shared.closing() => return Ended::Closing,
        end = tokio::time::timeout(Duration::from_secs(5), peer.closed()) => end,
    };
    let Ok(end) = end else {
        // Serving stopped and the connection does not say it ended: end it
        // here, and reconnect.
        peer.close(codes::CONN_NORMAL, "the connection stopped being served");
        return Ended::Lost(Disconnect::Connection(peer.closed().await));
    };
    if end.is_unauthorized() {
        Ended::Refused(Disconnect::Connection(end))
    } else if end.is_local() && shared.is_closing() {
        Ended::Closing
    } else {
        // Lost, or closed here by someone other than the client (its
        // peer handle's `close`): the client reconnects.
        Ended::Lost(Disconnect::Connection(end))
    }
}

async fn supervise(shared: Arc<Shared>, first: Option<Peer>) {
    let mut delays = Delays::new(&shared);
    let mut peer = match first {
        Some(peer) => peer,
        None => match reconnect(&shared, true, false, &mut delays).await {
            Some(peer) => peer,
            None => return,
        },
    };
    loop {
        let started = tokio::time::Instant::now();
        let reason = match run_connection(&shared, &peer).await {
            Ended::Closing => return,
            Ended::Refused(reason) => {
                shared.closed(reason);
                return;
            }
            Ended::Lost(reason) => reason,
        };
        shared.current.send_replace(None);
        tracing::info!(%reason, "brpc connection lost");
        let going_away = reason.is_going_away();
        // With several servers, the first attempt goes to the next one.
        shared.dial.next_server();
        if !shared.reconnect || shared.is_closing() || shared.stopping.load(Ordering::SeqCst) {
            shared.closed(reason);
            return;
        }
        shared.set_state(ClientState::Reconnecting {
            attempt: 0,
            last_error: reason,
        });
        // A connection that lasted starts the backoff again from its
        // shortest delay; one lost soon after it was made (a server that
        // closes each new connection) goes on from where the last
        // reconnect left it, so a flapping server is not redialled at the
        // shortest delay for ever.
        if started.elapsed() >= shared.stable_after {
            delays = Delays::new(&shared);
        }
        peer = match reconnect(&shared, false, going_away, &mut delays).await {
            Some(peer) => peer,
            None => return,
        };
    }
}

/// Dials until connected (`None`: the client closed, or an error retrying
/// cannot fix closed it), waiting `delays` between attempts. With
/// `immediately`, the first attempt is not delayed; `going_away`: the last
/// connection ended with the server going away.
async fn reconnect(
    shared: &Shared,
    immediately: bool,
    going_away: bool,
    delays: &mut Delays,
) -> Option<Peer> {
    let mut attempt = 0u32;
    // Errors retrying cannot fix, in a row: with several servers, the
    // client gives up only once every one of them failed that way.
    let mut finals = 0;
    let mut timeout = shared.connect_timeout;
    let mut delay = if immediately {
        Duration::ZERO
    } else {
        delays.first(going_away)
    };
    let peer = loop {
        if !(immediately && attempt == 0) {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shared.closing() => return None,
            }
        }
        attempt += 1;
        // The address is looked up again (not on a first connect, which just
        // did): a name may have moved to another server meanwhile.
        let refresh = !(immediately && attempt == 1);
        let result = tokio::select! {
            result = connect_once(shared, timeout, refresh) => result,
            () = shared.closing() => return None,
        };
        timeout = grown_timeout(shared, timeout, &result);
        delay = delays.after(&result);
        match result {
            Ok(peer) => break peer,
            Err(e)
                if e.is_final(shared.retry_certificate_mismatch) && {
                    finals += 1;
                    finals >= shared.dial.server_count()
                } =>
            {
                tracing::warn!(error = %e, "giving up: retrying cannot fix this");
                shared.closed(Disconnect::Connect(Arc::new(e)));
                return None;
            }
            Err(e) => {
                if !e.is_final(shared.retry_certificate_mismatch) {
                    finals = 0;
                }
                tracing::debug!(attempt, error = %e, "reconnect failed");
                shared.set_state(ClientState::Reconnecting {
                    attempt,
                    last_error: Disconnect::Connect(Arc::new(e)),
                });
            }
        }
    };
    tracing::info!(id = %peer.connection_id(), attempt, "brpc connected");
    shared.connected(&peer);
    // `Client::close` ran while this connection was being made: it must
    // not stay current (and open) after the client said it is closed.
    if shared.is_closing() {
        peer.close(codes::CONN_NORMAL, "client closed");
        shared.closed(Disconnect::ClientClosed);
        return None;
    }
    Some(peer)
}

/// A brpc client: one connection to the server at a time, re-established when
/// it drops. Dropping the client closes it.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use brpc_client::{Client, ClientState};
/// let client = Client::builder()
///     .name("agent-7")
///     .label("region", "eu")
///     .pin_certificate_file("server.pem")?
///     // .add_service(AgentServer::new(MyAgent))
///     .connect_with_retry("control.example:4433")
///     .await?;
/// // let mut control = ControlClient::new(client.channel());
/// let mut state = client.watch_state();
/// while state.changed().await.is_ok() {
///     if let ClientState::Reconnecting { attempt, last_error } = &*state.borrow() {
///         println!("reconnecting ({attempt}): {last_error}");
///     }
/// }
/// # Ok(()) }
/// ```
pub struct Client {
    shared: Arc<Shared>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.shared.name)
            .field("server", &self.shared.dial.to_string())
            .field("state", &*self.shared.state.borrow())
            .finish()
    }
}

impl Client {
    fn start(shared: Arc<Shared>, first: Option<Peer>) -> Client {
        if let Some(peer) = &first {
            shared.connected(peer);
        }
        let supervisor = tokio::spawn(supervise(shared.clone(), first));
        Client { shared, supervisor }
    }

    /// A builder with defaults: no trust configured, 10 s connect limit,
    /// keep-alive 3 s, idle timeout 10 s, reconnect with 100 ms–5 s backoff.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A channel to call the server's services: `GreeterClient::new(client.channel())`.
    /// It follows reconnects; while disconnected its calls fail with
    /// `UNAVAILABLE`, or wait with [`Channel::wait_for_ready`].
    pub fn channel(&self) -> Channel {
        Channel::follow(
            self.shared.current.subscribe(),
            self.shared.closing.subscribe(),
        )
    }

    /// The handle of the current connection's server end, if connected.
    pub fn peer(&self) -> Option<Peer> {
        self.shared.current.borrow().clone()
    }

    /// The connection id the server assigned to the current connection (or to
    /// the last one, while reconnecting; see [`Client::state`]).
    pub fn connection_id(&self) -> ConnectionId {
        ConnectionId(self.shared.last_id.load(Ordering::Relaxed))
    }

    /// Where the connection stands now.
    pub fn state(&self) -> ClientState {
        self.shared.state.borrow().clone()
    }

    /// A watch of [`ClientState`] changes.
    pub fn watch_state(&self) -> watch::Receiver<ClientState> {
        self.shared.state.subscribe()
    }

    /// The name this client announces.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The labels this client announces.
    pub fn labels(&self) -> &Labels {
        &self.shared.labels
    }

    /// The local UDP address.
    ///
    /// # Errors
    /// The OS error; `Unsupported` for a client on a Unix socket.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp_endpoint()?.local_addr()
    }

    fn udp_endpoint(&self) -> std::io::Result<&Endpoint> {
        self.shared.dial.endpoint().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a client on a Unix socket has no UDP endpoint",
            )
        })
    }

    /// Moves the client to a new UDP socket (a new local address). The QUIC
    /// connection migrates: it keeps its id and its calls in flight, and the
    /// server sees the new address.
    ///
    /// # Errors
    /// The OS error if the socket cannot be used.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        self.udp_endpoint()?.rebind(socket)
    }

    /// Closes the connection now and stops reconnecting; calls in flight fail.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
        self.shared.closed_by_app.send_replace(true);
        if let Some(peer) = self.shared.current.send_replace(None) {
            peer.close(codes::CONN_NORMAL, "client closed");
        }
        self.shared.set_state(ClientState::Closed {
            reason: Disconnect::ClientClosed,
        });
        self.supervisor.abort();
    }

    /// Graceful close: tell the server this client is going away (it stops
    /// calling it), refuse new calls from the server, let the calls it is
    /// serving finish, then close; all within `grace`. Dropped before it
    /// returns (a timeout around it), it closes the client at once.
    pub async fn shutdown(&self, grace: Duration) {
        /// Closes the client when dropped, however `shutdown` ends.
        struct CloseOnDrop<'a>(&'a Client);
        impl Drop for CloseOnDrop<'_> {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let closing = CloseOnDrop(self);
        // No reconnect from here on, but keep serving until drained: the
        // `closing` signal would stop the serving loop and drop its calls.
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(peer) = self.peer() {
            let deadline = tokio::time::Instant::now() + grace;
            peer.start_draining();
            let notice = session::send_goaway(&peer, "client shutting down");
            let _ = tokio::time::timeout_at(deadline, notice).await;
            let _ = tokio::time::timeout_at(deadline, peer.served_calls_drained()).await;
        }
        drop(closing);
        if let Some(endpoint) = self.shared.dial.endpoint() {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
        if let Some(endpoint) = self.shared.dial.endpoint() {
            endpoint.close(VarInt::from_u32(codes::CONN_NORMAL), b"client dropped");
        }
    }
}

#[cfg(test)]
mod name_tests {
    use super::{has_port, host_of};

    #[test]
    fn the_host_of_an_address_is_the_name_checked() {
        assert_eq!(host_of("vm.example:4443"), "vm.example");
        assert_eq!(host_of("127.0.0.1:4443"), "127.0.0.1");
        assert_eq!(host_of("[::1]:4443"), "::1");
        assert_eq!(host_of("vm"), "vm");
    }

    #[test]
    fn an_address_with_no_port_is_told_apart() {
        for with in ["vm.example:4443", "[::1]:4443", "localhost:1"] {
            assert!(has_port(with), "{with}");
        }
        for without in ["vm.example", "::1", "[::1]", "vm:", "vm:http", "vm:70000"] {
            assert!(!has_port(without), "{without}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delays(servers: usize) -> Delays {
        Delays::with(
            exponential(Duration::from_millis(10), Duration::from_millis(10)),
            Duration::from_secs(1),
            Duration::from_secs(30),
            servers,
        )
    }

    fn busy() -> Result<Peer, ConnectError> {
        Err(ConnectError::Busy(quinn::ConnectionError::TimedOut))
    }

    fn lost() -> Result<Peer, ConnectError> {
        Err(ConnectError::Handshake(quinn::ConnectionError::TimedOut))
    }

    /// The reconnect delay: 10 ms plus up to 100% jitter.
    fn is_normal(d: Duration) -> bool {
        (Duration::from_millis(10)..=Duration::from_millis(20)).contains(&d)
    }

    /// Within `[secs, 2 × secs]`: a busy delay of `secs` with its jitter.
    fn within(d: Duration, secs: u64) -> bool {
        (Duration::from_secs(secs)..=Duration::from_secs(2 * secs)).contains(&d)
    }

    fn is_busy(d: Duration) -> bool {
        within(d, 1)
    }

    #[test]
    fn the_default_busy_backoff_is_short_once_then_long() {
        let defaults = Builder::default();
        let mut delays = busy_delays(defaults.busy_backoff_min, defaults.busy_backoff_max).build();
        let secs = |low, high| Duration::from_secs(low)..=Duration::from_secs(high);
        for expected in [secs(1, 2), secs(15, 30), secs(30, 60), secs(30, 60)] {
            let delay = delays.next().expect("for ever");
            assert!(expected.contains(&delay), "{delay:?} not in {expected:?}");
        }
    }

    #[test]
    fn one_server_waits_after_each_failed_attempt() {
        let mut d = delays(1);
        assert!(is_busy(d.after(&busy())));
        assert!(is_normal(d.after(&lost())));
        // The busy delays grow fifteen-fold.
        assert!(within(d.after(&busy()), 15));
        assert!(within(d.after(&busy()), 30));
    }

    #[test]
    fn after_a_goaway_four_busy_delays_double_then_the_long_ones_follow() {
        let mut d = delays(1);
        assert!(is_normal(d.first(true)));
        for secs in [1, 2, 4, 8, 15, 30, 30] {
            assert!(within(d.after(&busy()), secs), "{secs} s");
        }
        // Each GoAway starts the doubling again; a reconnect after a
        // connection lost otherwise has the fifteen-fold delays.
        assert!(is_normal(d.first(true)));
        assert!(within(d.after(&busy()), 1));
        assert!(within(d.after(&busy()), 2));
        let mut d = delays(1);
        assert!(is_normal(d.first(false)));
        assert!(within(d.after(&busy()), 1));
        assert!(within(d.after(&busy()), 15));
    }

    #[test]
    fn a_round_of_busy_servers_waits_a_busy_delay_for_each() {
        let mut d = delays(3);
        assert_eq!(d.after(&busy()), Duration::ZERO);
        assert_eq!(d.after(&busy()), Duration::ZERO);
        // Three busy refusals: three times the first busy delay (1-2 s).
        assert!(within(d.after(&busy()), 3));
        // Two of three: twice the next one (15-30 s).
        assert_eq!(d.after(&busy()), Duration::ZERO);
        assert_eq!(d.after(&lost()), Duration::ZERO);
        assert!(within(d.after(&busy()), 30));
    }

    #[test]
    fn a_busy_delay_near_the_longest_duration_saturates() {
        let mut d = Delays::with(
            exponential(Duration::from_millis(10), Duration::from_millis(10)),
            Duration::MAX / 2,
            Duration::MAX,
            2,
        );
        assert_eq!(d.after(&busy()), Duration::ZERO);
        assert_eq!(d.after(&busy()), Duration::MAX);
    }

    #[test]
    fn several_servers_wait_only_after_a_whole_round_failed() {
        let mut d = delays(3);
        // A busy server within the round: the next is tried at once, and
        // the round ends with the busy backoff.
        assert_eq!(d.after(&lost()), Duration::ZERO);
        assert_eq!(d.after(&busy()), Duration::ZERO);
        assert!(is_busy(d.after(&lost())));
        // A round with no busy server ends with the reconnect backoff.
        assert_eq!(d.after(&lost()), Duration::ZERO);
        assert_eq!(d.after(&lost()), Duration::ZERO);
        assert!(is_normal(d.after(&lost())));
        // A reconnect starts a new round, whatever the last one left.
        assert_eq!(d.after(&busy()), Duration::ZERO);
        assert!(is_normal(d.first(false)));
        assert_eq!(d.after(&lost()), Duration::ZERO);
        assert_eq!(d.after(&lost()), Duration::ZERO);
        assert!(is_normal(d.after(&lost())));
    }
}
