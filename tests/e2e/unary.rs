//! Unary calls in both directions over real loopback QUIC: client→server,
//! server→client from inside a handler and from the registry, concurrency, and
//! every error path a caller can hit.

use crate::common;

use std::time::Duration;

use brpc::Peer;
use common::echo::echo_client::EchoClient;
use common::echo::{EchoRequest, FailRequest};
use common::greeter::greeter_client::GreeterClient;
use common::greeter::greeter_server::{Greeter, GreeterServer};
use common::greeter::namer_client::NamerClient;
use common::greeter::namer_server::{Namer, NamerServer};
use common::greeter::{GreetReply, GreetRequest, NameReply, NameRequest};
use tonic::{Code, Request, Response, Status};

fn echo(text: &str, seq: u64) -> EchoRequest {
    EchoRequest {
        text: text.into(),
        blob: vec![seq as u8; (seq % 7) as usize],
        seq,
    }
}

#[tokio::test]
async fn client_calls_server() {
    let server = common::server();
    let client = common::client(&server, "agent-1").await;
    let reply = EchoClient::new(client.channel())
        .unary(echo("hi", 3))
        .await
        .expect("call")
        .into_inner();
    assert_eq!(reply.text, "hi");
    assert_eq!(reply.seq, 3);
    assert_eq!(reply.blob, vec![3u8; 3]);
    assert_eq!(reply.answered_by, "server");
}

#[tokio::test]
async fn empty_message_round_trips() {
    let server = common::server();
    let client = common::client(&server, "agent-1").await;
    let reply = EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("call")
        .into_inner();
    assert_eq!(reply.text, "");
    assert_eq!(reply.answered_by, "server");
}

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
            message: format!("Hello, {name} ({})", peer.connection_id()),
        }))
    }
}

/// Answers `Name` with a fixed name (shared with the direct-path tests).
pub(crate) struct FixedNamer(pub(crate) &'static str);

#[tonic::async_trait]
impl Namer for FixedNamer {
    async fn name(&self, _: Request<NameRequest>) -> Result<Response<NameReply>, Status> {
        Ok(Response::new(NameReply {
            name: self.0.into(),
        }))
    }
}

#[tokio::test]
async fn server_calls_back_the_calling_client_from_a_handler() {
    let server = brpc::Server::builder()
        .add_service(GreeterServer::new(CallbackGreeter))
        .bind("127.0.0.1:0")
        .expect("bind");
    let mut clients = Vec::new();
    for name in ["Ada", "Grace"] {
        let client = brpc::Client::builder()
            .name(name)
            .add_service(NamerServer::new(FixedNamer(name)))
            .pin_certificate(server.certificate().clone())
            .connect(server.local_addr())
            .await
            .expect("connect");
        clients.push((name, client));
    }
    // Each greeting must come from the caller's own Namer, not the other client's.
    for (name, client) in &clients {
        let reply = GreeterClient::new(client.channel())
            .greet(GreetRequest::default())
            .await
            .expect("greet")
            .into_inner();
        assert_eq!(
            reply.message,
            format!("Hello, {name} ({})", client.connection_id())
        );
    }
}

#[tokio::test]
async fn server_calls_client_through_the_registry() {
    let server = common::server();
    let client = common::client(&server, "agent-7").await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    assert_eq!(peer.name(), "agent-7");
    assert_eq!(peer.label("role"), Some("test"));
    let reply = peer
        .client(EchoClient::new)
        .unary(echo("from server", 9))
        .await
        .expect("reverse call")
        .into_inner();
    assert_eq!(reply.answered_by, "agent-7");
    assert_eq!(reply.seq, 9);
}

#[tokio::test]
async fn hundred_concurrent_calls_each_way_are_matched() {
    let server = common::server();
    let client = common::client(&server, "agent-c").await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");

    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let mut to_server = EchoClient::new(client.channel());
        tasks.push(tokio::spawn(async move {
            let r = to_server
                .unary(echo(&format!("up-{i}"), i))
                .await?
                .into_inner();
            Ok::<_, Status>((r, format!("up-{i}"), i, "server"))
        }));
        let mut to_client = peer.client(EchoClient::new);
        tasks.push(tokio::spawn(async move {
            let r = to_client
                .unary(echo(&format!("down-{i}"), i))
                .await?
                .into_inner();
            Ok::<_, Status>((r, format!("down-{i}"), i, "agent-c"))
        }));
    }
    assert_eq!(tasks.len(), 200);
    for task in tasks {
        let (reply, text, seq, by) = task.await.expect("join").expect("call");
        assert_eq!(reply.text, text);
        assert_eq!(reply.seq, seq);
        assert_eq!(reply.blob, vec![seq as u8; (seq % 7) as usize]);
        assert_eq!(reply.answered_by, by);
    }
}

