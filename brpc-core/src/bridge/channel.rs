//! [`Channel`]: a `tonic::client::GrpcService` that turns each tonic call into one
//! ttrpc call on its own QUIC stream to the peer.
//!
//! The call shape is read off the request body: a body that holds exactly one
//! message and has ended is sent inside the Request (unary and server-streaming
//! calls always are); anything else opens a stream (Request with remote-open,
//! then Data frames). Responses are read whatever their shape.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use http_body::Frame as BodyFrame;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;

use super::grpc::{BodyEvent, MessageReader, message_prefix, trailers_for};
use crate::conn::{BoxFuture, OutgoingCall, Peer, RequestBody, ResponseEvent, end_status};
use crate::metadata;
use crate::wire::KeyValue;

/// Calls the services of one peer. Hand it to any tonic-generated client:
/// `GreeterClient::new(peer.channel())`. Cheap to clone; every call opens its
/// own QUIC stream on the shared connection.
///
/// Errors reach the caller as `tonic::Status`: `UNAVAILABLE` when the
/// connection is gone, `DEADLINE_EXCEEDED` at the call's timeout,
/// `RESOURCE_EXHAUSTED` for a message over the maximum size, and whatever the
/// remote handler returned.
///
/// ```no_run
/// # fn run(peer: brpc_core::Peer) {
/// // Any tonic-generated client takes it: GreeterClient::new(channel).
/// let channel = peer.channel();
/// # drop(channel); }
/// ```
#[derive(Clone, Debug)]
pub struct Channel {
    target: Target,
    wait_for_ready: bool,
}

#[derive(Clone, Debug)]
enum Target {
    /// Always this connection.
    Peer(Peer),
    /// Whatever connection is current (a reconnecting client's), until the
    /// client is closed for good.
    Current {
        current: watch::Receiver<Option<Peer>>,
        closed: watch::Receiver<bool>,
    },
}

impl Channel {
    fn new(peer: Peer) -> Self {
        Channel {
            target: Target::Peer(peer),
            wait_for_ready: false,
        }
    }

    /// A channel that calls whichever peer `current` holds at the time of
    /// each call (`None` while disconnected), until `closed` says the client
    /// is closed for good (then calls fail at once, waiting or not).
    /// brpc-client uses it so one channel survives reconnects.
    #[doc(hidden)]
    pub fn follow(current: watch::Receiver<Option<Peer>>, closed: watch::Receiver<bool>) -> Self {
        Channel {
            target: Target::Current { current, closed },
            wait_for_ready: false,
        }
    }

    /// With `true`, a call made while there is no usable connection waits for
    /// one (up to the call's deadline, if it has one) instead of failing at
    /// once with `UNAVAILABLE`, like gRPC's wait-for-ready.
    pub fn wait_for_ready(mut self, wait: bool) -> Self {
        self.wait_for_ready = wait;
        self
    }

    /// The peer a call made now would go to, if any.
    pub fn peer(&self) -> Option<Peer> {
        match &self.target {
            Target::Peer(peer) => Some(peer.clone()),
            Target::Current { current, .. } => current.borrow().clone(),
        }
    }

    /// The peer to call, waiting for one if asked to.
    pub(super) async fn resolve(&self, deadline: Option<Instant>) -> Result<Peer, Status> {
        let (mut current, mut closed) = match &self.target {
            // The engine refuses calls to a peer that is going away.
            Target::Peer(peer) => return Ok(peer.clone()),
            Target::Current { current, closed } => (current.clone(), closed.clone()),
        };
        let client_closed = || Status::unavailable("the client was closed");
        loop {
            if let Some(peer) = current.borrow_and_update().clone()
                && peer.is_usable()
            {
                return Ok(peer);
            }
            if *closed.borrow_and_update() {
                return Err(client_closed());
            }
            if !self.wait_for_ready {
                return Err(Status::unavailable(
                    "not connected to the server (reconnecting); retry, or use wait_for_ready",
                ));
            }
            let changed = async {
                tokio::select! {
                    changed = current.changed() => changed,
                    changed = closed.changed() => changed,
                }
            };
            let changed = match deadline {
                None => changed.await,
                Some(at) => tokio::time::timeout_at(at, changed).await.map_err(|_| {
                    Status::deadline_exceeded("deadline exceeded before the call was sent")
                })?,
            };
            changed.map_err(|_| client_closed())?;
        }
    }
}

