//! How many calls a peer may have open at once: a connection starts by
//! allowing `INITIAL_CALL_WINDOW` (8) and widens to `max_concurrent_calls`
//! under load, in both directions; an explicit lower limit makes further
//! calls wait for a free slot rather than fail.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use brpc::core::conn::INITIAL_CALL_WINDOW;
use common::echo::SleepRequest;
use common::echo::echo_client::EchoClient;
use common::{EchoService, eventually};
use tokio::task::JoinHandle;
use tonic::Status;

const CALLS: usize = 40;

async fn sleep_calls(
    client: EchoClient<brpc::Channel>,
    n: usize,
    millis: u64,
) -> Vec<JoinHandle<Result<(), Status>>> {
    (0..n)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.sleep(SleepRequest { millis }).await.map(|_| ()) })
        })
        .collect()
}

/// All `calls` reach the handler together (none waits for a free slot),
/// then all succeed.
async fn all_running_at_once(probe: &common::Probe, calls: Vec<JoinHandle<Result<(), Status>>>) {
    eventually(Duration::from_secs(10), "all calls running at once", || {
        probe.in_flight.load(Ordering::SeqCst) == calls.len()
    })
    .await;
    for call in calls {
        call.await.expect("join").expect("call");
    }
}

/// Opens streams (without writing) until one does not open within 300 ms.
async fn streams_that_open(
    conn: &quinn::Connection,
    at_most: u32,
) -> Vec<(quinn::SendStream, quinn::RecvStream)> {
    let mut open = Vec::new();
    for _ in 0..at_most {
        match tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await {
            Ok(stream) => open.push(stream.expect("open")),
            Err(_) => break,
        }
    }
    open
}

#[tokio::test]
async fn before_hello_only_the_hello_stream_opens() {
    let server = common::server();
    let conn = common::raw_connection(&server).await;
    assert_eq!(streams_that_open(&conn, 4).await.len(), 1);
}

#[tokio::test]
async fn a_new_connection_allows_the_initial_window_only() {
    // Streams opened but never written are not seen by the server, so the
    // window cannot widen: exactly INITIAL_CALL_WINDOW of them open at once
    // once Hello has succeeded, the Hello stream among them (the server
    // reads its Request, not its end, so quinn keeps counting it).
    let server = common::server();
    let (conn, _id) = common::raw_client(&server, "raw").await;
    let open = streams_that_open(&conn, INITIAL_CALL_WINDOW + 1).await;
    assert_eq!(
        open.len(),
        INITIAL_CALL_WINDOW as usize - 1,
        "streams open before any widening"
    );
}

#[tokio::test]
async fn the_window_widens_past_its_initial_size_for_client_calls() {
    assert!(CALLS > INITIAL_CALL_WINDOW as usize);
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = common::server_with(echo);
    let client = common::client(&server, "agent").await;
    let calls = sleep_calls(EchoClient::new(client.channel()), CALLS, 3_000).await;
    all_running_at_once(&probe, calls).await;
}

#[tokio::test]
async fn the_window_widens_for_calls_from_the_server_too() {
    let server = common::server();
    let echo = EchoService::new("agent");
    let probe = echo.probe.clone();
    let client = common::client_builder(&server, "agent", echo)
        .connect(server.local_addr())
        .await
        .expect("connect");
    let peer = server.peers().get(client.connection_id()).expect("listed");
    let calls = sleep_calls(peer.client(EchoClient::new), CALLS, 3_000).await;
    all_running_at_once(&probe, calls).await;
}

#[tokio::test]
async fn calls_beyond_an_explicit_limit_wait_and_then_succeed() {
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = brpc::Server::builder()
        .max_concurrent_calls(4)
        .add_service(common::echo::echo_server::EchoServer::new(echo))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = common::client(&server, "agent").await;
    let calls = sleep_calls(EchoClient::new(client.channel()), 12, 200).await;
    for call in calls {
        call.await.expect("join").expect("call");
    }
    assert_eq!(probe.max_in_flight.load(Ordering::SeqCst), 4);
}

/// A client and its server over a relay holding every datagram 50 ms each
/// way (a 100 ms round trip); the client serves Echo too.
async fn over_a_long_round_trip() -> (brpc::Server, common::relay::Relay, brpc::Client) {
    over_a_long_round_trip_to(EchoService::new("server")).await
}

