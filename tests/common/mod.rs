//! Shared fixtures for the end-to-end tests: an Echo service that both sides
//! host (with a probe recording what its handlers saw), and helpers to start a
//! server and connect clients over loopback QUIC.
#![allow(dead_code, missing_docs)]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brpc::core::wire;
use brpc::{Client, Server};
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};

pub mod echo {
    #![allow(missing_docs)]
    tonic::include_proto!("test.echo.v1");
}
pub mod greeter {
    #![allow(missing_docs)]
    tonic::include_proto!("greeter.v1");
}

use echo::echo_server::{Echo, EchoServer};
use echo::{EchoReply, EchoRequest, FailRequest, Number, RangeRequest, SleepRequest};

/// What the handlers of one side observed.
#[derive(Default)]
pub struct Probe {
    /// Handlers currently running (Sleep only).
    pub in_flight: AtomicUsize,
    /// Most Sleep handlers seen running at once.
    pub max_in_flight: AtomicUsize,
    /// Sleep handlers dropped before finishing.
    pub dropped: AtomicUsize,
    /// The `grpc-timeout` the last Sleep handler saw.
    pub observed_timeout: Mutex<Option<String>>,
    /// Errors the Bidi handler's input reader saw.
    pub input_errors: Mutex<Vec<Code>>,
    /// Bidi inputs that ended without an error (tonic reports a cancelled
    /// input stream this way, as it does over HTTP/2).
    pub inputs_ended: AtomicUsize,
    /// Bidi outputs found closed by the handler (the caller went away).
    pub outputs_closed: AtomicUsize,
    /// Bytes the Sink handler has read.
    pub sunk: AtomicUsize,
    /// Unary calls that reached the handler.
    pub unary_calls: AtomicUsize,
    /// Make Unary hang forever (an agent that stopped answering).
    pub hang: std::sync::atomic::AtomicBool,
    /// Wakes Unary handlers waiting for others to arrive ("together:N:M").
    pub unary_arrived: tokio::sync::Notify,
}

/// Echo, answering as `who` ("server" or the client's name).
#[derive(Clone)]
pub struct EchoService {
    pub who: String,
    pub probe: Arc<Probe>,
}

impl EchoService {
    pub fn new(who: &str) -> Self {
        EchoService {
            who: who.into(),
            probe: Arc::default(),
        }
    }

    fn reply(&self, r: EchoRequest) -> EchoReply {
        EchoReply {
            text: r.text,
            blob: r.blob,
            seq: r.seq,
            answered_by: self.who.clone(),
        }
    }
}

/// The request's `x-` metadata, to send back.
fn x_metadata(from: &MetadataMap) -> MetadataMap {
    let mut out = MetadataMap::new().into_headers();
    for (name, value) in from.clone().into_headers().iter() {
        if name.as_str().starts_with("x-") {
            out.append(name.clone(), value.clone());
        }
    }
    MetadataMap::from_headers(out)
}

