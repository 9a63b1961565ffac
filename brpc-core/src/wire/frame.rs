//! The ttrpc frame: a 10-byte header (length, stream id, type, flags) and its data.
//!
//! Pure byte handling: [`FrameDecoder`] turns buffered bytes into frames, telling
//! "need more bytes" (`Ok(None)`) apart from a real error, and refuses an oversized
//! frame from its header alone. Nothing here touches sockets, tasks or clocks.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 10;

/// Default largest frame data accepted or sent: 4 MiB, as in containerd/ttrpc.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 << 20;

/// The frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// `0x01`: opens a call; data is an encoded [`Request`](super::Request).
    Request,
    /// `0x02`: ends a call; data is an encoded [`Response`](super::Response).
    Response,
    /// `0x03`: one streamed message, or a close marker.
    Data,
    /// `0x04` (brpc extension): the callee's response headers, an encoded
    /// [`Metadata`](super::Metadata), before any Data or Response. ttrpc peers
    /// ignore it as an unknown type; brpc sends it only to brpc peers.
    Headers,
    /// `0x05` (brpc extension): the callee's response trailers, an encoded
    /// [`Metadata`](super::Metadata), just before the final Data or Response.
    Trailers,
    /// `0x06` (brpc extension, byte streams only): the sender reads none of
    /// this call's frames any more (QUIC's STOP_SENDING); no data. A caller
    /// sends it when it abandons a call, a callee when it stops reading a
    /// request stream. brpc sends it only to brpc peers.
    Cancel,
    /// Any other value. ttrpc ignores these for forward compatibility.
    Unknown(u8),
}

impl FrameType {
    /// The type's wire byte.
    pub const fn to_u8(self) -> u8 {
        match self {
            FrameType::Request => 0x01,
            FrameType::Response => 0x02,
            FrameType::Data => 0x03,
            FrameType::Headers => 0x04,
            FrameType::Trailers => 0x05,
            FrameType::Cancel => 0x06,
            FrameType::Unknown(b) => b,
        }
    }

    /// The type for a wire byte; unrecognised values become [`FrameType::Unknown`].
    pub const fn from_u8(b: u8) -> Self {
        match b {
            0x01 => FrameType::Request,
            0x02 => FrameType::Response,
            0x03 => FrameType::Data,
            0x04 => FrameType::Headers,
            0x05 => FrameType::Trailers,
            0x06 => FrameType::Cancel,
            other => FrameType::Unknown(other),
        }
    }
}

/// The flags byte of a frame header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u8);

impl Flags {
    /// No flags.
    pub const EMPTY: Flags = Flags(0);
    /// `0x01`: the sender will send nothing more on this stream.
    pub const REMOTE_CLOSED: Flags = Flags(0x01);
    /// `0x02`: more Data frames follow this Request (client or bidi streaming).
    pub const REMOTE_OPEN: Flags = Flags(0x02);
    /// `0x04`: the frame carries no message.
    pub const NO_DATA: Flags = Flags(0x04);

    /// Flags from their wire byte; unknown bits are kept.
    pub const fn from_bits(bits: u8) -> Self {
        Flags(bits)
    }

    /// The wire byte.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets of bits.
    pub const fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        self.union(rhs)
    }
}

impl std::fmt::Debug for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names = Vec::new();
        if self.contains(Flags::REMOTE_CLOSED) {
            names.push("REMOTE_CLOSED");
        }
        if self.contains(Flags::REMOTE_OPEN) {
            names.push("REMOTE_OPEN");
        }
        if self.contains(Flags::NO_DATA) {
            names.push("NO_DATA");
        }
        write!(f, "Flags({:#04x}", self.0)?;
        if !names.is_empty() {
            write!(f, " {}", names.join("|"))?;
        }
        write!(f, ")")
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Length of the data that follows the header.
    pub length: u32,
    /// The ttrpc stream id.
    pub stream_id: u32,
    /// The frame type.
    pub kind: FrameType,
    /// The flags.
    pub flags: Flags,
}

impl FrameHeader {
    /// Parses the first [`HEADER_LEN`] bytes of `src`, or `None` if there are fewer.
    pub fn parse(src: &[u8]) -> Option<FrameHeader> {
        let h: &[u8; HEADER_LEN] = src.get(..HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader {
            length: u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
            stream_id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            kind: FrameType::from_u8(h[8]),
            flags: Flags::from_bits(h[9]),
        })
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&self.length.to_be_bytes());
        out[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        out[8] = self.kind.to_u8();
        out[9] = self.flags.bits();
        out
    }
}

