//! The server: builder, bind, the accept loop and each connection's life
//! (TLS handshake, Hello within a time limit, registry entry, serving, removal).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use brpc_core::conn::UnixCredentials;
use brpc_core::conn::codes;
use brpc_core::session::{self, HelloCall};
use brpc_core::tls::{self, DevCertificate, PeerIdentity, TlsError};
use brpc_core::{
    CallLimits, ConnectionId, ConnectionOptions, Labels, Peer, PeerInfo, Router, Side,
};
use quinn::{Endpoint, Incoming, VarInt};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tonic::Status;
use tracing::Instrument;

use crate::Registry;
use crate::admin::{Admin, AdminAccess, ServerHandler};
use crate::state::{
    Admission, AdmissionCounters, AdmissionEvent, AdmissionStats, Authorize, Counted,
    CredentialCheck, Listed, Shared,
};

/// Why [`Builder::bind`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The address did not resolve to any socket address.
    #[error("cannot resolve bind address: {0}")]
    Address(std::io::Error),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The Unix socket could not be bound.
    #[error("cannot listen on Unix socket {}: {source}", path.display())]
    Unix {
        /// The socket's path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `bind` was called outside a tokio runtime.
    #[error("Server::bind must be called from within a tokio runtime")]
    NoRuntime,
}

enum Certificate {
    Dev(Option<DevCertificate>),
    DevFile(std::path::PathBuf),
    Chain(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

/// Default for [`Builder::max_handshakes`].
const DEFAULT_MAX_HANDSHAKES: usize = 128;

/// Configures and binds a [`Server`].
///
/// ```no_run
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// let server = brpc_server::Server::builder()
///     .certificate_pem_files("server.pem", "server.key")?
///     .client_ca_pem_file("fleet-ca.pem")?
///     .authorize(|admission| {
///         match admission.labels.get("role").map(String::as_str) {
///             Some("agent") => Ok(()),
///             _ => Err(tonic::Status::permission_denied("agents only")),
///         }
///     })
///     .idle_timeout(Duration::from_secs(10))
///     .max_connections(50_000)
///     .bind("0.0.0.0:4433")?;
/// # drop(server); Ok(()) }
/// ```
pub struct Builder {
    router: Router,
    certificate: Certificate,
    hello_timeout: Duration,
    max_hello_size: usize,
    options: ConnectionOptions,
    event_capacity: usize,
    client_roots: Option<RootCertStore>,
    authorize: Option<Authorize>,
    max_connections: usize,
    max_handshakes: usize,
    buffer_total: usize,
    reset_secret: Option<Vec<u8>>,
    unix_check: Option<CredentialCheck>,
    admin: Option<AdminAccess>,
    node_id: u16,
    client_certificate_required: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            router: Router::new(),
            certificate: Certificate::Dev(None),
            hello_timeout: Duration::from_secs(10),
            max_hello_size: session::DEFAULT_MAX_HELLO_SIZE,
            // No keep-alives from the server: its clients send theirs (every
            // 3 s by default), each answered with an ACK, which keeps both
            // sides' idle timers running and NAT bindings open. Pinging from
            // both ends doubled the packets an idle fleet costs the server:
            // at 50 000 agents its socket dropped datagrams faster than it
            // read them (brpc-bench fleet, BENCHMARKS.md).
            options: ConnectionOptions::default().keep_alive_interval(None),
            event_capacity: 4096,
            client_roots: None,
            authorize: None,
            max_connections: 100_000,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            buffer_total: brpc_core::conn::DEFAULT_BUFFER_TOTAL,
            reset_secret: None,
            unix_check: None,
            admin: None,
            node_id: 0,
            client_certificate_required: true,
        }
    }
}

impl Builder {
    brpc_core::builder_setters!();

    /// Serves this self-signed certificate. Without any certificate option the
    /// server generates a fresh one at bind ([`Server::certificate`] gives it
    /// to clients, which pin it).
    pub fn dev_certificate(mut self, certificate: DevCertificate) -> Self {
        self.certificate = Certificate::Dev(Some(certificate));
        self
    }

