//! Liveness: a peer that vanishes without a word (its packets dropped by a
//! UDP relay) is noticed within the configured idle timeout on either side;
//! a server replaced behind the same address with the same key is noticed at
//! once through its stateless reset, and the client reconnects to it.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use brpc::{ClientState, PeerEvent};
use common::EchoService;
use common::echo::echo_client::EchoClient;
use common::echo::{EchoRequest, SleepRequest};
use common::relay::Relay;
use tokio::time::Instant;
use tonic::Code;

const IDLE: Duration = Duration::from_secs(1);
const KEEP_ALIVE: Duration = Duration::from_millis(250);
/// Wide margin over the configured idle timeout for a loaded machine; the
/// defaults it replaces took 30-40 s.
const NOTICED_WITHIN: Duration = Duration::from_secs(6);

fn server(idle: Duration) -> brpc::Server {
    brpc::Server::builder()
        .idle_timeout(idle)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind")
}

/// Cuts the relay and waits for the in-flight `call` to fail with
/// UNAVAILABLE; returns how long that took.
async fn vanish_and_fail<T: std::fmt::Debug>(
    relay: &Relay,
    call: tokio::task::JoinHandle<Result<T, tonic::Status>>,
) -> Duration {
    relay.blackhole();
    let vanished = Instant::now();
    let status = tokio::time::timeout(NOTICED_WITHIN, call)
        .await
        .expect("in-flight call failed in time")
        .expect("join")
        .expect_err("no answer can come");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    vanished.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_leaves_the_registry_and_fails_its_calls_within_the_idle_timeout() {
    let server = server(IDLE);
    let relay = Relay::start(server.local_addr()).await;
    let echo = EchoService::new("agent");
    echo.probe.hang.store(true, Ordering::SeqCst);
    let client = common::client_builder(&server, "agent", echo)
        .idle_timeout(Duration::from_secs(60))
        .reconnect(false)
        .connect(relay.addr())
        .await
        .expect("connect");
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    let mut events = server.peers().subscribe();
    // A server-to-client call that the agent never answers: in flight.
    let mut agent = peer.client(EchoClient::new);
    let call = tokio::spawn(async move {
        agent
            .unary(EchoRequest {
                text: "hello?".into(),
                ..Default::default()
            })
            .await
    });
    common::eventually(Duration::from_secs(5), "call reached the agent", || {
        peer.calls_in_flight() == 1
    })
    .await;

    let failed_after = vanish_and_fail(&relay, call).await;
    let left = tokio::time::timeout(NOTICED_WITHIN, async {
        loop {
            if let Ok(PeerEvent::Disconnected { peer, reason }) = events.recv().await
                && peer.connection_id() == client.connection_id()
            {
                return reason;
            }
        }
    })
    .await;
    let reason = left.expect("disconnect event in time");
    assert!(reason.is_timeout(), "{reason}");
    assert!(reason.to_string().contains("idle timeout"), "{reason}");
    assert!(server.peers().get(client.connection_id()).is_none());
    println!("vanished client: call failed after {failed_after:?} (idle timeout {IDLE:?})");
    assert!(
        failed_after >= IDLE / 2,
        "failed before the idle timeout: {failed_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_server_fails_the_clients_calls_within_the_idle_timeout() {
    let server = server(Duration::from_secs(60));
    let relay = Relay::start(server.local_addr()).await;
    let client = common::client_builder(&server, "agent", EchoService::new("agent"))
        .idle_timeout(IDLE)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .connect(relay.addr())
        .await
        .expect("connect");
    let mut state = client.watch_state();
    let mut echo = EchoClient::new(client.channel());
    let call = tokio::spawn(async move { echo.sleep(SleepRequest { millis: 60_000 }).await });
    // Let the call reach the server before it vanishes.
    common::eventually(Duration::from_secs(5), "call in flight", || {
        client.peer().is_some_and(|p| p.calls_in_flight() == 1)
    })
    .await;
    let failed_after = vanish_and_fail(&relay, call).await;
    println!("vanished server: call failed after {failed_after:?}");
    let state = common::state_becomes(
        &mut state,
        NOTICED_WITHIN,
        "client noticed the loss in time",
        |s| !matches!(s, ClientState::Connected { .. }),
    )
    .await;
    // The first reason given is how the connection ended: it timed out.
    let ClientState::Reconnecting {
        attempt: 0,
        last_error,
    } = &state
    else {
        panic!("expected the first Reconnecting state, got {state:?}");
    };
    let timed_out = last_error
        .connection_error()
        .is_some_and(|e| e.is_timeout());
    assert!(timed_out, "{last_error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_replaced_with_the_same_key_is_noticed_by_stateless_reset() {
    let certificate = brpc::tls::DevCertificate::generate().expect("certificate");
    let (der, key) = (certificate.certificate().clone(), certificate.private_key());
    let bind = || {
        brpc::Server::builder()
            .certificate(vec![der.clone()], key.clone_key())
            .add_service(common::echo::echo_server::EchoServer::new(
                EchoService::new("server"),
            ))
            .bind("127.0.0.1:0")
            .expect("bind")
    };
    let first = bind();
    let relay = Relay::start(first.local_addr()).await;
    // The client would need its 60 s idle timeout to notice a silent loss.
    let client = common::client_builder(&first, "agent", EchoService::new("agent"))
        .idle_timeout(Duration::from_secs(60))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .connect(relay.addr())
        .await
        .expect("connect");
    let old_id = client.connection_id();
    let mut state = client.watch_state();

    // The process behind the address is replaced: the old one is cut off
    // without closing anything, the new one has the same certificate and key.
    let second = bind();
    relay.retarget(second.local_addr());
    let replaced = Instant::now();
    common::state_becomes(
        &mut state,
        NOTICED_WITHIN,
        "client noticed the replaced server",
        |s| !matches!(s, ClientState::Connected { connection_id } if *connection_id == old_id),
    )
    .await;
    let noticed = replaced.elapsed();
    println!("replaced server noticed after {noticed:?}");
    // Far below any timeout in play: only the stateless reset explains it.
    assert!(noticed < Duration::from_secs(3), "took {noticed:?}");
    common::state_becomes(&mut state, NOTICED_WITHIN, "reconnected in time", |s| {
        matches!(s, ClientState::Connected { .. })
    })
    .await;
    assert!(second.peers().get(client.connection_id()).is_some());
    let reply = EchoClient::new(client.channel())
        .unary(EchoRequest {
            text: "again".into(),
            ..Default::default()
        })
        .await
        .expect("call on the new server");
    assert_eq!(reply.into_inner().text, "again");
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_connection_outlives_the_idle_timeout_on_the_clients_keep_alives_alone() {
    // The server's builder sends no keep-alives of its own; the client's
    // PINGs, each acknowledged, must keep both sides' idle timers running.
    // Eight PINGs per idle period: a loaded machine must not lose them all.
    const IDLE: Duration = Duration::from_secs(2);
    let server = brpc::Server::builder()
        .idle_timeout(IDLE)
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = common::client_builder(&server, "agent", EchoService::new("agent"))
        .idle_timeout(IDLE)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .connect(server.local_addr())
        .await
        .expect("connect");
    let id = client.connection_id();
    let mut events = server.peers().subscribe();
    // Three idle timeouts of silence from the calls' point of view.
    tokio::time::sleep(IDLE * 3).await;
    assert!(
        events.try_recv().is_err(),
        "no registry event: the peer never left"
    );
    assert_eq!(client.connection_id(), id, "never reconnected");
    let peer = server.peers().get(id).expect("still listed");
    let reply = peer
        .client(common::echo::echo_client::EchoClient::new)
        .unary(EchoRequest::default())
        .await
        .expect("server calls the client");
    assert_eq!(reply.into_inner().answered_by, "agent");
    let reply = EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("client calls the server");
    assert_eq!(reply.into_inner().answered_by, "server");
}
