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
    ConnectionLost(quinn::ConnectionError),
    /// This side already stopped the stream.
    Closed,
    /// The call's machine had a timer run out (its deadline or idle limit)
    /// while a frame was awaited: ask it what happened.
    Timeout,
    /// The byte-stream connection carrying the call is gone.
    LinkLost(String),
    /// The Request of a new call found no room in the inbound buffer budget
    /// (the message says which budget); its data was not read.
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
            ReadError::ConnectionLost(e) => Status::unavailable(format!("connection lost: {e}")),
            ReadError::Closed => Status::cancelled("call was cancelled locally"),
            ReadError::LinkLost(reason) => {
                Status::unavailable(format!("connection lost: {reason}"))
            }
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
            quinn::ReadError::ConnectionLost(c) => ReadError::ConnectionLost(c),
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
    /// The connection is gone.
    Lost(String),
}

impl From<quinn::WriteError> for SendError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(_) => SendError::Stopped,
            other => SendError::Lost(other.to_string()),
        }
    }
}
