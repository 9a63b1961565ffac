//! The direct path: tonic-generated service traits served and called with no
//! http request or response in between.
//!
//! `brpc-build` generates, beside tonic's code, a dispatcher per service
//! (`greeter_brpc::GreeterService`, a [`DirectService`]) and a typed client
//! (`greeter_brpc::GreeterClient`) with the same method signatures as tonic's.
//! Both use the functions here: a request message is decoded straight from
//! the ttrpc payload into the handler's `tonic::Request`, the reply encoded
//! straight into the Response frame. Users implement the tonic trait
//! unchanged; `Peer::from_request`, metadata, deadlines and cancellation work
//! as on the tonic path.
//!
//! What the direct path skips: tower layers added with
//! [`Router::layer`](crate::Router::layer) (they are http middleware and
//! wrap only the services served through tonic), tonic interceptors, and
//! compression (brpc never compresses).

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use prost::Message;
use tokio::time::Instant;
use tonic::Status;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::metadata::MetadataMap;

use super::Channel;
use super::channel::with_trailers;
use super::grpc::request_body;
use crate::conn::Peer;
use crate::conn::{Incoming, Input, Reply, ResponseEvent};
use crate::metadata;

/// The future a [`DirectService`] serves one call with.
pub type ServeFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A service served on the direct path: what `brpc-build` generates for each
/// proto service (`FooService::new(impl Foo)`). Host it with
/// [`Router::add_direct`](crate::Router::add_direct) or the role crates'
/// `add_direct`.
pub trait DirectService: Send + Sync + 'static {
    /// The fully qualified proto service name (`package.Service`).
    fn service_name(&self) -> &'static str;

    /// Serves one call to this service (its method is `call.method`).
    fn serve<'a>(&'a self, call: Incoming, reply: &'a mut Reply) -> ServeFuture<'a>;
}

/// A prost decoder for `tonic::codec::Streaming` (the engine has already
/// checked each message's size).
struct ProstDecoder<T>(PhantomData<fn() -> T>);

impl<T: Message + Default> Decoder for ProstDecoder<T> {
    type Item = T;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<T>, Status> {
        T::decode(buf).map(Some).map_err(decode_error)
    }
}

fn decode_error(e: prost::DecodeError) -> Status {
    Status::internal(format!("failed to decode the message: {e}"))
}

/// The handler's `tonic::Request`: `message`, the caller's metadata (and
/// `grpc-timeout` when the call has a deadline, as tonic's server sees it),
/// and the [`Peer`] as an extension for `Peer::from_request`.
fn tonic_request<T>(
    message: T,
    peer: Peer,
    entries: Vec<crate::wire::KeyValue>,
    timeout: Option<std::time::Duration>,
) -> Result<tonic::Request<T>, Status> {
    let mut request = tonic::Request::new(message);
    if !entries.is_empty() || timeout.is_some() {
        let mut headers = http::HeaderMap::new();
        metadata::append_key_values(&mut headers, entries)?;
        if let Some(timeout) = timeout {
            headers.insert(
                metadata::GRPC_TIMEOUT,
                metadata::format_grpc_timeout(timeout),
            );
        }
        *request.metadata_mut() = MetadataMap::from_headers(headers);
    }
    request.extensions_mut().insert(peer);
    Ok(request)
}

/// The one request message of a unary or server-streaming call. A peer may
/// send it as a stream of one (Request with remote-open, one Data frame).
///
/// Not an `async fn`: the stream's future is large and rare, so it is boxed,
/// and the common case is a ready value that sizes no one's future.
fn single_message(input: Input) -> impl Future<Output = Result<Bytes, Status>> + Send {
    use futures_util::future::Either;
    match input {
        Input::Single(message) => Either::Left(std::future::ready(Ok(message))),
        Input::Stream(mut messages) => Either::Right(Box::pin(async move {
            let first = messages
                .next()
                .await
                .ok_or_else(|| Status::internal("missing request message"))??;
            match messages.next().await {
                None => Ok(first),
                Some(Err(status)) => Err(status),
                Some(Ok(_)) => Err(Status::internal(
                    "more than one request message for a method that takes one",
                )),
            }
        })),
    }
}

/// A `tonic::codec::Streaming` of the request messages of a
/// client-streaming or bidi call.
fn request_stream<T: Message + Default + Send + 'static>(input: Input) -> Streaming<T> {
    Streaming::new_request(
        ProstDecoder::<T>(PhantomData),
        request_body(input),
        None,
        Some(usize::MAX),
    )
}

