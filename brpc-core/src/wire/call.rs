//! Per-call state machine: checks the frames one side of a call receives and turns
//! them into events (open, message, close, finish) or a protocol [`Status`](tonic::Status).
//!
//! Sans-IO: frames in, events out. The engine drives one [`CallState`] per QUIC
//! stream; the byte-stream transport drives one per ttrpc stream id.

use bytes::Bytes;
use prost::Message;
use tonic::{Code, Status};

use super::envelope::{KeyValue, Metadata, Request, Response};
use super::frame::{Flags, Frame, FrameType};

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
        /// The call's status.
        status: Status,
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
            ) => a.code() == x.code() && a.message() == x.message() && b == y,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Callee before the Request.
    AwaitRequest,
    /// Messages may still arrive.
    Open,
    /// The other side finished sending.
    Done,
}

/// State of one call as seen by one side.
#[derive(Debug, Clone)]
pub struct CallState {
    role: CallRole,
    stream_id: u32,
    phase: Phase,
    /// Caller: no Data, Headers or Response has arrived yet.
    before_reply: bool,
    /// Caller: Trailers arrived, so only the end of the call may follow.
    trailers_seen: bool,
}

impl CallState {
    /// The machine for a call this side opened on `stream_id`.
    pub fn caller(stream_id: u32) -> Self {
        CallState {
            role: CallRole::Caller,
            stream_id,
            phase: Phase::Open,
            before_reply: true,
            trailers_seen: false,
        }
    }

