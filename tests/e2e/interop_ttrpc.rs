//! Interop over a real Unix socket with containerd/ttrpc-rust (the `ttrpc`
//! crate 0.10, code from ttrpc-codegen), an implementation nobody here wrote:
//! its client against our server and our client against its server, every call
//! shape, status codes, metadata, timeouts and oversized messages; then brpc to
//! brpc over one socket, calls in both directions at once.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use brpc::core::bytestream;
use common::EchoService;
use common::echo::echo_client::EchoClient;
use common::echo::echo_server::EchoServer;
use common::echo::{EchoRequest, FailRequest, Number, RangeRequest, SleepRequest};
use tokio_stream::StreamExt;
use tonic::Code;

#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
mod ttrpc_gen {
    include!(concat!(env!("OUT_DIR"), "/ttrpc/protos.rs"));
}
use ttrpc_gen::echo as t;
use ttrpc_gen::echo_ttrpc as tsvc;

fn socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("brpc-{name}-{}.sock", std::process::id()))
}

/// A brpc server on the Unix socket at `path` only, hosting an Echo.
fn unix_server(path: &std::path::Path, who: &str) -> brpc::Server {
    brpc::Server::builder()
        .add_service(EchoServer::new(EchoService::new(who)))
        .bind_unix(path)
        .expect("serve")
}

/// A brpc client of the Unix socket at `path`, hosting an Echo if `who`.
async fn unix_client(path: &std::path::Path, who: Option<&str>) -> brpc::Client {
    let builder = brpc::Client::builder();
    let builder = match who {
        Some(who) => builder.add_service(EchoServer::new(EchoService::new(who))),
        None => builder,
    };
    builder.connect_unix(path).await.expect("connect")
}

fn t_request(text: &str, seq: u64) -> t::EchoRequest {
    let mut r = t::EchoRequest::new();
    r.text = text.into();
    r.seq = seq;
    r
}

