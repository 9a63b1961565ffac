//! The bad-input matrix, with raw quinn streams as the hostile peer: every
//! malformed call ends with a clear status (or a documented stream reset), no
//! panic, and a normal call on the same connection succeeds afterwards.

use crate::common;

use std::time::Duration;

use brpc::core::conn::codes;
use brpc::core::wire::{self, Flags, FrameDecoder, FrameType, Request, Response};
use bytes::{BufMut, BytesMut};
use common::echo::{EchoReply, EchoRequest};
use common::{EchoService, frame};
use prost::Message;
use tonic::Code;

fn echo_request(payload: Vec<u8>) -> Vec<u8> {
    common::echo_call("Unary", payload)
}

/// What came back on a stream.
#[derive(Debug)]
enum Outcome {
    Status(Code, String),
    Reset(#[allow(dead_code)] u64),
}

/// Opens a stream, sends `bytes` (built for the stream's id), finishes, and
/// reads the answer.
async fn exchange(conn: &quinn::Connection, build: impl FnOnce(u32) -> Vec<u8>) -> Outcome {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let stream_id = wire::stream_id(send.id().index(), true);
    send.write_all(&build(stream_id)).await.expect("write");
    let _ = send.finish();
    let read = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .expect("answered in time");
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            return Outcome::Reset(code.into_inner());
        }
        Err(e) => panic!("unexpected read error {e}"),
    };
    let mut buf = BytesMut::from(&bytes[..]);
    let mut decoder = FrameDecoder::new(1 << 20);
    while let Some(f) = decoder.decode(&mut buf).expect("frames") {
        if f.kind == FrameType::Response {
            let status = Response::decode(f.payload.into_bytes())
                .expect("response")
                .status
                .expect("status");
            return Outcome::Status(Code::from_i32(status.code), status.message);
        }
    }
    panic!("no Response frame in {bytes:02x?}");
}

async fn normal_call_works(conn: &quinn::Connection) {
    let payload = EchoRequest {
        seq: 7,
        ..Default::default()
    }
    .encode_to_vec();
    let response = common::raw_call(
        conn,
        wire::Request::decode(&echo_request(payload)[..]).expect("req"),
    )
    .await;
    assert_eq!(response.status.expect("status").code, 0);
    assert_eq!(EchoReply::decode(response.payload).expect("reply").seq, 7);
}

