//! The calling half of the engine: a call this side opens to the peer
//! ([`Peer::start_call`]). It sends the Request (and, for a streamed request,
//! the messages that follow, from a pump task), reads the answer as
//! [`ResponseEvent`]s, applies the deadline, and cancels the call when
//! dropped before its end. What may be sent and received when, and which
//! codes end the call, are the call machine's ([`crate::wire::Call`]).
//!
//! Knows nothing of http or tonic: [`Channel`](crate::Channel) adapts it.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Status;
use tracing::Instrument;

use super::call_io::{CallCell, SharedCall, lock, now};
use super::observe::CallRecord;
use super::peer::Peer;
use super::transport::{CallReader, CallWriter, ReadError, SendError};
use crate::metadata;
use crate::wire::{
    Failure, Inbound, KeyValue, Payload, RequestParts, RequestShape, encode_request_message,
    encode_request_shared,
};

/// A call's request messages: one, inside the Request (unary and
/// server-streaming calls), or a stream of them sent as Data frames after a
/// streaming Request (client-streaming and bidi calls).
pub enum RequestBody<S> {
    /// The one request message.
    Single(Bytes),
    /// The request messages, until the stream ends; an `Err` item cancels
    /// the call with that status.
    Stream(S),
}

/// What the caller learns of the answer, in order.
#[derive(Debug)]
pub enum ResponseEvent {
    /// The callee's response headers (only from a brpc peer).
    Headers(Vec<KeyValue>),
    /// One reply message.
    Message(Bytes),
    /// The call ended with `status`, after `message` (the one reply of an OK
    /// Response) and with the callee's `trailers`. Nothing follows.
    End {
        /// How the call ended: `Ok` for an OK status (no `tonic::Status` is
        /// built for it: one is an allocation), else the error status.
        status: Result<(), Status>,
        /// The last reply message, carried by an OK Response.
        message: Option<Bytes>,
        /// The callee's response trailers.
        trailers: Vec<KeyValue>,
    },
}

/// An [`End`](ResponseEvent::End)'s status as a `tonic::Status` (built for
/// an OK end only when asked for: it is an allocation).
pub fn end_status(status: Result<(), Status>) -> Status {
    status.err().unwrap_or_else(|| Status::ok(""))
}

/// A call this side opened, from its Request on. Dropping it before its end
/// cancels the call (STOP_SENDING, and a reset of a streamed request).
pub struct OutgoingCall {
    /// Outcome and in-flight count of the call (`None` once recorded).
    record: Option<CallRecord>,
    reader: CallReader,
    call: CallCell,
    trailers: Vec<KeyValue>,
    done: bool,
    pump: Option<Pump>,
}

impl std::fmt::Debug for OutgoingCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingCall")
            .field("stream_id", &self.call.read(crate::wire::Call::stream_id))
            .field("done", &self.done)
            .finish()
    }
}

/// The response side's link to the request pump.
struct Pump {
    /// Dropped with the response: tells the pump to reset the request stream.
    _cancel: oneshot::Sender<()>,
    /// A local failure of the request side, which ends the call.
    failure: Option<oneshot::Receiver<Status>>,
}

enum Next {
    Frame(Result<Option<crate::wire::Frame>, ReadError>),
    PumpFailed(Option<Status>),
}

