//! Unix-socket clients live in the same server as QUIC ones: listed in the
//! registry with their credentials, announced by connect and disconnect
//! events, calling and called back, and drained by a graceful shutdown.

use std::time::Duration;

use brpc::PeerEvent;
use tokio::sync::broadcast::error::RecvError;

use crate::common::echo::echo_client::EchoClient;
use crate::common::echo::echo_server::EchoServer;
use crate::common::echo::{EchoRequest, SleepRequest};
use crate::common::{self, EchoService};

/// The next event about a Unix-socket peer (QUIC peers' events are skipped).
async fn next_unix_event(events: &mut tokio::sync::broadcast::Receiver<PeerEvent>) -> PeerEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) if event.peer().credentials().is_some() => return event,
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => panic!("events closed"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("an event in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_client_is_listed_announced_called_back_and_drained_like_a_quic_one() {
    let path = std::env::temp_dir().join(format!("brpc-unix-mixed-{}.sock", std::process::id()));
    let echo = EchoService::new("server");
    let probe = echo.probe.clone();
    let server = brpc::Server::builder()
        .add_service(EchoServer::new(echo))
        .bind("127.0.0.1:0")
        .expect("bind");
    server
        .listen_unix(&path)
        .expect("listen on the Unix socket");
    let mut events = server.peers().subscribe();

    let quic = common::client(&server, "over-quic").await;
    let unix = brpc::Client::builder()
        .name("over-unix")
        .add_service(EchoServer::new(EchoService::new("unix-agent")))
        .connect_unix(&path)
        .await
        .expect("connect over the Unix socket");

    // Connected: announced and listed, with its credentials.
    let PeerEvent::Connected(listed) = next_unix_event(&mut events).await else {
        panic!("expected a Connected event first");
    };
    let credentials = listed.credentials().expect("SO_PEERCRED");
    assert_eq!(credentials.pid, Some(std::process::id() as i32));
    assert_eq!(server.peers().len(), 2);
    assert_eq!(
        server
            .peers()
            .get(quic.connection_id())
            .expect("the QUIC client")
            .credentials(),
        None
    );
    assert!(server.peers().get(listed.connection_id()).is_some());
    assert_eq!(unix.connection_id(), listed.connection_id());

    // Calls both ways over the socket.
    let reply = EchoClient::new(unix.channel())
        .unary(EchoRequest {
            text: "up".into(),
            ..Default::default()
        })
        .await
        .expect("the Unix client calls the server")
        .into_inner();
    assert_eq!(reply.answered_by, "server");
    let back = EchoClient::new(listed.channel())
        .unary(EchoRequest::default())
        .await
        .expect("the server calls the Unix client back")
        .into_inner();
    assert_eq!(back.answered_by, "unix-agent");

    // Shutdown drains it: a call in flight finishes, then it is closed and
    // announced gone, and the socket file is removed.
    let mut sleeper = EchoClient::new(unix.channel());
    let running = tokio::spawn(async move { sleeper.sleep(SleepRequest { millis: 300 }).await });
    common::eventually(Duration::from_secs(5), "the handler is running", || {
        probe.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(listed.served_calls_in_flight(), 1);
    server.shutdown(Duration::from_secs(5)).await;
    running
        .await
        .expect("join")
        .expect("the running call finished before the shutdown closed it");
    let PeerEvent::Disconnected { peer, reason } = next_unix_event(&mut events).await else {
        panic!("expected a Disconnected event");
    };
    assert_eq!(peer.connection_id(), listed.connection_id());
    assert!(reason.is_going_away() && reason.is_local(), "{reason}");
    assert!(server.peers().is_empty(), "{:?}", server.peers().list());
    assert!(!path.exists(), "the socket file is removed");
}
