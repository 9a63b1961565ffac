//! A fleet of agents on one server: registry and label selection, broadcast
//! with a hung agent, connect/disconnect events, restart and reconnect,
//! keep-alive, connection migration and graceful shutdown.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use brpc::{BroadcastOptions, Client, ClientState, PeerEvent, broadcast};
use common::echo::echo_client::EchoClient;
use common::echo::{EchoRequest, SleepRequest};
use common::{EchoService, eventually};
use tokio_stream::StreamExt;
use tonic::Code;

fn agent_builder(server: &brpc::Server, i: usize, hang: bool) -> brpc::client::Builder {
    let echo = EchoService::new(&format!("agent-{i}"));
    echo.probe.hang.store(hang, Ordering::SeqCst);
    common::client_builder(server, &format!("agent-{i}"), echo)
        .label("region", if i.is_multiple_of(4) { "eu" } else { "us" })
        .label("index", i.to_string())
        .local_address(agent_source(i))
}

/// Agent `i` dials from one of three loopback addresses (all of 127/8 is
/// loopback on Linux), as a large fleet on one host must to get past one
/// address's port range.
fn agent_source(i: usize) -> std::net::SocketAddr {
    let last = 2 + (i % 3) as u8;
    std::net::SocketAddr::from(([127, 0, 0, last], 0))
}

async fn connect_all(
    builders: Vec<brpc::client::Builder>,
    addr: std::net::SocketAddr,
) -> Vec<Client> {
    let connects: Vec<_> = builders
        .into_iter()
        .map(|b| tokio::spawn(async move { b.connect(addr).await }))
        .collect();
    let mut clients = Vec::new();
    for c in connects {
        clients.push(c.await.expect("join").expect("connect"));
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_agents_on_three_addresses_registry_selection_and_broadcast() {
    const N: usize = 300;
    const HUNG: usize = 17;
    let server = common::server();
    let builders = (0..N)
        .map(|i| agent_builder(&server, i, i == HUNG))
        .collect();
    let agents = connect_all(builders, server.local_addr()).await;

    let listed = server.peers().list();
    assert_eq!(listed.len(), N);
    for peer in &listed {
        let i: usize = peer
            .label("index")
            .expect("index label")
            .parse()
            .expect("number");
        assert_eq!(peer.name(), format!("agent-{i}"));
        assert_eq!(
            peer.label("region"),
            Some(if i.is_multiple_of(4) { "eu" } else { "us" })
        );
        assert_eq!(agents[i].connection_id(), peer.connection_id());
        assert_eq!(peer.remote_address().ip(), agent_source(i).ip());
    }
    let eu = server.peers().select_label("region", "eu");
    assert_eq!(eu.len(), N / 4);
    assert!(eu.iter().all(|p| {
        p.label("index")
            .expect("index")
            .parse::<usize>()
            .expect("n")
            % 4
            == 0
    }));
    // Two labels at once, from the index: agent 8 is the one in eu with index 8.
    let eight = server
        .peers()
        .select_labels([("region", "eu"), ("index", "8")]);
    assert_eq!(eight.len(), 1);
    assert_eq!(eight[0].connection_id(), agents[8].connection_id());
    assert!(
        server
            .peers()
            .select_labels([("region", "us"), ("index", "8")])
            .is_empty()
    );
    // Pages of 64 list every agent once, in id order, as list() does.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = server.peers().page(after, 64);
        let Some(last) = page.last() else { break };
        after = Some(last.connection_id());
        paged.extend(page.iter().map(brpc::Peer::connection_id));
    }
    let all: Vec<_> = listed.iter().map(brpc::Peer::connection_id).collect();
    assert_eq!(paged, all);
    assert!(all.windows(2).all(|w| w[0] < w[1]));

    let options = BroadcastOptions {
        concurrency: 64,
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let results: Vec<_> = broadcast(server.peers().list(), options, |peer| async move {
        let reply = peer
            .client(EchoClient::new)
            .unary(EchoRequest {
                text: "ping".into(),
                ..Default::default()
            })
            .await?;
        Ok(reply.into_inner().answered_by)
    })
    .collect()
    .await;
    assert_eq!(results.len(), N);
    let ids: HashSet<_> = results.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), N, "one result per agent");
    // The hung agent's result comes last: it did not hold up anyone else.
    let (last, rest) = results.split_last().expect("results");
    assert_eq!(last.peer.name(), format!("agent-{HUNG}"));
    let err = last.result.as_ref().expect_err("hung agent");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    for r in rest {
        assert_eq!(r.result.as_deref().expect("answered"), r.peer.name());
        assert!(r.elapsed < options.timeout);
    }
}

/// A broadcast whose calls all take about as long (each agent sleeps
/// 200 ms) widens the number in flight from its `initial_concurrency`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_widens_while_its_calls_answer_as_fast_as_at_first() {
    const N: usize = 24;
    let server = common::server();
    // One probe for every agent: the most handlers running at once across
    // the fleet.
    let shared = EchoService::new("agent");
    let builders = (0..N)
        .map(|i| {
            let echo = EchoService {
                who: format!("agent-{i}"),
                probe: shared.probe.clone(),
            };
            common::client_builder(&server, &format!("agent-{i}"), echo)
        })
        .collect();
    let _agents = connect_all(builders, server.local_addr()).await;
    let options = BroadcastOptions {
        concurrency: 8,
        initial_concurrency: 1,
        timeout: Duration::from_secs(30),
    };
    let results: Vec<_> = broadcast(server.peers().list(), options, |peer| async move {
        peer.client(EchoClient::new)
            .sleep(SleepRequest { millis: 200 })
            .await?;
        Ok(())
    })
    .collect()
    .await;
    assert_eq!(results.len(), N);
    for r in &results {
        r.result.as_ref().expect("answered");
    }
    // Rounds of 1, 2, 4, 8 calls while they take about 200 ms each: at
    // least two doublings, and never past `concurrency` (one doubling more
    // would have the 9 calls left in flight at once).
    let most = shared.probe.max_in_flight.load(Ordering::SeqCst);
    assert!((4..=8).contains(&most), "{most} calls in flight at most");
}

