//! Unix-socket clients live in the same server as QUIC ones: listed in the
//! registry with their credentials, announced by connect and disconnect
//! events, calling and called back, and drained by a graceful shutdown.

use std::time::Duration;

use brpc::PeerEvent;
use tokio::sync::broadcast::error::RecvError;

use crate::common::echo::echo_client::EchoClient;
use crate::common::echo::echo_server::EchoServer;
use crate::common::echo::{EchoRequest, SleepRequest};
use crate::common::{self, EchoService};

/// The next event about a Unix-socket peer (QUIC peers' events are skipped).
async fn next_unix_event(events: &mut tokio::sync::broadcast::Receiver<PeerEvent>) -> PeerEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) if event.peer().credentials().is_some() => return event,
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => panic!("events closed"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("an event in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_client_is_listed_announced_called_back_and_drained_like_a_quic_one() {
    let path = std::env::temp_dir().join(format!("brpc-unix-mixed-{}.sock", std::process::id()));
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = brpc::Server::builder()
        .add_service(EchoServer::new(echo))
        .bind("127.0.0.1:0")
        .expect("bind");
    server
        .listen_unix(&path)
        .expect("listen on the Unix socket");
    let mut events = server.peers().subscribe();

    let quic = common::client(&server, "over-quic").await;
    let unix = brpc::Client::builder()
        .name("over-unix")
        .add_service(EchoServer::new(EchoService::new("unix-agent")))
        .connect_unix(&path)
        .await
        .expect("connect over the Unix socket");

    // Connected: announced and listed, with its credentials.
    let PeerEvent::Connected(listed) = next_unix_event(&mut events).await else {
        panic!("expected a Connected event first");
    };
    let credentials = listed.credentials().expect("SO_PEERCRED");
    assert_eq!(credentials.pid, Some(std::process::id() as i32));
    assert_eq!(server.peers().len(), 2);
    assert_eq!(
        server
            .peers()
            .get(quic.connection_id())
            .expect("the QUIC client")
            .credentials(),
        None
    );
    assert!(server.peers().get(listed.connection_id()).is_some());
    assert_eq!(unix.connection_id(), listed.connection_id());

    // Calls both ways over the socket.
    let reply = EchoClient::new(unix.channel())
        .unary(EchoRequest {
            text: "up".into(),
            ..Default::default()
        })
        .await
        .expect("the Unix client calls the server")
        .into_inner();
    assert_eq!(reply.answered_by, "server");
    let back = EchoClient::new(listed.channel())
        .unary(EchoRequest::default())
        .await
        .expect("the server calls the Unix client back")
        .into_inner();
    assert_eq!(back.answered_by, "unix-agent");

    // Shutdown drains it: a call in flight finishes, then it is closed and
    // announced gone, and the socket file is removed.
    let mut sleeper = EchoClient::new(unix.channel());
    let running = tokio::spawn(async move { sleeper.sleep(SleepRequest { millis: 300 }).await });
    common::eventually(Duration::from_secs(5), "the handler is running", || {
        probe.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(listed.served_calls_in_flight(), 1);
    server.shutdown(Duration::from_secs(5)).await;
    running
        .await
        .expect("join")
        .expect("the running call finished before the shutdown closed it");
    let PeerEvent::Disconnected { peer, reason } = next_unix_event(&mut events).await else {
        panic!("expected a Disconnected event");
    };
    assert_eq!(peer.connection_id(), listed.connection_id());
    assert!(reason.is_going_away() && reason.is_local(), "{reason}");
    assert!(server.peers().is_empty(), "{:?}", server.peers().list());
    assert!(!path.exists(), "the socket file is removed");
}

/// A Unix dial that its connect timeout gives up (the server accepted the
/// socket but never answers Hello) closes the socket: the hung server sees
/// it end, instead of one socket and two tasks left per attempt.
#[tokio::test]
async fn a_unix_dial_given_up_by_its_timeout_closes_its_socket() {
    use tokio::io::AsyncReadExt;
    let path = std::env::temp_dir().join(format!("brpc-unix-hung-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let err = brpc::Client::builder()
        .name("impatient")
        .connect_timeout(Duration::from_millis(200))
        .connect_unix(&path)
        .await
        .expect_err("no Hello answer");
    assert!(err.to_string().contains("no answer"), "{err}");
    let (mut accepted, _) = listener.accept().await.expect("accepted");
    let mut buf = vec![0u8; 4096];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        // The Hello it sent, then the end of the stream.
        while accepted.read(&mut buf).await.expect("read") > 0 {}
    })
    .await;
    assert!(ended.is_ok(), "the abandoned dial's socket is still open");
    let _ = std::fs::remove_file(&path);
}

/// The Response a raw peer reads for its call `id` on `socket` (frames of
/// other calls skipped), within 20 s.
async fn status_on(
    socket: &mut (impl tokio::io::AsyncRead + Unpin),
    id: u32,
) -> brpc::core::wire::Response {
    use prost::Message;
    use tokio::io::AsyncReadExt;
    let mut decoder = brpc::core::wire::FrameDecoder::new(4 << 20);
    let mut buf = bytes::BytesMut::new();
    let answer = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            while let Some(frame) = decoder.decode(&mut buf).expect("frame") {
                if frame.stream_id == id {
                    return frame;
                }
            }
            assert!(socket.read_buf(&mut buf).await.expect("read") > 0, "closed");
        }
    })
    .await
    .expect("answered in time");
    brpc::core::wire::Response::decode(answer.payload.into_bytes()).expect("response")
}