/// One whole frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The ttrpc stream id.
    pub stream_id: u32,
    /// The frame type.
    pub kind: FrameType,
    /// The flags.
    pub flags: Flags,
    /// The frame data (an encoded envelope or a message).
    pub payload: Payload,
}

/// A frame's data: one buffer, or (in a frame being sent) several pieces that
/// follow each other on the wire, so that a large `bytes` field of a message
/// is sent as the buffer it is, not copied into the frame's.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Payload {
    /// The data in one buffer (every received frame).
    Whole(Bytes),
    /// The data in pieces, in order.
    Pieces(Vec<Bytes>),
}

impl Payload {
    /// The data's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Whole(bytes) => bytes.len(),
            Payload::Pieces(pieces) => pieces.iter().map(Bytes::len).sum(),
        }
    }

    /// Whether there is no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data in one buffer (pieces are copied into one).
    pub fn into_bytes(self) -> Bytes {
        match self {
            Payload::Whole(bytes) => bytes,
            Payload::Pieces(pieces) => {
                let mut whole = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
                for piece in &pieces {
                    whole.put_slice(piece);
                }
                whole.freeze()
            }
        }
    }

    /// The data's pieces, in order (one for a whole buffer).
    pub fn pieces(&self) -> &[Bytes] {
        match self {
            Payload::Whole(bytes) => std::slice::from_ref(bytes),
            Payload::Pieces(pieces) => pieces,
        }
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Whole(Bytes::new())
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Payload::Whole(bytes)
    }
}

/// Equal when the data is, however it is cut.
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .pieces()
                .iter()
                .flat_map(|p| p.iter())
                .eq(other.pieces().iter().flat_map(|p| p.iter()))
    }
}

impl Eq for Payload {}

impl PartialEq<Bytes> for Payload {
    fn eq(&self, other: &Bytes) -> bool {
        match self {
            Payload::Whole(bytes) => bytes == other,
            Payload::Pieces(_) => *self == Payload::Whole(other.clone()),
        }
    }
}

/// A buffer to encode a message into that keeps each large `Bytes` put into
/// it (prost puts a `bytes::Bytes` field's value as it is) as a piece of its
/// own instead of copying it: pieces of [`PIECE_MIN`] bytes or more.
/// Everything else is copied into buffers between those pieces. (A large
/// `Vec<u8>` field is copied into a piece of its own: one copy, as into the
/// buffer.)
#[derive(Debug)]
pub(crate) struct PieceWriter {
    pieces: Vec<Bytes>,
    buf: BytesMut,
    /// Bytes of the message not written yet: when the buffer must grow, it
    /// grows to hold them all (never by more), so a message of many small
    /// fields is not copied over and over as its buffer doubles.
    left: usize,
}

/// The smallest `Bytes` a [`PieceWriter`] keeps as a piece of its own: below
/// it, copying costs less than a piece (which quinn keeps and sends as a
/// chunk of its own). A message smaller than this cannot hold a piece, and
/// its encoders write it into a plain `BytesMut` instead: through a
/// `PieceWriter` a 16-byte echo cost about 1k more instructions per call
/// (callgrind, both ends).
pub(crate) const PIECE_MIN: usize = 16 * 1024;

/// What a [`PieceWriter`]'s buffer starts with room for: an envelope and a
/// message's small fields (it grows if they are larger).
const PIECE_BUFFER: usize = 512;

impl PieceWriter {
    /// A writer for `len` bytes of encoded message (and envelope).
    pub(crate) fn new(len: usize) -> Self {
        PieceWriter {
            pieces: Vec::new(),
            buf: BytesMut::with_capacity(len.min(PIECE_BUFFER)),
            left: len,
        }
    }

    /// What was written: one buffer when nothing was large enough to be a
    /// piece of its own.
    pub(crate) fn finish(mut self) -> Payload {
        if self.pieces.is_empty() {
            return Payload::Whole(self.buf.freeze());
        }
        if !self.buf.is_empty() {
            self.pieces.push(self.buf.freeze());
        }
        Payload::Pieces(self.pieces)
    }

    /// Room in the buffer for `more` bytes.
    fn room_for(&mut self, more: usize) {
        if self.buf.capacity() - self.buf.len() < more {
            self.buf.reserve(more.max(self.left));
        }
    }
}

