//! Observability: every call has a `brpc.call` tracing span with its service,
//! method, direction, peer, status code and duration; counters and gauges go
//! through the `metrics` facade. Installs process-wide recorders, so this file
//! is its own test binary with one test.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::echo::echo_client::EchoClient;
use common::echo::{EchoRequest, FailRequest};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tonic::Code;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn calls_have_spans_and_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).expect("recorder");
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let server = common::server();
    let client = common::client(&server, "observed").await;
    let mut echo = EchoClient::new(client.channel());
    echo.unary(EchoRequest::default()).await.expect("ok call");
    let err = echo
        .fail(FailRequest {
            code: Code::NotFound as i32,
            message: "x".into(),
        })
        .await
        .expect_err("fails");
    assert_eq!(err.code(), Code::NotFound);
    let peer = server.peers().get(client.connection_id()).expect("listed");
    peer.client(EchoClient::new)
        .unary(EchoRequest::default())
        .await
        .expect("reverse call");
    drop(echo);
    // A client that refuses the server's certificate: the server logs the
    // refused handshake with the address and the reason.
    let stranger = brpc::tls::DevCertificate::generate().expect("certificate");
    let err = brpc::Client::builder()
        .pin_certificate(stranger.certificate().clone())
        .connect(server.local_addr())
        .await
        .expect_err("not the pinned certificate");
    assert!(matches!(err, brpc::ConnectError::NotPinned(_)), "{err}");
    common::eventually(std::time::Duration::from_secs(5), "refusal logged", || {
        String::from_utf8_lossy(&logs.0.lock().expect("lock")).contains("handshake refused")
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let text = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf8");
    let id = client.connection_id().to_string();
    let ended: Vec<&str> = text.lines().filter(|l| l.contains("call ended")).collect();
    assert!(
        ended
            .iter()
            .any(|l| l.contains("brpc.call{direction=\"inbound\"")
                && l.contains(&format!("peer={id}"))
                && l.contains("service=\"test.echo.v1.Echo\" method=\"Fail\"")
                && l.contains("code=\"NOT_FOUND\"")),
        "{text}"
    );
    assert!(
        ended.iter().any(|l| l.contains("direction=\"outbound\"")
            && l.contains("method=\"Unary\"")
            && l.contains("code=\"OK\"")),
        "{text}"
    );
    assert!(ended.iter().all(|l| l.contains("duration_ms=")), "{text}");
    let refused = text
        .lines()
        .find(|l| l.contains("handshake refused"))
        .expect("refusal logged");
    assert!(
        refused.contains("remote=127.0.0.1:") && refused.contains("error="),
        "{refused}"
    );
    println!("{refused}\n{err}");

    let snapshot = snapshotter.snapshot().into_vec();
    // Counters and gauges as numbers.
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let k = key.key();
            let matches = k.name() == name
                && labels
                    .iter()
                    .all(|(lk, lv)| k.labels().any(|l| l.key() == *lk && l.value() == *lv));
            if !matches {
                return None;
            }
            match value {
                DebugValue::Counter(n) => Some(*n as f64),
                DebugValue::Gauge(g) => Some(g.into_inner()),
                DebugValue::Histogram(_) => None,
            }
        })
    };
    // Four calls served (two by the server, one by the client, and the
    // Hello, a call like any other), four made.
    assert_eq!(
        value(
            "brpc_calls_total",
            &[("direction", "inbound"), ("code", "OK")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            "brpc_calls_total",
            &[("direction", "inbound"), ("code", "NOT_FOUND")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            "brpc_calls_total",
            &[("direction", "outbound"), ("code", "OK")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            "brpc_call_errors_total",
            &[("direction", "outbound"), ("code", "NOT_FOUND")]
        ),
        Some(1.0)
    );
    assert!(value("brpc_bytes_sent_total", &[]).expect("bytes sent") > 0.0);
    assert!(value("brpc_bytes_received_total", &[]).expect("bytes received") > 0.0);
    assert_eq!(value("brpc_connected_peers", &[]), Some(1.0));
    // What became of the two clients that knocked: one admitted, one whose
    // handshake failed (it refused the certificate), as
    // `Server::admission_stats` counts them.
    let admission = |event: &str| value("brpc_admission_events_total", &[("event", event)]);
    assert_eq!(admission("handshakes_started"), Some(2.0));
    assert_eq!(admission("admitted"), Some(1.0));
    assert_eq!(admission("handshakes_failed"), Some(1.0));
    assert_eq!(admission("refused_queue_full"), None);
    let stats = server.admission_stats();
    assert_eq!((stats.admitted, stats.handshakes_failed), (1, 1));
    assert_eq!(
        value("brpc_calls_in_flight", &[("direction", "inbound")]),
        Some(0.0)
    );
    assert_eq!(
        value("brpc_calls_in_flight", &[("direction", "outbound")]),
        Some(0.0)
    );
}
