//! Serving side of the engine: accept the peer's calls (one QUIC stream each) and
//! run every one through the [`Router`] in its own task.
//!
//! A call task ends when its response is sent, when the caller cancels
//! (STOP_SENDING or a reset), at its deadline, or when the connection closes:
//! the tasks live in a `JoinSet` owned by [`serve`], so none outlives the
//! connection.

use bytes::Bytes;
use futures_util::stream;
use http_body::Frame as BodyFrame;
use http_body_util::StreamBody;
use prost::Message;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tracing::Instrument;

use super::call_io::{CallReader, CallWriter};
use super::io::ReadError;
use super::{CallRecord, Peer, codes};
use crate::bridge::Router;
use crate::bridge::grpc::{BodyEvent, MessageReader, frame_message, status_from_trailers};
use crate::metadata;
use crate::session;
use crate::wire::{CallState, Flags, FrameType, Inbound, KeyValue, Metadata, Request, Response};

/// Serves the peer's calls on its connection with `router` until the connection
/// closes. Every handler still running then is dropped.
pub async fn serve(peer: Peer, router: Router) {
    let mut calls = JoinSet::new();
    loop {
        tokio::select! {
            accepted = peer.accept_call() => match accepted {
                Some((send, recv, stream_id)) => {
                    calls.spawn(serve_call(peer.clone(), router.clone(), send, recv, stream_id));
                    peer.widen_call_window(calls.len());
                }
                None => break,
            },
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
}

async fn serve_call(
    peer: Peer,
    router: Router,
    send: CallWriter,
    recv: CallReader,
    stream_id: u32,
) {
    let stopped = send.stopped();
    let record = CallRecord::new(&peer, true);
    let span = record.span().clone();
    let mut out = Responder {
        send,
        stream_id,
        max: peer.max_message_size(),
        writing: false,
        record,
        metadata_frames: peer.remote_is_brpc(),
        ended: false,
    };
    let answered = tokio::select! {
        biased;
        () = answer(&peer, &router, &mut out, recv).instrument(span) => true,
        // The caller stopped reading: it cancelled. Dropping `answer` drops the handler.
        () = stopped => false,
    };
    if !answered {
        out.reset(codes::STREAM_CANCELLED);
    }
}

/// Reads the Request, runs the handler under the call's deadline, answers.
async fn answer(peer: &Peer, router: &Router, out: &mut Responder, mut reader: CallReader) {
    let mut call = CallState::callee(out.stream_id);
    let (request, first_message, streaming) = loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                out.status(Status::invalid_argument(
                    "stream ended before a Request frame",
                ))
                .await;
                return;
            }
            Err(ReadError::TooLarge(e)) => {
                reader.stop(codes::STREAM_TOO_LARGE);
                out.status(Status::resource_exhausted(e.to_string())).await;
                return;
            }
            Err(ReadError::Idle(limit)) => {
                tracing::debug!(?limit, "call stalled before its Request; reset");
                reader.stop(codes::STREAM_IDLE);
                out.reset(codes::STREAM_IDLE);
                return;
            }
            Err(ReadError::Truncated) => {
                out.status(Status::invalid_argument(
                    "stream ended in the middle of a frame",
                ))
                .await;
                return;
            }
            Err(e @ ReadError::Exhausted(_)) => {
                tracing::debug!(error = ?e, "call refused: inbound buffer budget used up");
                reader.stop(codes::STREAM_REFUSED);
                out.status(e.to_status()).await;
                return;
            }
            Err(_) => return,
        };
        match call.recv(frame) {
            Ok(Inbound::Open {
                request,
                first_message,
                streaming,
            }) => break (request, first_message, streaming),
            Ok(_) => continue,
            Err(status) => {
                reader.stop(codes::STREAM_PROTOCOL_ERROR);
                out.status(status).await;
                return;
            }
        }
    };
    out.record.named(&request.service, &request.method);
    if request.service == session::SERVICE {
        let (status, payload) =
            session::handle_session_call(peer, &request.method, first_message.unwrap_or_default());
        out.response(status, payload).await;
        return;
    }
    if peer.is_draining() {
        reader.stop(codes::STREAM_CANCELLED);
        out.status(Status::unavailable(
            "this side is shutting down and takes no new calls; reconnect and retry",
        ))
        .await;
        return;
    }
    if request.timeout_nano < 0 {
        // ttrpc (Go) sends a negative time remaining for a context that had
        // already expired: the call is over before it starts.
        reader.stop(codes::STREAM_CANCELLED);
        out.status(Status::deadline_exceeded(format!(
            "deadline exceeded before the call started (timeout_nano {})",
            request.timeout_nano
        )))
        .await;
        return;
    }
    let timeout = metadata::from_timeout_nano(request.timeout_nano);
    // A bad request message (oversized, out of sequence) ends the call with
    // its status whatever the handler makes of the error it sees.
    // Only streamed input can go bad after the handler starts.
    let (input, failed) = if streaming {
        let (fail, failed) = oneshot::channel();
        let input = Input::Stream(StreamInput {
            reader,
            call,
            first: first_message,
            failed: false,
            fail: Some(fail),
        });
        (input, Some(failed))
    } else {
        (Input::Single(first_message.unwrap_or_default()), None)
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    let outcome = {
        let handled = handle(peer, router, out, request, timeout, input);
        let guarded = async {
            tokio::select! {
                biased;
                Some(status) = async {
                    match failed {
                        Some(failed) => failed.await.ok(),
                        None => None,
                    }
                } => Some(status),
                () = handled => None,
            }
        };
        match deadline {
            None => guarded.await,
            Some(at) => tokio::time::timeout_at(at, guarded)
                .await
                .unwrap_or_else(|_| {
                    Some(Status::deadline_exceeded(format!(
                        "deadline exceeded: the call's {} ms ran out in the handler",
                        timeout.unwrap_or_default().as_millis()
                    )))
                }),
        }
    };
    if let Some(status) = outcome {
        out.status(status).await;
    }
}

