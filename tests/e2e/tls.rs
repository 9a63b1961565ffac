//! TLS modes: production certificates from PEM files trusted through a CA
//! bundle, and mutual TLS: clients without a certificate, with one from
//! another CA, or with an expired one are refused at the handshake; a valid
//! client's verified identity is on its peer handle; `authorize` can turn a
//! client away before anything of it is served.

use crate::common;

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

/// `localhost:PORT` of `server`: the name its certificates carry, checked
/// because it is the host dialled.
fn localhost(server: &brpc::Server) -> String {
    format!("localhost:{}", server.local_addr().port())
}

fn ip(address: &str) -> SanType {
    SanType::IpAddress(address.parse().expect("ip address"))
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
        .bind("localhost:0")
        .expect("bind");
    let client = brpc::Client::builder()
        .trust_pem_file(dir.join("ca.pem"))
        .expect("ca bundle")
        .connect(localhost(&server))
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
        .connect(localhost(&server))
        .await
        .expect_err("wrong name");
    assert!(err.is_certificate_error(), "{err}");
    // The public roots do not trust a private CA.
    let err = brpc::Client::builder()
        .trust_webpki_roots()
        .connect(localhost(&server))
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
        .bind("localhost:0")
        .expect("bind");
    let base = || {
        brpc::Client::builder()
            .trust_roots(roots(&authority))
            .reconnect(false)
    };

    // No certificate.
    let err = base()
        .connect(localhost(&server))
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
        .connect(localhost(&server))
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
        .connect(localhost(&server))
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
        .connect(localhost(&server))
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
        .connect(localhost(&server))
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

/// The name checked is the host dialled, as in tonic: `localhost:PORT`
/// verifies a certificate for `localhost`, `127.0.0.1:PORT` one carrying that
/// IP address, both without `.server_name()`; a certificate for another name
/// is refused with an error naming both.
#[tokio::test]
async fn the_host_dialled_is_the_name_checked() {
    let authority = ca("names root");
    let serve = |leaf: Leaf| {
        brpc::Server::builder()
            .certificate(leaf.chain, leaf.key)
            .add_service(common::echo::echo_server::EchoServer::new(
                EchoService::new("server"),
            ))
            .bind("localhost:0")
            .expect("bind")
    };
    let dial = |addr: String| {
        brpc::Client::builder()
            .trust_roots(roots(&authority))
            .reconnect(false)
            .connect(addr)
    };
    let by_name = serve(leaf(
        &authority,
        "named",
        vec![dns("localhost")],
        false,
        false,
    ));
    dial(localhost(&by_name)).await.expect("localhost verified");

    let by_ip = serve(leaf(
        &authority,
        "by ip",
        vec![ip("127.0.0.1")],
        false,
        false,
    ));
    let addr = by_ip.local_addr();
    assert_eq!(
        addr.ip().to_string(),
        "127.0.0.1",
        "localhost is 127.0.0.1 here"
    );
    dial(addr.to_string()).await.expect("IP SAN verified");

    let other = serve(leaf(
        &authority,
        "other",
        vec![dns("other.example")],
        false,
        false,
    ));
    let err = dial(other.local_addr().to_string())
        .await
        .expect_err("certificate for another name");
    assert!(
        matches!(err, brpc::ConnectError::CertificateName { is_ip: true, .. }),
        "{err:?}"
    );
    assert!(err.is_certificate_error());
    let message = err.to_string();
    assert!(
        message.contains("127.0.0.1") && message.contains("other.example"),
        "{message}"
    );
    assert!(message.contains(".server_name("), "{message}");
    println!("{message}");
}

/// A server on a persisted dev certificate (`dev_certificate_file`) that is
/// restarted behind the same address is reconnected to by clients that
/// pinned the file; a server whose certificate changed is a distinct error
/// that ends the client instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persisted_dev_certificate_survives_restarts_and_a_changed_one_is_named() {
    use brpc::ClientState;
    use std::time::Duration;
    let dir = std::env::temp_dir().join(format!("brpc-tls-dev-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("server.pem");
    let bind = |builder: brpc::server::Builder| {
        builder
            .add_service(common::echo::echo_server::EchoServer::new(
                EchoService::new("server"),
            ))
            .bind("127.0.0.1:0")
            .expect("bind")
    };
    let first = bind(brpc::Server::builder().dev_certificate_file(&path));
    let relay = common::relay::Relay::start(first.local_addr()).await;
    let client = brpc::Client::builder()
        .name("agent")
        .pin_certificate_file(&path)
        .expect("pin file")
        .idle_timeout(Duration::from_secs(1))
        .keep_alive_interval(Some(Duration::from_millis(250)))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .connect(relay.addr())
        .await
        .expect("connect");
    let old = client.connection_id();
    let mut state = client.watch_state();

    // Restarted: a new process on the same files.
    let second = bind(brpc::Server::builder().dev_certificate_file(&path));
    relay.retarget(second.local_addr());
    drop(first);
    common::state_becomes(
        &mut state,
        Duration::from_secs(10),
        "reconnected to the restarted server",
        |s| matches!(s, ClientState::Connected { connection_id } if *connection_id != old),
    )
    .await;
    assert!(second.peers().get(client.connection_id()).is_some());

    // Replaced by a server with a fresh certificate: named, and final.
    let third = bind(brpc::Server::builder());
    relay.retarget(third.local_addr());
    let closed = common::state_becomes(
        &mut state,
        Duration::from_secs(15),
        "the client gave up",
        |s| matches!(s, ClientState::Closed { .. }),
    )
    .await;
    let ClientState::Closed { reason } = closed else {
        unreachable!()
    };
    assert!(
        matches!(
            reason.connect_error(),
            Some(brpc::ConnectError::NotPinned(_))
        ),
        "{reason:?}"
    );
    assert!(
        reason.to_string().contains("not the pinned one"),
        "{reason}"
    );
    assert!(third.peers().is_empty());

    // A file that is no certificate is refused when loaded, not at connect.
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, b"not a certificate").expect("write");
    let Err(err) = brpc::Client::builder().pin_certificate_file(&garbage) else {
        panic!("a garbage pin file was accepted");
    };
    assert!(err.to_string().contains("garbage.pem"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The admin service authorises by mutual-TLS identity: an operator whose
/// certificate names an allowed identity reaches an agent through the
/// relay with no token; an agent, verified but not allowed, is refused.
#[tokio::test]
async fn the_admin_service_answers_an_allowed_mtls_identity_only() {
    let authority = ca("fleet root");
    let server_leaf = leaf(
        &authority,
        "control plane",
        vec![dns("localhost")],
        false,
        false,
    );
    let server = brpc::Server::builder()
        .certificate(server_leaf.chain.clone(), server_leaf.key.clone_key())
        .client_ca(roots(&authority))
        .admin(brpc::server::AdminAccess::new().identity("spiffe://fleet/operator"))
        .bind("localhost:0")
        .expect("bind");
    let connect = |who: Leaf, name: &'static str| {
        let server = &server;
        let roots = roots(&authority);
        async move {
            brpc::Client::builder()
                .name(name)
                .trust_roots(roots)
                .identity(who.chain, who.key)
                .add_service(common::echo::echo_server::EchoServer::new(
                    EchoService::new(name),
                ))
                .reconnect(false)
                .connect(localhost(server))
                .await
                .expect("connects")
        }
    };
    let agent_cert = leaf(
        &authority,
        "agent-7",
        vec![dns("agent-7.fleet.local")],
        true,
        false,
    );
    let operator_cert = leaf(
        &authority,
        "alice",
        vec![SanType::URI(
            "spiffe://fleet/operator".try_into().expect("uri"),
        )],
        true,
        false,
    );
    let agent = connect(agent_cert, "agent-7").await;
    let operator = connect(operator_cert, "operator").await;

    let relay_to = |target: &brpc::Client| {
        let id = target.connection_id().0.to_string();
        move |mut request: tonic::Request<()>| {
            let value = id.parse().map_err(|_| Status::internal("id"))?;
            request
                .metadata_mut()
                .insert(brpc::server::admin::RELAY_TO, value);
            Ok(request)
        }
    };
    let mut through = EchoClient::with_interceptor(operator.channel(), relay_to(&agent));
    let reply = through
        .unary(EchoRequest {
            text: "hi".into(),
            ..Default::default()
        })
        .await
        .expect("the operator reaches the agent");
    assert_eq!(reply.get_ref().answered_by, "agent-7");

    // The agent, verified by the same CA but not an allowed identity.
    let mut back = EchoClient::with_interceptor(agent.channel(), relay_to(&operator));
    let status = back
        .unary(EchoRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}
