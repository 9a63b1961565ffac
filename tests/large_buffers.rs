//! Large messages received one after another are reassembled in the buffer
//! of the one before, once that one is dropped, instead of in a new buffer
//! each (`brpc_core::conn::spare`), over QUIC and over a Unix socket. The
//! count it reads is process-wide, so this file is its own test binary with
//! one test.

mod common;

use brpc::Client;
use brpc::core::conn::large_buffers_reused;
use common::echo::EchoRequest;
use common::echo::echo_client::EchoClient;
use common::echo::echo_server::EchoServer;

/// `calls` unary calls in turn, each answered with a 300 000-byte reply
/// (whose frame is reassembled on the caller's side).
async fn large_replies(echo: &mut EchoClient<brpc::Channel>, calls: u64) {
    // `seq` from 1: every reply the same size.
    for seq in 1..=calls {
        let reply = echo
            .unary(EchoRequest {
                text: "grow:300000".into(),
                seq,
                ..Default::default()
            })
            .await
            .expect("unary")
            .into_inner();
        assert_eq!(reply.blob.len(), 300_000);
        assert!(reply.blob.iter().all(|&b| b == 7));
        assert_eq!(reply.seq, seq);
    }
}

#[tokio::test]
async fn large_messages_received_in_turn_reuse_one_buffer() {
    let server = common::server();
    let calls = 10;
    assert_eq!(large_buffers_reused(), 0);

    // Over QUIC the reply arrives in many chunks.
    let client = common::client(&server, "agent").await;
    large_replies(&mut EchoClient::new(client.channel()), calls).await;
    // Every reply after the first found the buffer of the one before free.
    assert_eq!(large_buffers_reused(), calls - 1, "over QUIC");

    // Over a Unix socket, read as it comes.
    let path = std::env::temp_dir().join(format!("brpc-large-{}.sock", std::process::id()));
    server
        .listen_unix(&path)
        .expect("listen on the Unix socket");
    let unix = Client::builder()
        .name("over-unix")
        .add_service(EchoServer::new(common::EchoService::new("unix-agent")))
        .connect_unix(&path)
        .await
        .expect("connect over the Unix socket");
    large_replies(&mut EchoClient::new(unix.channel()), calls).await;
    // The first reply over the Unix socket already finds the last QUIC
    // reply's buffer free.
    assert_eq!(
        large_buffers_reused(),
        2 * calls - 1,
        "over the Unix socket"
    );
    let _ = std::fs::remove_file(&path);
}
