//! The engine under tokio's paused clock: two engines over the in-memory
//! datagram pipe of `common::pair`, so deadlines, idle limits, the QUIC idle
//! timeout and GoAway are checked in virtual time. Each test's minutes of
//! virtual time take milliseconds of wall time.

use std::time::Duration;

use brpc::core::conn::codes;
use brpc::core::wire::{self, Flags, Frame, FrameDecoder, FrameType, Request};
use bytes::BytesMut;
use prost::Message;
use tokio::time::Instant;
use tonic::Code;

use crate::common::echo::echo_client::EchoClient;
use crate::common::echo::{EchoRequest, SleepRequest};
use crate::common::pair::{limits_with_idle, pair};
use crate::common::{self, eventually};

const ECHO: &str = "test.echo.v1.Echo";

/// Waits (in virtual time, up to 5 s) until a probe counter reads 1.
async fn probe_reaches(counter: &std::sync::atomic::AtomicUsize, what: &str) {
    eventually(Duration::from_secs(5), what, || {
        counter.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
}

fn sleep_request(millis: u64, timeout: Duration) -> tonic::Request<SleepRequest> {
    let mut request = tonic::Request::new(SleepRequest { millis });
    request.set_timeout(timeout);
    request
}

#[tokio::test(start_paused = true)]
async fn deadlines_expire_in_virtual_time_both_ways() {
    let pair = pair(limits_with_idle(Duration::from_secs(30))).await;
    for (caller, callee_probe) in [
        (&pair.client, &pair.server_probe),
        (&pair.server, &pair.client_probe),
    ] {
        let started = Instant::now();
        let err = EchoClient::new(caller.channel())
            .sleep(sleep_request(60_000, Duration::from_secs(2)))
            .await
            .expect_err("the handler sleeps past the deadline");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(60),
            "{waited:?}"
        );
        probe_reaches(&callee_probe.dropped, "the callee's handler dropped").await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_callee_ends_a_call_at_the_deadline_its_request_carries() {
    let pair = pair(limits_with_idle(Duration::from_secs(30))).await;
    let conn = pair.client.quic_connection().expect("quic").clone();
    let started = Instant::now();
    // A caller that never gives up on its own: only the callee's deadline
    // (1 s, from timeout_nano) can end the call.
    let response = common::raw_call(
        &conn,
        Request {
            service: ECHO.into(),
            method: "Sleep".into(),
            payload: SleepRequest { millis: 60_000 }.encode_to_vec().into(),
            timeout_nano: 1_000_000_000,
            ..Default::default()
        },
    )
    .await;
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::DeadlineExceeded as i32, "{status:?}");
    assert!(status.message.contains("1000 ms"), "{}", status.message);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

/// Opens a raw stream on `conn` and writes `frames`, then the first
/// `partial` bytes of `stalled` (a frame that never completes).
async fn stall(
    conn: &quinn::Connection,
    frames: Vec<(FrameType, Flags, Vec<u8>)>,
    partial: usize,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.expect("open");
    let id = wire::stream_id(send.id().index(), true);
    let mut buf = BytesMut::new();
    for (kind, flags, payload) in frames {
        Frame::new(id, kind, flags, payload.into())
            .encode(&mut buf)
            .expect("encode");
    }
    let mut stalled = BytesMut::new();
    Frame::new(id, FrameType::Data, Flags::EMPTY, vec![7u8; 100].into())
        .encode(&mut stalled)
        .expect("encode");
    buf.extend_from_slice(&stalled[..partial]);
    send.write_all(&buf).await.expect("write");
    (send, recv)
}

#[tokio::test(start_paused = true)]
async fn a_request_stalled_mid_frame_is_reset_after_the_idle_limit() {
    let idle = Duration::from_secs(5);
    let pair = pair(limits_with_idle(idle)).await;
    let conn = pair.client.quic_connection().expect("quic").clone();
    let started = Instant::now();
    // Half a frame and nothing more: the callee never sees a Request.
    let (_send, mut recv) = stall(&conn, vec![], 30).await;
    let outcome = recv.read_to_end(1 << 16).await;
    let waited = started.elapsed();
    match outcome {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code, quinn::VarInt::from_u32(codes::STREAM_IDLE));
        }
        other => panic!("expected a reset with the idle code, got {other:?}"),
    }
    assert!(waited >= idle && waited < idle * 2, "{waited:?}");

    // The connection is fine: a normal call succeeds.
    let reply = EchoClient::new(pair.client.channel())
        .unary(EchoRequest {
            text: "still here".into(),
            ..Default::default()
        })
        .await
        .expect("served after the reset");
    assert_eq!(reply.into_inner().text, "still here");
}

#[tokio::test(start_paused = true)]
async fn a_streamed_message_stalled_mid_frame_ends_the_call_with_deadline_exceeded() {
    let idle = Duration::from_secs(5);
    let pair = pair(limits_with_idle(idle)).await;
    let conn = pair.client.quic_connection().expect("quic").clone();
    let request = Request {
        service: ECHO.into(),
        method: "Bidi".into(),
        ..Default::default()
    };
    let started = Instant::now();
    let (send, mut recv) = stall(
        &conn,
        vec![(
            FrameType::Request,
            Flags::REMOTE_OPEN | Flags::NO_DATA,
            request.encode_to_vec(),
        )],
        40,
    )
    .await;
    let answer = recv.read_to_end(1 << 16).await.expect("an answer");
    let waited = started.elapsed();
    // The handler answered with Headers before its input stalled; the last
    // frame ends the call.
    let mut decoder = FrameDecoder::new(1 << 16);
    let mut buf = BytesMut::from(&answer[..]);
    let mut last = None;
    while let Some(frame) = decoder.decode(&mut buf).expect("frame") {
        last = Some(frame);
    }
    let frame = last.expect("a frame");
    assert_eq!(frame.kind, FrameType::Response);
    let status = wire::Response::decode(frame.payload.into_bytes())
        .expect("response")
        .status
        .expect("status");
    assert_eq!(status.code, Code::DeadlineExceeded as i32, "{status:?}");
    assert!(status.message.contains("stalled"), "{}", status.message);
    assert_eq!(
        send.stopped().await.expect("stopped"),
        Some(quinn::VarInt::from_u32(codes::STREAM_IDLE))
    );
    assert!(waited >= idle && waited < idle * 2, "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn a_vanished_peer_fails_its_calls_within_the_idle_timeout() {
    let pair = pair(limits_with_idle(Duration::from_secs(30))).await;
    let mut echo = EchoClient::new(pair.client.channel());
    let call = tokio::spawn(async move {
        let started = Instant::now();
        let outcome = echo.sleep(SleepRequest { millis: 600_000 }).await;
        (outcome, started.elapsed())
    });
    probe_reaches(&pair.server_probe.in_flight, "the call reached the server").await;
    // Every datagram is lost from now on, keep-alives included.
    pair.network.cut(true);
    let (outcome, waited) = call.await.expect("join");
    let err = outcome.expect_err("the server vanished");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let idle = brpc::core::conn::DEFAULT_IDLE_TIMEOUT;
    assert!(
        waited >= idle && waited < idle + Duration::from_secs(5),
        "{waited:?}"
    );
    // The server noticed too: its handler was dropped with the connection.
    let end = pair.server.closed().await;
    assert!(end.is_timeout(), "{end}");
    probe_reaches(&pair.server_probe.dropped, "the server's handler dropped").await;
}

#[tokio::test(start_paused = true)]
async fn goaway_refuses_new_calls_and_lets_running_ones_finish() {
    let pair = pair(limits_with_idle(Duration::from_secs(30))).await;
    let mut echo = EchoClient::new(pair.client.channel());
    let running = tokio::spawn({
        let mut echo = echo.clone();
        async move { echo.sleep(SleepRequest { millis: 3_000 }).await }
    });
    probe_reaches(&pair.server_probe.in_flight, "the call reached the server").await;
    brpc::core::session::send_goaway(&pair.server, "maintenance")
        .await
        .expect("goaway delivered");
    assert!(pair.client.is_going_away());
    assert_eq!(
        pair.client.going_away_reason().as_deref(),
        Some("maintenance")
    );
    let refused = echo
        .unary(EchoRequest::default())
        .await
        .expect_err("no new calls to a peer going away");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    running
        .await
        .expect("join")
        .expect("the running call finished");
}
