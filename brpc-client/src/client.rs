//! The client: builder, dial (QUIC + TLS 1.3), Hello, and serving this side's
//! services on the connection it dialed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use brpc_core::bridge::BoxedService;
use brpc_core::conn::codes;
use brpc_core::session;
use brpc_core::tls::{self, TlsError};
use brpc_core::wire::{HelloRequest, KeyValue};
use brpc_core::{Channel, ConnectionId, Labels, Peer, PeerInfo, Router, Side, TransportOptions};
use quinn::{Endpoint, VarInt};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower_service::Service;

/// Why [`Builder::connect`] failed.
#[derive(Debug, thiserror::Error)]
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
    #[error("handshake with the server failed: {0}")]
    Handshake(quinn::ConnectionError),
    /// The server refused the Hello.
    #[error("server refused the session: {}", .0.message())]
    Hello(Status),
    /// The handshake and Hello did not finish in time.
    #[error("no session within {0:?}")]
    Timeout(Duration),
}

impl ConnectError {
    /// Whether the server's certificate failed verification.
    pub fn is_certificate_error(&self) -> bool {
        matches!(
            self,
            ConnectError::Handshake(quinn::ConnectionError::TransportError(e))
                if e.to_string().contains("certificate")
        )
    }
}

/// Configures and dials a [`Client`].
pub struct Builder {
    router: Router,
    name: String,
    labels: Labels,
    roots: Option<RootCertStore>,
    server_name: String,
    connect_timeout: Duration,
    max_message_size: usize,
    transport: TransportOptions,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            router: Router::new(),
            name: String::new(),
            labels: Labels::new(),
            roots: None,
            server_name: "localhost".into(),
            connect_timeout: Duration::from_secs(10),
            max_message_size: brpc_core::DEFAULT_MAX_MESSAGE_SIZE,
            transport: TransportOptions {
                keep_alive_interval: Some(Duration::from_secs(10)),
                ..TransportOptions::default()
            },
        }
    }
}

