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
use futures_util::stream;
use http_body::Frame as BodyFrame;
use http_body_util::StreamBody;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tracing::Instrument;

use super::grpc::{BodyEvent, MessageReader, frame_message, trailers_for};
use std::sync::{Arc, Mutex};

use crate::conn::call_io::{CallReader, CallWriter, SendError, SharedCall, lock, now};
use crate::conn::{CallRecord, Peer, ReadError, codes};
use crate::metadata;
use crate::wire::{Failure, Inbound, KeyValue, Request, RequestShape, encode_request};

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
    /// Whatever connection is current (a reconnecting client's).
    Current(watch::Receiver<Option<Peer>>),
}

impl Channel {
    pub(crate) fn new(peer: Peer) -> Self {
        Channel {
            target: Target::Peer(peer),
            wait_for_ready: false,
        }
    }

    /// A channel that calls whichever peer `current` holds at the time of
    /// each call (`None` while disconnected). brpc-client uses it so one
    /// channel survives reconnects.
    pub fn follow(current: watch::Receiver<Option<Peer>>) -> Self {
        Channel {
            target: Target::Current(current),
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
            Target::Current(current) => current.borrow().clone(),
        }
    }

    /// The peer to call, waiting for one if asked to.
    async fn resolve(&self, deadline: Option<Instant>) -> Result<Peer, Status> {
        let mut current = match &self.target {
            Target::Peer(peer) if peer.is_going_away() => {
                return Err(Status::unavailable(
                    "the peer is going away (it sent GoAway); reconnect and retry",
                ));
            }
            Target::Peer(peer) => return Ok(peer.clone()),
            Target::Current(current) => current.clone(),
        };
        loop {
            if let Some(peer) = current.borrow_and_update().clone()
                && peer.is_usable()
            {
                return Ok(peer);
            }
            if !self.wait_for_ready {
                return Err(Status::unavailable(
                    "not connected to the server (reconnecting); retry, or use wait_for_ready",
                ));
            }
            let changed = async {
                current
                    .changed()
                    .await
                    .map_err(|_| Status::unavailable("the client was closed"))
            };
            with_deadline(deadline, changed).await?;
        }
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
        .get("grpc-timeout")
        .and_then(metadata::parse_grpc_timeout);
    let deadline = timeout.map(|t| Instant::now() + t);
    let peer = channel.resolve(deadline).await?;
    let record = CallRecord::new(&peer, false);
    record.named(service, method);
    let span = record.span().clone();
    let mut record = Some(record);
    let result = open_call(peer, &parts, body, service, method, deadline, &mut record)
        .instrument(span)
        .await;
    match result {
        Ok(response) => Ok(response),
        Err(status) => {
            if let Some(record) = record.as_mut() {
                record.finish(status.code());
            }
            Err(status)
        }
    }
}

async fn open_call(
    peer: Peer,
    parts: &http::request::Parts,
    body: Body,
    service: &str,
    method: &str,
    deadline: Option<Instant>,
    record: &mut Option<CallRecord>,
) -> Result<http::Response<Body>, Status> {
    let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let max = peer.max_message_size();
    let mut envelope = Request {
        service: service.to_owned(),
        method: method.to_owned(),
        payload: Bytes::new(),
        timeout_nano: metadata::to_timeout_nano(timeout),
        metadata: metadata::to_key_values(&parts.headers),
    };

    let mut body = MessageReader::new(body, max);
    let shape = shape_of(&mut body)?;

    // The Request: the single message inside it, or a stream with the
    // messages following as Data.
    let rest = match shape {
        Shape::Single(message) => {
            envelope.payload = message;
            None
        }
        Shape::Stream { ready, ended } => Some((ready, ended)),
    };
    let request_shape = if rest.is_some() {
        RequestShape::Stream
    } else {
        RequestShape::Single
    };
    let encoded = encode_request(&envelope, max)?;
    let opened = with_deadline(deadline, peer.open_call(encoded, request_shape)).await?;
    let (mut send, reader) = (opened.writer, opened.reader);
    let mut call = opened.call;
    call.set_deadline(deadline.map(Instant::into_std));
    let call: SharedCall = Arc::new(Mutex::new(call));
    let pump = match rest {
        None => {
            match opened.sent.map_err(SendFailure::from) {
                Ok(()) => send.finish(),
                // The callee refused the request (e.g. too large): its Response says why.
                Err(SendFailure::PeerStopped) => {}
                Err(SendFailure::Local(status)) => return Err(status),
            }
            None
        }
        Some((ready, ended)) => {
            opened.sent.map_err(write_status)?;
            let (cancel, cancelled) = oneshot::channel();
            let (failed, failure) = oneshot::channel();
            let body = (!ended).then_some(body);
            tokio::spawn(pump_requests(
                send,
                call.clone(),
                ready,
                body,
                cancelled,
                failed,
            ));
            Some(Pump {
                _cancel: cancel,
                failure: Some(failure),
            })
        }
    };

    let mut state = ResponseState {
        record: record.take(),
        reader,
        call,
        trailers: Vec::new(),
        pending_message: None,
        pending_trailers: None,
        done: false,
        pump,
    };
    // Wait for the callee's first answer, as an HTTP/2 client waits for the
    // response headers: a Headers frame, a first message, or the end. A plain
    // ttrpc callee sends no Headers, so its calls start at once.
    let mut headers = http::HeaderMap::new();
    let first = if peer.remote_is_brpc() {
        state.next_event().await
    } else {
        ResponseEvent::Headers(Vec::new())
    };
    match first {
        ResponseEvent::Headers(entries) => metadata::append_key_values(&mut headers, entries)?,
        ResponseEvent::Message(m) => state.pending_message = Some(m),
        ResponseEvent::End(status, None) if status.code() != tonic::Code::Ok => {
            // Trailers-only: tonic returns this status from the call itself.
            return Err(state.finish(status));
        }
        ResponseEvent::End(status, last) => state.end(status, last),
    }
    let body = StreamBody::new(stream::unfold(state, ResponseState::next_frame));
    let mut response = http::Response::new(Body::new(body));
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

fn write_status(e: SendError) -> Status {
    match e {
        SendError::Stopped => Status::cancelled("peer stopped reading the call"),
        SendError::Lost(reason) => Status::unavailable(format!("connection lost: {reason}")),
    }
}

async fn with_deadline<T, E: From<Status>>(
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match deadline {
        None => work.await,
        Some(at) => tokio::time::timeout_at(at, work).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded("deadline exceeded before the call was sent").into())
        }),
    }
}