#[tokio::test]
async fn dropping_a_broadcast_cancels_its_calls_on_every_agent() {
    const N: usize = 3;
    let server = common::server();
    let probes: Vec<_> = (0..N)
        .map(|i| EchoService::new(&format!("agent-{i}")))
        .collect();
    let builders = probes
        .iter()
        .enumerate()
        .map(|(i, echo)| common::client_builder(&server, &format!("agent-{i}"), echo.clone()))
        .collect();
    let _agents = connect_all(builders, server.local_addr()).await;
    let options = BroadcastOptions {
        concurrency: N,
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let mut results = Box::pin(broadcast(
        server.peers().list(),
        options,
        |peer| async move {
            peer.client(EchoClient::new)
                .sleep(SleepRequest { millis: 60_000 })
                .await?;
            Ok(())
        },
    ));
    // Polling once starts all N calls (each in its own task); none finishes.
    let first = tokio::time::timeout(Duration::from_millis(50), results.next()).await;
    assert!(first.is_err(), "no agent answers a 60 s sleep");
    let all_agents =
        |count: fn(&common::Probe) -> usize| probes.iter().all(|echo| count(&echo.probe) == 1);
    eventually(
        Duration::from_secs(10),
        "every agent running the call",
        || all_agents(|p| p.in_flight.load(Ordering::SeqCst)),
    )
    .await;
    drop(results);
    eventually(
        Duration::from_secs(10),
        "every agent's handler dropped",
        || all_agents(|p| p.dropped.load(Ordering::SeqCst)),
    )
    .await;
}

#[tokio::test]
async fn connect_and_disconnect_events_arrive_once_each() {
    const N: usize = 20;
    let server = common::server();
    let mut events = server.peers().subscribe();
    let builders = (0..N).map(|i| agent_builder(&server, i, false)).collect();
    let agents = connect_all(builders, server.local_addr()).await;
    let ids: HashSet<_> = agents.iter().map(|a| a.connection_id()).collect();
    for agent in &agents {
        agent.close();
    }
    drop(agents);

    let mut connected = Vec::new();
    let mut disconnected = Vec::new();
    while disconnected.len() < N {
        match tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("event in time")
        {
            Ok(PeerEvent::Connected(peer)) => connected.push(peer.connection_id()),
            Ok(PeerEvent::Disconnected { peer, reason }) => {
                assert!(!reason.to_string().is_empty());
                assert!(
                    connected.contains(&peer.connection_id()),
                    "connected before disconnected"
                );
                disconnected.push(peer.connection_id());
            }
            // Kinds of event this test does not follow.
            Ok(_) => {}
            Err(e) => panic!("missed events: {e}"),
        }
    }
    assert_eq!(connected.len(), N);
    assert_eq!(connected.iter().copied().collect::<HashSet<_>>(), ids);
    assert_eq!(disconnected.iter().copied().collect::<HashSet<_>>(), ids);
    // Nothing more: exactly once each.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.recv())
            .await
            .is_err()
    );
    assert!(server.peers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_to_a_restarted_server() {
    const N: usize = 20;
    let (chain, key) = dev_identity();
    let first =
        echo_server(&chain, &key, "first", "127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = first.local_addr();
    let builders = (0..N)
        .map(|i| {
            agent_builder(&first, i, false)
                .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        })
        .collect();
    let agents = connect_all(builders, addr).await;
    let old_ids: Vec<_> = agents.iter().map(|a| a.connection_id()).collect();

    first.close();
    first.wait_idle().await;
    drop(first);
    for agent in &agents {
        let mut state = agent.watch_state();
        common::state_becomes(
            &mut state,
            Duration::from_secs(10),
            "noticed the drop",
            |s| matches!(s, ClientState::Reconnecting { .. }),
        )
        .await;
    }
    // Calls while disconnected fail fast.
    let err = EchoClient::new(agents[0].channel())
        .unary(EchoRequest::default())
        .await
        .expect_err("disconnected");
    assert_eq!(err.code(), Code::Unavailable);

    let second = rebind(&chain, &key, addr).await;
    let restarted = tokio::time::Instant::now();
    // Backoff is at most 500 ms plus 100% jitter per attempt: every agent is
    // back well within a few attempts.
    eventually(Duration::from_secs(10), "all agents back", || {
        server_has(&second, N)
    })
    .await;
    println!("all {N} agents reconnected in {:?}", restarted.elapsed());
    for (agent, old) in agents.iter().zip(&old_ids) {
        // The server lists a peer when it answers its Hello; the agent turns
        // Connected when that answer arrives, a moment later.
        let mut state = agent.watch_state();
        let connected = common::state_becomes(
            &mut state,
            Duration::from_secs(10),
            "agent connected",
            |s| matches!(s, ClientState::Connected { .. }),
        )
        .await;
        let ClientState::Connected { connection_id } = connected else {
            unreachable!("waited for Connected");
        };
        assert_ne!(connection_id, *old, "a new connection id");
        let peer = second
            .peers()
            .get(connection_id)
            .expect("listed by the new server");
        let reply = peer
            .client(EchoClient::new)
            .unary(EchoRequest::default())
            .await
            .expect("agent serves again");
        assert_eq!(reply.into_inner().answered_by, agent.name());
        let up = EchoClient::new(agent.channel())
            .unary(EchoRequest::default())
            .await
            .expect("channel follows");
        assert_eq!(up.into_inner().answered_by, "second");
    }
}

/// A dev certificate chain and its key, for servers restarted with the same
/// identity (which their agents pin).
fn dev_identity() -> (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    let cert = brpc::tls::DevCertificate::generate().expect("cert");
    (vec![cert.certificate().clone()], cert.private_key())
}

/// A server with this identity on `addr`, hosting Echo answering as `name`.
fn echo_server(
    chain: &[rustls_pki_types::CertificateDer<'static>],
    key: &rustls_pki_types::PrivateKeyDer<'static>,
    name: &str,
    addr: std::net::SocketAddr,
) -> Result<brpc::Server, brpc::server::BindError> {
    brpc::Server::builder()
        .certificate(chain.to_vec(), key.clone_key())
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new(name),
        ))
        .bind(addr)
}

/// A new server on the address of one just closed (with the same dev
/// certificate, which the agents pin). The old socket closes once quinn's
/// endpoint driver has wound down, so binding is retried for up to 5 s.
async fn rebind(
    chain: &[rustls_pki_types::CertificateDer<'static>],
    key: &rustls_pki_types::PrivateKeyDer<'static>,
    addr: std::net::SocketAddr,
) -> brpc::Server {
    let started = tokio::time::Instant::now();
    loop {
        match echo_server(chain, key, "second", addr) {
            Ok(server) => return server,
            Err(e) if started.elapsed() > Duration::from_secs(5) => {
                panic!("cannot bind {addr} again: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn server_has(server: &brpc::Server, n: usize) -> bool {
    server.peers().len() == n
}

#[tokio::test]
async fn keep_alive_keeps_an_idle_agent_connected() {
    let server = brpc::Server::builder()
        .idle_timeout(Duration::from_secs(2))
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let kept = common::client_builder(&server, "kept", EchoService::new("kept"))
        .idle_timeout(Duration::from_secs(2))
        .keep_alive_interval(Some(Duration::from_millis(500)))
        .connect(server.local_addr())
        .await
        .expect("connect");
    let dropped = common::client_builder(&server, "dropped", EchoService::new("dropped"))
        .idle_timeout(Duration::from_secs(2))
        .keep_alive_interval(None)
        .reconnect(false)
        .connect(server.local_addr())
        .await
        .expect("connect");
    let (kept_id, dropped_id) = (kept.connection_id(), dropped.connection_id());
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        server.peers().get(kept_id).is_some(),
        "kept alive for 3x the idle timeout"
    );
    assert_eq!(
        kept.state(),
        ClientState::Connected {
            connection_id: kept_id
        }
    );
    assert!(
        server.peers().get(dropped_id).is_none(),
        "idle agent without keep-alive dropped"
    );
    assert!(
        matches!(dropped.state(), ClientState::Closed { .. }),
        "{:?}",
        dropped.state()
    );
}

#[tokio::test]
async fn an_agent_migrates_to_a_new_local_address_mid_call() {
    let server = common::server();
    let client = common::client(&server, "mover").await;
    let id = client.connection_id();
    let before = server.peers().get(id).expect("listed").remote_address();
    assert_eq!(before.port(), client.local_addr().expect("addr").port());

    let mut echo = EchoClient::new(client.channel());
    let call = tokio::spawn(async move { echo.sleep(SleepRequest { millis: 1500 }).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("new socket");
    let new_port = socket.local_addr().expect("addr").port();
    client.rebind(socket).expect("rebind");

    call.await
        .expect("join")
        .expect("the call in flight completes");
    assert_eq!(client.connection_id(), id);
    assert_eq!(client.state(), ClientState::Connected { connection_id: id });
    let peer = server.peers().get(id).expect("same registry entry");
    eventually(
        Duration::from_secs(5),
        "registry shows the new address",
        || peer.remote_address().port() == new_port,
    )
    .await;
    EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("still works");
}

#[tokio::test]
async fn graceful_shutdown_finishes_calls_in_flight_and_refuses_new_ones() {
    let server = common::server();
    let client = common::client_builder(&server, "agent", EchoService::new("agent"))
        .reconnect_backoff(Duration::from_secs(30), Duration::from_secs(30))
        .connect(server.local_addr())
        .await
        .expect("connect");
    let mut echo = EchoClient::new(client.channel());
    let in_flight = tokio::spawn(async move { echo.sleep(SleepRequest { millis: 1000 }).await });
    eventually(Duration::from_secs(5), "call in flight", || {
        server
            .peers()
            .list()
            .iter()
            .any(|p| p.served_calls_in_flight() == 1)
    })
    .await;

    let shutdown = async {
        server.shutdown(Duration::from_secs(10)).await;
    };
    let after = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        EchoClient::new(client.channel())
            .unary(EchoRequest::default())
            .await
    };
    let ((), refused) = tokio::join!(shutdown, after);
    assert_eq!(
        refused.expect_err("new call during shutdown").code(),
        Code::Unavailable
    );
    in_flight
        .await
        .expect("join")
        .expect("the call in flight finished successfully");
    // The client leaves Connected when the server's GoAway arrives.
    let last_error = first_disconnect(&client).await;
    assert!(last_error.is_going_away(), "{last_error}");
    assert!(
        last_error.to_string().contains("going away"),
        "{last_error}"
    );
}

/// Why `client` left Connected, once it has (it does so on its own task:
/// waited for rather than read once, so a slow machine cannot race it).
async fn first_disconnect(client: &brpc::Client) -> brpc::client::Disconnect {
    let mut state = client.watch_state();
    let state = common::state_becomes(&mut state, Duration::from_secs(10), "left Connected", |s| {
        !matches!(s, ClientState::Connected { .. })
    })
    .await;
    match state {
        ClientState::Reconnecting { last_error, .. } => last_error,
        other => panic!("expected reconnecting, got {other:?}"),
    }
}

#[tokio::test]
async fn wait_for_ready_calls_ride_out_a_restart() {
    let (chain, key) = dev_identity();
    let first =
        echo_server(&chain, &key, "first", "127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = first.local_addr();
    let client = common::client_builder(&first, "patient", EchoService::new("patient"))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .connect(addr)
        .await
        .expect("connect");
    first.close();
    first.wait_idle().await;
    drop(first);
    let mut state = client.watch_state();
    state
        .wait_for(|s| matches!(s, ClientState::Reconnecting { .. }))
        .await
        .expect("watch");

    // Made while disconnected: fails fast by default, waits when asked to.
    let err = EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect_err("fast");
    assert_eq!(err.code(), Code::Unavailable);
    let mut patient = EchoClient::new(client.channel().wait_for_ready(true));
    let waiting = tokio::spawn(async move {
        let mut request = tonic::Request::new(EchoRequest {
            seq: 5,
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(20));
        patient.unary(request).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "waits for a connection");
    let second = rebind(&chain, &key, addr).await;
    let reply = waiting
        .await
        .expect("join")
        .expect("served after the reconnect");
    assert_eq!(reply.into_inner().answered_by, "second");
    drop(second);
}

/// A call waiting for a connection (wait-for-ready) fails at once when the
/// client is closed, rather than waiting out its deadline for a connection
/// that will never come; so does a call made afterwards.
#[tokio::test]
async fn a_closed_client_fails_waiting_calls_at_once() {
    let server = common::server();
    let client = common::client_builder(&server, "closing", EchoService::new("closing"))
        .reconnect_backoff(Duration::from_secs(30), Duration::from_secs(60))
        .connect(server.local_addr())
        .await
        .expect("connect");
    // Gone from the server's side: the client is reconnecting, slowly.
    server
        .peers()
        .get(client.connection_id())
        .expect("listed")
        .close(brpc::core::conn::codes::CONN_NORMAL, "go away");
    let mut state = client.watch_state();
    state
        .wait_for(|s| matches!(s, ClientState::Reconnecting { .. }))
        .await
        .expect("watch");
    let mut patient = EchoClient::new(client.channel().wait_for_ready(true));
    let waiting = tokio::spawn(async move {
        let mut request = tonic::Request::new(EchoRequest::default());
        request.set_timeout(Duration::from_secs(600));
        patient.unary(request).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "waits for a connection");
    client.close();
    let err = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("failed at once, not at its deadline")
        .expect("join")
        .expect_err("no connection will come");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("closed"), "{err:?}");
    let err = EchoClient::new(client.channel().wait_for_ready(true))
        .unary(EchoRequest::default())
        .await
        .expect_err("closed");
    assert_eq!(err.code(), Code::Unavailable);
}

/// A connection closed through the client's own peer handle is a lost
/// connection to the client: it reconnects (it is not the client's close).
#[tokio::test]
async fn a_connection_closed_through_the_peer_handle_is_reconnected() {
    let server = common::server();
    let client = common::client_builder(&server, "handle", EchoService::new("handle"))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .connect(server.local_addr())
        .await
        .expect("connect");
    common::drop_connection_and_reconnect(&client).await;
    EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("served on the new connection");
}

/// `close` landing while a reconnect attempt is failing: the client ends
/// `Closed` for the client's reason, never back to `Reconnecting`. The
/// resolver holds each failing attempt on its thread for a moment, so the
/// close lands inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_during_a_failing_attempt_stays_closed() {
    for round in 0..10 {
        let (entered, mut inside) = tokio::sync::mpsc::unbounded_channel::<()>();
        let client = Client::builder()
            .name("closing")
            .pin_certificate(
                brpc::tls::DevCertificate::generate()
                    .expect("cert")
                    .certificate()
                    .clone(),
            )
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .resolver(move |_| {
                let entered = entered.clone();
                async move {
                    let _ = entered.send(());
                    // Blocks this worker thread, as a slow lookup in a
                    // resolver might: the close runs on the other one.
                    std::thread::sleep(Duration::from_millis(100));
                    Err(std::io::Error::new(std::io::ErrorKind::NotFound, "not yet"))
                }
            })
            .connect_lazy("nowhere.test:4433")
            .await
            .expect("a client at once");
        inside.recv().await.expect("an attempt started");
        client.close();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            matches!(
                client.state(),
                ClientState::Closed {
                    reason: brpc::Disconnect::ClientClosed
                }
            ),
            "round {round}: {:?}",
            client.state()
        );
    }
}

/// A server that closes every connection as soon as it is made is not
/// redialled at the shortest delay for ever: the delays keep growing
/// across reconnects until a connection lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_each_connection_sees_the_backoff_grow() {
    let server = common::server();
    let client = common::client_builder(&server, "flapping", EchoService::new("flapping"))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2))
        .connect(server.local_addr())
        .await
        .expect("connect");
    // From here every connection is closed just after it is made.
    let mut events = server.peers().subscribe();
    let connections = Arc::new(AtomicUsize::new(1));
    let kicker = tokio::spawn({
        let connections = connections.clone();
        async move {
            while let Ok(event) = events.recv().await {
                if let PeerEvent::Connected(peer) = event {
                    connections.fetch_add(1, Ordering::SeqCst);
                    // A moment after it is made: the client has it, and
                    // loses it (rather than failing to make it).
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        peer.close(brpc::core::conn::codes::CONN_NORMAL, "not now");
                    });
                }
            }
        }
    });
    server
        .peers()
        .get(client.connection_id())
        .expect("listed")
        .close(brpc::core::conn::codes::CONN_NORMAL, "not now");
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.close();
    let made = connections.load(Ordering::SeqCst);
    // 50, 100, 200, 400, 800 and 1600 ms (and up to as much again in
    // jitter) come to over 3 s: at most 7 connections. At the shortest
    // delay each time there would be 20 or more.
    assert!((2..=7).contains(&made), "{made} connections in 3 s");
    kicker.abort();
}

/// A client let in just as a graceful shutdown begins (after the shutdown
/// took its list of peers to drain) is refused like one arriving after it,
/// not served un-drained. Its admission is held inside `authorize` until
/// the shutdown is under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_let_in_as_shutdown_begins_is_refused() {
    let (entered, mut inside) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let held = std::sync::Mutex::new(held);
    let server = Arc::new(
        brpc::Server::builder()
            .add_service(common::echo::echo_server::EchoServer::new(
                EchoService::new("server"),
            ))
            .authorize(move |admission| {
                if admission.name == "late" {
                    let _ = entered.send(());
                    // Off the runtime's worker: the other tasks move on.
                    tokio::task::block_in_place(|| {
                        let _ = held
                            .lock()
                            .expect("lock")
                            .recv_timeout(Duration::from_secs(20));
                    });
                }
                Ok(())
            })
            .bind("127.0.0.1:0")
            .expect("bind"),
    );
    // A call in flight keeps the shutdown draining while the late client
    // is let in (until the test lets it go).
    let first = common::client(&server, "first").await;
    let running = tokio::spawn({
        let mut echo = EchoClient::new(first.channel());
        async move { echo.sleep(SleepRequest { millis: 60_000 }).await }
    });
    let late = tokio::spawn(
        common::client_builder(&server, "late", EchoService::new("late"))
            .connect(server.local_addr()),
    );
    inside
        .recv()
        .await
        .expect("the late client is being admitted");
    let shutdown = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown(Duration::from_secs(60)).await }
    });
    eventually(
        Duration::from_secs(10),
        "the first client told to go away",
        || {
            first.peer().is_some_and(|p| p.is_going_away())
                || matches!(first.state(), ClientState::Reconnecting { .. })
        },
    )
    .await;
    release.send(()).expect("release");
    // As a client arriving after the shutdown began is refused: by the Hello
    // answer, or by the connection close that follows it once the answer was
    // acknowledged, when the close reaches the client before its Hello
    // answer is read (seen under CI's load; QUIC then ends the stream too).
    let refused = late.await.expect("join").expect_err("refused");
    assert!(
        matches!(
            &refused,
            brpc::ConnectError::Hello(status)
                if status.code() == Code::Unavailable && status.message().contains("shutting down")
        ) || matches!(
            &refused,
            brpc::ConnectError::Refused { code, reason }
                if *code == brpc::core::conn::codes::CONN_GOING_AWAY
                    && reason.contains("shutting down")
        ),
        "{refused:?}"
    );
    // The call holding the shutdown open is dropped: the shutdown ends.
    running.abort();
    tokio::time::timeout(Duration::from_secs(20), shutdown)
        .await
        .expect("the shutdown ended once drained")
        .expect("join");
}

