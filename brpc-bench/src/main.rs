//! Side-by-side benchmark of one Echo call on eleven stacks (twelve with
//! tonic-h3, which runs in a child process of a bench binary built with
//! `--features tonic-h3` when there is one: see `h3_binary`), same process,
//! same payloads, same tokio runtime, one after another:
//! tonic over HTTP/2 (TCP loopback) in clear and over TLS 1.3, tonic over
//! HTTP/3 (tonic-h3 on quinn), raw quinn (stream per call, 4-byte length
//! prefix) with default sockets and with brpc's socket buffers, brpc over QUIC
//! client→server and server→client, ttrpc-rust over a Unix socket, and brpc
//! over a Unix socket, each brpc stack on the tonic path and on brpc-build's
//! direct path. Then idle memory per client, a fleet of 10 000 agents
//! and the minimal server's binary size.
//!
//! ```text
//! cargo run --release --manifest-path brpc-bench/Cargo.toml            # about 3 minutes (+ first min-size build)
//! cargo run --release --manifest-path brpc-bench/Cargo.toml -- --quick # a smoke run, under a minute: figures not for quoting
//! cargo build --release --manifest-path brpc-bench/Cargo.toml --features tonic-h3 --target-dir brpc-bench/target-h3 # then every run has tonic-h3, in a child process
//! cargo run --release --manifest-path brpc-bench/Cargo.toml --features tonic-h3 # tonic-h3 in the same process (every stack's count then pays for tracing's `log`)
//! brpc-bench fleet 20000 50000              # larger fleets, one fresh process each
//! brpc-bench --fleet 10000 100000 --storm 10000 --fleet-keep-alive 10 # the full run with those fleet rows and restart storm rows
//! brpc-bench storm 100000 --keep-alive 10 --agents-idle # a restart storm, the agents on the cores the server leaves free
//! brpc-bench --stack brpc --c64-only        # 10 s at c=64 (or --c1-only), for a profiler
//! brpc-bench instructions brpc quinn        # instructions per call, counted by callgrind
//! ```
//!
//! Figures: 16-byte unary at concurrency 1 (calls/s, p50, p99) and 64
//! (calls/s), 1 MiB echo at concurrency 4 (MB/s), CPU time per call (client
//! and server together, from getrusage), datagrams the kernel dropped for full
//! UDP receive buffers. Each figure is the median of three measured rounds (each round goes through all stacks) after
//! a warm-up. Results go to stdout, BENCHMARKS.md (its generated part; the
//! hand-written text after it is kept), benchmarks.json and benchmarks.svg.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use brpc::core::conn::{DEFAULT_SOCKET_BUFFER, LOOPBACK_MAX_UDP_PAYLOAD, TransportOptions};
use brpc::{Client, Server};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

#[allow(missing_docs, clippy::all)]
mod proto {
    tonic::include_proto!("test.echo.v1");
}
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
mod ttrpc_gen {
    include!(concat!(env!("OUT_DIR"), "/ttrpc/protos.rs"));
}

use proto::echo_client::EchoClient;
use proto::echo_server::{Echo, EchoServer};
use proto::{EchoReply, EchoRequest, FailRequest, Number, RangeRequest, SleepRequest};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let r = request.into_inner();
        Ok(Response::new(EchoReply {
            blob: r.blob,
            seq: r.seq,
            ..Default::default()
        }))
    }
    async fn fail(&self, _: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn sleep(&self, _: Request<SleepRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::unimplemented("bench"))
    }
    type RangeStream = BoxStream<EchoReply>;
    async fn range(&self, _: Request<RangeRequest>) -> Result<Response<Self::RangeStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn sum(&self, _: Request<Streaming<Number>>) -> Result<Response<Number>, Status> {
        Err(Status::unimplemented("bench"))
    }
    type BidiStream = BoxStream<EchoReply>;
    async fn bidi(
        &self,
        _: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn sink(&self, _: Request<Streaming<EchoRequest>>) -> Result<Response<Number>, Status> {
        Err(Status::unimplemented("bench"))
    }
}

struct TtrpcEcho;

#[async_trait::async_trait]
impl ttrpc_gen::echo_ttrpc::Echo for TtrpcEcho {
    async fn unary(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        r: ttrpc_gen::echo::EchoRequest,
    ) -> ttrpc::Result<ttrpc_gen::echo::EchoReply> {
        let mut reply = ttrpc_gen::echo::EchoReply::new();
        reply.blob = r.blob;
        reply.seq = r.seq;
        Ok(reply)
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Result<usize, String>> + Send>>;

/// One stack's client: echoes `payload`, returns the bytes that came back.
#[derive(Clone)]
enum Caller {
    Tonic(EchoClient<tonic::transport::Channel>),
    Brpc(EchoClient<brpc::Channel>),
    /// brpc-build's typed client (the direct path).
    Direct(proto::echo_brpc::EchoClient),
    Quinn(quinn::Connection),
    Ttrpc(ttrpc_gen::echo_ttrpc::EchoClient),
    /// tonic's generated client calling its generated server in memory,
    /// with no transport between them: what tonic's own code costs a call.
    TonicMem(EchoClient<EchoServer<EchoService>>),
    /// Through a node link and the relay of the agent's node (a cluster's
    /// cross-node call).
    Relay(EchoClient<InterceptedService<brpc::Channel, RelayTo>>),
    /// gRPC over HTTP/3 (tonic-h3 on quinn).
    #[cfg(feature = "tonic-h3")]
    TonicH3(EchoClient<tonic_h3::H3Channel<tonic_h3::quinn::H3QuinnConnector>>),
}

/// Marks every call for the relay to one agent.
#[derive(Clone)]
struct RelayTo(tonic::metadata::AsciiMetadataValue);

impl tonic::service::Interceptor for RelayTo {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(brpc::server::admin::RELAY_TO, self.0.clone());
        Ok(request)
    }
}

fn echo_request(payload: &Bytes) -> EchoRequest {
    EchoRequest {
        blob: payload.clone(),
        ..Default::default()
    }
}

/// The bytes echoed back by a protobuf Echo call.
fn echoed(reply: Result<Response<EchoReply>, Status>) -> Result<usize, String> {
    reply
        .map(|r| r.into_inner().blob.len())
        .map_err(|e| e.to_string())
}

impl Caller {
    fn call(&self, payload: Bytes) -> CallFuture {
        let this = self.clone();
        Box::pin(async move {
            match this {
                Caller::Tonic(mut c) => echoed(c.unary(echo_request(&payload)).await),
                Caller::Brpc(mut c) => echoed(c.unary(echo_request(&payload)).await),
                Caller::Direct(mut c) => echoed(c.unary(echo_request(&payload)).await),
                Caller::Relay(mut c) => echoed(c.unary(echo_request(&payload)).await),
                Caller::TonicMem(mut c) => echoed(c.unary(echo_request(&payload)).await),
                #[cfg(feature = "tonic-h3")]
                Caller::TonicH3(mut c) => echoed(c.unary(echo_request(&payload)).await),
                Caller::Quinn(conn) => quinn_call(&conn, payload).await.map_err(|e| e.to_string()),
                Caller::Ttrpc(c) => {
                    let mut req = ttrpc_gen::echo::EchoRequest::new();
                    req.blob = payload.to_vec();
                    let r = c.unary(ttrpc::context::with_timeout(0), &req).await;
                    r.map(|r| r.blob.len()).map_err(|e| format!("{e:?}"))
                }
            }
        })
    }
}

async fn quinn_call(
    conn: &quinn::Connection,
    payload: Bytes,
) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut prefix = BytesMut::with_capacity(4);
    prefix.put_u32(payload.len() as u32);
    send.write_all_chunks(&mut [prefix.freeze(), payload])
        .await?;
    send.finish()?;
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    let body = recv.read_to_end(len + 1).await?;
    Ok(body.len())
}

async fn quinn_serve(conn: quinn::Connection) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            let Ok(body) = recv.read_to_end(2 << 20).await else {
                return;
            };
            let mut buf = Bytes::from(body);
            if buf.len() < 4 {
                return;
            }
            let len = buf.get_u32() as usize;
            let mut prefix = BytesMut::with_capacity(4);
            prefix.put_u32(len as u32);
            let _ = send.write_all_chunks(&mut [prefix.freeze(), buf]).await;
            let _ = send.finish();
        });
    }
}

/// Keeps whatever a stack needs alive while it is measured.
struct Running {
    caller: Caller,
    _guards: Vec<Box<dyn std::any::Any + Send>>,
}

async fn start(stack: &str, dir: &std::path::Path) -> Result<Running, Box<dyn std::error::Error>> {
    Ok(match stack {
        "tonic" | "tonic-tls" => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            // TCP_NODELAY on every accepted connection, as tonic's own
            // `serve` sets it (serve_with_incoming leaves Nagle on, which
            // holds back the tail of every large reply).
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(
                |stream: std::io::Result<tokio::net::TcpStream>| {
                    if let Ok(stream) = &stream {
                        let _ = stream.set_nodelay(true);
                    }
                    stream
                },
            );
            let mut server = tonic::transport::Server::builder();
            let mut endpoint = tonic::transport::Channel::from_shared(format!("http://{addr}"))?;
            if stack == "tonic-tls" {
                // gRPC over HTTP/2 over TLS 1.3 (rustls with ring, as
                // brpc): the encrypted stack brpc replaces.
                let key = rcgen::KeyPair::generate()?;
                let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
                let cert = params.self_signed(&key)?;
                let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
                server = server.tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(&cert_pem, &key_pem)),
                )?;
                endpoint = tonic::transport::Channel::from_shared(format!("https://{addr}"))?
                    .tls_config(
                        tonic::transport::ClientTlsConfig::new()
                            .ca_certificate(tonic::transport::Certificate::from_pem(&cert_pem))
                            .domain_name("localhost"),
                    )?;
            }
            let server = tokio::spawn(
                server
                    .add_service(EchoServer::new(EchoService).max_decoding_message_size(4 << 20))
                    .serve_with_incoming(incoming),
            );
            let channel = endpoint.connect().await?;
            Running {
                caller: Caller::Tonic(EchoClient::new(channel)),
                _guards: vec![Box::new(AbortOnDrop::new(server))],
            }
        }
        #[cfg(feature = "tonic-h3")]
        "tonic-h3" => {
            // gRPC over HTTP/3 (tonic-h3 0.0.6 on quinn, as brpc's QUIC):
            // the gRPC-over-QUIC peer. TLS 1.3 with ring and ALPN h3; both
            // endpoints on UDP sockets with brpc's buffer size; quinn's
            // default transport settings (plus the client's keep-alive), as
            // the raw quinn stacks.
            use brpc::core::rustls;
            use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
            let dev = brpc::tls::DevCertificate::generate()?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_no_client_auth()
                .with_single_cert(vec![dev.certificate().clone()], dev.private_key())?;
            server_tls.alpn_protocols = vec![b"h3".to_vec()];
            let buffers = TransportOptions::default();
            let endpoint = brpc::core::conn::endpoint(
                "127.0.0.1:0".parse()?,
                Some(quinn::ServerConfig::with_crypto(Arc::new(
                    QuicServerConfig::try_from(server_tls)?,
                ))),
                &buffers,
                None,
            )?;
            let addr: SocketAddr = endpoint.local_addr()?;
            let routes = tonic::service::Routes::builder()
                .add_service(EchoServer::new(EchoService).max_decoding_message_size(4 << 20))
                .clone()
                .routes();
            let acceptor = tonic_h3::quinn::H3QuinnAcceptor::new(endpoint.clone());
            let server = tokio::spawn(async move {
                let _ = tonic_h3::server::H3Router::new(routes)
                    .serve(acceptor)
                    .await;
            });
            let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(brpc::tls::pinned_roots(dev.certificate())?)
                .with_no_client_auth();
            client_tls.alpn_protocols = vec![b"h3".to_vec()];
            let mut client =
                brpc::core::conn::endpoint("127.0.0.1:0".parse()?, None, &buffers, None)?;
            let mut transport = quinn::TransportConfig::default();
            transport.keep_alive_interval(Some(Duration::from_secs(5)));
            let mut config =
                quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
            config.transport_config(Arc::new(transport));
            client.set_default_client_config(config);
            // An address, not a name: "localhost" may resolve to ::1 first.
            let uri: http::Uri = format!("https://{addr}").parse()?;
            let connector =
                tonic_h3::quinn::H3QuinnConnector::new(uri.clone(), "localhost".into(), client);
            let channel = tonic_h3::H3Channel::new(connector, uri, None);
            Running {
                caller: Caller::TonicH3(
                    EchoClient::new(channel).max_decoding_message_size(4 << 20),
                ),
                _guards: vec![Box::new(AbortOnDrop::new(server)), Box::new(endpoint)],
            }
        }
        "tonic-mem" => Running {
            // The client's `http::Request` goes straight into the
            // generated server's `Service::call`, its body unread until the
            // server's decoder reads it; the server's response comes back as
            // it is. No bytes cross anything: tonic's own share of a call.
            caller: Caller::TonicMem(EchoClient::new(EchoServer::new(EchoService))),
            _guards: vec![],
        },
        "quinn" | "quinn-buf" => {
            // quinn-buf: the same default quinn settings, on UDP sockets with
            // the buffer size brpc asks for (`TransportOptions::socket_buffer`).
            // quinn-buf also accepts and probes for loopback-sized datagrams
            // as the brpc stacks do (`max_udp_payload`).
            let buf = stack == "quinn-buf";
            let buffers = TransportOptions {
                socket_buffer: if buf { DEFAULT_SOCKET_BUFFER } else { 0 },
                max_udp_payload: if buf {
                    LOOPBACK_MAX_UDP_PAYLOAD
                } else {
                    TransportOptions::default().max_udp_payload
                },
                ..TransportOptions::default()
            };
            // quinn's defaults, plus a keep-alive: the connection sits idle
            // while the other stacks are measured, longer than the 30 s
            // idle timeout; quinn-buf with path-MTU discovery up to the
            // datagram size its endpoints accept, one datagram per write
            // (as brpc configures quinn for it).
            let transport = || {
                let mut transport = quinn::TransportConfig::default();
                transport.keep_alive_interval(Some(Duration::from_secs(5)));
                if buf {
                    let mut discovery = quinn::MtuDiscoveryConfig::default();
                    discovery.upper_bound(LOOPBACK_MAX_UDP_PAYLOAD);
                    transport.mtu_discovery_config(Some(discovery));
                    transport.enable_segmentation_offload(false);
                }
                Arc::new(transport)
            };
            let dev = brpc::tls::DevCertificate::generate()?;
            let crypto =
                brpc::tls::server_crypto(vec![dev.certificate().clone()], dev.private_key())?;
            let mut server_config = quinn::ServerConfig::with_crypto(crypto);
            server_config.transport_config(transport());
            let endpoint = brpc::core::conn::endpoint(
                "127.0.0.1:0".parse()?,
                Some(server_config),
                &buffers,
                None,
            )?;
            let addr: SocketAddr = endpoint.local_addr()?;
            let accept = endpoint.clone();
            let server = tokio::spawn(async move {
                while let Some(incoming) = accept.accept().await {
                    tokio::spawn(async move {
                        if let Ok(conn) = incoming.await {
                            quinn_serve(conn).await;
                        }
                    });
                }
            });
            let client_crypto =
                brpc::tls::client_crypto(brpc::tls::pinned_roots(dev.certificate())?)?;
            let mut client =
                brpc::core::conn::endpoint("127.0.0.1:0".parse()?, None, &buffers, None)?;
            let mut config = quinn::ClientConfig::new(client_crypto);
            config.transport_config(transport());
            client.set_default_client_config(config);
            let conn = client.connect(addr, "localhost")?.await?;
            Running {
                caller: Caller::Quinn(conn),
                _guards: vec![
                    Box::new(AbortOnDrop::new(server)),
                    Box::new(endpoint),
                    Box::new(client),
                ],
            }
        }
        "brpc" | "brpc-reverse" => {
            let server = Server::builder()
                .max_udp_payload(LOOPBACK_MAX_UDP_PAYLOAD)
                .add_service(EchoServer::new(EchoService))
                .bind("127.0.0.1:0")?;
            let client = Client::builder()
                .max_udp_payload(LOOPBACK_MAX_UDP_PAYLOAD)
                .add_service(EchoServer::new(EchoService))
                .pin_certificate(server.certificate().clone())
                .connect(server.local_addr())
                .await?;
            let caller = if stack == "brpc" {
                EchoClient::new(client.channel())
            } else {
                let peer = server
                    .peers()
                    .get(client.connection_id())
                    .ok_or("not registered")?;
                peer.client(EchoClient::new)
            };
            Running {
                caller: Caller::Brpc(caller),
                _guards: vec![Box::new(server), Box::new(client)],
            }
        }
        "brpc-relay" => {
            // A cluster's cross-node call path: node A's link (a brpc
            // client presenting the node certificate) to node C, whose admin
            // relay carries each call on to C's agent; compare brpc-reverse,
            // node C calling its agent itself. (The directory lookup of
            // Cluster::peer, one Redis round trip, is not in it.)
            let node = brpc::tls::DevCertificate::generate_for(["brpc-node"])?;
            let server = Server::builder()
                .max_udp_payload(LOOPBACK_MAX_UDP_PAYLOAD)
                .optional_client_ca(brpc::tls::pinned_roots(node.certificate())?)
                .admin(brpc::server::AdminAccess::new().identity("brpc-node"))
                .bind("127.0.0.1:0")?;
            let agent = Client::builder()
                .max_udp_payload(LOOPBACK_MAX_UDP_PAYLOAD)
                .add_service(EchoServer::new(EchoService))
                .pin_certificate(server.certificate().clone())
                .connect(server.local_addr())
                .await?;
            let link = Client::builder()
                .max_udp_payload(LOOPBACK_MAX_UDP_PAYLOAD)
                .identity(vec![node.certificate().clone()], node.private_key())
                .pin_certificate(server.certificate().clone())
                .connect(server.local_addr())
                .await?;
            let to = RelayTo(agent.connection_id().0.to_string().parse()?);
            Running {
                caller: Caller::Relay(EchoClient::with_interceptor(link.channel(), to)),
                _guards: vec![Box::new(server), Box::new(agent), Box::new(link)],
            }
        }
        "brpc-direct" => {
            // Both ends on the direct path (brpc-build's dispatcher and client).
            let server = Server::builder()
                .max_udp_payload(LOOPBACK_MAX_UDP_PAYLOAD)
                .add_direct(proto::echo_brpc::EchoService::new(EchoService))
                .bind("127.0.0.1:0")?;
            let client = Client::builder()
                .max_udp_payload(LOOPBACK_MAX_UDP_PAYLOAD)
                .pin_certificate(server.certificate().clone())
                .connect(server.local_addr())
                .await?;
            Running {
                caller: Caller::Direct(proto::echo_brpc::EchoClient::new(client.channel())),
                _guards: vec![Box::new(server), Box::new(client)],
            }
        }
        "brpc-direct-unix" => {
            let path = dir.join("brpc-direct.sock");
            let server = Server::builder()
                .add_direct(proto::echo_brpc::EchoService::new(EchoService))
                .bind_unix(&path)?;
            let client = Client::builder().connect_unix(&path).await?;
            Running {
                caller: Caller::Direct(proto::echo_brpc::EchoClient::new(client.channel())),
                _guards: vec![Box::new(server), Box::new(client)],
            }
        }
        "ttrpc-unix" => {
            let path = dir.join("ttrpc.sock");
            let _ = std::fs::remove_file(&path);
            let mut server = ttrpc::asynchronous::Server::new()
                .bind(&format!("unix://{}", path.display()))?
                .register_service(ttrpc_gen::echo_ttrpc::create_echo(Arc::new(TtrpcEcho)));
            server.start().await?;
            let client =
                ttrpc::asynchronous::Client::connect(&format!("unix://{}", path.display())).await?;
            Running {
                caller: Caller::Ttrpc(ttrpc_gen::echo_ttrpc::EchoClient::new(client)),
                _guards: vec![Box::new(server)],
            }
        }
        "brpc-unix" => {
            let path = dir.join("brpc.sock");
            let server = Server::builder()
                .add_service(EchoServer::new(EchoService))
                .bind_unix(&path)?;
            let client = Client::builder().connect_unix(&path).await?;
            Running {
                caller: Caller::Brpc(EchoClient::new(client.channel())),
                _guards: vec![Box::new(server), Box::new(client)],
            }
        }
        other => return Err(format!("unknown stack {other}").into()),
    })
}

