//! Frames over one QUIC stream: a reader that buffers at most one frame and a
//! writer that sends header and data without copying the data.

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};

use super::budget::Budgets;
use super::error::ReadError;
use crate::wire::{Frame, FrameDecoder, FrameHeader, HEADER_LEN};

/// Reads whole frames from a QUIC receive stream.
///
/// With budgets, each frame reserves its announced length before its data is
/// read and gives it back when the frame is handed out: see [`super::budget`].
pub(crate) struct FrameReader {
    recv: RecvStream,
    buf: BytesMut,
    decoder: FrameDecoder,
    finished: bool,
    idle: Option<std::time::Duration>,
    /// Apply the idle limit before the first frame too (a callee waiting for
    /// the Request of a stream the peer opened).
    awaiting_first: bool,
    budgets: Option<Budgets>,
    /// Bytes reserved for the frame in progress.
    reserved: usize,
    /// A first frame that finds no budget is refused instead of waiting (the
    /// Request of a call the peer opened).
    refuse_first: bool,
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.release();
    }
}

impl FrameReader {
    pub(crate) fn new(recv: RecvStream, max_message_size: usize) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(max_message_size),
            finished: false,
            idle: None,
            awaiting_first: false,
            budgets: None,
            reserved: 0,
            refuse_first: false,
        }
    }

    /// Charges every frame to `budgets`; with `refuse_first`, a first frame
    /// that does not fit fails with [`ReadError::Exhausted`] instead of waiting.
    pub(crate) fn with_budgets(mut self, budgets: Budgets, refuse_first: bool) -> Self {
        self.budgets = Some(budgets);
        self.refuse_first = refuse_first;
        self
    }

    fn release(&mut self) {
        if let Some(budgets) = &self.budgets {
            budgets.release(std::mem::take(&mut self.reserved));
        }
    }

    /// Reserves the announced length of the frame whose header is buffered.
    async fn reserve(&mut self, length: usize) -> Result<(), ReadError> {
        let Some(budgets) = &self.budgets else {
            return Ok(());
        };
        if !budgets.try_reserve(length) {
            if self.refuse_first && self.awaiting_first {
                return Err(ReadError::Exhausted(budgets.exhausted_message(length)));
            }
            // Not idle: the data may well be waiting in QUIC's buffers; it is
            // this side that has no room yet.
            budgets.reserve(length).await;
        }
        self.reserved = length;
        Ok(())
    }

    /// Resets the call (reads fail with [`ReadError::Idle`]) when it stalls
    /// mid-frame for `idle`; with `first_frame`, also while no frame at all
    /// has arrived.
    pub(crate) fn with_idle_limit(
        mut self,
        idle: Option<std::time::Duration>,
        first_frame: bool,
    ) -> Self {
        self.idle = idle;
        self.awaiting_first = first_frame;
        self
    }

    /// The next frame; `Ok(None)` when the peer finished the stream cleanly.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    self.release();
                    self.awaiting_first = false;
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::TooLarge(e)),
            }
            if self.finished {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated)
                };
            }
            // The header of the frame in progress, unless its data is being
            // skipped (an oversized frame) or it has none.
            let header = FrameHeader::parse(&self.buf)
                .filter(|h| self.decoder.skipping() == 0 && h.length > 0);
            if self.reserved == 0
                && let Some(h) = header
            {
                self.reserve(h.length as usize).await?;
            }
            // Never read past the frame in progress, so an unread stream keeps
            // its bytes in QUIC's flow-controlled buffers, not ours.
            let wanted = self.decoder.wanted(&self.buf);
            // With a whole header buffered, a chunk that is exactly the frame's
            // data becomes the frame's payload without being copied.
            let header_only = header.filter(|_| self.buf.len() == HEADER_LEN);
            let stalled_mid_frame =
                !self.buf.is_empty() || self.decoder.skipping() > 0 || self.awaiting_first;
            let read = self.recv.read_chunk(wanted, true);
            let chunk = match self.idle {
                Some(limit) if stalled_mid_frame => tokio::time::timeout(limit, read)
                    .await
                    .map_err(|_| ReadError::Idle(limit))??,
                _ => read.await?,
            };
            match chunk {
                Some(chunk) => {
                    super::observe::bytes_received(chunk.bytes.len());
                    if let Some(h) = header_only
                        && chunk.bytes.len() == h.length as usize
                        && h.length as usize <= self.decoder.max_message_size()
                    {
                        self.buf.clear();
                        self.release();
                        self.awaiting_first = false;
                        return Ok(Some(Frame {
                            stream_id: h.stream_id,
                            kind: h.kind,
                            flags: h.flags,
                            payload: chunk.bytes,
                        }));
                    }
                    self.buf.extend_from_slice(&chunk.bytes);
                }
                None => self.finished = true,
            }
        }
    }

    /// Tells the peer to stop sending (STOP_SENDING with `code`).
    pub(crate) fn stop(&mut self, code: u32) {
        if !self.finished {
            let _ = self.recv.stop(VarInt::from_u32(code));
        }
    }
}

/// Writes one frame; the data is sent without being copied.
pub(crate) async fn write_frame(
    send: &mut SendStream,
    frame: Frame,
) -> Result<(), quinn::WriteError> {
    let Frame {
        stream_id,
        kind,
        flags,
        payload,
    } = frame;
    super::observe::bytes_sent(HEADER_LEN + payload.len());
    // The call's machine keeps every payload within the maximum message
    // size, far below the u32 the header holds.
    let header = FrameHeader {
        length: payload.len() as u32,
        stream_id,
        kind,
        flags,
    };
    if payload.is_empty() {
        send.write_all(&header.to_bytes()).await
    } else {
        let mut chunks = [Bytes::copy_from_slice(&header.to_bytes()), payload];
        send.write_all_chunks(&mut chunks).await
    }
}
