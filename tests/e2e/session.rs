//! Sessions: connection ids, the registry's life cycle, certificate pinning, and
//! the Hello gate (nothing is served before Hello; no Hello means closed).

use crate::common;

use std::time::Duration;

use brpc::core::conn::codes;
use brpc::core::session;
use brpc::core::tls::DevCertificate;
use brpc::core::wire::Request;
use brpc::{Client, ConnectError};
use prost::Message;
use tonic::Code;

#[tokio::test]
async fn two_clients_get_different_ids_that_both_sides_agree_on() {
    let server = common::server();
    let a = common::client(&server, "a").await;
    let b = common::client(&server, "b").await;
    assert_ne!(a.connection_id(), b.connection_id());
    let listed: Vec<_> = server
        .peers()
        .list()
        .iter()
        .map(|p| (p.connection_id(), p.name().to_owned()))
        .collect();
    assert_eq!(
        listed,
        vec![
            (a.connection_id(), "a".to_owned()),
            (b.connection_id(), "b".to_owned())
        ]
    );
    assert_eq!(
        server.peers().get(a.connection_id()).expect("a").name(),
        "a"
    );
    assert_eq!(
        a.peer().expect("connected").connection_id(),
        a.connection_id()
    );
    assert_eq!(server.peers().select_label("role", "test").len(), 2);
    assert_eq!(server.peers().select_label("role", "other").len(), 0);
}

#[tokio::test]
async fn registry_drops_a_client_that_disconnects() {
    let server = common::server();
    let a = common::client(&server, "a").await;
    let b = common::client(&server, "b").await;
    let (a_id, b_id) = (a.connection_id(), b.connection_id());
    a.shutdown(Duration::from_secs(5)).await;
    drop(a);
    common::eventually(Duration::from_secs(10), "a unlisted", || {
        server.peers().get(a_id).is_none()
    })
    .await;
    assert!(server.peers().get(b_id).is_some(), "b stays");
    drop(b);
    common::eventually(Duration::from_secs(10), "registry empty", || {
        server.peers().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_wrong_pinned_certificate_fails_to_connect_clearly() {
    let server = common::server();
    let other = DevCertificate::generate().expect("cert");
    let err = Client::builder()
        .pin_certificate(other.certificate().clone())
        .connect(server.local_addr())
        .await
        .expect_err("must not trust the server");
    assert!(err.is_certificate_error(), "{err}");
    let text = err.to_string();
    assert!(text.contains("certificate"), "{text}");
    assert!(server.peers().is_empty());
    // The server counts a handshake started and failed (the client's alert).
    common::eventually(Duration::from_secs(10), "handshake counted failed", || {
        server.admission_stats().handshakes_failed == 1
    })
    .await;
    let stats = server.admission_stats();
    assert_eq!(
        (stats.handshakes_started, stats.admitted),
        (1, 0),
        "{stats:?}"
    );

    let err = Client::builder()
        .connect(server.local_addr())
        .await
        .expect_err("no trust");
    assert!(matches!(err, ConnectError::NoTrust), "{err}");
}

#[tokio::test]
async fn a_call_before_hello_is_refused_and_the_connection_closed() {
    let server = common::server();
    let conn = common::raw_connection(&server).await;
    let response = common::raw_call(
        &conn,
        Request {
            service: "test.echo.v1.Echo".into(),
            method: "Unary".into(),
            ..Default::default()
        },
    )
    .await;
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    assert!(
        status.message.contains("brpc.v1.Session/Hello"),
        "{}",
        status.message
    );
    common::closed_with(&conn, codes::CONN_HELLO_FAILED).await;
    assert!(server.peers().is_empty());
}

#[tokio::test]
async fn a_raw_hello_gets_an_id_and_the_peer_is_listed() {
    let server = common::server();
    let conn = common::raw_connection(&server).await;
    let response = common::raw_call(
        &conn,
        common::hello_request(session::PROTOCOL_VERSION, "raw"),
    )
    .await;
    assert_eq!(response.status.expect("status").code, 0);
    let answer = brpc::core::wire::HelloResponse::decode(response.payload).expect("answer");
    assert_eq!(answer.protocol_version, session::PROTOCOL_VERSION);
    let id = brpc::ConnectionId(answer.connection_id);
    assert_eq!(server.peers().get(id).expect("listed").name(), "raw");
    common::eventually(Duration::from_secs(10), "session counted admitted", || {
        server.admission_stats().admitted == 1
    })
    .await;
    let stats = server.admission_stats();
    assert_eq!(
        (
            stats.handshakes_started,
            stats.handshakes_failed,
            stats.sessions_refused
        ),
        (1, 0, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_wrong_protocol_version_is_refused() {
    let server = common::server();
    let conn = common::raw_connection(&server).await;
    let response = common::raw_call(&conn, common::hello_request(99, "future")).await;
    let status = response.status.expect("status");
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    assert!(status.message.contains("version 99"), "{}", status.message);
    assert!(server.peers().is_empty());
    common::eventually(Duration::from_secs(10), "session counted refused", || {
        server.admission_stats().sessions_refused == 1
    })
    .await;
    assert_eq!(server.admission_stats().admitted, 0);
}

#[tokio::test]
async fn a_client_that_never_says_hello_is_closed_after_the_limit() {
    let server = brpc::Server::builder()
        .hello_timeout(Duration::from_millis(300))
        .bind("127.0.0.1:0")
        .expect("bind");
    let conn = common::raw_connection(&server).await;
    common::closed_with(&conn, codes::CONN_HELLO_TIMEOUT).await;
}

/// A client that sends a Hello the server refuses, then never takes the
/// answer (it grants the stream no flow-control credit) while keeping the
/// connection alive, is closed at the Hello limit all the same: it cannot
/// hold its connection, and its place under `max_connections`, for ever.
#[tokio::test]
async fn a_refused_client_that_never_takes_the_answer_is_closed_at_the_hello_limit() {
    let server = brpc::Server::builder()
        .hello_timeout(Duration::from_millis(500))
        .bind("127.0.0.1:0")
        .expect("bind");
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(0u32.into())
        .keep_alive_interval(Some(Duration::from_millis(100)));
    let conn = common::raw_connection_with(&server, transport).await;
    let (mut send, _recv) = conn.open_bi().await.expect("open");
    let stream_id = brpc::core::wire::stream_id(send.id().index(), true);
    let hello = common::frame(
        stream_id,
        brpc::core::wire::FrameType::Request,
        brpc::core::wire::Flags::EMPTY,
        common::hello_request(99, "withholding").encode_to_vec(),
    );
    send.write_all(&hello).await.expect("write");
    send.finish().expect("finish");
    common::closed_with(&conn, codes::CONN_HELLO_FAILED).await;
}

/// Neither side accepts QUIC datagrams (brpc uses none): a peer learns it
/// from the transport parameters and cannot make the other buffer them.
#[tokio::test]
async fn neither_side_accepts_quic_datagrams() {
    let server = common::server();
    let raw = common::raw_connection(&server).await;
    assert_eq!(raw.max_datagram_size(), None, "the server offers none");
    let client = common::client(&server, "no-datagrams").await;
    let peer = server.peers().get(client.connection_id()).expect("listed");
    let to_client = peer.quic_connection().expect("over QUIC");
    assert_eq!(
        to_client.max_datagram_size(),
        None,
        "the client offers none"
    );
}