enum Input {
    Single(Bytes),
    Stream(StreamInput),
}

/// Request messages still arriving as Data frames.
struct StreamInput {
    reader: CallReader,
    call: CallState,
    first: Option<Bytes>,
    failed: bool,
    fail: Option<oneshot::Sender<Status>>,
}

type BodyItem = Result<BodyFrame<Bytes>, Status>;

impl StreamInput {
    fn end_call(&mut self, status: &Status) {
        if let Some(fail) = self.fail.take() {
            let _ = fail.send(status.clone());
        }
    }

    async fn next_frame(mut self) -> Option<(BodyItem, Self)> {
        if let Some(m) = self.first.take() {
            return Some((Ok(BodyFrame::data(frame_message(&m))), self));
        }
        if self.call.is_done() || self.failed {
            return None;
        }
        loop {
            let frame = match self.reader.next().await {
                Ok(Some(frame)) => frame,
                // A QUIC FIN without the close frame still ends the input.
                Ok(None) => return None,
                Err(e) => {
                    self.failed = true;
                    let status = e.to_status();
                    match e {
                        ReadError::TooLarge(_) => {
                            self.reader.stop(codes::STREAM_TOO_LARGE);
                            self.end_call(&status);
                        }
                        ReadError::Idle(_) => {
                            self.reader.stop(codes::STREAM_IDLE);
                            self.end_call(&status);
                        }
                        _ => {}
                    }
                    return Some((Err(status), self));
                }
            };
            match self.call.recv(frame) {
                Ok(Inbound::Message(m)) => {
                    return Some((Ok(BodyFrame::data(frame_message(&m))), self));
                }
                Ok(Inbound::Closed) => return None,
                Ok(_) => continue,
                Err(status) => {
                    self.reader.stop(codes::STREAM_PROTOCOL_ERROR);
                    self.end_call(&status);
                    return Some((Err(status), self));
                }
            }
        }
    }
}