    /// Serves the dev certificate kept in `path` (PEM; its key beside it as
    /// `path` with the extension `.key`), creating both on the first bind
    /// and reusing them after: a restarted server presents the same
    /// certificate, so agents that pinned `path` reconnect instead of being
    /// refused. See [`DevCertificate::load_or_create`].
    pub fn dev_certificate_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.certificate = Certificate::DevFile(path.into());
        self
    }

    /// Serves a certificate chain (leaf first) and its private key.
    pub fn certificate(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        self.certificate = Certificate::Chain(chain, key);
        self
    }

    /// Serves the chain and key from PEM files.
    ///
    /// # Errors
    /// [`TlsError::Pem`] if a file cannot be read or parsed.
    pub fn certificate_pem_files(
        self,
        chain: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
    ) -> Result<Self, TlsError> {
        let chain = tls::load_certificates_pem(chain)?;
        let key = tls::load_private_key_pem(key)?;
        Ok(self.certificate(chain, key))
    }

    /// Time a new connection has for its TLS handshake and Hello (default 10 s);
    /// then it is closed with `CONN_HELLO_TIMEOUT`.
    pub fn hello_timeout(mut self, timeout: Duration) -> Self {
        self.hello_timeout = timeout;
        self
    }

    /// Largest Hello frame accepted (default 16 KiB: a name and labels; before Hello a connection may make the server hold little more than this).
    pub fn max_hello_size(mut self, bytes: usize) -> Self {
        self.max_hello_size = bytes;
        self
    }

    /// Most bytes of partly received frames the server holds across all its
    /// connections (default 256 MiB, never less than one maximum-size
    /// message); the same rules as [`Builder::buffer_per_connection`] apply
    /// when it is used up. With [`Builder::receive_window`] and
    /// [`Builder::max_connections`] it bounds the memory peers can make the
    /// server use.
    pub fn buffer_total(mut self, bytes: usize) -> Self {
        self.buffer_total = bytes;
        self
    }

    /// The secret the server's stateless-reset key is derived from. By
    /// default the key comes from the TLS private key, so a server restarted
    /// with the same certificate and key is recognised by clients of its
    /// previous run at once (their next packet is answered with a stateless
    /// reset and they reconnect) instead of after their idle timeout. Set
    /// one when the key changes between runs, e.g. with a fresh dev
    /// certificate, and give it to every server that binds this address.
    pub fn reset_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.reset_secret = Some(secret.into());
        self
    }

    /// Requires mutual TLS: every client must present a certificate chain
    /// issued by one of `roots` (and valid now); others fail the handshake.
    /// The verified identity is on the client's [`Peer::identity`].
    pub fn client_ca(mut self, roots: RootCertStore) -> Self {
        self.client_roots = Some(roots);
        self.client_certificate_required = true;
        self
    }

    /// Verifies the certificate a client presents against `roots`, but lets
    /// clients present none: those connect as usual, with no identity. For
    /// a server whose agents use no client certificates while some callers
    /// do (the nodes of a cluster, operators) and are told apart by it
    /// ([`Peer::identity`], [`AdminAccess::identity`]). A certificate that
    /// does not verify still fails the handshake.
    pub fn optional_client_ca(mut self, roots: RootCertStore) -> Self {
        self.client_roots = Some(roots);
        self.client_certificate_required = false;
        self
    }

    /// [`Builder::client_ca`] from a PEM bundle of CA certificates.
    ///
    /// # Errors
    /// [`TlsError`] if the file cannot be read or holds no usable certificate.
    pub fn client_ca_pem_file(self, path: impl AsRef<std::path::Path>) -> Result<Self, TlsError> {
        Ok(self.client_ca(tls::roots_from_pem_file(path)?))
    }

    /// Decides, after Hello and before anything is served, whether a client
    /// may stay. A refusal answers its Hello with the returned status and
    /// closes the connection with `CONN_UNAUTHORIZED` (`0x04`); clients do not
    /// reconnect after that.
    pub fn authorize<F>(mut self, authorize: F) -> Self
    where
        F: Fn(&Admission<'_>) -> Result<(), Status> + Send + Sync + 'static,
    {
        self.authorize = Some(Arc::new(authorize));
        self
    }

    /// Most connections at once (default 100 000). Further clients complete
    /// the QUIC handshake and are closed at once with `CONN_TOO_MANY`
    /// (`0x05`) and the reason "server at its connection limit". Their
    /// handshakes take slots of [`Builder::max_handshakes`] like any other;
    /// with none free they are refused at once with QUIC's
    /// `CONNECTION_REFUSED`, as when the server is busy.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections;
        self
    }

    /// Most TLS handshakes in progress at once (default 128). A handshake is
    /// where a new connection costs the server CPU (key exchange, signing);
    /// when a whole fleet reconnects at once (a restart), starting them all
    /// would leave each one too little CPU to finish before its client gives
    /// up and starts again. Further clients wait their turn, in order: up to
    /// 64 × this many, each for at most half the [`Builder::hello_timeout`].
    /// A client past that is refused at once with QUIC's `CONNECTION_REFUSED`
    /// (no handshake, no CPU spent on it) and retries after its backoff.
    /// Connections already admitted are not affected. At least 1.
    pub fn max_handshakes(mut self, handshakes: usize) -> Self {
        self.max_handshakes = handshakes.max(1);
        self
    }

    /// The node id of this server in a cluster (default 0): the top 16 bits
    /// of every connection id it assigns, so that ids are unique across the
    /// cluster's nodes and name the node an agent is connected to
    /// ([`ConnectionId::node`]). Give every node of a cluster its own.
    pub fn node_id(mut self, node: u16) -> Self {
        self.node_id = node;
        self
    }

    /// Turns on the admin service (`brpc.admin.v1.Admin` and the relay of
    /// calls to agents; see [`crate::admin`]) for the connections `access`
    /// authorises; everyone else gets `PERMISSION_DENIED`. Off by default.
    /// This is what `brpcctl` talks to.
    pub fn admin(mut self, access: AdminAccess) -> Self {
        self.admin = Some(access);
        self
    }

    /// How far a [`Registry::subscribe`] subscriber may fall behind before it
    /// misses events (default 4096).
    pub fn event_capacity(mut self, events: usize) -> Self {
        self.event_capacity = events;
        self
    }

    /// Admits a client on a Unix socket only if `check` passes on its
    /// credentials (`SO_PEERCRED`), e.g.
    /// [`require_same_user`](brpc_core::bytestream::require_same_user); a
    /// refused client's socket is closed at once. Default: any local process
    /// that can open the socket file.
    pub fn require_unix_credentials(
        mut self,
        check: impl Fn(&UnixCredentials) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.unix_check = Some(Arc::new(check));
        self
    }

    /// Starts a server that listens on the Unix socket at `path` only (no
    /// QUIC endpoint; add one by binding instead and calling
    /// [`Server::listen_unix`]). Its clients speak ttrpc: brpc clients
    /// ([`connect_unix`](../brpc_client/struct.Builder.html#method.connect_unix))
    /// and plain ttrpc ones (containerd's Go and Rust ttrpc). They share the
    /// registry, events, limits and shutdown as QUIC clients do. A stale
    /// socket file at `path` is replaced.
    ///
    /// # Errors
    /// [`BindError::Unix`] if the socket cannot be bound,
    /// [`BindError::NoRuntime`] outside a tokio runtime.
    pub fn bind_unix(self, path: impl AsRef<std::path::Path>) -> Result<Server, BindError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BindError::NoRuntime)?;
        let server = self.start(&runtime, None, CertificateDer::from(Vec::new()));
        let path = path.as_ref();
        server.listen_unix(path).map_err(|source| BindError::Unix {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(server)
    }

    /// Binds the UDP socket and starts accepting. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`BindError`] if the address, socket or TLS configuration is unusable.
    pub fn bind(mut self, addr: impl ToSocketAddrs) -> Result<Server, BindError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BindError::NoRuntime)?;
        let addr = addr
            .to_socket_addrs()
            .map_err(BindError::Address)?
            .next()
            .ok_or_else(|| {
                BindError::Address(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "address resolved to nothing",
                ))
            })?;
        let (chain, key) = match std::mem::replace(&mut self.certificate, Certificate::Dev(None)) {
            Certificate::Dev(dev) => {
                let dev = match dev {
                    Some(dev) => dev,
                    None => DevCertificate::generate()?,
                };
                (vec![dev.certificate().clone()], dev.private_key())
            }
            Certificate::DevFile(path) => {
                let dev = DevCertificate::load_or_create(path)?;
                (vec![dev.certificate().clone()], dev.private_key())
            }
            Certificate::Chain(chain, key) => (chain, key),
        };
        let endpoint_config = brpc_core::conn::stable_endpoint_config(match &self.reset_secret {
            Some(secret) => secret,
            None => key.secret_der(),
        });
        let certificate = chain.first().cloned().ok_or_else(|| {
            TlsError::Rustls(rustls::Error::General("empty certificate chain".into()))
        })?;
        let crypto = match self.client_roots.take() {
            Some(roots) => {
                tls::server_crypto_client_auth(chain, key, roots, self.client_certificate_required)?
            }
            None => tls::server_crypto(chain, key)?,
        };
        let mut config = quinn::ServerConfig::with_crypto(crypto);
        config.transport_config(brpc_core::conn::server_transport_config(
            &self.options.transport,
        ));
        let endpoint = {
            let _guard = runtime.enter();
            brpc_core::conn::endpoint(
                addr,
                Some(config),
                &self.options.transport,
                Some(endpoint_config),
            )
            .map_err(|source| BindError::Socket { addr, source })?
        };
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| BindError::Socket { addr, source })?;
        let server = self.start(&runtime, Some(endpoint), certificate);
        tracing::info!(%local_addr, "brpc server listening");
        Ok(server)
    }

    /// The running server, accepting on `endpoint` if there is one.
    fn start(
        self,
        runtime: &tokio::runtime::Handle,
        endpoint: Option<Endpoint>,
        certificate: CertificateDer<'static>,
    ) -> Server {
        let local_addr = endpoint
            .as_ref()
            .and_then(|e| e.local_addr().ok())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let registry = Registry::new(self.event_capacity);
        let admin_access = self.admin;
        // The admin service reads the server's counts (its `Stats`) through
        // a weak reference: the server owns it, not the other way round.
        let shared = Arc::new_cyclic(|shared: &std::sync::Weak<Shared>| Shared {
            endpoint,
            admin: admin_access.map(|access| {
                let server = shared.clone();
                Arc::new(Admin {
                    access,
                    registry: registry.clone(),
                    stats: Box::new(move || server.upgrade().map(|s| s.stats())),
                })
            }),
            registry,
            shutting_down: AtomicBool::new(false),
            router: self.router,
            hello_timeout: self.hello_timeout,
            max_hello_size: self.max_hello_size,
            limits: self.options.limits,
            next_id: AtomicU64::new(
                (u64::from(self.node_id) << ConnectionId::NODE_SHIFT) | first_connection_id(),
            ),
            authorize: self.authorize,
            max_connections: self.max_connections,
            connections: Arc::new(AtomicUsize::new(0)),
            handshakes: Arc::new(Semaphore::new(self.max_handshakes)),
            max_handshakes: self.max_handshakes,
            waiting: Arc::new(AtomicUsize::new(0)),
            transport: self.options.transport,
            buffer_total: self.options.limits.total_budget(self.buffer_total),
            unix_check: self.unix_check,
            admission: AdmissionCounters::default(),
        });
        let accept = shared
            .endpoint
            .is_some()
            .then(|| runtime.spawn(accept_loop(shared.clone())));
        Server {
            shared,
            local_addr,
            certificate,
            accept,
            unix: std::sync::Mutex::new(Vec::new()),
        }
    }
}