/// Large messages in flight at once, each with a pattern of its own, come
/// back intact over QUIC and over a Unix socket, both ways, while the
/// buffers large frames are reassembled in are kept and reused
/// (`conn::spare`): a buffer handed to a frame while another still held
/// part of it would show as a wrong byte. (That buffers are reused at all
/// is `tests/large_buffers.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_at_once_come_back_intact_over_quic_and_unix() {
    let path = std::env::temp_dir().join(format!("brpc-intact-{}.sock", std::process::id()));
    let server = common::server();
    server
        .listen_unix(&path)
        .expect("listen on the Unix socket");
    let quic = common::client(&server, "over-quic").await;
    let unix = brpc::Client::builder()
        .name("over-unix")
        .add_service(common::echo::echo_server::EchoServer::new(
            common::EchoService::new("over-unix"),
        ))
        .connect_unix(&path)
        .await
        .expect("connect over the Unix socket");
    let quic_peer = server.peers().get(quic.connection_id()).expect("listed");
    let unix_peer = server.peers().get(unix.connection_id()).expect("listed");
    let channels = [
        quic.channel(),
        unix.channel(),
        quic_peer.channel(),
        unix_peer.channel(),
    ];
    let mut calls = tokio::task::JoinSet::new();
    for (way, channel) in channels.into_iter().enumerate() {
        for task in 0..4u64 {
            let mut echo = EchoClient::new(channel.clone());
            calls.spawn(async move {
                for call in 0..6u64 {
                    let seq = (way as u64) << 16 | task << 8 | call;
                    // 100-300 KB, each byte a function of the call and its
                    // place.
                    let len = 100_000 + (seq as usize * 7919) % 200_000;
                    let blob: Vec<u8> = (0..len)
                        .map(|i| (i as u64 ^ seq.wrapping_mul(31)) as u8)
                        .collect();
                    let reply = echo
                        .unary(EchoRequest {
                            text: String::new(),
                            blob: blob.clone(),
                            seq,
                        })
                        .await
                        .expect("unary")
                        .into_inner();
                    assert_eq!(reply.seq, seq);
                    assert!(reply.blob == blob, "call {seq:#x} came back altered");
                }
            });
        }
    }
    while let Some(done) = calls.join_next().await {
        done.expect("a caller panicked");
    }
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn unknown_service_and_method_are_unimplemented_both_ways() {
    let server = brpc::Server::builder()
        .add_service(GreeterServer::new(CallbackGreeter))
        .bind("127.0.0.1:0")
        .expect("bind");
    // This client hosts nothing.
    let client = brpc::Client::builder()
        .pin_certificate(server.certificate().clone())
        .connect(server.local_addr())
        .await
        .expect("connect");
    let err = EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect_err("server has no Echo");
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().contains("test.echo.v1.Echo"),
        "{}",
        err.message()
    );

    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    let err = peer
        .client(NamerClient::new)
        .name(NameRequest {})
        .await
        .expect_err("client has no Namer");
    assert_eq!(err.code(), Code::Unimplemented);

    // Known service, unknown method: a raw tonic call with a made-up path.
    let mut grpc = tonic::client::Grpc::new(client.channel());
    grpc.ready().await.expect("ready");
    let err = grpc
        .unary::<GreetRequest, GreetReply, _>(
            Request::new(GreetRequest::default()),
            http::uri::PathAndQuery::from_static("/greeter.v1.Greeter/Nope"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("no such method");
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), "method Nope");
}

#[tokio::test]
async fn handler_status_arrives_intact_both_ways() {
    let server = common::server();
    let client = common::client(&server, "agent-s").await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    let message = "ключ не найден — clé introuvable ✗ 100% \"quoted\"\nnext line";
    for code in [
        Code::NotFound,
        Code::PermissionDenied,
        Code::Internal,
        Code::Unavailable,
    ] {
        let req = FailRequest {
            code: code as i32,
            message: message.into(),
        };
        let up = EchoClient::new(client.channel())
            .fail(req.clone())
            .await
            .expect_err("fails");
        let down = peer
            .client(EchoClient::new)
            .fail(req)
            .await
            .expect_err("fails");
        for err in [up, down] {
            assert_eq!(err.code(), code);
            assert_eq!(err.message(), message);
        }
    }
}

#[tokio::test]
async fn calls_after_the_peer_left_fail_with_unavailable() {
    let server = common::server();
    let client = common::client(&server, "agent-gone").await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    client.shutdown(std::time::Duration::from_secs(5)).await;
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        peer.client(EchoClient::new).unary(EchoRequest::default()),
    )
    .await
    .expect("no hang")
    .expect_err("peer is gone");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn an_agent_cannot_reach_another_agents_services() {
    // The server hosts only Greeter; agent B hosts Echo. Agent A asking the
    // server for Echo gets UNIMPLEMENTED: calls are never forwarded.
    let server = brpc::Server::builder()
        .add_service(GreeterServer::new(CallbackGreeter))
        .bind("127.0.0.1:0")
        .expect("bind");
    let _b = common::client_builder(&server, "b", common::EchoService::new("b"))
        .connect(server.local_addr())
        .await
        .expect("b");
    let a = brpc::Client::builder()
        .pin_certificate(server.certificate().clone())
        .connect(server.local_addr())
        .await
        .expect("a");
    let err = EchoClient::new(a.channel())
        .unary(EchoRequest::default())
        .await
        .expect_err("not reachable");
    assert_eq!(err.code(), Code::Unimplemented);
}