async fn handle(
    peer: &Peer,
    router: &Router,
    out: &mut Responder,
    request: Request,
    timeout: Option<std::time::Duration>,
    input: Input,
) {
    let Request {
        service,
        method,
        metadata: entries,
        ..
    } = request;
    let uri = match http::Uri::try_from(format!("/{service}/{method}")) {
        Ok(uri) => uri,
        Err(_) => {
            out.status(Status::invalid_argument(format!(
                "service {service:?} / method {method:?} is not a valid name"
            )))
            .await;
            return;
        }
    };
    let body = match input {
        Input::Single(message) => Body::new(http_body_util::Full::new(frame_message(&message))),
        Input::Stream(input) => Body::new(StreamBody::new(stream::unfold(
            input,
            StreamInput::next_frame,
        ))),
    };
    let mut http_request = http::Request::new(body);
    *http_request.method_mut() = http::Method::POST;
    *http_request.uri_mut() = uri;
    let headers = http_request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    if let Some(timeout) = timeout {
        headers.insert("grpc-timeout", metadata::format_grpc_timeout(timeout));
    }
    if let Err(status) = metadata::append_key_values(headers, entries) {
        out.status(status).await;
        return;
    }
    http_request.extensions_mut().insert(peer.clone());

    let response = router.call(http_request).await;
    respond(out, response).await;
}