use tokio_util::task::AbortOnDropHandle as AbortOnDrop;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

struct Run {
    calls: u64,
    bytes: u64,
    elapsed: Duration,
    cpu: f64,
    latencies: Latencies,
    errors: u64,
}

/// `concurrency` loops calling for `duration`.
async fn measure(caller: &Caller, payload: Bytes, concurrency: usize, duration: Duration) -> Run {
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let stop = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let caller = caller.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                let (mut bytes, mut errors) = (0u64, 0u64);
                while Instant::now() < stop {
                    let t = Instant::now();
                    match caller.call(payload.clone()).await {
                        Ok(n) => {
                            bytes += n as u64;
                            latencies.record(t.elapsed());
                        }
                        Err(e) => {
                            if errors == 0 {
                                eprintln!("  first error: {e}");
                            }
                            errors += 1;
                        }
                    }
                }
                (latencies, bytes, errors)
            })
        })
        .collect();
    let mut run = Run {
        calls: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        cpu: 0.0,
        latencies: Latencies::default(),
        errors: 0,
    };
    for task in tasks {
        if let Ok((latencies, bytes, errors)) = task.await {
            run.calls += latencies.len();
            run.latencies.add(&latencies);
            run.bytes += bytes;
            run.errors += errors;
        }
    }
    run.elapsed = started.elapsed();
    run.cpu = cpu_seconds() - cpu_before;
    run
}

/// Call latencies, kept in an HDR histogram (3 significant digits).
struct Latencies(hdrhistogram::Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        // Auto-resizing, so any latency fits; 3 digits is 0.1% resolution.
        Latencies(hdrhistogram::Histogram::new(3).expect("3 significant digits is valid"))
    }
}

impl Latencies {
    fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        // An auto-resizing histogram takes every value.
        let _ = self.0.record(nanos.max(1));
    }

    fn add(&mut self, other: &Latencies) {
        let _ = self.0.add(&other.0);
    }

    fn len(&self) -> u64 {
        self.0.len()
    }

    /// The latency below which `p` percent of calls finished.
    fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.0.value_at_quantile(p / 100.0))
    }

    /// The longest latency recorded (zero with none).
    fn longest(&self) -> Duration {
        Duration::from_nanos(self.0.max())
    }
}

