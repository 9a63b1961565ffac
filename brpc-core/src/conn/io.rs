//! Frames over one QUIC stream: a reader that buffers at most one frame and a
//! writer that sends header and data without copying the data.

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use quinn::{RecvStream, SendStream, VarInt};

use super::budget::Budgets;
use super::error::ReadError;
use crate::wire::{Frame, FrameDecoder, FrameHeader, HEADER_LEN, Payload};

/// Reads whole frames from a QUIC receive stream.
///
/// With budgets, each frame reserves its announced length before its data is
/// read and gives it back when the frame is handed out: see [`super::budget`].
pub(crate) struct FrameReader {
    recv: RecvStream,
    buf: BytesMut,
    /// A header that arrived as a chunk of its own while `buf` was empty,
    /// held here so a frame whose data then arrives in one chunk is never
    /// copied into `buf` (which would allocate it).
    head: Option<FrameHeader>,
    decoder: FrameDecoder,
    finished: bool,
    /// No frame has arrived yet (the budget refuses rather than waits for
    /// the first frame of a stream the peer opened).
    awaiting_first: bool,
    budgets: Option<Budgets>,
    /// Bytes reserved for the frame in progress.
    reserved: usize,
    /// A first frame that finds no budget is refused instead of waiting (the
    /// Request of a call the peer opened).
    refuse_first: bool,
    /// Bytes of the last chunk read, not yet told to the call's timer.
    arrived: usize,
    /// The size of `buf`'s allocation when it holds a large frame, to be
    /// kept for the next one once the frame is split off (`spare`); 0
    /// otherwise.
    spare: usize,
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.release();
        self.read_end();
    }
}

impl FrameReader {
    pub(crate) fn new(recv: RecvStream, max_message_size: usize) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::new(),
            head: None,
            decoder: FrameDecoder::new(max_message_size),
            finished: false,
            awaiting_first: false,
            budgets: None,
            reserved: 0,
            refuse_first: false,
            arrived: 0,
            spare: 0,
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

    /// Gives back the budget of a frame that will never be handed out, and
    /// its bytes received so far: the stream failed, or this side stopped
    /// reading it. Whoever holds the reader (a handler keeping its input
    /// stream, a caller keeping its response) holds nothing more.
    fn discard(&mut self) {
        self.release();
        self.head = None;
        self.buf = BytesMut::new();
        self.spare = 0;
    }

    /// Reserves the announced length of the frame whose header is buffered
    /// (and marks a large frame for the call being served, whichever way
    /// its data then arrives: `large_frame::note`).
    async fn reserve(&mut self, length: usize) -> Result<(), ReadError> {
        large_frame::note(length);
        let Some(budgets) = &self.budgets else {
            return Ok(());
        };
        if !budgets.try_reserve(length) {
            if self.refuse_first && self.awaiting_first {
                return Err(ReadError::Exhausted(budgets.exhausted_message(length)));
            }
            // The frame waits with its data in QUIC's buffers, in a place
            // that keeps those from starving the frames being received
            // (`WaitingRoom`); with none left, its call fails instead.
            let place = match budgets.connection.waiting_room() {
                Some(room) => match room.enter(&budgets.connection) {
                    Some(place) => Some(place),
                    None => {
                        return Err(ReadError::Exhausted(
                            budgets.too_many_waiting_message(length),
                        ));
                    }
                },
                None => None,
            };
            // Not idle: the data may well be waiting in QUIC's buffers; it is
            // this side that has no room yet. Boxed, the place with it: rare,
            // and its future would size every call's.
            let reserving = budgets.reserve(length);
            Box::pin(async move {
                let _place = place;
                reserving.await;
            })
            .await;
        }
        self.reserved = length;
        Ok(())
    }

    /// Marks a stream the peer opened: its first frame (the Request) is
    /// refused, not waited for, when the budget has no room.
    pub(crate) fn peer_opened(mut self) -> Self {
        self.awaiting_first = true;
        self
    }

