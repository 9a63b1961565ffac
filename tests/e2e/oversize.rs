//! Oversized messages: whichever side refuses (the sender before sending, or
//! the receiver from the frame header), the call ends with RESOURCE_EXHAUSTED
//! and the connection and its other calls live on.

use crate::common;

use common::EchoService;
use common::echo::EchoRequest;
use common::echo::echo_client::EchoClient;
use tokio_stream::StreamExt;
use tonic::Code;

const MIB: usize = 1 << 20;

fn blob(len: usize) -> EchoRequest {
    EchoRequest {
        text: "big".into(),
        blob: vec![0xab; len],
        seq: 1,
    }
}

fn unlimited(client: EchoClient<brpc::Channel>) -> EchoClient<brpc::Channel> {
    // Take tonic's own 4 MiB decode limit out of the way: brpc's is under test.
    client
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

async fn still_works(echo: &mut EchoClient<brpc::Channel>) {
    let reply = echo
        .unary(EchoRequest {
            seq: 9,
            ..Default::default()
        })
        .await
        .expect("normal call");
    assert_eq!(reply.into_inner().seq, 9);
}

async fn expect_exhausted<T: std::fmt::Debug>(result: Result<T, tonic::Status>) {
    let err = result.expect_err("oversized");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("maximum message size"),
        "{}",
        err.message()
    );
}

/// A server and a client with these brpc limits; tonic's own limits are
/// lifted. The server takes its limit as a set of options, the client by its
/// setter: both end up in the connection's limits.
async fn setup(server_max: usize, client_max: usize) -> (brpc::Server, brpc::Client) {
    let server = brpc::Server::builder()
        .options(brpc::ConnectionOptions::default().max_message_size(server_max))
        .add_service(
            common::echo::echo_server::EchoServer::new(EchoService::new("server"))
                .max_decoding_message_size(usize::MAX),
        )
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = common::client_builder(&server, "agent", EchoService::new("agent"))
        .max_message_size(client_max)
        .add_service(
            common::echo::echo_server::EchoServer::new(EchoService::new("agent"))
                .max_decoding_message_size(usize::MAX),
        )
        .connect(server.local_addr())
        .await
        .expect("connect");
    let peer = server.peers().get(client.connection_id()).expect("listed");
    assert_eq!(peer.max_message_size(), server_max);
    let server_end = client.peer().expect("connected");
    assert_eq!(server_end.max_message_size(), client_max);
    (server, client)
}

#[tokio::test]
async fn the_sender_refuses_to_send_an_oversized_request() {
    let (server, client) = setup(4 * MIB, 4 * MIB).await;
    let mut echo = unlimited(EchoClient::new(client.channel()));
    expect_exhausted(echo.unary(blob(5 * MIB)).await).await;
    still_works(&mut echo).await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    let mut back = unlimited(peer.client(EchoClient::new));
    expect_exhausted(back.unary(blob(5 * MIB)).await).await;
    still_works(&mut back).await;
}

#[tokio::test]
async fn the_server_refuses_an_oversized_request_from_the_header() {
    let (_server, client) = setup(4 * MIB, 8 * MIB).await;
    let mut echo = unlimited(EchoClient::new(client.channel()));
    expect_exhausted(echo.unary(blob(5 * MIB)).await).await;
    still_works(&mut echo).await;
    // A streamed oversized message ends only its own call.
    let messages = tokio_stream::iter(vec![blob(10), blob(5 * MIB), blob(10)]);
    let result = async {
        let mut replies = echo.bidi(messages).await?.into_inner();
        while let Some(reply) = replies.next().await {
            reply?;
        }
        Ok::<(), tonic::Status>(())
    }
    .await;
    expect_exhausted(result).await;
    still_works(&mut echo).await;
}

#[tokio::test]
async fn the_client_refuses_an_oversized_request_from_the_server() {
    let (server, client) = setup(8 * MIB, 4 * MIB).await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    let mut back = unlimited(peer.client(EchoClient::new));
    expect_exhausted(back.unary(blob(5 * MIB)).await).await;
    still_works(&mut back).await;
}

#[tokio::test]
async fn oversized_responses_end_the_call_on_either_end() {
    // The receiving caller refuses: server may send 8 MiB, client takes 4.
    let (_server, client) = setup(8 * MIB, 4 * MIB).await;
    let mut echo = unlimited(EchoClient::new(client.channel()));
    let grow = EchoRequest {
        text: format!("grow:{}", 5 * MIB),
        ..Default::default()
    };
    expect_exhausted(echo.unary(grow.clone()).await).await;
    still_works(&mut echo).await;

    // The sending callee refuses: server may send only 4 MiB.
    let (_server, client) = setup(4 * MIB, 8 * MIB).await;
    let mut echo = unlimited(EchoClient::new(client.channel()));
    expect_exhausted(echo.unary(grow).await).await;
    still_works(&mut echo).await;
}