/// A broadcast result's `elapsed` is how long its call took, not how long
/// the caller took to read it: a caller that dawdles over the first result
/// does not stretch the second's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_results_elapsed_is_its_calls_own_time() {
    let server = common::server();
    let builders = (0..2)
        .map(|i| common::client_builder(&server, &format!("quick-{i}"), EchoService::new("quick")))
        .collect();
    let _agents = connect_all(builders, server.local_addr()).await;
    let options = BroadcastOptions {
        concurrency: 2,
        timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let mut results = Box::pin(broadcast(
        server.peers().list(),
        options,
        |peer| async move {
            peer.client(EchoClient::new)
                .unary(EchoRequest::default())
                .await?;
            Ok(())
        },
    ));
    let first = results.next().await.expect("a first result");
    first.result.expect("answered");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = results.next().await.expect("a second result");
    second.result.expect("answered");
    assert!(
        second.elapsed < Duration::from_secs(3),
        "the second call's own time, not the wait to read it: {:?}",
        second.elapsed
    );
}

/// A client turned away at the connection limit holds its handshake slot
/// no longer than the Hello limit (here 1 s, under the 5 s it may take
/// otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turned_away_handshake_holds_its_slot_no_longer_than_the_hello_limit() {
    let server = admin_builder(1)
        .max_connections(1)
        .hello_timeout(Duration::from_secs(1))
        .bind("127.0.0.1:0")
        .expect("bind");
    let first = common::client(&server, "first").await;
    let stalled_at = tokio::time::Instant::now();
    let (_relay, over) = stalled_handshake(&server).await;
    assert_eq!(server.admission_stats().turned_away, 1);
    loop {
        let stats = admin_stats(&first).await;
        if stats.handshakes_in_progress == 0 {
            break;
        }
        assert!(
            stalled_at.elapsed() < Duration::from_millis(4500),
            "the slot still held: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    over.abort();
}

/// A connection the server sent away (GoAway) keeps serving its calls in
/// flight while the client reconnects; closing the client closes it too,
/// and the call it was serving ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_client_closes_the_connection_the_server_sent_away() {
    let server = common::server();
    let (client, old, probe) = common::probed_client(&server, "sent-away").await;
    let first = client.connection_id();
    let call = tokio::spawn({
        let mut echo = EchoClient::new(old.channel());
        async move { echo.sleep(SleepRequest { millis: 60_000 }).await }
    });
    eventually(
        Duration::from_secs(10),
        "the call reached the client",
        || probe.in_flight.load(Ordering::SeqCst) == 1,
    )
    .await;
    brpc::core::session::send_goaway(&old, "moving you")
        .await
        .expect("goaway delivered");
    common::reconnected(&client, first).await;
    assert_eq!(
        probe.in_flight.load(Ordering::SeqCst),
        1,
        "still serving the old call"
    );

    client.close();
    let ended = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the old connection's call ended")
        .expect("join");
    assert!(ended.is_err(), "{ended:?}");
    tokio::time::timeout(Duration::from_secs(10), old.closed())
        .await
        .expect("the old connection closed");
    eventually(
        Duration::from_secs(10),
        "the client's handler dropped",
        || probe.dropped.load(Ordering::SeqCst) == 1,
    )
    .await;
}

