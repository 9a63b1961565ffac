//! Middleware: tower layers on the calls each side serves (a custom auth layer,
//! tower's ConcurrencyLimit) and tonic interceptors, on outgoing clients and
//! on hosted servers (`with_interceptor`).

use crate::common;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use common::EchoService;
use common::echo::echo_client::EchoClient;
use common::echo::{EchoRequest, SleepRequest};
use tonic::body::Body;
use tonic::service::Interceptor;
use tonic::{Code, Request, Status};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service};

const TOKEN: &str = "Bearer let-me-in";

/// Rejects calls whose `authorization` metadata is not [`TOKEN`].
#[derive(Clone)]
struct AuthLayer;

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth(inner)
    }
}

#[derive(Clone)]
struct Auth<S>(S);

impl<S> Service<http::Request<Body>> for Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(TOKEN)
        {
            let clone = self.0.clone();
            let mut inner = std::mem::replace(&mut self.0, clone);
            Box::pin(async move { inner.call(request).await })
        } else {
            Box::pin(async { Ok(Status::unauthenticated("missing or wrong token").into_http()) })
        }
    }
}

fn with_token(mut request: Request<()>) -> Result<Request<()>, Status> {
    request.metadata_mut().insert(
        "authorization",
        TOKEN.parse().map_err(|_| Status::internal("token"))?,
    );
    Ok(request)
}

async fn check_auth<F: Interceptor>(channel: brpc::Channel, interceptor: F) {
    let err = EchoClient::new(channel.clone())
        .unary(EchoRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "missing or wrong token");
    let reply = EchoClient::with_interceptor(channel, interceptor)
        .unary(EchoRequest {
            seq: 5,
            ..Default::default()
        })
        .await
        .expect("token accepted");
    assert_eq!(reply.into_inner().seq, 5);
}

/// [`check_auth`] on the client's calls to the server and the server's calls
/// back to the client.
async fn check_auth_each_side(server: &brpc::Server, client: &brpc::Client) {
    check_auth(client.channel(), with_token).await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    check_auth(peer.channel(), with_token).await;
}

#[tokio::test]
async fn an_auth_layer_guards_each_side() {
    let server = brpc::Server::builder()
        .layer(AuthLayer)
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = common::client_builder(&server, "agent", EchoService::new("agent"))
        .layer(AuthLayer)
        .connect(server.local_addr())
        .await
        .expect("connect");
    check_auth_each_side(&server, &client).await;
}