/// Over a Unix socket, as over QUIC, a Hello of another protocol version is
/// refused with FAILED_PRECONDITION (the dialer then speaks plain ttrpc).
#[tokio::test]
async fn a_unix_hello_of_another_version_is_refused() {
    use prost::Message;
    use tokio::io::AsyncWriteExt;
    let path = std::env::temp_dir().join(format!("brpc-unix-version-{}.sock", std::process::id()));
    let server = brpc::Server::builder().bind("127.0.0.1:0").expect("bind");
    server.listen_unix(&path).expect("listen");
    let mut socket = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    let hello = common::frame(
        1,
        brpc::core::wire::FrameType::Request,
        brpc::core::wire::Flags::EMPTY,
        common::hello_request(99, "future").encode_to_vec(),
    );
    socket.write_all(&hello).await.expect("write");
    let response = status_on(&mut socket, 1).await;
    let status = response.status.expect("status");
    assert_eq!(
        status.code,
        tonic::Code::FailedPrecondition as i32,
        "{status:?}"
    );
    assert!(status.message.contains("version 99"), "{}", status.message);
}

/// Over a Unix socket, frames queued for calls that do not read them are
/// charged to the connection's inbound budget as over QUIC: a handler that
/// stops reading holds at most that much, and once it is used up a new call
/// is refused with RESOURCE_EXHAUSTED instead of memory growing. When the
/// stalled call is dropped for not reading, its frames go with it, though
/// its handler still holds its input, and new calls are served again.
#[tokio::test]
async fn unix_frames_waiting_for_their_calls_stay_within_the_budget() {
    use common::echo::EchoRequest;
    use prost::Message;
    use tokio::io::AsyncWriteExt;
    const MIB: usize = 1 << 20;
    let path = std::env::temp_dir().join(format!("brpc-unix-budget-{}.sock", std::process::id()));
    let server = brpc::Server::builder()
        .max_message_size(MIB)
        .buffer_per_connection(2 * MIB)
        .add_service(EchoServer::new(EchoService::new("server")))
        .bind("127.0.0.1:0")
        .expect("bind");
    server.listen_unix(&path).expect("listen");
    let socket = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    let (mut reader, mut writer) = socket.into_split();
    use brpc::core::wire::{Flags, FrameType};
    use common::frame;
    let request = common::echo_call;
    // A call whose handler stops reading after its first message, then
    // five messages of 400 KiB for it: 2.0 of the 2 MiB budget.
    let mut out = frame(
        1,
        FrameType::Request,
        Flags::REMOTE_OPEN,
        request("Sink", vec![]),
    );
    out.extend(frame(
        1,
        FrameType::Data,
        Flags::EMPTY,
        EchoRequest {
            text: "stall".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    ));
    let blob = EchoRequest {
        blob: vec![7u8; 400 << 10],
        ..Default::default()
    }
    .encode_to_vec();
    for _ in 0..5 {
        out.extend(frame(1, FrameType::Data, Flags::EMPTY, blob.clone()));
    }
    // Then a new call of 100 KiB: more than the room the stalled call left.
    let unary = EchoRequest {
        blob: vec![1u8; 100 << 10],
        ..Default::default()
    }
    .encode_to_vec();
    out.extend(frame(
        3,
        FrameType::Request,
        Flags::EMPTY,
        request("Unary", unary.clone()),
    ));
    writer.write_all(&out).await.expect("write");

    let status = status_on(&mut reader, 3).await.status.expect("status");
    assert_eq!(
        status.code,
        tonic::Code::ResourceExhausted as i32,
        "{status:?}"
    );
    assert!(
        status.message.contains("inbound buffer budget"),
        "{}",
        status.message
    );
    // Within the server's total budget, and charged to it: the frames the
    // stalled handler has not taken are still held.
    let held = server.buffered_bytes();
    assert!((MIB..=2 * MIB).contains(&held), "{held}");

    // A sixth message finds no room: the connection's reader waits out the
    // call's allowance (a second) and drops the call, and the five frames
    // queued for it with it. The same call as before is now served.
    let mut out = frame(1, FrameType::Data, Flags::EMPTY, blob);
    out.extend(frame(
        5,
        FrameType::Request,
        Flags::EMPTY,
        request("Unary", unary),
    ));
    writer.write_all(&out).await.expect("write");
    let status = status_on(&mut reader, 5).await.status.unwrap_or_default();
    assert_eq!(status.code, tonic::Code::Ok as i32, "{status:?}");
    assert_eq!(
        server.buffered_bytes(),
        0,
        "the dropped call's frames are still charged"
    );
}

/// Over a Unix socket a call read more slowly than its peer sends holds up
/// the connection's reader for a second in all, not for as long as it
/// runs: calls beside it are answered, and it is dropped with
/// RESOURCE_EXHAUSTED. (Before the allowance, each of its frames made the
/// reader wait a little less than a second, so the unary call below
/// waited behind thousands of them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_call_read_slowly_does_not_hold_up_the_calls_beside_it() {
    use common::echo::RangeRequest;
    let path = std::env::temp_dir().join(format!("brpc-unix-crawl-{}.sock", std::process::id()));
    let server = brpc::Server::builder()
        .add_service(EchoServer::new(EchoService::new("server")))
        .bind("127.0.0.1:0")
        .expect("bind");
    server.listen_unix(&path).expect("listen");
    let client = brpc::Client::builder()
        .name("slow-reader")
        .connect_unix(&path)
        .await
        .expect("connect");
    let mut echo = EchoClient::new(client.channel());
    let mut stream = echo
        .range(RangeRequest {
            from: 0,
            to: 1_000_000,
        })
        .await
        .expect("started")
        .into_inner();
    let crawl = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                Ok(None) => panic!("the stream ended OK"),
                Err(status) => return status,
            }
        }
    });
    // Let the stream fill its queue and the socket behind it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(20), echo.unary(EchoRequest::default()))
        .await
        .expect("answered beside the slow stream")
        .expect("the call beside it");
    let err = tokio::time::timeout(Duration::from_secs(20), crawl)
        .await
        .expect("the slow stream ended")
        .expect("join");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("dropped"), "{err:?}");
}

