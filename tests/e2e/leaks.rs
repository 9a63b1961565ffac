//! No task outlives its peer. The server runs on a runtime of its own, so
//! its live tasks can be counted (`RuntimeMetrics::num_alive_tasks`): after
//! clients that had calls of every shape running in both directions are
//! gone (closed, or vanished without a word), it holds no more tasks than
//! before they came.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use brpc::{Client, Server};
use common::echo::echo_client::EchoClient;
use common::echo::echo_server::EchoServer;
use common::echo::{EchoRequest, RangeRequest, SleepRequest};
use common::{EchoService, Probe};
use tokio_stream::StreamExt as _;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Starts on `rt` (the clients' runtime) calls of every shape from `client`
/// to the server, each left running until the connection ends: a handler
/// asleep, a stream read slowly (until `hurry` is set: the messages that
/// arrived before the connection ended are still read, then its error), a
/// bidirectional stream held open.
fn start_forward_calls(rt: &tokio::runtime::Runtime, client: &Client, hurry: &Arc<AtomicBool>) {
    let echo = EchoClient::new(client.channel());
    let mut unary = echo.clone();
    rt.block_on(async {
        unary
            .unary(EchoRequest::default())
            .await
            .expect("a finished call");
    });
    let mut sleep = echo.clone();
    rt.spawn(async move { sleep.sleep(SleepRequest { millis: 600_000 }).await });
    let mut range = echo.clone();
    let hurry = hurry.clone();
    let (range_started, range_running) = tokio::sync::oneshot::channel();
    rt.spawn(async move {
        let mut stream = range
            .range(RangeRequest {
                from: 0,
                to: 1_000_000,
            })
            .await
            .expect("range")
            .into_inner();
        let first = stream.message().await;
        let _ = range_started.send(first.map(|m| m.is_some()));
        // Slowly, so that the stream is still running when its peer goes.
        while let Ok(Some(_)) = stream.message().await {
            if !hurry.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let mut bidi = echo;
    let (bidi_started, bidi_running) = tokio::sync::oneshot::channel();
    rt.spawn(async move {
        let hold = EchoRequest {
            text: "hold".into(),
            ..Default::default()
        };
        let input = tokio_stream::iter([hold]).chain(tokio_stream::pending());
        let mut replies = bidi.bidi(input).await.expect("bidi").into_inner();
        let first = replies.message().await;
        let _ = bidi_started.send(first.map(|m| m.is_some()));
        while let Ok(Some(_)) = replies.message().await {}
    });
    rt.block_on(async {
        for running in [range_running, bidi_running] {
            let first = running.await.expect("the call's task");
            assert!(matches!(first, Ok(true)), "a first reply: {first:?}");
        }
    });
}

/// Starts on the server's runtime calls to every connected client, left
/// running: each client's handler asleep, and a bidirectional stream held.
fn start_reverse_calls(server_rt: &tokio::runtime::Runtime, server: &Server) {
    for peer in server.peers().list() {
        let mut sleep = peer.client(EchoClient::new);
        server_rt.spawn(async move { sleep.sleep(SleepRequest { millis: 600_000 }).await });
        let mut bidi = peer.client(EchoClient::new);
        server_rt.spawn(async move {
            let hold = EchoRequest {
                text: "hold".into(),
                ..Default::default()
            };
            let input = tokio_stream::iter([hold]).chain(tokio_stream::pending());
            if let Ok(replies) = bidi.bidi(input).await {
                let mut replies = replies.into_inner();
                while let Ok(Some(_)) = replies.message().await {}
            }
        });
    }
}

/// A client of `server` on `rt`, over its Unix socket `unix` if given,
/// else over QUIC; a vanished server is noticed at its 2 s idle timeout.
fn connect(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    name: &str,
    unix: Option<&std::path::Path>,
) -> (Client, Arc<Probe>) {
    let echo = EchoService::new(name);
    let probe = echo.probe.clone();
    let client = rt.block_on(async {
        let builder = common::client_builder(server, name, echo)
            .idle_timeout(Duration::from_secs(2))
            // Well inside the 2 s idle timeout.
            .keep_alive_interval(Some(Duration::from_millis(500)))
            .reconnect(false);
        match unix {
            Some(path) => builder.connect_unix(path).await,
            None => builder.connect(server.local_addr()).await,
        }
        .expect("connect")
    });
    (client, probe)
}

#[test]
fn the_server_holds_no_task_for_clients_that_are_gone() {
    server_outlives_its_clients(None);
}

#[test]
fn the_server_holds_no_task_for_unix_clients_that_are_gone() {
    let path = std::env::temp_dir().join(format!("brpc-leaks-{}.sock", std::process::id()));
    server_outlives_its_clients(Some(&path));
}

/// Clients (over QUIC, or the Unix socket `unix`) call and are called,
/// then close or vanish; the server's runtime ends up with the tasks it
/// had before they came.
fn server_outlives_its_clients(unix: Option<&std::path::Path>) {
    const EACH: usize = 4;
    let server_rt = runtime();
    let echo = EchoService::new("server");
    let server_probe = echo.probe.clone();
    let server = {
        let _in = server_rt.enter();
        Server::builder()
            // A vanished client is noticed at the idle timeout.
            .idle_timeout(Duration::from_secs(2))
            .add_service(EchoServer::new(echo))
            .bind("127.0.0.1:0")
            .expect("bind")
    };
    if let Some(path) = unix {
        let _in = server_rt.enter();
        server.listen_unix(path).expect("listen on the Unix socket");
    }
    let tasks = || server_rt.metrics().num_alive_tasks();
    // The fewest of a few looks: a task of the server's own that happens
    // to run at one of them is not counted.
    let before = (0..5)
        .map(|_| {
            server_rt.block_on(async { tokio::time::sleep(Duration::from_millis(60)).await });
            tasks()
        })
        .min()
        .unwrap_or(0);

    // Clients that will close, and clients whose runtime (their endpoint
    // or socket with it) is dropped: over QUIC no CONNECTION_CLOSE ever
    // reaches the server (it notices at its idle timeout); over a Unix
    // socket the kernel closes the socket, and the server reads its end.
    let closing_rt = runtime();
    let vanishing_rt = runtime();
    let mut closing = Vec::new();
    let mut vanishing = Vec::new();
    for i in 0..EACH {
        closing.push(connect(&closing_rt, &server, &format!("closing-{i}"), unix));
        vanishing.push(connect(
            &vanishing_rt,
            &server,
            &format!("vanishing-{i}"),
            unix,
        ));
    }
    // Never set: the clients' runtimes are not counted here.
    let hurry = Arc::new(AtomicBool::new(false));
    for (client, _) in &closing {
        start_forward_calls(&closing_rt, client, &hurry);
    }
    for (client, _) in &vanishing {
        start_forward_calls(&vanishing_rt, client, &hurry);
    }
    start_reverse_calls(&server_rt, &server);
    // Every call is running: the server's sleeping handlers, and the
    // clients' (two per client: the server's Sleep and nothing else hangs
    // a client handler).
    server_rt.block_on(common::eventually(
        Duration::from_secs(20),
        "every call running",
        || {
            server_probe.in_flight.load(Ordering::SeqCst) == 2 * EACH
                && closing
                    .iter()
                    .chain(&vanishing)
                    .all(|(_, probe)| probe.in_flight.load(Ordering::SeqCst) == 1)
        },
    ));
    let busy = tasks();
    assert!(busy > before, "the calls hold tasks: {busy} vs {before}");

    for (client, _) in &closing {
        client.close();
    }
    vanishing_rt.shutdown_background();
    server_rt.block_on(common::eventually(
        Duration::from_secs(30),
        "every client gone from the registry",
        || server.peers().is_empty(),
    ));
    server_rt.block_on(common::eventually(
        Duration::from_secs(30),
        "the server's handlers dropped",
        || server_probe.in_flight.load(Ordering::SeqCst) == 0,
    ));
    let mut now = tasks();
    let waited = std::time::Instant::now();
    while now > before && waited.elapsed() < Duration::from_secs(30) {
        server_rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        now = tasks();
    }
    assert!(
        now <= before,
        "{now} tasks alive on the server's runtime once its clients are gone, \
         {before} before they came ({busy} while they called)"
    );
    println!("server tasks: {before} before the clients, {busy} while they called, {now} after");
    drop(closing);
    drop(closing_rt);
}

/// The other way round: clients (on a runtime of their own) with calls
/// of every shape running both ways hold no task once their server has
/// vanished and they are dropped.
#[test]
fn clients_hold_no_task_once_their_server_is_gone() {
    const CLIENTS: usize = 4;
    let server_rt = runtime();
    let server = {
        let _in = server_rt.enter();
        Server::builder()
            .add_service(EchoServer::new(EchoService::new("server")))
            .bind("127.0.0.1:0")
            .expect("bind")
    };
    let clients_rt = runtime();
    let tasks = || clients_rt.metrics().num_alive_tasks();
    let before = tasks();
    let clients: Vec<(Client, Arc<Probe>)> = (0..CLIENTS)
        .map(|i| connect(&clients_rt, &server, &format!("client-{i}"), None))
        .collect();
    let hurry = Arc::new(AtomicBool::new(false));
    for (client, _) in &clients {
        start_forward_calls(&clients_rt, client, &hurry);
    }
    start_reverse_calls(&server_rt, &server);
    clients_rt.block_on(common::eventually(
        Duration::from_secs(20),
        "every reverse call running",
        || {
            clients
                .iter()
                .all(|(_, probe)| probe.in_flight.load(Ordering::SeqCst) == 1)
        },
    ));
    let busy = tasks();
    assert!(busy > before, "the calls hold tasks: {busy} vs {before}");

    server_rt.shutdown_background();
    clients_rt.block_on(common::eventually(
        Duration::from_secs(30),
        "every client noticed",
        || {
            clients
                .iter()
                .all(|(client, _)| matches!(client.state(), brpc::ClientState::Closed { .. }))
        },
    ));
    clients_rt.block_on(common::eventually(
        Duration::from_secs(30),
        "the clients' handlers dropped",
        || {
            clients
                .iter()
                .all(|(_, probe)| probe.in_flight.load(Ordering::SeqCst) == 0)
        },
    ));
    drop(clients);
    // Streams still hold what arrived before the connection ended: read
    // them to their end.
    hurry.store(true, Ordering::SeqCst);
    let mut now = tasks();
    let waited = std::time::Instant::now();
    while now > before && waited.elapsed() < Duration::from_secs(30) {
        clients_rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        now = tasks();
    }
    println!("client tasks: {before} before connecting, {busy} while calling, {now} after");
    assert!(
        now <= before,
        "{now} tasks alive on the clients' runtime once their server is gone, \
         {before} before they connected ({busy} while they called)"
    );
}