/// The handler's request of a unary or server-streaming call. Not an
/// `async fn`: the call is taken apart before the future is made, so the
/// future holds only what it needs.
fn single_request<Req: Message + Default>(
    call: Incoming,
) -> impl Future<Output = Result<tonic::Request<Req>, Status>> {
    let Incoming {
        peer,
        metadata,
        timeout,
        input,
        ..
    } = call;
    let message = single_message(input);
    async move {
        let message = Req::decode(message.await?).map_err(decode_error)?;
        tonic_request(message, peer, metadata, timeout)
    }
}

/// The handler's request of a client-streaming or bidi call.
fn streamed_request<Req: Message + Default + Send + 'static>(
    call: Incoming,
) -> Result<tonic::Request<Streaming<Req>>, Status> {
    let Incoming {
        peer,
        metadata,
        timeout,
        input,
        ..
    } = call;
    tonic_request(request_stream(input), peer, metadata, timeout)
}

/// The call's error: the status's metadata as trailers, then the status.
async fn fail(reply: &mut Reply, status: Status) {
    let trailers = metadata::to_key_values(status.metadata().as_ref());
    if reply.trailers(trailers).await.is_ok() {
        reply.status(status).await;
    }
}

/// Answers with a unary handler's result: headers (if any), then one
/// Response frame carrying the reply. Not an `async fn`: the common answer
/// (a reply, no metadata) is encoded at once and only its write is held;
/// the others are boxed, so they size no call's future.
fn respond_unary<'a, R: Message + 'a>(
    reply: &'a mut Reply,
    result: Result<tonic::Response<R>, Status>,
) -> impl Future<Output = ()> + Send + 'a {
    use futures_util::future::Either;
    match result {
        Ok(response) if response.metadata().is_empty() => {
            Either::Left(reply.ok_message(response.get_ref()))
        }
        result => {
            let answering: Pin<Box<dyn Future<Output = ()> + Send + 'a>> =
                Box::pin(respond_unary_slowly(reply, result));
            Either::Right(answering)
        }
    }
}

/// [`respond_unary`] with response metadata, or a failure.
async fn respond_unary_slowly<R: Message>(
    reply: &mut Reply,
    result: Result<tonic::Response<R>, Status>,
) {
    match result {
        Ok(response) => {
            let headers = metadata::to_key_values(response.metadata().as_ref());
            if !headers.is_empty() && reply.headers(headers).await.is_err() {
                return;
            }
            reply.ok_message(response.get_ref()).await;
        }
        Err(status) => fail(reply, status).await,
    }
}

/// Answers with a streaming handler's result: headers, one Data frame per
/// message, then the close (or the stream's error status).
async fn respond_stream<S, R>(reply: &mut Reply, result: Result<tonic::Response<S>, Status>)
where
    S: Stream<Item = Result<R, Status>> + Send,
    R: Message,
{
    let response = match result {
        Ok(response) => response,
        Err(status) => return fail(reply, status).await,
    };
    let headers = metadata::to_key_values(response.metadata().as_ref());
    let messages = response.into_inner();
    tokio::pin!(messages);
    let mut ready = messages.next().now_or_never();
    // A Headers frame tells a waiting caller that the handler has answered
    // (as HTTP/2 response headers do) when no message is ready yet, or
    // when the stream fails before its first message: the call then
    // succeeds and its stream ends with the error, as over HTTP/2.
    let fails_at_once = matches!(ready, Some(Some(Err(_))));
    if (!headers.is_empty() || ready.is_none() || fails_at_once)
        && reply.headers(headers).await.is_err()
    {
        return;
    }
    loop {
        let item = match ready.take() {
            Some(item) => item,
            None => messages.next().await,
        };
        match item {
            Some(Ok(message)) => {
                if reply
                    .message_payload(crate::wire::encode_message(&message))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Some(Err(status)) => return fail(reply, status).await,
            None => return reply.close().await,
        }
    }
}

// The four serving helpers below are not `async fn`s: one would hold the
// `Incoming` it is given for the whole call, beside the request made from it.

/// Serves a unary method: decode, call `handler`, answer.
pub fn unary<'a, Req, Resp, F, Fut>(
    call: Incoming,
    reply: &'a mut Reply,
    handler: F,
) -> impl Future<Output = ()> + 'a
where
    Req: Message + Default + 'a,
    Resp: Message,
    F: FnOnce(tonic::Request<Req>) -> Fut + 'a,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let request = single_request::<Req>(call);
    async move {
        let result = match request.await {
            Ok(request) => handler(request).await,
            Err(status) => Err(status),
        };
        respond_unary(reply, result).await;
    }
}