/// Over a Unix socket, a call that does not take its frames is dropped after
/// a second (as Go's ttrpc does), and it then fails with RESOURCE_EXHAUSTED
/// saying so: not with a lost connection, since the connection is fine (a
/// call on it still works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_call_that_does_not_read_is_dropped_with_resource_exhausted() {
    use common::echo::RangeRequest;
    let path = std::env::temp_dir().join(format!("brpc-unix-slow-{}.sock", std::process::id()));
    let server = brpc::Server::builder()
        .add_service(EchoServer::new(EchoService::new("server")))
        .bind("127.0.0.1:0")
        .expect("bind");
    server.listen_unix(&path).expect("listen");
    let client = brpc::Client::builder()
        .name("slow-reader")
        .connect_unix(&path)
        .await
        .expect("connect");
    let mut echo = EchoClient::new(client.channel());
    let mut stream = echo
        .range(RangeRequest { from: 0, to: 2000 })
        .await
        .expect("started")
        .into_inner();
    // Not read for a while: 64 replies queue, the next waits a second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended OK"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("ended in time");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("dropped"), "{err:?}");
    echo.unary(EchoRequest::default())
        .await
        .expect("the connection still serves");
}

/// Between brpc peers on a Unix socket a dropped call is cancelled on the
/// other side, both ways, as over QUIC: the caller sends a Cancel frame
/// and the callee's handler is dropped (it slept on for its ten minutes
/// before). The connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_unix_call_is_cancelled_on_the_other_side_both_ways() {
    use std::sync::atomic::Ordering;
    let path = std::env::temp_dir().join(format!("brpc-unix-cancel-{}.sock", std::process::id()));
    let server_echo = EchoService::new("server");
    let server_probe = server_echo.probe.clone();
    let server = brpc::Server::builder()
        .add_service(EchoServer::new(server_echo))
        .bind("127.0.0.1:0")
        .expect("bind");
    server.listen_unix(&path).expect("listen");
    let client_echo = EchoService::new("client");
    let client_probe = client_echo.probe.clone();
    let client = brpc::Client::builder()
        .name("canceller")
        .add_service(EchoServer::new(client_echo))
        .connect_unix(&path)
        .await
        .expect("connect");
    let echo = EchoClient::new(client.channel());

    // A unary call from the client, dropped while its handler sleeps.
    let mut sleeper = echo.clone();
    common::drop_while_running(&server_probe, async move {
        sleeper.sleep(SleepRequest { millis: 600_000 }).await
    })
    .await;

    // A bidirectional stream from the client, dropped while open: the
    // handler's replies have nobody to go to.
    let mut bidi = echo.clone();
    let hold = EchoRequest {
        text: "hold".into(),
        ..Default::default()
    };
    let input = tokio_stream::StreamExt::chain(tokio_stream::iter([hold]), tokio_stream::pending());
    let mut replies = bidi.bidi(input).await.expect("bidi").into_inner();
    replies.message().await.expect("a reply").expect("one");
    drop(replies);
    common::eventually(
        Duration::from_secs(20),
        "the server's stream dropped",
        || server_probe.outputs_closed.load(Ordering::SeqCst) == 1,
    )
    .await;

    // A call from the server to the client, dropped the same way.
    let peer = server.peers().list().pop().expect("the Unix client");
    let mut back = peer.client(EchoClient::new);
    common::drop_while_running(&client_probe, async move {
        back.sleep(SleepRequest { millis: 600_000 }).await
    })
    .await;

    let reply = echo
        .clone()
        .unary(EchoRequest::default())
        .await
        .expect("the connection still serves");
    assert_eq!(reply.into_inner().answered_by, "server");
}