/// A client that does not reconnect, sent away (GoAway), lets the calls in
/// flight on that connection finish, as GoAway promises: only the
/// application's own close cuts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_reconnect_finishes_its_calls_after_goaway() {
    let server = common::server();
    let echo = EchoService::new("once");
    let probe = echo.probe.clone();
    let client = common::client_builder(&server, "once", echo)
        .reconnect(false)
        .connect(server.local_addr())
        .await
        .expect("connect");
    let peer = server.peers().get(client.connection_id()).expect("listed");
    let call = tokio::spawn({
        let mut echo = EchoClient::new(peer.channel());
        async move { echo.sleep(SleepRequest { millis: 1_000 }).await }
    });
    eventually(
        Duration::from_secs(10),
        "the call reached the client",
        || probe.in_flight.load(Ordering::SeqCst) == 1,
    )
    .await;
    brpc::core::session::send_goaway(&peer, "moving you")
        .await
        .expect("goaway delivered");
    let reply = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("in time")
        .expect("join");
    assert!(reply.is_ok(), "the call in flight finished: {reply:?}");
    assert!(
        matches!(client.state(), ClientState::Closed { .. }),
        "{:?}",
        client.state()
    );
}

/// A shutdown given up before it finished (a timeout around it) still
/// closes the client: it is not left refusing the server's calls while
/// connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_given_up_midway_still_closes_the_client() {
    let server = common::server();
    let (client, peer, probe) = common::probed_client(&server, "impatient").await;
    let call = tokio::spawn({
        let mut echo = EchoClient::new(peer.channel());
        async move { echo.sleep(SleepRequest { millis: 60_000 }).await }
    });
    eventually(
        Duration::from_secs(10),
        "the call reached the client",
        || probe.in_flight.load(Ordering::SeqCst) == 1,
    )
    .await;
    let given_up = tokio::time::timeout(
        Duration::from_millis(200),
        client.shutdown(Duration::from_secs(30)),
    )
    .await;
    assert!(given_up.is_err(), "the shutdown was still draining");
    assert!(
        matches!(
            client.state(),
            ClientState::Closed {
                reason: brpc::Disconnect::ClientClosed
            }
        ),
        "{:?}",
        client.state()
    );
    tokio::time::timeout(Duration::from_secs(10), peer.closed())
        .await
        .expect("the connection closed");
    let ended = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ended")
        .expect("join");
    assert!(ended.is_err(), "{ended:?}");
}