/// Connection ids count up from a random base, so that a restarted server
/// does not hand out the ids of its previous run again.
fn first_connection_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (random & 0xffff_ffff).max(1)
}

/// A running brpc server. Dropping it closes the endpoint and every connection.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use brpc_server::Server;
/// let server = Server::builder()
///     .dev_certificate_file("/var/lib/myapp/server.pem")
///     // .add_service(GreeterServer::new(MyGreeter))
///     .bind("0.0.0.0:4433")?;
/// println!("listening on {}", server.local_addr());
/// let ctrl_c = async {
///     let _ = tokio::signal::ctrl_c().await;
/// };
/// server
///     .serve_with_shutdown(ctrl_c, std::time::Duration::from_secs(5))
///     .await;
/// # Ok(()) }
/// ```
pub struct Server {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    certificate: CertificateDer<'static>,
    /// The QUIC accept loop, if the server has an endpoint.
    accept: Option<tokio::task::JoinHandle<()>>,
    /// The Unix sockets being listened on.
    unix: std::sync::Mutex<Vec<crate::unix::Listening>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("peers", &self.shared.registry.len())
            .finish()
    }
}

impl Server {
    /// A builder with defaults: dev TLS, 4 MiB messages, 10 s Hello limit.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The bound UDP address (with the real port when bound to port 0);
    /// `0.0.0.0:0` for a server on Unix sockets only ([`Builder::bind_unix`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The leaf certificate the server presents. In dev mode clients pin it.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The connected peers.
    pub fn peers(&self) -> &Registry {
        &self.shared.registry
    }