/// Serves a server-streaming method.
pub fn server_streaming<'a, Req, Resp, S, F, Fut>(
    call: Incoming,
    reply: &'a mut Reply,
    handler: F,
) -> impl Future<Output = ()> + 'a
where
    Req: Message + Default + 'a,
    Resp: Message,
    S: Stream<Item = Result<Resp, Status>> + Send,
    F: FnOnce(tonic::Request<Req>) -> Fut + 'a,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
{
    let request = single_request::<Req>(call);
    async move {
        let result = match request.await {
            Ok(request) => handler(request).await,
            Err(status) => Err(status),
        };
        respond_stream(reply, result).await;
    }
}

/// Serves a client-streaming method.
pub fn client_streaming<'a, Req, Resp, F, Fut>(
    call: Incoming,
    reply: &'a mut Reply,
    handler: F,
) -> impl Future<Output = ()> + 'a
where
    Req: Message + Default + Send + 'static,
    Resp: Message,
    F: FnOnce(tonic::Request<Streaming<Req>>) -> Fut + 'a,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let request = streamed_request(call);
    async move {
        let result = match request {
            Ok(request) => handler(request).await,
            Err(status) => Err(status),
        };
        respond_unary(reply, result).await;
    }
}

/// Serves a bidi-streaming method.
pub fn streaming<'a, Req, Resp, S, F, Fut>(
    call: Incoming,
    reply: &'a mut Reply,
    handler: F,
) -> impl Future<Output = ()> + 'a
where
    Req: Message + Default + Send + 'static,
    Resp: Message,
    S: Stream<Item = Result<Resp, Status>> + Send,
    F: FnOnce(tonic::Request<Streaming<Req>>) -> Fut + 'a,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
{
    let request = streamed_request(call);
    async move {
        let result = match request {
            Ok(request) => handler(request).await,
            Err(status) => Err(status),
        };
        respond_stream(reply, result).await;
    }
}

/// Answers a method the service does not have with `UNIMPLEMENTED`.
pub async fn unimplemented(call: Incoming, reply: &mut Reply) {
    reply
        .status(Status::unimplemented(format!(
            "method {} of service {}",
            call.method, call.service
        )))
        .await;
}

impl Channel {
    /// Calls unary method `service`/`method` on the direct path: the request
    /// message is encoded straight into the ttrpc Request, the reply decoded
    /// straight from the Response. What `brpc-build`'s typed clients call;
    /// the outcome is what a tonic client of the same method sees.
    ///
    /// # Errors
    /// The call's status: the callee's, or `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
    /// `RESOURCE_EXHAUSTED`, `INTERNAL` (a reply that does not decode) from
    /// this side.
    pub async fn unary<Req, Resp>(
        &self,
        request: tonic::Request<Req>,
        service: &str,
        method: &str,
    ) -> Result<tonic::Response<Resp>, Status>
    where
        Req: Message,
        Resp: Message + Default,
    {
        let (request_metadata, _, message) = request.into_parts();
        let headers = request_metadata.into_headers();
        // Most calls carry no metadata: then not even the deadline is looked up.
        let (deadline, entries) = if headers.is_empty() {
            (None, Vec::new())
        } else {
            let deadline = headers
                .get(metadata::GRPC_TIMEOUT)
                .and_then(metadata::parse_grpc_timeout)
                .map(|timeout| Instant::now() + timeout);
            (deadline, metadata::to_key_values(&headers))
        };
        let peer = self.resolve(deadline).await?;
        let mut call = peer
            .start_call_with_message(service, method, entries, deadline, &message)
            .await?;
        let mut response_headers = http::HeaderMap::new();
        let mut reply = None;
        loop {
            match call.next_event().await {
                ResponseEvent::Headers(entries) => {
                    metadata::append_answer_key_values(&mut response_headers, entries)?;
                }
                ResponseEvent::Message(message) => {
                    if reply.replace(message).is_some() {
                        return Err(Status::internal(
                            "the peer sent more than one reply message for a unary call",
                        ));
                    }
                }
                ResponseEvent::End {
                    status,
                    message,
                    trailers,
                } => {
                    if let Err(status) = status {
                        return Err(with_trailers(status, trailers));
                    }
                    let payload = match (message, reply) {
                        (Some(payload), None) | (None, Some(payload)) => payload,
                        (Some(_), Some(_)) => {
                            return Err(Status::internal(
                                "the peer sent more than one reply message for a unary call",
                            ));
                        }
                        (None, None) => {
                            return Err(Status::internal(
                                "the peer ended the call without a reply message",
                            ));
                        }
                    };
                    let reply = Resp::decode(payload).map_err(decode_error)?;
                    // As tonic does, the trailers join the response metadata.
                    if !trailers.is_empty() {
                        metadata::append_answer_key_values(&mut response_headers, trailers)?;
                    }
                    return Ok(tonic::Response::from_parts(
                        MetadataMap::from_headers(response_headers),
                        reply,
                        http::Extensions::new(),
                    ));
                }
            }
        }
    }
}
