//! One call's whole protocol, sans-IO, for both roles: which frames may arrive
//! and what they mean ([`Call::recv`]), which frames may be sent when and how
//! they are built ([`Call::send_request`], [`Call::send_message`], …), and its
//! two timers, the deadline and the idle limit ([`Call::poll_timeout`],
//! [`Call::handle_timeout`]).
//!
//! In the manner of quinn-proto's `Connection`: no sockets, tasks or clocks.
//! The I/O layer feeds it frames and the current time, writes the frames it
//! returns, sleeps until [`Call::poll_timeout`], and carries out the
//! [`Abort`] it is handed when the call must end early.

use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tonic::{Code, Status};

use super::codes;
use super::envelope::{KeyValue, Metadata, Request, RequestParts, Response};
use super::frame::{Flags, Frame, FrameType, PIECE_MIN, Payload, PieceWriter};
use super::status::{from_wire, to_wire, too_large, too_large_message};

/// Which end of the call this machine sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallRole {
    /// The side that sent the Request; it receives Data and the final Response.
    Caller,
    /// The side that received the Request and runs the handler.
    Callee,
}

/// What a received frame means for the call.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// Callee: the call opens.
    Open {
        /// The decoded Request (its payload already moved to `first_message`).
        request: Request,
        /// The first request message, if the Request carries one.
        first_message: Option<Bytes>,
        /// Whether Data frames with more request messages follow.
        streaming: bool,
    },
    /// One message.
    Message(Bytes),
    /// The other side will send no more messages. For a caller this is a
    /// stream that ended OK.
    Closed,
    /// Caller: the final Response.
    Finished {
        /// The call's status: `Ok` for an OK Response (whose message, if
        /// any, is dropped: tonic's clients ignore it too), without
        /// building a `tonic::Status`, which allocates.
        status: Result<(), Status>,
        /// The reply message carried by an OK Response.
        message: Option<Bytes>,
    },
    /// Caller: the callee's response headers (brpc extension).
    Headers(Vec<KeyValue>),
    /// Caller: the callee's response trailers (brpc extension), which come
    /// just before the end of the call.
    Trailers(Vec<KeyValue>),
    /// A frame of an unknown type: ignored, as ttrpc does.
    Ignored,
}

impl PartialEq for Inbound {
    fn eq(&self, other: &Self) -> bool {
        use Inbound::*;
        match (self, other) {
            (
                Open {
                    request: a,
                    first_message: b,
                    streaming: c,
                },
                Open {
                    request: x,
                    first_message: y,
                    streaming: z,
                },
            ) => a == x && b == y && c == z,
            (Message(a), Message(b)) => a == b,
            (Headers(a), Headers(b)) | (Trailers(a), Trailers(b)) => a == b,
            (Closed, Closed) | (Ignored, Ignored) => true,
            (
                Finished {
                    status: a,
                    message: b,
                },
                Finished {
                    status: x,
                    message: y,
                },
            ) => {
                let code = |s: &Result<(), Status>| {
                    s.as_ref().err().map(|s| (s.code(), s.message().to_owned()))
                };
                code(a) == code(x) && b == y
            }
            _ => false,
        }
    }
}

/// The limits one call lives within.
#[derive(Debug, Clone, Copy)]
pub struct CallConfig {
    /// Largest message (frame data) sent or accepted.
    pub max_message_size: usize,
    /// How long the call may wait in the middle of a frame (and a callee for
    /// its Request) before it is reset; `None`: forever.
    pub idle_limit: Option<Duration>,
    /// Whether the other side understands brpc's Headers and Trailers frames
    /// (a brpc peer). Without it a callee's metadata is not sent.
    pub metadata_frames: bool,
}

/// How a caller's Request travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestShape {
    /// The one request message is inside the Request (unary and
    /// server-streaming calls); nothing follows it.
    Single,
    /// The Request opens the stream (remote-open|no-data, as ttrpc-rust
    /// sends it); messages follow as Data frames until [`Call::close_send`].
    Stream,
}

/// Why a call must end before its normal end, as the I/O layer saw it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Failure {
    /// A received frame broke the protocol (the status [`Call::recv`] gave).
    Protocol(Status),
    /// A received frame's header announced more than the maximum message size.
    TooLarge(Status),
    /// The receiver's buffer budget had no room for a frame that may not wait
    /// for it: the Request of a new call, or a frame of a running call when
    /// enough others are waiting already.
    Refused(Status),
    /// The stream ended in the middle of a frame.
    Truncated,
    /// This side gives up on the call: its caller dropped it, or its handler
    /// was dropped.
    Cancelled,
    /// Anything else local (a request body that failed, a message this side
    /// may not send): the status is what this side's user sees.
    Local(Status),
}

/// What the I/O layer does to end a call early: stop the receive half,
/// send the final frame or reset the send half, and report `status`.
#[derive(Debug, Clone)]
pub struct Abort {
    /// What this side's user (the caller, or the handler's input) sees.
    pub status: Status,
    /// Send STOP_SENDING with this code, if the receive half is still open.
    pub stop: Option<u32>,
    /// Callee: the final Response to send (the call's status, for the
    /// caller to read).
    pub response: Option<Frame>,
    /// Reset the send half with this code (when no final frame is sent).
    pub reset: Option<u32>,
}

/// A Request's bytes, checked against the maximum message size before any
/// stream is opened for it (the stream id is not part of them).
///
/// # Errors
/// `RESOURCE_EXHAUSTED` when the encoded Request is over `max_message_size`.
pub fn encode_request(request: &Request, max_message_size: usize) -> Result<Bytes, Status> {
    encode_request_parts(
        &RequestParts {
            service: &request.service,
            method: &request.method,
            payload: &request.payload,
            timeout_nano: request.timeout_nano,
            metadata: &request.metadata,
        },
        max_message_size,
    )
}

/// [`encode_request`] from borrowed parts.
///
/// # Errors
/// `RESOURCE_EXHAUSTED` when the encoded Request is over `max_message_size`.
pub fn encode_request_parts(
    request: &RequestParts<'_>,
    max_message_size: usize,
) -> Result<Bytes, Status> {
    request
        .encode_to_bytes_within(max_message_size)
        .map_err(|len| too_large(len, max_message_size))
}

/// [`encode_request_parts`] with `payload` as the Request's payload
/// (`request.payload` is not used): a large one is sent as it is, not
/// copied.
///
/// # Errors
/// `RESOURCE_EXHAUSTED` when the encoded Request is over `max_message_size`.
pub(crate) fn encode_request_shared(
    request: &RequestParts<'_>,
    payload: &Bytes,
    max_message_size: usize,
) -> Result<Payload, Status> {
    request
        .encode_shared_within(payload, max_message_size)
        .map_err(|len| too_large(len, max_message_size))
}

/// [`encode_request_parts`] with `message` encoded straight into the
/// Request's payload (`request.payload` is not used).
///
/// # Errors
/// `RESOURCE_EXHAUSTED` when the encoded Request is over `max_message_size`.
pub fn encode_request_message(
    request: &RequestParts<'_>,
    message: &impl prost::Message,
    max_message_size: usize,
) -> Result<Payload, Status> {
    request
        .encode_with_message_within(message, max_message_size)
        .map_err(|len| too_large(len, max_message_size))
}

/// `message` encoded for a Data frame: in one buffer, or, at 16 KiB or
/// more, in pieces that hold its `bytes::Bytes` fields of 16 KiB or more as
/// they are, not copied.
pub fn encode_message(message: &impl Message) -> Payload {
    let len = message.encoded_len();
    if len < PIECE_MIN {
        let mut buf = bytes::BytesMut::with_capacity(len);
        message.encode_raw(&mut buf);
        return Payload::Whole(buf.freeze());
    }
    let mut buf = PieceWriter::new(len);
    message.encode_raw(&mut buf);
    buf.finish()
}

/// The receive half's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvPhase {
    /// Callee before the Request.
    AwaitRequest,
    /// Messages may still arrive.
    Open,
    /// The other side finished sending (or the call failed).
    Done,
}

/// The send half's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendPhase {
    /// Caller: no Request yet. Callee: nothing of the reply yet.
    Start,
    /// Caller: a streaming Request went out; Data may follow. Callee: the
    /// reply started (Headers or messages).
    Open,
    /// Callee: Trailers went out; only the end may follow.
    Trailers,
    /// Nothing more may be sent (closed, final Response, or reset).
    Done,
}

/// The whole state of one call as seen by one side. See the module docs.
#[derive(Debug, Clone)]
pub struct Call {
    role: CallRole,
    stream_id: u32,
    config: CallConfig,
    recv: RecvPhase,
    send: SendPhase,
    /// Caller: no Data, Headers or Response has arrived yet.
    before_reply: bool,
    /// Caller: Trailers arrived, so only the end of the call may follow.
    trailers_seen: bool,
    deadline: Option<Instant>,
    /// Callee: the Request's `timeout_nano` (for the words of its expiry).
    timeout_nano: i64,
    /// When the idle limit runs out, while it applies (a callee waiting for
    /// its Request, or a frame half received).
    idle_at: Option<Instant>,
    /// Bytes arrived since the idle limit last (re)started.
    idle_progress: usize,
}

