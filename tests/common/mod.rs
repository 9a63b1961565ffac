//! Shared fixtures for the end-to-end tests: an Echo service that both sides
//! host, and helpers to start a server and connect clients over loopback QUIC.
#![allow(dead_code, missing_docs)]

use std::pin::Pin;
use std::time::Duration;

use brpc::{Client, Server};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

pub mod echo {
    #![allow(missing_docs)]
    tonic::include_proto!("test.echo.v1");
}
pub mod greeter {
    #![allow(missing_docs)]
    tonic::include_proto!("greeter.v1");
}

use echo::echo_server::{Echo, EchoServer};
use echo::{EchoReply, EchoRequest, FailRequest, Number, RangeRequest, SleepRequest};

/// Echo, answering as `who` ("server" or the client's name).
#[derive(Clone)]
pub struct EchoService {
    pub who: String,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl EchoService {
    fn reply(&self, r: EchoRequest) -> EchoReply {
        EchoReply {
            text: r.text,
            blob: r.blob,
            seq: r.seq,
            answered_by: self.who.clone(),
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(self.reply(request.into_inner())))
    }

    async fn fail(&self, request: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        let r = request.into_inner();
        Err(Status::new(Code::from_i32(r.code), r.message))
    }

    async fn sleep(&self, request: Request<SleepRequest>) -> Result<Response<EchoReply>, Status> {
        tokio::time::sleep(Duration::from_millis(request.into_inner().millis)).await;
        Ok(Response::new(EchoReply {
            answered_by: self.who.clone(),
            ..Default::default()
        }))
    }

    type RangeStream = ReplyStream;

    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<ReplyStream>, Status> {
        let RangeRequest { from, to } = request.into_inner();
        let who = self.who.clone();
        let stream = tokio_stream::iter(from..to).map(move |seq| {
            Ok(EchoReply {
                seq,
                answered_by: who.clone(),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn sum(&self, request: Request<Streaming<Number>>) -> Result<Response<Number>, Status> {
        let mut stream = request.into_inner();
        let mut total = 0i64;
        while let Some(n) = stream.next().await {
            total += n?.value;
        }
        Ok(Response::new(Number { value: total }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let this = self.clone();
        let stream = request.into_inner().map(move |r| r.map(|r| this.reply(r)));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A server on 127.0.0.1:0 hosting Echo (answering as "server").
pub fn server() -> Server {
    Server::builder()
        .add_service(EchoServer::new(EchoService {
            who: "server".into(),
        }))
        .bind("127.0.0.1:0")
        .expect("bind")
}

/// A client of `server` named `name`, hosting Echo (answering as `name`).
pub async fn client(server: &Server, name: &str) -> Client {
    Client::builder()
        .name(name)
        .label("role", "test")
        .add_service(EchoServer::new(EchoService { who: name.into() }))
        .pin_certificate(server.certificate().clone())
        .connect(server.local_addr())
        .await
        .expect("connect")
}

/// Polls `condition` every 10 ms until it holds; panics after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