/// [`over_a_long_round_trip`], the server serving `echo`.
async fn over_a_long_round_trip_to(
    echo: EchoService,
) -> (brpc::Server, common::relay::Relay, brpc::Client) {
    let server = common::server_with(echo);
    let relay =
        common::relay::Relay::start_delayed(server.local_addr(), Duration::from_millis(50)).await;
    let client = common::client_builder(&server, "agent", EchoService::new("agent"))
        .connect(relay.addr())
        .await
        .expect("connect");
    (server, relay, client)
}

/// One quick call through `echo`, then `n` more, one started every `gap`
/// (without waiting for the one before), all of which succeed. (The first
/// call waits: calls made at once on a new channel can reach the peer in
/// one burst, which widens the window on its own.)
async fn paced_calls(echo: EchoClient<brpc::Channel>, n: usize, gap: Duration) {
    use common::echo::EchoRequest;
    echo.clone()
        .unary(EchoRequest::default())
        .await
        .expect("first call");
    let mut calls = Vec::new();
    for _ in 0..n {
        let mut echo = echo.clone();
        calls.push(tokio::spawn(async move {
            echo.unary(EchoRequest::default()).await.map(|_| ())
        }));
        tokio::time::sleep(gap).await;
    }
    for call in calls {
        call.await.expect("join").expect("call");
    }
}

/// Quick calls arriving one at a time over a long round trip never have
/// six handlers running at once, yet QUIC counts each against the window
/// until the caller has acknowledged the answer and has its credit back,
/// two round trips after it opened: at 200 calls a second and a 100 ms
/// round trip, 8 calls at a time is 40 a second. Before the window counted
/// the calls that ended lately, 200 calls made 5 ms apart over this relay
/// took 5.5 s, the longest 4.5-4.7 s. A window's worth of calls made 2 ms
/// apart, which no blocked caller bunches up, widens it, in both
/// directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_calls_over_a_long_round_trip_widen_the_window() {
    let window = INITIAL_CALL_WINDOW as usize;
    let gap = Duration::from_millis(2);
    let (server, _relay, client) = over_a_long_round_trip().await;
    let peer = server.peers().get(client.connection_id()).expect("listed");
    assert!(!peer.call_window_widened());
    paced_calls(EchoClient::new(client.channel()), window, gap).await;
    assert!(
        peer.call_window_widened(),
        "the server's window for the client"
    );

    let agent = client.peer().expect("connected");
    assert!(!agent.call_window_widened());
    paced_calls(peer.client(EchoClient::new), window, gap).await;
    assert!(
        agent.call_window_widened(),
        "the client's window for the server"
    );
}

/// A call now and then, one at a time, leaves a connection's window as
/// small as it started (quinn keeps state for every stream it allows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_one_at_a_time_leave_the_window_narrow() {
    let (server, _relay, client) = over_a_long_round_trip().await;
    calls_one_at_a_time(&server, &client, 10).await;
}

/// Calls one at a time over loopback leave the window narrow too: each
/// call's stream is freed about a round trip after it ended, so at most
/// two or three are counted at once however fast the calls follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_one_at_a_time_over_loopback_leave_the_window_narrow() {
    let server = common::server();
    let client = common::client(&server, "agent").await;
    calls_one_at_a_time(&server, &client, 200).await;
}

/// `n` quick calls from `client`, each awaited before the next, after
/// which the server's window for it is still narrow.
async fn calls_one_at_a_time(server: &brpc::Server, client: &brpc::Client, n: usize) {
    use common::echo::EchoRequest;
    let peer = server.peers().get(client.connection_id()).expect("listed");
    let mut echo = EchoClient::new(client.channel());
    for _ in 0..n {
        echo.unary(EchoRequest::default()).await.expect("call");
    }
    assert!(!peer.call_window_widened());
}

/// Calls that stay open (a watch, say) hold part of the window, and the
/// handlers of quick calls beside them never add up to six at once; the
/// quick calls that ended lately count too, so the window widens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_calls_and_quick_calls_together_widen_the_window() {
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let (server, _relay, client) = over_a_long_round_trip_to(echo).await;
    let peer = server.peers().get(client.connection_id()).expect("listed");
    let long = sleep_calls(EchoClient::new(client.channel()), 3, 60_000).await;
    eventually(Duration::from_secs(10), "the long calls running", || {
        probe.in_flight.load(Ordering::SeqCst) == 3
    })
    .await;
    assert!(!peer.call_window_widened());
    paced_calls(
        EchoClient::new(client.channel()),
        4,
        Duration::from_millis(2),
    )
    .await;
    assert!(peer.call_window_widened());
    long.iter().for_each(JoinHandle::abort);
}
