//! The admin service's relay: an operator's call, carrying `brpc-relay-to`,
//! goes through the server to an agent and back, for every call shape, with
//! metadata, the deadline, cancellation and the agent's own status; the
//! operator uses an ordinary tonic client with an interceptor.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use brpc::server::AdminAccess;
use brpc::server::admin::{ADMIN_TOKEN, RELAY_TO};
use brpc::{Client, ConnectionId, Server};
use common::echo::echo_client::EchoClient;
use common::echo::echo_server::EchoServer;
use common::echo::{EchoRequest, FailRequest, Number, RangeRequest, SleepRequest};
use common::{EchoService, Probe, eventually};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;

const TOKEN: &str = "relay-test-token";

fn admin_server() -> Server {
    Server::builder()
        .add_service(EchoServer::new(EchoService::new("server")))
        .admin(AdminAccess::new().token(TOKEN))
        .bind("127.0.0.1:0")
        .expect("bind")
}

async fn agent(server: &Server, name: &str) -> (Client, std::sync::Arc<Probe>) {
    let echo = EchoService::new(name);
    let probe = echo.probe.clone();
    let client = common::client_builder(server, name, echo)
        .connect(server.local_addr())
        .await
        .expect("connect");
    (client, probe)
}

/// Adds the relay's metadata (and the token, when given) to every call.
#[derive(Clone)]
struct RelayTo {
    id: ConnectionId,
    token: Option<&'static str>,
}

impl Interceptor for RelayTo {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let id = MetadataValue::try_from(self.id.0.to_string()).expect("ascii");
        request.metadata_mut().insert(RELAY_TO, id);
        if let Some(token) = self.token {
            request
                .metadata_mut()
                .insert(ADMIN_TOKEN, MetadataValue::from_static(token));
        }
        Ok(request)
    }
}

fn relayed(
    operator: &Client,
    to: &Client,
) -> EchoClient<InterceptedService<brpc::Channel, RelayTo>> {
    EchoClient::with_interceptor(
        operator.channel(),
        RelayTo {
            id: to.connection_id(),
            token: Some(TOKEN),
        },
    )
}

