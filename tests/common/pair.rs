//! Two brpc engines in one process, joined by an in-memory datagram pipe:
//! real QUIC (quinn) and TLS, but no sockets and no kernel, so a test can
//! run under tokio's paused clock (`#[tokio::test(start_paused = true)]`)
//! and deadlines, idle limits and keep-alives pass in virtual time. In the
//! manner of quinn-proto's `Pair`: two ends in memory, a clock moved by the
//! runtime, and a switch that silently drops every datagram (a vanished
//! peer).
//!
//! The engines are joined without the Hello exchange (each side's `Peer` is
//! made directly), so these tests are about the engine: calls, deadlines,
//! idle limits, GoAway, liveness.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use brpc::core::conn::{CallLimits, ConnectionId, Labels, MemoryBudget, PeerInfo, Side};
use brpc::{Peer, Router};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use super::echo::echo_server::EchoServer;
use super::{EchoService, Probe};

type Datagram = (SocketAddr, Vec<u8>);

/// The pipe: who is reachable at which address, and whether datagrams get
/// through at all.
#[derive(Default)]
pub struct Network {
    sockets: Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<Datagram>>>,
    cut: AtomicBool,
}

impl Network {
    /// From now on every datagram is lost (`true`), or delivered again.
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    fn socket(self: &Arc<Self>, addr: SocketAddr) -> Arc<MemorySocket> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.sockets.lock().expect("lock").insert(addr, tx);
        Arc::new(MemorySocket {
            addr,
            network: self.clone(),
            rx: Mutex::new(rx),
        })
    }
}

/// One end of the pipe, as quinn's socket.
struct MemorySocket {
    addr: SocketAddr,
    network: Arc<Network>,
    rx: Mutex<mpsc::UnboundedReceiver<Datagram>>,
}

impl fmt::Debug for MemorySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemorySocket({})", self.addr)
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for MemorySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.network.cut.load(Ordering::SeqCst) {
            return Ok(());
        }
        let sockets = self.network.sockets.lock().expect("lock");
        // Like UDP: nobody there, the datagram is lost.
        if let Some(to) = sockets.get(&transmit.destination) {
            let size = transmit
                .segment_size
                .unwrap_or(transmit.contents.len())
                .max(1);
            for datagram in transmit.contents.chunks(size) {
                let _ = to.send((self.addr, datagram.to_vec()));
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.rx.lock().expect("lock");
        match rx.poll_recv(cx) {
            Poll::Ready(Some((from, data))) => {
                let len = data.len().min(bufs[0].len());
                bufs[0][..len].copy_from_slice(&data[..len]);
                meta[0] = RecvMeta {
                    addr: from,
                    len,
                    stride: len,
                    ..RecvMeta::default()
                };
                Poll::Ready(Ok(1))
            }
            // The network outlives its sockets; a closed channel never comes.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Two connected engines, each serving a probed Echo service.
pub struct Pair {
    /// The dialer's handle to the acceptor (calls go to the "server" Echo).
    pub client: Peer,
    /// The acceptor's handle to the dialer (calls go to the "client" Echo).
    pub server: Peer,
    /// What the client's Echo handlers saw.
    pub client_probe: Arc<Probe>,
    /// What the server's Echo handlers saw.
    pub server_probe: Arc<Probe>,
    /// The pipe between them.
    pub network: Arc<Network>,
    /// The client's endpoint, for raw QUIC connections of its own.
    pub client_endpoint: quinn::Endpoint,
    /// The server's address on the pipe.
    pub server_address: SocketAddr,
    _server_endpoint: quinn::Endpoint,
}

/// A pair whose both sides enforce `limits`, with brpc's default QUIC
/// settings (10 s idle timeout, 3 s keep-alives).
pub async fn pair(limits: CallLimits) -> Pair {
    let options = brpc::core::conn::TransportOptions::default();
    let network = Arc::new(Network::default());
    let server_address: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
    let client_address: SocketAddr = "127.0.0.2:50000".parse().expect("addr");

    let certificate = brpc::tls::DevCertificate::generate().expect("dev certificate");
    let crypto = brpc::tls::server_crypto(
        vec![certificate.certificate().clone()],
        certificate.private_key(),
    )
    .expect("server crypto");
    let mut server_config = quinn::ServerConfig::with_crypto(crypto);
    server_config.transport_config(brpc::core::conn::transport_config(&options));
    let runtime = Arc::new(quinn::TokioRuntime);
    let server_endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_config),
        network.socket(server_address),
        runtime.clone(),
    )
    .expect("server endpoint");
    let mut client_endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        network.socket(client_address),
        runtime,
    )
    .expect("client endpoint");
    let roots = brpc::tls::pinned_roots(certificate.certificate()).expect("roots");
    let mut client_config =
        quinn::ClientConfig::new(brpc::tls::client_crypto(roots).expect("client crypto"));
    client_config.transport_config(brpc::core::conn::transport_config(&options));
    client_endpoint.set_default_client_config(client_config);

    let connecting = client_endpoint
        .connect(server_address, "localhost")
        .expect("connect");
    let accepting = async {
        server_endpoint
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("server handshake")
    };
    let (client_connection, server_connection) = tokio::join!(
        async { connecting.await.expect("client handshake") },
        accepting
    );

    let info = |id| PeerInfo {
        connection_id: ConnectionId(id),
        name: "pair".into(),
        labels: Labels::new(),
        connected_at: SystemTime::now(),
        identity: None,
    };
    let budget = MemoryBudget::new(64 << 20);
    let client = Peer::new(
        client_connection,
        Side::Dialer,
        info(1),
        limits,
        budget.clone(),
        Some(options.receive_window),
    );
    let server = Peer::new(
        server_connection,
        Side::Acceptor,
        info(1),
        limits,
        budget,
        Some(options.receive_window),
    );
    let serve = |peer: &Peer, name: &str| {
        let echo = EchoService::new(name);
        let probe = echo.probe.clone();
        let router = Router::new().add_service(EchoServer::new(echo));
        tokio::spawn(brpc::core::serve(peer.clone(), router));
        probe
    };
    let client_probe = serve(&client, "client");
    let server_probe = serve(&server, "server");
    Pair {
        client,
        server,
        client_probe,
        server_probe,
        network,
        client_endpoint,
        server_address,
        _server_endpoint: server_endpoint,
    }
}

/// The default per-call limits with a call idle limit of `idle`.
pub fn limits_with_idle(idle: Duration) -> CallLimits {
    CallLimits {
        idle_timeout: Some(idle),
        ..CallLimits::default()
    }
}
