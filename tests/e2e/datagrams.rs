//! Datagram sizes: with `max_udp_payload` raised on both sides (here to
//! loopback's `LOOPBACK_MAX_UDP_PAYLOAD`), path-MTU discovery grows a
//! connection's packets past Ethernet's size and calls of either direction
//! stay intact; with the default on either side, packets stay at most what
//! a default endpoint accepts (1472 bytes, quinn's default); with the
//! default on both, connections send no path-MTU probes at all.

use crate::common;

use std::time::Duration;

use brpc::core::conn::{DEFAULT_MAX_UDP_PAYLOAD, LOOPBACK_MAX_UDP_PAYLOAD};
use brpc::{Client, Peer, Server};
use common::EchoService;
use common::echo::EchoRequest;
use common::echo::echo_client::EchoClient;
use common::echo::echo_server::EchoServer;

/// The largest UDP payload an endpoint at the default accepts (quinn's
/// default; the other side's discovery may probe up to it).
const DEFAULT_ACCEPTED: u16 = 1472;

/// A server and a client with these `max_udp_payload`s; the client's
/// connection as the server and the client see it.
async fn pair(
    server_payload: u16,
    client_payload: u16,
) -> (Server, Client, Peer, [quinn::Connection; 2]) {
    let server = Server::builder()
        .max_udp_payload(server_payload)
        .add_service(EchoServer::new(EchoService::new("server")))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = common::client_builder(&server, "agent", EchoService::new("agent"))
        .max_udp_payload(client_payload)
        .connect(server.local_addr())
        .await
        .expect("connect");
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("client listed");
    let at_server = peer.quic_connection().expect("a QUIC peer").clone();
    let at_client = client
        .peer()
        .expect("connected")
        .quic_connection()
        .expect("a QUIC peer")
        .clone();
    (server, client, peer, [at_server, at_client])
}

/// 256 KiB calls forward (client to server), 4 at least, until both ends'
/// packets have grown past [`DEFAULT_ACCEPTED`] (discovery runs beside
/// the calls and needs a few round trips of probes), 40 at most; each reply
/// must come back intact. The calls made.
async fn bulk_calls(client: &Client, conns: &[quinn::Connection; 2]) -> usize {
    let blob = vec![9u8; 256 << 10];
    let mut forward = EchoClient::new(client.channel());
    let grown = || {
        conns
            .iter()
            .all(|c| c.stats().path.current_mtu > DEFAULT_ACCEPTED)
    };
    let mut calls = 0;
    while calls < 4 || (calls < 40 && !grown()) {
        let reply = forward
            .unary(EchoRequest {
                blob: blob.clone(),
                ..Default::default()
            })
            .await
            .expect("forward call")
            .into_inner();
        assert_eq!(reply.blob, blob, "forward reply intact");
        calls += 1;
    }
    calls
}

#[tokio::test]
async fn both_sides_raised_send_datagrams_larger_than_ethernet_frames() {
    let (_server, client, peer, conns) =
        pair(LOOPBACK_MAX_UDP_PAYLOAD, LOOPBACK_MAX_UDP_PAYLOAD).await;
    let calls = bulk_calls(&client, &conns).await;
    for (side, conn) in ["server", "client"].iter().zip(&conns) {
        let path = conn.stats().path;
        assert!(
            path.current_mtu > DEFAULT_ACCEPTED && path.current_mtu <= LOOPBACK_MAX_UDP_PAYLOAD,
            "{side}'s datagrams after {calls} calls of 256 KiB: {} bytes",
            path.current_mtu
        );
        assert_eq!(path.black_holes_detected, 0, "{side} lost large datagrams");
    }
    // The server's calls to its agent ride the same large datagrams.
    let blob = vec![5u8; 256 << 10];
    let mut reverse = peer.client(EchoClient::new);
    for _ in 0..4 {
        let reply = reverse
            .unary(EchoRequest {
                blob: blob.clone(),
                ..Default::default()
            })
            .await
            .expect("reverse call")
            .into_inner();
        assert_eq!(reply.blob, blob, "reverse reply intact");
    }
    for (side, conn) in ["server", "client"].iter().zip(&conns) {
        let path = conn.stats().path;
        assert!(
            path.current_mtu > DEFAULT_ACCEPTED,
            "{side}: {}",
            path.current_mtu
        );
        assert_eq!(path.black_holes_detected, 0, "{side} lost large datagrams");
    }
}

#[tokio::test]
async fn one_side_at_the_default_keeps_both_at_its_size() {
    for (server_payload, client_payload) in [
        (DEFAULT_MAX_UDP_PAYLOAD, LOOPBACK_MAX_UDP_PAYLOAD),
        (LOOPBACK_MAX_UDP_PAYLOAD, DEFAULT_MAX_UDP_PAYLOAD),
    ] {
        let (_server, client, _peer, conns) = pair(server_payload, client_payload).await;
        let calls = bulk_calls(&client, &conns).await;
        assert_eq!(calls, 40, "packets grew with one side at the default");
        for (side, conn) in ["server", "client"].iter().zip(&conns) {
            let mtu = conn.stats().path.current_mtu;
            assert!(
                mtu <= DEFAULT_ACCEPTED,
                "{side} (server {server_payload}, client {client_payload}): {mtu} bytes"
            );
        }
    }
}

/// At the defaults a connection stays at QUIC's 1200 bytes and sends no
/// path-MTU probes (each a full-size datagram drawing an acknowledgement),
/// bulk calls or not; at Ethernet's 1452 on both sides it probes and grows.
#[tokio::test]
async fn at_the_defaults_connections_send_no_path_mtu_probes() {
    let (_server, client, _peer, conns) =
        pair(DEFAULT_MAX_UDP_PAYLOAD, DEFAULT_MAX_UDP_PAYLOAD).await;
    let calls = bulk_calls(&client, &conns).await;
    assert_eq!(calls, 40, "packets grew at the defaults");
    for (side, conn) in ["server", "client"].iter().zip(&conns) {
        let path = conn.stats().path;
        assert_eq!(path.current_mtu, 1200, "{side}");
        assert_eq!(path.sent_plpmtud_probes, 0, "{side} probed its path");
    }

    // Discovery probes on its own once the handshake is done, calls or not.
    let (_server, _client, _peer, conns) = pair(1452, 1452).await;
    common::eventually(
        Duration::from_secs(10),
        "both sides grow past 1200 at 1452",
        || conns.iter().all(|c| c.stats().path.current_mtu > 1200),
    )
    .await;
    for (side, conn) in ["server", "client"].iter().zip(&conns) {
        let path = conn.stats().path;
        assert!(
            path.sent_plpmtud_probes > 0,
            "{side} grew without probing: {path:?}"
        );
    }
}