/// Sends the rest of a streaming request as Data frames the call's machine
/// builds, then the close frame. Stops (resetting the stream) when the
/// response side is dropped; a local failure (an oversized message, an error
/// from the caller's stream) resets the stream and is reported to the
/// response side through `failed`.
async fn pump_requests(
    mut send: CallWriter,
    call: SharedCall,
    ready: Vec<Bytes>,
    body: Option<MessageReader<Body>>,
    cancelled: oneshot::Receiver<()>,
    failed: oneshot::Sender<Status>,
) {
    let work = async {
        for message in ready {
            let frame = lock(&call).send_message(message)?;
            send.write_frame(frame).await?;
        }
        if let Some(mut body) = body {
            while let BodyEvent::Message(message) = body.next().await? {
                let frame = lock(&call).send_message(message)?;
                send.write_frame(frame).await?;
            }
        }
        let close = lock(&call).close_send()?;
        send.write_frame(close).await?;
        send.finish();
        Ok::<(), SendFailure>(())
    };
    let outcome = tokio::select! {
        result = work => result,
        _ = cancelled => Err(SendFailure::Local(Status::cancelled("call dropped"))),
    };
    match outcome {
        Ok(()) => {}
        // The callee stopped reading: the call is over and its answer (read
        // by the response side) says why.
        Err(SendFailure::PeerStopped) => {}
        Err(SendFailure::Local(status)) => {
            send.reset(codes::STREAM_CANCELLED);
            let _ = failed.send(status);
        }
    }
}

/// Why sending (part of) a request stopped.
enum SendFailure {
    /// The callee sent STOP_SENDING; its Response or reset tells the caller why.
    PeerStopped,
    /// A local reason, reported to the caller as this status.
    Local(Status),
}

impl From<SendError> for SendFailure {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Stopped => SendFailure::PeerStopped,
            other => SendFailure::Local(write_status(other)),
        }
    }
}

impl From<Status> for SendFailure {
    fn from(status: Status) -> Self {
        SendFailure::Local(status)
    }
}

/// The response side's link to the request pump.
struct Pump {
    /// Dropped with the response: tells the pump to reset the request stream.
    _cancel: oneshot::Sender<()>,
    /// A local failure of the request side, which ends the call.
    failure: Option<oneshot::Receiver<Status>>,
}

/// The caller's view of the response: frames in, http body frames out. Dropping
/// it before the call ended cancels the call (STOP_SENDING, and a reset of the
/// request stream through the pump).
struct ResponseState {
    /// Outcome and in-flight count of the call (always set; an Option only so
    /// the call can give it back on early errors).
    record: Option<CallRecord>,
    reader: CallReader,
    call: SharedCall,
    trailers: Vec<KeyValue>,
    /// A message read but not yet handed to tonic (at most one is ever
    /// waiting: the body yields it before reading on).
    pending_message: Option<Bytes>,
    /// The trailers ending the body, once the call has ended.
    pending_trailers: Option<http::HeaderMap>,
    done: bool,
    pump: Option<Pump>,
}

type BodyItem = Result<BodyFrame<Bytes>, Status>;

enum ResponseEvent {
    Headers(Vec<KeyValue>),
    Message(Bytes),
    /// The call ended with this status, after this last message (OK Response).
    End(Status, Option<Bytes>),
}