/// The tonic client's own decode limit holds for an answer that arrives
/// whole (a unary reply): one under it fails `OUT_OF_RANGE`, as tonic
/// reports it, and one raised above tonic's 4 MiB default lets a 5 MiB
/// reply through.
#[tokio::test]
async fn a_tonic_clients_decode_limit_holds_for_a_whole_answer() {
    let (_server, client) = setup(16 * MIB, 16 * MIB).await;
    let peer = client.peer().expect("connected");

    let mut small = EchoClient::new(peer.channel()).max_decoding_message_size(64);
    let status = small.unary(blob(1024)).await.expect_err("over 64 bytes");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    let mut large = unlimited(EchoClient::new(peer.channel())).max_decoding_message_size(16 * MIB);
    let reply = large.unary(blob(5 * MIB)).await.expect("within 16 MiB");
    assert_eq!(reply.into_inner().blob.len(), 5 * MIB);
}

/// `calls` unary calls of a client whose budget holds one 3 MB answer and
/// whose QUIC receive window is 256 KiB, answered together (so the answers'
/// data interleave): what each returned.
async fn large_answers_at_once(calls: usize) -> Vec<Result<usize, tonic::Status>> {
    const ANSWER: usize = 3_000_000;
    let server = common::server();
    let client = common::client_builder(&server, "downloader", EchoService::new("downloader"))
        .max_message_size(4 * MIB)
        .buffer_per_connection(4 * MIB)
        .receive_window(256 * 1024)
        // A frame stalled this long is reset: shorter than the default, so
        // that a stall shows as a failed call rather than a slow test.
        .call_idle_timeout(Some(std::time::Duration::from_secs(10)))
        .connect(server.local_addr())
        .await
        .expect("connect");
    let echo = unlimited(EchoClient::new(client.channel()));
    let calls = (0..calls).map(|i| {
        let mut echo = echo.clone();
        tokio::spawn(async move {
            let reply = echo
                .unary(EchoRequest {
                    text: format!("together:{calls}:{ANSWER}"),
                    blob: Vec::new(),
                    seq: i as u64,
                })
                .await?;
            let blob = reply.into_inner().blob;
            assert_eq!(blob.len(), ANSWER, "call {i}: the whole answer");
            Ok(blob.len())
        })
    });
    // Bounded: a stalled answer waits for its Response, which no idle
    // limit covers, and a handler for the other calls that never came.
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("every call ended within 60 s")
    .into_iter()
    .map(|joined| joined.expect("call task"))
    .collect()
}

/// More large answers at once than the caller's budget holds: those that
/// wait for room keep their data in QUIC, up to a stream window (1.25 MB)
/// each, more than the whole 256 KiB receive window. They must not starve
/// the answer that has room: every call gets its answer, none stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_waiting_for_room_do_not_starve_the_one_being_received() {
    // One answer received, three waiting: as many as may wait here (three
    // 256 KiB receive windows of 256 KiB stream windows).
    for (i, result) in large_answers_at_once(4).await.into_iter().enumerate() {
        result.unwrap_or_else(|s| panic!("call {i}: {s:?}"));
    }
}

/// Beyond the frames a connection lets wait for room (three receive
/// windows' worth of stream windows here), a call fails at once with
/// RESOURCE_EXHAUSTED saying what to change, rather than wait; no call
/// stalls, and the rest arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_beyond_the_waiting_room_fail_at_once() {
    let results = large_answers_at_once(12).await;
    let answered = results.iter().filter(|r| r.is_ok()).count();
    for (i, result) in results.into_iter().enumerate() {
        if let Err(status) = result {
            assert_eq!(
                status.code(),
                Code::ResourceExhausted,
                "call {i}: {status:?}"
            );
            assert!(
                status.message().contains("waiting for room")
                    && status.message().contains("buffer_per_connection"),
                "call {i}: {status:?}"
            );
        }
    }
    assert!(answered >= 4, "only {answered} answered");
}

/// The same on the serving side: large streamed messages of several calls
/// at once, more than the server's budget holds, all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_messages_waiting_for_room_do_not_starve_the_one_being_received() {
    const MESSAGE: usize = 3_000_000;
    const CALLS: usize = 4;
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = brpc::Server::builder()
        .max_message_size(4 * MIB)
        .buffer_per_connection(4 * MIB)
        .receive_window(256 * 1024)
        .call_idle_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(common::echo::echo_server::EchoServer::new(echo))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = common::client(&server, "uploader").await;
    let echo = unlimited(EchoClient::new(client.channel()));
    let calls = (0..CALLS).map(|i| {
        let mut echo = echo.clone();
        tokio::spawn(async move {
            // A small first message (the Request), then the large one.
            echo.sink(tokio_stream::iter([blob(1), blob(MESSAGE)]))
                .await
                .unwrap_or_else(|s| panic!("call {i}: {s:?}"));
        })
    });
    let joined = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("every call ended within 60 s");
    for joined in joined {
        joined.expect("call task");
    }
    assert_eq!(
        probe.sunk.load(std::sync::atomic::Ordering::Relaxed),
        CALLS * (MESSAGE + 1)
    );
}