#[tokio::test]
async fn a_client_shutdown_drains_the_calls_it_serves() {
    let server = common::server();
    let client = common::client(&server, "draining").await;
    let peer = server.peers().get(client.connection_id()).expect("listed");
    let mut to_client = peer.client(EchoClient::new);
    let in_flight =
        tokio::spawn(async move { to_client.sleep(SleepRequest { millis: 700 }).await });
    eventually(Duration::from_secs(5), "served call running", || {
        peer.calls_in_flight() == 1
    })
    .await;
    let shutdown = async { client.shutdown(Duration::from_secs(10)).await };
    let refused = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peer.client(EchoClient::new)
            .unary(EchoRequest::default())
            .await
    };
    let ((), refused) = tokio::join!(shutdown, refused);
    assert_eq!(
        refused.expect_err("client is going away").code(),
        Code::Unavailable
    );
    in_flight
        .await
        .expect("join")
        .expect("the served call finished");
    assert!(matches!(client.state(), ClientState::Closed { .. }));
}

/// An agent started before its server: `connect_with_retry` waits for the
/// server to appear; `connect_lazy` returns at once and connects in the
/// background; a plain `connect` times out with an error naming the address
/// and what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_its_server_connects_once_it_appears() {
    let addr = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("free port");
        probe.local_addr().expect("addr")
    };
    let certificate = brpc::tls::DevCertificate::generate().expect("certificate");
    let agent = |name: &str| {
        Client::builder()
            .name(name)
            .pin_certificate(certificate.certificate().clone())
            .connect_timeout(Duration::from_millis(500))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
    };
    let err = agent("plain")
        .connect(addr)
        .await
        .expect_err("nobody there yet");
    let message = err.to_string();
    assert!(
        message.contains(&addr.to_string()) && message.contains("UDP"),
        "{message}"
    );

    let waiting = tokio::spawn(agent("patient").connect_with_retry(addr));
    let lazy = agent("lazy").connect_lazy(addr).await.expect("lazy client");
    assert!(matches!(lazy.state(), ClientState::Reconnecting { .. }));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "no server yet");

    let server = brpc::Server::builder()
        .dev_certificate(certificate.clone())
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind(addr)
        .expect("bind the awaited address");
    let patient = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("connected once the server appeared")
        .expect("join")
        .expect("connect_with_retry");
    common::connected(&lazy).await;
    for client in [&patient, &lazy] {
        let reply = EchoClient::new(client.channel())
            .unary(EchoRequest {
                text: "here".into(),
                ..Default::default()
            })
            .await
            .expect("call");
        assert_eq!(reply.into_inner().text, "here");
        assert!(server.peers().get(client.connection_id()).is_some());
    }
}

/// A resolver that knows no address until one is set, counting lookups.
#[derive(Clone, Default)]
struct Names {
    address: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    lookups: Arc<AtomicUsize>,
}

impl Names {
    fn set(&self, address: std::net::SocketAddr) {
        *self.address.lock().expect("lock") = Some(address);
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }

    fn resolver(
        &self,
    ) -> impl Fn(String) -> std::future::Ready<std::io::Result<Vec<std::net::SocketAddr>>>
    + Send
    + Sync
    + 'static {
        let names = self.clone();
        move |name: String| {
            names.lookups.fetch_add(1, Ordering::SeqCst);
            assert_eq!(name, "control-plane.test:4433", "the address as given");
            std::future::ready(match *names.address.lock().expect("lock") {
                Some(address) => Ok(vec![address]),
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "control-plane.test not registered yet",
                )),
            })
        }
    }
}

fn named_server(
    chain: &[rustls_pki_types::CertificateDer<'static>],
    key: &rustls_pki_types::PrivateKeyDer<'static>,
    answers_as: &str,
) -> brpc::Server {
    brpc::Server::builder()
        .certificate(chain.to_vec(), key.clone_key())
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new(answers_as),
        ))
        .bind("127.0.0.1:0")
        .expect("bind")
}

/// A client by the name `control-plane.test:4433`, whose
/// lookups answer `answers(n)` for the n-th lookup (counting from 0).
async fn client_by_name<F, Fut>(cert: &brpc::tls::DevCertificate, answers: F) -> Client
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<Vec<std::net::SocketAddr>>> + Send + 'static,
{
    let lookups = Arc::new(AtomicUsize::new(0));
    Client::builder()
        .name("by-name")
        .pin_certificate(cert.certificate().clone())
        .server_name("localhost")
        .connect_timeout(Duration::from_secs(1))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .resolver(move |_| answers(lookups.fetch_add(1, Ordering::SeqCst)))
        .connect("control-plane.test:4433")
        .await
        .expect("connect by name")
}

/// A lookup that never answers does not hold up reconnecting: after the
/// attempt's time it gives up on the lookup and dials the last address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_never_answers_does_not_stop_the_reconnect() {
    let cert = brpc::tls::DevCertificate::generate().expect("cert");
    let (chain, key) = (vec![cert.certificate().clone()], cert.private_key());
    let server = named_server(&chain, &key, "server");
    let at = server.local_addr();
    let client = client_by_name(&cert, move |n| async move {
        if n > 0 {
            std::future::pending::<()>().await;
        }
        Ok(vec![at])
    })
    .await;
    // Reconnected to the last address.
    common::drop_connection_and_reconnect(&client).await;
}

/// A name that comes to list an IPv6 address first is dialled at its
/// first address the client's IPv4 socket can reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_listing_ipv6_first_is_dialled_at_its_ipv4_address() {
    let cert = brpc::tls::DevCertificate::generate().expect("cert");
    let (chain, key) = (vec![cert.certificate().clone()], cert.private_key());
    let server = named_server(&chain, &key, "server");
    let at = server.local_addr();
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, at.port()));
    let client = client_by_name(&cert, move |n| async move {
        Ok(if n == 0 { vec![at] } else { vec![v6, at] })
    })
    .await;
    // Reconnected, not closed for good.
    common::drop_connection_and_reconnect(&client).await;
}

async fn answered_by(client: &Client) -> String {
    EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("call")
        .into_inner()
        .answered_by
}

/// An agent whose server's name does not resolve yet (the name is not
/// published, the network is not up): `connect` says so at once,
/// `connect_with_retry` keeps looking it up with its backoff and connects
/// once it resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_retry_waits_for_a_name_that_does_not_resolve_yet() {
    let cert = brpc::tls::DevCertificate::generate().expect("cert");
    let (chain, key) = (vec![cert.certificate().clone()], cert.private_key());
    let server = named_server(&chain, &key, "server");
    let names = Names::default();
    let agent = || {
        Client::builder()
            .name("agent")
            .pin_certificate(cert.certificate().clone())
            .server_name("localhost")
            .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .resolver(names.resolver())
    };

    let err = agent()
        .connect("control-plane.test:4433")
        .await
        .expect_err("no address yet");
    assert!(
        matches!(err, brpc::client::ConnectError::Resolve { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("control-plane.test:4433"), "{err}");

    let before = names.lookups();
    let waiting = tokio::spawn(agent().connect_with_retry("control-plane.test:4433"));
    eventually(Duration::from_secs(20), "looked up again", || {
        names.lookups() >= before + 3
    })
    .await;
    assert!(!waiting.is_finished(), "retrying, not given up");

    // An address no lookup can complete (no port) is not waited for.
    let err = tokio::time::timeout(
        Duration::from_secs(2),
        Client::builder()
            .pin_certificate(cert.certificate().clone())
            .connect_with_retry("localhost"),
    )
    .await
    .expect("returned at once")
    .expect_err("no port");
    assert!(
        matches!(err, brpc::client::ConnectError::Resolve { .. }),
        "{err:?}"
    );

    names.set(server.local_addr());
    let client = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("connected once the name resolved")
        .expect("join")
        .expect("connect_with_retry");
    assert_eq!(answered_by(&client).await, "server");
}

/// `connect_lazy` with a server name that does not resolve yet returns a
/// client at once, which looks the name up before each attempt and
/// connects once it resolves (its socket bound to `[::]`, reaching the
/// IPv4 server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_lazy_waits_for_a_name_that_does_not_resolve_yet() {
    let cert = brpc::tls::DevCertificate::generate().expect("cert");
    let (chain, key) = (vec![cert.certificate().clone()], cert.private_key());
    let server = named_server(&chain, &key, "server");
    let names = Names::default();
    let client = Client::builder()
        .name("lazy")
        .pin_certificate(cert.certificate().clone())
        .server_name("localhost")
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .resolver(names.resolver())
        .connect_lazy("control-plane.test:4433")
        .await
        .expect("a client at once");
    assert!(
        matches!(client.state(), ClientState::Reconnecting { .. }),
        "{:?}",
        client.state()
    );
    eventually(Duration::from_secs(20), "looked up again", || {
        names.lookups() >= 3
    })
    .await;
    let err = EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect_err("not connected yet");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    names.set(server.local_addr());
    common::connected(&client).await;
    assert_eq!(answered_by(&client).await, "server");
}