#[tokio::test]
async fn every_bad_input_gets_a_clear_answer_and_the_connection_lives() {
    let server = common::server();
    let (conn, _id) = common::raw_client(&server, "hostile").await;
    let valid = || {
        echo_request(
            EchoRequest {
                seq: 1,
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };

    type Case = (
        &'static str,
        Box<dyn FnOnce(u32) -> Vec<u8>>,
        Code,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "garbage bytes",
            Box::new(|_| b"this is not a ttrpc frame at all".to_vec()),
            Code::ResourceExhausted,
            "exceed maximum message size",
        ),
        (
            "truncated header",
            Box::new(|_| vec![0, 0, 0, 4, 0]),
            Code::InvalidArgument,
            "middle of a frame",
        ),
        (
            "length over the max",
            Box::new(|id| {
                let mut b = BytesMut::new();
                b.put_u32(5 << 20);
                b.put_u32(id);
                b.put_u8(1);
                b.put_u8(0);
                b.to_vec()
            }),
            Code::ResourceExhausted,
            "message length 5242880 exceed maximum message size of 4194304",
        ),
        (
            "unknown frame type only",
            Box::new(|id| frame(id, FrameType::Unknown(0x09), Flags::EMPTY, vec![1, 2, 3])),
            Code::InvalidArgument,
            "ended before a Request",
        ),
        (
            "Data before Request",
            Box::new(|id| frame(id, FrameType::Data, Flags::EMPTY, vec![8, 1])),
            Code::InvalidArgument,
            "expected a Request",
        ),
        (
            "a second Request",
            Box::new(move |id| {
                let mut b = frame(
                    id,
                    FrameType::Request,
                    Flags::REMOTE_OPEN,
                    echo_request(vec![]),
                );
                b.extend(frame(
                    id,
                    FrameType::Request,
                    Flags::EMPTY,
                    echo_request(vec![]),
                ));
                b
            }),
            Code::InvalidArgument,
            "second Request",
        ),
        (
            "Response sent by the caller",
            Box::new(move |id| {
                let mut b = frame(
                    id,
                    FrameType::Request,
                    Flags::REMOTE_OPEN,
                    echo_request(vec![]),
                );
                b.extend(frame(
                    id,
                    FrameType::Response,
                    Flags::EMPTY,
                    Response::default().encode_to_vec(),
                ));
                b
            }),
            Code::InvalidArgument,
            "Response frame from the caller",
        ),
        (
            "wrong stream id parity",
            Box::new(move |id| frame(id + 1, FrameType::Request, Flags::EMPTY, valid())),
            Code::InvalidArgument,
            "stream id",
        ),
        (
            "Request flags open and closed",
            Box::new(move |id| {
                frame(
                    id,
                    FrameType::Request,
                    Flags::REMOTE_OPEN | Flags::REMOTE_CLOSED,
                    echo_request(vec![]),
                )
            }),
            Code::InvalidArgument,
            "both open and close",
        ),
        (
            "close frame with data",
            Box::new(move |id| {
                let mut b = frame(
                    id,
                    FrameType::Request,
                    Flags::REMOTE_OPEN,
                    echo_request(vec![]),
                );
                b.extend(frame(id, FrameType::Data, Flags::REMOTE_CLOSED, vec![8, 1]));
                b
            }),
            Code::InvalidArgument,
            "cannot include data",
        ),
        (
            "Request envelope not protobuf",
            Box::new(|id| frame(id, FrameType::Request, Flags::EMPTY, vec![0xff, 0xff, 0xff])),
            Code::InvalidArgument,
            "undecodable Request",
        ),
        (
            "message not protobuf",
            Box::new(|id| {
                frame(
                    id,
                    FrameType::Request,
                    Flags::EMPTY,
                    echo_request(vec![0xff, 0xff, 0xff]),
                )
            }),
            Code::Internal,
            "decode",
        ),
        (
            "empty service name",
            Box::new(|id| {
                let r = Request {
                    method: "Unary".into(),
                    ..Default::default()
                };
                frame(id, FrameType::Request, Flags::EMPTY, r.encode_to_vec())
            }),
            Code::InvalidArgument,
            "names no service",
        ),
        (
            "unknown service",
            Box::new(|id| {
                let r = Request {
                    service: "nope.Nope".into(),
                    method: "X".into(),
                    ..Default::default()
                };
                frame(id, FrameType::Request, Flags::EMPTY, r.encode_to_vec())
            }),
            Code::Unimplemented,
            "service nope.Nope",
        ),
        (
            "a second Hello",
            Box::new(|id| {
                frame(
                    id,
                    FrameType::Request,
                    Flags::EMPTY,
                    common::hello_request(1, "again").encode_to_vec(),
                )
            }),
            Code::FailedPrecondition,
            "already exchanged",
        ),
        (
            "metadata entries past the limit (2 bytes each on the wire)",
            Box::new(move |id| {
                let mut request = echo_request(EchoRequest::default().encode_to_vec());
                for _ in 0..=wire::MAX_METADATA_ENTRIES {
                    request.extend_from_slice(&[0x2a, 0x00]);
                }
                frame(id, FrameType::Request, Flags::EMPTY, request)
            }),
            Code::ResourceExhausted,
            "metadata entries in one frame",
        ),
    ];
    for (name, build, code, text) in cases {
        match exchange(&conn, build).await {
            Outcome::Status(got, message) => {
                assert_eq!(got, code, "{name}: {message}");
                assert!(message.contains(text), "{name}: {message:?} lacks {text:?}");
            }
            other => panic!("{name}: expected a status, got {other:?}"),
        }
        normal_call_works(&conn).await;
    }

    // An unknown frame type before a valid Request is skipped.
    match exchange(&conn, |id| {
        let mut b = frame(id, FrameType::Unknown(0x7f), Flags::EMPTY, vec![]);
        b.extend(frame(id, FrameType::Request, Flags::EMPTY, valid()));
        b
    })
    .await
    {
        Outcome::Status(Code::Ok, _) => {}
        other => panic!("unknown type then Request: {other:?}"),
    }
    assert!(
        server.peers().len() == 1,
        "the hostile client is still connected"
    );
}

#[tokio::test]
async fn a_hostile_callee_cannot_break_the_caller() {
    let server = common::server();
    let (conn, id) = common::raw_client(&server, "hostile-callee").await;
    // An OK answer after a metadata frame whose key is not a header name.
    let ok_after = |stream_id: u32, kind: FrameType| {
        let bad = wire::Metadata {
            entries: vec![wire::KeyValue::new("bad key", "v")],
        };
        let mut b = frame(stream_id, kind, Flags::EMPTY, bad.encode_to_vec());
        b.extend(frame(
            stream_id,
            FrameType::Response,
            Flags::EMPTY,
            Response {
                status: Some(wire::Status::default()),
                payload: EchoReply::default().encode_to_vec().into(),
            }
            .encode_to_vec(),
        ));
        b
    };
    // Each answer, for the ttrpc stream id of the call it answers.
    type Answer = Box<dyn Fn(u32) -> Vec<u8> + Send>;
    let answers: Vec<Answer> = vec![
        Box::new(|_| b"garbage garbage garbage garbage".to_vec()),
        Box::new(|_| frame(2, FrameType::Request, Flags::EMPTY, echo_request(vec![]))),
        Box::new(|_| frame(2, FrameType::Response, Flags::EMPTY, vec![0xff, 0xff])),
        Box::new(|_| frame(4, FrameType::Data, Flags::EMPTY, vec![8, 1])),
        Box::new(move |id| ok_after(id, FrameType::Headers)),
        Box::new(move |id| ok_after(id, FrameType::Trailers)),
    ];
    let responder = conn.clone();
    tokio::spawn(async move {
        for answer in answers {
            let Ok((mut send, _recv)) = responder.accept_bi().await else {
                return;
            };
            let answer = answer(wire::stream_id(send.id().index(), false));
            let _ = send.write_all(&answer).await;
            let _ = send.finish();
        }
    });
    let peer = server.peers().get(id).expect("listed");
    for (expected, says) in [
        (Code::ResourceExhausted, ""),
        (Code::Internal, ""),
        (Code::Internal, ""),
        (Code::Internal, ""),
        // Bad metadata in an answer is the callee's error, not the caller's.
        (Code::Internal, "bad metadata"),
        (Code::Internal, "bad metadata"),
    ] {
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            peer.client(common::echo::echo_client::EchoClient::new)
                .unary(EchoRequest::default()),
        )
        .await
        .expect("no hang");
        let err = result.expect_err("bad answer");
        assert_eq!(err.code(), expected, "{err:?}");
        assert!(err.message().contains(says), "{err:?}");
    }
}