impl Peer {
    /// Opens a call to `service`/`method` on the peer with request
    /// `metadata`, ending by `deadline` if given, and sends its Request and
    /// request `body` (a streamed body from a task of its own).
    ///
    /// # Errors
    /// The status the call ends with before any answer: `UNAVAILABLE` when
    /// the connection is gone or going away, `DEADLINE_EXCEEDED` when the
    /// deadline passes before the Request is sent, `RESOURCE_EXHAUSTED` for
    /// a Request over the maximum message size.
    pub fn start_call<'a, S>(
        &'a self,
        service: &'a str,
        method: &'a str,
        metadata: Vec<KeyValue>,
        deadline: Option<Instant>,
        body: RequestBody<S>,
    ) -> impl Future<Output = Result<OutgoingCall, Status>> + Send + 'a
    where
        S: Stream<Item = Result<Bytes, Status>> + Send + Unpin + 'static,
    {
        let (payload, messages, shape) = match body {
            RequestBody::Single(message) => (message, None, RequestShape::Single),
            RequestBody::Stream(messages) => (Bytes::new(), Some(messages), RequestShape::Stream),
        };
        let parts = request_parts(service, method, &metadata, deadline);
        // A large payload is sent as it is.
        let encoded = encode_request_shared(&parts, &payload, self.max_message_size());
        self.open_traced(service, method, encoded, messages, shape, deadline)
    }

    /// [`Peer::start_call`] for a call with one request message (unary and
    /// server-streaming), encoded straight into the Request: no buffer of
    /// its own, no copy.
    ///
    /// # Errors
    /// As [`Peer::start_call`].
    pub fn start_call_with_message<'a, M: prost::Message>(
        &'a self,
        service: &'a str,
        method: &'a str,
        metadata: Vec<KeyValue>,
        deadline: Option<Instant>,
        message: &M,
    ) -> impl Future<Output = Result<OutgoingCall, Status>> + Send + 'a {
        let parts = request_parts(service, method, &metadata, deadline);
        let encoded = encode_request_message(&parts, message, self.max_message_size());
        self.open_traced::<futures_util::stream::Empty<Result<Bytes, Status>>>(
            service,
            method,
            encoded,
            None,
            RequestShape::Single,
            deadline,
        )
    }

    /// The call's record and span, around [`Peer::open_outgoing`]. The
    /// Request is encoded before: the future holds only what it awaits.
    fn open_traced<'a, S>(
        &'a self,
        service: &str,
        method: &str,
        encoded: Result<Payload, Status>,
        messages: Option<S>,
        shape: RequestShape,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<OutgoingCall, Status>> + Send + 'a
    where
        S: Stream<Item = Result<Bytes, Status>> + Send + Unpin + 'static,
    {
        let record = self.record_call(false);
        record.named(service, method);
        let span = record.span().clone();
        // One future, not a wrapper around another: futures are moved by
        // value at every level, and this one is large.
        self.open_outgoing(encoded, messages, shape, deadline, record)
            .instrument(span)
    }

    async fn open_outgoing<S>(
        &self,
        encoded: Result<Payload, Status>,
        messages: Option<S>,
        shape: RequestShape,
        deadline: Option<Instant>,
        mut record: CallRecord,
    ) -> Result<OutgoingCall, Status>
    where
        S: Stream<Item = Result<Bytes, Status>> + Send + Unpin + 'static,
    {
        // A call that ends before it starts is recorded with its status.
        let fail = |record: &mut CallRecord, status: Status| {
            record.finish(status.code());
            status
        };
        if self.is_going_away() {
            return Err(fail(
                &mut record,
                Status::unavailable("the peer is going away (it sent GoAway); reconnect and retry"),
            ));
        }
        let encoded = match encoded {
            Ok(encoded) => encoded,
            Err(status) => return Err(fail(&mut record, status)),
        };
        let opened = match with_deadline(deadline, self.open_call(encoded, shape)).await {
            Ok(opened) => opened,
            Err(status) => return Err(fail(&mut record, status)),
        };
        let (mut send, reader) = (opened.writer, opened.reader);
        let mut call = opened.call;
        call.set_deadline(deadline.map(Instant::into_std));
        let mut call = CallCell::Alone(call);
        let pump = match messages {
            None => {
                match opened.sent {
                    Ok(()) => send.finish(),
                    // The callee refused the request (e.g. too large): its
                    // Response says why.
                    Err(SendError::Stopped) => {}
                    Err(e) => return Err(fail(&mut record, write_status(e))),
                }
                None
            }
            // The callee refused the Request: no messages to pump, and its
            // Response says why.
            Some(_) if matches!(opened.sent, Err(SendError::Stopped)) => None,
            Some(messages) => {
                if let Err(e) = opened.sent {
                    return Err(fail(&mut record, write_status(e)));
                }
                let (cancel, cancelled) = oneshot::channel();
                let (failed, failure) = oneshot::channel();
                tokio::spawn(pump_requests(
                    send,
                    call.share(),
                    messages,
                    cancelled,
                    failed,
                ));
                Some(Pump {
                    _cancel: cancel,
                    failure: Some(failure),
                })
            }
        };
        Ok(OutgoingCall {
            record: Some(record),
            reader,
            call,
            trailers: Vec::new(),
            done: false,
            pump,
        })
    }
}

/// The Request's parts, but for its payload (encoded by the caller); its
/// timeout is what is left of `deadline` now.
fn request_parts<'p>(
    service: &'p str,
    method: &'p str,
    metadata: &'p [KeyValue],
    deadline: Option<Instant>,
) -> RequestParts<'p> {
    let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    RequestParts {
        service,
        method,
        payload: &[],
        timeout_nano: metadata::to_timeout_nano(timeout),
        metadata,
    }
}

fn write_status(e: SendError) -> Status {
    match e {
        SendError::Stopped => Status::cancelled("peer stopped reading the call"),
        SendError::Closed => Status::cancelled("the call's stream was already ended"),
        SendError::Lost(lost) => lost.to_status(),
    }
}

/// Runs `work` until `deadline`; past it, the call was never sent. Not an
/// `async fn`: one holding `work` would hold it twice (as its argument and
/// inside the timeout), and this future sits inside every call's.
fn with_deadline<T>(
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T, Status>>,
) -> impl Future<Output = Result<T, Status>> {
    use futures_util::FutureExt;
    match deadline {
        None => futures_util::future::Either::Left(work),
        Some(at) => {
            futures_util::future::Either::Right(tokio::time::timeout_at(at, work).map(|outcome| {
                outcome.unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(
                        "deadline exceeded before the call was sent",
                    ))
                })
            }))
        }
    }
}

