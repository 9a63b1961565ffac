//! What can go wrong reading and writing a call's frames, whatever the
//! transport, and the status a caller or handler sees for it.

use quinn::VarInt;
use tonic::Status;

use crate::wire::FrameError;

/// Why no frame could be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// A header announced more than the maximum message size.
    TooLarge(FrameError),
    /// The stream ended in the middle of a frame.
    Truncated,
    /// The peer reset the stream with this code.
    Reset(VarInt),
    /// The connection is gone.
    Lost(Lost),
    /// This side already stopped the stream.
    Closed,
    /// The call's machine had a timer run out (its deadline or idle limit)
    /// while a frame was awaited: ask it what happened.
    Timeout,
    /// A frame found no room in the inbound buffer budget and may not wait
    /// for it: the Request of a new call, or a frame of a running call when
    /// the connection's waiting room is full (the message says which); its
    /// data was not read.
    Exhausted(String),
}

impl ReadError {
    /// The status a local caller or handler sees for this error.
    pub(crate) fn to_status(&self) -> Status {
        match self {
            ReadError::TooLarge(e) => Status::resource_exhausted(e.to_string()),
            ReadError::Truncated => {
                Status::internal("peer ended the stream in the middle of a frame")
            }
            ReadError::Reset(code) => Status::cancelled(format!(
                "peer cancelled the call (stream reset, code {code})"
            )),
            ReadError::Lost(lost) => lost.to_status(),
            ReadError::Closed => Status::cancelled("call was cancelled locally"),
            ReadError::Timeout => {
                Status::deadline_exceeded("the call's time ran out while reading")
            }
            ReadError::Exhausted(why) => Status::resource_exhausted(why.clone()),
        }
    }
}

impl From<quinn::ReadError> for ReadError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => ReadError::Reset(code),
            quinn::ReadError::ConnectionLost(c) => ReadError::Lost(Lost::Quic(c)),
            quinn::ReadError::ClosedStream => ReadError::Closed,
            // brpc never reads 0-RTT streams and keeps ordered reads.
            quinn::ReadError::IllegalOrderedRead | quinn::ReadError::ZeroRttRejected => {
                ReadError::Closed
            }
        }
    }
}

/// Why a frame could not be sent.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The peer stopped reading the call (it cancelled, or refused it).
    Stopped,
    /// This side already ended the call's stream.
    Closed,
    /// The connection is gone.
    Lost(Lost),
}

impl From<quinn::WriteError> for SendError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(_) => SendError::Stopped,
            quinn::WriteError::ConnectionLost(c) => SendError::Lost(Lost::Quic(c)),
            // brpc never writes 0-RTT streams.
            quinn::WriteError::ClosedStream | quinn::WriteError::ZeroRttRejected => {
                SendError::Closed
            }
        }
    }
}

/// How the transport reported the end of the connection under a call.
#[derive(Debug, Clone)]
pub(crate) enum Lost {
    /// QUIC's account.
    Quic(quinn::ConnectionError),
    /// The byte stream ended, for this reason (`None`: its link was dropped).
    Stream(Option<String>),
}

impl Lost {
    /// The status a caller or handler sees for a call the connection took down.
    pub(crate) fn to_status(&self) -> Status {
        Status::unavailable(format!("connection lost: {self}"))
    }
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Quic(e) => e.fmt(f),
            Lost::Stream(Some(reason)) => f.write_str(reason),
            Lost::Stream(None) => f.write_str("the connection was dropped"),
        }
    }
}