/// `x-` metadata as "k=v;k=v", sorted (for peers that cannot send response metadata).
fn describe(md: &MetadataMap) -> String {
    let mut pairs: Vec<String> = md
        .clone()
        .into_headers()
        .iter()
        .map(|(k, v)| format!("{}={}", k, v.to_str().unwrap_or("?")))
        .collect();
    pairs.sort();
    pairs.join(";")
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

struct InFlight(Arc<Probe>, bool);

impl InFlight {
    fn enter(probe: &Arc<Probe>) -> Self {
        let now = probe.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        probe.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(probe.clone(), false)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.1 {
            self.0.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    /// Echoes the message; the request's `x-` metadata comes back as headers.
    /// A text of "grow:N" answers with an N-byte blob instead; "metadata?"
    /// answers with the `x-` metadata it received as text; "together:N:M"
    /// waits until N Unary calls have reached the handler (this one
    /// included), then answers with an M-byte blob.
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.probe.unary_calls.fetch_add(1, Ordering::SeqCst);
        self.probe.unary_arrived.notify_waiters();
        if self.probe.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let headers = x_metadata(request.metadata());
        let described = describe(&headers);
        let mut reply = self.reply(request.into_inner());
        if reply.text == "metadata?" {
            reply.text = described;
        }
        if let Some(n) = reply.text.strip_prefix("grow:") {
            reply.blob = vec![7; n.parse().map_err(|_| Status::invalid_argument("grow:N"))?];
        }
        if let Some(rest) = reply.text.strip_prefix("together:") {
            let parsed = rest
                .split_once(':')
                .and_then(|(n, m)| Some((n.parse().ok()?, m.parse().ok()?)));
            let Some((calls, size)) = parsed else {
                return Err(Status::invalid_argument("together:N:M"));
            };
            loop {
                let arrived = self.probe.unary_arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                if self.probe.unary_calls.load(Ordering::SeqCst) >= calls {
                    break;
                }
                arrived.await;
            }
            reply.blob = vec![7; size];
        }
        let mut response = Response::new(reply);
        *response.metadata_mut() = headers;
        Ok(response)
    }

    /// Fails as asked; the request's `x-` metadata comes back as trailers.
    async fn fail(&self, request: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        let trailers = x_metadata(request.metadata());
        let r = request.into_inner();
        Err(Status::with_metadata(
            Code::from_i32(r.code),
            r.message,
            trailers,
        ))
    }

    async fn sleep(&self, request: Request<SleepRequest>) -> Result<Response<EchoReply>, Status> {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        *self.probe.observed_timeout.lock().expect("lock") = timeout;
        let mut guard = InFlight::enter(&self.probe);
        tokio::time::sleep(Duration::from_millis(request.into_inner().millis)).await;
        guard.1 = true;
        Ok(Response::new(EchoReply {
            answered_by: self.who.clone(),
            ..Default::default()
        }))
    }

    type RangeStream = ReplyStream;

    /// Streams `from..to`; the request's `x-` metadata comes back as headers.
    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<ReplyStream>, Status> {
        let headers = x_metadata(request.metadata());
        let RangeRequest { from, to } = request.into_inner();
        let who = self.who.clone();
        if from > to {
            // A stream that fails before its first message.
            let failing = tokio_stream::iter([Err(Status::out_of_range(format!(
                "from {from} is past to {to}"
            )))]);
            return Ok(Response::new(Box::pin(failing) as ReplyStream));
        }
        let stream = tokio_stream::iter(from..to).map(move |seq| {
            Ok(EchoReply {
                seq,
                answered_by: who.clone(),
                ..Default::default()
            })
        });
        let mut response = Response::new(Box::pin(stream) as ReplyStream);
        *response.metadata_mut() = headers;
        Ok(response)
    }

    async fn sum(&self, request: Request<Streaming<Number>>) -> Result<Response<Number>, Status> {
        let mut stream = request.into_inner();
        let mut total = 0i64;
        while let Some(n) = stream.next().await {
            total += n?.value;
        }
        Ok(Response::new(Number { value: total }))
    }

    type BidiStream = ReplyStream;

    /// Echoes each message; a task reads the input and records any error.
    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let mut input = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let mut output_open = true;
            // A first message "hold" keeps the input stream after it ended
            // (or failed) until the caller leaves.
            let mut hold = None;
            loop {
                tokio::select! {
                    item = input.next() => match item {
                        Some(Ok(r)) => {
                            hold.get_or_insert(r.text == "hold");
                            if output_open && tx.send(Ok(this.reply(r))).await.is_err() {
                                output_open = false;
                                this.probe.outputs_closed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Some(Err(status)) => {
                            this.probe.input_errors.lock().expect("lock").push(status.code());
                            break;
                        }
                        None => {
                            this.probe.inputs_ended.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    },
                    () = tx.closed(), if output_open => {
                        output_open = false;
                        this.probe.outputs_closed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            if hold == Some(true) {
                tx.closed().await;
            }
            drop(input);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn sink(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Number>, Status> {
        let mut input = request.into_inner();
        let mut slow = 0usize;
        let mut count = 0usize;
        while let Some(item) = input.next().await {
            let r = item?;
            if count == 0 {
                if r.text == "stall" {
                    std::future::pending::<()>().await;
                }
                if let Some(n) = r.text.strip_prefix("slow:") {
                    slow = n.parse().unwrap_or(0);
                }
            }
            if count < slow {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            count += 1;
            self.probe.sunk.fetch_add(r.blob.len(), Ordering::Relaxed);
        }
        Ok(Response::new(Number {
            value: self.probe.sunk.load(Ordering::Relaxed) as i64,
        }))
    }
}

/// A server on 127.0.0.1:0 hosting Echo (answering as "server").
pub fn server() -> Server {
    server_with(EchoService::new("server"))
}

/// A server hosting this Echo.
pub fn server_with(echo: EchoService) -> Server {
    Server::builder()
        .add_service(EchoServer::new(echo))
        .bind("127.0.0.1:0")
        .expect("bind")
}

/// A client builder for `server`, named `name`, hosting Echo (answering as `name`).
pub fn client_builder(server: &Server, name: &str, echo: EchoService) -> brpc::client::Builder {
    Client::builder()
        .name(name)
        .label("role", "test")
        .add_service(EchoServer::new(echo))
        .pin_certificate(server.certificate().clone())
}

/// A client of `server` named `name`, hosting Echo (answering as `name`).
pub async fn client(server: &Server, name: &str) -> Client {
    client_builder(server, name, EchoService::new(name))
        .connect(server.local_addr())
        .await
        .expect("connect")
}

/// Waits (up to 20 s) until `client` is connected; its connection id.
pub async fn connected(client: &Client) -> brpc::ConnectionId {
    let mut state = client.watch_state();
    let connected = state_becomes(&mut state, Duration::from_secs(20), "connected", |s| {
        matches!(s, brpc::ClientState::Connected { .. })
    })
    .await;
    match connected {
        brpc::ClientState::Connected { connection_id } => connection_id,
        other => unreachable!("waited for Connected, got {other:?}"),
    }
}

/// Waits (up to 20 s) for `client` to be connected again on a connection
/// other than `first`; a client that closes instead fails at once.
pub async fn reconnected(client: &Client, first: brpc::ConnectionId) -> brpc::ConnectionId {
    let mut state = client.watch_state();
    let reached = state_becomes(
        &mut state,
        Duration::from_secs(20),
        "a new connection",
        |s| {
            matches!(s, brpc::ClientState::Connected { connection_id } if *connection_id != first)
                || matches!(s, brpc::ClientState::Closed { .. })
        },
    )
    .await;
    match reached {
        brpc::ClientState::Connected { connection_id } => connection_id,
        other => panic!("closed instead of reconnecting: {other:?}"),
    }
}

/// Closes `client`'s connection through its own peer handle (as the
/// application may) and waits for the connection it makes next.
pub async fn drop_connection_and_reconnect(client: &Client) -> brpc::ConnectionId {
    let first = client.connection_id();
    client
        .peer()
        .expect("connected")
        .close(brpc::core::conn::codes::CONN_NORMAL, "closed by the app");
    reconnected(client, first).await
}

/// Starts `call` (one whose handler, watched by `probe`, sleeps), waits
/// until the handler runs, drops the call, and waits until the handler is
/// dropped too (cancelled on its side), none left running.
pub async fn drop_while_running<F>(probe: &Probe, call: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send,
{
    let before = probe.dropped.load(Ordering::SeqCst);
    let call = tokio::spawn(call);
    eventually(Duration::from_secs(20), "the handler running", || {
        probe.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    call.abort();
    eventually(Duration::from_secs(20), "the handler dropped", || {
        probe.dropped.load(Ordering::SeqCst) == before + 1
    })
    .await;
    assert_eq!(probe.in_flight.load(Ordering::SeqCst), 0);
}

/// Polls `condition` every 10 ms until it holds; panics after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits up to `limit` for the client state behind `state` to satisfy
/// `condition`, and returns that state; panics naming `what` after `limit`.
pub async fn state_becomes(
    state: &mut tokio::sync::watch::Receiver<brpc::ClientState>,
    limit: Duration,
    what: &str,
    condition: impl FnMut(&brpc::ClientState) -> bool,
) -> brpc::ClientState {
    tokio::time::timeout(limit, state.wait_for(condition))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .expect("the client's state channel closed")
        .clone()
}

/// An encoded wire Request for Echo's `method` carrying `payload`.
pub fn echo_call(method: &str, payload: Vec<u8>) -> Vec<u8> {
    use prost::Message;
    wire::Request {
        service: "test.echo.v1.Echo".into(),
        method: method.into(),
        payload: payload.into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// One encoded frame, as a raw peer writes it.
pub fn frame(
    stream_id: u32,
    kind: wire::FrameType,
    flags: wire::Flags,
    payload: impl Into<bytes::Bytes>,
) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    wire::Frame::new(stream_id, kind, flags, payload.into())
        .encode(&mut buf)
        .expect("encode");
    buf.to_vec()
}

/// A raw QUIC connection to `server` (TLS pinned), speaking no brpc yet.
pub async fn raw_connection(server: &Server) -> quinn::Connection {
    raw_connection_with(server, quinn::TransportConfig::default()).await
}

/// [`raw_connection`] with the client's own transport settings.
pub async fn raw_connection_with(
    server: &Server,
    transport: quinn::TransportConfig,
) -> quinn::Connection {
    let roots = brpc::tls::pinned_roots(server.certificate()).expect("roots");
    let crypto = brpc::tls::client_crypto(roots).expect("crypto");
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let mut config = quinn::ClientConfig::new(crypto);
    config.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(config);
    endpoint
        .connect(server.local_addr(), "localhost")
        .expect("connect")
        .await
        .expect("handshake")
}

/// Sends one unary wire Request on a new stream and reads the whole answer.
pub async fn raw_call(conn: &quinn::Connection, request: wire::Request) -> wire::Response {
    raw_call_inner(conn, request, false).await
}

/// [`raw_call`] for a Request the peer may refuse before reading it all (it
/// stops the stream): the write may fail, the answer is still read.
pub async fn raw_call_refused(conn: &quinn::Connection, request: wire::Request) -> wire::Response {
    raw_call_inner(conn, request, true).await
}

async fn raw_call_inner(
    conn: &quinn::Connection,
    request: wire::Request,
    may_be_stopped: bool,
) -> wire::Response {
    use prost::Message;
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let stream_id = wire::stream_id(send.id().index(), true);
    let mut buf = bytes::BytesMut::new();
    wire::Frame::new(
        stream_id,
        wire::FrameType::Request,
        wire::Flags::EMPTY,
        request.encode_to_vec().into(),
    )
    .encode(&mut buf)
    .expect("encode");
    let stopped = send.stopped();
    tokio::select! {
        written = send.write_all(&buf) => {
            if may_be_stopped {
                if written.is_ok() {
                    let _ = send.finish();
                }
            } else {
                written.expect("write");
                send.finish().expect("finish");
            }
        }
        _ = stopped, if may_be_stopped => {
            let _ = send.reset(0u32.into());
        }
    }
    let bytes = recv.read_to_end(1 << 20).await.expect("read");
    let frame = wire::FrameDecoder::new(1 << 20)
        .decode(&mut bytes::BytesMut::from(&bytes[..]))
        .expect("frame")
        .expect("whole frame");
    assert_eq!(frame.kind, wire::FrameType::Response);
    assert_eq!(frame.stream_id, stream_id);
    wire::Response::decode(frame.payload.into_bytes()).expect("response")
}

/// A Hello request as the wire carries it.
pub fn hello_request(version: u32, name: &str) -> wire::Request {
    use prost::Message;
    wire::Request {
        service: brpc::core::session::SERVICE.into(),
        method: brpc::core::session::METHOD.into(),
        payload: wire::HelloRequest {
            protocol_version: version,
            name: name.into(),
            labels: vec![],
        }
        .encode_to_vec()
        .into(),
        ..Default::default()
    }
}

/// A hand-driven client: raw connection plus a completed Hello.
pub async fn raw_client(server: &Server, name: &str) -> (quinn::Connection, brpc::ConnectionId) {
    use prost::Message;
    let conn = raw_connection(server).await;
    let response = raw_call(&conn, hello_request(1, name)).await;
    assert_eq!(response.status.expect("status").code, 0);
    let answer = wire::HelloResponse::decode(response.payload).expect("hello answer");
    (conn, brpc::ConnectionId(answer.connection_id))
}

/// Waits (up to 10 s) for `conn` to be closed by the application with `code`,
/// and returns the close (code and reason).
pub async fn closed_with(conn: &quinn::Connection, code: u32) -> quinn::ApplicationClose {
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("connection closed in time");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(code), "{close:?}");
            close
        }
        other => panic!("expected an application close with code {code:#x}, got {other:?}"),
    }
}

/// A client of `server` named `name` hosting a probed Echo, and the server's
/// handle to it.
pub async fn probed_client(server: &Server, name: &str) -> (Client, brpc::Peer, Arc<Probe>) {
    let echo = EchoService::new(name);
    let probe = echo.probe.clone();
    let client = client_builder(server, name, echo)
        .connect(server.local_addr())
        .await
        .expect("connect");
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    (client, peer, probe)
}
pub mod pair;
pub mod relay;