async fn check_concurrency_limit(channel: brpc::Channel, probe: &common::Probe) {
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let mut echo = EchoClient::new(channel.clone());
            tokio::spawn(async move { echo.sleep(SleepRequest { millis: 300 }).await })
        })
        .collect();
    for call in calls {
        call.await
            .expect("join")
            .expect("call succeeds, just later");
    }
    assert_eq!(
        probe.max_in_flight.load(Ordering::SeqCst),
        2,
        "at most 2 handlers ran at once"
    );
    assert_eq!(probe.dropped.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_concurrency_limit_bounds_handlers_on_each_side() {
    let server_echo = EchoService::new("server");
    let server_probe = server_echo.probe.clone();
    let server = brpc::Server::builder()
        .layer(ConcurrencyLimitLayer::new(2))
        .add_service(common::echo::echo_server::EchoServer::new(server_echo))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client_echo = EchoService::new("agent");
    let client_probe = client_echo.probe.clone();
    let client = common::client_builder(&server, "agent", client_echo)
        .layer(ConcurrencyLimitLayer::new(2))
        .connect(server.local_addr())
        .await
        .expect("connect");
    check_concurrency_limit(client.channel(), &server_probe).await;
    let peer = server
        .peers()
        .get(client.connection_id())
        .expect("registered");
    check_concurrency_limit(peer.channel(), &client_probe).await;
}

/// The server-side interceptor tonic users write,
/// `FooServer::with_interceptor(svc, check)`, hosted unchanged on both sides.
fn check_token(request: Request<()>) -> Result<Request<()>, Status> {
    match request.metadata().get("authorization") {
        Some(token) if token == TOKEN => Ok(request),
        _ => Err(Status::unauthenticated("missing or wrong token")),
    }
}

#[tokio::test]
async fn a_tonic_server_interceptor_guards_each_side() {
    use common::echo::echo_server::EchoServer;
    let server = brpc::Server::builder()
        .add_service(EchoServer::with_interceptor(
            EchoService::new("server"),
            check_token,
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = brpc::Client::builder()
        .name("agent")
        .add_service(EchoServer::with_interceptor(
            EchoService::new("agent"),
            check_token,
        ))
        .pin_certificate(server.certificate().clone())
        .connect(server.local_addr())
        .await
        .expect("connect");
    check_auth_each_side(&server, &client).await;
}

/// A server hosting Echo behind `layer`, and a client connected to it.
async fn behind(layer: impl brpc::core::bridge::CallLayer) -> (brpc::Server, brpc::Client) {
    let server = brpc::Server::builder()
        .layer(layer)
        .add_service(common::echo::echo_server::EchoServer::new(
            EchoService::new("server"),
        ))
        .bind("127.0.0.1:0")
        .expect("bind");
    let client = common::client_builder(&server, "agent", EchoService::new("agent"))
        .connect(server.local_addr())
        .await
        .expect("connect");
    (server, client)
}

#[tokio::test]
async fn behind_a_layer_unknown_services_and_methods_still_say_what_is_missing() {
    let (_server, client) = behind(ConcurrencyLimitLayer::new(4)).await;
    let unary = |path: &'static str| {
        let channel = client.channel();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.expect("ready");
            grpc.unary::<EchoRequest, common::echo::EchoReply, _>(
                Request::new(EchoRequest::default()),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await
        }
    };
    unary("/test.echo.v1.Echo/Unary")
        .await
        .expect("a known method passes the layer");
    let err = unary("/test.echo.v1.Echo/Nope")
        .await
        .expect_err("no such method");
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), "method Nope");
    let err = unary("/no.Such/Unary").await.expect_err("no such service");
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), "service no.Such");
}

/// A layer that answers every call itself with plain http: its status and
/// an empty body, no grpc-status (what tower-http's auth layers do).
#[derive(Clone, Copy)]
struct PlainHttp(http::StatusCode);

impl<S> Layer<S> for PlainHttp {
    type Service = PlainHttp;
    fn layer(&self, _inner: S) -> PlainHttp {
        *self
    }
}

impl Service<http::Request<Body>> for PlainHttp {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<Body>) -> Self::Future {
        let mut response = http::Response::new(Body::empty());
        *response.status_mut() = self.0;
        std::future::ready(Ok(response))
    }
}

#[tokio::test]
async fn a_layer_answering_plain_http_fails_the_call_as_grpc_maps_it() {
    for (status, code) in [
        (http::StatusCode::UNAUTHORIZED, Code::Unauthenticated),
        (http::StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
        (http::StatusCode::IM_A_TEAPOT, Code::Unknown),
        // 200 and a body that ends without a grpc-status: not OK either.
        (http::StatusCode::OK, Code::Unknown),
    ] {
        let (_server, client) = behind(PlainHttp(status)).await;
        let mut echo = EchoClient::new(client.channel());
        let err = echo
            .unary(EchoRequest::default())
            .await
            .expect_err("the layer refused it");
        assert_eq!(err.code(), code, "unary, http {status}: {err:?}");
        // A stream that would otherwise read as empty and OK.
        let err = match echo
            .range(common::echo::RangeRequest { from: 0, to: 3 })
            .await
        {
            Err(err) => err,
            Ok(stream) => stream
                .into_inner()
                .message()
                .await
                .expect_err("no messages, an error"),
        };
        assert_eq!(err.code(), code, "server-streaming, http {status}: {err:?}");
    }
}