    /// The services this server hosts.
    pub fn router(&self) -> &Router {
        &self.shared.router
    }

    /// Bytes of partly received frames the server holds right now, across
    /// all connections (see [`Builder::buffer_total`]).
    pub fn buffered_bytes(&self) -> usize {
        self.shared.buffer_total.in_use()
    }

    /// Clients waiting for a handshake slot right now (see
    /// [`Builder::max_handshakes`]): a restart storm's queue.
    pub fn handshakes_waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// What became of the QUIC clients that reached this server since it was
    /// bound: refused for load, handshakes started, failed and timed out,
    /// sessions admitted. See [`AdmissionStats`].
    pub fn admission_stats(&self) -> AdmissionStats {
        self.shared.admission.snapshot()
    }

    /// Stops accepting and closes every connection now; calls in flight fail.
    /// QUIC clients see close code `CONN_GOING_AWAY` (the server is shutting
    /// down, as after [`Server::shutdown`]'s grace; Unix clients see their
    /// socket end) and reconnect with backoff, the short one a GoAway gives:
    /// their first attempts may meet this endpoint still refusing while it
    /// drains. A replacement that is swamped by the whole fleet at once
    /// refuses them too, and their first four busy delays then double
    /// (1, 2, 4, 8 s) before the long ones.
    pub fn close(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        // Each peer closed by its handle first, so that its disconnect event
        // says the server closed it.
        for peer in self.shared.registry.list() {
            peer.close(codes::CONN_GOING_AWAY, "server closed");
        }
        if let Some(accept) = &self.accept {
            accept.abort();
        }
        if let Some(endpoint) = &self.shared.endpoint {
            endpoint.close(VarInt::from_u32(codes::CONN_GOING_AWAY), b"server closed");
        }
        self.stop_unix_listeners();
    }