/// Bytes that must arrive for the idle limit to start again: fewer do not
/// count as progress, so a peer trickling a byte at a time cannot hold a
/// half-received frame (and what it reserved) or a stream without its
/// Request for ever. A frame smaller than this completes, and so stops
/// the limit, instead.
pub const MIN_IDLE_PROGRESS: usize = 16 * 1024;

impl Call {
    /// The machine for a call this side opens on `stream_id`.
    pub fn caller(stream_id: u32, config: CallConfig) -> Self {
        Call {
            role: CallRole::Caller,
            stream_id,
            config,
            recv: RecvPhase::Open,
            send: SendPhase::Start,
            before_reply: true,
            trailers_seen: false,
            deadline: None,
            timeout_nano: 0,
            idle_at: None,
            idle_progress: 0,
        }
    }

    /// The machine for a call the other side opened on `stream_id` at `now`;
    /// the idle limit runs until its Request has arrived.
    pub fn callee(stream_id: u32, config: CallConfig, now: Instant) -> Self {
        Call {
            role: CallRole::Callee,
            stream_id,
            config,
            recv: RecvPhase::AwaitRequest,
            send: SendPhase::Start,
            before_reply: true,
            trailers_seen: false,
            deadline: None,
            timeout_nano: 0,
            idle_at: config.idle_limit.map(|limit| now + limit),
            idle_progress: 0,
        }
    }

    /// The call's ttrpc stream id.
    pub fn stream_id(&self) -> u32 {
        self.stream_id
    }

    /// Which end this machine tracks.
    pub fn role(&self) -> CallRole {
        self.role
    }

    /// The limits the call lives within.
    pub fn config(&self) -> &CallConfig {
        &self.config
    }

    /// Whether the other side has finished sending.
    pub fn is_done(&self) -> bool {
        self.recv == RecvPhase::Done
    }

    /// Whether this side has sent its last frame (or reset the call).
    pub fn is_send_done(&self) -> bool {
        self.send == SendPhase::Done
    }

    /// Whether the call is over in both directions.
    pub fn is_finished(&self) -> bool {
        self.is_done() && self.is_send_done()
    }

    // ---- timers ----

    /// Sets the call's deadline (a caller's from its timeout; a callee's is
    /// set from the Request's `timeout_nano` when it arrives).
    pub fn set_deadline(&mut self, at: Option<Instant>) {
        self.deadline = at;
    }

    /// The call's deadline, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Tells the machine that `arrived` bytes of the call came by `now`
    /// and whether a frame is half received (`mid_frame`): the idle limit
    /// runs only while one is (or before the Request). It starts when it
    /// begins to apply, and starts again only once [`MIN_IDLE_PROGRESS`]
    /// bytes have arrived since it last did.
    pub fn note_bytes(&mut self, now: Instant, mid_frame: bool, arrived: usize) {
        self.note_bytes_then(|| now, mid_frame, arrived);
    }