/// Sends the messages of a streaming request as Data frames the call's
/// machine builds, then the close frame. Stops (resetting the stream) when
/// the response side is dropped; a local failure (an oversized message, an
/// error from the caller's stream) resets the stream and is reported to the
/// response side through `failed`.
async fn pump_requests<S>(
    mut send: CallWriter,
    call: SharedCall,
    mut messages: S,
    cancelled: oneshot::Receiver<()>,
    failed: oneshot::Sender<Status>,
) where
    S: Stream<Item = Result<Bytes, Status>> + Send + Unpin,
{
    let work = async {
        while let Some(message) = messages.next().await {
            let frame = lock(&call).send_message(message?)?;
            send.write_frame(frame).await?;
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
            send.reset(crate::wire::codes::STREAM_CANCELLED);
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

impl OutgoingCall {
    /// Whether the call has ended (an [`End`](ResponseEvent::End) was returned).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next event of the answer. After an error (the deadline, a
    /// protocol violation, a lost connection) the call is cancelled as its
    /// machine says and the error is the `End`'s status. Asked again after
    /// the end, it returns an `End` with `INTERNAL`.
    pub async fn next_event(&mut self) -> ResponseEvent {
        if self.done {
            return self.end(Err(Status::internal("the call already ended")), None);
        }
        let deadline = self.call.read(crate::wire::Call::deadline);
        let result = match deadline {
            None => self.read_event().await,
            Some(at) => tokio::time::timeout_at(Instant::from_std(at), self.read_event())
                .await
                .unwrap_or_else(|_| Err(Failure::Local(Status::deadline_exceeded("")))),
        };
        let failure = match result {
            Ok(ResponseEvent::End {
                status, message, ..
            }) => return self.end(status, message),
            Ok(event) => return event,
            Err(failure) => failure,
        };
        // The deadline's own words when it is what ended the call.
        let abort = self.call.with(|call| {
            call.handle_timeout(now())
                .unwrap_or_else(|| call.abort(failure))
        });
        if let Some(code) = abort.stop {
            self.reader.stop(code);
        }
        self.pump.take();
        self.end(Err(abort.status), None)
    }

    /// The call ended: records its outcome and hands over the trailers.
    fn end(&mut self, status: Result<(), Status>, message: Option<Bytes>) -> ResponseEvent {
        self.done = true;
        if let Some(record) = self.record.as_mut() {
            record.finish(
                status
                    .as_ref()
                    .map_or_else(Status::code, |()| tonic::Code::Ok),
            );
        }
        ResponseEvent::End {
            status,
            message,
            trailers: std::mem::take(&mut self.trailers),
        }
    }

    async fn read_event(&mut self) -> Result<ResponseEvent, Failure> {
        loop {
            let next = match self.pump.as_mut().and_then(|p| p.failure.as_mut()) {
                None => Next::Frame(self.reader.next(&mut self.call).await),
                Some(failure) => tokio::select! {
                    biased;
                    frame = self.reader.next(&mut self.call) => Next::Frame(frame),
                    failed = failure => Next::PumpFailed(failed.ok()),
                },
            };
            let frame = match next {
                Next::Frame(Ok(Some(frame))) => frame,
                Next::Frame(Ok(None)) => {
                    let status = self.call.with(|c| c.recv_finished()).unwrap_or_else(|| {
                        Status::internal("peer ended the call's stream without a status")
                    });
                    return Err(Failure::Local(status));
                }
                Next::Frame(Err(e)) => {
                    let status = e.to_status();
                    return Err(match e {
                        ReadError::TooLarge(_) => Failure::TooLarge(status),
                        ReadError::Truncated => Failure::Protocol(status),
                        ReadError::Exhausted(_) => Failure::Refused(status),
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
            let inbound = self.call.with(|c| c.recv(frame, now()));
            match inbound.map_err(Failure::Protocol)? {
                Inbound::Headers(entries) => return Ok(ResponseEvent::Headers(entries)),
                Inbound::Trailers(entries) => self.trailers = entries,
                Inbound::Message(m) => return Ok(ResponseEvent::Message(m)),
                Inbound::Closed => {
                    return Ok(ResponseEvent::End {
                        status: Ok(()),
                        message: None,
                        trailers: Vec::new(),
                    });
                }
                Inbound::Finished { status, message } => {
                    return Ok(ResponseEvent::End {
                        status,
                        message,
                        trailers: Vec::new(),
                    });
                }
                Inbound::Ignored | Inbound::Open { .. } => continue,
            }
        }
    }
}

impl Drop for OutgoingCall {
    fn drop(&mut self) {
        if !self.done {
            let abort = self.call.with(|c| c.abort(Failure::Cancelled));
            if let Some(code) = abort.stop {
                self.reader.stop(code);
            }
        }
    }
}
