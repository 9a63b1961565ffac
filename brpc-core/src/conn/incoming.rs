//! Serving side of the engine: accept the peer's calls (one QUIC stream each) and
//! run every one through the [`Router`] in its own task.
//!
//! A call task ends when its response is sent, when the caller cancels
//! (STOP_SENDING or a reset), at its deadline, or when the connection closes:
//! the tasks live in a `JoinSet` owned by [`serve`], so none outlives the
//! connection.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::stream;
use http_body::Frame as BodyFrame;
use http_body_util::StreamBody;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tonic::Status;
use tonic::body::Body;
use tracing::Instrument;

use super::call_io::{CallReader, CallWriter, SharedCall, lock, now};
use super::io::ReadError;
use super::{CallRecord, Peer, codes};
use crate::bridge::Router;
use crate::bridge::grpc::{BodyEvent, MessageReader, frame_message, status_from_trailers};
use crate::metadata;
use crate::session;
use crate::wire::{Abort, Call, Failure, Frame, Inbound, KeyValue, Request};

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
    let call = Call::callee(stream_id, peer.call_config(), now());
    let mut out = Responder {
        send,
        call: Arc::new(Mutex::new(call)),
        writing: false,
        record,
        ended: false,
    };
    let answered = tokio::select! {
        biased;
        () = answer(&peer, &router, &mut out, recv).instrument(span) => true,
        // The caller stopped reading: it cancelled. Dropping `answer` drops the handler.
        () = stopped => false,
    };
    if !answered {
        let abort = out.with(|call| call.abort(Failure::Cancelled));
        out.carry_out(None, abort).await;
    }
}

/// What a read error means for a call being served; `None`: nothing to
/// answer (the caller or the connection is gone).
fn read_failure(error: ReadError) -> Option<Failure> {
    match error {
        ReadError::TooLarge(e) => {
            Some(Failure::TooLarge(Status::resource_exhausted(e.to_string())))
        }
        ReadError::Truncated => Some(Failure::Truncated),
        e @ ReadError::Exhausted(_) => {
            tracing::debug!(error = ?e, "call refused: inbound buffer budget used up");
            Some(Failure::Refused(e.to_status()))
        }
        _ => None,
    }
}

/// Reads the Request, runs the handler under the call's deadline, answers.
async fn answer(peer: &Peer, router: &Router, out: &mut Responder, mut reader: CallReader) {
    let (request, first_message, streaming) = loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                if let Some(status) = out.with(Call::recv_finished) {
                    out.status(status).await;
                }
                return;
            }
            Err(ReadError::Idle(limit)) => {
                tracing::debug!(?limit, "call stalled before its Request; reset");
                reader.stop(codes::STREAM_IDLE);
                out.reset(codes::STREAM_IDLE);
                return;
            }
            Err(e) => {
                if let Some(failure) = read_failure(e) {
                    let abort = out.with(|call| call.abort(failure));
                    out.carry_out(Some(&mut reader), abort).await;
                }
                return;
            }
        };
        match out.with(|call| call.recv(frame, now())) {
            Ok(Inbound::Open {
                request,
                first_message,
                streaming,
            }) => break (request, first_message, streaming),
            Ok(_) => continue,
            Err(status) => {
                let abort = out.with(|call| call.abort(Failure::Protocol(status)));
                out.carry_out(Some(&mut reader), abort).await;
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
        let abort = out.with(|call| {
            call.abort(Failure::Local(Status::unavailable(
                "this side is shutting down and takes no new calls; reconnect and retry",
            )))
        });
        out.carry_out(Some(&mut reader), abort).await;
        return;
    }
    // A deadline that is already over (ttrpc's negative timeout_nano) ends
    // the call before the handler runs.
    if let Some(abort) = out.with(|call| call.handle_timeout(now())) {
        out.carry_out(Some(&mut reader), abort).await;
        return;
    }
    let deadline = out.with(|call| call.deadline());
    let timeout = deadline.map(|at| at.saturating_duration_since(now()));
    // A bad request message (oversized, out of sequence) ends the call with
    // its status whatever the handler makes of the error it sees.
    // Only streamed input can go bad after the handler starts.
    let (input, mut failed) = if streaming {
        let (fail, failed) = oneshot::channel();
        let input = Input::Stream(StreamInput {
            reader,
            call: out.call.clone(),
            first: first_message,
            failed: false,
            fail: Some(fail),
        });
        (input, Some(failed))
    } else {
        (Input::Single(first_message.unwrap_or_default()), None)
    };
    let outcome = {
        let handled = handle(peer, router, out, request, timeout, input);
        let guarded = async {
            tokio::select! {
                biased;
                Some(abort) = async {
                    match failed.as_mut() {
                        Some(failed) => failed.await.ok(),
                        None => None,
                    }
                } => Some(abort),
                () = handled => None,
            }
        };
        match deadline {
            None => guarded.await,
            Some(at) => tokio::time::timeout_at(tokio::time::Instant::from_std(at), guarded)
                .await
                .unwrap_or(None),
        }
    };
    // The input failed (perhaps while the handler was finishing), or the
    // deadline passed: the machine says how the call ends.
    let abort = outcome
        .or_else(|| failed.as_mut().and_then(|f| f.try_recv().ok()))
        .or_else(|| out.with(|call| call.handle_timeout(now())));
    if let Some(abort) = abort {
        out.carry_out(None, abort).await;
    }
}