/// A reconnect looks the server's name up again: an agent whose name was
/// moved to another server follows it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_follows_the_servers_name_to_its_new_address() {
    let cert = brpc::tls::DevCertificate::generate().expect("cert");
    let (chain, key) = (vec![cert.certificate().clone()], cert.private_key());
    let first = named_server(&chain, &key, "first");
    let second = named_server(&chain, &key, "second");
    let names = Names::default();
    names.set(first.local_addr());
    let client = Client::builder()
        .name("agent")
        .pin_certificate(cert.certificate().clone())
        .server_name("localhost")
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .resolver(names.resolver())
        .connect("control-plane.test:4433")
        .await
        .expect("connect");
    assert_eq!(answered_by(&client).await, "first");

    names.set(second.local_addr());
    first.close();
    first.wait_idle().await;
    drop(first);
    eventually(Duration::from_secs(20), "back, at the new address", || {
        second.peers().len() == 1
    })
    .await;
    common::connected(&client).await;
    assert_eq!(answered_by(&client).await, "second");
}

/// Picking agents by label: a label channel round-robins over the matching
/// agents, fails fast or waits (up to the call's deadline) when none is
/// connected, and `wait_for_labels` awaits one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_channel_round_robins_and_waits_for_a_matching_agent() {
    let server = common::server();
    let agent = |name: &str, role: &str| {
        common::client_builder(&server, name, EchoService::new(name))
            .label("role", role)
            .connect(server.local_addr())
    };
    let _db1 = agent("db-1", "db").await.expect("connect");
    let _db2 = agent("db-2", "db").await.expect("connect");
    let _web = agent("web-1", "web").await.expect("connect");
    let ask = |channel: brpc::LabelChannel, timeout: Option<Duration>| async move {
        let mut request = tonic::Request::new(EchoRequest::default());
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        EchoClient::new(channel)
            .unary(request)
            .await
            .map(|r| r.into_inner().answered_by)
    };
    let db = server.peers().label_channel([("role", "db")]);
    let mut answered = Vec::new();
    for _ in 0..4 {
        answered.push(ask(db.clone(), None).await.expect("db call"));
    }
    answered.sort();
    assert_eq!(answered, ["db-1", "db-1", "db-2", "db-2"], "round-robin");

    let cache = server.peers().label_channel([("role", "cache")]);
    let err = ask(cache.clone(), None).await.expect_err("no cache agent");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = ask(
        cache.clone().wait_for_ready(true),
        Some(Duration::from_millis(200)),
    )
    .await
    .expect_err("none within the deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    let waiting = tokio::spawn(ask(
        cache.clone().wait_for_ready(true),
        Some(Duration::from_secs(20)),
    ));
    let awaited = {
        let peers = server.peers().clone();
        tokio::spawn(async move { peers.wait_for_labels([("role", "cache")]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished() && !awaited.is_finished());
    let cache_agent = agent("cache-1", "cache").await.expect("connect");
    let answer = waiting.await.expect("join").expect("waited for the agent");
    assert_eq!(answer, "cache-1");
    let peer = awaited.await.expect("join");
    assert_eq!(peer.connection_id(), cache_agent.connection_id());
}

/// tonic's idiom: serve until a signal, then shut down gracefully; the
/// agents' disconnect events say so in words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_shutdown_stops_on_the_signal_with_a_readable_reason() {
    let server = std::sync::Arc::new(common::server());
    let agent = common::client(&server, "agent").await;
    let mut events = server.peers().subscribe();
    let (stop, signal) = tokio::sync::oneshot::channel::<()>();
    let serving = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .serve_with_shutdown(
                    async {
                        let _ = signal.await;
                    },
                    Duration::from_secs(2),
                )
                .await;
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!serving.is_finished(), "serving until the signal");
    stop.send(()).expect("signal");
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("shut down in time")
        .expect("join");
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Ok(PeerEvent::Disconnected { peer, reason }))
                if peer.connection_id() == agent.connection_id() =>
            {
                break reason;
            }
            Ok(Ok(_)) => {}
            other => panic!("no disconnect event: {other:?}"),
        }
    };
    assert!(reason.is_going_away() && reason.is_local(), "{reason}");
    assert_eq!(
        reason.to_string(),
        "the server closed the connection (going away, code 0x1): server shutting down"
    );
}

/// The admin token of [`bounded_server`]s.
const ADMIN_TOKEN: &str = "fleet-admin";

/// A server with `max_handshakes` and `hello_timeout`, hosting Echo, its
/// admin service open to [`ADMIN_TOKEN`].
fn bounded_server(max_handshakes: usize, hello_timeout: Duration) -> brpc::Server {
    admin_builder(max_handshakes)
        .hello_timeout(hello_timeout)
        .bind("127.0.0.1:0")
        .expect("bind")
}

/// A server hosting Echo and the admin service, at most `max_handshakes`
/// handshakes at a time.
fn admin_builder(max_handshakes: usize) -> brpc::server::Builder {
    brpc::Server::builder()
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .admin(brpc::server::AdminAccess::new().token(ADMIN_TOKEN))
        .max_handshakes(max_handshakes)
}

