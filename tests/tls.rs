//! TLS modes: production certificates from PEM files trusted through a CA
//! bundle, and mutual TLS: clients without a certificate, with one from
//! another CA, or with an expired one are refused at the handshake; a valid
//! client's verified identity is on its peer handle; `authorize` can turn a
//! client away before anything of it is served.

mod common;

use std::sync::atomic::Ordering;

use brpc::core::conn::codes;
use common::EchoService;
use common::echo::EchoRequest;
use common::echo::echo_client::EchoClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::{Code, Status};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("self-signed");
    Ca {
        certificate: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pem: String,
    key_pem: String,
}

fn leaf(ca: &Ca, common_name: &str, sans: Vec<SanType>, client: bool, expired: bool) -> Leaf {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "fleet");
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    if expired {
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    let cert = params.signed_by(&key, &ca.issuer).expect("sign");
    Leaf {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().expect("dns name"))
}

fn roots(ca: &Ca) -> rustls::RootCertStore {
    brpc::tls::pinned_roots(&ca.certificate).expect("roots")
}

#[tokio::test]
async fn production_certificates_from_pem_files_and_a_ca_bundle() {
    let authority = ca("brpc test root");
    let server_leaf = leaf(
        &authority,
        "brpc server",
        vec![dns("localhost")],
        false,
        false,
    );
    let dir = std::env::temp_dir().join(format!("brpc-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("server.pem"), &server_leaf.pem).expect("write");
    std::fs::write(dir.join("server.key"), &server_leaf.key_pem).expect("write");
    std::fs::write(dir.join("ca.pem"), &authority.pem).expect("write");

    let server = brpc::Server::builder()
        .certificate_pem_files(dir.join("server.pem"), dir.join("server.key"))
        .expect("pem")
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = brpc::Client::builder()
        .trust_pem_file(dir.join("ca.pem"))
        .expect("ca bundle")
        .connect(server.local_addr())
        .await
        .expect("verified against the CA");
    let identity = client
        .peer()
        .expect("connected")
        .identity()
        .cloned()
        .expect("server identity");
    assert_eq!(identity.common_name.as_deref(), Some("brpc server"));
    EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("call");

    // The certificate is for localhost: another name fails verification.
    let err = brpc::Client::builder()
        .trust_pem_file(dir.join("ca.pem"))
        .expect("ca bundle")
        .server_name("other.example")
        .connect(server.local_addr())
        .await
        .expect_err("wrong name");
    assert!(err.is_certificate_error(), "{err}");
    // The public roots do not trust a private CA.
    let err = brpc::Client::builder()
        .trust_webpki_roots()
        .connect(server.local_addr())
        .await
        .expect_err("not publicly trusted");
    assert!(err.is_certificate_error(), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn mutual_tls_refuses_bad_clients_and_identifies_good_ones() {
    let authority = ca("fleet root");
    let stranger = ca("someone else");
    let server_leaf = leaf(
        &authority,
        "control plane",
        vec![dns("localhost")],
        false,
        false,
    );
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = brpc::Server::builder()
        .certificate(server_leaf.chain.clone(), server_leaf.key.clone_key())
        .client_ca(roots(&authority))
        .authorize(|admission| match admission.identity {
            Some(id) if id.common_name.as_deref() == Some("banned") => {
                Err(Status::permission_denied("agent is banned"))
            }
            Some(_) => Ok(()),
            None => Err(Status::unauthenticated("no certificate")),
        })
        .add_service(common::echo::echo_server::EchoServer::new(echo))
        .bind("127.0.0.1:0")
        .expect("bind");
    let base = || {
        brpc::Client::builder()
            .trust_roots(roots(&authority))
            .reconnect(false)
    };

    // No certificate.
    let err = base()
        .connect(server.local_addr())
        .await
        .expect_err("no client certificate");
    assert!(
        matches!(err, brpc::ConnectError::Handshake(_)) && err.is_certificate_error(),
        "{err}"
    );
    // A certificate from another CA.
    let foreign = leaf(
        &stranger,
        "agent-x",
        vec![dns("agent-x.fleet.local")],
        true,
        false,
    );
    let err = base()
        .identity(foreign.chain, foreign.key)
        .connect(server.local_addr())
        .await
        .expect_err("foreign CA");
    assert!(
        matches!(err, brpc::ConnectError::Handshake(_)) && err.is_certificate_error(),
        "{err}"
    );
    // An expired certificate from the right CA.
    let expired = leaf(
        &authority,
        "agent-old",
        vec![dns("agent-old.fleet.local")],
        true,
        true,
    );
    let err = base()
        .identity(expired.chain, expired.key)
        .connect(server.local_addr())
        .await
        .expect_err("expired");
    assert!(
        matches!(err, brpc::ConnectError::Handshake(_)) && err.is_certificate_error(),
        "{err}"
    );
    assert!(server.peers().is_empty());

    // A valid client: its verified identity is on its handle, in the registry
    // and in the handlers' Peer::from_request.
    let good = leaf(
        &authority,
        "agent-7",
        vec![
            dns("agent-7.fleet.local"),
            SanType::URI("spiffe://fleet/agent/7".try_into().expect("uri")),
        ],
        true,
        false,
    );
    let client = base()
        .name("claims-to-be-someone-else")
        .identity(good.chain.clone(), good.key)
        .connect(server.local_addr())
        .await
        .expect("valid client");
    let peer = server.peers().get(client.connection_id()).expect("listed");
    let identity = peer.identity().expect("identity");
    assert_eq!(identity.common_name.as_deref(), Some("agent-7"));
    assert!(
        identity.subject.contains("CN=agent-7"),
        "{}",
        identity.subject
    );
    assert_eq!(identity.dns_names, vec!["agent-7.fleet.local"]);
    assert_eq!(identity.uris, vec!["spiffe://fleet/agent/7"]);
    assert_eq!(identity.certificate, good.chain[0]);
    assert_eq!(
        peer.name(),
        "claims-to-be-someone-else",
        "the name is only a claim; the identity is proven"
    );
    EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("served");
    assert_eq!(probe.unary_calls.load(Ordering::SeqCst), 1);

    // authorize refuses a validly certified but banned agent.
    let banned = leaf(
        &authority,
        "banned",
        vec![dns("banned.fleet.local")],
        true,
        false,
    );
    let err = base()
        .identity(banned.chain.clone(), banned.key.clone_key())
        .connect(server.local_addr())
        .await
        .expect_err("banned");
    match &err {
        brpc::ConnectError::Hello(status) => {
            assert_eq!(status.code(), Code::PermissionDenied);
            assert_eq!(status.message(), "agent is banned");
        }
        other => panic!("expected a refused Hello, got {other}"),
    }

    // A banned raw client that sends a call right behind its Hello: the call
    // never reaches a service and the connection closes with CONN_UNAUTHORIZED.
    let crypto =
        brpc::tls::client_crypto_with_identity(roots(&authority), Some((banned.chain, banned.key)))
            .expect("crypto");
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(crypto));
    let conn = endpoint
        .connect(server.local_addr(), "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let sneaky = conn.clone();
    let hello =
        tokio::spawn(
            async move { common::raw_call(&sneaky, common::hello_request(1, "banned")).await },
        );
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    if let Ok((mut send, _recv)) = conn.open_bi().await {
        let request = brpc::core::wire::Request {
            service: "test.echo.v1.Echo".into(),
            method: "Unary".into(),
            ..Default::default()
        };
        let mut buf = bytes::BytesMut::new();
        let stream_id = brpc::core::wire::stream_id(send.id().index(), true);
        brpc::core::wire::Frame::new(
            stream_id,
            brpc::core::wire::FrameType::Request,
            brpc::core::wire::Flags::EMPTY,
            prost::Message::encode_to_vec(&request).into(),
        )
        .encode(&mut buf)
        .expect("encode");
        let _ = send.write_all(&buf).await;
        let _ = send.finish();
    }
    let answer = hello.await.expect("join");
    assert_eq!(
        answer.status.expect("status").code,
        Code::PermissionDenied as i32
    );
    let close = common::closed_with(&conn, codes::CONN_UNAUTHORIZED).await;
    assert!(String::from_utf8_lossy(&close.reason).contains("agent is banned"));
    assert_eq!(
        probe.unary_calls.load(Ordering::SeqCst),
        1,
        "nothing of the banned client was served"
    );
    assert_eq!(server.peers().len(), 1);
}