enum Input {
    Single(Bytes),
    Stream(StreamInput),
}

/// Request messages still arriving as Data frames.
struct StreamInput {
    reader: CallReader,
    call: SharedCall,
    first: Option<Bytes>,
    failed: bool,
    fail: Option<oneshot::Sender<Abort>>,
}

type BodyItem = Result<BodyFrame<Bytes>, Status>;

impl StreamInput {
    /// Ends the call for `failure`: the machine picks the codes, the reader
    /// is stopped here and the rest is carried out by `answer`.
    fn fail(&mut self, failure: Failure) -> Status {
        self.failed = true;
        let abort = lock(&self.call).abort(failure);
        if let Some(code) = abort.stop {
            self.reader.stop(code);
        }
        let status = abort.status.clone();
        if let Some(fail) = self.fail.take() {
            let _ = fail.send(Abort {
                stop: None,
                ..abort
            });
        }
        status
    }

    async fn next_frame(mut self) -> Option<(BodyItem, Self)> {
        if let Some(m) = self.first.take() {
            return Some((Ok(BodyFrame::data(frame_message(&m))), self));
        }
        if self.failed || lock(&self.call).is_done() {
            return None;
        }
        loop {
            let frame = match self.reader.next().await {
                Ok(Some(frame)) => frame,
                // A QUIC FIN without the close frame still ends the input.
                Ok(None) => {
                    lock(&self.call).recv_finished();
                    return None;
                }
                Err(ReadError::Idle(limit)) => {
                    // The idle limit is still the reader's: stop with its code
                    // before the machine picks one.
                    self.reader.stop(codes::STREAM_IDLE);
                    let status = self.fail(Failure::Local(Status::deadline_exceeded(format!(
                        "the call stalled for {limit:?} in the middle of a frame; reset"
                    ))));
                    return Some((Err(status), self));
                }
                Err(e) => {
                    let status = e.to_status();
                    match read_failure(e) {
                        Some(failure) => {
                            self.fail(failure);
                        }
                        None => self.failed = true,
                    }
                    return Some((Err(status), self));
                }
            };
            let inbound = lock(&self.call).recv(frame, now());
            match inbound {
                Ok(Inbound::Message(m)) => {
                    return Some((Ok(BodyFrame::data(frame_message(&m))), self));
                }
                Ok(Inbound::Closed) => return None,
                Ok(_) => continue,
                Err(status) => {
                    let status = self.fail(Failure::Protocol(status));
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
    let max = out.with(|call| call.config().max_message_size);
    let mut body = MessageReader::new(body, max);
    let mut ready = body.next_now();
    let headers = metadata::to_key_values(&parts.headers);
    // A Headers frame also tells a waiting caller that the handler has
    // answered, as HTTP/2 response headers do, when nothing else is ready.
    if (!headers.is_empty() || ready.is_none()) && out.headers(headers).await.is_err() {
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

/// The callee's half of the stream: writes the frames the call's machine
/// builds.
struct Responder {
    send: CallWriter,
    call: SharedCall,
    /// A frame write was started and not finished: if the write is abandoned
    /// (deadline), the stream holds a partial frame and can only be reset.
    writing: bool,
    record: CallRecord,
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
    fn with<T>(&self, f: impl FnOnce(&mut Call) -> T) -> T {
        f(&mut lock(&self.call))
    }

    async fn write(&mut self, frame: Frame) -> Result<(), ()> {
        self.writing = true;
        let result = self
            .send
            .write(frame.stream_id, frame.kind, frame.flags, frame.payload)
            .await;
        self.writing = false;
        result.map_err(|_| ())
    }

    /// Writes the call's final frame and ends the stream.
    async fn write_last(&mut self, code: tonic::Code, frame: Frame) {
        self.record.finish(code);
        if self.writing {
            self.reset(codes::STREAM_CANCELLED);
            return;
        }
        if self.write(frame).await.is_ok() {
            self.send.finish();
            self.ended = true;
        }
    }

    /// Carries out what the machine said to end the call early: stop the
    /// reader (if this side still holds it), then answer or reset.
    async fn carry_out(&mut self, reader: Option<&mut CallReader>, abort: Abort) {
        if let (Some(reader), Some(code)) = (reader, abort.stop) {
            reader.stop(code);
        }
        match (abort.response, abort.reset) {
            (Some(frame), _) => self.write_last(abort.status.code(), frame).await,
            (None, Some(code)) => self.reset(code),
            (None, None) => {}
        }
    }

    /// One streamed message; an oversized one ends the call with RESOURCE_EXHAUSTED.
    async fn message(&mut self, message: Bytes) -> Result<(), ()> {
        match self.with(|call| call.send_message(message)) {
            Ok(frame) => self.write(frame).await,
            Err(status) => {
                self.status(status).await;
                Err(())
            }
        }
    }

    /// A Headers frame with `entries` (none to a plain ttrpc caller).
    async fn headers(&mut self, entries: Vec<KeyValue>) -> Result<(), ()> {
        match self.with(|call| call.send_headers(entries)) {
            Ok(Some(frame)) => self.write(frame).await,
            Ok(None) => Ok(()),
            Err(_) => Err(()),
        }
    }

    /// The application entries of `trailers`, in a Trailers frame if any.
    async fn trailers(&mut self, trailers: &http::HeaderMap) -> Result<(), ()> {
        let entries = metadata::to_key_values(trailers);
        if entries.is_empty() {
            return Ok(());
        }
        match self.with(|call| call.send_trailers(entries)) {
            Ok(Some(frame)) => self.write(frame).await,
            Ok(None) => Ok(()),
            Err(_) => Err(()),
        }
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
        if let Ok(frame) = self.with(Call::send_close) {
            self.write_last(tonic::Code::Ok, frame).await;
        }
    }

    /// Ends the call with a non-OK status.
    async fn status(&mut self, status: Status) {
        self.response(status, Bytes::new()).await;
    }

    /// Ends the call with a Response frame.
    async fn response(&mut self, status: Status, payload: Bytes) {
        if let Ok(frame) = self.with(|call| call.send_response(&status, payload)) {
            self.write_last(status.code(), frame).await;
        }
    }

    fn reset(&mut self, code: u32) {
        self.record.finish(tonic::Code::Cancelled);
        self.send.reset(code);
        self.ended = true;
    }
}