impl Peer {
    /// A channel that calls the services this peer hosts.
    pub fn channel(&self) -> Channel {
        Channel::new(self.clone())
    }

    /// A typed client of a service this peer hosts, e.g. `peer.client(NamerClient::new)`.
    pub fn client<C>(&self, make: impl FnOnce(Channel) -> C) -> C {
        make(self.channel())
    }
}

impl tower_service::Service<http::Request<Body>> for Channel {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let channel = self.clone();
        Box::pin(async move {
            Ok(match start_call(channel, request).await {
                Ok(response) => response,
                Err(status) => status.into_http(),
            })
        })
    }
}

/// How the request travels, decided from what the body has ready.
enum Shape {
    /// One message, inside the Request.
    Single(Bytes),
    /// Request with remote-open; these messages first, then the rest of the body.
    Stream { ready: Vec<Bytes>, ended: bool },
}

fn shape_of(body: &mut MessageReader<Body>) -> Result<Shape, Status> {
    let first = match body.next_now() {
        None => {
            return Ok(Shape::Stream {
                ready: vec![],
                ended: false,
            });
        }
        Some(event) => event?,
    };
    let first = match first {
        BodyEvent::Message(m) => m,
        BodyEvent::Trailers(_) | BodyEvent::End => {
            return Ok(Shape::Stream {
                ready: vec![],
                ended: true,
            });
        }
    };
    match body.next_now() {
        None => Ok(Shape::Stream {
            ready: vec![first],
            ended: false,
        }),
        Some(event) => match event? {
            BodyEvent::Trailers(_) | BodyEvent::End => Ok(Shape::Single(first)),
            BodyEvent::Message(second) => Ok(Shape::Stream {
                ready: vec![first, second],
                ended: false,
            }),
        },
    }
}

fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

