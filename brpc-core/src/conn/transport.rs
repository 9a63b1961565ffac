//! The transport seam: what carries a connection's calls. QUIC gives every
//! call a stream of its own ([`FrameReader`] reads one); a byte stream
//! multiplexes calls by ttrpc stream id behind [`Multiplexer`] (implemented
//! by `bytestream::Link`). The engine reaches both through [`Transport`],
//! [`CallReader`] and [`CallWriter`], and never names the byte-stream types:
//! `bytestream` builds on this module, not the other way round.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::Either;
use quinn::{SendStream, VarInt};
use tonic::Status;

use super::Side;
use super::connection_error::ConnectionError;
pub(crate) use super::error::{Lost, ReadError, SendError};
use super::io::{CallTimer, FrameReader, write_frame};
use crate::wire::Frame;

/// A boxed future, as the byte-stream side of the seam returns them.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Builds the Request frame of a call being opened, once the transport
/// has chosen its stream id (the dialer's ids are odd, the acceptor's even).
pub(crate) type RequestBuilder<'a> = Box<dyn FnOnce(u32) -> Result<Frame, Status> + Send + 'a>;

/// A call's two halves on a multiplexed transport, and its stream id.
pub(crate) type MuxCall = (Box<dyn FrameSink>, Box<dyn FrameSource>, u32);

/// A connection that multiplexes calls over one byte stream (ttrpc's
/// framing by stream id).
pub(crate) trait Multiplexer: Send + Sync + 'static {
    /// Opens a call: takes the next stream id of this side's parity and
    /// queues the Request `request` builds for it, in id order.
    fn open<'a>(&'a self, request: RequestBuilder<'a>) -> BoxFuture<'a, Result<MuxCall, Status>>;
    /// The next call the peer opened, or `None` once the connection is gone.
    /// (A poll function: no boxed future per accepted call. One task
    /// accepts, the connection's serve loop.)
    fn poll_accept(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<MuxCall>>;
    /// Ends the connection: every call fails.
    fn close(&self, reason: &str);
    /// Why the connection ended, once it has.
    fn close_reason(&self) -> Option<String>;
    /// Waits until the connection ends and says why.
    fn closed(&self) -> BoxFuture<'static, String>;
    /// Whether the other side said brpc Hello (a plain ttrpc peer does not).
    fn remote_is_brpc(&self) -> bool;
    /// Records that the other side speaks brpc.
    fn set_remote_is_brpc(&self);
}

/// Frames arriving for one multiplexed call.
pub(crate) trait FrameSource: Send + Sync {
    /// The next frame; `Ok(None)` when the peer finished the call. (A poll
    /// function, not a boxed future: no allocation per frame read.)
    fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Frame>, ReadError>>;
    /// Stops routing the call's frames; a brpc peer is sent Cancel (a plain
    /// ttrpc peer cannot be told).
    fn stop(&mut self);
}

/// Frames leaving for one multiplexed call.
pub(crate) trait FrameSink: Send + Sync {
    /// Queues one frame at once if there is room: `Ok(None)`; otherwise
    /// `Ok(Some(frame))` gives it back for [`write`](Self::write).
    fn try_write(&mut self, frame: Frame) -> Result<Option<Frame>, SendError>;
    /// Queues one frame, waiting for room.
    fn write(&mut self, frame: Frame) -> BoxFuture<'_, Result<(), SendError>>;
    /// What says when the peer stops reading the call (a brpc peer's
    /// Cancel frame; never a plain ttrpc peer, which cannot say so), and
    /// the call's id to ask it about.
    fn cancel_signal(&self) -> (Arc<dyn CancelSignal>, u32);
}