impl Builder {
    /// Hosts a tonic-generated service (`FooServer::new(impl)`) for the server to call.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.router = self.router.add_service(service);
        self
    }

    /// Passes every call this side serves through a tower `layer` (e.g.
    /// `ConcurrencyLimitLayer`, `TimeoutLayer`, an auth layer). The first layer
    /// added is the outermost; the stack is shared by all connections.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<BoxedService> + Send + Sync + 'static,
        L::Service: Service<http::Request<Body>, Response = http::Response<Body>>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<http::Request<Body>>>::Error: Into<tower::BoxError> + Send,
        <L::Service as Service<http::Request<Body>>>::Future: Send + 'static,
    {
        self.router = self.router.layer(layer);
        self
    }

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
        if roots.add(certificate).is_err() {
            // An unparsable certificate trusts nothing; connect then fails the
            // handshake with a certificate error rather than here.
        }
        self.roots = Some(roots);
        self
    }

    /// Trusts the certificate in a file (DER or PEM), as written by a server.
    ///
    /// # Errors
    /// [`TlsError::Pem`] if the file cannot be read or parsed.
    pub fn pin_certificate_file(self, path: impl AsRef<std::path::Path>) -> Result<Self, TlsError> {
        Ok(self.pin_certificate(tls::load_certificate_file(path)?))
    }

    /// Trusts these root certificates (a CA bundle).
    pub fn trust_roots(mut self, roots: RootCertStore) -> Self {
        self.roots = Some(roots);
        self
    }

    /// The name the server's certificate must carry (default `localhost`).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Time allowed for the QUIC/TLS handshake and Hello (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Largest message sent or received on any call (default 4 MiB).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Most calls the server may have open to this client at once (default 1024).
    pub fn max_concurrent_calls(mut self, calls: u32) -> Self {
        self.transport.max_concurrent_calls = calls;
        self
    }

    /// QUIC keep-alive interval while idle (default 10 s; `None` disables).
    pub fn keep_alive_interval(mut self, interval: Option<Duration>) -> Self {
        self.transport.keep_alive_interval = interval;
        self
    }

    /// Close the connection after this long without traffic (default 30 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.transport.idle_timeout = timeout;
        self
    }

    /// Dials `addr`, completes TLS and Hello, and starts serving this side's services.
    ///
    /// # Errors
    /// [`ConnectError`] saying which step failed.
    pub async fn connect<A>(self, addr: A) -> Result<Client, ConnectError>
    where
        A: tokio::net::ToSocketAddrs + std::fmt::Display,
    {
        let shown = addr.to_string();
        let roots = self.roots.clone().ok_or(ConnectError::NoTrust)?;
        let remote = tokio::net::lookup_host(addr)
            .await
            .map_err(|source| ConnectError::Resolve {
                addr: shown.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| ConnectError::Resolve {
                addr: shown.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            })?;
        let mut config = quinn::ClientConfig::new(tls::client_crypto(roots)?);
        config.transport_config(brpc_core::conn::transport_config(&self.transport));
        let local: SocketAddr = if remote.is_ipv6() {
            "[::]:0"
                .parse()
                .map_err(|_| ConnectError::Endpoint(std::io::ErrorKind::InvalidInput.into()))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| ConnectError::Endpoint(std::io::ErrorKind::InvalidInput.into()))?
        };
        let mut endpoint = Endpoint::client(local).map_err(ConnectError::Endpoint)?;
        endpoint.set_default_client_config(config);

        let timeout = self.connect_timeout;
        let session = async {
            let connection = endpoint
                .connect(remote, &self.server_name)?
                .await
                .map_err(ConnectError::Handshake)?;
            let hello = HelloRequest {
                protocol_version: session::PROTOCOL_VERSION,
                name: self.name.clone(),
                labels: self
                    .labels
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                    .collect(),
            };
            let answer = session::send_hello(&connection, hello, self.max_message_size)
                .await
                .map_err(ConnectError::Hello)?;
            Ok::<_, ConnectError>((connection, answer))
        };
        let (connection, answer) = tokio::time::timeout(timeout, session)
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        let info = PeerInfo {
            connection_id: ConnectionId(answer.connection_id),
            name: String::new(),
            labels: Labels::new(),
            connected_at: SystemTime::now(),
        };
        let peer = Peer::new(connection, Side::Dialer, info, self.max_message_size);
        let serving = tokio::spawn(brpc_core::serve(peer.clone(), self.router));
        Ok(Client {
            peer,
            endpoint,
            name: self.name,
            labels: self.labels,
            serving,
        })
    }
}

/// A connected brpc client. Dropping it closes the connection.
pub struct Client {
    peer: Peer,
    endpoint: Endpoint,
    name: String,
    labels: Labels,
    serving: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connection_id", &self.peer.connection_id())
            .field("name", &self.name)
            .field("server", &self.peer.remote_address())
            .finish()
    }
}

impl Client {
    /// A builder with defaults: no trust configured, 10 s connect limit, keep-alive 10 s.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A channel to call the server's services: `GreeterClient::new(client.channel())`.
    pub fn channel(&self) -> Channel {
        self.peer.channel()
    }

    /// The handle of the server end of the connection.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The connection id the server assigned in Hello.
    pub fn connection_id(&self) -> ConnectionId {
        self.peer.connection_id()
    }

    /// The name this client announced.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The labels this client announced.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Closes the connection now; calls in flight fail.
    pub fn close(&self) {
        self.peer.close(codes::CONN_NORMAL, "client closed");
        self.serving.abort();
    }

    /// Waits until the connection closes and says why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.peer.closed().await
    }

    /// Closes the connection and waits until the server has been told.
    pub async fn shutdown(&self) {
        self.close();
        self.endpoint.wait_idle().await;
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
        self.endpoint
            .close(VarInt::from_u32(codes::CONN_NORMAL), b"client dropped");
    }
}