    /// [`note_bytes`](Self::note_bytes) reading the clock (`now`) only when
    /// the idle limit (re)starts: most reads start between frames.
    pub(crate) fn note_bytes_then(
        &mut self,
        now: impl FnOnce() -> Instant,
        mid_frame: bool,
        arrived: usize,
    ) {
        // Before the Request the limit always runs (a stream that brings
        // nothing is reset too).
        let runs =
            self.recv == RecvPhase::AwaitRequest || (mid_frame && self.recv == RecvPhase::Open);
        let Some(limit) = self.config.idle_limit.filter(|_| runs) else {
            self.idle_at = None;
            self.idle_progress = 0;
            return;
        };
        self.idle_progress = self.idle_progress.saturating_add(arrived);
        if self.idle_at.is_none() || self.idle_progress >= MIN_IDLE_PROGRESS {
            self.idle_at = Some(now() + limit);
            self.idle_progress = 0;
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called, if
    /// ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_finished() {
            return None;
        }
        match (self.deadline, self.idle_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Checks the timers at `now`. When one has run out the call is over
    /// and the returned [`Abort`] says how to end it.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Abort> {
        if self.is_finished() {
            return None;
        }
        if self.deadline.is_some_and(|at| at <= now) {
            let status = match self.role {
                CallRole::Caller => {
                    Status::deadline_exceeded("deadline exceeded while waiting for the peer")
                }
                CallRole::Callee if self.timeout_nano < 0 => Status::deadline_exceeded(format!(
                    "deadline exceeded before the call started (timeout_nano {})",
                    self.timeout_nano
                )),
                CallRole::Callee => Status::deadline_exceeded(format!(
                    "deadline exceeded: the call's {} ms ran out in the handler",
                    self.timeout_nano / 1_000_000
                )),
            };
            return Some(self.finish_early(status, codes::STREAM_CANCELLED));
        }
        let limit = self.config.idle_limit?;
        if self.idle_at.is_none_or(|at| at > now) {
            return None;
        }
        self.idle_at = None;
        self.idle_progress = 0;
        if self.recv == RecvPhase::AwaitRequest {
            // A stream that never brought its Request: nobody to answer.
            self.recv = RecvPhase::Done;
            self.send = SendPhase::Done;
            return Some(Abort {
                status: Status::deadline_exceeded(format!(
                    "no Request arrived within the idle limit of {limit:?}; reset"
                )),
                stop: Some(codes::STREAM_IDLE),
                response: None,
                reset: Some(codes::STREAM_IDLE),
            });
        }
        let status = Status::deadline_exceeded(format!(
            "the call stalled for {limit:?} in the middle of a frame; reset"
        ));
        let stop = match self.role {
            CallRole::Callee => codes::STREAM_IDLE,
            CallRole::Caller => codes::STREAM_CANCELLED,
        };
        Some(self.finish_early(status, stop))
    }

    // ---- receiving ----

    /// Feeds one received frame at `now`.
    ///
    /// # Errors
    /// A [`Status`] describing the protocol violation: `INVALID_ARGUMENT` for
    /// a bad request from a caller, `INTERNAL` for a bad answer from a
    /// callee. The call cannot continue: pass
    /// [`Failure::Protocol`] to [`abort`](Self::abort).
    pub fn recv(&mut self, frame: Frame, now: Instant) -> Result<Inbound, Status> {
        let result = self.step(frame, now);
        if result.is_err() {
            self.recv = RecvPhase::Done;
        }
        if self.recv != RecvPhase::AwaitRequest {
            // A whole frame arrived: nothing is half received.
            self.idle_at = None;
            self.idle_progress = 0;
        }
        result
    }

    /// The stream's receive half ended cleanly (QUIC FIN) at a frame
    /// boundary. Returns the status the call ends with when that end is not
    /// allowed here; `None` when it is (a callee's streamed input ends as
    /// if closed).
    pub fn recv_finished(&mut self) -> Option<Status> {
        let phase = std::mem::replace(&mut self.recv, RecvPhase::Done);
        match (self.role, phase) {
            (_, RecvPhase::Done) => None,
            (CallRole::Callee, RecvPhase::AwaitRequest) => Some(Status::invalid_argument(
                "stream ended before a Request frame",
            )),
            (CallRole::Callee, RecvPhase::Open) => None,
            (CallRole::Caller, _) => Some(Status::internal(
                "peer ended the call's stream without a status",
            )),
        }
    }

    fn violation(&self, message: impl Into<String>) -> Status {
        let code = match self.role {
            CallRole::Callee => Code::InvalidArgument,
            CallRole::Caller => Code::Internal,
        };
        Status::new(code, message)
    }

    fn step(&mut self, frame: Frame, now: Instant) -> Result<Inbound, Status> {
        // Cancel is a byte stream's (its link acts on it); over QUIC it is
        // as unknown as any other type.
        if let FrameType::Unknown(_) | FrameType::Cancel = frame.kind {
            return Ok(Inbound::Ignored);
        }
        if frame.stream_id != self.stream_id {
            return Err(self.violation(format!(
                "frame for stream id {} on the QUIC stream of call {}",
                frame.stream_id, self.stream_id
            )));
        }
        match (self.role, self.recv, frame.kind) {
            (_, RecvPhase::Done, kind) => {
                Err(self.violation(format!("{kind:?} frame after the sender closed the stream")))
            }
            (CallRole::Callee, RecvPhase::AwaitRequest, FrameType::Request) => {
                self.open(frame, now)
            }
            (CallRole::Callee, RecvPhase::AwaitRequest, kind) => Err(self.violation(format!(
                "expected a Request frame to open the call, got {kind:?}"
            ))),
            (CallRole::Callee, RecvPhase::Open, FrameType::Data) => self.data(frame),
            (CallRole::Callee, RecvPhase::Open, FrameType::Request) => {
                Err(self.violation("a second Request frame on one stream"))
            }
            (CallRole::Callee, RecvPhase::Open, kind) => {
                Err(self.violation(format!("a {kind:?} frame from the caller")))
            }
            (CallRole::Caller, _, FrameType::Headers) => {
                if !self.before_reply {
                    return Err(self.violation("Headers frame after the reply started"));
                }
                self.before_reply = false;
                Ok(Inbound::Headers(self.metadata(frame.payload.into_bytes())?))
            }
            (CallRole::Caller, _, FrameType::Trailers) => {
                if self.trailers_seen {
                    return Err(self.violation("a second Trailers frame"));
                }
                self.trailers_seen = true;
                self.before_reply = false;
                Ok(Inbound::Trailers(
                    self.metadata(frame.payload.into_bytes())?,
                ))
            }
            (CallRole::Caller, _, FrameType::Data) => {
                self.before_reply = false;
                if self.trailers_seen && !frame.flags.contains(Flags::REMOTE_CLOSED) {
                    return Err(self.violation("a message after the Trailers frame"));
                }
                self.data(frame)
            }
            (CallRole::Caller, _, FrameType::Response) => {
                self.recv = RecvPhase::Done;
                // The callee is done: whatever this side still sends is unread.
                self.send = SendPhase::Done;
                let response = Response::decode(frame.payload.into_bytes()).map_err(|e| {
                    Status::internal(format!("peer sent an undecodable Response: {e}"))
                })?;
                let status = match response.status {
                    Some(status) if status.code != Code::Ok as i32 => Err(from_wire(status)),
                    _ => Ok(()),
                };
                let message = status.is_ok().then_some(response.payload);
                Ok(Inbound::Finished { status, message })
            }
            (CallRole::Caller, _, _) => Err(self.violation("a Request frame from the callee")),
        }
    }

    fn metadata(&self, payload: Bytes) -> Result<Vec<KeyValue>, Status> {
        super::envelope::check_metadata_entries(&payload, 1)?;
        Metadata::decode(payload)
            .map(|m| m.entries)
            .map_err(|e| self.violation(format!("undecodable metadata frame: {e}")))
    }

    fn open(&mut self, frame: Frame, now: Instant) -> Result<Inbound, Status> {
        let flags = frame.flags;
        if flags.contains(Flags::REMOTE_OPEN) && flags.contains(Flags::REMOTE_CLOSED) {
            return Err(self.violation(format!(
                "Request flags {flags:?} both open and close the stream"
            )));
        }
        let payload = frame.payload.into_bytes();
        super::envelope::check_metadata_entries(&payload, 5)?;
        let mut request = Request::decode(payload)
            .map_err(|e| self.violation(format!("undecodable Request: {e}")))?;
        if request.service.is_empty() || request.method.is_empty() {
            return Err(self.violation(format!(
                "Request names no {}",
                if request.service.is_empty() {
                    "service"
                } else {
                    "method"
                }
            )));
        }
        let payload = std::mem::take(&mut request.payload);
        let streaming = flags.contains(Flags::REMOTE_OPEN);
        // A streaming Request only carries a first message when it has bytes:
        // ttrpc clients send an empty payload (Go: 0x02, ttrpc-rust: 0x06) and
        // must not see a message invented for them.
        let carries_message =
            !streaming || (!payload.is_empty() && !flags.contains(Flags::NO_DATA));
        let first_message = carries_message.then_some(payload);
        self.recv = if streaming {
            RecvPhase::Open
        } else {
            RecvPhase::Done
        };
        self.idle_at = None;
        self.idle_progress = 0;
        // ttrpc (Go) sends a negative time remaining for a context that had
        // already expired: the call is over before it starts.
        self.timeout_nano = request.timeout_nano;
        self.deadline = match request.timeout_nano {
            0 => None,
            n if n < 0 => Some(now),
            n => Some(now + Duration::from_nanos(n.unsigned_abs())),
        };
        Ok(Inbound::Open {
            request,
            first_message,
            streaming,
        })
    }

    fn data(&mut self, frame: Frame) -> Result<Inbound, Status> {
        if frame.flags.contains(Flags::REMOTE_CLOSED) {
            if !frame.payload.is_empty() && !frame.flags.contains(Flags::NO_DATA) {
                return Err(self.violation("data close message cannot include data"));
            }
            self.recv = RecvPhase::Done;
            return Ok(Inbound::Closed);
        }
        if frame.flags.contains(Flags::NO_DATA) {
            return Ok(Inbound::Ignored);
        }
        Ok(Inbound::Message(frame.payload.into_bytes()))
    }

    // ---- sending ----

    fn frame(&self, kind: FrameType, flags: Flags, payload: impl Into<Payload>) -> Frame {
        Frame {
            stream_id: self.stream_id,
            kind,
            flags,
            payload: payload.into(),
        }
    }

    fn misuse(&self, what: &str) -> Status {
        Status::internal(format!(
            "{what} is not allowed now on call {} ({:?}, send {:?})",
            self.stream_id, self.role, self.send
        ))
    }

    /// Caller: the Request frame opening the call, carrying `encoded` (see
    /// [`encode_request`]; with its payload for [`RequestShape::Single`]).
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the encoded Request exceeds the maximum
    /// message size (nothing may be sent; the call is over); `INTERNAL` when
    /// a Request was already sent or this side is the callee.
    pub fn send_request(
        &mut self,
        encoded: impl Into<Payload>,
        shape: RequestShape,
    ) -> Result<Frame, Status> {
        let encoded = encoded.into();
        if self.role != CallRole::Caller || self.send != SendPhase::Start {
            return Err(self.misuse("a Request"));
        }
        if encoded.len() > self.config.max_message_size {
            self.send = SendPhase::Done;
            self.recv = RecvPhase::Done;
            return Err(too_large(encoded.len(), self.config.max_message_size));
        }
        let (flags, next) = match shape {
            RequestShape::Single => (Flags::EMPTY, SendPhase::Done),
            RequestShape::Stream => (Flags::REMOTE_OPEN | Flags::NO_DATA, SendPhase::Open),
        };
        self.send = next;
        Ok(self.frame(FrameType::Request, flags, encoded))
    }

    /// One message: a caller's streamed request message, or a callee's
    /// reply message.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` for a message over the maximum size: the call
    /// must end (a callee answers with that status, see
    /// [`send_response`](Self::send_response); a caller aborts with
    /// [`Failure::Local`]). `INTERNAL` when no message may be sent now.
    pub fn send_message(&mut self, message: impl Into<Payload>) -> Result<Frame, Status> {
        let message = message.into();
        let allowed = match self.role {
            CallRole::Caller => self.send == SendPhase::Open,
            CallRole::Callee => matches!(self.send, SendPhase::Start | SendPhase::Open),
        };
        if !allowed {
            return Err(self.misuse("a message"));
        }
        if message.len() > self.config.max_message_size {
            let status = match self.role {
                CallRole::Caller => too_large(message.len(), self.config.max_message_size),
                CallRole::Callee => Status::resource_exhausted(format!(
                    "response {}",
                    too_large_message(message.len(), self.config.max_message_size)
                )),
            };
            return Err(status);
        }
        self.send = SendPhase::Open;
        Ok(self.frame(FrameType::Data, Flags::EMPTY, message))
    }

    /// Caller: the frame closing a streamed request (Data remote-closed,
    /// no data).
    ///
    /// # Errors
    /// `INTERNAL` when the request is not an open stream.
    pub fn close_send(&mut self) -> Result<Frame, Status> {
        if self.role != CallRole::Caller || self.send != SendPhase::Open {
            return Err(self.misuse("closing the request stream"));
        }
        self.send = SendPhase::Done;
        Ok(self.close_frame())
    }

    fn close_frame(&self) -> Frame {
        self.frame(
            FrameType::Data,
            Flags::REMOTE_CLOSED | Flags::NO_DATA,
            Bytes::new(),
        )
    }

    /// Callee: a Headers frame with `entries`, before any message. `None`
    /// when the caller does not understand metadata frames (plain ttrpc).
    /// An empty Headers frame is allowed: it tells a waiting caller that the
    /// handler answered.
    ///
    /// # Errors
    /// `INTERNAL` after the reply started.
    pub fn send_headers(&mut self, entries: Vec<KeyValue>) -> Result<Option<Frame>, Status> {
        if self.role != CallRole::Callee || self.send != SendPhase::Start {
            return Err(self.misuse("a Headers frame"));
        }
        if !self.config.metadata_frames {
            return Ok(None);
        }
        self.send = SendPhase::Open;
        let data = Metadata { entries }.encode_to_vec();
        Ok(Some(self.frame(
            FrameType::Headers,
            Flags::EMPTY,
            Bytes::from(data),
        )))
    }

    /// Callee: a Trailers frame with `entries`, just before the end. `None`
    /// when there are none or the caller does not understand metadata frames.
    ///
    /// # Errors
    /// `INTERNAL` after Trailers or the end were sent.
    pub fn send_trailers(&mut self, entries: Vec<KeyValue>) -> Result<Option<Frame>, Status> {
        if self.role != CallRole::Callee || !matches!(self.send, SendPhase::Start | SendPhase::Open)
        {
            return Err(self.misuse("a Trailers frame"));
        }
        if entries.is_empty() || !self.config.metadata_frames {
            return Ok(None);
        }
        self.send = SendPhase::Trailers;
        let data = Metadata { entries }.encode_to_vec();
        Ok(Some(self.frame(
            FrameType::Trailers,
            Flags::EMPTY,
            Bytes::from(data),
        )))
    }

    /// Callee: the end of a reply stream that finished OK (Data
    /// remote-closed, no data).
    ///
    /// # Errors
    /// `INTERNAL` after the end was sent.
    pub fn send_close(&mut self) -> Result<Frame, Status> {
        if self.role != CallRole::Callee || self.send == SendPhase::Done {
            return Err(self.misuse("closing the reply stream"));
        }
        self.send = SendPhase::Done;
        Ok(self.close_frame())
    }

    /// Callee: the final Response with `status` (and, for an OK unary-style
    /// reply, its one message). A Response over the maximum size is replaced
    /// by one carrying `RESOURCE_EXHAUSTED`, so the caller always learns how
    /// the call ended.
    /// Returns the frame and the code it carries: `status`'s, or
    /// `RESOURCE_EXHAUSTED` when the Response was replaced.
    ///
    /// # Errors
    /// `INTERNAL` after the end was sent.
    pub fn send_response(
        &mut self,
        status: &Status,
        payload: Bytes,
    ) -> Result<(Frame, Code), Status> {
        self.send_end(to_wire(status), payload)
    }

    /// Callee: [`send_response`](Self::send_response) with an OK status,
    /// without a `tonic::Status` to read it from (making one allocates).
    ///
    /// # Errors
    /// `INTERNAL` after the end was sent.
    pub fn send_ok_response(&mut self, payload: Bytes) -> Result<(Frame, Code), Status> {
        self.send_end(crate::wire::envelope::Status::default(), payload)
    }

    /// The final Response with `status` already in its wire form.
    fn send_end(
        &mut self,
        status: crate::wire::envelope::Status,
        payload: Bytes,
    ) -> Result<(Frame, Code), Status> {
        if self.role != CallRole::Callee || self.send == SendPhase::Done {
            return Err(self.misuse("a Response"));
        }
        self.send = SendPhase::Done;
        Ok(self.response_frame(status, payload))
    }

    /// Callee: [`send_response`](Self::send_response) with an OK status and
    /// `message` encoded straight into the Response (no buffer of its own to
    /// copy).
    /// Returns the frame and the code it carries: `RESOURCE_EXHAUSTED` when
    /// the reply was over the maximum size and replaced.
    ///
    /// # Errors
    /// `INTERNAL` after the end was sent.
    pub fn send_ok_message(&mut self, message: &impl Message) -> Result<(Frame, Code), Status> {
        use prost::encoding::{encoded_len_varint, key_len};
        if self.role != CallRole::Callee || self.send == SendPhase::Done {
            return Err(self.misuse("a Response"));
        }
        self.send = SendPhase::Done;
        let len = message.encoded_len();
        // An OK status (field 1, an empty message), then the reply (field 2),
        // exactly as prost encodes the Response.
        let total = 2 + if len == 0 {
            0
        } else {
            key_len(2) + encoded_len_varint(len as u64) + len
        };
        if total > self.config.max_message_size {
            let replaced = Status::resource_exhausted(format!(
                "response {}",
                too_large_message(total, self.config.max_message_size)
            ));
            return Ok(self.response_frame(to_wire(&replaced), Bytes::new()));
        }
        fn encode(message: &impl Message, len: usize, buf: &mut impl bytes::BufMut) {
            use prost::encoding::{WireType, encode_key, encode_varint};
            encode_key(1, WireType::LengthDelimited, buf);
            encode_varint(0, buf);
            if len != 0 {
                encode_key(2, WireType::LengthDelimited, buf);
                encode_varint(len as u64, buf);
                message.encode_raw(buf);
            }
        }
        let payload = if len < PIECE_MIN {
            let mut buf = bytes::BytesMut::with_capacity(total);
            encode(message, len, &mut buf);
            Payload::Whole(buf.freeze())
        } else {
            // Large `bytes::Bytes` fields are sent as they are.
            let mut buf = PieceWriter::new(total);
            encode(message, len, &mut buf);
            buf.finish()
        };
        Ok((
            self.frame(FrameType::Response, Flags::EMPTY, payload),
            Code::Ok,
        ))
    }

    /// The Response frame with `status` and `payload`, and the code it
    /// carries (`RESOURCE_EXHAUSTED` when it was over the maximum size and
    /// replaced).
    fn response_frame(
        &self,
        status: crate::wire::envelope::Status,
        payload: Bytes,
    ) -> (Frame, Code) {
        let max = self.config.max_message_size;
        let code = Code::from(status.code);
        let response = Response {
            status: Some(status),
            payload,
        };
        let len = response.encoded_len();
        if len > max {
            let replaced =
                Status::resource_exhausted(format!("response {}", too_large_message(len, max)));
            let encoded = Response {
                status: Some(to_wire(&replaced)),
                payload: Bytes::new(),
            }
            .encode_to_bytes();
            return (
                self.frame(FrameType::Response, Flags::EMPTY, encoded),
                replaced.code(),
            );
        }
        // A large payload is sent as it is.
        let encoded = response.encode_pieces(len);
        (self.frame(FrameType::Response, Flags::EMPTY, encoded), code)
    }

    /// The call ends early for `failure`: returns what to stop, send or
    /// reset, and the status this side's user sees. Afterwards nothing more
    /// is received or sent.
    pub fn abort(&mut self, failure: Failure) -> Abort {
        let (status, stop) = match failure {
            Failure::Protocol(status) => (status, codes::STREAM_PROTOCOL_ERROR),
            Failure::TooLarge(status) => (status, codes::STREAM_TOO_LARGE),
            Failure::Refused(status) => (status, codes::STREAM_REFUSED),
            Failure::Truncated => (
                self.violation("stream ended in the middle of a frame"),
                codes::STREAM_PROTOCOL_ERROR,
            ),
            Failure::Cancelled => {
                let status = Status::cancelled("call was cancelled locally");
                let abort = Abort {
                    status,
                    stop: (self.recv != RecvPhase::Done).then_some(codes::STREAM_CANCELLED),
                    response: None,
                    reset: (self.send != SendPhase::Done).then_some(codes::STREAM_CANCELLED),
                };
                self.recv = RecvPhase::Done;
                self.send = SendPhase::Done;
                return abort;
            }
            Failure::Local(status) => (status, codes::STREAM_CANCELLED),
        };
        let stop = match self.role {
            // A caller names the callee's fault (a bad or oversized answer)
            // or its own too-large message, or that it had no room for the
            // answer; anything else is "cancelled".
            CallRole::Caller if stop != codes::STREAM_REFUSED => match status.code() {
                Code::ResourceExhausted => codes::STREAM_TOO_LARGE,
                Code::Internal => codes::STREAM_PROTOCOL_ERROR,
                _ => codes::STREAM_CANCELLED,
            },
            _ => stop,
        };
        self.finish_early(status, stop)
    }

    fn finish_early(&mut self, status: Status, stop: u32) -> Abort {
        let stop = (self.recv != RecvPhase::Done).then_some(stop);
        self.recv = RecvPhase::Done;
        let send_open = self.send != SendPhase::Done;
        self.send = SendPhase::Done;
        let (response, reset) = match self.role {
            CallRole::Callee if send_open => (
                Some(self.response_frame(to_wire(&status), Bytes::new()).0),
                None,
            ),
            CallRole::Caller if send_open => (None, Some(codes::STREAM_CANCELLED)),
            _ => (None, None),
        };
        Abort {
            status,
            stop,
            response,
            reset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Status as WireStatus;

    const CONFIG: CallConfig = CallConfig {
        max_message_size: 256,
        idle_limit: Some(Duration::from_secs(5)),
        metadata_frames: true,
    };

    /// A fake clock: every test starts at the same instant and moves it by hand.
    fn t0() -> Instant {
        use std::sync::OnceLock;
        static START: OnceLock<Instant> = OnceLock::new();
        *START.get_or_init(Instant::now)
    }

    fn at(secs: u64) -> Instant {
        t0() + Duration::from_secs(secs)
    }

    fn callee() -> Call {
        Call::callee(1, CONFIG, t0())
    }

    fn caller() -> Call {
        Call::caller(1, CONFIG)
    }

    fn req(payload: &'static [u8], timeout_nano: i64) -> Request {
        Request {
            service: "s.S".into(),
            method: "M".into(),
            payload: Bytes::from_static(payload),
            timeout_nano,
            ..Default::default()
        }
    }

    fn enc(request: Request) -> Bytes {
        request.encode_to_vec().into()
    }

    fn request(flags: Flags, payload: &'static [u8]) -> Frame {
        Frame::new(
            1,
            FrameType::Request,
            flags,
            req(payload, 0).encode_to_vec().into(),
        )
    }

    fn data(flags: Flags, payload: &'static [u8]) -> Frame {
        Frame::new(1, FrameType::Data, flags, Bytes::from_static(payload))
    }

    fn close() -> Frame {
        data(Flags::REMOTE_CLOSED | Flags::NO_DATA, b"")
    }

    fn open(ev: Inbound) -> (Option<Bytes>, bool) {
        match ev {
            Inbound::Open {
                first_message,
                streaming,
                ..
            } => (first_message, streaming),
            other => panic!("expected Open, got {other:?}"),
        }
    }

    fn decode_response(frame: &Frame) -> (Code, String, Bytes) {
        assert_eq!(frame.kind, FrameType::Response);
        let r = Response::decode(frame.payload.clone().into_bytes()).unwrap();
        let s = r.status.unwrap_or_default();
        (Code::from_i32(s.code), s.message, r.payload)
    }

    /// Feeds the frames one machine sends to the other and returns what the
    /// receiver made of them.
    fn deliver(to: &mut Call, frames: Vec<Frame>) -> Vec<Inbound> {
        frames
            .into_iter()
            .map(|f| to.recv(f, t0()).unwrap())
            .collect()
    }

    // ---- whole calls, both machines talking ----

    #[test]
    fn unary_call_both_roles() {
        let (mut a, mut b) = (caller(), callee());
        let f = a
            .send_request(enc(req(b"\x08\x01", 0)), RequestShape::Single)
            .unwrap();
        assert_eq!(f.flags, Flags::EMPTY);
        assert!(a.is_send_done());
        assert_eq!(
            open(b.recv(f, t0()).unwrap()),
            (Some(Bytes::from_static(b"\x08\x01")), false)
        );
        assert!(b.is_done());
        let reply = b
            .send_response(&Status::ok(""), Bytes::from_static(b"ok"))
            .unwrap()
            .0;
        assert!(b.is_finished());
        assert_eq!(
            deliver(&mut a, vec![reply]),
            vec![Inbound::Finished {
                status: Ok(()),
                message: Some(Bytes::from_static(b"ok"))
            }]
        );
        assert!(a.is_finished());
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn an_ok_response_without_a_status_is_the_same_frame() {
        let answer = |ok_response: bool| {
            let (mut a, mut b) = (caller(), callee());
            let f = a
                .send_request(enc(req(b"q", 0)), RequestShape::Single)
                .unwrap();
            b.recv(f, t0()).unwrap();
            let payload = Bytes::from_static(b"ok");
            let frame = if ok_response {
                b.send_ok_response(payload).unwrap()
            } else {
                b.send_response(&Status::ok(""), payload).unwrap()
            };
            assert!(b.is_finished());
            assert!(b.send_ok_response(Bytes::new()).is_err(), "only one end");
            frame
        };
        assert_eq!(answer(true), answer(false));
    }

    #[test]
    fn server_streaming_call_both_roles() {
        let (mut a, mut b) = (caller(), callee());
        let f = a
            .send_request(enc(req(b"q", 0)), RequestShape::Single)
            .unwrap();
        assert_eq!(
            open(b.recv(f, t0()).unwrap()),
            (Some(Bytes::from_static(b"q")), false)
        );
        let mut out = vec![b.send_headers(vec![]).unwrap().unwrap()];
        out.push(b.send_message(Bytes::from_static(b"1")).unwrap());
        out.push(b.send_message(Bytes::from_static(b"2")).unwrap());
        out.push(b.send_close().unwrap());
        assert!(b.is_finished());
        assert_eq!(
            deliver(&mut a, out),
            vec![
                Inbound::Headers(vec![]),
                Inbound::Message(Bytes::from_static(b"1")),
                Inbound::Message(Bytes::from_static(b"2")),
                Inbound::Closed,
            ]
        );
        assert!(a.is_finished());
    }

    #[test]
    fn client_streaming_call_both_roles() {
        let (mut a, mut b) = (caller(), callee());
        let mut out = vec![
            a.send_request(enc(req(b"", 0)), RequestShape::Stream)
                .unwrap(),
        ];
        assert_eq!(out[0].flags, Flags::REMOTE_OPEN | Flags::NO_DATA);
        out.push(a.send_message(Bytes::from_static(b"x")).unwrap());
        out.push(a.send_message(Bytes::new()).unwrap());
        out.push(a.close_send().unwrap());
        assert!(a.is_send_done());
        let got = deliver(&mut b, out);
        assert_eq!(open(got[0].clone()), (None, true));
        assert_eq!(
            got[1..],
            [
                Inbound::Message(Bytes::from_static(b"x")),
                Inbound::Message(Bytes::new()),
                Inbound::Closed
            ]
        );
        let trailers = vec![KeyValue {
            key: "k".into(),
            value: "v".into(),
        }];
        let out = vec![
            b.send_trailers(trailers.clone()).unwrap().unwrap(),
            b.send_response(&Status::ok(""), Bytes::from_static(b"sum"))
                .unwrap()
                .0,
        ];
        assert_eq!(
            deliver(&mut a, out),
            vec![
                Inbound::Trailers(trailers),
                Inbound::Finished {
                    status: Ok(()),
                    message: Some(Bytes::from_static(b"sum"))
                }
            ]
        );
    }

    #[test]
    fn bidi_call_interleaves_and_ends_with_an_error_status() {
        let (mut a, mut b) = (caller(), callee());
        let f = a
            .send_request(enc(req(b"", 0)), RequestShape::Stream)
            .unwrap();
        open(b.recv(f, t0()).unwrap());
        let m = a.send_message(Bytes::from_static(b"ping")).unwrap();
        assert_eq!(
            deliver(&mut b, vec![m]),
            vec![Inbound::Message(Bytes::from_static(b"ping"))]
        );
        let m = b.send_message(Bytes::from_static(b"pong")).unwrap();
        assert_eq!(
            deliver(&mut a, vec![m]),
            vec![Inbound::Message(Bytes::from_static(b"pong"))]
        );
        let end = b
            .send_response(&Status::not_found("gone"), Bytes::new())
            .unwrap()
            .0;
        // The caller is still sending when the callee ends: its Response
        // ends the whole call, the request side included.
        match a.recv(end, t0()).unwrap() {
            Inbound::Finished { status, message } => {
                assert_eq!(status.unwrap_err().code(), Code::NotFound);
                assert_eq!(message, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(a.is_finished());
        assert_eq!(
            a.send_message(Bytes::new()).unwrap_err().code(),
            Code::Internal
        );
    }

    // ---- sending rules ----

    #[test]
    fn sending_out_of_order_is_refused() {
        let mut a = caller();
        assert_eq!(
            a.send_message(Bytes::new()).unwrap_err().code(),
            Code::Internal
        );
        assert_eq!(a.close_send().unwrap_err().code(), Code::Internal);
        assert!(a.send_headers(vec![]).is_err(), "a caller sends no Headers");
        a.send_request(enc(req(b"", 0)), RequestShape::Single)
            .unwrap();
        assert!(
            a.send_request(enc(req(b"", 0)), RequestShape::Single)
                .is_err()
        );
        assert!(
            a.send_message(Bytes::new()).is_err(),
            "a unary request has one message"
        );

        let mut b = callee();
        assert!(
            b.send_request(enc(req(b"", 0)), RequestShape::Single)
                .is_err()
        );
        assert!(b.close_send().is_err());
        b.send_message(Bytes::new()).unwrap();
        assert!(b.send_headers(vec![]).is_err(), "Headers after a message");
        b.send_trailers(vec![KeyValue::default()]).unwrap();
        assert!(
            b.send_message(Bytes::new()).is_err(),
            "a message after Trailers"
        );
        assert!(b.send_trailers(vec![KeyValue::default()]).is_err());
        b.send_close().unwrap();
        assert!(b.send_response(&Status::ok(""), Bytes::new()).is_err());
        assert!(b.send_close().is_err());
    }

    #[test]
    fn metadata_frames_only_to_a_brpc_peer() {
        let mut b = Call::callee(
            1,
            CallConfig {
                metadata_frames: false,
                ..CONFIG
            },
            t0(),
        );
        assert_eq!(b.send_headers(vec![KeyValue::default()]).unwrap(), None);
        assert_eq!(b.send_trailers(vec![KeyValue::default()]).unwrap(), None);
        // Empty trailers are never sent, even to a brpc peer.
        assert_eq!(callee().send_trailers(vec![]).unwrap(), None);
    }

    #[test]
    fn oversize_messages_are_refused_before_sending() {
        let big = Bytes::from(vec![0u8; 257]);
        let mut a = caller();
        a.send_request(enc(req(b"", 0)), RequestShape::Stream)
            .unwrap();
        let err = a.send_message(big.clone()).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(
            err.message(),
            "message length 257 exceed maximum message size of 256"
        );

        let mut a = caller();
        let err = a
            .send_request(enc(req(&[1u8; 256], 0)), RequestShape::Single)
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(a.is_finished(), "an unsendable Request ends the call");

        let mut b = callee();
        let err = b.send_message(big).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message().starts_with("response message length 257"),
            "{err:?}"
        );
        // The callee then ends the call with that status.
        let end = b.send_response(&err, Bytes::new()).unwrap().0;
        assert_eq!(decode_response(&end).0, Code::ResourceExhausted);
    }

    #[test]
    fn an_oversize_response_is_replaced_by_resource_exhausted() {
        let mut b = callee();
        let (end, sent) = b
            .send_response(&Status::ok(""), Bytes::from(vec![7u8; 256]))
            .unwrap();
        let (code, message, payload) = decode_response(&end);
        assert_eq!(code, Code::ResourceExhausted);
        assert_eq!(sent, Code::ResourceExhausted, "the code it says it sent");
        let (_, sent) = callee()
            .send_ok_response(Bytes::from(vec![7u8; 256]))
            .unwrap();
        assert_eq!(sent, Code::ResourceExhausted);
        assert!(message.starts_with("response message length"), "{message}");
        assert!(payload.is_empty());
        assert!(end.payload.len() <= 256);
    }

    // ---- timers ----

    #[test]
    fn callee_deadline_comes_from_the_request_and_expires() {
        let mut b = callee();
        let f = Frame::new(
            1,
            FrameType::Request,
            Flags::EMPTY,
            req(b"", 2_000_000_000).encode_to_vec().into(),
        );
        open(b.recv(f, at(1)).unwrap());
        assert_eq!(b.deadline(), Some(at(3)));
        assert_eq!(b.poll_timeout(), Some(at(3)));
        assert!(b.handle_timeout(at(2)).is_none());
        let abort = b.handle_timeout(at(3)).unwrap();
        assert_eq!(abort.status.code(), Code::DeadlineExceeded);
        assert_eq!(abort.stop, None, "the unary input was complete");
        let (code, ..) = decode_response(abort.response.as_ref().unwrap());
        assert_eq!(code, Code::DeadlineExceeded);
        assert!(b.is_finished());
        assert_eq!(b.poll_timeout(), None);
        assert!(b.handle_timeout(at(9)).is_none());
    }

    #[test]
    fn a_negative_timeout_has_already_expired() {
        let mut b = callee();
        let f = Frame::new(
            1,
            FrameType::Request,
            Flags::REMOTE_OPEN,
            req(b"", -5).encode_to_vec().into(),
        );
        open(b.recv(f, at(1)).unwrap());
        assert_eq!(b.poll_timeout(), Some(at(1)));
        let abort = b.handle_timeout(at(1)).unwrap();
        assert_eq!(abort.status.code(), Code::DeadlineExceeded);
        assert_eq!(abort.stop, Some(codes::STREAM_CANCELLED));
    }

    #[test]
    fn caller_deadline_cancels_both_halves() {
        let mut a = caller();
        a.set_deadline(Some(at(2)));
        a.send_request(enc(req(b"", 0)), RequestShape::Stream)
            .unwrap();
        assert_eq!(a.poll_timeout(), Some(at(2)));
        let abort = a.handle_timeout(at(2)).unwrap();
        assert_eq!(abort.status.code(), Code::DeadlineExceeded);
        assert_eq!(abort.stop, Some(codes::STREAM_CANCELLED));
        assert_eq!(abort.reset, Some(codes::STREAM_CANCELLED));
        assert!(abort.response.is_none());
        assert!(a.is_finished());
    }

    #[test]
    fn idle_limit_before_the_request_resets_without_an_answer() {
        let mut b = callee();
        assert_eq!(b.poll_timeout(), Some(at(5)));
        // A few bytes do not restart the limit; enough do, as mid-frame.
        b.note_bytes(at(3), true, 10);
        assert_eq!(b.poll_timeout(), Some(at(5)));
        b.note_bytes(at(4), true, MIN_IDLE_PROGRESS);
        assert_eq!(b.poll_timeout(), Some(at(9)));
        assert!(b.handle_timeout(at(5)).is_none());
        let abort = b.handle_timeout(at(9)).unwrap();
        assert_eq!(abort.stop, Some(codes::STREAM_IDLE));
        assert_eq!(abort.reset, Some(codes::STREAM_IDLE));
        assert!(abort.response.is_none());
        assert!(b.is_finished());
    }

    #[test]
    fn idle_limit_runs_only_mid_frame() {
        let mut b = callee();
        open(b.recv(request(Flags::REMOTE_OPEN, b""), at(1)).unwrap());
        assert_eq!(
            b.poll_timeout(),
            None,
            "between frames a call may wait forever"
        );
        b.note_bytes(at(2), true, 10);
        assert_eq!(b.poll_timeout(), Some(at(7)), "a frame begun starts it");
        b.note_bytes(at(4), true, MIN_IDLE_PROGRESS);
        assert_eq!(b.poll_timeout(), Some(at(9)), "progress restarts the limit");
        b.recv(data(Flags::EMPTY, b"m"), at(5)).unwrap();
        assert_eq!(b.poll_timeout(), None, "a whole frame stops it");
        b.note_bytes(at(6), true, 10);
        let abort = b.handle_timeout(at(11)).unwrap();
        assert_eq!(abort.status.code(), Code::DeadlineExceeded);
        assert_eq!(abort.stop, Some(codes::STREAM_IDLE));
        assert!(abort.response.is_some());

        let mut a = caller();
        a.send_request(enc(req(b"", 0)), RequestShape::Single)
            .unwrap();
        a.note_bytes(at(1), true, 10);
        let abort = a.handle_timeout(at(6)).unwrap();
        assert_eq!(abort.status.code(), Code::DeadlineExceeded);
        assert_eq!(abort.stop, Some(codes::STREAM_CANCELLED));
    }

    /// A peer trickling bytes into a half-received frame does not keep it
    /// alive: only [`MIN_IDLE_PROGRESS`] bytes since the limit last started
    /// start it again.
    #[test]
    fn a_trickle_of_bytes_does_not_hold_off_the_idle_limit() {
        let mut b = callee();
        open(b.recv(request(Flags::REMOTE_OPEN, b""), at(1)).unwrap());
        b.note_bytes(at(1), true, 10);
        for secs in 2..6 {
            b.note_bytes(at(secs), true, 1);
            assert_eq!(b.poll_timeout(), Some(at(6)), "at {secs} s");
        }
        let abort = b.handle_timeout(at(6)).unwrap();
        assert_eq!(abort.stop, Some(codes::STREAM_IDLE));
    }

    #[test]
    fn the_clock_is_read_only_when_the_idle_limit_runs() {
        let mut b = callee();
        let reads = std::cell::Cell::new(0);
        let clock = |secs| {
            reads.set(reads.get() + 1);
            at(secs)
        };
        b.note_bytes_then(|| clock(1), false, MIN_IDLE_PROGRESS);
        assert_eq!(reads.get(), 1, "before the Request the limit always runs");
        assert_eq!(b.poll_timeout(), Some(at(6)));
        open(b.recv(request(Flags::REMOTE_OPEN, b""), at(1)).unwrap());
        b.note_bytes_then(|| clock(2), false, 10);
        assert_eq!(reads.get(), 1, "between frames the clock is not read");
        assert_eq!(b.poll_timeout(), None);
        b.note_bytes_then(|| clock(3), true, 10);
        assert_eq!(reads.get(), 2);
        assert_eq!(b.poll_timeout(), Some(at(8)));
    }

    #[test]
    fn the_earlier_timer_wins() {
        let mut a = caller();
        a.set_deadline(Some(at(3)));
        a.send_request(enc(req(b"", 0)), RequestShape::Single)
            .unwrap();
        a.note_bytes(at(0), true, 10);
        assert_eq!(a.poll_timeout(), Some(at(3)));
        a.set_deadline(Some(at(30)));
        assert_eq!(a.poll_timeout(), Some(at(5)));
    }

    // ---- aborts ----

    #[test]
    fn cancel_resets_what_is_still_open() {
        let mut a = caller();
        a.send_request(enc(req(b"", 0)), RequestShape::Stream)
            .unwrap();
        let abort = a.abort(Failure::Cancelled);
        assert_eq!(abort.status.code(), Code::Cancelled);
        assert_eq!(abort.stop, Some(codes::STREAM_CANCELLED));
        assert_eq!(abort.reset, Some(codes::STREAM_CANCELLED));

        let mut b = callee();
        b.recv(request(Flags::EMPTY, b""), t0()).unwrap();
        let abort = b.abort(Failure::Cancelled);
        assert_eq!(abort.stop, None, "the unary input had ended");
        assert_eq!(abort.reset, Some(codes::STREAM_CANCELLED));
        assert!(abort.response.is_none());
    }

    #[test]
    fn failures_pick_their_codes() {
        let cases = [
            (
                Failure::TooLarge(too_large(9, 4)),
                codes::STREAM_TOO_LARGE,
                Code::ResourceExhausted,
            ),
            (
                Failure::Refused(Status::resource_exhausted("budget")),
                codes::STREAM_REFUSED,
                Code::ResourceExhausted,
            ),
            (
                Failure::Protocol(Status::invalid_argument("bad")),
                codes::STREAM_PROTOCOL_ERROR,
                Code::InvalidArgument,
            ),
            (
                Failure::Truncated,
                codes::STREAM_PROTOCOL_ERROR,
                Code::InvalidArgument,
            ),
        ];
        for (failure, stop, code) in cases {
            let mut b = callee();
            let abort = b.abort(failure);
            assert_eq!(abort.stop, Some(stop));
            assert_eq!(abort.status.code(), code);
            assert_eq!(decode_response(abort.response.as_ref().unwrap()).0, code);
            assert!(b.is_finished());
        }
        // A caller that received a bad answer says so; one that fails for
        // its own reasons only says "cancelled".
        let mut a = caller();
        a.send_request(enc(req(b"", 0)), RequestShape::Stream)
            .unwrap();
        let abort = a.abort(Failure::Protocol(Status::internal("bad answer")));
        assert_eq!(abort.stop, Some(codes::STREAM_PROTOCOL_ERROR));
        assert_eq!(abort.reset, Some(codes::STREAM_CANCELLED));
        let mut a = caller();
        a.send_request(enc(req(b"", 0)), RequestShape::Stream)
            .unwrap();
        let abort = a.abort(Failure::Local(Status::unknown("body failed")));
        assert_eq!(abort.stop, Some(codes::STREAM_CANCELLED));
        // One with no room for its answer says that, not "too large".
        let mut a = caller();
        a.send_request(enc(req(b"", 0)), RequestShape::Stream)
            .unwrap();
        let abort = a.abort(Failure::Refused(Status::resource_exhausted("budget")));
        assert_eq!(abort.stop, Some(codes::STREAM_REFUSED));
        assert_eq!(abort.status.code(), Code::ResourceExhausted);
    }

    #[test]
    fn stream_end_without_a_status() {
        let mut a = caller();
        a.send_request(enc(req(b"", 0)), RequestShape::Single)
            .unwrap();
        assert_eq!(a.recv_finished().unwrap().code(), Code::Internal);
        let mut b = callee();
        assert_eq!(b.recv_finished().unwrap().code(), Code::InvalidArgument);
        let mut b = callee();
        b.recv(request(Flags::REMOTE_OPEN, b""), t0()).unwrap();
        assert!(b.recv_finished().is_none(), "a FIN ends streamed input");
        assert!(b.is_done());
    }

    // ---- inbound checks (the protocol violations) ----

    /// Feeds `frames` to `c` until one is refused: it must be, with `code`
    /// and a message containing `want`, and end the receive half.
    fn expect_violation(mut c: Call, frames: Vec<Frame>, code: Code, want: &str) {
        let err = frames
            .into_iter()
            .find_map(|f| c.recv(f, t0()).err())
            .unwrap_or_else(|| panic!("no error, expected {want}"));
        assert_eq!(err.code(), code, "{want}");
        assert!(err.message().contains(want), "{} !~ {want}", err.message());
        assert!(c.is_done());
    }

    #[test]
    fn unary_request_carries_its_message_even_when_empty() {
        let mut c = callee();
        assert_eq!(
            open(c.recv(request(Flags::EMPTY, b""), t0()).unwrap()),
            (Some(Bytes::new()), false)
        );
        assert!(c.is_done());
        let err = c.recv(data(Flags::EMPTY, b"x"), t0()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[test]
    fn server_streaming_request_flag_is_single_input() {
        let mut c = callee();
        assert_eq!(
            open(
                c.recv(request(Flags::REMOTE_CLOSED, b"\x08\x01"), t0())
                    .unwrap()
            ),
            (Some(Bytes::from_static(b"\x08\x01")), false)
        );
    }

    #[test]
    fn streaming_request_both_flag_forms_invent_no_message() {
        for flags in [Flags::REMOTE_OPEN, Flags::REMOTE_OPEN | Flags::NO_DATA] {
            let mut c = callee();
            assert_eq!(
                open(c.recv(request(flags, b""), t0()).unwrap()),
                (None, true)
            );
            assert_eq!(
                c.recv(data(Flags::EMPTY, b""), t0()).unwrap(),
                Inbound::Message(Bytes::new()),
                "a zero-length Data frame without no-data is an empty message"
            );
            assert_eq!(
                c.recv(data(Flags::NO_DATA, b""), t0()).unwrap(),
                Inbound::Ignored
            );
            assert_eq!(c.recv(close(), t0()).unwrap(), Inbound::Closed);
            assert!(c.is_done());
        }
    }

    #[test]
    fn streaming_request_with_payload_keeps_it() {
        let mut c = callee();
        assert_eq!(
            open(
                c.recv(request(Flags::REMOTE_OPEN, b"\x08\x02"), t0())
                    .unwrap()
            ),
            (Some(Bytes::from_static(b"\x08\x02")), true)
        );
    }

    #[test]
    fn callee_rejects_bad_sequences() {
        let cases: Vec<(Vec<Frame>, &str)> = vec![
            (vec![data(Flags::EMPTY, b"x")], "expected a Request"),
            (
                vec![Frame::new(
                    1,
                    FrameType::Response,
                    Flags::EMPTY,
                    Bytes::new(),
                )],
                "expected a Request",
            ),
            (
                vec![request(Flags::REMOTE_OPEN, b""), request(Flags::EMPTY, b"")],
                "second Request",
            ),
            (
                vec![
                    request(Flags::REMOTE_OPEN, b""),
                    Frame::new(1, FrameType::Response, Flags::EMPTY, Bytes::new()),
                ],
                "Response frame from the caller",
            ),
            (
                vec![request(Flags::REMOTE_OPEN | Flags::REMOTE_CLOSED, b"")],
                "both open and close",
            ),
            (
                vec![Frame::new(
                    1,
                    FrameType::Request,
                    Flags::EMPTY,
                    Bytes::from_static(b"\xff\xff"),
                )],
                "undecodable Request",
            ),
            (
                vec![Frame::new(
                    1,
                    FrameType::Request,
                    Flags::EMPTY,
                    Request::default().encode_to_vec().into(),
                )],
                "names no service",
            ),
            (
                vec![
                    request(Flags::REMOTE_OPEN, b""),
                    data(Flags::REMOTE_CLOSED, b"x"),
                ],
                "cannot include data",
            ),
            (
                vec![Frame::new(
                    3,
                    FrameType::Request,
                    Flags::EMPTY,
                    Bytes::new(),
                )],
                "stream id 3",
            ),
            (
                vec![request(Flags::REMOTE_OPEN, b""), close(), close()],
                "after the sender closed",
            ),
        ];
        for (frames, want) in cases {
            expect_violation(callee(), frames, Code::InvalidArgument, want);
        }
    }

    #[test]
    fn caller_rejects_bad_answers() {
        let headers = || Frame::new(1, FrameType::Headers, Flags::EMPTY, Bytes::new());
        let trailers = || Frame::new(1, FrameType::Trailers, Flags::EMPTY, Bytes::new());
        let cases: Vec<(Vec<Frame>, &str)> = vec![
            (
                vec![data(Flags::EMPTY, b"m"), headers()],
                "Headers frame after the reply",
            ),
            (vec![headers(), headers()], "Headers frame after the reply"),
            (vec![trailers(), trailers()], "second Trailers"),
            (
                vec![trailers(), data(Flags::EMPTY, b"m")],
                "after the Trailers",
            ),
            (
                vec![request(Flags::EMPTY, b"")],
                "Request frame from the callee",
            ),
            (
                vec![Frame::new(
                    1,
                    FrameType::Headers,
                    Flags::EMPTY,
                    Bytes::from_static(b"\xff"),
                )],
                "undecodable metadata",
            ),
            (
                vec![Frame::new(
                    1,
                    FrameType::Response,
                    Flags::EMPTY,
                    Bytes::from_static(b"\xff"),
                )],
                "undecodable Response",
            ),
            (
                vec![close(), data(Flags::EMPTY, b"late")],
                "after the sender closed",
            ),
        ];
        for (frames, want) in cases {
            expect_violation(caller(), frames, Code::Internal, want);
        }
    }

    #[test]
    fn unknown_types_are_ignored() {
        let mut c = callee();
        let f = Frame::new(1, FrameType::Unknown(0x7f), Flags::EMPTY, Bytes::new());
        assert_eq!(c.recv(f, t0()).unwrap(), Inbound::Ignored);
        assert!(matches!(
            c.recv(request(Flags::EMPTY, b""), t0()).unwrap(),
            Inbound::Open { .. }
        ));
    }

    #[test]
    fn caller_sees_an_error_response_without_a_message() {
        let err = Response {
            status: Some(WireStatus {
                code: Code::NotFound as i32,
                message: "nope".into(),
                details: vec![],
            }),
            payload: Bytes::from_static(b"ignored"),
        };
        let mut c = caller();
        match c
            .recv(
                Frame::new(
                    1,
                    FrameType::Response,
                    Flags::EMPTY,
                    err.encode_to_vec().into(),
                ),
                t0(),
            )
            .unwrap()
        {
            Inbound::Finished { status, message } => {
                let status = status.unwrap_err();
                assert_eq!(status.code(), Code::NotFound);
                assert_eq!(status.message(), "nope");
                assert_eq!(message, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_ok_message_encodes_as_an_ok_response_does() {
        let message = Request {
            service: "s".into(),
            ..Default::default()
        };
        for m in [message, Request::default()] {
            let mut a = Call::callee(1, CONFIG, Instant::now());
            let mut b = Call::callee(1, CONFIG, Instant::now());
            let (direct, code) = a.send_ok_message(&m).expect("send");
            assert_eq!(code, Code::Ok);
            let built = b
                .send_response(&Status::ok(""), m.encode_to_vec().into())
                .expect("send")
                .0;
            assert_eq!(direct, built);
        }
        let mut small = Call::callee(
            1,
            CallConfig {
                max_message_size: 8,
                ..CONFIG
            },
            Instant::now(),
        );
        let (frame, code) = small
            .send_ok_message(&Request {
                service: "far too long for eight bytes".into(),
                ..Default::default()
            })
            .expect("send");
        assert_eq!(code, Code::ResourceExhausted);
        let response = Response::decode(frame.payload.into_bytes()).expect("response");
        assert_eq!(
            response.status.expect("status").code,
            Code::ResourceExhausted as i32
        );
    }

    #[test]
    fn a_request_message_over_the_limit_is_refused_with_its_size() {
        let parts = RequestParts {
            service: "s.S",
            method: "M",
            payload: b"",
            timeout_nano: 0,
            metadata: &[],
        };
        let message = Request {
            service: "a message of some forty bytes or so".into(),
            ..Default::default()
        };
        let whole = parts.encode_with_message(&message);
        assert_eq!(
            encode_request_message(&parts, &message, whole.len()).expect("fits"),
            whole
        );
        let refused =
            encode_request_message(&parts, &message, whole.len() - 1).expect_err("one byte over");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(
            refused.message(),
            too_large_message(whole.len(), whole.len() - 1)
        );
        // The same envelope with the message already encoded.
        let payload = message.encode_to_vec();
        let with_payload = RequestParts {
            payload: &payload,
            ..parts
        };
        assert_eq!(
            encode_request_parts(&with_payload, whole.len()).expect("fits"),
            whole
        );
        let refused =
            encode_request_parts(&with_payload, whole.len() - 1).expect_err("one byte over");
        assert_eq!(
            refused.message(),
            too_large_message(whole.len(), whole.len() - 1)
        );
    }

    /// A call config that takes messages of a few hundred KiB.
    const LARGE: CallConfig = CallConfig {
        max_message_size: 4 << 20,
        ..CONFIG
    };

    /// A message with large and small `bytes::Bytes` fields around others.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Blobs {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(bytes = "bytes", tag = "2")]
        big: Bytes,
        #[prost(uint64, tag = "3")]
        n: u64,
        #[prost(bytes = "bytes", tag = "4")]
        small: Bytes,
        #[prost(bytes = "bytes", tag = "5")]
        other: Bytes,
    }

    fn blobs(big: usize) -> Blobs {
        Blobs {
            name: "blobs".into(),
            big: Bytes::from(vec![7u8; big]),
            n: 42,
            small: Bytes::from_static(b"small"),
            other: Bytes::from(vec![9u8; PIECE_MIN]),
        }
    }

    /// Whether one of `payload`'s pieces is `field`'s own buffer.
    fn sent_as_is(payload: &Payload, field: &Bytes) -> bool {
        payload
            .pieces()
            .iter()
            .any(|p| p.as_ptr() == field.as_ptr() && p.len() == field.len())
    }

    #[test]
    fn a_large_reply_goes_out_in_pieces_holding_its_bytes_fields_as_they_are() {
        let m = blobs(100 * 1024);
        let mut a = Call::callee(1, LARGE, Instant::now());
        let (frame, code) = a.send_ok_message(&m).expect("send");
        assert_eq!(code, Code::Ok);
        assert!(matches!(frame.payload, Payload::Pieces(_)), "{frame:?}");
        assert!(sent_as_is(&frame.payload, &m.big));
        assert!(sent_as_is(&frame.payload, &m.other));
        assert!(
            !sent_as_is(&frame.payload, &m.small),
            "a small field is copied"
        );
        // The same bytes as the Response built from the encoded message.
        let mut b = Call::callee(1, LARGE, Instant::now());
        let built = b
            .send_response(&Status::ok(""), m.encode_to_vec().into())
            .expect("send")
            .0;
        assert_eq!(frame, built);
        assert_eq!(
            frame.payload.clone().into_bytes(),
            built.payload.into_bytes()
        );
        let mut wire = bytes::BytesMut::new();
        frame.encode(&mut wire).expect("encode");
        let mut decoder = crate::wire::FrameDecoder::new(LARGE.max_message_size);
        let decoded = decoder.decode(&mut wire).expect("decode").expect("a frame");
        assert_eq!(decoded, frame);
        let response = Response::decode(decoded.payload.into_bytes()).expect("response");
        assert_eq!(Blobs::decode(response.payload).expect("message"), m);

        // Below PIECE_MIN in all: one buffer.
        let mut c = Call::callee(1, LARGE, Instant::now());
        let small = Blobs {
            other: Bytes::new(),
            ..blobs(100)
        };
        let (frame, _) = c.send_ok_message(&small).expect("send");
        assert!(matches!(frame.payload, Payload::Whole(_)), "{frame:?}");
    }

    #[test]
    fn a_large_request_goes_out_in_pieces_holding_its_bytes_fields_as_they_are() {
        let metadata = [KeyValue {
            key: "k".into(),
            value: "v".into(),
        }];
        let parts = RequestParts {
            service: "s.S",
            method: "M",
            payload: b"",
            timeout_nano: 5,
            metadata: &metadata,
        };
        let m = blobs(300 * 1024);
        let pieces = encode_request_message(&parts, &m, LARGE.max_message_size).expect("fits");
        assert!(matches!(pieces, Payload::Pieces(_)), "{pieces:?}");
        assert!(sent_as_is(&pieces, &m.big));
        assert!(sent_as_is(&pieces, &m.other));
        let whole = parts.encode_with_message(&m);
        assert_eq!(pieces, whole);
        let request = Request::decode(pieces.into_bytes()).expect("request");
        assert_eq!(request.metadata, metadata);
        assert_eq!(Blobs::decode(request.payload).expect("message"), m);
        let refused = encode_request_message(&parts, &m, whole.len() - 1).expect_err("over");
        assert_eq!(refused.code(), Code::ResourceExhausted);
    }

    #[test]
    fn a_large_encoded_payload_goes_out_as_it_is_in_a_request_and_a_response() {
        let metadata = [KeyValue {
            key: "k".into(),
            value: "v".into(),
        }];
        for len in [PIECE_MIN - 1, PIECE_MIN, 300 * 1024] {
            let payload = Bytes::from(vec![7u8; len]);
            let parts = RequestParts {
                service: "s.S",
                method: "M",
                payload: &payload,
                timeout_nano: 5,
                metadata: &metadata,
            };
            let whole = encode_request_parts(&parts, LARGE.max_message_size).expect("fits");
            // As the caller does: the payload beside the parts, not in them.
            let parts = RequestParts {
                payload: &[],
                ..parts
            };
            let shared =
                encode_request_shared(&parts, &payload, LARGE.max_message_size).expect("fits");
            assert_eq!(shared, whole, "the same bytes");
            assert_eq!(sent_as_is(&shared, &payload), len >= PIECE_MIN, "{len}");
            assert_eq!(matches!(shared, Payload::Pieces(_)), len >= PIECE_MIN);
            let refused =
                encode_request_shared(&parts, &payload, whole.len() - 1).expect_err("over");
            assert_eq!(refused.code(), Code::ResourceExhausted);

            let mut callee = Call::callee(1, LARGE, Instant::now());
            let status = Status::ok("");
            let (frame, code) = callee
                .send_response(&status, payload.clone())
                .expect("send");
            assert_eq!(code, Code::Ok);
            // The same bytes as prost's own encoding.
            let expected = Response {
                status: Some(to_wire(&status)),
                payload: payload.clone(),
            }
            .encode_to_vec();
            assert_eq!(frame.payload, Bytes::from(expected), "the same bytes");
            assert_eq!(sent_as_is(&frame.payload, &payload), len >= PIECE_MIN);
        }
        // One byte over the maximum: replaced, as before.
        let mut callee = Call::callee(1, LARGE, Instant::now());
        let payload = Bytes::from(vec![7u8; LARGE.max_message_size]);
        let (frame, code) = callee
            .send_response(&Status::ok(""), payload)
            .expect("send");
        assert_eq!(code, Code::ResourceExhausted);
        assert!(matches!(frame.payload, Payload::Whole(_)));
    }

    #[test]
    fn a_large_streamed_message_is_encoded_in_pieces_holding_its_bytes_fields() {
        let m = blobs(64 * 1024);
        let encoded = encode_message(&m);
        assert!(matches!(encoded, Payload::Pieces(_)), "{encoded:?}");
        assert!(sent_as_is(&encoded, &m.big));
        assert_eq!(encoded, Bytes::from(m.encode_to_vec()));
        let small = encode_message(&blobs(10));
        assert!(matches!(small, Payload::Pieces(_)), "the 16 KiB field");
        let tiny = Blobs {
            other: Bytes::new(),
            ..blobs(10)
        };
        let whole = encode_message(&tiny);
        assert!(matches!(whole, Payload::Whole(_)), "{whole:?}");
        assert_eq!(whole, Bytes::from(tiny.encode_to_vec()));
        let mut callee = Call::callee(1, LARGE, Instant::now());
        let frame = callee.send_message(encoded.clone()).expect("send");
        assert_eq!(frame.payload, encoded);
    }
}
