//! Metadata both ways: request metadata reaches the handler; response headers
//! and trailers come back to the caller. ASCII and `-bin` values, repeated keys.

use crate::common;

use common::echo::echo_client::EchoClient;
use common::echo::{EchoRequest, FailRequest, RangeRequest};
use tonic::metadata::{BinaryMetadataValue, MetadataMap, MetadataValue};
use tonic::{Code, Request};

const BINARY: &[u8] = &[0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, b'\n', b'='];

fn with_metadata<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    let md = request.metadata_mut();
    md.insert(
        "x-ascii",
        MetadataValue::from_static("plain value; with=signs"),
    );
    md.append("x-repeated", MetadataValue::from_static("first"));
    md.append("x-repeated", MetadataValue::from_static("second"));
    md.insert_bin("x-blob-bin", BinaryMetadataValue::from_bytes(BINARY));
    md.insert("not-echoed", MetadataValue::from_static("stays"));
    request
}

fn assert_echoed(md: &MetadataMap) {
    assert_eq!(
        md.get("x-ascii").expect("x-ascii"),
        "plain value; with=signs"
    );
    let repeated: Vec<_> = md
        .get_all("x-repeated")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    assert_eq!(repeated, vec!["first", "second"]);
    let blob = md
        .get_bin("x-blob-bin")
        .expect("x-blob-bin")
        .to_bytes()
        .expect("base64");
    assert_eq!(&blob[..], BINARY);
    assert!(md.get("not-echoed").is_none());
}

async fn check(mut echo: EchoClient<brpc::Channel>) {
    // Unary: request metadata in, response headers out.
    let response = echo
        .unary(with_metadata(EchoRequest::default()))
        .await
        .expect("unary");
    assert_echoed(response.metadata());

    // Server streaming: headers arrive with the stream, before any message.
    let response = echo
        .range(with_metadata(RangeRequest { from: 0, to: 3 }))
        .await
        .expect("range");
    assert_echoed(response.metadata());
    let mut stream = response.into_inner();
    let mut n = 0;
    while stream.message().await.expect("item").is_some() {
        n += 1;
    }
    assert_eq!(n, 3);

    // Errors: the status's metadata comes back as trailers.
    let err = echo
        .fail(with_metadata(FailRequest {
            code: Code::AlreadyExists as i32,
            message: "dup".into(),
        }))
        .await
        .expect_err("fails");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(err.message(), "dup");
    assert_echoed(err.metadata());
}

#[tokio::test]
async fn metadata_client_to_server() {
    let server = common::server();
    let client = common::client(&server, "agent").await;
    check(EchoClient::new(client.channel())).await;
}

#[tokio::test]
async fn metadata_server_to_client() {
    let server = common::server();
    let client = common::client(&server, "agent").await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    check(peer.client(EchoClient::new)).await;
}

/// Plain ttrpc peers may send any UTF-8 as a metadata value; gRPC text
/// metadata is ASCII only, so a non-ASCII text value is refused with
/// INVALID_ARGUMENT naming the way out (a `-bin` key) instead of reaching a
/// handler that cannot read it.
#[tokio::test]
async fn non_ascii_text_metadata_from_a_raw_peer_is_invalid_argument() {
    use prost::Message;
    let echo = common::EchoService::new("server");
    let probe = echo.probe.clone();
    let server = common::server_with(echo);
    let (conn, _id) = common::raw_client(&server, "go-like").await;
    let request = brpc::core::wire::Request {
        service: "test.echo.v1.Echo".into(),
        method: "Unary".into(),
        payload: EchoRequest::default().encode_to_vec().into(),
        metadata: vec![brpc::core::wire::KeyValue::new("x-owner", "Zoë")],
        ..Default::default()
    };
    let status = common::raw_call(&conn, request)
        .await
        .status
        .expect("status");
    assert_eq!(status.code, Code::InvalidArgument as i32, "{status:?}");
    assert!(status.message.contains("x-owner") && status.message.contains("-bin"));
    assert_eq!(
        probe.unary_calls.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}