#[tokio::test]
async fn every_call_shape_reaches_the_agent_through_the_relay() {
    let server = admin_server();
    let (agent, _) = agent(&server, "agent-7").await;
    let operator = common::client(&server, "operator").await;
    let mut echo = relayed(&operator, &agent);

    // Unary, with request metadata going to the agent (it echoes `x-`
    // entries back as response headers) and the relay's own entries not.
    let mut request = tonic::Request::new(EchoRequest {
        text: "metadata?".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-trace", MetadataValue::from_static("abc"));
    let reply = echo.unary(request).await.expect("relayed unary");
    assert_eq!(reply.get_ref().answered_by, "agent-7");
    assert_eq!(reply.get_ref().text, "x-trace=abc");
    assert_eq!(
        reply
            .metadata()
            .get("x-trace")
            .and_then(|v| v.to_str().ok()),
        Some("abc")
    );

    // Server-streaming.
    let replies: Vec<u64> = echo
        .range(RangeRequest { from: 3, to: 9 })
        .await
        .expect("relayed range")
        .into_inner()
        .map(|r| r.expect("reply").seq)
        .collect()
        .await;
    assert_eq!(replies, vec![3, 4, 5, 6, 7, 8]);

    // Client-streaming.
    let numbers = tokio_stream::iter([5, 7, 30].map(|value| Number { value }));
    let sum = echo.sum(numbers).await.expect("relayed sum");
    assert_eq!(sum.get_ref().value, 42);

    // Bidi: each message answered by the agent, in order.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("relayed bidi")
        .into_inner();
    for seq in 0..3 {
        tx.send(EchoRequest {
            seq,
            ..Default::default()
        })
        .await
        .expect("send");
        let reply = replies.next().await.expect("a reply").expect("ok");
        assert_eq!((reply.seq, reply.answered_by.as_str()), (seq, "agent-7"));
    }
    drop(tx);
    assert!(replies.next().await.is_none());

    // The agent's own error status comes back unchanged.
    let status = echo
        .fail(FailRequest {
            code: Code::FailedPrecondition as i32,
            message: "agent says no".into(),
        })
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "agent says no");

    // Without the relay entry the same client reaches the server's own Echo.
    let mut direct = EchoClient::new(operator.channel());
    let reply = direct
        .unary(EchoRequest::default())
        .await
        .expect("server's own");
    assert_eq!(reply.get_ref().answered_by, "server");
}

#[tokio::test]
async fn the_deadline_and_a_cancel_cross_the_relay() {
    let server = admin_server();
    let (agent, probe) = agent(&server, "agent-7").await;
    let operator = common::client(&server, "operator").await;
    let mut echo = relayed(&operator, &agent);

    // A deadline that runs out while the agent works: DEADLINE_EXCEEDED for
    // the operator, the agent's handler dropped, and the agent saw the time
    // left (not more than the operator gave).
    let mut request = tonic::Request::new(SleepRequest { millis: 60_000 });
    request.set_timeout(Duration::from_millis(500));
    let status = echo.sleep(request).await.expect_err("times out");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    eventually(Duration::from_secs(10), "agent's handler dropped", || {
        probe.dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    let seen = probe.observed_timeout.lock().expect("lock").clone();
    let left = seen
        .as_deref()
        .and_then(|t| {
            let (n, unit) = t.split_at(t.len() - 1);
            let n: u64 = n.parse().ok()?;
            match unit {
                "n" => Some(Duration::from_nanos(n)),
                "u" => Some(Duration::from_micros(n)),
                "m" => Some(Duration::from_millis(n)),
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("agent saw grpc-timeout {seen:?}"));
    assert!(left <= Duration::from_millis(500), "{left:?}");

    // The operator drops its call: the agent's handler is dropped too.
    let mut cancelled = echo.clone();
    common::drop_while_running(&probe, async move {
        cancelled.sleep(SleepRequest { millis: 60_000 }).await
    })
    .await;
}

/// The same cancel reaches an agent on the server's Unix socket: the
/// relayed call toward it is dropped, and the Unix link sends Cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_crosses_the_relay_to_an_agent_on_a_unix_socket() {
    let path = std::env::temp_dir().join(format!("brpc-relay-unix-{}.sock", std::process::id()));
    let server = admin_server();
    server.listen_unix(&path).expect("listen");
    let echo = EchoService::new("unix-agent");
    let probe = echo.probe.clone();
    let agent = Client::builder()
        .name("unix-agent")
        .add_service(EchoServer::new(echo))
        .connect_unix(&path)
        .await
        .expect("connect over the Unix socket");
    let operator = common::client(&server, "operator").await;
    let mut echo = relayed(&operator, &agent);
    let reply = echo
        .unary(EchoRequest::default())
        .await
        .expect("relayed to the Unix agent");
    assert_eq!(reply.get_ref().answered_by, "unix-agent");

    let mut cancelled = echo.clone();
    common::drop_while_running(&probe, async move {
        cancelled.sleep(SleepRequest { millis: 600_000 }).await
    })
    .await;
}

#[tokio::test]
async fn relay_errors_say_what_is_wrong() {
    let server = admin_server();
    let (agent, _) = agent(&server, "agent-7").await;
    let operator = common::client(&server, "operator").await;

    // No such agent.
    let mut nobody = EchoClient::with_interceptor(
        operator.channel(),
        RelayTo {
            id: ConnectionId(1),
            token: Some(TOKEN),
        },
    );
    let status = nobody
        .unary(EchoRequest::default())
        .await
        .expect_err("no agent");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // No token: refused before anything reaches the agent.
    let mut untrusted = EchoClient::with_interceptor(
        operator.channel(),
        RelayTo {
            id: agent.connection_id(),
            token: None,
        },
    );
    let status = untrusted
        .unary(EchoRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // The agent went away: once it is unlisted, NOT_FOUND.
    let mut echo = relayed(&operator, &agent);
    let id = agent.connection_id();
    agent.close();
    eventually(Duration::from_secs(10), "agent unlisted", || {
        server.peers().get(id).is_none()
    })
    .await;
    let status = echo
        .unary(EchoRequest::default())
        .await
        .expect_err("agent gone");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

/// A graceful shutdown ends an operator's watch cleanly (OK) instead of
/// holding the drain open for its whole grace period.
#[tokio::test]
async fn a_watch_ends_ok_when_the_server_drains() {
    use brpc::core::conn::{RequestBody, ResponseEvent};
    use brpc::server::admin::{ADMIN_SERVICE, WatchRequest};
    use prost::Message;

    let server = std::sync::Arc::new(admin_server());
    let operator = common::client(&server, "operator").await;
    let peer = operator.peer().expect("connected");
    let token = vec![brpc::core::wire::KeyValue {
        key: ADMIN_TOKEN.into(),
        value: TOKEN.into(),
    }];
    let mut watch = peer
        .start_call(
            ADMIN_SERVICE,
            "Watch",
            token,
            None,
            RequestBody::<futures_util::stream::Empty<Result<bytes::Bytes, tonic::Status>>>::Single(
                WatchRequest::default().encode_to_vec().into(),
            ),
        )
        .await
        .expect("watch starts");
    assert!(matches!(
        watch.next_event().await,
        ResponseEvent::Headers(_)
    ));
    let draining = server.clone();
    let shutdown = tokio::spawn(async move { draining.shutdown(Duration::from_secs(3600)).await });
    match watch.next_event().await {
        ResponseEvent::End { status, .. } => assert!(status.is_ok(), "{status:?}"),
        other => panic!("expected the end of the watch, got {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(60), shutdown)
        .await
        .expect("the shutdown did not wait out its grace period")
        .expect("shutdown task");
}
