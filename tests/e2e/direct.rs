//! The direct path (`brpc-build`'s generated dispatchers and clients) over
//! real loopback QUIC: every call shape in both directions, metadata,
//! errors with trailers, deadlines, cancellation, `Peer::from_request` in a
//! handler, a direct and a tonic-path service on one connection, and direct
//! and tonic clients calling each other's servers.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::unary::FixedNamer;
use brpc::{Client, Peer, Server};
use common::echo::echo_brpc::{EchoClient, EchoService as DirectEcho};
use common::echo::echo_client::EchoClient as TonicEchoClient;
use common::echo::echo_server::EchoServer;
use common::echo::{EchoRequest, FailRequest, Number, RangeRequest, SleepRequest};
use common::greeter::greeter_brpc::{GreeterClient, GreeterService};
use common::greeter::greeter_server::Greeter;
use common::greeter::namer_brpc::{NamerClient, NamerService};
use common::greeter::namer_server::Namer;
use common::greeter::{GreetReply, GreetRequest, NameReply, NameRequest};
use common::{EchoService, eventually};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status};

/// A server hosting Echo on the direct path.
fn direct_server(echo: EchoService) -> Server {
    Server::builder()
        .add_direct(DirectEcho::new(echo))
        .bind("127.0.0.1:0")
        .expect("bind")
}

/// A client of `server` hosting Echo (answering as `name`) on the direct path.
async fn direct_client(server: &Server, name: &str, echo: EchoService) -> Client {
    Client::builder()
        .name(name)
        .add_direct(DirectEcho::new(echo))
        .pin_certificate(server.certificate().clone())
        .connect(server.local_addr())
        .await
        .expect("connect")
}

fn with_metadata<T>(message: T, key: &'static str, value: &'static str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(key, value.parse().expect("value"));
    request
}