async fn start_call(
    channel: Channel,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    let (parts, body) = request.into_parts();
    let Some((service, method)) = split_path(parts.uri.path()) else {
        return Err(Status::unimplemented(format!(
            "{:?} is not a gRPC method path (/package.Service/Method)",
            parts.uri.path()
        )));
    };
    let timeout = parts
        .headers
        .get(metadata::GRPC_TIMEOUT)
        .and_then(metadata::parse_grpc_timeout);
    let deadline = timeout.map(|t| Instant::now() + t);
    let peer = channel.resolve(deadline).await?;
    let max = peer.max_message_size();
    let mut body = MessageReader::new(body, max);
    let request_body = match shape_of(&mut body)? {
        Shape::Single(message) => RequestBody::Single(message),
        Shape::Stream { ready, ended } => {
            let rest = (!ended).then_some(body);
            RequestBody::Stream(Box::pin(
                stream::iter(ready.into_iter().map(Ok)).chain(body_messages(rest)),
            ))
        }
    };
    let metadata = metadata::to_key_values(&parts.headers);
    let mut call = peer
        .start_call(service, method, metadata, deadline, request_body)
        .await?;
    // Wait for the callee's first answer, as an HTTP/2 client waits for the
    // response headers: a Headers frame, a first message, or the end. A plain
    // ttrpc callee sends no Headers, so its calls start at once.
    let first = if peer.remote_is_brpc() {
        Some(call.next_event().await)
    } else {
        None
    };
    let mut headers = http::HeaderMap::new();
    let mut state = ResponseBody {
        call: Some(call),
        waiting: None,
        pending_chunk: None,
        pending_message: None,
        pending_trailers: None,
    };
    match first {
        None => {}
        Some(ResponseEvent::Headers(entries)) => {
            metadata::append_answer_key_values(&mut headers, entries)?;
        }
        Some(ResponseEvent::Message(m)) => state.pending_message = Some(m),
        Some(ResponseEvent::End {
            status: Err(status),
            message: None,
            trailers,
        }) => {
            // Trailers-only: tonic returns this status from the call itself.
            return Err(with_trailers(status, trailers));
        }
        Some(ResponseEvent::End {
            status,
            message,
            trailers,
        }) => state.end(status, message, trailers),
    }
    let mut response = http::Response::new(Body::new(state));
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The messages still to come from a request body (none if it has ended).
fn body_messages(
    body: Option<MessageReader<Body>>,
) -> impl Stream<Item = Result<Bytes, Status>> + Send {
    stream::unfold(body, |body| async move {
        let mut body = body?;
        match body.next().await {
            Ok(BodyEvent::Message(message)) => Some((Ok(message), Some(body))),
            Ok(BodyEvent::Trailers(_) | BodyEvent::End) => None,
            Err(status) => Some((Err(status), None)),
        }
    })
}

/// `status` carrying the callee's `trailers` as its metadata, as tonic
/// reports trailers of a failed call. Bad trailers turn an OK status into
/// `INTERNAL` (the answer was malformed); an error status stays what it
/// was, without them.
pub(super) fn with_trailers(mut status: Status, trailers: Vec<KeyValue>) -> Status {
    if trailers.is_empty() {
        return status;
    }
    let mut map = tonic::metadata::MetadataMap::new().into_headers();
    match metadata::append_answer_key_values(&mut map, trailers) {
        Ok(()) => *status.metadata_mut() = tonic::metadata::MetadataMap::from_headers(map),
        Err(bad) if status.code() == tonic::Code::Ok => return bad,
        Err(_) => {}
    }
    status
}

/// The caller's view of the response as an http body: the engine's events
/// in, gRPC-framed messages and trailers out. Dropping it before the call
/// ended cancels the call (the engine's [`OutgoingCall`] does).
///
/// A unary answer has usually ended by the time the body is made (its one
/// frame carries the message and the status), so the body only hands over
/// what it holds; an event still to come is awaited in a boxed future that
/// owns the call meanwhile.
struct ResponseBody {
    /// The call, while no event is being awaited.
    call: Option<OutgoingCall>,
    /// The next event being awaited, with the call it comes from.
    waiting: Option<BoxFuture<'static, (OutgoingCall, ResponseEvent)>>,
    /// A message whose prefix has gone out, to go out next as it is.
    pending_chunk: Option<Bytes>,
    /// A message read but not yet handed to tonic (at most one is ever
    /// waiting: the body yields it before reading on).
    pending_message: Option<Bytes>,
    /// The trailers ending the body, once the call has ended.
    pending_trailers: Option<http::HeaderMap>,
}

type BodyItem = Result<BodyFrame<Bytes>, Status>;

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BodyItem>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.pending_chunk.take() {
                return Poll::Ready(Some(Ok(BodyFrame::data(chunk))));
            }
            if let Some(m) = this.pending_message.take() {
                return Poll::Ready(Some(Ok(this.prefix_of(m))));
            }
            if let Some(trailers) = this.pending_trailers.take() {
                return Poll::Ready(Some(Ok(BodyFrame::trailers(trailers))));
            }
            let waiting = match &mut this.waiting {
                Some(waiting) => waiting,
                None => match this.call.take() {
                    Some(mut call) if !call.is_done() => {
                        this.waiting.insert(Box::pin(async move {
                            let event = call.next_event().await;
                            (call, event)
                        }))
                    }
                    done => {
                        this.call = done;
                        return Poll::Ready(None);
                    }
                },
            };
            let (call, event) = std::task::ready!(waiting.as_mut().poll(cx));
            this.waiting = None;
            this.call = Some(call);
            match event {
                ResponseEvent::Headers(_) => continue,
                ResponseEvent::Message(m) => return Poll::Ready(Some(Ok(this.prefix_of(m)))),
                ResponseEvent::End {
                    status,
                    message,
                    trailers,
                } => this.end(status, message, trailers),
            }
        }
    }
}

impl ResponseBody {
    /// The gRPC prefix of `message`, which goes out next.
    fn prefix_of(&mut self, message: Bytes) -> BodyFrame<Bytes> {
        let prefix = message_prefix(message.len());
        if !message.is_empty() {
            self.pending_chunk = Some(message);
        }
        BodyFrame::data(prefix)
    }

    /// The call ended: its last message (if any), then trailers carrying
    /// `status`, are what the body yields next. Even an OK end has trailers:
    /// tonic (0.14.9 on) reads a body that ends without `grpc-status` as
    /// `UNKNOWN`, as grpc-go does.
    fn end(&mut self, status: Result<(), Status>, last: Option<Bytes>, trailers: Vec<KeyValue>) {
        self.pending_message = last;
        self.pending_trailers = Some(match status {
            // The common end, without building a `Status` (an allocation),
            // and with a static name (a name made from a `&str` is copied).
            Ok(()) if trailers.is_empty() => {
                let mut map = http::HeaderMap::new();
                map.insert(metadata::GRPC_STATUS, http::HeaderValue::from_static("0"));
                map
            }
            status => trailers_for(&with_trailers(end_status(status), trailers)),
        });
    }
}