enum Next {
    Frame(Result<Option<crate::wire::Frame>, crate::conn::ReadError>),
    PumpFailed(Option<Status>),
}

impl ResponseState {
    async fn next_frame(mut self) -> Option<(BodyItem, Self)> {
        loop {
            if let Some(m) = self.pending_message.take() {
                return Some((Ok(BodyFrame::data(frame_message(&m))), self));
            }
            if let Some(trailers) = self.pending_trailers.take() {
                return Some((Ok(BodyFrame::trailers(trailers)), self));
            }
            if self.done {
                return None;
            }
            match self.next_event().await {
                ResponseEvent::Headers(_) => continue,
                ResponseEvent::Message(m) => {
                    return Some((Ok(BodyFrame::data(frame_message(&m))), self));
                }
                ResponseEvent::End(status, last) => self.end(status, last),
            }
        }
    }

    /// The next event; an error (deadline, protocol, lost connection) is an
    /// `End` after which the call is cancelled as the call's machine says.
    async fn next_event(&mut self) -> ResponseEvent {
        let deadline = lock(&self.call).deadline();
        let result = match deadline {
            None => self.read_event().await,
            Some(at) => tokio::time::timeout_at(Instant::from_std(at), self.read_event())
                .await
                .unwrap_or_else(|_| Err(Failure::Local(Status::deadline_exceeded("")))),
        };
        let failure = match result {
            Ok(event) => return event,
            Err(failure) => failure,
        };
        let abort = {
            let mut call = lock(&self.call);
            // The deadline's own words when it is what ended the call.
            call.handle_timeout(now())
                .unwrap_or_else(|| call.abort(failure))
        };
        if let Some(code) = abort.stop {
            self.reader.stop(code);
        }
        self.pump.take();
        ResponseEvent::End(abort.status, None)
    }

    async fn read_event(&mut self) -> Result<ResponseEvent, Failure> {
        loop {
            let next = match self.pump.as_mut().and_then(|p| p.failure.as_mut()) {
                None => Next::Frame(self.reader.next().await),
                Some(failure) => tokio::select! {
                    biased;
                    frame = self.reader.next() => Next::Frame(frame),
                    failed = failure => Next::PumpFailed(failed.ok()),
                },
            };
            let frame = match next {
                Next::Frame(Ok(Some(frame))) => frame,
                Next::Frame(Ok(None)) => {
                    let status = lock(&self.call).recv_finished().unwrap_or_else(|| {
                        Status::internal("peer ended the call's stream without a status")
                    });
                    return Err(Failure::Local(status));
                }
                Next::Frame(Err(e)) => {
                    let status = e.to_status();
                    return Err(match e {
                        ReadError::TooLarge(_) => Failure::TooLarge(status),
                        ReadError::Truncated => Failure::Protocol(status),
                        _ => Failure::Local(status),
                    });
                }
                Next::PumpFailed(failure) => {
                    if let Some(pump) = self.pump.as_mut() {
                        pump.failure = None;
                    }
                    match failure {
                        Some(status) => return Err(Failure::Local(status)),
                        None => continue,
                    }
                }
            };
            let inbound = lock(&self.call).recv(frame, now());
            match inbound.map_err(Failure::Protocol)? {
                Inbound::Headers(entries) => return Ok(ResponseEvent::Headers(entries)),
                Inbound::Trailers(entries) => self.trailers = entries,
                Inbound::Message(m) => return Ok(ResponseEvent::Message(m)),
                Inbound::Closed => return Ok(ResponseEvent::End(Status::ok(""), None)),
                Inbound::Finished { status, message } => {
                    return Ok(ResponseEvent::End(status, message));
                }
                Inbound::Ignored | Inbound::Open { .. } => continue,
            }
        }
    }

    /// The call ended: its last message (if any), then trailers carrying
    /// `status`, are what the body yields next.
    fn end(&mut self, status: Status, last: Option<Bytes>) {
        self.pending_message = last;
        let status = self.finish(status);
        self.pending_trailers = Some(trailers_for(&status));
    }

    /// Marks the call over and gives its final status, carrying the trailers.
    fn finish(&mut self, status: Status) -> Status {
        self.done = true;
        if let Some(record) = self.record.as_mut() {
            record.finish(status.code());
        }
        let trailers = std::mem::take(&mut self.trailers);
        if trailers.is_empty() {
            return status;
        }
        let mut map = tonic::metadata::MetadataMap::new().into_headers();
        if metadata::append_key_values(&mut map, trailers).is_err() {
            return status;
        }
        let mut status = status;
        *status.metadata_mut() = tonic::metadata::MetadataMap::from_headers(map);
        status
    }
}

impl Drop for ResponseState {
    fn drop(&mut self) {
        if !self.done {
            let abort = lock(&self.call).abort(Failure::Cancelled);
            if let Some(code) = abort.stop {
                self.reader.stop(code);
            }
        }
    }
}