    /// The next frame; `Ok(None)` when the peer finished the stream cleanly.
    /// Bytes that arrive are reported to `timer` (the call's machine), and
    /// a read that outlasts its next timeout fails with
    /// [`ReadError::Timeout`]: the machine then says what ran out.
    pub(crate) async fn next(
        &mut self,
        timer: &mut impl CallTimer,
    ) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(h) = self.head {
                if let Some(frame) = self.data_of(h, timer).await? {
                    return Ok(Some(frame));
                }
                continue;
            }
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    // Reads never go past the frame in progress: the frame
                    // was all of its buffer.
                    super::spare::give_back(&mut self.buf, &mut self.spare, BytesMut::new);
                    self.release();
                    self.awaiting_first = false;
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::TooLarge(e)),
            }
            if self.finished {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                self.discard();
                return Err(ReadError::Truncated);
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
            let mid_frame = !self.buf.is_empty() || self.decoder.skipping() > 0;
            match self.read_chunk(wanted, mid_frame, timer).await? {
                Some(chunk) => {
                    if self.buf.is_empty()
                        && self.decoder.skipping() == 0
                        && chunk.bytes.len() == HEADER_LEN
                        && let Some(h) = FrameHeader::parse(&chunk.bytes)
                        && h.length > 0
                        && h.length as usize <= self.decoder.max_message_size()
                    {
                        self.head = Some(h);
                        continue;
                    }
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
                            payload: chunk.bytes.into(),
                        }));
                    }
                    if let Some(h) = header {
                        self.make_room(h);
                    }
                    self.buf.extend_from_slice(&chunk.bytes);
                }
                None => self.finished = true,
            }
        }
    }

    /// One chunk of at most `wanted` bytes, within the call's timeout.
    async fn read_chunk(
        &mut self,
        wanted: usize,
        mid_frame: bool,
        timer: &mut impl CallTimer,
    ) -> Result<Option<quinn::Chunk>, ReadError> {
        timer.progress(mid_frame, std::mem::take(&mut self.arrived));
        let read = self.recv.read_chunk(wanted, true);
        let read = match timer.timeout() {
            Some(at) => tokio::time::timeout_at(tokio::time::Instant::from_std(at), read)
                .await
                .map_err(|_| ReadError::Timeout)?,
            None => read.await,
        };
        // Any error of the stream's (a reset, the connection gone) ends it.
        let chunk = read.inspect_err(|_| self.discard())?;
        if let Some(chunk) = &chunk {
            super::observe::bytes_received(chunk.bytes.len());
            self.arrived = chunk.bytes.len();
        }
        Ok(chunk)
    }

    /// Reads the data of the frame whose header `h` is held in `head`: the
    /// frame when its data arrives as one chunk; otherwise header and data
    /// go to `buf` (`Ok(None)`) for the decoder to finish.
    async fn data_of(
        &mut self,
        h: FrameHeader,
        timer: &mut impl CallTimer,
    ) -> Result<Option<Frame>, ReadError> {
        if self.reserved == 0 {
            self.reserve(h.length as usize).await?;
        }
        let chunk = self.read_chunk(h.length as usize, true, timer).await?;
        self.head = None;
        match chunk {
            Some(chunk) if chunk.bytes.len() == h.length as usize => {
                self.release();
                self.awaiting_first = false;
                Ok(Some(Frame {
                    stream_id: h.stream_id,
                    kind: h.kind,
                    flags: h.flags,
                    payload: chunk.bytes.into(),
                }))
            }
            chunk => {
                self.make_room(h);
                self.buf.extend_from_slice(&h.to_bytes());
                match chunk {
                    Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                    None => self.finished = true,
                }
                Ok(None)
            }
        }
    }

    /// Room in `buf` for the whole of the frame whose header is `h`, made
    /// once its data starts to arrive: growing the buffer chunk by chunk
    /// would copy a large message several times over. The length is within
    /// the largest message and already reserved from the budgets (memory
    /// the allocator has not handed out before takes pages only as the
    /// bytes fill it). A large frame's buffer is a kept one if one is free
    /// (`spare`).
    fn make_room(&mut self, h: FrameHeader) {
        let whole = HEADER_LEN + h.length as usize;
        let Some(more) = whole.checked_sub(self.buf.len()) else {
            return;
        };
        if self.buf.capacity() - self.buf.len() >= more {
            return;
        }
        if super::spare::eligible(whole) {
            self.spare = super::spare::own_buffer(&mut self.buf, whole);
        } else {
            self.buf.reserve(more);
        }
    }

    /// Reads the end of the stream if it has already arrived, without
    /// waiting. A call's last frame usually comes with the stream's end
    /// (FIN), but the reader stops at the frame; a QUIC receive stream
    /// dropped before its end was read sends the peer a STOP_SENDING (quinn
    /// cannot tell that nothing more was coming) and wakes the connection to
    /// send it: a frame, a datagram of its own on an otherwise idle
    /// connection and the peer's acknowledgement of it, on every call.
    /// Anything but the end (data the peer should not have sent) is left
    /// for the drop to stop.
    fn read_end(&mut self) {
        if self.finished {
            return;
        }
        if let Some(Ok(None)) = self.recv.read_chunk(1, true).now_or_never() {
            self.finished = true;
        }
    }

    /// Tells the peer to stop sending (STOP_SENDING with `code`).
    pub(crate) fn stop(&mut self, code: u32) {
        self.discard();
        if !self.finished {
            let _ = self.recv.stop(VarInt::from_u32(code));
        }
    }
}

/// The call machine's timers as a frame reader sees them: when to give up
/// waiting, and bytes arriving (in the middle of a frame, or not).
pub(crate) trait CallTimer {
    /// When the read in progress must stop waiting, if ever.
    fn timeout(&mut self) -> Option<std::time::Instant>;
    /// A read starts, with a frame half received or not, `arrived` bytes
    /// having come since the last read started.
    fn progress(&mut self, mid_frame: bool, arrived: usize);
}

