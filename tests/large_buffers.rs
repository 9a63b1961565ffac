//! Large messages received one after another are reassembled in the buffer
//! of the one before, once that one is dropped, instead of in a new buffer
//! each (`brpc_core::conn::spare`). The count it reads is process-wide, so
//! this file is its own test binary with one test.

mod common;

use common::echo::EchoRequest;
use common::echo::echo_client::EchoClient;

#[tokio::test]
async fn large_messages_received_in_turn_reuse_one_buffer() {
    let server = common::server();
    let client = common::client(&server, "agent").await;
    let mut echo = EchoClient::new(client.channel());
    assert_eq!(brpc::core::conn::large_buffers_reused(), 0);
    let calls = 10;
    for seq in 1..=calls {
        // A 300 000-byte reply: its frame arrives over QUIC in many chunks
        // and is reassembled on the client. (`seq` from 1: every reply the
        // same size.)
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
    // Every reply after the first found the buffer of the one before free.
    assert_eq!(
        brpc::core::conn::large_buffers_reused(),
        calls - 1,
        "replies reassembled in a kept buffer"
    );
}