    /// The machine for a call the other side opens on `stream_id`.
    pub fn callee(stream_id: u32) -> Self {
        CallState {
            role: CallRole::Callee,
            stream_id,
            phase: Phase::AwaitRequest,
            before_reply: true,
            trailers_seen: false,
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

    /// Whether the other side has finished sending.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Feeds one received frame.
    ///
    /// # Errors
    /// A [`Status`](tonic::Status) describing the protocol violation: `INVALID_ARGUMENT` for a
    /// bad request from a caller, `INTERNAL` for a bad answer from a callee. The
    /// call cannot continue after an error.
    pub fn recv(&mut self, frame: Frame) -> Result<Inbound, Status> {
        let result = self.step(frame);
        if result.is_err() {
            self.phase = Phase::Done;
        }
        result
    }

    fn violation(&self, message: impl Into<String>) -> Status {
        let code = match self.role {
            CallRole::Callee => Code::InvalidArgument,
            CallRole::Caller => Code::Internal,
        };
        Status::new(code, message)
    }

    fn step(&mut self, frame: Frame) -> Result<Inbound, Status> {
        if let FrameType::Unknown(_) = frame.kind {
            return Ok(Inbound::Ignored);
        }
        if frame.stream_id != self.stream_id {
            return Err(self.violation(format!(
                "frame for stream id {} on the QUIC stream of call {}",
                frame.stream_id, self.stream_id
            )));
        }
        match (self.role, self.phase, frame.kind) {
            (_, Phase::Done, kind) => {
                Err(self.violation(format!("{kind:?} frame after the sender closed the stream")))
            }
            (CallRole::Callee, Phase::AwaitRequest, FrameType::Request) => self.open(frame),
            (CallRole::Callee, Phase::AwaitRequest, kind) => Err(self.violation(format!(
                "expected a Request frame to open the call, got {kind:?}"
            ))),
            (CallRole::Callee, Phase::Open, FrameType::Data) => self.data(frame),
            (CallRole::Callee, Phase::Open, FrameType::Request) => {
                Err(self.violation("a second Request frame on one stream"))
            }
            (CallRole::Callee, Phase::Open, kind) => {
                Err(self.violation(format!("a {kind:?} frame from the caller")))
            }
            (CallRole::Caller, _, FrameType::Headers) => {
                if !self.before_reply {
                    return Err(self.violation("Headers frame after the reply started"));
                }
                self.before_reply = false;
                Ok(Inbound::Headers(self.metadata(frame.payload)?))
            }
            (CallRole::Caller, _, FrameType::Trailers) => {
                if self.trailers_seen {
                    return Err(self.violation("a second Trailers frame"));
                }
                self.trailers_seen = true;
                self.before_reply = false;
                Ok(Inbound::Trailers(self.metadata(frame.payload)?))
            }
            (CallRole::Caller, _, FrameType::Data) => {
                self.before_reply = false;
                if self.trailers_seen && !frame.flags.contains(Flags::REMOTE_CLOSED) {
                    return Err(self.violation("a message after the Trailers frame"));
                }
                self.data(frame)
            }
            (CallRole::Caller, _, FrameType::Response) => {
                self.phase = Phase::Done;
                let response = Response::decode(frame.payload).map_err(|e| {
                    Status::internal(format!("peer sent an undecodable Response: {e}"))
                })?;
                let status = crate::status::from_wire(response.status.unwrap_or_default());
                let message = (status.code() == Code::Ok).then_some(response.payload);
                Ok(Inbound::Finished { status, message })
            }
            (CallRole::Caller, _, _) => Err(self.violation("a Request frame from the callee")),
        }
    }

    fn metadata(&self, payload: Bytes) -> Result<Vec<KeyValue>, Status> {
        Metadata::decode(payload)
            .map(|m| m.entries)
            .map_err(|e| self.violation(format!("undecodable metadata frame: {e}")))
    }

    fn open(&mut self, frame: Frame) -> Result<Inbound, Status> {
        let flags = frame.flags;
        if flags.contains(Flags::REMOTE_OPEN) && flags.contains(Flags::REMOTE_CLOSED) {
            return Err(self.violation(format!(
                "Request flags {flags:?} both open and close the stream"
            )));
        }
        let mut request = Request::decode(frame.payload)
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
        self.phase = if streaming { Phase::Open } else { Phase::Done };
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
            self.phase = Phase::Done;
            return Ok(Inbound::Closed);
        }
        if frame.flags.contains(Flags::NO_DATA) {
            return Ok(Inbound::Ignored);
        }
        Ok(Inbound::Message(frame.payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Status as WireStatus;

    fn request(flags: Flags, payload: &'static [u8]) -> Frame {
        let req = Request {
            service: "s.S".into(),
            method: "M".into(),
            payload: Bytes::from_static(payload),
            ..Default::default()
        };
        Frame::new(1, FrameType::Request, flags, req.encode_to_vec().into())
    }

    fn data(flags: Flags, payload: &'static [u8]) -> Frame {
        Frame::new(1, FrameType::Data, flags, Bytes::from_static(payload))
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

    #[test]
    fn unary_request_carries_its_message_even_when_empty() {
        let mut c = CallState::callee(1);
        assert_eq!(
            open(c.recv(request(Flags::EMPTY, b"")).unwrap()),
            (Some(Bytes::new()), false)
        );
        assert!(c.is_done());
        let err = c.recv(data(Flags::EMPTY, b"x")).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[test]
    fn server_streaming_request_flag_is_single_input() {
        let mut c = CallState::callee(1);
        assert_eq!(
            open(c.recv(request(Flags::REMOTE_CLOSED, b"\x08\x01")).unwrap()),
            (Some(Bytes::from_static(b"\x08\x01")), false)
        );
    }

    #[test]
    fn streaming_request_both_flag_forms_invent_no_message() {
        for flags in [Flags::REMOTE_OPEN, Flags::REMOTE_OPEN | Flags::NO_DATA] {
            let mut c = CallState::callee(1);
            assert_eq!(open(c.recv(request(flags, b"")).unwrap()), (None, true));
            assert_eq!(
                c.recv(data(Flags::EMPTY, b"")).unwrap(),
                Inbound::Message(Bytes::new()),
                "a zero-length Data frame without no-data is an empty message"
            );
            assert_eq!(
                c.recv(data(Flags::EMPTY, b"ab")).unwrap(),
                Inbound::Message(Bytes::from_static(b"ab"))
            );
            assert_eq!(
                c.recv(data(Flags::REMOTE_CLOSED | Flags::NO_DATA, b""))
                    .unwrap(),
                Inbound::Closed
            );
            assert!(c.is_done());
        }
    }

    #[test]
    fn streaming_request_with_payload_keeps_it() {
        let mut c = CallState::callee(1);
        assert_eq!(
            open(c.recv(request(Flags::REMOTE_OPEN, b"\x08\x02")).unwrap()),
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
        ];
        for (frames, want) in cases {
            let mut c = CallState::callee(1);
            let mut last = None;
            for f in frames {
                if let Err(e) = c.recv(f) {
                    last = Some(e);
                    break;
                }
            }
            let err = last.unwrap_or_else(|| panic!("no error, expected {want}"));
            assert_eq!(err.code(), Code::InvalidArgument, "{want}");
            assert!(err.message().contains(want), "{} !~ {want}", err.message());
            assert!(c.is_done());
        }
    }

    #[test]
    fn unknown_types_are_ignored() {
        let mut c = CallState::callee(1);
        let f = Frame::new(1, FrameType::Unknown(0x7f), Flags::EMPTY, Bytes::new());
        assert_eq!(c.recv(f).unwrap(), Inbound::Ignored);
        assert!(matches!(
            c.recv(request(Flags::EMPTY, b"")).unwrap(),
            Inbound::Open { .. }
        ));
    }

    #[test]
    fn caller_sees_stream_then_close() {
        let mut c = CallState::caller(1);
        assert_eq!(
            c.recv(data(Flags::EMPTY, b"a")).unwrap(),
            Inbound::Message(Bytes::from_static(b"a"))
        );
        assert_eq!(
            c.recv(data(Flags::REMOTE_CLOSED | Flags::NO_DATA, b""))
                .unwrap(),
            Inbound::Closed
        );
        assert_eq!(
            c.recv(data(Flags::EMPTY, b"late")).unwrap_err().code(),
            Code::Internal
        );
    }

    #[test]
    fn caller_sees_final_response() {
        let ok = Response {
            status: Some(WireStatus::default()),
            payload: Bytes::from_static(b"\x08\x01"),
        };
        let mut c = CallState::caller(1);
        match c
            .recv(Frame::new(
                1,
                FrameType::Response,
                Flags::EMPTY,
                ok.encode_to_vec().into(),
            ))
            .unwrap()
        {
            Inbound::Finished { status, message } => {
                assert_eq!(status.code(), Code::Ok);
                assert_eq!(message, Some(Bytes::from_static(b"\x08\x01")));
            }
            other => panic!("{other:?}"),
        }
        let err = Response {
            status: Some(WireStatus {
                code: Code::NotFound as i32,
                message: "nope".into(),
                details: vec![],
            }),
            payload: Bytes::new(),
        };
        let mut c = CallState::caller(1);
        match c
            .recv(Frame::new(
                1,
                FrameType::Response,
                Flags::EMPTY,
                err.encode_to_vec().into(),
            ))
            .unwrap()
        {
            Inbound::Finished { status, message } => {
                assert_eq!(status.code(), Code::NotFound);
                assert_eq!(status.message(), "nope");
                assert_eq!(message, None);
            }
            other => panic!("{other:?}"),
        }
        let mut c = CallState::caller(1);
        assert_eq!(
            c.recv(request(Flags::EMPTY, b"")).unwrap_err().code(),
            Code::Internal
        );
    }
}