/// Exactly `calls` calls of `payload`, `width` at a time; the first error
/// ends it.
async fn count_calls(
    caller: &Caller,
    payload: Bytes,
    calls: u64,
    width: u64,
) -> Result<(), String> {
    let width = width.max(1);
    let per_task = calls.div_ceil(width);
    let tasks: Vec<_> = (0..width)
        .map(|i| {
            let caller = caller.clone();
            let payload = payload.clone();
            let n = per_task.min(calls.saturating_sub(i * per_task));
            tokio::spawn(async move {
                for _ in 0..n {
                    caller.call(payload.clone()).await?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Instructions callgrind counted for this binary's `count STACK CALLS`.
fn callgrind_total(stack: &str, calls: u64) -> Result<f64, Box<dyn std::error::Error>> {
    let output = std::process::Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(std::env::current_exe()?)
        .args(["count", stack, &calls.to_string()])
        .output()
        .map_err(|e| format!("valgrind could not run (is it installed?): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "count {stack} {calls} under callgrind failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    // "==PID== Collected : 123456789"
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr
        .lines()
        .find_map(|l| {
            l.split_once("Collected :")
                .map(|(_, n)| n.trim().to_owned())
        })
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no instruction count in callgrind's output:\n{stderr}").into())
}

/// Instructions per call of `stack`: the difference of two callgrind counts
/// (`calls` and `2 * calls` calls) over the difference in calls.
fn instructions_per_call(stack: &str, calls: u64) -> Result<f64, Box<dyn std::error::Error>> {
    let short = callgrind_total(stack, calls)?;
    let long = callgrind_total(stack, 2 * calls)?;
    Ok((long - short) / calls as f64)
}

/// Datagrams the kernel dropped because a UDP socket's receive buffer was
/// full (`RcvbufErrors` in /proc/net/snmp), machine-wide.
fn udp_receive_buffer_drops() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[derive(Default, Clone)]
struct Figures {
    c1_calls: f64,
    c1_p50_us: f64,
    c1_p99_us: f64,
    c64_calls: f64,
    mib_mbps: f64,
    cpu_us_per_call: f64,
    errors: u64,
    udp_drops: u64,
}

/// One stack's samples, gathered over the rounds.
#[derive(Default)]
struct Samples {
    c1: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    c64: Vec<f64>,
    mib: Vec<f64>,
    cpu: Vec<f64>,
    errors: u64,
    udp_drops: u64,
}

impl Samples {
    /// One round of the three figures.
    async fn round(&mut self, caller: &Caller, phase: Duration) {
        let small = Bytes::from(vec![7u8; 16]);
        let big = Bytes::from(vec![9u8; 1 << 20]);
        let drops_before = udp_receive_buffer_drops();
        let r = measure(caller, small.clone(), 1, phase).await;
        self.c1.push(r.calls as f64 / r.elapsed.as_secs_f64());
        self.p50
            .push(r.latencies.percentile(50.0).as_secs_f64() * 1e6);
        self.p99
            .push(r.latencies.percentile(99.0).as_secs_f64() * 1e6);
        self.errors += r.errors;
        let r = measure(caller, small, 64, phase).await;
        self.c64.push(r.calls as f64 / r.elapsed.as_secs_f64());
        self.cpu.push(r.cpu / r.calls.max(1) as f64 * 1e6);
        self.errors += r.errors;
        let r = measure(caller, big, 4, phase).await;
        self.mib
            .push(r.bytes as f64 / r.elapsed.as_secs_f64() / 1e6);
        self.errors += r.errors;
        self.udp_drops += udp_receive_buffer_drops().saturating_sub(drops_before);
    }

    /// This one-round sample as a line for a parent process (see
    /// [`ChildStack`]).
    fn round_line(&self) -> String {
        let last = |v: &[f64]| v.last().copied().unwrap_or(0.0);
        format!(
            "round {} {} {} {} {} {} {} {}",
            last(&self.c1),
            last(&self.p50),
            last(&self.p99),
            last(&self.c64),
            last(&self.mib),
            last(&self.cpu),
            self.errors,
            self.udp_drops
        )
    }

    /// Adds a round a child process reported with [`Samples::round_line`].
    fn add_round_line(&mut self, line: &str) -> Result<(), String> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("not a round: {line:?}");
        if fields.len() != 9 || fields[0] != "round" {
            return Err(bad());
        }
        let number = |i: usize| fields[i].parse::<f64>().map_err(|_| bad());
        self.c1.push(number(1)?);
        self.p50.push(number(2)?);
        self.p99.push(number(3)?);
        self.c64.push(number(4)?);
        self.mib.push(number(5)?);
        self.cpu.push(number(6)?);
        self.errors += fields[7].parse::<u64>().map_err(|_| bad())?;
        self.udp_drops += fields[8].parse::<u64>().map_err(|_| bad())?;
        Ok(())
    }

    fn figures(self) -> Figures {
        Figures {
            c1_calls: median(self.c1),
            c1_p50_us: median(self.p50),
            c1_p99_us: median(self.p99),
            c64_calls: median(self.c64),
            mib_mbps: median(self.mib),
            cpu_us_per_call: median(self.cpu),
            errors: self.errors,
            udp_drops: self.udp_drops,
        }
    }
}

/// Starts every stack, warms each up, then measures them in `repeats` rounds,
/// each round going through all stacks: the machine's slow drifts (other
/// tenants, here up to ±30% over minutes) then hit every stack alike, and the
/// ratios between stacks are fairer than if each were measured in one block.
/// With `child` (a stack and a bench binary), that stack runs in a child
/// process of the binary (see [`ChildStack`]), its rounds in turn with the
/// others'.
async fn bench_stacks<'a>(
    stacks: &[&'a str],
    child: Option<(&str, &std::path::Path)>,
    dir: &std::path::Path,
    phase: Duration,
    repeats: usize,
) -> Result<Vec<(&'a str, Figures)>, Box<dyn std::error::Error>> {
    enum Runner {
        Here(Running),
        Child(ChildStack),
    }
    let mut running = Vec::new();
    for stack in stacks {
        eprintln!("starting and warming up {stack} ...");
        running.push(match child {
            Some((name, binary)) if name == *stack => {
                Runner::Child(ChildStack::start(binary, stack, phase).await?)
            }
            _ => {
                let r = start(stack, dir).await?;
                warm_up(&r, phase).await;
                Runner::Here(r)
            }
        });
    }
    let mut samples: Vec<Samples> = stacks.iter().map(|_| Samples::default()).collect();
    for round in 0..repeats {
        for ((stack, r), s) in stacks.iter().zip(&mut running).zip(&mut samples) {
            eprintln!("round {}/{repeats}: {stack} ...", round + 1);
            match r {
                Runner::Here(r) => s.round(&r.caller, phase).await,
                Runner::Child(child) => child.round(s).await?,
            }
        }
    }
    Ok(stacks
        .iter()
        .copied()
        .zip(samples.into_iter().map(Samples::figures))
        .collect())
}

/// Warm-up before the measured rounds: connections, allocator, caches.
async fn warm_up(r: &Running, phase: Duration) {
    measure(&r.caller, Bytes::from(vec![7u8; 16]), 64, phase / 2).await;
    measure(&r.caller, Bytes::from(vec![9u8; 1 << 20]), 4, phase / 2).await;
}

/// The environment variable naming a bench binary built with
/// `--features tonic-h3`, for the tonic-h3 stack's child process.
const H3_BINARY_VAR: &str = "BRPC_BENCH_H3_BINARY";

/// A bench binary with the tonic-h3 stack, to run it in a child process:
/// `BRPC_BENCH_H3_BINARY`, or the one `cargo build --release --manifest-path
/// brpc-bench/Cargo.toml --features tonic-h3 --target-dir
/// brpc-bench/target-h3` leaves. `None` if there is none, or if this binary
/// has the stack itself. Its dependencies turn on tracing's `log` feature
/// for a whole binary, which adds instructions to every stack's calls; in a
/// process of its own it costs the others nothing.
fn h3_binary() -> Option<std::path::PathBuf> {
    if cfg!(feature = "tonic-h3") {
        return None;
    }
    let path = std::env::var_os(H3_BINARY_VAR)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target-h3/release/brpc-bench")
        });
    path.is_file().then_some(path)
}

/// A stack measured in a child process (`rounds-child`), one round at a
/// time when the parent asks, so that its rounds interleave with the
/// parent's stacks. The child starts and warms up the stack, says `ready`,
/// then answers each `round` line on its standard input with the round's
/// figures (see [`Samples::round_line`]); it ends when its input closes.
struct ChildStack {
    /// Killed when dropped (`kill_on_drop`).
    _child: tokio::process::Child,
    input: tokio::process::ChildStdin,
    output: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl ChildStack {
    async fn start(
        binary: &std::path::Path,
        stack: &str,
        phase: Duration,
    ) -> Result<ChildStack, Box<dyn std::error::Error>> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(binary)
            .args(["rounds-child", stack, "--phase-ms"])
            .arg(phase.as_millis().to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let input = child.stdin.take().ok_or("no stdin")?;
        let output = tokio::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let mut started = ChildStack {
            _child: child,
            input,
            output,
        };
        match started.output.next_line().await? {
            Some(line) if line == "ready" => Ok(started),
            other => Err(format!("{stack} in {}: {other:?}", binary.display()).into()),
        }
    }

    /// One round, added to `samples`.
    async fn round(&mut self, samples: &mut Samples) -> Result<(), Box<dyn std::error::Error>> {
        use tokio::io::AsyncWriteExt;
        self.input.write_all(b"round\n").await?;
        self.input.flush().await?;
        let line = self
            .output
            .next_line()
            .await?
            .ok_or("the child stack ended")?;
        samples.add_round_line(&line)?;
        Ok(())
    }
}

/// The child side of [`ChildStack`].
async fn rounds_child(stack: &str, phase: Duration) -> Result<(), Box<dyn std::error::Error>> {
    use tokio::io::AsyncBufReadExt;
    let dir = std::env::temp_dir().join(format!("brpc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let running = start(stack, &dir).await?;
    warm_up(&running, phase).await;
    println!("ready");
    let mut input = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = input.next_line().await? {
        if line == "round" {
            let mut samples = Samples::default();
            samples.round(&running.caller, phase).await;
            println!("{}", samples.round_line());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, Linux")
}

fn rss_bytes() -> u64 {
    rss_of("/proc/self/statm")
}

/// Resident bytes of the process `pid` (0 if it is gone).
fn process_rss(pid: u32) -> u64 {
    rss_of(&format!("/proc/{pid}/statm"))
}

fn rss_of(statm: &str) -> u64 {
    let statm = std::fs::read_to_string(statm).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Child process: holds `n` idle clients of `stack` connected to `addr` until
/// its stdin closes.
async fn hold_clients(
    stack: &str,
    addr: SocketAddr,
    n: usize,
    cert: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let der = rustls_der(cert)?;
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    match stack {
        "brpc" => {
            for _ in 0..n {
                let client = Client::builder()
                    .pin_certificate(der.clone())
                    .connect(addr)
                    .await?;
                held.push(Box::new(client));
            }
        }
        "quinn" => {
            let crypto = brpc::tls::client_crypto(brpc::tls::pinned_roots(&der)?)?;
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            let mut config = quinn::ClientConfig::new(crypto);
            config.transport_config(brpc::core::conn::transport_config(
                &brpc::core::conn::TransportOptions::default(),
            ));
            endpoint.set_default_client_config(config);
            for _ in 0..n {
                held.push(Box::new(endpoint.connect(addr, "localhost")?.await?));
            }
            held.push(Box::new(endpoint));
        }
        "tonic" => {
            for _ in 0..n {
                let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await?;
                held.push(Box::new(channel));
            }
        }
        other => return Err(format!("unknown stack {other}").into()),
    }
    println!("ready");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(())
}

fn rustls_der(
    path: &std::path::Path,
) -> Result<brpc::core::rustls::pki_types::CertificateDer<'static>, Box<dyn std::error::Error>> {
    Ok(std::fs::read(path)?.into())
}

/// Server RSS growth per idle connected client, clients in a separate process.
/// Agents per child process: each brpc `Client` has its own UDP socket, so
/// a process holds one descriptor per agent (see [`raise_descriptor_limit`]).
/// Each child dials from a loopback address of its own (127.0.0.2, .3, ...:
/// all of 127/8 is loopback on Linux), so one address's port range does not
/// cap the fleet.
const AGENTS_PER_PROCESS: usize = 10_000;

/// Set for agent processes to the keep-alive in seconds they use (empty:
/// brpc's default); their idle timeout is three times it.
const KEEP_ALIVE_VAR: &str = "BRPC_BENCH_KEEP_ALIVE";

/// How many broadcasts `fleet` makes after the measured one, for a
/// profiler to watch (`perf record -p`); not reported.
const EXTRA_BROADCASTS_VAR: &str = "BRPC_BENCH_EXTRA_BROADCASTS";

/// The keep-alive a parent bench process set in [`KEEP_ALIVE_VAR`].
fn keep_alive_from_env() -> Option<Duration> {
    std::env::var(KEEP_ALIVE_VAR)
        .ok()
        .and_then(|secs| secs.parse().ok())
        .map(Duration::from_secs)
}

/// For comparing by hand: the largest UDP payload (`max_udp_payload`) of the
/// fleet and storm servers and their agents, in bytes; inherited by the
/// child processes. Default: brpc's.
const MAX_UDP_PAYLOAD_VAR: &str = "BRPC_BENCH_MAX_UDP_PAYLOAD";

/// The largest UDP payload set in [`MAX_UDP_PAYLOAD_VAR`].
fn max_udp_payload_from_env() -> Option<u16> {
    std::env::var(MAX_UDP_PAYLOAD_VAR)
        .ok()
        .and_then(|bytes| bytes.parse().ok())
}

/// For comparing by hand: agents' busy backoff as "MIN_MS,MAX_MS" (e.g.
/// "100,5000", the reconnect backoff, as before there was a busy backoff);
/// inherited by the agent processes. Default: brpc's.
const BUSY_BACKOFF_VAR: &str = "BRPC_BENCH_BUSY_BACKOFF";

fn busy_backoff_from_env() -> Option<(Duration, Duration)> {
    let value = std::env::var(BUSY_BACKOFF_VAR).ok()?;
    let (min, max) = value.split_once(',')?;
    Some((
        Duration::from_millis(min.trim().parse().ok()?),
        Duration::from_millis(max.trim().parse().ok()?),
    ))
}

/// Raises this process's open-file limit to its hard limit, where the OS
/// allows; returns the soft limit in effect.
fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// The source address of the `index`-th agent process: 127.0.0.2 onwards.
fn agent_source(index: usize) -> std::net::IpAddr {
    let n = 2 + index as u32;
    std::net::IpAddr::from([127, (n >> 16) as u8, (n >> 8) as u8, n as u8])
}

/// A UDP relay on 127.0.0.1 to `target` that holds each datagram for
/// `delay` in each direction, for any number of clients (a socket of its
/// own towards the target for each): its address.
async fn delaying_relay(target: SocketAddr, delay: Duration) -> std::io::Result<SocketAddr> {
    use std::collections::HashMap;
    use tokio::net::UdpSocket;
    /// A socket with brpc's 4 MiB receive buffer (thousands of agents
    /// answer at once).
    fn socket(std: std::net::UdpSocket) -> std::io::Result<UdpSocket> {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 4 << 20;
        // SAFETY: a valid socket and a pointer to an int of the size given.
        #[allow(unsafe_code)]
        unsafe {
            libc::setsockopt(
                std.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        std.set_nonblocking(true)?;
        UdpSocket::from_std(std)
    }
    let front = Arc::new(socket(std::net::UdpSocket::bind("127.0.0.1:0")?)?);
    let addr = front.local_addr()?;
    // One queue for both ways, in arrival order: every datagram waits the
    // same delay, so none overtakes another (QUIC would count it lost).
    // Each goes out on `socket`, to `to` (towards a client) or to the
    // socket's connected peer (towards the server).
    type Queued = (
        tokio::time::Instant,
        Arc<UdpSocket>,
        Option<SocketAddr>,
        Vec<u8>,
    );
    let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<Queued>();
    tokio::spawn(async move {
        while let Some((at, socket, to, datagram)) = queued.recv().await {
            tokio::time::sleep_until(at).await;
            let _ = match to {
                Some(client) => socket.send_to(&datagram, client).await,
                None => socket.send(&datagram).await,
            };
        }
    });
    tokio::spawn(async move {
        let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            let back = match backs.get(&from) {
                Some(back) => back.clone(),
                None => {
                    let Ok(back) = std::net::UdpSocket::bind("127.0.0.1:0").and_then(socket) else {
                        continue;
                    };
                    if back.connect(target).await.is_err() {
                        continue;
                    }
                    let back = Arc::new(back);
                    let (reverse, front, queue) = (back.clone(), front.clone(), queue.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        // (The queue's task outlives every sender.)
                        while let Ok(n) = reverse.recv(&mut buf).await {
                            let at = tokio::time::Instant::now() + delay;
                            let datagram = buf[..n].to_vec();
                            let _ = queue.send((at, front.clone(), Some(from), datagram));
                        }
                    });
                    backs.insert(from, back.clone());
                    back
                }
            };
            let at = tokio::time::Instant::now() + delay;
            let _ = queue.send((at, back, None, buf[..n].to_vec()));
        }
    });
    Ok(addr)
}

/// `wan-broadcast N --rtt-ms R --rounds K`: see [`Command::WanBroadcast`].
async fn wan_broadcast(
    n: usize,
    rtt: Duration,
    rounds: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let limit = raise_descriptor_limit();
    if n == 0 {
        return Err("wan-broadcast needs at least one agent".into());
    }
    if (limit as usize) < 2 * n + 64 {
        return Err(format!(
            "{n} agents need {} descriptors; this process may open {limit}",
            2 * n + 64
        )
        .into());
    }
    let server = Server::builder()
        .add_service(EchoServer::new(EchoService))
        .bind("127.0.0.1:0")?;
    let relay = delaying_relay(server.local_addr(), rtt / 2).await?;
    let der = server.certificate().clone();
    let started = Instant::now();
    let agents: Vec<_> = futures_util::stream::iter(0..n)
        .map(|_| {
            Client::builder()
                .add_direct(proto::echo_brpc::EchoService::new(EchoService))
                .pin_certificate(der.clone())
                .connect(relay)
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let agents: Vec<Client> = agents.into_iter().collect::<Result<_, _>>()?;
    let deadline = Duration::from_secs(30) + Duration::from_millis(10 * n as u64);
    while server.peers().len() < n {
        if started.elapsed() > deadline {
            return Err(format!(
                "only {} of {n} agents listed after {deadline:?}",
                server.peers().len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "wan-broadcast: {} agents connected through a {rtt:?} relay in {:.1?}",
        agents.len(),
        started.elapsed()
    );
    let fixed = brpc::BroadcastOptions {
        concurrency: 256,
        initial_concurrency: 256,
        timeout: Duration::from_secs(10),
    };
    let adaptive = brpc::BroadcastOptions {
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    // One broadcast first, not printed: every connection's first call (and
    // what is left of the handshakes' traffic) falls in neither kind's rounds.
    let echo = |peer: brpc::Peer| async move {
        peer.client(proto::echo_brpc::EchoClient::new)
            .unary(EchoRequest::default())
            .await?;
        Ok(())
    };
    let _ = brpc::broadcast(server.peers().list(), adaptive, echo)
        .collect::<Vec<_>>()
        .await;
    println!("| broadcast | agents | round trip | total | p50 | p99 | failures |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for _ in 0..rounds {
        for (name, options) in [("fixed 256", fixed), ("adaptive (default)", adaptive)] {
            let started = Instant::now();
            let results: Vec<_> = brpc::broadcast(server.peers().list(), options, echo)
                .collect()
                .await;
            let total = started.elapsed();
            let failures = results.iter().filter(|r| r.result.is_err()).count();
            let mut times = Latencies::default();
            for r in &results {
                times.record(r.elapsed);
            }
            println!(
                "| {name} | {} | {rtt:?} | {total:.2?} | {:.1?} | {:.1?} | {failures} |",
                results.len(),
                times.percentile(50.0),
                times.percentile(99.0)
            );
        }
    }
    drop(agents);
    Ok(())
}

/// `agents ADDR N CERT SOURCE CONCURRENCY`: N brpc clients hosting Echo,
/// dialling from the address SOURCE, CONCURRENCY connecting at a time;
/// prints "ready" and holds them until stdin closes.
async fn hold_agents(
    addr: SocketAddr,
    n: usize,
    cert: &std::path::Path,
    source: std::net::IpAddr,
    concurrency: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let keep_alive = keep_alive_from_env();
    let busy_backoff = busy_backoff_from_env();
    let max_udp_payload = max_udp_payload_from_env();
    let limit = raise_descriptor_limit();
    if (limit as usize) < n + 64 {
        return Err(
            format!("{n} agents need {n} descriptors; this process may open {limit}").into(),
        );
    }
    let der = rustls_der(cert)?;
    let mut clients = Vec::with_capacity(n);
    let mut pending = futures_util::stream::iter(0..n)
        .map(|_| {
            let der = der.clone();
            async move {
                // A busy server makes a handshake wait, or refuses it; an
                // agent retries with its backoff, as a real one would.
                tokio::time::timeout(Duration::from_secs(600), {
                    let mut builder = Client::builder()
                        .add_direct(proto::echo_brpc::EchoService::new(EchoService))
                        .pin_certificate(der.clone())
                        .local_address(SocketAddr::new(source, 0));
                    if let Some(keep_alive) = keep_alive {
                        builder = builder
                            .keep_alive_interval(Some(keep_alive))
                            .idle_timeout(keep_alive * 3);
                    }
                    if let Some((min, max)) = busy_backoff {
                        builder = builder.busy_backoff(min, max);
                    }
                    if let Some(bytes) = max_udp_payload {
                        builder = builder.max_udp_payload(bytes);
                    }
                    builder.connect_with_retry(addr)
                })
                .await
                .unwrap_or_else(|_| {
                    Err(brpc::ConnectError::Timeout {
                        addr,
                        after: Duration::from_secs(600),
                    })
                })
            }
        })
        .buffer_unordered(concurrency.max(1));
    // An agent that could not connect is counted, not fatal: the others
    // stay connected, and the fleet's row shows how many made it.
    let mut failed = 0;
    while let Some(client) = pending.next().await {
        match client {
            Ok(client) => clients.push(client),
            Err(e) => {
                failed += 1;
                eprintln!("agent gave up: {e}");
            }
        }
    }
    println!("ready: {} agents, {failed} gave up", clients.len());
    // Connection attempts after the first connection (a restart storm's
    // reconnects): each failed attempt is a Reconnecting state with
    // attempt > 0, each success one more.
    // Failed attempts are also counted by kind: refused by a busy server,
    // timed out.
    let attempts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let busy = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let timed_out = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watchers: Vec<_> = clients
        .iter()
        .map(|client| {
            let mut state = client.watch_state();
            let (attempts, busy, timed_out) = (attempts.clone(), busy.clone(), timed_out.clone());
            tokio::spawn(async move {
                let mut was_connected = true;
                while state.changed().await.is_ok() {
                    let now = state.borrow_and_update().clone();
                    match now {
                        brpc::ClientState::Reconnecting {
                            attempt,
                            last_error,
                        } if attempt > 0 => {
                            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            match last_error.connect_error() {
                                Some(brpc::client::ConnectError::Busy(_)) => &busy,
                                Some(brpc::client::ConnectError::Timeout { .. }) => &timed_out,
                                _ => continue,
                            }
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        brpc::ClientState::Connected { .. } if !was_connected => {
                            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            was_connected = true;
                        }
                        brpc::ClientState::Reconnecting { .. } => was_connected = false,
                        _ => {}
                    }
                }
            })
        })
        .collect();
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    let gave_up = clients
        .iter()
        .filter(|c| matches!(c.state(), brpc::ClientState::Closed { .. }))
        .count();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "attempts: {} gave-up: {gave_up} busy: {} timed-out: {}",
        count(&attempts),
        count(&busy),
        count(&timed_out),
    );
    for watcher in watchers {
        watcher.abort();
    }
    Ok(())
}

/// `dial ADDR CERT N [--fresh]`: N QUIC handshakes with the server at ADDR,
/// one after another, from one endpoint with brpc's client TLS settings,
/// each connection closed once the handshake is done. A client config is
/// made once and used for every handshake (as a brpc `Client` does for its
/// reconnects: it resumes sessions when the server allows), or with
/// `fresh`, a new one for each (every handshake a full one).
async fn dial(
    addr: SocketAddr,
    cert: &std::path::Path,
    n: usize,
    fresh: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let der = rustls_der(cert)?;
    let config = || -> Result<quinn::ClientConfig, Box<dyn std::error::Error>> {
        let crypto = brpc::tls::client_crypto(brpc::tls::pinned_roots(&der)?)?;
        Ok(quinn::ClientConfig::new(crypto))
    };
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let shared = config()?;
    for _ in 0..n {
        let config = if fresh { config()? } else { shared.clone() };
        let connection = endpoint.connect_with(config, addr, "127.0.0.1")?.await?;
        // The server's session tickets follow its handshake messages: a
        // connection closed at once would often not have them.
        tokio::time::sleep(Duration::from_millis(100)).await;
        connection.close(0u32.into(), b"done");
    }
    endpoint.wait_idle().await;
    Ok(())
}

/// A restart storm: `n` agents connected to a server in a child process;
/// that process is killed (SIGKILL: no GoAway, no CONNECTION_CLOSE) and a
/// new one started on the same address with the same certificate and reset
/// secret, as a supervisor restarts a crashed server. The agents learn of it
/// from the new server's stateless resets (answering their next packet:
/// keep-alive) and reconnect with their backoff. Figures: the time from the
/// new server's start until every agent is back, the agents' connection
/// attempts, and the new server process's CPU over that time.
async fn storm(
    n: usize,
    keep_alive: Option<Duration>,
    priority: AgentPriority,
    max_handshakes: Option<usize>,
    stop: Stop,
) -> Result<String, Box<dyn std::error::Error>> {
    eprintln!("storm: {n} agents ...");
    let dir = std::env::temp_dir().join(format!("brpc-storm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pem = dir.join("server.pem");
    let grace = match stop {
        Stop::Kill => None,
        Stop::Graceful(grace) => Some(grace),
    };
    let (mut server, peers) = storm_server(
        "127.0.0.1:0".parse()?,
        &pem,
        keep_alive,
        max_handshakes,
        grace,
    )?;
    let addr = wait_for_address(&peers)?;
    let cert = dir.join("server.der");
    std::fs::write(&cert, brpc::tls::load_certificate_file(&pem)?)?;
    let children = spawn_agents(addr, n, &cert, true, keep_alive, priority)?;
    let started = Instant::now();
    let limit = Duration::from_secs(30) + Duration::from_millis(10 * n as u64);
    while peers.count() < n && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = peers.count();
    match stop {
        Stop::Kill => server.kill()?,
        Stop::Graceful(_) => {
            // SIGTERM: the storm server shuts down gracefully (its grace
            // set at its start) and exits.
            // SAFETY: a plain kill(2) of our own child's pid.
            if unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGTERM) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
    }
    let _ = server.wait();
    let restarted = Instant::now();
    let agents_cpu_before = processes_cpu_seconds(&children);
    let machine_drops_before = udp_receive_buffer_drops();
    let (mut server, peers) = storm_server(addr, &pem, keep_alive, max_handshakes, None)?;
    // 120 s, or 3 ms per agent for larger fleets (300 s for 100 000).
    let limit = Duration::from_secs(120).max(Duration::from_millis(3 * n as u64));
    // When half, 90% and 99% of the fleet were back.
    let mut milestones = [(50, None), (90, None), (99, None)];
    while peers.count() < before && restarted.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let count = peers.count();
        for (percent, at) in &mut milestones {
            if at.is_none() && count * 100 >= before * *percent {
                *at = Some(restarted.elapsed());
            }
        }
    }
    let back_after = restarted.elapsed();
    let milestones = milestones
        .iter()
        .map(|(percent, at)| match at {
            Some(at) => format!("{percent}%: {:.1} s", at.as_secs_f64()),
            None => format!("{percent}%: not reached"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let back = peers.count();
    let server_drops = udp_drops(addr);
    let machine_drops = udp_receive_buffer_drops().saturating_sub(machine_drops_before);
    let cpu = process_cpu_seconds(server.id());
    let agents_cpu = processes_cpu_seconds(&children) - agents_cpu_before;
    let admission = peers.admission();
    let [
        probed,
        probes_failed,
        probe_p50,
        probe_p99,
        probe_max,
        lag_p50,
        lag_p99,
        lag_max,
    ] = peers.probes();
    let (mut attempts, mut gave_up, mut busy, mut timed_out) = (0u64, 0u64, 0u64, 0u64);
    for mut child in children {
        drop(child.stdin.take());
        let output = child.wait_with_output()?;
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            // "attempts: A gave-up: G busy: B timed-out: T"
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"attempts:") {
                let number =
                    |i: usize| -> u64 { words.get(i).and_then(|w| w.parse().ok()).unwrap_or(0) };
                attempts += number(1);
                gave_up += number(3);
                busy += number(5);
                timed_out += number(7);
            }
        }
    }
    server.kill()?;
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "| {n} | {before} | {back} | {:.1} s ({milestones}) | {attempts} ({:.2} per agent; {busy} refused as busy, {timed_out} timed out) | {gave_up} | {:.1} s ({:.0} µs per agent back) | {} started ({} timed out, {} failed); {} refused (queue full {}, after waiting {}); {} admitted | {:.1} s | {server_drops} at the server; {} elsewhere | {probed} ({probes_failed} failed); {:.1} / {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms |",
        back_after.as_secs_f64(),
        attempts as f64 / before.max(1) as f64,
        cpu,
        cpu / back.max(1) as f64 * 1e6,
        admission[2],
        admission[4],
        admission[3],
        admission[0] + admission[1],
        admission[0],
        admission[1],
        admission[5],
        agents_cpu,
        // Signed: the two counts are kept apart by the kernel and need not
        // agree (the socket's own count is not only full buffers).
        machine_drops as i64 - server_drops as i64,
        probe_p50 as f64 / 1e3,
        probe_p99 as f64 / 1e3,
        probe_max as f64 / 1e3,
        lag_p50 as f64 / 1e3,
        lag_p99 as f64 / 1e3,
        lag_max as f64 / 1e3,
    ))
}

/// The columns of a restart storm's row.
const STORM_HEADER: &str = "| agents | connected | back | time until all back | reconnect attempts | gave up | server CPU during the storm | the new server's handshakes and refusals | agents' CPU during the storm | datagrams dropped | calls to agents back, during the storm: p50 / p99 / longest | the new server's runtime lag: p50 / p99 / longest |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

/// What a storm server process reports: its address, then its peer count.
#[derive(Clone, Default)]
struct Reported {
    addr: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    peers: Arc<std::sync::atomic::AtomicUsize>,
    /// The server's admission counts: refused with the queue full, refused
    /// after waiting, handshakes started, failed, timed out, sessions
    /// admitted.
    admission: Arc<std::sync::Mutex<[u64; 6]>>,
    /// Its calls to agents that are back: made, failed, p50, p99 and the
    /// longest served (µs); then its runtime's lag: p50, p99, longest (µs).
    probes: Arc<std::sync::Mutex<[u64; 8]>>,
}

impl Reported {
    fn count(&self) -> usize {
        self.peers.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn admission(&self) -> [u64; 6] {
        self.admission.lock().map(|a| *a).unwrap_or_default()
    }

    fn probes(&self) -> [u64; 8] {
        self.probes.lock().map(|p| *p).unwrap_or_default()
    }
}

fn wait_for_address(reported: &Reported) -> Result<SocketAddr, Box<dyn std::error::Error>> {
    let started = Instant::now();
    loop {
        if let Some(addr) = *reported.addr.lock().map_err(|_| "lock")? {
            return Ok(addr);
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the storm server did not start".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a storm server process on `addr` with the dev certificate kept in
/// `pem`; a thread follows what it reports.
fn storm_server(
    addr: SocketAddr,
    pem: &std::path::Path,
    keep_alive: Option<Duration>,
    max_handshakes: Option<usize>,
    grace: Option<Duration>,
) -> Result<(std::process::Child, Reported), Box<dyn std::error::Error>> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "storm-server",
            &addr.to_string(),
            &pem.display().to_string(),
        ])
        .env(
            KEEP_ALIVE_VAR,
            keep_alive.map_or(String::new(), |k| k.as_secs().to_string()),
        )
        .env(
            MAX_HANDSHAKES_VAR,
            max_handshakes.map_or(String::new(), |n| n.to_string()),
        )
        .env(
            GRACE_VAR,
            grace.map_or(String::new(), |g| g.as_millis().to_string()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let reported = Reported::default();
    let follow = reported.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.strip_prefix("addr ") {
                if let (Ok(mut slot), Ok(addr)) = (follow.addr.lock(), addr.parse()) {
                    *slot = Some(addr);
                }
            } else if let Some(counts) = line.strip_prefix("admission ") {
                if let Ok(mut slot) = follow.admission.lock() {
                    *slot = parse_counts(counts);
                }
            } else if let Some(counts) = line.strip_prefix("probes ") {
                if let Ok(mut slot) = follow.probes.lock() {
                    *slot = parse_counts(counts);
                }
            } else if let Some(count) = line.strip_prefix("peers ") {
                follow.peers.store(
                    count.parse().unwrap_or(0),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
    });
    Ok((child, reported))
}

/// The environment variable giving a storm server's
/// `Builder::max_handshakes` (unset: brpc's default).
const MAX_HANDSHAKES_VAR: &str = "BRPC_BENCH_MAX_HANDSHAKES";

/// The first `N` numbers of a line a storm server reports (0 for any missing
/// or not a number).
fn parse_counts<const N: usize>(counts: &str) -> [u64; N] {
    let mut parsed = [0u64; N];
    for (slot, word) in parsed.iter_mut().zip(counts.split_whitespace()) {
        *slot = word.parse().unwrap_or(0);
    }
    parsed
}

/// The environment variable giving a storm server the grace (ms) of its
/// graceful shutdown on SIGTERM (unset: it is killed instead).
const GRACE_VAR: &str = "BRPC_BENCH_GRACE_MS";

/// How a storm stops its first server.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGKILL: no GoAway, no CONNECTION_CLOSE (a crash).
    Kill,
    /// `Server::shutdown`: GoAway to every agent, then refusing new
    /// connections for this long (the grace, which calls in flight would
    /// hold), then gone.
    Graceful(Duration),
}

/// How the agents' processes are scheduled beside the server.
#[derive(Clone, Copy, Debug)]
enum AgentPriority {
    /// As the server.
    Normal,
    /// At this `nice` value: a smaller share of the CPU when both want it.
    Nice(u8),
    /// `SCHED_IDLE`: only when the server's threads (and everything else)
    /// leave a core free.
    Idle,
}

/// The storm server: binds `addr` (retrying while the killed one's socket
/// is still there), then prints its peer count every 20 ms.
async fn serve_storm(
    addr: SocketAddr,
    pem: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    raise_descriptor_limit();
    let started = Instant::now();
    let idle_timeout = keep_alive_from_env().map(|k| k * 3);
    let server = loop {
        let mut builder = Server::builder()
            .add_service(EchoServer::new(EchoService))
            .dev_certificate_file(pem);
        if let Some(idle) = idle_timeout {
            builder = builder.idle_timeout(idle);
        }
        if let Some(bytes) = max_udp_payload_from_env() {
            builder = builder.max_udp_payload(bytes);
        }
        if let Some(n) = std::env::var(MAX_HANDSHAKES_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            builder = builder.max_handshakes(n);
        }
        match builder.bind(addr) {
            Ok(server) => break server,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    println!("addr {}", server.local_addr());
    let probes = Arc::new(std::sync::Mutex::new(Probes::default()));
    tokio::spawn(probe_agents(server.peers().clone(), probes.clone()));
    let lags = Arc::new(std::sync::Mutex::new(Latencies::default()));
    tokio::spawn(watch_lag(lags.clone()));
    let grace = std::env::var(GRACE_VAR)
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    for turn in 0u64.. {
        if let Some(grace) = grace
            && futures_util::FutureExt::now_or_never(terminate.recv())
                .flatten()
                .is_some()
        {
            // GoAway to every agent; with no calls in flight the shutdown
            // ends at once, and the server goes on refusing new connections
            // for the rest of the grace, as calls in flight would hold it.
            let deadline = tokio::time::Instant::now() + grace;
            server.shutdown(grace).await;
            tokio::time::sleep_until(deadline).await;
            return Ok(());
        }
        let a = server.admission_stats();
        // Every 200 ms.
        if turn % 10 == 0
            && let (Ok(probes), Ok(lags)) = (probes.lock(), lags.lock())
        {
            let micros = |d: Duration| d.as_micros();
            println!(
                "probes {} {} {} {} {} {} {} {}",
                probes.ended,
                probes.failed,
                micros(probes.served.percentile(50.0)),
                micros(probes.served.percentile(99.0)),
                micros(probes.served.longest()),
                micros(lags.percentile(50.0)),
                micros(lags.percentile(99.0)),
                micros(lags.longest()),
            );
        }
        println!(
            "admission {} {} {} {} {} {}",
            a.refused_queue_full,
            a.refused_after_waiting,
            a.handshakes_started,
            a.handshakes_failed,
            a.handshakes_timed_out,
            a.admitted,
        );
        println!("peers {}", server.peers().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// How often the storm server calls an agent that is back.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// The deadline of those calls.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// Whether a server busy with a fleet's handshakes still serves the agents
/// already back: every [`PROBE_EVERY`] it calls the next connected agent
/// (in connection-id order, round and round) with a 16-byte Echo, each call
/// on its own task, and records each call's time in µs (`None`: failed or
/// past [`PROBE_DEADLINE`]).
async fn probe_agents(peers: brpc::server::Registry, probes: Arc<std::sync::Mutex<Probes>>) {
    let mut after = None;
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let peer = match peers.page(after, 1).pop() {
            Some(peer) => peer,
            None => match peers.page(None, 1).pop() {
                Some(peer) => peer,
                None => continue,
            },
        };
        after = Some(peer.connection_id());
        let probes = probes.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut client = peer.client(proto::echo_brpc::EchoClient::new);
            let call = client.unary(EchoRequest {
                blob: Bytes::from_static(&[7; 16]),
                ..Default::default()
            });
            let served = matches!(tokio::time::timeout(PROBE_DEADLINE, call).await, Ok(Ok(_)));
            let took = started.elapsed();
            if let Ok(mut probes) = probes.lock() {
                probes.ended += 1;
                if served {
                    probes.served.record(took);
                } else {
                    probes.failed += 1;
                }
            }
        });
    }
}

/// How late the storm server's runtime runs a task whose timer is due: a
/// task sleeps 10 ms at a time and records how much longer it took.
/// Late by milliseconds, every task of the server waits that long for a
/// worker: its connections' drivers and its calls' handlers too.
async fn watch_lag(lags: Arc<std::sync::Mutex<Latencies>>) {
    loop {
        let due = tokio::time::Instant::now() + Duration::from_millis(10);
        tokio::time::sleep_until(due).await;
        let late = due.elapsed();
        if let Ok(mut lags) = lags.lock() {
            lags.record(late);
        }
    }
}

/// The storm server's calls to agents that are back.
#[derive(Default)]
struct Probes {
    /// Calls that ended, and of them those that failed or ran out of time.
    ended: u64,
    failed: u64,
    /// How long the served ones took.
    served: Latencies,
}

/// The user + system CPU time so far of every process in `children`.
fn processes_cpu_seconds(children: &[std::process::Child]) -> f64 {
    children.iter().map(|c| process_cpu_seconds(c.id())).sum()
}

/// A process's user + system CPU time so far, from /proc (0 if unreadable).
fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// `n` agents of `addr` in child processes of at most [`AGENTS_PER_PROCESS`]
/// each, pinning the certificate in `cert` (DER), each process dialling
/// from its own loopback address; with `report`, their standard output
/// (what they report on exit) is piped back. Closing a child's standard
/// input ends it.
fn spawn_agents(
    addr: SocketAddr,
    n: usize,
    cert: &std::path::Path,
    report: bool,
    keep_alive: Option<Duration>,
    priority: AgentPriority,
) -> Result<Vec<std::process::Child>, Box<dyn std::error::Error>> {
    let mut children = Vec::new();
    let mut left = n;
    let processes = n.div_ceil(AGENTS_PER_PROCESS).max(1);
    // Handshakes in flight across all agent processes: about 256, however
    // many processes share them (at 64 each, ten processes' 640 handshakes
    // at once on two cores made thousands time out).
    let concurrency = (256 / processes).clamp(16, 64);
    while left > 0 {
        let share = left.min(AGENTS_PER_PROCESS);
        left -= share;
        let source = agent_source(children.len());
        // `nice` and `chrt` run the agents at a lower priority (they exec
        // them: the child's pid is the agents' process).
        let mut command = match priority {
            AgentPriority::Normal => std::process::Command::new(std::env::current_exe()?),
            AgentPriority::Nice(n) => {
                let mut command = std::process::Command::new("nice");
                command
                    .args(["-n", &n.to_string()])
                    .arg(std::env::current_exe()?);
                command
            }
            AgentPriority::Idle => {
                let mut command = std::process::Command::new("chrt");
                command.args(["--idle", "0"]).arg(std::env::current_exe()?);
                command
            }
        };
        children.push(
            command
                .args([
                    "agents",
                    &addr.to_string(),
                    &share.to_string(),
                    &cert.display().to_string(),
                    &source.to_string(),
                    &concurrency.to_string(),
                ])
                .env(
                    KEEP_ALIVE_VAR,
                    keep_alive.map_or(String::new(), |k| k.as_secs().to_string()),
                )
                .stdin(std::process::Stdio::piped())
                .stdout(if report {
                    std::process::Stdio::piped()
                } else {
                    std::process::Stdio::null()
                })
                .spawn()?,
        );
    }
    Ok(children)
}

/// `brpc-bench fleet n` as a process of its own: heap that earlier runs in
/// this process freed stays resident and would hide, in the RSS figure,
/// what the fleet's connections cost.
fn fleet_process(n: usize, keep_alive: Option<u64>) -> std::io::Result<std::process::Command> {
    let mut child = std::process::Command::new(std::env::current_exe()?);
    child.args(["fleet", &n.to_string()]);
    if let Some(k) = keep_alive {
        child.args(["--keep-alive", &k.to_string()]);
    }
    Ok(child)
}

/// One fleet run's figures.
struct Fleet {
    agents: usize,
    connected: usize,
    connect: Duration,
    rss_per_agent: f64,
    broadcast: Duration,
    p50: Duration,
    p99: Duration,
    failures: usize,
    agent_rss: f64,
    server_cpu_per_call: Duration,
    /// The agent processes' CPU over the broadcast, per call.
    agents_cpu_per_call: Duration,
    /// The server's CPU while the fleet is connected and idle, in cores.
    idle_cpu: f64,
    /// The agent processes' CPU over the same time, in cores.
    agents_idle_cpu: f64,
    /// Datagrams dropped on the server's socket over the run.
    drops: u64,
}

impl Fleet {
    const HEADER: &str = "| agents | connected | time to connect all | server RSS per agent | broadcast total | p50 | p99 | failures | agent-side RSS per agent | server CPU per broadcast call | agents' CPU per broadcast call | server CPU while idle | agents' CPU while idle | datagrams dropped at the server |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

    fn row(&self) -> String {
        format!(
            "| {} | {} | {:.1} s | {:.1} KB | {:.0} ms | {:.1} ms | {:.1} ms | {} | {:.1} KB | {:.0} µs | {:.0} µs | {:.0}% of a core | {:.0}% of a core | {} |",
            self.agents,
            self.connected,
            self.connect.as_secs_f64(),
            self.rss_per_agent / 1000.0,
            self.broadcast.as_secs_f64() * 1e3,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.failures,
            self.agent_rss / 1000.0,
            self.server_cpu_per_call.as_secs_f64() * 1e6,
            self.agents_cpu_per_call.as_secs_f64() * 1e6,
            self.idle_cpu * 100.0,
            self.agents_idle_cpu * 100.0,
            self.drops,
        )
    }
}

/// N agents (in child processes) connect to one server; then the server
/// broadcasts a 16-byte Echo call to every one of them (256 at a time at
/// first, more while they answer quickly; 5 s timeout each), through the direct path on both ends (the agents serve
/// Echo with `add_direct`, the server calls with brpc-build's client).
async fn fleet(
    n: usize,
    keep_alive: Option<Duration>,
) -> Result<Fleet, Box<dyn std::error::Error>> {
    eprintln!("fleet: {n} agents ...");
    let dir = std::env::temp_dir().join(format!("brpc-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut builder = Server::builder().add_service(EchoServer::new(EchoService));
    if let Some(keep_alive) = keep_alive {
        builder = builder.idle_timeout(keep_alive * 3);
    }
    if let Some(bytes) = max_udp_payload_from_env() {
        builder = builder.max_udp_payload(bytes);
    }
    let server = builder.bind("127.0.0.1:0")?;
    let cert = dir.join("server.der");
    std::fs::write(&cert, server.certificate())?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = rss_bytes();
    let drops_before = udp_drops(server.local_addr());
    let started = Instant::now();
    let children = spawn_agents(
        server.local_addr(),
        n,
        &cert,
        false,
        keep_alive,
        AgentPriority::Normal,
    )?;
    let limit = Duration::from_secs(30) + Duration::from_millis(10 * n as u64);
    while server.peers().len() < n && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect = started.elapsed();
    let connected = server.peers().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_per_agent = rss_bytes().saturating_sub(rss_before) as f64 / connected.max(1) as f64;
    // What the connected fleet costs the server while nobody calls:
    // keep-alives and their acknowledgements.
    // And the agents, on their side: their keep-alives, the server's
    // acknowledgements, their runtimes' timers.
    let idle_started = (
        Instant::now(),
        cpu_seconds(),
        processes_cpu_seconds(&children),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_seconds = idle_started.0.elapsed().as_secs_f64();
    let idle_cpu = (cpu_seconds() - idle_started.1) / idle_seconds;
    let agents_idle_cpu =
        (processes_cpu_seconds(&children) - idle_started.2).max(0.0) / idle_seconds;
    // What the agents cost on their side: their processes' RSS (runtime and
    // binary included) over the agents they hold.
    let agent_rss = children
        .iter()
        .map(|child| process_rss(child.id()))
        .sum::<u64>() as f64
        / connected.max(1) as f64;

    let payload = Bytes::from(vec![7u8; 16]);
    // The default concurrency (256 at the start, up to 4096 while calls
    // answer about as fast as in the fastest round). A fixed 2048 at once overflowed
    // the server's one UDP socket with answers: 7 125 datagrams were dropped
    // and the broadcast took 2.1 s instead of 0.7–0.9 s.
    let options = brpc::BroadcastOptions {
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    eprintln!("fleet: {connected} connected in {connect:.1?}; broadcasting ...");
    let started = Instant::now();
    // This process is the server (and the broadcast's caller): its CPU time
    // over the broadcast is the server's cost of it.
    let cpu_before = cpu_seconds();
    let agents_cpu_before = processes_cpu_seconds(&children);
    let broadcast_once = || {
        brpc::broadcast(server.peers().list(), options, |peer| {
            let blob = payload.clone();
            async move {
                let reply = peer
                    .client(proto::echo_brpc::EchoClient::new)
                    .unary(EchoRequest {
                        blob,
                        ..Default::default()
                    })
                    .await?;
                Ok(reply.into_inner().blob.len())
            }
        })
        .collect::<Vec<_>>()
    };
    let results = broadcast_once().await;
    let broadcast = started.elapsed();
    eprintln!("fleet: broadcast done in {broadcast:.1?}");
    let server_cpu_per_call =
        Duration::from_secs_f64((cpu_seconds() - cpu_before) / results.len().max(1) as f64);
    let agents_cpu_per_call = Duration::from_secs_f64(
        (processes_cpu_seconds(&children) - agents_cpu_before).max(0.0)
            / results.len().max(1) as f64,
    );
    let drops = udp_drops(server.local_addr()).saturating_sub(drops_before);
    // More broadcasts, for a profiler to watch (not reported).
    let extra: usize = std::env::var(EXTRA_BROADCASTS_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for round in 0..extra {
        let started = Instant::now();
        let done = broadcast_once().await;
        let ok = done.iter().filter(|r| r.result.is_ok()).count();
        eprintln!(
            "fleet: extra broadcast {round}: {ok}/{} in {:.1?}",
            done.len(),
            started.elapsed()
        );
    }
    let mut latencies = Latencies::default();
    for r in results.iter().filter(|r| r.result.is_ok()) {
        latencies.record(r.elapsed);
    }
    let failures = results.len() - latencies.len() as usize + (n - connected);
    for mut child in children {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    server.close();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Fleet {
        agents: n,
        connected,
        connect,
        rss_per_agent,
        broadcast,
        p50: latencies.percentile(50.0),
        p99: latencies.percentile(99.0),
        failures,
        agent_rss,
        server_cpu_per_call,
        agents_cpu_per_call,
        idle_cpu,
        agents_idle_cpu,
        drops,
    })
}

/// Datagrams the kernel dropped on the UDP socket bound to `addr` (an IPv4
/// address) on this machine, from /proc/net/udp (the socket's own count:
/// mostly a full receive buffer); 0 if unknown. The whole local address is
/// matched: agents on other loopback addresses may have the same port.
fn udp_drops(addr: SocketAddr) -> u64 {
    let Ok(table) = std::fs::read_to_string("/proc/net/udp") else {
        return 0;
    };
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        return 0;
    };
    // The kernel prints the address as the u32 it holds (network order
    // bytes, read in the host's order) in hex, then the port.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(ip.octets()),
        addr.port()
    );
    table
        .lines()
        .skip(1)
        .filter(|line| line.split_whitespace().nth(1) == Some(local.as_str()))
        .filter_map(|line| line.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// Bytes of heap in use (glibc's count of allocated bytes).
fn heap_in_use() -> f64 {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    #[allow(unsafe_code)]
    let info = unsafe { libc::mallinfo2() };
    info.uordblks as f64
}

/// Server RSS growth and heap growth per idle client, in bytes.
async fn memory_per_client(
    stack: &str,
    n: usize,
    dir: &std::path::Path,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    use std::io::BufRead;
    let cert_path = dir.join(format!("{stack}.der"));
    let mut guards: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let addr: SocketAddr = match stack {
        "brpc" => {
            let server = Server::builder()
                .add_service(EchoServer::new(EchoService))
                .bind("127.0.0.1:0")?;
            std::fs::write(&cert_path, server.certificate())?;
            let addr = server.local_addr();
            guards.push(Box::new(server));
            addr
        }
        "quinn" => {
            let dev = brpc::tls::DevCertificate::generate()?;
            std::fs::write(&cert_path, dev.certificate())?;
            let crypto =
                brpc::tls::server_crypto(vec![dev.certificate().clone()], dev.private_key())?;
            // brpc's transport settings (call window, no unidirectional
            // streams, keep-alives, idle timeout): quinn's own floor for
            // what a brpc connection is.
            let mut config = quinn::ServerConfig::with_crypto(crypto);
            config.transport_config(brpc::core::conn::transport_config(
                &brpc::core::conn::TransportOptions::default(),
            ));
            let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?;
            let addr = endpoint.local_addr()?;
            let accept = endpoint.clone();
            guards.push(Box::new(AbortOnDrop::new(tokio::spawn(async move {
                while let Some(incoming) = accept.accept().await {
                    tokio::spawn(async move {
                        if let Ok(conn) = incoming.await {
                            quinn_serve(conn).await;
                        }
                    });
                }
            }))));
            guards.push(Box::new(endpoint));
            addr
        }
        _ => {
            std::fs::write(&cert_path, b"unused")?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            guards.push(Box::new(AbortOnDrop::new(tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(EchoServer::new(EchoService))
                    .serve_with_incoming(incoming),
            ))));
            addr
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes();
    let heap_before = heap_in_use();
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "clients",
            stack,
            &addr.to_string(),
            &n.to_string(),
            &cert_path.display().to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        line
    })
    .await?;
    if !ready.contains("ready") {
        let _ = child.kill();
        return Err(format!("{stack} clients did not connect").into());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_bytes();
    let heap = heap_in_use() - heap_before;
    drop(child.stdin.take());
    let _ = child.wait();
    drop(guards);
    Ok((
        after.saturating_sub(before) as f64 / n as f64,
        heap / n as f64,
    ))
}

/// The side-by-side benchmark (see the module doc). Without a subcommand:
/// the full run, which writes BENCHMARKS.md, benchmarks.json and
/// benchmarks.svg.
#[derive(clap::Parser)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A smoke run (short phases, smaller fleets): checks that every stack
    /// works; its figures are not for quoting.
    #[arg(long)]
    quick: bool,
    /// Run one stack only (for profiling); nothing is written.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(STACKS.iter().copied()))]
    stack: Option<String>,
    /// With --stack: 10 s of 16-byte calls at concurrency 64 and nothing else.
    #[arg(long, requires = "stack", conflicts_with = "c1_only")]
    c64_only: bool,
    /// With --stack: 10 s of 16-byte calls at concurrency 1 and nothing else.
    #[arg(long, requires = "stack")]
    c1_only: bool,
    /// Fleet sizes for the full run's "Fleet scale" rows, each in a fresh
    /// process (default 10000; 1000 with --quick). The first size is the one
    /// the targets table judges.
    #[arg(long, num_args = 1.., value_name = "N")]
    fleet: Vec<usize>,
    /// Restart storms for the full run's "Restart storm" rows, one per size
    /// (default: none).
    #[arg(long, num_args = 1.., value_name = "N")]
    storm: Vec<usize>,
    /// The agents' keep-alive interval in seconds for the full run's fleets
    /// and storms (default: brpc's, 3 s); both sides' idle timeout is three
    /// times it.
    #[arg(long, value_name = "SECONDS")]
    fleet_keep_alive: Option<u64>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// One fleet run per size, printed as a table row; nothing written.
    /// With several sizes, each runs in a fresh process: memory an earlier
    /// fleet freed would otherwise stay resident and hide a later one's
    /// growth in RSS.
    Fleet {
        /// Agents per run.
        #[arg(required = true)]
        sizes: Vec<usize>,
        /// The agents' keep-alive interval in seconds (default: brpc's,
        /// 3 s); both sides' idle timeout is set to three times it.
        #[arg(long)]
        keep_alive: Option<u64>,
    },
    /// Restart storms: N agents connected, the server restarted on the same
    /// address; one table row per size, nothing written.
    Storm {
        /// Agents per run.
        #[arg(required = true)]
        sizes: Vec<usize>,
        /// The agents' keep-alive interval in seconds (default: brpc's,
        /// 3 s); both sides' idle timeout is set to three times it.
        #[arg(long)]
        keep_alive: Option<u64>,
        /// Run the agents' processes at this `nice` value (0: as the
        /// server): a smaller share of the CPU when the server wants it too.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=19))]
        agents_nice: u8,
        /// Run the agents' processes as `SCHED_IDLE` (`chrt --idle 0`): on
        /// a core only when the server leaves it free, the closest this
        /// machine comes to agents on machines of their own.
        #[arg(long, conflicts_with = "agents_nice")]
        agents_idle: bool,
        /// The server's `Builder::max_handshakes` (default: brpc's).
        #[arg(long)]
        max_handshakes: Option<usize>,
        /// Stop the server gracefully instead of killing it: GoAway to
        /// every agent, then refusing new connections for this many seconds
        /// (a shutdown's grace, as calls in flight would hold it), then the
        /// new server.
        #[arg(long)]
        graceful: Option<u64>,
    },
    /// (Internal) a storm's server process.
    #[command(hide = true, name = "storm-server")]
    StormServer {
        addr: SocketAddr,
        pem: std::path::PathBuf,
    },
    /// (Internal) hold N idle clients of a stack for the memory figure.
    #[command(hide = true)]
    Clients {
        stack: String,
        addr: SocketAddr,
        n: usize,
        cert: std::path::PathBuf,
    },
    /// (Internal) hold N fleet agents in this process.
    #[command(hide = true)]
    Agents {
        addr: SocketAddr,
        n: usize,
        cert: std::path::PathBuf,
        source: std::net::IpAddr,
        concurrency: usize,
    },
    /// Instructions per 16-byte unary call at concurrency 64, client and
    /// server together, counted by valgrind's callgrind: each stack runs
    /// `calls` and then twice as many calls in fresh processes, and the
    /// difference of the two counts is divided by the difference in calls,
    /// so start-up and warm-up cancel out. Needs `valgrind` on the PATH.
    Instructions {
        /// Calls in the shorter run (the longer one makes twice as many).
        #[arg(long, default_value_t = 2000)]
        calls: u64,
        /// The stacks to count (default: brpc, brpc-direct, quinn, ttrpc-unix, brpc-unix, brpc-direct-unix).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(STACKS.iter().chain(COUNTED_ONLY).copied()))]
        stacks: Vec<String>,
    },
    /// (Internal) make exactly N calls at concurrency 64 after a warm-up,
    /// for `instructions` to count under callgrind (by hand: `--bytes` and
    /// `--tasks` for other shapes, e.g. 1 MiB at 8).
    #[command(hide = true)]
    Count {
        stack: String,
        calls: u64,
        /// Message size.
        #[arg(long, default_value_t = 16)]
        bytes: usize,
        /// Calls at once.
        #[arg(long, default_value_t = 64)]
        tasks: u64,
        /// Worker threads: 1 (the default) runs a current-thread runtime,
        /// more a multi-thread one (as the side-by-side run uses 2).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// (Internal) N QUIC handshakes in a row with the server at ADDR,
    /// pinning CERT (DER): for counting what a handshake costs either end
    /// under callgrind (the server, e.g. a `storm-server`, in another
    /// process).
    #[command(hide = true)]
    Dial {
        addr: SocketAddr,
        cert: std::path::PathBuf,
        n: usize,
        /// A new client config for each handshake (no session resumption).
        #[arg(long)]
        fresh: bool,
    },
    /// (Internal) run one stack and measure a round of it each time a
    /// `round` line arrives on standard input (the tonic-h3 stack of a full
    /// run, in a binary built with `--features tonic-h3`).
    #[command(hide = true, name = "rounds-child")]
    RoundsChild {
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(STACKS.iter().copied()))]
        stack: String,
        /// Length of each of a round's three phases.
        #[arg(long)]
        phase_ms: u64,
    },
    /// A broadcast over a long round trip: N agents in this process dial
    /// the server through a UDP relay that holds every datagram for half of
    /// RTT_MS each way; then broadcasts with a fixed 256 calls in flight and
    /// with the default (adaptive) options, in turn. Nothing written.
    #[command(name = "wan-broadcast")]
    WanBroadcast {
        /// Agents.
        n: usize,
        /// The round trip the relay adds, in milliseconds.
        #[arg(long, default_value_t = 100)]
        rtt_ms: u64,
        /// Broadcasts of each kind.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// (Internal) measure a stack's memory per idle client in a fresh process.
    #[command(hide = true)]
    Memory {
        stack: String,
        n: usize,
        dir: std::path::PathBuf,
    },
}

/// The stacks, with tonic-h3 when built with `--features tonic-h3` (its
/// dependencies turn on tracing's `log` feature for the whole binary, which
/// adds instructions to every stack's count; so it is off by default).
const STACKS: &[&str] = &[
    "tonic",
    "tonic-tls",
    #[cfg(feature = "tonic-h3")]
    "tonic-h3",
    "quinn",
    "quinn-buf",
    "brpc",
    "brpc-direct",
    "brpc-reverse",
    "brpc-relay",
    "ttrpc-unix",
    "brpc-unix",
    "brpc-direct-unix",
];

/// Stacks only counted (`instructions`), never timed: tonic-mem has no
/// transport, so its calls per second say nothing of a stack.
const COUNTED_ONLY: &[&str] = &["tonic-mem"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = <Cli as clap::Parser>::parse();
    match cli.command {
        Some(Command::Clients {
            stack,
            addr,
            n,
            cert,
        }) => return hold_clients(&stack, addr, n, &cert).await,
        Some(Command::Agents {
            addr,
            n,
            cert,
            source,
            concurrency,
        }) => return hold_agents(addr, n, &cert, source, concurrency).await,
        Some(Command::StormServer { addr, pem }) => return serve_storm(addr, &pem).await,
        Some(Command::RoundsChild { stack, phase_ms }) => {
            return rounds_child(&stack, Duration::from_millis(phase_ms)).await;
        }
        Some(Command::Dial {
            addr,
            cert,
            n,
            fresh,
        }) => return dial(addr, &cert, n, fresh).await,
        Some(Command::Storm {
            sizes,
            keep_alive,
            agents_nice,
            agents_idle,
            max_handshakes,
            graceful,
        }) => {
            let priority = match (agents_idle, agents_nice) {
                (true, _) => AgentPriority::Idle,
                (false, 0) => AgentPriority::Normal,
                (false, n) => AgentPriority::Nice(n),
            };
            println!("{STORM_HEADER}");
            for n in sizes {
                let keep_alive = keep_alive.map(Duration::from_secs);
                let stop =
                    graceful.map_or(Stop::Kill, |secs| Stop::Graceful(Duration::from_secs(secs)));
                let row = storm(n, keep_alive, priority, max_handshakes, stop).await?;
                println!("{row}");
            }
            return Ok(());
        }
        Some(Command::WanBroadcast { n, rtt_ms, rounds }) => {
            return wan_broadcast(n, Duration::from_millis(rtt_ms), rounds).await;
        }
        Some(Command::Fleet { sizes, keep_alive }) => {
            if let [n] = sizes[..] {
                let f = fleet(n, keep_alive.map(Duration::from_secs)).await?;
                println!("{}", f.row());
            } else {
                for n in sizes {
                    let status = fleet_process(n, keep_alive)?.status()?;
                    if !status.success() {
                        return Err(format!("the fleet of {n} failed: {status}").into());
                    }
                }
            }
            return Ok(());
        }
        Some(Command::Instructions { calls, stacks }) => {
            let stacks = if stacks.is_empty() {
                [
                    "brpc",
                    "brpc-direct",
                    "quinn",
                    "ttrpc-unix",
                    "brpc-unix",
                    "brpc-direct-unix",
                ]
                .map(String::from)
                .to_vec()
            } else {
                stacks
            };
            for stack in stacks {
                let per_call = instructions_per_call(&stack, calls)?;
                println!("{stack}: {:.1}k instructions per call", per_call / 1e3);
            }
            return Ok(());
        }
        Some(Command::Count {
            stack,
            calls,
            bytes,
            tasks,
            threads,
        }) => {
            // By default on a runtime of one thread of its own: the
            // scheduling, and so the count, varies much less from run to run
            // than on two.
            let counted = std::thread::spawn(move || -> Result<(), String> {
                let mut builder = if threads > 1 {
                    let mut builder = tokio::runtime::Builder::new_multi_thread();
                    builder.worker_threads(threads);
                    builder
                } else {
                    tokio::runtime::Builder::new_current_thread()
                };
                let runtime = builder.enable_all().build().map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let dir =
                        std::env::temp_dir().join(format!("brpc-count-{}", std::process::id()));
                    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                    let running = start(&stack, &dir).await.map_err(|e| e.to_string())?;
                    let small = Bytes::from(vec![7u8; 16]);
                    count_calls(&running.caller, small, 256, 64).await?;
                    let payload = Bytes::from(vec![7u8; bytes]);
                    count_calls(&running.caller, payload, calls, tasks).await?;
                    drop(running);
                    let _ = std::fs::remove_dir_all(&dir);
                    Ok(())
                })
            })
            .join()
            .map_err(|_| "the counting thread panicked")?;
            return Ok(counted?);
        }
        Some(Command::Memory { stack, n, dir }) => {
            // A fresh server process per stack, so no earlier run's freed
            // heap hides what the connections cost.
            let (rss, heap) = memory_per_client(&stack, n, &dir).await?;
            println!("{rss} {heap}");
            return Ok(());
        }
        None => {}
    }
    let quick = cli.quick;
    let (phase, repeats) = if quick {
        (Duration::from_millis(400), 3)
    } else {
        (Duration::from_secs(2), 3)
    };
    let dir = std::env::temp_dir().join(format!("brpc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let only = cli.stack;
    let stacks: Vec<&str> = STACKS
        .iter()
        .copied()
        .filter(|s| only.as_deref().is_none_or(|o| o == *s))
        .collect();
    // `--stack NAME --c64-only` (or `--c1-only`): 10 s of 16-byte calls at
    // that concurrency and nothing else, for a profiler to look at the
    // per-call path alone.
    let only_concurrency = if cli.c64_only {
        Some(64)
    } else if cli.c1_only {
        Some(1)
    } else {
        None
    };
    if let (Some(stack), Some(concurrency)) = (&only, only_concurrency) {
        let running = start(stack, &dir).await?;
        let small = Bytes::from(vec![7u8; 16]);
        let warm = measure(
            &running.caller,
            small.clone(),
            concurrency,
            Duration::from_secs(1),
        )
        .await;
        let r = measure(&running.caller, small, concurrency, Duration::from_secs(10)).await;
        println!(
            "{stack}: c={concurrency} {:.0}/s, p50 {:.0} µs, {:.1} µs CPU per call; {} calls in all",
            r.calls as f64 / r.elapsed.as_secs_f64(),
            r.latencies.percentile(50.0).as_secs_f64() * 1e6,
            r.cpu / r.calls.max(1) as f64 * 1e6,
            warm.calls + r.calls
        );
        return Ok(());
    }
    // tonic-h3 in a child process of its own binary, when there is one
    // and this binary lacks the stack (see `h3_binary`).
    let h3_child = h3_binary();
    let mut stacks = stacks;
    if h3_child.is_some() && only.is_none() {
        let at = stacks
            .iter()
            .position(|s| *s == "tonic-tls")
            .map_or(stacks.len(), |i| i + 1);
        stacks.insert(at, "tonic-h3");
    }
    let child = h3_child.as_deref().map(|binary| ("tonic-h3", binary));
    let results = bench_stacks(&stacks, child, &dir, phase, repeats).await?;
    if let Some(stack) = only {
        for (_, f) in &results {
            println!(
                "{stack}: c=1 {:.0}/s p50 {:.0} µs; c=64 {:.0}/s; 1 MiB {:.0} MB/s",
                f.c1_calls, f.c1_p50_us, f.c64_calls, f.mib_mbps
            );
        }
        return Ok(());
    }
    // Instructions per call under callgrind (full runs only): a figure
    // that does not move with the machine's noise.
    let mut instructions: Vec<(&str, f64)> = Vec::new();
    if !quick {
        for stack in [
            "quinn",
            "brpc-direct",
            "brpc",
            "tonic",
            "tonic-tls",
            "tonic-h3",
            "tonic-mem",
            "ttrpc-unix",
            "brpc-direct-unix",
            "brpc-unix",
            "brpc-reverse",
            "brpc-relay",
        ]
        .into_iter()
        .filter(|stack| STACKS.contains(stack) || COUNTED_ONLY.contains(stack))
        {
            eprintln!("instructions: {stack} ...");
            match instructions_per_call(stack, 3000) {
                Ok(n) => instructions.push((stack, n)),
                Err(e) => eprintln!("  {stack}: {e}"),
            }
        }
    }
    let mut instruction_table = String::from(
        "| stack | instructions per call (both ends) | vs raw quinn |\n|---|---:|---:|\n",
    );
    let quinn_instr = instructions
        .iter()
        .find(|(s, _)| *s == "quinn")
        .map(|(_, n)| *n);
    for (stack, n) in &instructions {
        let vs = quinn_instr.map_or(String::new(), |q| format!("{:.2}×", n / q));
        instruction_table += &format!("| {stack} | {:.1}k | {vs} |\n", n / 1000.0);
    }
    if instructions.is_empty() {
        instruction_table = "Not measured (`--quick`, or valgrind missing).\n".to_owned();
    }
    let memory_n = if quick { 300 } else { 2000 };
    let mut memory = Vec::new();
    for stack in ["brpc", "quinn", "tonic"] {
        eprintln!("memory: {memory_n} idle {stack} clients ...");
        let out = std::process::Command::new(std::env::current_exe()?)
            .args([
                "memory",
                stack,
                &memory_n.to_string(),
                &dir.display().to_string(),
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut numbers = text.split_whitespace().map(str::parse::<f64>);
        match (numbers.next(), numbers.next()) {
            (Some(Ok(rss)), Some(Ok(heap))) => memory.push((stack, rss, heap)),
            _ => eprintln!("  {stack}: {}", String::from_utf8_lossy(&out.stderr)),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut memory_table = format!(
        "| stack | server RSS per idle client (N = {memory_n}) | server heap in use per idle client |\n|---|---:|---:|\n"
    );
    for (stack, rss, heap) in &memory {
        memory_table += &format!(
            "| {stack} | {:.1} KB | {:.1} KB |\n",
            rss / 1000.0,
            heap / 1000.0
        );
    }
    println!("{memory_table}");

    let fleet_sizes = if !cli.fleet.is_empty() {
        cli.fleet.clone()
    } else if quick {
        vec![1000]
    } else {
        vec![10_000]
    };
    let fleet_n = fleet_sizes[0];
    let mut fleet_rows = Vec::new();
    for &n in &fleet_sizes {
        eprintln!("fleet: {n} agents ...");
        let row = fleet_process(n, cli.fleet_keep_alive)?
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default();
        fleet_rows.push(row);
    }
    // A fleet that failed (no row printed) is named in the table; the
    // targets table then has no fleet row.
    let fleet_row = fleet_sizes
        .iter()
        .zip(&fleet_rows)
        .map(|(n, row)| {
            if row.is_empty() {
                format!("| {n} | the fleet run failed (see stderr) |")
            } else {
                row.clone()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let fleet_cell = |i: usize| {
        fleet_rows[0]
            .split('|')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .nth(i)
            .unwrap_or("")
            .to_owned()
    };
    println!("{}\n{fleet_row}", Fleet::HEADER);

    let mut storm_rows = Vec::new();
    for &n in &cli.storm {
        let keep_alive = cli.fleet_keep_alive.map(Duration::from_secs);
        let row = storm(n, keep_alive, AgentPriority::Normal, None, Stop::Kill)
            .await
            .unwrap_or_else(|e| format!("| {n} | the storm failed: {e} |"));
        println!("{STORM_HEADER}\n{row}");
        storm_rows.push(row);
    }

    let binary = if quick {
        Err("not measured in --quick mode".to_owned())
    } else {
        eprintln!("binary size: building the minimal server ...");
        minimal_server_size()
    };

    let mut table = String::from(
        "| stack | 16 B c=1 calls/s | c=1 p50 µs | c=1 p99 µs | 16 B c=64 calls/s | 1 MiB c=4 MB/s | CPU µs/call (c=64) | errors | UDP drops |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (stack, f) in &results {
        table += &format!(
            "| {stack} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} |\n",
            f.c1_calls,
            f.c1_p50_us,
            f.c1_p99_us,
            f.c64_calls,
            f.mib_mbps,
            f.cpu_us_per_call,
            f.errors,
            f.udp_drops,
        );
    }
    let get = |name: &str| {
        results
            .iter()
            .find(|(s, _)| *s == name)
            .map(|(_, f)| f.clone())
            .unwrap_or_default()
    };
    let (tonic, quinn, quinn_buf, brpc, rev, ttrpc, unix) = (
        get("tonic"),
        get("quinn"),
        get("quinn-buf"),
        get("brpc"),
        get("brpc-reverse"),
        get("ttrpc-unix"),
        get("brpc-unix"),
    );
    let (direct, direct_unix) = (get("brpc-direct"), get("brpc-direct-unix"));
    let (tonic_tls, tonic_h3) = (get("tonic-tls"), get("tonic-h3"));
    let check = |ok: bool| if ok { "met" } else { "NOT met" };
    // No figure (a stack failed): NaN, which meets no target.
    let ratio = |a: f64, b: f64| if a > 0.0 && b > 0.0 { a / b } else { f64::NAN };
    let within = |a: f64, b: f64| (ratio(a, b) - 1.0).abs() <= 0.10;
    let brpc_rss = memory
        .iter()
        .find(|(s, _, _)| *s == "brpc")
        .map(|(_, rss, _)| *rss);
    let instr = |name: &str| {
        instructions
            .iter()
            .find(|(s, _)| *s == name)
            .map_or(f64::NAN, |(_, n)| *n)
    };
    // (target, measured ratio, whether it is met)
    let at_least = |name: &str, a: f64, b: f64, min: f64| {
        (
            name.to_owned(),
            format!("{:.2}×", ratio(a, b)),
            ratio(a, b) >= min,
        )
    };
    let at_most = |name: &str, a: f64, b: f64, max: f64| {
        (
            name.to_owned(),
            format!("{:.2}×", ratio(a, b)),
            ratio(a, b) <= max,
        )
    };
    let within_row = |name: &str, a: f64, b: f64| {
        (
            name.to_owned(),
            format!("{:.2}×", ratio(a, b)),
            within(a, b),
        )
    };
    let mut targets = vec![
        at_most(
            "brpc-direct (lean) instructions/call ≤ 1.5× raw quinn",
            instr("brpc-direct"),
            instr("quinn"),
            1.5,
        ),
        at_most(
            "brpc (tonic path) instructions/call ≤ 2.0× raw quinn",
            instr("brpc"),
            instr("quinn"),
            2.0,
        ),
        at_most(
            "brpc-direct-unix instructions/call ≤ 1.0× ttrpc-rust",
            instr("brpc-direct-unix"),
            instr("ttrpc-unix"),
            1.0,
        ),
        at_least(
            "brpc-direct 16 B c=64 ≥ 0.85× raw quinn",
            direct.c64_calls,
            quinn.c64_calls,
            0.85,
        ),
        at_least(
            "brpc-direct 16 B c=64 ≥ 1.6× tonic+TLS",
            direct.c64_calls,
            tonic_tls.c64_calls,
            1.6,
        ),
        if tonic_h3.c64_calls > 0.0 {
            at_least(
                "brpc-direct 16 B c=64 ≥ 2× tonic-h3 (gRPC over QUIC)",
                direct.c64_calls,
                tonic_h3.c64_calls,
                2.0,
            )
        } else {
            (
                "brpc-direct 16 B c=64 ≥ 2× tonic-h3 (gRPC over QUIC)".to_owned(),
                "not in this run (no bench binary with `--features tonic-h3`: see README)"
                    .to_owned(),
                false,
            )
        },
        at_most(
            "brpc-direct c=1 p50 ≤ 1.15× raw quinn",
            direct.c1_p50_us,
            quinn.c1_p50_us,
            1.15,
        ),
        at_least(
            "brpc-direct-unix c=64 ≥ 1.2× ttrpc-rust",
            direct_unix.c64_calls,
            ttrpc.c64_calls,
            1.2,
        ),
        at_least(
            "brpc-direct 1 MiB echo ≥ 1.0× quinn-buf",
            direct.mib_mbps,
            quinn_buf.mib_mbps,
            1.0,
        ),
        at_least(
            "brpc-direct 1 MiB echo ≥ 1.0× tonic+TLS (TCP_NODELAY)",
            direct.mib_mbps,
            tonic_tls.mib_mbps,
            1.0,
        ),
        at_least(
            "brpc 16 B c=64 ≥ 0.85× raw quinn",
            brpc.c64_calls,
            quinn.c64_calls,
            0.85,
        ),
        at_least(
            "brpc 16 B c=64 vs tonic (≥ 1.6× expected)",
            brpc.c64_calls,
            tonic.c64_calls,
            1.6,
        ),
        at_most(
            "brpc c=1 p50 ≤ 1.15× raw quinn",
            brpc.c1_p50_us,
            quinn.c1_p50_us,
            1.15,
        ),
        within_row(
            "reverse c=1 calls/s within ±10% of forward",
            rev.c1_calls,
            brpc.c1_calls,
        ),
        within_row(
            "reverse c=64 calls/s within ±10% of forward",
            rev.c64_calls,
            brpc.c64_calls,
        ),
        within_row(
            "reverse 1 MiB MB/s within ±10% of forward",
            rev.mib_mbps,
            brpc.mib_mbps,
        ),
        at_least(
            "brpc 1 MiB echo ≥ 1.5× tonic",
            brpc.mib_mbps,
            tonic.mib_mbps,
            1.5,
        ),
        at_least(
            "brpc-unix c=64 ≥ 1.2× ttrpc-rust",
            unix.c64_calls,
            ttrpc.c64_calls,
            1.2,
        ),
    ];
    if let Some(rss) = brpc_rss {
        targets.push((
            "idle server memory per brpc agent ≤ 30 KB".to_owned(),
            format!("{:.1} KB", rss / 1000.0),
            rss <= 30_000.0,
        ));
    }
    if !fleet_rows[0].is_empty() {
        let broadcast_ms: f64 = fleet_cell(4)
            .trim_end_matches(" ms")
            .parse()
            .unwrap_or(f64::INFINITY);
        let all = fleet_cell(0) == fleet_cell(1) && fleet_cell(7) == "0";
        targets.push((
            format!("{fleet_n} agents all connected, broadcast to all < 1 s"),
            format!(
                "{}/{} connected, {} failures, {}",
                fleet_cell(1),
                fleet_cell(0),
                fleet_cell(7),
                fleet_cell(4)
            ),
            all && broadcast_ms < 1000.0,
        ));
    }
    match &binary {
        Ok(bytes) => targets.push((
            "minimal server, stripped release binary ≤ 3 MiB".to_owned(),
            format!("{:.2} MiB", *bytes as f64 / (1u64 << 20) as f64),
            *bytes <= 3 << 20,
        )),
        Err(why) => eprintln!("binary size: {why}"),
    }
    let mut target_table = String::from("| target | measured | |\n|---|---:|---|\n");
    for (name, measured, ok) in &targets {
        target_table += &format!("| {name} | {measured} | {} |\n", check(*ok));
    }
    println!("{table}\n{target_table}");

    let chart = chart_svg(&results)?;
    std::fs::write("benchmarks.svg", chart)?;

    let mode = if quick {
        "--quick (3 × 0.4 s per figure)"
    } else {
        "full (3 × 2 s per figure)"
    };
    let binary_line = match &binary {
        Ok(bytes) => format!(
            "`examples/minimal_server.rs` built with `cargo build --profile min-size --example minimal_server` (the `min-size` profile in Cargo.toml: opt-level \"z\", fat LTO, one codegen unit, panic = abort, stripped): **{bytes} bytes ({:.2} MiB)**.\n",
            *bytes as f64 / (1u64 << 20) as f64
        ),
        Err(why) => format!("Minimal server binary: {why}.\n"),
    };
    let h3 = if cfg!(feature = "tonic-h3") {
        "tonic-h3 is gRPC over HTTP/3 (tonic-h3 0.0.6 on quinn, TLS 1.3 with ring, quinn's default settings on UDP sockets with brpc's buffer size; \
         built with `--features tonic-h3`, whose dependencies turn on tracing's `log` feature for the whole binary, adding instructions to every stack's count); "
    } else if h3_child.is_some() {
        "tonic-h3 is gRPC over HTTP/3 (tonic-h3 0.0.6 on quinn, TLS 1.3 with ring, quinn's default settings on UDP sockets with brpc's buffer size), \
         client and server in a child process of a bench binary built with `--features tonic-h3` (whose dependencies turn on tracing's `log` feature for a whole binary: \
         in a process of its own it adds nothing to the other stacks' calls), its rounds taken in turn with the other stacks'; "
    } else {
        "tonic-h3 (gRPC over HTTP/3) runs only with a bench binary built with `--features tonic-h3` (see README); "
    };
    let sizes = |sizes: &[usize]| {
        sizes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let keep_alive_flag = cli
        .fleet_keep_alive
        .map_or(String::new(), |k| format!(" --keep-alive {k}"));
    let fleet_command = format!(
        "`brpc-bench fleet {}{keep_alive_flag}`",
        sizes(&fleet_sizes)
    );
    let keep_alive_line = match cli.fleet_keep_alive {
        Some(k) => format!(
            "The agents send a keep-alive every {k} s and both sides' idle timeout is {} s (`--fleet-keep-alive {k}`).",
            3 * k
        ),
        None => {
            "The agents keep brpc's default keep-alive (3 s) and idle timeout (10 s).".to_owned()
        }
    };
    let storm_part = if storm_rows.is_empty() {
        String::new()
    } else {
        format!(
            "## Restart storm\n\n`brpc-bench storm {}{keep_alive_flag}`: N agents (child processes as above) connected to a server in a child process; that process is killed \
             (SIGKILL: no GoAway, no CONNECTION_CLOSE) and a new one started on the same address with the same certificate and reset secret. \
             The agents learn of it from the new server's stateless resets and reconnect with their backoff (a longer one after a refusal by the busy server), resuming their TLS sessions. \"time until all back\" runs from the new server's start, \
             to the limit of 120 s or 3 ms per agent (with when half, 90% and 99% were back); \
             attempts are the agents' connection attempts after their first connection (each failed one and each success; of the failed ones, those refused by the busy server and those timed out); CPU is the new server process's over that time. \
             The new server's counts are its `Server::admission_stats()` at the end: TLS handshakes it started (of which not finished within its 10 s Hello limit, and failed), \
             clients refused with `CONNECTION_REFUSED` and no handshake (more waiting than it queues, or no handshake slot within half the Hello limit), sessions admitted. \
             The agents' CPU is their processes' user + system time over the same span. \
             Drops are datagrams the kernel dropped over the same span: on the new server's socket (its own count in `/proc/net/udp`, mostly a full receive buffer), \
             and elsewhere: the machine's full-buffer drops (`RcvbufErrors` in /proc/net/snmp) less the server's (the agents' sockets, unless something else on the machine dropped some). \
             Calls to agents back: whether the busy server still serves the agents already connected to it. Every 50 ms the new server calls the next agent back \
             (in connection-id order, round and round) with a 16-byte Echo on the direct path, each call on a task of its own with a 5 s limit: how many it made over the storm, how many failed or ran out of time, and the served calls' times. \
             The runtime lag is how late the new server's tokio runtime ran a task of its own that sleeps 10 ms at a time, over the same span: how long any of its tasks (a connection's driver, a call's handler) waited for a worker.\n\n\
             {STORM_HEADER}\n{}\n\n",
            sizes(&cli.storm),
            storm_rows.join("\n")
        )
    };
    let generated = format!(
        "# Benchmarks\n\n{BEGIN}\n\nMeasured by `cargo run --release --manifest-path brpc-bench/Cargo.toml` ({mode}) on {machine}.\n\
         All stacks run in one process on one tokio runtime with 2 worker threads; client and server share the machine's cores,\n\
         so CPU time per call covers both ends. Each figure is the median of three measured rounds after a warm-up; every round measures all\n\
         stacks one after another, so slow drifts in the machine's speed hit every stack alike.\n\
         tonic uses its own HTTP/2 transport over TCP loopback (plaintext); tonic-tls the same over TLS 1.3 (tonic's `tls-ring`: rustls with ring, as brpc; a self-signed certificate); {h3}raw quinn opens one bidirectional stream per call with a 4-byte length prefix\n\
         and default quinn settings (plus a 5 s keep-alive); quinn-buf is the same on UDP sockets with brpc's 4 MiB socket buffers and loopback-sized packets (path-MTU discovery up to 32 KiB, one datagram per write, as brpc does with `max_udp_payload`); the brpc QUIC stacks set `max_udp_payload(LOOPBACK_MAX_UDP_PAYLOAD)` on both sides (default 1200, no path-MTU search: the fleet, storm and memory figures keep it); brpc-reverse is the server calling the client\n\
         through the peer handle; brpc, brpc-reverse and brpc-unix use tonic's generated client and server (the tonic path), brpc-direct and brpc-direct-unix\n\
         brpc-build's (the direct path); the prost stacks (brpc, tonic, tonic-h3) share one generated Echo whose `bytes` fields are `bytes::Bytes` (prost's `bytes([\".\"])`), so a received \
         blob is a slice of the received buffer, not a copy (ttrpc-rust's rust-protobuf code copies it into a `Vec<u8>`); tonic's server sets TCP_NODELAY as its own `serve` does; the Unix stacks use a socket in the temp dir. \"UDP drops\" counts datagrams the kernel dropped for a full socket\n\
         receive buffer during that stack's measured rounds (machine-wide `RcvbufErrors`).\n\n\
         {table}\n![calls per second by stack and concurrency](benchmarks.svg)\n\n\
         ## Instructions per call\n\n`valgrind --tool=callgrind` over 3000 and then 6000 16-byte unary calls at c=64 (one-thread runtime, fresh process each), \
         the difference of the two totals divided by 3000: client and server together, user space. brpc-direct is the direct path \
         (brpc-build's dispatcher and client); brpc the tonic path (tonic's generated client and server over `Channel`/`Router`). \
         raw quinn and ttrpc echo raw bytes (no protobuf). brpc-reverse is the server calling its agent; brpc-relay a cluster's cross-node call (node A's link, node C's relay, C's agent). \
         tonic-mem is no stack: tonic's generated client calling its generated server in memory (the client's `http::Request` handed to the server's `Service::call`, no transport, no bytes moved between them): what running tonic's own code (its client and server, codec, `http` types and the prost messages) costs a call, with the bench's own loop as in every row (about 0.8k), which the tonic path pays on top of a transport and brpc's engine.\n\n{instruction_table}\n\
         ## Idle memory\n\nServer RSS growth and heap growth after N clients connected from a separate process (brpc: one `Client`, own endpoint each; raw quinn: N connections from one endpoint, both ends with brpc's transport settings (call window, keep-alives, idle timeout); tonic: N HTTP/2 channels), divided by N.\n\n{memory_table}\n\
         ## Fleet scale\n\n{fleet_command}, each size in a fresh process: one server; that many brpc clients in child processes of at most {AGENTS_PER_PROCESS} \
         (one UDP socket each), connecting 64 at a time per process, fewer with several processes (about 256 across them, 16 per process at least); then the server broadcasts a 16-byte Echo call to every client through its \
         peer handle and brpc-build's direct client (the agents serve Echo with `add_direct`), 256 at a time at the start and up to 4096 while calls answer about as fast as in the fastest round (`BroadcastOptions::default()`), 5 s timeout each. RSS is the server's growth divided by the agents connected; \
         agent-side RSS is the agent processes' whole RSS (runtime and binary included) divided by the agents they hold; server CPU is the bench process's \
         (the server's) user+system time over the broadcast divided by its calls, the agents' CPU the same for the agent processes (all of them, the agents not called yet included); CPU while idle is the same process's over 3 s with every agent connected and no call running (keep-alives and their acknowledgements), and the agent processes' over the same 3 s; drops are the datagrams the kernel dropped on the server's UDP socket over the run (`/proc/net/udp`). Each agent process dials from its own loopback address (127.0.0.2 onwards). {keep_alive_line}\n\n{header}\n{fleet_row}\n\n\
         {storm_part}## Binary size\n\n{binary_line}\n## Targets\n\n{target_table}\n{END}\n",
        header = Fleet::HEADER,
        machine = machine()
    );
    // Everything after the generated part (fleet figures, findings, profiles)
    // is written by hand and kept.
    let kept = std::fs::read_to_string("BENCHMARKS.md")
        .ok()
        .and_then(|old| old.split_once(END).map(|(_, rest)| rest.to_owned()))
        .unwrap_or_default();
    let kept = kept.trim_start_matches('\n');
    let doc = if kept.is_empty() {
        generated
    } else {
        format!("{generated}\n{kept}")
    };
    std::fs::write("BENCHMARKS.md", doc)?;
    let stacks_json: Vec<serde_json::Value> = results
        .iter()
        .map(|(s, f)| {
            serde_json::json!({
                "stack": s,
                "c1_calls_per_s": f.c1_calls,
                "c1_p50_us": f.c1_p50_us,
                "c1_p99_us": f.c1_p99_us,
                "c64_calls_per_s": f.c64_calls,
                "mib_c4_mb_per_s": f.mib_mbps,
                "cpu_us_per_call": f.cpu_us_per_call,
                "errors": f.errors,
                "udp_drops": f.udp_drops,
            })
        })
        .collect();
    let memory_json: Vec<serde_json::Value> = memory
        .iter()
        .map(|(s, rss, heap)| {
            serde_json::json!({
                "stack": s,
                "clients": memory_n,
                "rss_bytes_per_client": rss.round(),
                "heap_bytes_per_client": heap.round(),
            })
        })
        .collect();
    let document = serde_json::json!({
        "stacks": stacks_json,
        "idle_memory": memory_json,
        "minimal_server_bytes": binary.as_ref().ok(),
    });
    std::fs::write(
        "benchmarks.json",
        serde_json::to_string_pretty(&document)? + "\n",
    )?;
    Ok(())
}

const BEGIN: &str =
    "<!-- generated by brpc-bench: everything up to the end marker is rewritten on each run -->";
const END: &str = "<!-- end of generated part -->";

/// Builds `examples/minimal_server.rs` with the `min-size` profile and
/// returns the binary's size in bytes.
fn minimal_server_size() -> Result<u64, String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?;
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--quiet",
            "--profile",
            "min-size",
            "-p",
            "brpc",
            "--example",
            "minimal_server",
        ])
        .status()
        .map_err(|e| format!("cargo could not run: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build failed ({status})"));
    }
    let path = root.join("target/min-size/examples/minimal_server");
    std::fs::metadata(&path)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A grouped bar chart (SVG) of 16-byte calls/s at concurrency 1 and 64.
fn chart_svg(results: &[(&str, Figures)]) -> Result<String, String> {
    use plotters::prelude::*;
    let max = results
        .iter()
        .map(|(_, f)| f.c64_calls.max(f.c1_calls))
        .fold(1.0, f64::max);
    // Round the axis up to a multiple of 20 000 calls/s.
    let axis = (max / 20_000.0).ceil() * 20_000.0;
    let colours = [RGBColor(0x8f, 0xb3, 0xd9), RGBColor(0x2b, 0x6c, 0xb0)];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 360)).into_drawing_area();
        let draw = |e: DrawingAreaErrorKind<std::io::Error>| format!("chart: {e}");
        root.fill(&WHITE).map_err(draw)?;
        let n = results.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "16-byte unary calls/s by stack (higher is better)",
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n).into_segmented(), 0.0..axis)
            .map_err(draw)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_labels(5)
            .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => results.get(*i).map_or("", |r| r.0).to_owned(),
                _ => String::new(),
            })
            .draw()
            .map_err(draw)?;
        for (series, (name, colour)) in ["concurrency 1", "concurrency 64"]
            .into_iter()
            .zip(colours)
            .enumerate()
        {
            let bars = results.iter().enumerate().map(move |(i, (_, f))| {
                let value = if series == 0 { f.c1_calls } else { f.c64_calls };
                // Two bars per stack, side by side, each a third of the segment.
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), value),
                    ],
                    colour.filled(),
                );
                let (left, right) = if series == 0 { (15, 50) } else { (50, 15) };
                bar.set_margin(0, 0, left, right);
                bar
            });
            chart
                .draw_series(bars)
                .map_err(draw)?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 12, y + 6)], colour.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_names_every_stack_and_draws_two_bars_each() {
        let figures = |c1, c64| Figures {
            c1_calls: c1,
            c64_calls: c64,
            ..Figures::default()
        };
        let results = [
            ("brpc", figures(9_000.0, 60_000.0)),
            ("tonic", figures(7_000.0, 30_000.0)),
        ];
        let svg = chart_svg(&results).expect("chart");
        assert!(svg.starts_with("<svg"), "{svg}");
        for text in ["brpc", "tonic", "concurrency 64", "60k"] {
            assert!(svg.contains(text), "no {text:?} in the chart");
        }
        // Two bars per stack plus two legend swatches, all filled rectangles.
        let bars = svg.matches("<rect").count();
        assert!(bars >= 2 * results.len() + 2, "{bars} rects");
    }

    #[test]
    fn latencies_percentiles_within_a_thousandth() {
        let mut l = Latencies::default();
        for micros in 1..=1000 {
            l.record(Duration::from_micros(micros));
        }
        assert_eq!(l.len(), 1000);
        let p50 = l.percentile(50.0).as_secs_f64() * 1e6;
        let p99 = l.percentile(99.0).as_secs_f64() * 1e6;
        assert!((p50 - 500.0).abs() <= 1.0, "{p50}");
        assert!((p99 - 990.0).abs() <= 1.0, "{p99}");
        assert_eq!(Latencies::default().percentile(50.0), Duration::ZERO);
    }
}
