//! One call's two directions, whatever carries them: its own QUIC stream, or a
//! ttrpc stream id multiplexed on a byte stream. The call logic (tonic bridge,
//! driver) is written once against these.

use std::future::Future;

use bytes::Bytes;
use futures_util::future::Either;
use quinn::{SendStream, VarInt};

use super::io::{FrameReader, ReadError, write_frame};
use crate::bytestream::{StreamInbound, StreamOutbound};
use crate::wire::{Flags, Frame, FrameType};

/// Frames arriving for one call.
pub(crate) enum CallReader {
    Quic(FrameReader),
    Bytes(StreamInbound),
}

impl CallReader {
    /// The next frame; `Ok(None)` when the peer finished the call's stream.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        match self {
            CallReader::Quic(reader) => reader.next().await,
            CallReader::Bytes(inbound) => inbound.next().await,
        }
    }

    /// Tells the peer to stop sending (QUIC STOP_SENDING); over a byte stream,
    /// stops routing the call's frames (ttrpc cannot tell the peer).
    pub(crate) fn stop(&mut self, code: u32) {
        match self {
            CallReader::Quic(reader) => reader.stop(code),
            CallReader::Bytes(inbound) => inbound.stop(),
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

/// A call's machine, shared by the half that reads frames into it and the
/// half that asks it what to send.
pub(crate) type SharedCall = std::sync::Arc<std::sync::Mutex<crate::wire::Call>>;

/// Locks a call's machine. It holds no invariant a panic elsewhere could
/// break halfway, so a poisoned lock is used as it is.
pub(crate) fn lock(call: &SharedCall) -> std::sync::MutexGuard<'_, crate::wire::Call> {
    call.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The engine's clock, as the call machine takes it (tokio's, so paused
/// time in tests moves it too).
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Frames leaving for one call.
pub(crate) enum CallWriter {
    Quic(SendStream),
    Bytes(StreamOutbound),
}

impl CallWriter {
    pub(crate) async fn write(
        &mut self,
        stream_id: u32,
        kind: FrameType,
        flags: Flags,
        payload: Bytes,
    ) -> Result<(), SendError> {
        match self {
            CallWriter::Quic(send) => Ok(write_frame(send, stream_id, kind, flags, payload).await?),
            CallWriter::Bytes(out) => out.write(kind, flags, payload).await,
        }
    }

    /// Writes one frame the call's machine built.
    pub(crate) async fn write_frame(&mut self, frame: Frame) -> Result<(), SendError> {
        self.write(frame.stream_id, frame.kind, frame.flags, frame.payload)
            .await
    }

    /// Ends this side's half of the call (QUIC FIN; nothing over ttrpc, whose
    /// close is the last frame itself).
    pub(crate) fn finish(&mut self) {
        if let CallWriter::Quic(send) = self {
            let _ = send.finish();
        }
    }

    /// Abandons the call (QUIC RESET_STREAM with `code`). ttrpc has no reset:
    /// over a byte stream nothing is sent.
    pub(crate) fn reset(&mut self, code: u32) {
        if let CallWriter::Quic(send) = self {
            let _ = send.reset(VarInt::from_u32(code));
        }
    }

    /// Resolves when the peer stops reading this call (it cancelled) or the
    /// connection ends; after a clean finish it may also resolve, once the
    /// peer has everything.
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        match self {
            CallWriter::Quic(send) => {
                let stopped = send.stopped();
                Either::Left(async move {
                    let _ = stopped.await;
                })
            }
            CallWriter::Bytes(out) => Either::Right(out.link_closed()),
        }
    }
}