/// A caller that resets its half of a streamed call in the middle of a
/// frame gets that frame's budget given back at once, even while the
/// handler keeps its input stream (and the call) alive.
#[tokio::test]
async fn a_reset_mid_frame_gives_the_frame_budget_back_while_the_call_lives() {
    use bytes::BufMut;
    const FRAME: usize = 32 << 10;
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = common::server_with(echo);
    let (conn, id) = common::raw_client(&server, "resetter").await;
    let peer = server.peers().get(id).expect("listed");
    let (mut send, _recv) = conn.open_bi().await.expect("open");
    let stream_id = wire::stream_id(send.id().index(), true);
    let request = Request {
        service: "test.echo.v1.Echo".into(),
        method: "Bidi".into(),
        ..Default::default()
    };
    let mut bytes = frame(
        stream_id,
        FrameType::Request,
        Flags::REMOTE_OPEN,
        request.encode_to_vec(),
    );
    let hold = EchoRequest {
        text: "hold".into(),
        ..Default::default()
    };
    bytes.extend(frame(
        stream_id,
        FrameType::Data,
        Flags::EMPTY,
        hold.encode_to_vec(),
    ));
    // A Data frame announcing FRAME bytes, of which 1 KiB is sent.
    let mut partial = BytesMut::new();
    partial.put_u32(FRAME as u32);
    partial.put_u32(stream_id);
    partial.put_u8(FrameType::Data.to_u8());
    partial.put_u8(0);
    partial.put_slice(&[0u8; 1024]);
    bytes.extend_from_slice(&partial);
    send.write_all(&bytes).await.expect("write");
    common::eventually(Duration::from_secs(10), "the frame reserved", || {
        peer.buffered_bytes() == FRAME
    })
    .await;
    send.reset(0u32.into()).expect("reset");
    common::eventually(Duration::from_secs(10), "the input ended", || {
        probe.inputs_ended.load(std::sync::atomic::Ordering::SeqCst)
            + probe.input_errors.lock().expect("lock").len()
            == 1
    })
    .await;
    // The handler still holds its input, and the call is open.
    assert_eq!(peer.buffered_bytes(), 0, "the reset frame's budget is back");
    assert_eq!(server.buffered_bytes(), 0);
}

