//! Cancellation: dropping the caller's future resets the call's QUIC stream;
//! the handler on the other side is dropped promptly, and a handler still
//! reading a streaming input sees CANCELLED.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::echo::echo_client::EchoClient;
use common::echo::{EchoRequest, SleepRequest};
use common::{EchoService, eventually};
use tokio_stream::StreamExt;

async fn check_drop_cancels(mut echo: EchoClient<brpc::Channel>, probe: &common::Probe) {
    let call = tokio::spawn(async move { echo.sleep(SleepRequest { millis: 60_000 }).await });
    eventually(Duration::from_secs(10), "handler running", || {
        probe.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    call.abort();
    let dropped_at = tokio::time::Instant::now();
    eventually(Duration::from_secs(1), "handler dropped within 1 s", || {
        probe.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(dropped_at.elapsed() < Duration::from_secs(1));
    assert_eq!(probe.in_flight.load(Ordering::SeqCst), 0);
}

/// A bidi call dropped mid-stream: the handler's side learns at once, its
/// input ending or its output closing, whichever it is waiting on. (tonic reports a
/// cancelled request stream as its end, over HTTP/2 and here alike.)
pub(crate) async fn check_streaming_handler_sees_the_cancel(
    mut echo: EchoClient<brpc::Channel>,
    probe: &common::Probe,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("call")
        .into_inner();
    tx.send(EchoRequest {
        seq: 1,
        ..Default::default()
    })
    .await
    .expect("send");
    assert_eq!(replies.next().await.expect("reply").expect("ok").seq, 1);
    // Drop the call while both directions are still open.
    drop(replies);
    // The caller never closed its request side, so the input can only have
    // ended because the call was cancelled.
    eventually(Duration::from_secs(1), "handler saw the call end", || {
        probe.inputs_ended.load(Ordering::SeqCst) + probe.outputs_closed.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert!(probe.input_errors.lock().expect("lock").is_empty());
    // The caller's request stream is no longer read: its sends fail soon.
    drop(tx);
}

#[tokio::test]
async fn dropping_a_call_to_the_server_drops_its_handler() {
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = common::server_with(echo);
    let client = common::client(&server, "agent").await;
    check_drop_cancels(EchoClient::new(client.channel()), &probe).await;
    check_streaming_handler_sees_the_cancel(EchoClient::new(client.channel()), &probe).await;
    // The connection is fine afterwards.
    EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("still works");
}

#[tokio::test]
async fn dropping_a_call_to_the_client_drops_its_handler() {
    let server = common::server();
    let (_client, peer, probe) = common::probed_client(&server, "agent").await;
    check_drop_cancels(peer.client(EchoClient::new), &probe).await;
    check_streaming_handler_sees_the_cancel(peer.client(EchoClient::new), &probe).await;
    peer.client(EchoClient::new)
        .unary(EchoRequest::default())
        .await
        .expect("still works");
}

/// A hand-driven client that answers the server's first call with one Data
/// frame and then resets the stream with CANCELLED.
#[tokio::test]
async fn a_callee_reset_mid_stream_is_cancelled_for_the_caller() {
    use brpc::core::wire::{Flags, Frame, FrameType};
    use prost::Message;

    let server = common::server();
    let (conn, id) = common::raw_client(&server, "resetter").await;
    tokio::spawn(async move {
        let Ok((mut send, _recv)) = conn.accept_bi().await else {
            return;
        };
        let stream_id = brpc::core::wire::stream_id(send.id().index(), false);
        let reply = common::echo::EchoReply {
            seq: 42,
            ..Default::default()
        };
        let mut buf = bytes::BytesMut::new();
        Frame::new(
            stream_id,
            FrameType::Data,
            Flags::EMPTY,
            reply.encode_to_vec().into(),
        )
        .encode(&mut buf)
        .expect("encode");
        send.write_all(&buf).await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        send.reset(quinn::VarInt::from_u32(
            brpc::core::conn::codes::STREAM_CANCELLED,
        ))
        .expect("reset");
        conn.closed().await;
    });
    let peer = server.peers().get(id).expect("registered");
    let mut replies = peer
        .client(EchoClient::new)
        .range(common::echo::RangeRequest { from: 0, to: 1000 })
        .await
        .expect("call")
        .into_inner();
    assert_eq!(replies.next().await.expect("first").expect("ok").seq, 42);
    let err = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("no hang")
        .expect("an item")
        .expect_err("reset");
    assert_eq!(err.code(), tonic::Code::Cancelled, "{err:?}");
}