/// Sends the handler's http response as ttrpc frames. One message followed at
/// once by OK trailers is a unary-style Response; anything else streams as
/// Data frames, closed by Data remote-closed (OK) or a Response (error).
/// Response headers go first in a Headers frame, trailers in a Trailers frame
/// just before the end (both brpc extensions, sent only when needed).
async fn respond(out: &mut Responder, response: http::Response<Body>) {
    let (parts, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers)
        && status.code() != tonic::Code::Ok
    {
        // Trailers-only: the headers are the status and its metadata.
        if out.trailers(&parts.headers).await.is_ok() {
            out.status(status).await;
        }
        return;
    }
    let mut body = MessageReader::new(body, out.max);
    let mut ready = body.next_now();
    let headers = metadata::to_key_values(&parts.headers);
    // A Headers frame also tells a waiting caller that the handler has
    // answered, as HTTP/2 response headers do, when nothing else is ready.
    if (!headers.is_empty() || ready.is_none())
        && out.metadata(FrameType::Headers, headers).await.is_err()
    {
        return;
    }
    let mut streaming = false;
    loop {
        let event = match ready.take() {
            Some(event) => event,
            None => body.next().await,
        };
        let message = match event {
            Ok(BodyEvent::Message(m)) => m,
            Ok(BodyEvent::Trailers(trailers)) => {
                out.end(status_from_trailers(&trailers), &trailers).await;
                return;
            }
            Ok(BodyEvent::End) => {
                out.end(Status::ok(""), &http::HeaderMap::new()).await;
                return;
            }
            Err(status) => {
                out.status(status).await;
                return;
            }
        };
        if streaming {
            if out.message(message).await.is_err() {
                return;
            }
            continue;
        }
        // The first message: is the handler done already (unary, client-streaming)?
        match body.next_now() {
            Some(Ok(BodyEvent::Trailers(trailers))) => {
                let status = status_from_trailers(&trailers);
                if status.code() == tonic::Code::Ok {
                    if out.trailers(&trailers).await.is_ok() {
                        out.response(status, message).await;
                    }
                } else if out.message(message).await.is_ok() {
                    out.end(status, &trailers).await;
                }
                return;
            }
            Some(Ok(BodyEvent::End)) => {
                out.response(Status::ok(""), message).await;
                return;
            }
            Some(Ok(BodyEvent::Message(second))) => {
                streaming = true;
                if out.message(message).await.is_err() || out.message(second).await.is_err() {
                    return;
                }
            }
            Some(Err(status)) => {
                if out.message(message).await.is_ok() {
                    out.status(status).await;
                }
                return;
            }
            None => {
                streaming = true;
                if out.message(message).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The callee's half of the stream.
struct Responder {
    send: CallWriter,
    stream_id: u32,
    max: usize,
    /// A frame write was started and not finished: if the write is abandoned
    /// (deadline), the stream holds a partial frame and can only be reset.
    writing: bool,
    record: CallRecord,
    /// Whether the caller understands Headers/Trailers frames (a brpc peer).
    metadata_frames: bool,
    /// The final frame went out (or the stream was reset).
    ended: bool,
}

impl Drop for Responder {
    fn drop(&mut self) {
        // A call abandoned without its final frame (its task was dropped)
        // must not look finished: reset instead of letting the stream end.
        if !self.ended {
            self.send.reset(codes::STREAM_CANCELLED);
        }
    }
}

impl Responder {
    async fn frame(&mut self, kind: FrameType, flags: Flags, payload: Bytes) -> Result<(), ()> {
        self.writing = true;
        let result = self.send.write(self.stream_id, kind, flags, payload).await;
        self.writing = false;
        result.map_err(|_| ())
    }

    /// One streamed message; an oversized one ends the call with RESOURCE_EXHAUSTED.
    async fn message(&mut self, message: Bytes) -> Result<(), ()> {
        if message.len() > self.max {
            let status = Status::resource_exhausted(format!(
                "response message length {} exceed maximum message size of {}",
                message.len(),
                self.max
            ));
            self.status(status).await;
            return Err(());
        }
        self.frame(FrameType::Data, Flags::EMPTY, message).await
    }

    /// A Headers or Trailers frame with `entries`.
    async fn metadata(&mut self, kind: FrameType, entries: Vec<KeyValue>) -> Result<(), ()> {
        if !self.metadata_frames {
            return Ok(());
        }
        let data = Metadata { entries }.encode_to_vec();
        self.frame(kind, Flags::EMPTY, data.into()).await
    }

    /// The application entries of `trailers`, in a Trailers frame if any.
    async fn trailers(&mut self, trailers: &http::HeaderMap) -> Result<(), ()> {
        let entries = metadata::to_key_values(trailers);
        if entries.is_empty() {
            return Ok(());
        }
        self.metadata(FrameType::Trailers, entries).await
    }

    /// Ends the call after its messages: trailers, then the close or the error.
    async fn end(&mut self, status: Status, trailers: &http::HeaderMap) {
        if self.trailers(trailers).await.is_err() {
            return;
        }
        if status.code() == tonic::Code::Ok {
            self.close_stream().await;
        } else {
            self.status(status).await;
        }
    }

    /// Ends an OK stream: Data remote-closed, no data.
    async fn close_stream(&mut self) {
        self.record.finish(tonic::Code::Ok);
        let flags = Flags::REMOTE_CLOSED | Flags::NO_DATA;
        if self
            .frame(FrameType::Data, flags, Bytes::new())
            .await
            .is_ok()
        {
            self.send.finish();
            self.ended = true;
        }
    }

    /// Ends the call with a non-OK status.
    async fn status(&mut self, status: Status) {
        self.response(status, Bytes::new()).await;
    }

    /// Ends the call with a Response frame.
    async fn response(&mut self, status: Status, payload: Bytes) {
        self.record.finish(status.code());
        if self.writing {
            self.reset(codes::STREAM_CANCELLED);
            return;
        }
        let mut encoded = Response {
            status: Some(crate::status::to_wire(&status)),
            payload,
        }
        .encode_to_vec();
        if encoded.len() > self.max {
            let too_large = Status::resource_exhausted(format!(
                "response length {} exceed maximum message size of {}",
                encoded.len(),
                self.max
            ));
            encoded = Response {
                status: Some(crate::status::to_wire(&too_large)),
                payload: Bytes::new(),
            }
            .encode_to_vec();
        }
        if self
            .frame(FrameType::Response, Flags::EMPTY, encoded.into())
            .await
            .is_ok()
        {
            self.send.finish();
            self.ended = true;
        }
    }

    fn reset(&mut self, code: u32) {
        self.record.finish(tonic::Code::Cancelled);
        self.send.reset(code);
        self.ended = true;
    }
}