#[tokio::test]
async fn an_oversized_hello_is_refused() {
    let server = common::server();
    let conn = common::raw_connection(&server).await;
    let response =
        common::raw_call_refused(&conn, common::hello_request(1, &"x".repeat(100 * 1024))).await;
    let status = response.status.expect("status");
    assert_eq!(
        status.code,
        Code::ResourceExhausted as i32,
        "{}",
        status.message
    );
    common::closed_with(&conn, codes::CONN_HELLO_FAILED).await;
    assert!(server.peers().is_empty());
}

#[tokio::test]
async fn a_call_that_stalls_mid_frame_is_reset_after_the_idle_limit() {
    let echo = EchoService::new("server");
    let server = brpc::Server::builder()
        .call_idle_timeout(Some(Duration::from_millis(300)))
        .add_service(common::echo::echo_server::EchoServer::new(echo))
        .bind("127.0.0.1:0")
        .expect("bind");
    let (conn, _id) = common::raw_client(&server, "staller").await;
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let stream_id = wire::stream_id(send.id().index(), true);
    // A header announcing 1000 bytes, then only 10 of them, and silence.
    let mut partial = BytesMut::new();
    partial.put_u32(1000);
    partial.put_u32(stream_id);
    partial.put_u8(1);
    partial.put_u8(0);
    partial.put_slice(&[0u8; 10]);
    send.write_all(&partial).await.expect("write");
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
        .await
        .expect("reset in time")
    {
        Err(quinn::ReadError::Reset(code)) => {
            assert_eq!(code, quinn::VarInt::from_u32(codes::STREAM_IDLE))
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
    normal_call_works(&conn).await;
}

/// A peer trickling a byte at a time into a half-received frame does not
/// keep it (and what it reserved) alive: the idle limit starts again only
/// for real progress (`MIN_IDLE_PROGRESS` bytes), so the stream is reset
/// about one limit after the frame began, trickle or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_of_bytes_does_not_hold_off_the_idle_limit() {
    let server = brpc::Server::builder()
        .call_idle_timeout(Some(Duration::from_secs(1)))
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let (conn, _id) = common::raw_client(&server, "trickler").await;
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let stream_id = wire::stream_id(send.id().index(), true);
    let mut header = BytesMut::new();
    header.put_u32(100_000);
    header.put_u32(stream_id);
    header.put_u8(1);
    header.put_u8(0);
    send.write_all(&header).await.expect("write");
    let started = tokio::time::Instant::now();
    // A byte every 200 ms, well within each 1 s limit, for up to 20 s.
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if send.write_all(&[0]).await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(15), recv.read(&mut buf))
        .await
        .expect("reset well before the trickle ends")
    {
        Err(quinn::ReadError::Reset(code)) => {
            assert_eq!(code, quinn::VarInt::from_u32(codes::STREAM_IDLE))
        }
        other => panic!("expected a reset, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    trickle.abort();
    normal_call_works(&conn).await;
}

#[tokio::test]
async fn the_server_refuses_clients_over_its_connection_limit() {
    let server = brpc::Server::builder()
        .max_connections(2)
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let a = common::client(&server, "a").await;
    let b = common::client(&server, "b").await;
    let err = common::client_builder(&server, "c", EchoService::new("c"))
        .connect(server.local_addr())
        .await
        .expect_err("over the limit");
    assert!(matches!(err, brpc::ConnectError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("connection limit (2)"), "{err}");
    for client in [&a, &b] {
        let reply = common::echo::echo_client::EchoClient::new(client.channel())
            .unary(EchoRequest {
                seq: 3,
                ..Default::default()
            })
            .await
            .expect("existing clients keep working");
        assert_eq!(reply.into_inner().seq, 3);
    }
    assert_eq!(server.peers().len(), 2);
}

/// A Request whose frame arrives in pieces (the header cut in two, the
/// header alone, the data cut in two) is read whole and answered: the
/// reader's zero-copy path for a header and data that come as one chunk
/// each falls back to buffering when they do not.
#[tokio::test]
async fn a_request_arriving_in_pieces_is_read_whole() {
    let server = common::server();
    let (conn, _id) = common::raw_client(&server, "pieces").await;
    let message = EchoRequest {
        seq: 9,
        blob: vec![7u8; 3000],
        ..Default::default()
    }
    .encode_to_vec();
    for cut in [4, wire::HEADER_LEN, wire::HEADER_LEN + 1500] {
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        let stream_id = wire::stream_id(send.id().index(), true);
        let bytes = frame(
            stream_id,
            FrameType::Request,
            Flags::EMPTY,
            echo_request(message.clone()),
        );
        send.write_all(&bytes[..cut]).await.expect("write");
        // Let the first piece go out (and be read) on its own.
        tokio::time::sleep(Duration::from_millis(50)).await;
        send.write_all(&bytes[cut..]).await.expect("write");
        let _ = send.finish();
        let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
            .await
            .expect("answered in time")
            .expect("read");
        let mut buf = BytesMut::from(&answer[..]);
        let response = FrameDecoder::new(1 << 20)
            .decode(&mut buf)
            .expect("frame")
            .expect("a whole frame");
        assert_eq!(response.kind, FrameType::Response, "cut at {cut}");
        let response = Response::decode(response.payload.into_bytes()).expect("response");
        assert_eq!(response.status.expect("status").code, 0, "cut at {cut}");
        let reply = EchoReply::decode(response.payload).expect("reply");
        assert_eq!((reply.seq, reply.blob.len()), (9, 3000), "cut at {cut}");
    }
}

/// A call the server ends at its deadline is answered within the idle limit
/// or reset: a client that grants no flow-control credit (its connection
/// window filled by another call it does not read) cannot keep the call,
/// and its place among the connection's calls, for ever.
#[tokio::test]
async fn an_early_answer_the_client_will_not_take_is_reset_after_the_idle_limit() {
    use common::echo::{RangeRequest, SleepRequest};
    let server = brpc::Server::builder()
        .call_idle_timeout(Some(Duration::from_millis(500)))
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let mut transport = quinn::TransportConfig::default();
    transport.receive_window(2048u32.into());
    let conn = common::raw_connection_with(&server, transport).await;
    let hello = common::raw_call(&conn, common::hello_request(1, "withholding")).await;
    assert_eq!(hello.status.expect("status").code, 0);
    let open = |method: &str, payload: Vec<u8>, timeout: Option<Duration>| {
        let conn = conn.clone();
        let request = Request {
            service: "test.echo.v1.Echo".into(),
            method: method.into(),
            payload: payload.into(),
            timeout_nano: timeout.map_or(0, |t| t.as_nanos() as i64),
            ..Default::default()
        };
        async move {
            let (mut send, recv) = conn.open_bi().await.expect("open");
            let id = wire::stream_id(send.id().index(), true);
            send.write_all(&frame(
                id,
                FrameType::Request,
                Flags::EMPTY,
                request.encode_to_vec(),
            ))
            .await
            .expect("write");
            send.finish().expect("finish");
            recv
        }
    };
    // Replies nobody reads fill the connection's receive window.
    let before = conn.stats().udp_rx.bytes;
    let _flood = open(
        "Range",
        RangeRequest {
            from: 0,
            to: 1_000_000,
        }
        .encode_to_vec(),
        None,
    )
    .await;
    common::eventually(Duration::from_secs(10), "the window filled", || {
        conn.stats().udp_rx.bytes - before >= 2048
    })
    .await;
    // Ended by its deadline while its handler sleeps: its answer finds no credit.
    let mut late = open(
        "Sleep",
        SleepRequest { millis: 60_000 }.encode_to_vec(),
        Some(Duration::from_millis(200)),
    )
    .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), late.read(&mut buf))
        .await
        .expect("reset in time, not held for ever");
    assert!(
        matches!(read, Err(quinn::ReadError::Reset(code)) if code == quinn::VarInt::from_u32(codes::STREAM_IDLE)),
        "{read:?}"
    );
}

/// A call given up while its Request is still being written (here its
/// deadline passes while the callee's flow control holds the write back)
/// is reset as cancelled, not finished mid-frame: the callee sees
/// RESET_STREAM `STREAM_CANCELLED`, not a Request cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_up_mid_request_is_reset_as_cancelled() {
    let server = common::server();
    let (conn, id) = common::raw_client(&server, "slow-reader").await;
    let peer = server.peers().get(id).expect("listed");
    let call = tokio::spawn(async move {
        let mut request = tonic::Request::new(EchoRequest {
            blob: vec![7; 3 << 20],
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(300));
        peer.client(common::echo::echo_client::EchoClient::new)
            .unary(request)
            .await
    });
    // The raw client takes the call's stream and reads nothing until the
    // call has given up: the Request cannot all be sent.
    let (_send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .expect("the server opened a call")
        .expect("stream");
    let status = call.await.expect("join").expect_err("deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let read = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(8 << 20))
        .await
        .expect("the stream ended");
    match read {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code.into_inner(), u64::from(codes::STREAM_CANCELLED));
        }
        other => panic!(
            "expected a reset as cancelled, got {:?}",
            other.map(|b| b.len())
        ),
    }
}