fn rpc_status(e: ttrpc::Error) -> ttrpc::proto::Status {
    match e {
        ttrpc::Error::RpcStatus(s) => s,
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

#[tokio::test]
async fn ttrpc_rust_client_calls_our_server() {
    let path = socket("ttrpc-client");
    let _server = unix_server(&path, "brpc");
    let inner = ttrpc::asynchronous::Client::connect(&format!("unix://{}", path.display()))
        .await
        .expect("connect");
    let client = tsvc::EchoClient::new(inner);
    let none = || ttrpc::context::with_timeout(0);

    let reply = client
        .unary(none(), &t_request("hi", 3))
        .await
        .expect("unary");
    assert_eq!(
        (reply.text.as_str(), reply.seq, reply.answered_by.as_str()),
        ("hi", 3, "brpc")
    );

    let mut ctx = none();
    ctx.add("x-key".into(), "v1".into());
    ctx.add("x-key".into(), "v2".into());
    ctx.add("x-other".into(), "w".into());
    let reply = client
        .unary(ctx, &t_request("metadata?", 0))
        .await
        .expect("metadata");
    assert_eq!(reply.text, "x-key=v1;x-key=v2;x-other=w");

    let mut fail = t::FailRequest::new();
    fail.code = Code::NotFound as i32;
    fail.message = "ключ не найден ✗".into();
    let status = rpc_status(client.fail(none(), &fail).await.expect_err("fails"));
    assert_eq!(status.code(), ttrpc::Code::NOT_FOUND);
    assert_eq!(status.message(), "ключ не найден ✗");

    let mut sleep = t::SleepRequest::new();
    sleep.millis = 10_000;
    let started = tokio::time::Instant::now();
    let err = client
        .sleep(
            ttrpc::context::with_duration(Duration::from_millis(200)),
            &sleep,
        )
        .await
        .expect_err("deadline");
    assert!(started.elapsed() < Duration::from_secs(5), "{err:?}");

    let mut range = t::RangeRequest::new();
    range.from = 0;
    range.to = 5;
    let mut stream = client.range(none(), &range).await.expect("range");
    let mut seqs = Vec::new();
    while let Some(reply) = stream.recv().await.expect("item") {
        seqs.push(reply.seq);
    }
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);

    let mut sum = client.sum(none()).await.expect("sum");
    for value in 1..=100 {
        let mut n = t::Number::new();
        n.value = value;
        sum.send(&n).await.expect("send");
    }
    assert_eq!(sum.close_and_recv().await.expect("total").value, 5050);
    // An empty client stream (ttrpc-rust opens it with flags 0x06: no message invented).
    let mut empty = client.sum(none()).await.expect("sum");
    assert_eq!(empty.close_and_recv().await.expect("total").value, 0);

    let mut bidi = client.bidi(none()).await.expect("bidi");
    for seq in 0..50 {
        bidi.send(&t_request("b", seq)).await.expect("send");
    }
    bidi.close_send().await.expect("close");
    for seq in 0..50 {
        assert_eq!(bidi.recv().await.expect("reply").seq, seq);
    }
    assert!(matches!(bidi.recv().await, Err(ttrpc::Error::Eof)));

    // Our server refuses to send more than 4 MiB, with RESOURCE_EXHAUSTED as Go does.
    let big = t_request(&format!("grow:{}", 5 << 20), 0);
    let status = rpc_status(
        client
            .unary(none(), &big)
            .await
            .expect_err("oversized reply"),
    );
    assert_eq!(status.code(), ttrpc::Code::RESOURCE_EXHAUSTED);
    assert_eq!(
        client
            .unary(none(), &t_request("after", 1))
            .await
            .expect("still works")
            .seq,
        1
    );
}

#[tokio::test]
async fn an_oversized_frame_to_our_server_is_refused_on_its_stream_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = socket("raw-oversize");
    let _server = unix_server(&path, "brpc");
    let mut raw = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    // A Request header on stream 1 announcing 5 MiB, then the 5 MiB.
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(5u32 << 20).to_be_bytes());
    bytes.extend_from_slice(&1u32.to_be_bytes());
    bytes.extend_from_slice(&[1, 0]);
    raw.write_all(&bytes).await.expect("header");
    raw.write_all(&vec![0u8; 5 << 20]).await.expect("body");
    let mut header = [0u8; 10];
    raw.read_exact(&mut header).await.expect("answer");
    assert_eq!(
        &header[4..10],
        &[0, 0, 0, 1, 2, 0],
        "a Response on stream 1"
    );
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut data = vec![0u8; len];
    raw.read_exact(&mut data).await.expect("data");
    let response =
        <brpc::core::wire::Response as prost::Message>::decode(&data[..]).expect("response");
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::ResourceExhausted as i32);
    assert_eq!(
        status.message,
        "message length 5242880 exceed maximum message size of 4194304"
    );
    // The connection lives on: a normal call on stream 3 is answered.
    let request = brpc::core::wire::Request {
        service: "test.echo.v1.Echo".into(),
        method: "Unary".into(),
        payload: prost::Message::encode_to_vec(&EchoRequest {
            seq: 9,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let mut frame = bytes::BytesMut::new();
    brpc::core::wire::Frame::new(
        3,
        brpc::core::wire::FrameType::Request,
        brpc::core::wire::Flags::EMPTY,
        prost::Message::encode_to_vec(&request).into(),
    )
    .encode(&mut frame)
    .expect("encode");
    raw.write_all(&frame).await.expect("write");
    raw.read_exact(&mut header).await.expect("answer");
    assert_eq!(&header[4..10], &[0, 0, 0, 3, 2, 0]);
}

/// A ttrpc-rust Echo, answering as "ttrpc-rust".
struct TtrpcEcho;

fn t_reply(r: t::EchoRequest) -> t::EchoReply {
    let mut reply = t::EchoReply::new();
    reply.text = r.text;
    reply.blob = r.blob;
    reply.seq = r.seq;
    reply.answered_by = "ttrpc-rust".into();
    reply
}

#[async_trait::async_trait]
impl tsvc::Echo for TtrpcEcho {
    async fn unary(
        &self,
        ctx: &ttrpc::r#async::TtrpcContext,
        r: t::EchoRequest,
    ) -> ttrpc::Result<t::EchoReply> {
        let mut reply = t_reply(r);
        if reply.text == "metadata?" {
            let mut pairs: Vec<String> = ctx
                .metadata
                .iter()
                .filter(|(k, _)| k.starts_with("x-"))
                .flat_map(|(k, vs)| vs.iter().map(move |v| format!("{k}={v}")))
                .collect();
            pairs.sort();
            reply.text = pairs.join(";");
        }
        if let Some(n) = reply.text.strip_prefix("grow:") {
            reply.blob = vec![7; n.parse().unwrap_or(0)];
        }
        Ok(reply)
    }

    async fn fail(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        r: t::FailRequest,
    ) -> ttrpc::Result<t::EchoReply> {
        let code =
            <ttrpc::Code as protobuf::Enum>::from_i32(r.code).unwrap_or(ttrpc::Code::UNKNOWN);
        Err(ttrpc::Error::RpcStatus(ttrpc::get_status(code, r.message)))
    }

    async fn sleep(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        r: t::SleepRequest,
    ) -> ttrpc::Result<t::EchoReply> {
        tokio::time::sleep(Duration::from_millis(r.millis)).await;
        Ok(t::EchoReply::new())
    }

    async fn range(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        r: t::RangeRequest,
        out: ttrpc::r#async::ServerStreamSender<t::EchoReply>,
    ) -> ttrpc::Result<()> {
        for seq in r.from..r.to {
            out.send(&t_reply(t_request("", seq))).await?;
        }
        Ok(())
    }

    async fn sum(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        mut input: ttrpc::r#async::ServerStreamReceiver<t::Number>,
    ) -> ttrpc::Result<t::Number> {
        let mut total = t::Number::new();
        while let Some(n) = input.recv().await? {
            total.value += n.value;
        }
        Ok(total)
    }

    async fn bidi(
        &self,
        _: &ttrpc::r#async::TtrpcContext,
        mut stream: ttrpc::r#async::ServerStream<t::EchoReply, t::EchoRequest>,
    ) -> ttrpc::Result<()> {
        while let Some(r) = stream.recv().await? {
            stream.send(&t_reply(r)).await?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn our_client_calls_a_ttrpc_rust_server() {
    let path = socket("ttrpc-server");
    let _ = std::fs::remove_file(&path);
    let mut server = ttrpc::asynchronous::Server::new()
        .bind(&format!("unix://{}", path.display()))
        .expect("bind")
        .register_service(tsvc::create_echo(Arc::new(TtrpcEcho)));
    server.start().await.expect("start");

    let client = unix_client(&path, None).await;
    let peer = client.peer().expect("connected");
    assert!(!peer.remote_is_brpc(), "ttrpc-rust refused the brpc Hello");
    let mut echo = EchoClient::new(client.channel());

    let reply = echo
        .unary(EchoRequest {
            text: "hi".into(),
            seq: 4,
            ..Default::default()
        })
        .await
        .expect("unary");
    assert_eq!(reply.into_inner().answered_by, "ttrpc-rust");

    let mut request = tonic::Request::new(EchoRequest {
        text: "metadata?".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .append("x-key", "v1".parse().expect("value"));
    request
        .metadata_mut()
        .append("x-key", "v2".parse().expect("value"));
    assert_eq!(
        echo.unary(request)
            .await
            .expect("metadata")
            .into_inner()
            .text,
        "x-key=v1;x-key=v2"
    );

    let err = echo
        .fail(FailRequest {
            code: Code::PermissionDenied as i32,
            message: "nein ✗".into(),
        })
        .await
        .expect_err("fails");
    assert_eq!(
        (err.code(), err.message()),
        (Code::PermissionDenied, "nein ✗")
    );

    let mut request = tonic::Request::new(SleepRequest { millis: 10_000 });
    request.set_timeout(Duration::from_millis(200));
    let err = echo.sleep(request).await.expect_err("deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    let seqs: Vec<u64> = echo
        .range(RangeRequest { from: 10, to: 15 })
        .await
        .expect("range")
        .into_inner()
        .map(|r| r.expect("item").seq)
        .collect()
        .await;
    assert_eq!(seqs, vec![10, 11, 12, 13, 14]);

    let numbers = tokio_stream::iter((1..=100).map(|value| Number { value }));
    assert_eq!(
        echo.sum(numbers).await.expect("sum").into_inner().value,
        5050
    );

    let requests = tokio_stream::iter((0..50).map(|seq| EchoRequest {
        seq,
        ..Default::default()
    }));
    let replies: Vec<u64> = echo
        .bidi(requests)
        .await
        .expect("bidi")
        .into_inner()
        .map(|r| r.expect("item").seq)
        .collect()
        .await;
    assert_eq!(replies, (0..50).collect::<Vec<_>>());

    // Over 4 MiB each way: we refuse to send (RESOURCE_EXHAUSTED); ttrpc-rust
    // refuses to send its reply with INVALID_ARGUMENT (its divergence from Go).
    let big = EchoRequest {
        blob: vec![1; 5 << 20],
        ..Default::default()
    };
    let err = echo.unary(big).await.expect_err("too big to send");
    assert_eq!(err.code(), Code::ResourceExhausted);
    let grow = EchoRequest {
        text: format!("grow:{}", 5 << 20),
        ..Default::default()
    };
    let err = echo
        .clone()
        .max_decoding_message_size(usize::MAX)
        .unary(grow)
        .await
        .expect_err("reply too big");
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "{err:?}"
    );
    assert_eq!(
        echo.unary(EchoRequest {
            seq: 8,
            ..Default::default()
        })
        .await
        .expect("survives")
        .into_inner()
        .seq,
        8
    );
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brpc_to_brpc_over_one_unix_socket_both_ways() {
    let path = socket("brpc-both");
    let server = unix_server(&path, "acceptor");
    let client = unix_client(&path, Some("dialer")).await;
    let dialer = client.peer().expect("connected");
    assert!(dialer.remote_is_brpc(), "Hello recognised a brpc acceptor");
    common::eventually(Duration::from_secs(5), "acceptor sees the dialer", || {
        server.peers().len() == 1
    })
    .await;
    let back = server.peers().list().remove(0);
    assert!(back.remote_is_brpc());
    let me = back.credentials().expect("SO_PEERCRED");
    let (uid, gid) = nix_uid().expect("ids");
    let pid = Some(std::process::id() as i32);
    assert_eq!(me, bytestream::UnixCredentials { uid, gid, pid });
    assert!(bytestream::require_same_user()(&me));

    // Many calls opened at once from each side: ids must still reach the
    // socket in increasing order (the acceptor refuses a reused or smaller id).
    // A caller's place comes back when its side of a call ends, which can be
    // a moment before the callee's side does: a call opened in that moment
    // is refused as one too many, and may be retried (PROTOCOL.md).
    async fn echo(
        channel: brpc::Channel,
        seq: u64,
    ) -> Result<common::echo::EchoReply, tonic::Status> {
        let mut tries = 0;
        loop {
            let answer = EchoClient::new(channel.clone())
                .unary(EchoRequest {
                    seq,
                    ..Default::default()
                })
                .await;
            tries += 1;
            match answer {
                Err(s)
                    if tries < 1000
                        && s.code() == tonic::Code::ResourceExhausted
                        && s.message().starts_with("too many calls at once") =>
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                answer => return answer.map(tonic::Response::into_inner),
            }
        }
    }
    let mut calls = Vec::new();
    for i in 0..400u64 {
        let up = dialer.channel();
        calls.push(tokio::spawn(async move {
            let r = echo(up, i).await?;
            Ok::<_, tonic::Status>((r.seq, r.answered_by, i, "acceptor"))
        }));
        let down = back.channel();
        calls.push(tokio::spawn(async move {
            let r = echo(down, i).await?;
            Ok::<_, tonic::Status>((r.seq, r.answered_by, i, "dialer"))
        }));
    }
    for call in calls {
        let (seq, by, want_seq, want_by) = call.await.expect("join").expect("call");
        assert_eq!((seq, by.as_str()), (want_seq, want_by));
    }
    // Streaming and response headers work between brpc peers.
    let replies: Vec<u64> = EchoClient::new(back.channel())
        .bidi(tokio_stream::iter((0..20).map(|seq| EchoRequest {
            seq,
            ..Default::default()
        })))
        .await
        .expect("bidi")
        .into_inner()
        .map(|r| r.expect("item").seq)
        .collect()
        .await;
    assert_eq!(replies, (0..20).collect::<Vec<_>>());
    let mut request = tonic::Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert("x-back", "yes".parse().expect("value"));
    let response = EchoClient::new(dialer.channel())
        .unary(request)
        .await
        .expect("headers");
    assert_eq!(response.metadata().get("x-back").expect("header"), "yes");
}

fn nix_uid() -> Option<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

#[tokio::test]
async fn a_unix_peer_failing_the_credential_check_is_disconnected() {
    let path = socket("creds");
    let (uid, gid) = nix_uid().expect("ids");
    let server = brpc::Server::builder()
        .add_service(EchoServer::new(EchoService::new("picky")))
        .require_unix_credentials(bytestream::require_uid_gid(uid + 1, gid))
        .bind_unix(&path)
        .expect("serve");
    let client = unix_client(&path, None).await;
    let err = EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(server.peers().is_empty());

    let allowed_path = socket("creds-ok");
    let _allowed = brpc::Server::builder()
        .add_service(EchoServer::new(EchoService::new("ok")))
        .require_unix_credentials(bytestream::require_same_user())
        .bind_unix(&allowed_path)
        .expect("serve");
    let client = unix_client(&allowed_path, None).await;
    EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("same user admitted");
}