/// Whether the peer cancelled a multiplexed call.
pub(crate) trait CancelSignal: Send + Sync {
    /// Ready once the peer cancelled the call `id`; otherwise `cx` is woken
    /// when it does (one waiter per call).
    fn poll_cancelled(&self, id: u32, cx: &mut std::task::Context<'_>) -> std::task::Poll<()>;
}

/// What carries one connection's calls.
#[derive(Clone)]
pub(crate) enum Transport {
    Quic(quinn::Connection),
    Mux(Arc<dyn Multiplexer>),
}

impl Transport {
    /// The peer's current UDP address; over a byte stream, `0.0.0.0:0`.
    pub(crate) fn remote_address(&self) -> SocketAddr {
        match self {
            Transport::Quic(connection) => connection.remote_address(),
            Transport::Mux(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    pub(crate) fn remote_is_brpc(&self) -> bool {
        match self {
            Transport::Quic(_) => true,
            Transport::Mux(mux) => mux.remote_is_brpc(),
        }
    }

    pub(crate) fn set_remote_is_brpc(&self) {
        if let Transport::Mux(mux) = self {
            mux.set_remote_is_brpc();
        }
    }

    pub(crate) fn quic(&self) -> Option<&quinn::Connection> {
        match self {
            Transport::Quic(connection) => Some(connection),
            Transport::Mux(_) => None,
        }
    }

    /// How the connection ended, if it has, as seen from `side`; `local`
    /// is this side's own close, if it closed it.
    pub(crate) fn close_reason(
        &self,
        side: Side,
        local: Option<(u32, String)>,
    ) -> Option<ConnectionError> {
        match self {
            Transport::Quic(connection) => connection
                .close_reason()
                .map(|e| ConnectionError::from_quinn(&e, side, local)),
            Transport::Mux(mux) => mux
                .close_reason()
                .map(|reason| ConnectionError::from_stream(reason, side, local)),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Transport::Quic(connection) => connection.close_reason().is_some(),
            Transport::Mux(mux) => mux.close_reason().is_some(),
        }
    }

    /// Waits until the connection ends (see [`Transport::close_reason`]).
    pub(crate) async fn closed(
        &self,
        side: Side,
        local: impl FnOnce() -> Option<(u32, String)>,
    ) -> ConnectionError {
        match self {
            Transport::Quic(connection) => {
                let error = connection.closed().await;
                ConnectionError::from_quinn(&error, side, local())
            }
            Transport::Mux(mux) => {
                let reason = mux.closed().await;
                ConnectionError::from_stream(reason, side, local())
            }
        }
    }

    pub(crate) fn close(&self, code: u32, reason: &str) {
        match self {
            Transport::Quic(connection) => {
                connection.close(VarInt::from_u32(code), reason.as_bytes())
            }
            Transport::Mux(mux) => mux.close(reason),
        }
    }
}

/// Frames arriving for one call.
pub(crate) enum CallReader {
    Quic(FrameReader),
    Mux(Box<dyn FrameSource>),
}

impl CallReader {
    /// The next frame; `Ok(None)` when the peer finished the call's stream.
    /// (Over a byte stream frames arrive whole and only the pump's own
    /// deadline applies.)
    pub(crate) async fn next(
        &mut self,
        timer: &mut impl CallTimer,
    ) -> Result<Option<Frame>, ReadError> {
        match self {
            CallReader::Quic(reader) => reader.next(timer).await,
            CallReader::Mux(source) => std::future::poll_fn(|cx| source.poll_next(cx)).await,
        }
    }

    /// Tells the peer to stop sending (QUIC STOP_SENDING); over a byte stream,
    /// stops routing the call's frames and sends a brpc peer Cancel (a plain
    /// ttrpc peer cannot be told).
    pub(crate) fn stop(&mut self, code: u32) {
        match self {
            CallReader::Quic(reader) => reader.stop(code),
            CallReader::Mux(source) => source.stop(),
        }
    }
}

/// Frames leaving for one call.
pub(crate) enum CallWriter {
    Quic(SendStream),
    Mux(Box<dyn FrameSink>),
}

impl CallWriter {
    /// Writes one frame; over QUIC its data is sent without being copied.
    /// Over a byte stream the frame is queued at once when there is room
    /// (before the future is polled). Not an `async fn`, which would hold
    /// the frame beside the future made from it.
    pub(crate) fn write_frame(
        &mut self,
        frame: Frame,
    ) -> impl Future<Output = Result<(), SendError>> + Send + '_ {
        use futures_util::FutureExt;
        match self {
            CallWriter::Quic(send) => {
                Either::Left(write_frame(send, frame).map(|r| r.map_err(SendError::from)))
            }
            CallWriter::Mux(sink) => Either::Right(match sink.try_write(frame) {
                Err(e) => Either::Left(std::future::ready(Err(e))),
                Ok(None) => Either::Left(std::future::ready(Ok(()))),
                // The connection's queue is full: wait for room.
                Ok(Some(frame)) => Either::Right(sink.write(frame)),
            }),
        }
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
    /// peer has everything. Over a byte stream when a brpc peer sends
    /// Cancel (a plain ttrpc peer cannot cancel a call); when the connection
    /// ends the engine drops every call it serves there
    /// ([`serve`](super::serve) returns and its tasks go).
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + use<> {
        match self {
            CallWriter::Quic(send) => {
                use futures_util::FutureExt;
                // Mapped, not awaited in an async block (which would hold
                // quinn's future twice).
                Either::Left(send.stopped().map(|_| ()))
            }
            CallWriter::Mux(sink) => {
                let (signal, id) = sink.cancel_signal();
                Either::Right(std::future::poll_fn(move |cx| {
                    signal.poll_cancelled(id, cx)
                }))
            }
        }
    }
}