/// Headers written on this thread are cut from one shared buffer: quinn
/// keeps each chunk it is given until the peer acknowledged it, so every
/// header needs bytes of its own, and a 10-byte allocation per frame cost
/// more than the rest of writing it. A buffer holds [`HEADER_SLAB`] headers
/// and is freed when the last of them is acknowledged.
const HEADER_SLAB: usize = 256;

thread_local! {
    static HEADERS: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// `header` in bytes of its own (see [`HEADER_SLAB`]).
fn header_bytes(header: &[u8; HEADER_LEN]) -> Bytes {
    HEADERS.with(|slab| {
        let mut slab = slab.borrow_mut();
        if slab.capacity() < HEADER_LEN {
            *slab = BytesMut::with_capacity(HEADER_LEN * HEADER_SLAB);
        }
        slab.extend_from_slice(header);
        slab.split().freeze()
    })
}

/// Writes one frame; the data (or each of its pieces) is sent without being
/// copied. Not an `async fn`: the frame is taken apart first, so the future
/// holds only the chunks it sends (it sits inside every call's future).
pub(crate) fn write_frame(
    send: &mut SendStream,
    frame: Frame,
) -> impl Future<Output = Result<(), quinn::WriteError>> + Send + '_ {
    let Frame {
        stream_id,
        kind,
        flags,
        payload,
    } = frame;
    let length = payload.len();
    super::observe::bytes_sent(HEADER_LEN + length);
    large_frame::note(length);
    // The call's machine keeps every payload within the maximum message
    // size, far below the u32 the header holds.
    let header = FrameHeader {
        length: length as u32,
        stream_id,
        kind,
        flags,
    };
    let header = header_bytes(&header.to_bytes());
    let mut chunks = match payload {
        Payload::Whole(payload) => Chunks::Two([header, payload]),
        // The pieces of a large message, each sent as it is.
        Payload::Pieces(pieces) => Chunks::Many(std::iter::once(header).chain(pieces).collect()),
    };
    async move {
        let chunks = match &mut chunks {
            Chunks::Two(two) if two[1].is_empty() => &mut two[..1],
            Chunks::Two(two) => &mut two[..],
            Chunks::Many(many) => &mut many[..],
        };
        send.write_all_chunks(chunks).await
    }
}

/// Whether the call being served on this thread read or wrote a large frame
/// (QUIC only): the task serving a connection polls its calls itself and
/// hands one that did to a task of its own (`incoming::Served`).
pub(crate) mod large_frame {
    /// Frames of at least this many bytes (64 KiB) are large.
    pub(crate) const LARGE: usize = 64 * 1024;

    /// Nothing is being served on this thread by a connection's task.
    const OUTSIDE: u8 = 0;
    /// A connection's task is polling a call: no large frame yet.
    const SERVING: u8 = 1;
    /// ... and the call read or wrote a large frame.
    const SEEN: u8 = 2;

    thread_local! {
        static STATE: std::cell::Cell<u8> = const { std::cell::Cell::new(OUTSIDE) };
    }

    /// A frame of `length` bytes is being read or written on this thread:
    /// noted only while a connection's task polls a call (elsewhere nothing
    /// asks, and nothing stale is left for the next call).
    pub(crate) fn note(length: usize) {
        if length >= LARGE && STATE.get() == SERVING {
            STATE.set(SEEN);
        }
    }

    /// A connection's task starts polling a call.
    pub(crate) fn serving() {
        STATE.set(SERVING);
    }

    /// The poll is over: whether the call read or wrote a large frame in it.
    pub(crate) fn served() -> bool {
        STATE.replace(OUTSIDE) == SEEN
    }

    /// Whether the call being polled by its connection's task read or wrote
    /// a large frame in this poll so far.
    pub(crate) fn seen() -> bool {
        STATE.get() == SEEN
    }
}

/// A frame's chunks as [`write_frame`] hands them to quinn: header and data,
/// or header and the data's pieces.
enum Chunks {
    Two([Bytes; 2]),
    Many(Vec<Bytes>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_cut_from_the_shared_buffer_keep_their_own_bytes() {
        // More headers than one buffer holds, all alive at once, as quinn
        // holds them until they are acknowledged.
        let headers: Vec<[u8; HEADER_LEN]> = (0..HEADER_SLAB * 2 + 3)
            .map(|i| {
                let mut h = [0u8; HEADER_LEN];
                h[..8].copy_from_slice(&(i as u64).to_be_bytes());
                h
            })
            .collect();
        let cut: Vec<Bytes> = headers.iter().map(header_bytes).collect();
        for (header, bytes) in headers.iter().zip(&cut) {
            assert_eq!(&bytes[..], &header[..]);
        }
    }
}