/// A byte stream has no stream limit to hold a peer back: a call past the
/// server's `max_concurrent_calls` is refused with RESOURCE_EXHAUSTED, and
/// once a running call ends a new one is let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_calls_past_the_limit_are_refused_until_one_ends() {
    let path = std::env::temp_dir().join(format!("brpc-unix-limit-{}.sock", std::process::id()));
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = brpc::Server::builder()
        .max_concurrent_calls(2)
        .add_service(EchoServer::new(echo))
        .bind("127.0.0.1:0")
        .expect("bind");
    server
        .listen_unix(&path)
        .expect("listen on the Unix socket");
    let client = brpc::Client::builder()
        .name("many-calls")
        .connect_unix(&path)
        .await
        .expect("connect over the Unix socket");
    let echo = EchoClient::new(client.channel());
    let sleeping = |mut echo: EchoClient<brpc::Channel>| {
        tokio::spawn(async move { echo.sleep(SleepRequest { millis: 60_000 }).await })
    };
    let first = sleeping(echo.clone());
    let second = sleeping(echo.clone());
    common::eventually(Duration::from_secs(10), "two calls running", || {
        probe.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 2
    })
    .await;

    let refused = echo
        .clone()
        .unary(EchoRequest::default())
        .await
        .expect_err("a third call at once");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("too many calls at once"),
        "{}",
        refused.message()
    );

    // The first call dropped: the server lets its handler go, and a new
    // call is let in once that call's end has reached the server.
    first.abort();
    let started = tokio::time::Instant::now();
    loop {
        match echo.clone().unary(EchoRequest::default()).await {
            Ok(_) => break,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "still refused 10 s after a call ended"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    second.abort();
}

/// A side's own `max_concurrent_calls` says what its peer may open, not
/// what it may: a client taking no calls at all (0) still connects over a
/// Unix socket and makes its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_client_that_takes_no_calls_still_makes_its_own() {
    let path = std::env::temp_dir().join(format!("brpc-unix-zero-{}.sock", std::process::id()));
    let server = brpc::Server::builder()
        .add_service(EchoServer::new(EchoService::new("server")))
        .bind("127.0.0.1:0")
        .expect("bind");
    server
        .listen_unix(&path)
        .expect("listen on the Unix socket");
    let client = tokio::time::timeout(
        Duration::from_secs(20),
        brpc::Client::builder()
            .name("calls-only")
            .max_concurrent_calls(0)
            .connect_unix(&path),
    )
    .await
    .expect("connected in time")
    .expect("connect over the Unix socket");
    let mut echo = EchoClient::new(client.channel());
    tokio::time::timeout(Duration::from_secs(20), echo.unary(EchoRequest::default()))
        .await
        .expect("its own call made in time (not waiting for a place it never gets)")
        .expect("its own call");
}