    /// Stops listening on Unix sockets (their clients' connections were
    /// closed with every other peer's) and removes the socket files.
    fn stop_unix_listeners(&self) {
        for listening in self
            .unix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            listening.stop();
        }
    }

    /// Graceful shutdown, like ttrpc's `Shutdown`: stop accepting (new
    /// connections are refused), tell every client it is going away (a
    /// `brpc.v1.Session/GoAway` call; clients stop opening calls here and
    /// reconnect after their backoff), refuse new calls with `UNAVAILABLE`,
    /// let calls in flight finish for up to `grace`, then close every
    /// connection with `CONN_GOING_AWAY`.
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let peers = self.shared.registry.list();
        tracing::info!(peers = peers.len(), ?grace, "brpc server shutting down");
        let mut notices = JoinSet::new();
        for peer in &peers {
            peer.start_draining();
            let peer = peer.clone();
            notices.spawn(async move {
                let notice = session::send_goaway(&peer, "server shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(1), notice).await;
            });
        }
        let drained = async {
            for peer in &peers {
                peer.calls_drained().await;
            }
        };
        let _ = tokio::time::timeout_at(deadline, drained).await;
        let _ = tokio::time::timeout_at(deadline, async {
            while notices.join_next().await.is_some() {}
        })
        .await;
        // Each peer closed by its handle before the accept loop (and with it
        // every connection task) is stopped, so that its disconnect event
        // says the server shut down.
        for peer in self.shared.registry.list() {
            peer.close(codes::CONN_GOING_AWAY, "server shutting down");
        }
        if let Some(accept) = &self.accept {
            accept.abort();
        }
        self.stop_unix_listeners();
        if let Some(endpoint) = &self.shared.endpoint {
            endpoint.close(
                VarInt::from_u32(codes::CONN_GOING_AWAY),
                b"server shutting down",
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    /// Serves until `signal` completes, then shuts down gracefully within
    /// `grace` (see [`Server::shutdown`]): tonic's `serve_with_shutdown`
    /// idiom. A server serves from [`Builder::bind`] on; this only waits.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// let server = brpc_server::Server::builder().bind("127.0.0.1:4433")?;
    /// let ctrl_c = async {
    ///     let _ = tokio::signal::ctrl_c().await;
    /// };
    /// server.serve_with_shutdown(ctrl_c, Duration::from_secs(5)).await;
    /// # Ok(()) }
    /// ```
    pub async fn serve_with_shutdown(
        &self,
        signal: impl std::future::Future<Output = ()>,
        grace: Duration,
    ) {
        signal.await;
        self.shutdown(grace).await;
    }

    /// Waits until every QUIC connection has closed (after [`Server::close`]).
    pub async fn wait_idle(&self) {
        if let Some(endpoint) = &self.shared.endpoint {
            endpoint.wait_idle().await;
        }
    }

    /// Also serves on the Unix socket at `path` (ttrpc over a byte stream):
    /// brpc clients ([`connect_unix`](../brpc_client/struct.Builder.html#method.connect_unix))
    /// and plain ttrpc ones. They are listed in [`Server::peers`] with their
    /// [credentials](Peer::credentials) (and with no name or labels: those
    /// travel in a QUIC Hello), get the same connect and disconnect events,
    /// limits and shutdown as QUIC clients. A stale socket file at `path` is
    /// replaced; the file is removed when the server closes.
    ///
    /// # Errors
    /// The OS error if the socket cannot be bound.
    pub fn listen_unix(&self, path: impl AsRef<std::path::Path>) -> std::io::Result<()> {
        let listening = crate::unix::listen(&self.shared, path.as_ref())?;
        self.unix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(listening);
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close();
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    let Some(endpoint) = shared.endpoint.clone() else {
        return;
    };
    // Owning the connection tasks here means aborting this loop (Server::close
    // or drop) drops every connection task and, through it, every handler.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) if shared.shutting_down.load(Ordering::SeqCst) => {
                    shared.admission.count(AdmissionEvent::RefusedClosing);
                    incoming.refuse();
                }
                Some(incoming) => {
                    // One Hello limit from arrival, a wait for a handshake slot included.
                    let deadline = tokio::time::Instant::now() + shared.hello_timeout;
                    let admitted = shared.connections.fetch_add(1, Ordering::SeqCst) < shared.max_connections;
                    let counted = Counted(shared.connections.clone());
                    if admitted {
                        match shared.handshakes.clone().try_acquire_owned() {
                            Ok(permit) => {
                                connections.spawn(run_connection(shared.clone(), incoming, permit, counted, deadline));
                            }
                            Err(_) if shared.waiting.load(Ordering::SeqCst) < shared.max_waiting() => {
                                let waiting = Counted::new(&shared.waiting);
                                connections.spawn(wait_for_handshake(shared.clone(), incoming, waiting, counted, deadline));
                            }
                            Err(_) => {
                                tracing::debug!(remote = %incoming.remote_address(), "connection refused: too many handshakes waiting");
                                shared.admission.count(AdmissionEvent::RefusedQueueFull);
                                incoming.refuse();
                            }
                        }
                    } else {
                        // Not a connection the limit counts (counting it
                        // would turn clients away while the peers fall below
                        // the limit), and its handshake takes a slot like
                        // any other: with none free it is refused at once.
                        drop(counted);
                        match shared.handshakes.clone().try_acquire_owned() {
                            Ok(permit) => {
                                shared.admission.count(AdmissionEvent::TurnedAway);
                                connections.spawn(turn_away(incoming, shared.max_connections, permit, deadline));
                            }
                            Err(_) => {
                                shared.admission.count(AdmissionEvent::RefusedQueueFull);
                                incoming.refuse();
                            }
                        }
                    }
                }
                None => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    while connections.join_next().await.is_some() {}
}

/// A client that arrived while [`Builder::max_handshakes`] handshakes were
/// in progress: its turn, or refused when it waited half the Hello limit.
/// The wait counts against the Hello limit (`deadline`).
async fn wait_for_handshake(
    shared: Arc<Shared>,
    incoming: Incoming,
    waiting: Counted,
    counted: Counted,
    deadline: tokio::time::Instant,
) {
    let turn = tokio::time::timeout(
        shared.hello_timeout / 2,
        shared.handshakes.clone().acquire_owned(),
    )
    .await;
    drop(waiting);
    match turn {
        Ok(Ok(permit)) => {
            Box::pin(run_connection(shared, incoming, permit, counted, deadline)).await
        }
        _ => {
            tracing::debug!(remote = %incoming.remote_address(), "connection refused: no handshake slot within half the Hello limit");
            shared.admission.count(AdmissionEvent::RefusedAfterWaiting);
            incoming.refuse();
        }
    }
}

/// A client over the connection limit: finish the handshake (holding a
/// handshake slot, for at most 5 s and never past the Hello limit,
/// `deadline`) so it can be told why, then close with `CONN_TOO_MANY`.
async fn turn_away(
    incoming: Incoming,
    limit: usize,
    permit: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
) {
    let remote = incoming.remote_address();
    let until = deadline.min(tokio::time::Instant::now() + Duration::from_secs(5));
    let handshake = tokio::time::timeout_at(until, incoming).await;
    drop(permit);
    if let Ok(Ok(connection)) = handshake {
        tracing::info!(%remote, limit, "connection refused: at the connection limit");
        let reason = format!("server at its connection limit ({limit}); retry later or elsewhere");
        connection.close(VarInt::from_u32(codes::CONN_TOO_MANY), reason.as_bytes());
        let _ = tokio::time::timeout(Duration::from_secs(1), connection.closed()).await;
    }
}

/// TLS handshake, Hello, admission, listing and the Hello answer, all by
/// `deadline` (the Hello limit from the client's arrival): the peer,
/// listed, or `None` if the client was turned away or went away.
/// The handshake permit is given back once the TLS handshake is over.
async fn admit(
    shared: Arc<Shared>,
    incoming: Incoming,
    permit: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
) -> Option<Listed> {
    let remote = incoming.remote_address();
    let counts = &shared.admission;
    counts.count(AdmissionEvent::HandshakeStarted);
    let handshake = tokio::time::timeout_at(deadline, incoming).await;
    drop(permit);
    let connection = match handshake {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            let error = e.to_string();
            let hint = tls::explain_certificate_error(&error).unwrap_or("");
            counts.count(AdmissionEvent::HandshakeFailed);
            tracing::info!(%remote, %error, hint, "handshake refused");
            return None;
        }
        Err(_) => {
            tracing::info!(%remote, "handshake refused: it did not finish within the Hello limit");
            counts.count(AdmissionEvent::HandshakeTimedOut);
            return None;
        }
    };
    let admission = shared.clone();
    let listed = session(shared, connection, remote, deadline).await;
    admission.admission.count(if listed.is_some() {
        AdmissionEvent::Admitted
    } else {
        AdmissionEvent::SessionRefused
    });
    listed
}

/// Answers a Hello with `status` and closes the connection with `code`
/// and `reason`: the answer within the Hello limit too, so that a client
/// withholding flow-control credit does not keep its connection (and its
/// place under max_connections) by never taking it.
async fn refuse(
    hello: HelloCall,
    connection: &quinn::Connection,
    deadline: tokio::time::Instant,
    status: Status,
    code: u32,
    reason: &[u8],
) -> Option<Listed> {
    let _ = tokio::time::timeout_at(deadline, hello.reject(status)).await;
    connection.close(VarInt::from_u32(code), reason);
    None
}

/// [`refuse`] because the server is shutting down.
async fn refuse_closing(
    hello: HelloCall,
    connection: &quinn::Connection,
    deadline: tokio::time::Instant,
) -> Option<Listed> {
    let status = Status::unavailable("server is shutting down; reconnect later");
    let reason = b"server shutting down";
    refuse(
        hello,
        connection,
        deadline,
        status,
        codes::CONN_GOING_AWAY,
        reason,
    )
    .await
}

/// Hello, admission, listing and the Hello answer on a handshaken
/// connection: the peer, listed, or `None` if the client was turned away or
/// went away.
async fn session(
    shared: Arc<Shared>,
    connection: quinn::Connection,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<Listed> {
    // A handle for the Hello call alone, its frames capped at the Hello
    // limit; the peer listed once Hello is done is made with what it said.
    // Its frames are not charged to the budget admitted peers share: a
    // crowd of clients stalling their Hellos must not take that from them
    // (before Hello, QUIC's 16 KiB receive window bounds each connection).
    let greeter = session::greeter(
        connection.clone(),
        Side::Acceptor,
        CallLimits {
            max_message_size: shared.max_hello_size,
            idle_timeout: None,
            ..shared.limits
        },
        brpc_core::conn::MemoryBudget::new(usize::MAX),
    );
    let hello = match tokio::time::timeout_at(deadline, session::receive_hello(&greeter)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(status)) => {
            tracing::info!(%remote, %status, "session refused: bad Hello");
            connection.close(
                VarInt::from_u32(codes::CONN_HELLO_FAILED),
                status.message().as_bytes(),
            );
            return None;
        }
        Err(_) => {
            tracing::info!(%remote, "session refused: no Hello within {:?}", shared.hello_timeout);
            connection.close(
                VarInt::from_u32(codes::CONN_HELLO_TIMEOUT),
                b"no Hello within the time limit",
            );
            return None;
        }
    };
    if shared.shutting_down.load(Ordering::SeqCst) {
        return refuse_closing(hello, &connection, deadline).await;
    }
    if let Err(status) = session::check_version(hello.request.protocol_version) {
        let reason = b"unsupported protocol version";
        return refuse(
            hello,
            &connection,
            deadline,
            status,
            codes::CONN_HELLO_FAILED,
            reason,
        )
        .await;
    }
    let identity = PeerIdentity::of_connection(&connection);
    if let Some(authorize) = &shared.authorize {
        let labels: Labels = hello
            .request
            .labels
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        let admission = Admission {
            name: &hello.request.name,
            labels: &labels,
            identity: identity.as_ref(),
            remote_address: connection.remote_address(),
        };
        if let Err(status) = authorize(&admission) {
            tracing::info!(%remote, name = %hello.request.name, %status, "client not authorized");
            let reason = format!("not authorized: {}", status.message());
            let code = codes::CONN_UNAUTHORIZED;
            return refuse(
                hello,
                &connection,
                deadline,
                status,
                code,
                reason.as_bytes(),
            )
            .await;
        }
    }
    // Admitted: open the call window and the receive window.
    brpc_core::conn::admit(&connection, &shared.transport);
    let peer = new_peer(&shared, &connection, &hello, identity);
    // Listed before the answer goes out: once the client knows its id, the
    // registry already has it. The guard unlists it however this task ends.
    shared.registry.insert(peer.clone());
    let listed = Listed {
        shared,
        peer: peer.clone(),
    };
    // A shutdown that began since the check above may have taken its list
    // of peers to drain before this one was listed: refused as it would
    // have been. (Listed first, read second; the shutdown sets the flag
    // first and lists second: one of the two sees the other.)
    if listed.shared.shutting_down.load(Ordering::SeqCst) {
        let refused = refuse_closing(hello, &connection, deadline).await;
        // Unlisted once closed, so its event says why.
        drop(listed);
        return refused;
    }
    match tokio::time::timeout_at(deadline, hello.accept(peer.connection_id())).await {
        Ok(Ok(())) => Some(listed),
        Ok(Err(_)) => None,
        Err(_) => {
            tracing::info!(%remote, "session refused: the Hello answer was not taken within the limit");
            connection.close(
                VarInt::from_u32(codes::CONN_HELLO_TIMEOUT),
                b"the Hello answer was not taken within the time limit",
            );
            None
        }
    }
}

/// A connection's task: admission, then serving it until it ends.
///
/// A plain fn, not an `async fn`: an `async fn` keeps its arguments for its
/// whole life, and `incoming` alone is 384 bytes. Here admission is boxed
/// with everything it takes, so the task that lives as long as the
/// connection holds only what serving needs (brpc-bench: about 800 bytes
/// less per idle connection).
fn run_connection(
    shared: Arc<Shared>,
    incoming: Incoming,
    permit: OwnedSemaphorePermit,
    counted: Counted,
    deadline: tokio::time::Instant,
) -> impl Future<Output = ()> {
    let remote = incoming.remote_address();
    let admission = Box::pin(admit(shared, incoming, permit, deadline));
    async move {
        let _counted = counted;
        let Some(listed) = admission.await else {
            return;
        };
        let peer = listed.peer.clone();
        let span = tracing::info_span!("brpc.connection", id = %peer.connection_id(), name = peer.name(), %remote);
        async {
            tracing::debug!("peer connected");
            let handler = ServerHandler {
                router: listed.shared.router.clone(),
                admin: listed.shared.admin.clone(),
            };
            brpc_core::serve(peer.clone(), handler).await;
            tracing::debug!(reason = ?peer.quic_connection().and_then(quinn::Connection::close_reason), "peer disconnected");
        }
        .instrument(span)
        .await;
    }
}

fn new_peer(
    shared: &Shared,
    connection: &quinn::Connection,
    hello: &HelloCall,
    identity: Option<PeerIdentity>,
) -> Peer {
    let id = ConnectionId(shared.next_id.fetch_add(1, Ordering::Relaxed));
    let labels: Labels = hello
        .request
        .labels
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    let info = PeerInfo {
        connection_id: id,
        name: hello.request.name.clone(),
        labels,
        connected_at: SystemTime::now(),
        identity,
    };
    Peer::new(
        connection.clone(),
        Side::Acceptor,
        info,
        shared.limits,
        shared.buffer_total.clone(),
        Some(shared.transport.receive_window),
    )
}