/// Every call shape through a direct client to a direct server answering as `who`.
async fn all_shapes(mut echo: EchoClient, who: &str) {
    // Unary, with metadata both ways.
    let reply = echo
        .unary(with_metadata(
            EchoRequest {
                text: "hi".into(),
                blob: vec![1, 2, 3],
                seq: 7,
            },
            "x-trace",
            "abc",
        ))
        .await
        .expect("unary");
    assert_eq!(reply.metadata().get("x-trace").expect("header"), "abc");
    let reply = reply.into_inner();
    assert_eq!(
        (reply.text.as_str(), reply.blob, reply.seq),
        ("hi", vec![1, 2, 3], 7)
    );
    assert_eq!(reply.answered_by, who);

    // Server streaming, with response headers.
    let response = echo
        .range(with_metadata(
            RangeRequest { from: 3, to: 8 },
            "x-range",
            "yes",
        ))
        .await
        .expect("range");
    assert_eq!(response.metadata().get("x-range").expect("header"), "yes");
    let seqs: Vec<u64> = response
        .into_inner()
        .map(|r| r.expect("item").seq)
        .collect()
        .await;
    assert_eq!(seqs, vec![3, 4, 5, 6, 7]);

    // Client streaming.
    let numbers = tokio_stream::iter((1..=10).map(|value| Number { value }));
    let sum = echo.sum(numbers).await.expect("sum").into_inner();
    assert_eq!(sum.value, 55);

    // Bidi.
    let requests = tokio_stream::iter((0..4).map(|seq| EchoRequest {
        seq,
        ..Default::default()
    }));
    let replies: Vec<_> = echo
        .bidi(requests)
        .await
        .expect("bidi")
        .into_inner()
        .map(|r| r.expect("item"))
        .collect()
        .await;
    assert_eq!(
        replies.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(replies.iter().all(|r| r.answered_by == who));
}

#[tokio::test]
async fn every_shape_both_directions() {
    let server = direct_server(EchoService::new("server"));
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    all_shapes(EchoClient::new(client.channel()), "server").await;

    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    all_shapes(peer.client(EchoClient::new), "agent-1").await;
}

/// Calls that end normally end their streams on both sides without a
/// STOP_SENDING: each side reads the stream's end, which came with the call's
/// last frame, instead of dropping the stream unread (for which quinn tells
/// the peer to stop sending: a frame, and on an idle connection a datagram
/// of its own and its acknowledgement, on every call).
#[tokio::test]
async fn finished_calls_send_no_stop_sending() {
    let server = direct_server(EchoService::new("server"));
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    let request = || EchoRequest {
        text: "hi".into(),
        ..Default::default()
    };
    let range = || RangeRequest { from: 0, to: 3 };
    for _ in 0..5 {
        let forward = EchoClient::new(client.channel());
        let reverse = peer.client(EchoClient::new);
        for (way, mut echo) in [("forward", forward), ("reverse", reverse)] {
            echo.unary(request()).await.expect(way);
            let numbers: Vec<_> = echo
                .range(range())
                .await
                .expect(way)
                .into_inner()
                .collect()
                .await;
            assert_eq!(numbers.len(), 3, "{way}");
        }
        TonicEchoClient::new(client.channel())
            .unary(request())
            .await
            .expect("tonic unary");
    }
    // A last call each way: whatever the calls before queued for the peer
    // went out with it or before it.
    EchoClient::new(client.channel())
        .unary(request())
        .await
        .expect("last forward");
    peer.client(EchoClient::new)
        .unary(request())
        .await
        .expect("last reverse");
    let client_side = client.peer().expect("connected");
    let sides = [
        (
            "client",
            client_side.quic_connection().expect("quic").stats(),
        ),
        ("server", peer.quic_connection().expect("quic").stats()),
    ];
    for (side, stats) in sides {
        // The counts are live: each side sent a stream frame per call.
        assert!(stats.frame_tx.stream >= 21, "{side}: {:?}", stats.frame_tx);
        assert_eq!(
            stats.frame_tx.stop_sending, 0,
            "{side}: {:?}",
            stats.frame_tx
        );
        assert_eq!(
            stats.frame_tx.reset_stream, 0,
            "{side}: {:?}",
            stats.frame_tx
        );
    }
}

#[tokio::test]
async fn errors_carry_code_message_and_trailers() {
    let server = direct_server(EchoService::new("server"));
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let mut echo = EchoClient::new(client.channel());
    let status = echo
        .fail(with_metadata(
            FailRequest {
                code: Code::PermissionDenied as i32,
                message: "not you".into(),
            },
            "x-why",
            "policy",
        ))
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "not you");
    assert_eq!(status.metadata().get("x-why").expect("trailer"), "policy");

    // A method the service does not have.
    let status = client
        .channel()
        .unary::<_, Number>(
            Request::new(Number { value: 1 }),
            "test.echo.v1.Echo",
            "Nope",
        )
        .await
        .expect_err("unknown method");
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("Nope"), "{status:?}");

    // A handler's oversized reply becomes RESOURCE_EXHAUSTED, not a broken call.
    let status = echo
        .unary(EchoRequest {
            text: format!("grow:{}", 5 << 20),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn deadline_reaches_the_handler_and_ends_it() {
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = direct_server(echo);
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let mut request = Request::new(SleepRequest { millis: 60_000 });
    request.set_timeout(Duration::from_millis(300));
    let status = EchoClient::new(client.channel())
        .sleep(request)
        .await
        .expect_err("deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The handler saw the deadline as tonic's server shows it, and was
    // dropped when it passed.
    let seen = probe.observed_timeout.lock().expect("lock").clone();
    assert!(seen.is_some_and(|t| t.ends_with('u') || t.ends_with('m')));
    eventually(Duration::from_secs(10), "handler dropped", || {
        probe.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn dropping_the_caller_cancels_the_handler() {
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = direct_server(echo);
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let mut echo = EchoClient::new(client.channel());
    let call = tokio::spawn(async move { echo.sleep(SleepRequest { millis: 60_000 }).await });
    eventually(Duration::from_secs(10), "handler running", || {
        probe.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    call.abort();
    eventually(Duration::from_secs(10), "handler dropped", || {
        probe.dropped.load(Ordering::SeqCst) == 1 && probe.in_flight.load(Ordering::SeqCst) == 0
    })
    .await;
}

/// Greets by asking the calling client's Namer for its name, through the
/// generated direct client (unary.rs has the same story with tonic's).
struct CallbackGreeter;

#[tonic::async_trait]
impl Greeter for CallbackGreeter {
    async fn greet(&self, request: Request<GreetRequest>) -> Result<Response<GreetReply>, Status> {
        let peer = Peer::from_request(&request)?;
        let name = peer
            .client(NamerClient::new)
            .name(NameRequest {})
            .await?
            .into_inner()
            .name;
        Ok(Response::new(GreetReply {
            message: format!(
                "{}, {name} ({})",
                request.into_inner().greeting,
                peer.name()
            ),
        }))
    }
}

#[tokio::test]
async fn handler_calls_back_its_caller_through_the_request_peer() {
    let server = Server::builder()
        .add_direct(GreeterService::new(CallbackGreeter))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = Client::builder()
        .name("agent-7")
        .add_direct(NamerService::new(FixedNamer("Ada")))
        .pin_certificate(server.certificate().clone())
        .connect(server.local_addr())
        .await
        .expect("connect");
    let reply = GreeterClient::new(client.channel())
        .greet(GreetRequest {
            greeting: "Hello".into(),
        })
        .await
        .expect("greet")
        .into_inner();
    assert_eq!(reply.message, "Hello, Ada (agent-7)");
}

#[tokio::test]
async fn direct_and_tonic_services_share_a_connection_and_interoperate() {
    // Echo served through tonic's Router, Greeter on the direct path, on
    // the same server; the client hosts Namer through tonic.
    let server = Server::builder()
        .add_service(EchoServer::new(EchoService::new("server")))
        .add_direct(GreeterService::new(CallbackGreeter))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = Client::builder()
        .name("agent-2")
        .add_service(common::greeter::namer_server::NamerServer::new(FixedNamer(
            "Bo",
        )))
        .pin_certificate(server.certificate().clone())
        .connect(server.local_addr())
        .await
        .expect("connect");
    let channel = client.channel();

    // A direct client to a tonic-path server, and a tonic client to a
    // direct server (whose handler calls a tonic-path service back with a
    // direct client), over one connection.
    let direct_to_tonic = EchoClient::new(channel.clone());
    all_shapes(direct_to_tonic, "server").await;
    let reply = common::greeter::greeter_client::GreeterClient::new(channel.clone())
        .greet(GreetRequest {
            greeting: "Hi".into(),
        })
        .await
        .expect("tonic client, direct server")
        .into_inner();
    assert_eq!(reply.message, "Hi, Bo (agent-2)");
    assert_eq!(
        server.router().service_names(),
        ["greeter.v1.Greeter", "test.echo.v1.Echo"]
    );

    // A tonic client to a direct server, every shape.
    let server = direct_server(EchoService::new("server"));
    let client = direct_client(&server, "agent-3", EchoService::new("agent-3")).await;
    let mut tonic_echo = TonicEchoClient::new(client.channel());
    let reply = tonic_echo
        .unary(with_metadata(EchoRequest::default(), "x-k", "v"))
        .await
        .expect("unary");
    assert_eq!(reply.metadata().get("x-k").expect("header"), "v");
    let seqs: Vec<u64> = tonic_echo
        .range(RangeRequest { from: 0, to: 3 })
        .await
        .expect("range")
        .into_inner()
        .map(|r| r.expect("item").seq)
        .collect()
        .await;
    assert_eq!(seqs, [0, 1, 2]);
    let sum = tonic_echo
        .sum(tokio_stream::iter((1..=4).map(|value| Number { value })))
        .await
        .expect("sum")
        .into_inner();
    assert_eq!(sum.value, 10);
    let status = tonic_echo
        .fail(FailRequest {
            code: Code::NotFound as i32,
            message: "gone".into(),
        })
        .await
        .expect_err("fail");
    assert_eq!((status.code(), status.message()), (Code::NotFound, "gone"));
}

struct PanickingNamer;

#[tonic::async_trait]
impl Namer for PanickingNamer {
    async fn name(&self, _: Request<NameRequest>) -> Result<Response<NameReply>, Status> {
        panic!("handler bug (expected by the test)");
    }
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_own_call() {
    let server = Server::builder()
        .add_direct(NamerService::new(PanickingNamer))
        .add_direct(DirectEcho::new(EchoService::new("server")))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    for _ in 0..2 {
        let status = NamerClient::new(client.channel())
            .name(NameRequest {})
            .await
            .expect_err("panicked");
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(status.message().contains("panicked"), "{status:?}");
    }
    // The connection and its other calls go on.
    let reply = EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("echo after the panics");
    assert_eq!(reply.into_inner().answered_by, "server");
    assert!(client.peer().is_some_and(|p| p.is_usable()));
}

#[tokio::test]
async fn streaming_calls_end_at_their_deadline_and_when_dropped() {
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = direct_server(echo);
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let mut echo = EchoClient::new(client.channel());

    // Client streaming into a handler that stops reading: the deadline ends it.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(EchoRequest {
        text: "stall".into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.set_timeout(Duration::from_millis(300));
    let status = echo.sink(request).await.expect_err("deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(tx);

    // Bidi dropped mid-stream: the direct handler's side learns of it (the
    // generated client's streaming methods are tonic's).
    crate::cancellation::check_streaming_handler_sees_the_cancel(
        TonicEchoClient::new(client.channel()),
        &probe,
    )
    .await;
}

/// Blocks the thread of the first handler that passes it until released;
/// later ones pass at once.
#[derive(Clone)]
struct Gate {
    gate: std::sync::Arc<std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
    entered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    /// A closed gate and what opens it.
    fn new() -> (Gate, std::sync::mpsc::Sender<()>) {
        let (release, gate) = std::sync::mpsc::channel();
        let gate = Gate {
            gate: std::sync::Arc::new(std::sync::Mutex::new(Some(gate))),
            entered: std::sync::Arc::default(),
        };
        (gate, release)
    }

    /// Blocks the first caller's thread, as a handler that computes for long
    /// would. In place: the rest of the worker's queue goes on on another
    /// thread, so only the task running the handler waits.
    fn pass(&self) {
        let gate = self.gate.lock().expect("lock").take();
        if let Some(gate) = gate {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let _ = tokio::task::block_in_place(|| gate.recv());
        }
    }

    /// Whether a handler is blocked at the gate (or was).
    fn entered(&self) -> bool {
        self.entered.load(Ordering::SeqCst) == 1
    }
}

/// Blocks its thread in the first call until released.
struct BlockingNamer(Gate);

#[tonic::async_trait]
impl Namer for BlockingNamer {
    async fn name(&self, _: Request<NameRequest>) -> Result<Response<NameReply>, Status> {
        // A handler that blocks its thread (what task_per_call is for).
        self.0.pass();
        Ok(Response::new(NameReply { name: "x".into() }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_task_per_call_a_blocking_handler_holds_up_no_other_call() {
    let (gate, release) = Gate::new();
    let server = Server::builder()
        .add_direct(NamerService::new(BlockingNamer(gate.clone())))
        .task_per_call(true)
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let channel = client.channel();
    let blocked = tokio::spawn(async move { NamerClient::new(channel).name(NameRequest {}).await });
    eventually(Duration::from_secs(10), "first handler blocking", || {
        gate.entered()
    })
    .await;
    // Same connection, while the first handler still blocks its thread.
    let second = tokio::time::timeout(
        Duration::from_secs(20),
        NamerClient::new(client.channel()).name(NameRequest {}),
    )
    .await
    .expect("the second call was held up by the blocked handler")
    .expect("second call");
    assert_eq!(second.into_inner().name, "x");
    release.send(()).expect("release");
    blocked.await.expect("join").expect("first call");
}

/// Greets; the first greeting of [`LARGE_GREETING`] bytes or more blocks its
/// thread until released.
struct BlockingGreeter(Gate);

/// Larger than the frames that move a served call to a task of its own
/// (64 KiB).
const LARGE_GREETING: usize = 256 * 1024;

#[tonic::async_trait]
impl Greeter for BlockingGreeter {
    async fn greet(&self, request: Request<GreetRequest>) -> Result<Response<GreetReply>, Status> {
        let greeting = request.into_inner().greeting;
        if greeting.len() >= LARGE_GREETING {
            // Only the task running this handler waits: the connection's
            // task, were the call still on it.
            self.0.pass();
        }
        Ok(Response::new(GreetReply {
            message: greeting.len().to_string(),
        }))
    }
}

/// A call whose request is a large frame leaves the connection's task (on
/// which a connection's calls are served by default) for a task of its own:
/// while its handler blocks a thread, a small call on the same connection is
/// still answered. Without the move the blocked handler would hold the
/// connection's task, and the small call would wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_with_a_large_request_runs_beside_the_connections_other_calls() {
    let (gate, release) = Gate::new();
    let server = Server::builder()
        .add_direct(GreeterService::new(BlockingGreeter(gate.clone())))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let channel = client.channel();
    let large = tokio::spawn(async move {
        GreeterClient::new(channel)
            .greet(GreetRequest {
                greeting: "x".repeat(LARGE_GREETING),
            })
            .await
    });
    eventually(
        Duration::from_secs(20),
        "the large call's handler blocking",
        || gate.entered(),
    )
    .await;
    let small = tokio::time::timeout(
        Duration::from_secs(20),
        GreeterClient::new(client.channel()).greet(GreetRequest {
            greeting: "hi".into(),
        }),
    )
    .await
    .expect("the small call was held up by the large call's blocked handler")
    .expect("small call");
    assert_eq!(small.into_inner().message, "2");
    release.send(()).expect("release");
    let large = large.await.expect("join").expect("large call");
    assert_eq!(large.into_inner().message, LARGE_GREETING.to_string());
}

/// Never answers; counts its handlers entered and dropped.
#[derive(Default, Clone)]
struct PendingGreeter {
    entered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

struct CountsDrop(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for CountsDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl Greeter for PendingGreeter {
    async fn greet(&self, _: Request<GreetRequest>) -> Result<Response<GreetReply>, Status> {
        let _guard = CountsDrop(self.dropped.clone());
        self.entered.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// A call that moved to a task of its own (its request was a large frame)
/// still ends with its connection, as one served on the connection's task
/// does: both handlers are dropped when the client goes. (That the moved
/// call's task is aborted when `serve` drops it is the unit test
/// `a_moved_call_is_aborted_when_its_connection_drops_it`.)
#[tokio::test]
async fn a_large_call_on_its_own_task_ends_with_its_connection() {
    let greeter = PendingGreeter::default();
    let server = Server::builder()
        .add_direct(GreeterService::new(greeter.clone()))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let channel = client.channel();
    let calls: Vec<_> = [LARGE_GREETING, 16]
        .into_iter()
        .map(|len| {
            let channel = channel.clone();
            tokio::spawn(async move {
                GreeterClient::new(channel)
                    .greet(GreetRequest {
                        greeting: "x".repeat(len),
                    })
                    .await
            })
        })
        .collect();
    eventually(Duration::from_secs(20), "both handlers running", || {
        greeter.entered.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(greeter.dropped.load(Ordering::SeqCst), 0);
    client.close();
    eventually(Duration::from_secs(20), "both handlers dropped", || {
        greeter.dropped.load(Ordering::SeqCst) == 2
    })
    .await;
    for call in calls {
        let status = call
            .await
            .expect("join")
            .expect_err("the connection closed");
        assert_ne!(status.code(), Code::Ok);
    }
}

/// Large messages on the direct path, which sends the large `bytes` fields
/// of a message as pieces of their own: over QUIC both ways (unary and
/// streamed replies) and over a Unix socket, every reply comes back intact.
#[tokio::test]
async fn large_messages_on_the_direct_path_arrive_intact() {
    let blob: Vec<u8> = (0..(300 << 10)).map(|i| (i % 251) as u8).collect();
    let request = || EchoRequest {
        text: "t".repeat(20 << 10),
        blob: blob.clone(),
        seq: 9,
    };
    let check = |reply: common::echo::EchoReply| {
        assert_eq!(reply.blob, blob);
        assert_eq!(reply.text.len(), 20 << 10);
        assert_eq!(reply.seq, 9);
    };
    let server = direct_server(EchoService::new("server"));
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let mut forward = EchoClient::new(client.channel());
    for _ in 0..3 {
        check(
            forward
                .unary(request())
                .await
                .expect("forward")
                .into_inner(),
        );
    }
    // Streamed replies (the direct dispatcher's reply stream).
    let mut replies = forward
        .bidi(tokio_stream::iter([request(), request(), request()]))
        .await
        .expect("bidi")
        .into_inner();
    let mut streamed = 0;
    while let Some(reply) = replies.next().await {
        check(reply.expect("streamed reply"));
        streamed += 1;
    }
    assert_eq!(streamed, 3);
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    let mut reverse = peer.client(EchoClient::new);
    for _ in 0..3 {
        check(
            reverse
                .unary(request())
                .await
                .expect("reverse")
                .into_inner(),
        );
    }

    let path = std::env::temp_dir().join(format!("brpc-direct-large-{}.sock", std::process::id()));
    let unix = Server::builder()
        .add_direct(DirectEcho::new(EchoService::new("unix")))
        .bind_unix(&path)
        .expect("bind unix");
    let local = Client::builder()
        .connect_unix(&path)
        .await
        .expect("connect unix");
    let mut over_unix = EchoClient::new(local.channel());
    for _ in 0..3 {
        check(over_unix.unary(request()).await.expect("unix").into_inner());
    }
    drop(unix);
    let _ = std::fs::remove_file(&path);
}

/// A server stream that fails before its first message: on the direct
/// path as on the tonic path (and as over HTTP/2), the call succeeds and
/// the stream's first item is the error, for a direct and a tonic client.
#[tokio::test]
async fn a_stream_failing_before_its_first_message_fails_in_the_stream() {
    let server = direct_server(EchoService::new("server"));
    let client = direct_client(&server, "agent-1", EchoService::new("agent-1")).await;
    let mut stream = EchoClient::new(client.channel())
        .range(RangeRequest { from: 5, to: 1 })
        .await
        .expect("the call is answered")
        .into_inner();
    let first = stream
        .next()
        .await
        .expect("an item")
        .expect_err("the error");
    assert_eq!(first.code(), Code::OutOfRange, "{first:?}");
    let mut stream = TonicEchoClient::new(client.channel())
        .range(RangeRequest { from: 5, to: 1 })
        .await
        .expect("the call is answered")
        .into_inner();
    let first = stream.message().await.expect_err("the error");
    assert_eq!(first.code(), Code::OutOfRange, "{first:?}");
}
