//! Deadlines both ways: a tonic timeout travels as `timeout_nano`, the handler
//! sees it, the callee ends the call with DEADLINE_EXCEEDED and drops the
//! handler; the caller gives up on its own even when the peer says nothing.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use brpc::core::metadata::parse_grpc_timeout;
use common::echo::SleepRequest;
use common::echo::echo_client::EchoClient;
use common::{EchoService, eventually};
use tonic::{Code, Request};

fn sleep_request(millis: u64, timeout: Duration) -> Request<SleepRequest> {
    let mut request = Request::new(SleepRequest { millis });
    request.set_timeout(timeout);
    request
}

async fn check_deadline(mut echo: EchoClient<brpc::Channel>, probe: &common::Probe) {
    let started = tokio::time::Instant::now();
    let err = echo
        .sleep(sleep_request(30_000, Duration::from_millis(200)))
        .await
        .expect_err("handler sleeps past the deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up far too late"
    );

    // The handler saw its own deadline, as tonic handlers do: grpc-timeout.
    let seen = probe
        .observed_timeout
        .lock()
        .expect("lock")
        .clone()
        .expect("handler saw grpc-timeout");
    let seen =
        parse_grpc_timeout(&http::HeaderValue::from_str(&seen).expect("value")).expect("parses");
    assert!(
        seen <= Duration::from_millis(200) && seen > Duration::ZERO,
        "{seen:?}"
    );
    // And the callee dropped the handler when the deadline ran out.
    eventually(Duration::from_secs(5), "handler dropped", || {
        probe.dropped.load(Ordering::SeqCst) == 1
    })
    .await;

    // A call that fits its deadline succeeds on the same connection.
    echo.sleep(sleep_request(1, Duration::from_secs(30)))
        .await
        .expect("within deadline");
}

#[tokio::test]
async fn client_to_server_deadline() {
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = common::server_with(echo);
    let client = common::client(&server, "agent").await;
    check_deadline(EchoClient::new(client.channel()), &probe).await;
}

#[tokio::test]
async fn server_to_client_deadline() {
    let server = common::server();
    let (_client, peer, probe) = common::probed_client(&server, "agent").await;
    check_deadline(peer.client(EchoClient::new), &probe).await;
}

/// A hand-written client that says Hello and then never answers anything.
async fn silent_client(server: &brpc::Server) -> (quinn::Connection, brpc::ConnectionId) {
    let (conn, id) = common::raw_client(server, "silent").await;
    // Accept the server's calls and hold them open without a word.
    let held = conn.clone();
    tokio::spawn(async move {
        let mut streams = Vec::new();
        while let Ok(stream) = held.accept_bi().await {
            streams.push(stream);
        }
    });
    (conn, id)
}

#[tokio::test]
async fn the_caller_gives_up_at_its_deadline_when_the_peer_is_silent() {
    let server = common::server();
    let (_conn, id) = silent_client(&server).await;
    let peer = server.peers().get(id).expect("registered");
    let started = tokio::time::Instant::now();
    let err = peer
        .client(EchoClient::new)
        .sleep(sleep_request(0, Duration::from_millis(200)))
        .await
        .expect_err("silent peer");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(190));
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Go's ttrpc sends a negative `timeout_nano` for a call whose context had
/// already expired: the callee answers DEADLINE_EXCEEDED and never runs the
/// handler (0 still means no deadline).
#[tokio::test]
async fn a_negative_timeout_nano_is_already_expired() {
    use prost::Message;
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = common::server_with(echo);
    let (conn, _id) = common::raw_client(&server, "go-like").await;
    let request = |timeout_nano| brpc::core::wire::Request {
        service: "test.echo.v1.Echo".into(),
        method: "Unary".into(),
        payload: common::echo::EchoRequest {
            text: "late".into(),
            ..Default::default()
        }
        .encode_to_vec()
        .into(),
        timeout_nano,
        ..Default::default()
    };
    let response = common::raw_call(&conn, request(-1)).await;
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::DeadlineExceeded as i32, "{status:?}");
    assert_eq!(probe.unary_calls.load(Ordering::SeqCst), 0, "handler ran");

    let response = common::raw_call(&conn, request(0)).await;
    assert_eq!(response.status.expect("status").code, 0, "0 is no deadline");
    assert_eq!(probe.unary_calls.load(Ordering::SeqCst), 1);
}

/// A callee whose deadline runs out while its handler holds the call's
/// streamed input answers DEADLINE_EXCEEDED and stops the input with
/// CANCELLED (0x01), as PROTOCOL.md §4 says, not with the 0x00 of a stream
/// merely dropped unread.
#[tokio::test]
async fn a_callee_deadline_stops_the_streamed_input_as_cancelled() {
    use brpc::core::wire::{self, Flags, FrameType};
    use prost::Message;
    let server = common::server();
    let (conn, _id) = common::raw_client(&server, "slow-sender").await;
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let stream_id = wire::stream_id(send.id().index(), true);
    let request = wire::Request {
        service: "test.echo.v1.Echo".into(),
        method: "Sink".into(),
        timeout_nano: 200_000_000,
        ..Default::default()
    };
    // The Request opens the input; its first message makes Sink hold it.
    let mut bytes = common::frame(
        stream_id,
        FrameType::Request,
        Flags::REMOTE_OPEN,
        request.encode_to_vec(),
    );
    let stall = common::echo::EchoRequest {
        text: "stall".into(),
        ..Default::default()
    };
    bytes.extend(common::frame(
        stream_id,
        FrameType::Data,
        Flags::EMPTY,
        stall.encode_to_vec(),
    ));
    send.write_all(&bytes).await.expect("write");
    let stopped = tokio::time::timeout(Duration::from_secs(10), send.stopped())
        .await
        .expect("stopped within 10 s")
        .expect("stopped, not lost");
    assert_eq!(
        stopped,
        Some(brpc::core::conn::codes::STREAM_CANCELLED.into())
    );
    let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 16))
        .await
        .expect("answered within 10 s")
        .expect("answer");
    let frame = wire::FrameDecoder::new(1 << 16)
        .decode(&mut bytes::BytesMut::from(&answer[..]))
        .expect("frame")
        .expect("whole frame");
    let response = wire::Response::decode(frame.payload.into_bytes()).expect("Response");
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::DeadlineExceeded as i32, "{status:?}");
}