// SAFETY: every method hands on to the `BytesMut`, whose implementation
// upholds `BufMut`'s contract (`room_for` only reserves more room in it);
// `put` only adds pieces after the bytes already written. (The one unsafe
// impl of the library: `BufMut` is an unsafe trait, and prost encodes only
// into a `BufMut`.)
#[allow(unsafe_code)]
unsafe impl BufMut for PieceWriter {
    fn remaining_mut(&self) -> usize {
        self.buf.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        self.left = self.left.saturating_sub(cnt);
        // SAFETY: the caller's promise (`cnt` bytes of `chunk_mut`
        // initialised) is about the `BytesMut`'s chunk.
        unsafe { self.buf.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        self.room_for(64);
        self.buf.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        self.room_for(src.len());
        self.buf.put_slice(src);
        self.left = self.left.saturating_sub(src.len());
    }

    fn put<T: bytes::Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        let len = src.remaining();
        if len < PIECE_MIN {
            while src.has_remaining() {
                let chunk = src.chunk();
                let n = chunk.len();
                self.put_slice(chunk);
                src.advance(n);
            }
            return;
        }
        if !self.buf.is_empty() {
            let before = self.buf.split();
            self.pieces.push(before.freeze());
        }
        self.left = self.left.saturating_sub(len);
        // A `Bytes` hands over its own buffer here, without a copy.
        self.pieces.push(src.copy_to_bytes(len));
    }
}

impl Frame {
    /// A frame of the given parts.
    pub fn new(stream_id: u32, kind: FrameType, flags: Flags, payload: Bytes) -> Self {
        Frame {
            stream_id,
            kind,
            flags,
            payload: Payload::Whole(payload),
        }
    }

    /// The header describing this frame.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] if the payload does not fit the u32 length field.
    pub fn header(&self) -> Result<FrameHeader, FrameError> {
        let length = u32::try_from(self.payload.len()).map_err(|_| FrameError::TooLarge {
            header: FrameHeader {
                length: u32::MAX,
                stream_id: self.stream_id,
                kind: self.kind,
                flags: self.flags,
            },
            max: u32::MAX as usize,
        })?;
        Ok(FrameHeader {
            length,
            stream_id: self.stream_id,
            kind: self.kind,
            flags: self.flags,
        })
    }

    /// Appends the frame's wire bytes to `dst`.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] if the payload does not fit the u32 length field.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        let header = self.header()?;
        dst.reserve(HEADER_LEN + header.length as usize);
        dst.put_slice(&header.to_bytes());
        for piece in self.payload.pieces() {
            dst.put_slice(piece);
        }
        Ok(())
    }
}

/// Why bytes could not become a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announces more data than the configured maximum. The data has
    /// not been read; [`FrameDecoder`] skips it if decoding continues.
    #[error(
        "message length {} exceed maximum message size of {max}",
        header.length
    )]
    TooLarge {
        /// The header that announced the data.
        header: FrameHeader,
        /// The maximum in force.
        max: usize,
    },
}