/// The server's answer to `brpc.admin.v1.Admin/Stats`, asked by `client`.
async fn admin_stats(client: &Client) -> brpc::server::admin::StatsResponse {
    use brpc::server::admin::{ADMIN_SERVICE, StatsRequest};
    let mut request = tonic::Request::new(StatsRequest {});
    request.metadata_mut().insert(
        brpc::server::admin::ADMIN_TOKEN,
        ADMIN_TOKEN.parse().expect("a metadata value"),
    );
    client
        .channel()
        .unary(request, ADMIN_SERVICE, "Stats")
        .await
        .expect("Stats answered")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_past_the_handshake_bound_wait_their_turn() {
    // Two handshakes at a time, thirty clients at once: each waits its
    // turn (up to 128 may wait) and all are admitted.
    const N: usize = 30;
    let server = bounded_server(2, Duration::from_secs(20));
    let builders = (0..N).map(|i| agent_builder(&server, i, false)).collect();
    let agents = connect_all(builders, server.local_addr()).await;
    assert_eq!(server.peers().len(), N);
    for agent in &agents {
        let reply = EchoClient::new(agent.channel())
            .unary(EchoRequest::default())
            .await
            .expect("admitted agent calls");
        assert_eq!(reply.into_inner().answered_by, "server");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_bound_waits_until_the_handshake_ahead_of_it_ends() {
    // One handshake slot, held by a handshake whose client datagrams are
    // lost after the first; a long Hello limit, so nobody times out.
    let server = bounded_server(1, Duration::from_secs(60));
    let relay = common::relay::Relay::start(server.local_addr()).await;
    relay.pass_from_client(1);
    let stalled = tokio::spawn(
        common::client_builder(&server, "stalled", EchoService::new("stalled"))
            .connect_timeout(Duration::from_secs(60))
            .connect(relay.addr()),
    );
    eventually(
        Duration::from_secs(10),
        "server answered the stalled Initial",
        || relay.forwarded_from_server() > 0,
    )
    .await;

    // The next client is queued by the server, not handshaken, not refused.
    let late = tokio::spawn(
        common::client_builder(&server, "late", EchoService::new("late"))
            .connect_timeout(Duration::from_secs(60))
            .connect(server.local_addr()),
    );
    eventually(Duration::from_secs(10), "late client queued", || {
        server.handshakes_waiting() == 1
    })
    .await;
    assert!(!late.is_finished() && !stalled.is_finished());
    assert_eq!(server.peers().len(), 0);

    // The stalled handshake goes through; then the queued one gets the slot.
    relay.pass_from_client(usize::MAX);
    let stalled = stalled
        .await
        .expect("join")
        .expect("stalled client admitted");
    let late = late.await.expect("join").expect("queued client admitted");
    assert_eq!(server.handshakes_waiting(), 0);
    assert_eq!(server.peers().len(), 2);
    let stats = server.admission_stats();
    assert_eq!(
        (stats.handshakes_started, stats.admitted),
        (2, 2),
        "{stats:?}"
    );
    assert_eq!(
        stats.refused_queue_full + stats.refused_after_waiting + stats.handshakes_timed_out,
        0,
        "{stats:?}"
    );
    for client in [&stalled, &late] {
        let reply = EchoClient::new(client.channel())
            .unary(EchoRequest::default())
            .await
            .expect("admitted client served");
        assert_eq!(reply.into_inner().answered_by, "server");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_holds_its_slot_and_later_clients_are_refused_not_starved() {
    let server = bounded_server(1, Duration::from_secs(4));
    let early = common::client(&server, "early").await;

    // A handshake the server starts and the client never finishes (its
    // datagrams after the first are lost) holds the one slot until the
    // Hello limit.
    let relay = common::relay::Relay::start(server.local_addr()).await;
    relay.pass_from_client(1);
    let stalled = common::client_builder(&server, "stalled", EchoService::new("stalled"))
        .connect_timeout(Duration::from_secs(30))
        .connect(relay.addr());
    let stalled = tokio::spawn(stalled);
    eventually(
        Duration::from_secs(10),
        "server answered the stalled Initial",
        || relay.forwarded_from_server() > 0,
    )
    .await;

    // The admin service sees the one slot held.
    let stats = admin_stats(&early).await;
    assert_eq!(stats.handshakes_in_progress, 1, "{stats:?}");
    assert_eq!(stats.connected, 1, "{stats:?}");

    // The next client waits half the Hello limit for the slot, then is
    // refused without a handshake and told why.
    let started = tokio::time::Instant::now();
    let late = common::client_builder(&server, "late", EchoService::new("late"))
        .connect_timeout(Duration::from_secs(30))
        .connect(server.local_addr());
    let late = tokio::spawn(late);
    eventually(Duration::from_secs(10), "the late client queued", || {
        server.handshakes_waiting() == 1
    })
    .await;
    let stats = admin_stats(&early).await;
    assert_eq!(
        (stats.handshakes_in_progress, stats.handshakes_waiting),
        (1, 1),
        "{stats:?}"
    );
    let refused = match late.await.expect("late client task") {
        Ok(_) => panic!("admitted while the one slot is held"),
        Err(e) => e,
    };
    let waited = started.elapsed();
    assert!(
        matches!(refused, brpc::client::ConnectError::Busy(_)),
        "{refused:?}"
    );
    let message = refused.to_string();
    assert!(message.contains("busy"), "{message}");
    assert!(
        waited >= Duration::from_millis(1500),
        "refused after {waited:?}"
    );

    // Already admitted agents are served meanwhile.
    let reply = EchoClient::new(early.channel())
        .unary(EchoRequest::default())
        .await
        .expect("admitted client served");
    assert_eq!(reply.into_inner().answered_by, "server");

    // Once the stalled handshake times out, the slot is free again.
    let after = common::client_builder(&server, "after", EchoService::new("after"))
        .connect_timeout(Duration::from_secs(30))
        .connect_with_retry(server.local_addr())
        .await
        .expect("admitted once the slot is free");
    assert!(after.connection_id() != early.connection_id());
    stalled.abort();
    // Counted: the late client's refusal (one or more: `after` may have been
    // refused too while the slot was still held), the stalled handshake's
    // timeout, and the two admitted.
    let stats = server.admission_stats();
    assert!(stats.refused_after_waiting >= 1, "{stats:?}");
    assert_eq!(
        (
            stats.handshakes_timed_out,
            stats.admitted,
            stats.handshakes_started
        ),
        (1, 2, 3),
        "{stats:?}"
    );
}

/// A server of one connection, with the admin service, at most
/// `max_handshakes` handshakes at a time.
fn server_of_one(max_handshakes: usize) -> brpc::Server {
    admin_builder(max_handshakes)
        .max_connections(1)
        .bind("127.0.0.1:0")
        .expect("bind")
}

/// A client whose handshake the server starts and that never finishes it
/// (its datagrams after the first are lost): it holds a handshake slot
/// until the server gives up on it (over the connection limit, the server
/// holds it up to 5 s to tell the client why).
async fn stalled_handshake(
    server: &brpc::Server,
) -> (common::relay::Relay, tokio::task::JoinHandle<()>) {
    let relay = common::relay::Relay::start(server.local_addr()).await;
    relay.pass_from_client(1);
    let connecting = common::client_builder(server, "over", EchoService::new("over"))
        .connect_timeout(Duration::from_secs(30))
        .connect(relay.addr());
    let task = tokio::spawn(async move {
        let _ = connecting.await;
    });
    eventually(
        Duration::from_secs(10),
        "server answered the stalled Initial",
        || relay.forwarded_from_server() > 0,
    )
    .await;
    (relay, task)
}

/// A client turned away at the connection limit is not counted against it:
/// while its handshake is still held (to tell it why), a client arriving
/// after the connected one left is let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_turned_away_does_not_count_against_the_connection_limit() {
    let server = server_of_one(8);
    let first = common::client(&server, "first").await;
    let (_relay, over) = stalled_handshake(&server).await;
    assert_eq!(server.admission_stats().turned_away, 1);

    first.close();
    eventually(Duration::from_secs(10), "the first client gone", || {
        server.peers().is_empty()
    })
    .await;
    // The first client's place is given back when its connection task ends,
    // a moment after it leaves the registry: a refusal in that moment is
    // tried again.
    let tried = tokio::time::Instant::now();
    let next = loop {
        match common::client_builder(&server, "next", EchoService::new("next"))
            .connect(server.local_addr())
            .await
        {
            Ok(client) => break client,
            Err(brpc::ConnectError::Refused { code, .. })
                if code == brpc::core::conn::codes::CONN_TOO_MANY
                    && tried.elapsed() < Duration::from_secs(2) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the next client refused: {e}"),
        }
    };
    // Let in while the turned-away handshake still holds its slot.
    let stats = admin_stats(&next).await;
    assert_eq!(
        (stats.connected, stats.handshakes_in_progress),
        (1, 1),
        "{stats:?}"
    );
    over.abort();
}

/// A turned-away client's handshake takes a handshake slot like any other:
/// with the one slot held by one, the next client over the limit is refused
/// at once (busy), not given a handshake of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_turned_away_takes_a_handshake_slot() {
    let server = server_of_one(1);
    let first = common::client(&server, "first").await;
    let (_relay, over) = stalled_handshake(&server).await;
    let refused = common::client_builder(&server, "another", EchoService::new("another"))
        .connect(server.local_addr())
        .await
        .expect_err("no room");
    assert!(
        matches!(refused, brpc::ConnectError::Busy(_)),
        "refused for want of a handshake slot: {refused:?}"
    );
    let stats = server.admission_stats();
    assert_eq!(
        (stats.turned_away, stats.refused_queue_full),
        (1, 1),
        "{stats:?}"
    );
    let stats = admin_stats(&first).await;
    assert_eq!(stats.handshakes_in_progress, 1, "{stats:?}");
    over.abort();
}

/// The Hello limit runs from a client's arrival, its wait for a handshake
/// slot included: a client that waited most of half the limit for its
/// slot and then sends no Hello is closed that much sooner after its
/// handshake than the whole limit.
///
/// The limit is long so that each bound below has seconds of margin for a
/// loaded machine: the two ways of counting differ by about 5.7 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hello_limit_counts_from_arrival_the_wait_for_a_slot_included() {
    const LIMIT: Duration = Duration::from_secs(12);
    let server = bounded_server(1, LIMIT);
    // The one slot held by a handshake that never finishes: until its own
    // Hello limit, 12 s after it arrived (at most, since it arrived before
    // `stalled_at`).
    let (_relay, stalled) = stalled_handshake(&server).await;
    let stalled_at = tokio::time::Instant::now();
    // A client arriving just over half the limit later waits a little under
    // half the limit (5.7 s) for the slot, gets it, and sends no Hello.
    tokio::time::sleep_until(stalled_at + LIMIT / 2 + Duration::from_millis(300)).await;
    let silent = common::raw_connection(&server).await;
    let handshaken = tokio::time::Instant::now();
    // Without the wait it would have had its handshake about 6.3 s in.
    assert!(
        handshaken >= stalled_at + LIMIT - Duration::from_secs(3),
        "the handshake waited for the stalled one's slot: {:?}",
        handshaken - stalled_at
    );
    common::closed_with(&silent, brpc::core::conn::codes::CONN_HELLO_TIMEOUT).await;
    let after = handshaken.elapsed();
    // From arrival: about 6.3 s after the handshake; counted from the
    // handshake it would have been the whole 12 s.
    assert!(
        after < LIMIT - Duration::from_secs(3),
        "closed {after:?} after its handshake"
    );
    stalled.abort();
}

/// A QUIC endpoint that refuses every handshake with CONNECTION_REFUSED,
/// as a brpc server does when more clients wait for a handshake than it
/// queues: its address, its certificate, when each attempt arrived, and its
/// task.
fn refusing_endpoint() -> (
    std::net::SocketAddr,
    brpc::tls::DevCertificate,
    Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
    tokio::task::JoinHandle<()>,
) {
    let certificate = brpc::tls::DevCertificate::generate().expect("dev certificate");
    let crypto = brpc::tls::server_crypto(
        vec![certificate.certificate().clone()],
        certificate.private_key(),
    )
    .expect("server crypto");
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(crypto),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .expect("endpoint");
    let addr = endpoint.local_addr().expect("address");
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let refusing = tokio::spawn({
        let arrivals = arrivals.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                arrivals
                    .lock()
                    .expect("lock")
                    .push(tokio::time::Instant::now());
                incoming.refuse();
            }
        }
    });
    (addr, certificate, arrivals, refusing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refused_for_load_waits_its_busy_backoff_before_trying_again() {
    let (addr, certificate, arrivals, refusing) = refusing_endpoint();

    // Reconnect backoff 10 ms, busy backoff 700 ms: a refused client waits
    // the busy one.
    const BUSY: Duration = Duration::from_millis(700);
    let client = Client::builder()
        .pin_certificate(certificate.certificate().clone())
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .busy_backoff(BUSY, BUSY)
        .connect_lazy(addr)
        .await
        .expect("client");
    eventually(Duration::from_secs(30), "three attempts refused", || {
        arrivals.lock().expect("lock").len() >= 3
    })
    .await;
    let arrivals = arrivals.lock().expect("lock").clone();
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= BUSY, "attempts {gap:?} apart: {arrivals:?}");
    }
    match &*client.watch_state().borrow() {
        ClientState::Reconnecting { last_error, .. } => assert!(
            matches!(
                last_error.connect_error(),
                Some(brpc::client::ConnectError::Busy(_))
            ),
            "{last_error:?}"
        ),
        other => panic!("not reconnecting: {other:?}"),
    }
    refusing.abort();
}

