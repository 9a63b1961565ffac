//! Every call shape in both directions: server-streaming range, client-streaming
//! sum, bidi echo of 1000 messages in order, empty streams, empty messages.

use crate::common;

use brpc::Peer;
use common::echo::echo_client::EchoClient;
use common::echo::{EchoRequest, Number, RangeRequest};
use tokio_stream::StreamExt;

/// Runs `check` against the server (client→server) and against the client
/// (server→client through the registry).
async fn both_directions<F, Fut>(check: F)
where
    F: Fn(EchoClient<brpc::Channel>, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let server = common::server();
    let client = common::client(&server, "agent-s").await;
    let peer: Peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    check(EchoClient::new(client.channel()), "server".into()).await;
    check(peer.client(EchoClient::new), "agent-s".into()).await;
}

#[tokio::test]
async fn server_streaming_range() {
    both_directions(|mut echo, who| async move {
        let mut stream = echo
            .range(RangeRequest { from: 5, to: 105 })
            .await
            .expect("call")
            .into_inner();
        let mut seqs = Vec::new();
        while let Some(reply) = stream.next().await {
            let reply = reply.expect("item");
            assert_eq!(reply.answered_by, who);
            seqs.push(reply.seq);
        }
        assert_eq!(seqs, (5..105).collect::<Vec<_>>());
        // Empty and single-item streams.
        let empty: Vec<_> = echo
            .range(RangeRequest { from: 3, to: 3 })
            .await
            .expect("call")
            .into_inner()
            .collect::<Result<Vec<_>, _>>()
            .await
            .expect("ok");
        assert!(empty.is_empty());
        let one: Vec<_> = echo
            .range(RangeRequest { from: 7, to: 8 })
            .await
            .expect("call")
            .into_inner()
            .collect::<Result<Vec<_>, _>>()
            .await
            .expect("ok");
        assert_eq!(one.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![7]);
    })
    .await;
}

#[tokio::test]
async fn client_streaming_sum() {
    both_directions(|mut echo, _| async move {
        let numbers = tokio_stream::iter((1..=100).map(|value| Number { value }));
        assert_eq!(
            echo.sum(numbers).await.expect("sum").into_inner().value,
            5050
        );
        let empty = tokio_stream::iter(Vec::<Number>::new());
        assert_eq!(echo.sum(empty).await.expect("sum").into_inner().value, 0);
        let single = tokio_stream::iter(vec![Number { value: 42 }]);
        assert_eq!(echo.sum(single).await.expect("sum").into_inner().value, 42);
        // Empty messages count too: three zero-valued (zero-length) messages.
        let zeros = tokio_stream::iter(vec![Number { value: 0 }; 3]);
        assert_eq!(echo.sum(zeros).await.expect("sum").into_inner().value, 0);
    })
    .await;
}

#[tokio::test]
async fn bidi_echo_of_a_thousand_messages_in_order() {
    both_directions(|mut echo, who| async move {
        let requests = tokio_stream::iter((0..1000u64).map(|seq| EchoRequest {
            text: format!("m{seq}"),
            blob: vec![],
            seq,
        }));
        let mut replies = echo.bidi(requests).await.expect("call").into_inner();
        let mut next = 0u64;
        while let Some(reply) = replies.next().await {
            let reply = reply.expect("item");
            assert_eq!(reply.seq, next);
            assert_eq!(reply.text, format!("m{next}"));
            assert_eq!(reply.answered_by, who);
            next += 1;
        }
        assert_eq!(next, 1000);

        // An empty bidi stream ends cleanly.
        let none = tokio_stream::iter(Vec::<EchoRequest>::new());
        let replies: Vec<_> = echo
            .bidi(none)
            .await
            .expect("call")
            .into_inner()
            .collect::<Result<Vec<_>, _>>()
            .await
            .expect("ok");
        assert!(replies.is_empty());
    })
    .await;
}

#[tokio::test]
async fn bidi_interleaved_request_then_reply() {
    // The caller waits for each reply before sending the next request: the
    // call must open before the first message exists.
    both_directions(|mut echo, _| async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut replies = echo
            .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("call")
            .into_inner();
        for seq in 0..20u64 {
            tx.send(EchoRequest {
                seq,
                ..Default::default()
            })
            .await
            .expect("send");
            let reply = replies.next().await.expect("reply").expect("ok");
            assert_eq!(reply.seq, seq);
        }
        drop(tx);
        assert!(replies.next().await.is_none());
    })
    .await;
}

/// A call whose receiver never reads fills only its own stream's window: 100
/// unary calls made meanwhile on the same connection all complete, in each
/// direction.
#[tokio::test]
async fn a_stalled_stream_does_not_block_other_calls() {
    both_directions(|echo, _| async move {
        let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
        let mut stalled = echo.clone();
        let stalled_call = tokio::spawn(async move {
            stalled
                .sink(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        tx.send(EchoRequest {
            text: "stall".into(),
            ..Default::default()
        })
        .await
        .expect("send");
        // Keep writing 64 KiB messages until flow control holds the writer
        // back (sends stop completing), i.e. the stream is stuck.
        let filler = tokio::spawn(async move {
            let mut sent = 0usize;
            loop {
                let message = EchoRequest {
                    blob: vec![1; 64 * 1024],
                    ..Default::default()
                };
                match tokio::time::timeout(std::time::Duration::from_millis(500), tx.send(message))
                    .await
                {
                    Ok(Ok(())) => sent += 1,
                    Ok(Err(_)) => panic!("stalled call ended"),
                    Err(_) => return (sent, tx),
                }
            }
        });
        let (sent, _tx) = filler.await.expect("filler");
        assert!(sent > 0);

        let calls: Vec<_> = (0..100u64)
            .map(|seq| {
                let mut echo = echo.clone();
                tokio::spawn(async move {
                    echo.unary(EchoRequest {
                        seq,
                        ..Default::default()
                    })
                    .await
                })
            })
            .collect();
        for (seq, call) in calls.into_iter().enumerate() {
            let reply = tokio::time::timeout(std::time::Duration::from_secs(30), call)
                .await
                .expect("not blocked by the stalled stream")
                .expect("join")
                .expect("call");
            assert_eq!(reply.into_inner().seq, seq as u64);
        }
        stalled_call.abort();
    })
    .await;
}

/// A server stream that fails before its first message, as over HTTP/2:
/// the call itself succeeds and the stream's first item is the error
/// (whether the failure is ready at once or comes later).
#[tokio::test]
async fn a_stream_failing_before_its_first_message_fails_in_the_stream() {
    both_directions(|mut echo, _| async move {
        let mut stream = echo
            .range(RangeRequest { from: 5, to: 1 })
            .await
            .expect("the call is answered")
            .into_inner();
        let first = stream.message().await.expect_err("the stream's error");
        assert_eq!(first.code(), tonic::Code::OutOfRange, "{first:?}");
        assert!(first.message().contains("past to 1"), "{}", first.message());
    })
    .await;
}