/// Incremental frame decoder over a byte buffer the caller fills.
///
/// `decode` returns `Ok(None)` while a frame is incomplete. After
/// [`FrameError::TooLarge`] the decoder discards the oversized data as it
/// arrives (never buffering it), so a byte-stream transport can answer the
/// offending stream and keep reading the next frame.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max: usize,
    skip: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames whose data exceeds `max_message_size`.
    pub fn new(max_message_size: usize) -> Self {
        FrameDecoder {
            max: max_message_size,
            skip: 0,
        }
    }

    /// The maximum data length accepted.
    pub fn max_message_size(&self) -> usize {
        self.max
    }

    /// Bytes of an oversized frame still to be discarded.
    pub fn skipping(&self) -> usize {
        self.skip
    }

    /// How many more bytes the buffer needs before the next call can make
    /// progress (at least 1). Lets a reader size its next read.
    pub fn wanted(&self, buf: &[u8]) -> usize {
        if self.skip > 0 {
            return self.skip;
        }
        match FrameHeader::parse(buf) {
            None => HEADER_LEN - buf.len(),
            Some(h) => (HEADER_LEN + h.length as usize)
                .saturating_sub(buf.len())
                .max(1),
        }
    }

    /// Takes one frame off the front of `buf`.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] when a header announces more than the maximum; the
    /// header is consumed and the data will be skipped by later calls.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            buf.advance(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let Some(header) = FrameHeader::parse(buf) else {
            return Ok(None);
        };
        let len = header.length as usize;
        if len > self.max {
            buf.advance(HEADER_LEN);
            let n = len.min(buf.len());
            buf.advance(n);
            self.skip = len - n;
            return Err(FrameError::TooLarge {
                header,
                max: self.max,
            });
        }
        // No reservation for the announced length: the buffer grows with the
        // bytes that actually arrive, so a header alone costs nothing.
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(len).freeze();
        Ok(Some(Frame {
            stream_id: header.stream_id,
            kind: header.kind,
            flags: header.flags,
            payload: Payload::Whole(payload),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).expect("encode");
        buf
    }

    #[test]
    fn every_type_and_flag_round_trips() {
        let kinds = [
            FrameType::Request,
            FrameType::Response,
            FrameType::Data,
            FrameType::Headers,
            FrameType::Trailers,
            FrameType::Unknown(0x09),
        ];
        for kind in kinds {
            for bits in 0u8..8 {
                let frame = Frame::new(
                    0x0102_0305,
                    kind,
                    Flags::from_bits(bits),
                    Bytes::from_static(b"hello"),
                );
                let mut buf = encode(&frame);
                assert_eq!(buf.len(), HEADER_LEN + 5);
                assert_eq!(buf[8], kind.to_u8());
                assert_eq!(buf[9], bits);
                let mut dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE);
                assert_eq!(dec.decode(&mut buf), Ok(Some(frame)));
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn partial_frames_byte_by_byte() {
        let a = Frame::new(1, FrameType::Data, Flags::EMPTY, Bytes::from_static(b"abc"));
        let b = Frame::new(
            1,
            FrameType::Data,
            Flags::REMOTE_CLOSED | Flags::NO_DATA,
            Bytes::new(),
        );
        let mut wire = encode(&a);
        wire.extend_from_slice(&encode(&b));

        let mut dec = FrameDecoder::new(16);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            assert!(dec.wanted(&buf) >= 1);
            while let Some(f) = dec.decode(&mut buf).expect("no error") {
                out.push(f);
            }
        }
        assert_eq!(out, vec![a, b]);
        assert!(buf.is_empty());
    }

    #[test]
    fn empty_data_frame_is_a_frame() {
        let f = Frame::new(7, FrameType::Data, Flags::EMPTY, Bytes::new());
        let mut buf = encode(&f);
        assert_eq!(&buf[..], &[0, 0, 0, 0, 0, 0, 0, 7, 3, 0]);
        assert_eq!(FrameDecoder::new(0).decode(&mut buf), Ok(Some(f)));
    }

    #[test]
    fn oversize_is_rejected_from_the_header_and_skipped() {
        let mut dec = FrameDecoder::new(4);
        let big = Frame::new(
            3,
            FrameType::Request,
            Flags::EMPTY,
            Bytes::from(vec![7u8; 9]),
        );
        let small = Frame::new(
            5,
            FrameType::Request,
            Flags::EMPTY,
            Bytes::from_static(b"ok"),
        );
        let wire = {
            let mut w = encode(&big);
            w.extend_from_slice(&encode(&small));
            w
        };
        // Only the header has arrived: the error comes before any data is read.
        let mut buf = BytesMut::from(&wire[..HEADER_LEN]);
        match dec.decode(&mut buf) {
            Err(FrameError::TooLarge { header, max }) => {
                assert_eq!(header.length, 9);
                assert_eq!(header.stream_id, 3);
                assert_eq!(max, 4);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(dec.skipping(), 9);
        // The rest trickles in; the oversized data is dropped, the next frame decodes.
        buf.extend_from_slice(&wire[HEADER_LEN..HEADER_LEN + 4]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(buf.is_empty(), "skipped bytes are not buffered");
        buf.extend_from_slice(&wire[HEADER_LEN + 4..]);
        assert_eq!(dec.decode(&mut buf), Ok(Some(small)));
        assert_eq!(
            FrameError::TooLarge {
                header: FrameHeader {
                    length: 9,
                    stream_id: 3,
                    kind: FrameType::Request,
                    flags: Flags::EMPTY
                },
                max: 4
            }
            .to_string(),
            "message length 9 exceed maximum message size of 4"
        );
    }

    #[test]
    fn a_header_announcing_4_mib_reserves_nothing_beyond_what_arrived() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE);
        let header = FrameHeader {
            length: DEFAULT_MAX_MESSAGE_SIZE as u32,
            stream_id: 1,
            kind: FrameType::Request,
            flags: Flags::EMPTY,
        };
        let mut buf = BytesMut::with_capacity(64);
        buf.put_slice(&header.to_bytes());
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(buf.capacity() <= 64, "reserved {} bytes", buf.capacity());
        assert_eq!(dec.wanted(&buf), DEFAULT_MAX_MESSAGE_SIZE);
        buf.put_slice(&[0u8; 100]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(
            buf.capacity() < 4 * (HEADER_LEN + 100),
            "grew to {} bytes for {} that arrived",
            buf.capacity(),
            buf.len()
        );
    }

    #[test]
    fn header_limit_is_inclusive() {
        let mut dec = FrameDecoder::new(3);
        let f = Frame::new(1, FrameType::Data, Flags::EMPTY, Bytes::from_static(b"abc"));
        assert_eq!(dec.decode(&mut encode(&f)), Ok(Some(f)));
    }
}