/// With several servers, a server refusing for load passes the client on to
/// the next one at once: the busy backoff (a minute here) waits only after
/// every server failed in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_passes_a_reconnecting_client_on_to_the_next_at_once() {
    let (busy, _certificate, arrivals, refusing) = refusing_endpoint();
    let server = common::server();
    let client = common::client_builder(&server, "failover", EchoService::new("failover"))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .busy_backoff(Duration::from_secs(60), Duration::from_secs(60))
        .connect_any([busy.to_string(), server.local_addr().to_string()])
        .await
        .expect("connected through the second server");
    assert_eq!(
        arrivals.lock().expect("lock").len(),
        1,
        "the busy one first"
    );

    // The connection is lost: the first attempt goes to the next server in
    // turn, the busy one, and the one after to the server that serves.
    common::drop_connection_and_reconnect(&client).await;
    assert_eq!(
        arrivals.lock().expect("lock").len(),
        2,
        "the busy server was tried once on the way"
    );
    EchoClient::new(client.channel())
        .unary(EchoRequest::default())
        .await
        .expect("served after the failover");
    refusing.abort();
}

/// A client reconnecting while its server shuts down gracefully (refusing
/// new connections for as long as its calls take, as a busy server does)
/// comes back soon after the replacement starts: after the server's GoAway
/// its first busy delays double (1-2 s, 2-4 s, ...) rather than grow
/// fifteen-fold (1-2 s, then 15-30 s), so a shutdown longer than its first
/// delay does not hold it away for 15 s more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_comes_back_soon_after_a_long_graceful_shutdown() {
    let (chain, key) = dev_identity();
    let first =
        echo_server(&chain, &key, "first", "127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = first.local_addr();
    let client = common::client_builder(&first, "patient", EchoService::new("patient"))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300))
        .connect(addr)
        .await
        .expect("connect");
    let before = client.connection_id();
    // A call in flight holds the shutdown open for its whole grace, 3.5 s:
    // longer than the first busy delay's 2 s at most, by a margin for a
    // GoAway that arrives late under load, so the client is refused twice.
    let running = tokio::spawn({
        let mut echo = EchoClient::new(client.channel());
        async move { echo.sleep(SleepRequest { millis: 60_000 }).await }
    });
    eventually(Duration::from_secs(10), "the call is running", || {
        first
            .peers()
            .list()
            .iter()
            .any(|p| p.served_calls_in_flight() == 1)
    })
    .await;
    let started = tokio::time::Instant::now();
    first.shutdown(Duration::from_millis(3500)).await;
    // What the test is about: the client was refused more than once while
    // the shutdown waited for the call.
    let refused = first.admission_stats().refused_closing;
    assert!(refused >= 2, "refused {refused} times during the shutdown");
    drop(first);
    let second = rebind(&chain, &key, addr).await;
    // Doubling: the third attempt comes 3-6 s after the GoAway; if it came
    // before the new server (up about 4 s in), the fourth comes 4-8 s after
    // it, by about 12 s. Fifteen-fold: the third not before 16 s.
    let mut state = client.watch_state();
    let back = common::state_becomes(
        &mut state,
        Duration::from_secs(15).saturating_sub(started.elapsed()),
        "back on the new server within 15 s of the shutdown's start",
        |s| matches!(s, ClientState::Connected { connection_id } if *connection_id != before),
    )
    .await;
    println!("back after {:?}: {back:?}", started.elapsed());
    assert!(server_has(&second, 1));
    running.abort();
}

/// `Server::close` (and dropping the server) closes its connections as
/// going away, as a shutdown's end does: the server is shutting down, so a
/// reconnecting client takes the short busy delays a GoAway gives (quinn
/// refuses new connections while the closed endpoint drains).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_server_closes_its_connections_as_going_away() {
    let server = common::server();
    // A long reconnect backoff: the state read below is still the first
    // disconnect's, however late this task runs.
    let client = common::client_builder(&server, "agent", EchoService::new("agent"))
        .reconnect_backoff(Duration::from_secs(30), Duration::from_secs(60))
        .connect(server.local_addr())
        .await
        .expect("connect");
    server.close();
    let last_error = first_disconnect(&client).await;
    assert!(last_error.is_going_away(), "{last_error}");
    assert!(
        last_error.to_string().contains("server closed"),
        "{last_error}"
    );
}
