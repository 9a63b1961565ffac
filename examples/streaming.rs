//! The streaming story, both ways on one connection:
//! the server streams commands to an agent (`Control/Watch`), the agent streams
//! samples to the server (`Control/Report`), and the server, from inside the
//! `Report` handler, tails the agent's own log stream (`Logs/Tail`).
//!
//! ```text
//! cargo run --example streaming
//! ```

use std::pin::Pin;

use brpc::{Client, Peer, Server};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Generated from proto/control.proto by brpc-build (see build.rs): tonic's
/// traits, and brpc's direct path beside them (`control_brpc`, `logs_brpc`).
#[allow(missing_docs)]
pub mod proto {
    tonic::include_proto!("control.v1");
}
use proto::control_brpc::ControlClient;
use proto::control_server::Control;
use proto::logs_brpc::LogsClient;
use proto::logs_server::Logs;
use proto::{Command, LogLine, Sample, Summary, TailRequest, WatchRequest};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct ControlService;

#[tonic::async_trait]
impl Control for ControlService {
    type WatchStream = BoxStream<Command>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let max = request.into_inner().max as u64;
        let actions = ["rotate-logs", "refresh-config", "report-load"];
        let stream = tokio_stream::iter(0..max).map(move |seq| {
            Ok(Command {
                seq,
                action: actions[seq as usize % actions.len()].into(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report(
        &self,
        request: Request<Streaming<Sample>>,
    ) -> Result<Response<Summary>, Status> {
        let peer = Peer::from_request(&request)?;
        let mut samples = request.into_inner();
        let (mut count, mut sum) = (0u32, 0.0);
        while let Some(sample) = samples.next().await {
            count += 1;
            sum += sample?.cpu;
        }
        println!(
            "[server] {} reported {count} samples; tailing its logs",
            peer.connection_id()
        );
        let mut lines = peer
            .client(LogsClient::new)
            .tail(TailRequest { lines: 3 })
            .await?
            .into_inner();
        while let Some(line) = lines.next().await {
            println!("[server] {} log: {}", peer.connection_id(), line?.text);
        }
        Ok(Response::new(Summary {
            count,
            mean_cpu: if count == 0 {
                0.0
            } else {
                sum / f64::from(count)
            },
        }))
    }
}

struct LogsService;

#[tonic::async_trait]
impl Logs for LogsService {
    type TailStream = BoxStream<LogLine>;

    async fn tail(
        &self,
        request: Request<TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let n = request.into_inner().lines;
        let stream = tokio_stream::iter(1..=n).map(|i| {
            Ok(LogLine {
                text: format!("agent log line {i}"),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::builder()
        .add_direct(proto::control_brpc::ControlService::new(ControlService))
        .bind("127.0.0.1:0")?;
    println!("[server] listening on {}", server.local_addr());

    let agent = Client::builder()
        .name("agent-1")
        .add_direct(proto::logs_brpc::LogsService::new(LogsService))
        .pin_certificate(server.certificate().clone())
        .connect(server.local_addr())
        .await?;
    println!("[agent] connected as {}", agent.connection_id());
    let mut control = ControlClient::new(agent.channel());

    // The server streams to the agent.
    let mut commands = control.watch(WatchRequest { max: 3 }).await?.into_inner();
    while let Some(command) = commands.next().await {
        let command = command?;
        println!("[agent] command #{}: {}", command.seq, command.action);
    }

    // The agent streams to the server (whose handler then streams from the agent).
    let samples = tokio_stream::iter([0.25, 0.5, 0.75, 1.0].map(|cpu| Sample { cpu }));
    let summary = control.report(samples).await?.into_inner();
    println!(
        "[agent] server summary: {} samples, mean cpu {:.2}",
        summary.count, summary.mean_cpu
    );
    if summary.count != 4 {
        return Err("server did not receive every sample".into());
    }
    agent.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(())
}
