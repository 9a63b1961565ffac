//! The protobuf envelopes carried in Request and Response frames, with the field
//! numbers of containerd/ttrpc's `request.proto`, plus brpc's session Hello.
//!
//! Written as prost derives so the core crate needs no build step.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{PIECE_MIN, Payload, PieceWriter};
use prost::Message as _;

/// `ttrpc.Request`: opens a call.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// Fully qualified proto service name, e.g. `greeter.v1.Greeter`.
    #[prost(string, tag = "1")]
    pub service: String,
    /// Bare method name, e.g. `Greet`.
    #[prost(string, tag = "2")]
    pub method: String,
    /// The encoded request message (unary and server-streaming calls).
    #[prost(bytes = "bytes", tag = "3")]
    pub payload: Bytes,
    /// Time remaining for the call in nanoseconds; 0 means no deadline.
    #[prost(int64, tag = "4")]
    pub timeout_nano: i64,
    /// Request metadata, one entry per value, keys lower-case.
    #[prost(message, repeated, tag = "5")]
    pub metadata: Vec<KeyValue>,
}

/// `ttrpc.Response`: ends a call with a status and, when OK, the reply message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    /// The call's status. An OK response carries an empty status message.
    #[prost(message, optional, tag = "1")]
    pub status: Option<Status>,
    /// The encoded reply message.
    #[prost(bytes = "bytes", tag = "2")]
    pub payload: Bytes,
}

/// A `bytes` field written by hand: prost's own encoding of a `Bytes` field
/// clones it, and cloning a `Bytes` made from a `Vec` allocates.
fn encode_bytes_field(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    if !bytes.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }
}

impl Request {
    /// The encoded envelope in one buffer: the same bytes as
    /// [`prost::Message::encode_to_vec`], with one allocation.
    pub fn encode_to_bytes(&self) -> Bytes {
        RequestParts {
            service: &self.service,
            method: &self.method,
            payload: &self.payload,
            timeout_nano: self.timeout_nano,
            metadata: &self.metadata,
        }
        .encode_to_bytes()
    }
}

/// A [`Request`] to encode, borrowed: the caller's names and payload need
/// not be copied into owned fields first.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// Fully qualified proto service name.
    pub service: &'a str,
    /// Bare method name.
    pub method: &'a str,
    /// The encoded request message.
    pub payload: &'a [u8],
    /// Time remaining in nanoseconds; 0: no deadline.
    pub timeout_nano: i64,
    /// Request metadata.
    pub metadata: &'a [KeyValue],
}

impl RequestParts<'_> {
    /// The encoded envelope: the same bytes as encoding the equivalent
    /// [`Request`].
    pub fn encode_to_bytes(&self) -> Bytes {
        let payload_len = self.payload.len();
        let len = self.encoded_len_around(payload_len);
        self.encode_around(len, payload_len, |buf| buf.put_slice(self.payload))
    }

    /// [`encode_to_bytes`](Self::encode_to_bytes), unless the envelope would
    /// be over `max` bytes: then nothing is encoded and the error is the
    /// size it would have had.
    pub(crate) fn encode_to_bytes_within(&self, max: usize) -> Result<Bytes, usize> {
        self.encode_within(self.payload.len(), max, |buf| buf.put_slice(self.payload))
    }

    /// [`encode_to_bytes_within`](Self::encode_to_bytes_within) with
    /// `payload` as the payload (`self.payload` is not used): at
    /// [`PIECE_MIN`] bytes or more it is sent as it is, a piece of its own
    /// between the envelope's other fields, not copied.
    pub(crate) fn encode_shared_within(
        &self,
        payload: &Bytes,
        max: usize,
    ) -> Result<Payload, usize> {
        if payload.len() < PIECE_MIN {
            return self
                .encode_within(payload.len(), max, |buf| buf.put_slice(payload))
                .map(Payload::Whole);
        }
        self.encode_pieces_within(payload.len(), max, |buf| buf.put(payload.clone()))
    }

    /// The encoded envelope with `message` encoded straight into its payload
    /// field (`self.payload` is not used): one buffer, no copy of the
    /// message's bytes.
    pub fn encode_with_message(&self, message: &impl prost::Message) -> Bytes {
        let payload_len = message.encoded_len();
        let len = self.encoded_len_around(payload_len);
        self.encode_around(len, payload_len, |buf| message.encode_raw(buf))
    }

    /// [`encode_with_message`](Self::encode_with_message), unless the
    /// envelope would be over `max` bytes (as
    /// [`encode_to_bytes_within`](Self::encode_to_bytes_within)).
    /// A message of [`PIECE_MIN`] bytes or more is encoded into a
    /// [`PieceWriter`]: its large `bytes::Bytes` fields are sent as they
    /// are, not copied.
    pub(crate) fn encode_with_message_within(
        &self,
        message: &impl prost::Message,
        max: usize,
    ) -> Result<Payload, usize> {
        let payload_len = message.encoded_len();
        if payload_len < PIECE_MIN {
            return self
                .encode_within(payload_len, max, |buf| message.encode_raw(buf))
                .map(Payload::Whole);
        }
        // The buffers between pieces hold only the envelope and the
        // message's small fields.
        self.encode_pieces_within(payload_len, max, |buf| message.encode_raw(buf))
    }

    /// The envelope around a payload of `payload_len` bytes that `put`
    /// writes into a [`PieceWriter`] (whose large `Bytes` become pieces of
    /// their own), unless it would be over `max` bytes (the error: its size).
    fn encode_pieces_within(
        &self,
        payload_len: usize,
        max: usize,
        put: impl FnOnce(&mut PieceWriter),
    ) -> Result<Payload, usize> {
        let len = self.len_within(payload_len, max)?;
        let mut buf = PieceWriter::new(len);
        self.encode_into(&mut buf, payload_len, put);
        Ok(buf.finish())
    }

    /// The envelope around a payload of `payload_len` bytes that `put`
    /// writes, unless it would be over `max` bytes (the error: its size).
    fn encode_within(
        &self,
        payload_len: usize,
        max: usize,
        put: impl FnOnce(&mut BytesMut),
    ) -> Result<Bytes, usize> {
        let len = self.len_within(payload_len, max)?;
        Ok(self.encode_around(len, payload_len, put))
    }

    /// The envelope's size around a payload of `payload_len` bytes, if at
    /// most `max` (the error: its size).
    fn len_within(&self, payload_len: usize, max: usize) -> Result<usize, usize> {
        let len = self.encoded_len_around(payload_len);
        if len > max { Err(len) } else { Ok(len) }
    }

    /// The encoded envelope's size around a payload of `payload_len` bytes.
    fn encoded_len_around(&self, payload_len: usize) -> usize {
        use prost::encoding::{encoded_len_varint, int64, key_len, message};
        let field = |len: usize| {
            if len == 0 {
                0
            } else {
                key_len(1) + encoded_len_varint(len as u64) + len
            }
        };
        field(self.service.len())
            + field(self.method.len())
            + field(payload_len)
            + if self.timeout_nano != 0 {
                int64::encoded_len(4, &self.timeout_nano)
            } else {
                0
            }
            + message::encoded_len_repeated(5, self.metadata)
    }

    /// The envelope, `len` bytes, around a payload of `payload_len` bytes
    /// that `put` writes.
    fn encode_around(
        &self,
        len: usize,
        payload_len: usize,
        put: impl FnOnce(&mut BytesMut),
    ) -> Bytes {
        let mut buf = BytesMut::with_capacity(len);
        self.encode_into(&mut buf, payload_len, put);
        buf.freeze()
    }

    /// Writes the envelope into `buf` around a payload of `payload_len`
    /// bytes that `put` writes.
    fn encode_into<B: BufMut>(&self, buf: &mut B, payload_len: usize, put: impl FnOnce(&mut B)) {
        use prost::encoding::{WireType, encode_key, encode_varint, int64, message};
        // A string field is written as a bytes field is.
        encode_bytes_field(1, self.service.as_bytes(), buf);
        encode_bytes_field(2, self.method.as_bytes(), buf);
        if payload_len != 0 {
            encode_key(3, WireType::LengthDelimited, buf);
            encode_varint(payload_len as u64, buf);
            put(buf);
        }
        if self.timeout_nano != 0 {
            int64::encode(4, &self.timeout_nano, buf);
        }
        for entry in self.metadata {
            message::encode(5, entry, buf);
        }
    }
}

impl Response {
    /// The encoded envelope in one buffer: the same bytes as
    /// [`prost::Message::encode_to_vec`], with one allocation.
    pub fn encode_to_bytes(&self) -> Bytes {
        self.encode_to_bytes_of(self.encoded_len())
    }

    /// [`encode_to_bytes`](Self::encode_to_bytes), its length `len` known.
    fn encode_to_bytes_of(&self, len: usize) -> Bytes {
        let mut buf = BytesMut::with_capacity(len);
        self.encode_into(&mut buf, |buf| buf.put_slice(&self.payload));
        buf.freeze()
    }

    /// The encoded envelope, `len` bytes (its [`encoded_len`](prost::Message::encoded_len)):
    /// in one buffer, or, with a payload of [`PIECE_MIN`] bytes or more, in
    /// pieces that send the payload as it is, not copied.
    pub(crate) fn encode_pieces(&self, len: usize) -> Payload {
        if self.payload.len() < PIECE_MIN {
            return Payload::Whole(self.encode_to_bytes_of(len));
        }
        let mut buf = PieceWriter::new(len);
        self.encode_into(&mut buf, |buf| buf.put(self.payload.clone()));
        buf.finish()
    }

    /// Writes the envelope into `buf`, the payload (when there is one)
    /// written by `put`.
    fn encode_into<B: BufMut>(&self, buf: &mut B, put: impl FnOnce(&mut B)) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        if let Some(status) = &self.status {
            prost::encoding::message::encode(1, status, buf);
        }
        if !self.payload.is_empty() {
            encode_key(2, WireType::LengthDelimited, buf);
            encode_varint(self.payload.len() as u64, buf);
            put(buf);
        }
    }
}

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// The gRPC status code.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// Human-readable message.
    #[prost(string, tag = "2")]
    pub message: String,
    /// Error details.
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// `ttrpc.KeyValue`: one metadata entry.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct KeyValue {
    /// Lower-case key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Value (ASCII; `-bin` keys carry base64 as gRPC does).
    #[prost(string, tag = "2")]
    pub value: String,
}

impl KeyValue {
    /// A key/value pair.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        KeyValue {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// `brpc.v1.Metadata`: the data of a Headers or Trailers frame (brpc extension).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    /// One entry per value, keys lower-case, as in `Request.metadata`.
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<KeyValue>,
}

/// `brpc.v1.HelloRequest`: the dialer's first call, `brpc.v1.Session/Hello`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    /// The brpc protocol version the dialer speaks ([`PROTOCOL_VERSION`](crate::session::PROTOCOL_VERSION)).
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    /// The dialer's self-chosen name (e.g. an agent's host name).
    #[prost(string, tag = "2")]
    pub name: String,
    /// The dialer's labels, e.g. `region=eu`.
    #[prost(message, repeated, tag = "3")]
    pub labels: Vec<KeyValue>,
}

/// `brpc.v1.HelloResponse`: the accepting side's answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloResponse {
    /// The connection id the accepting side assigned.
    #[prost(uint64, tag = "1")]
    pub connection_id: u64,
    /// The protocol version the accepting side will speak.
    #[prost(uint32, tag = "2")]
    pub protocol_version: u32,
}

/// Most metadata entries one frame may carry (a Request's metadata, or a
/// Headers or Trailers frame). Checked before the frame is decoded: an
/// entry can be two bytes on the wire and about fifty once decoded, so a
/// frame within the message size could otherwise take many times its size
/// in memory.
pub const MAX_METADATA_ENTRIES: usize = 4096;

/// How many times field `field` occurs at the top level of the protobuf
/// message `buf`, read from the wire without decoding anything; `None` if
/// `buf` is not a well-formed message (decoding it then reports why).
pub(crate) fn count_field(mut buf: &[u8], field: u32) -> Option<usize> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut count = 0;
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        if key >> 3 == u64::from(field) {
            count += 1;
        }
        let skip = match key & 7 {
            0 => {
                varint(&mut buf)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut buf)?).ok()?,
            // A group's start and end: markers with nothing after them.
            // Fields inside one are counted as if at the top: too many,
            // never too few, so the limit cannot be slipped past that way.
            3 | 4 => 0,
            5 => 4,
            _ => return None,
        };
        buf = buf.get(skip..)?;
    }
    Some(count)
}

/// `RESOURCE_EXHAUSTED` if the message `buf` carries more than
/// [`MAX_METADATA_ENTRIES`] entries in field `field`.
pub(crate) fn check_metadata_entries(buf: &[u8], field: u32) -> Result<(), tonic::Status> {
    // An entry takes at least two bytes (its tag and its length): a
    // shorter message cannot hold too many, and is not scanned.
    if buf.len() <= 2 * MAX_METADATA_ENTRIES {
        return Ok(());
    }
    match count_field(buf, field) {
        Some(n) if n > MAX_METADATA_ENTRIES => Err(tonic::Status::resource_exhausted(format!(
            "{n} metadata entries in one frame; at most {MAX_METADATA_ENTRIES} are accepted"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Flags, Frame, FrameDecoder, FrameType};
    use bytes::BytesMut;
    use prost::Message;

    /// The wire count of a field agrees with decoding, and a message that
    /// is not well formed gives no count.
    #[test]
    fn a_fields_count_is_read_off_the_wire() {
        let request = Request {
            service: "s".into(),
            method: "m".into(),
            payload: Bytes::from_static(b"\x2a\x00 not metadata"),
            timeout_nano: 5,
            metadata: (0..7).map(|i| KeyValue::new("k", i.to_string())).collect(),
        };
        let buf = request.encode_to_vec();
        assert_eq!(count_field(&buf, 5), Some(7));
        assert_eq!(count_field(&buf, 1), Some(1));
        assert_eq!(count_field(&buf, 9), Some(0));
        assert_eq!(count_field(&buf[..buf.len() - 1], 5), None);
        assert!(check_metadata_entries(&buf, 5).is_ok());
        let many = [0x2a, 0x00].repeat(MAX_METADATA_ENTRIES + 1);
        let status = check_metadata_entries(&many, 5).expect_err("too many");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(check_metadata_entries(&many[2..], 5).is_ok());
        // An empty group (field 6) among them does not hide them.
        let mut grouped = many.clone();
        grouped.extend_from_slice(&[0x33, 0x34]);
        assert!(check_metadata_entries(&grouped, 5).is_err());
    }

    /// What containerd/ttrpc-rust's client puts on the wire for this call.
    const GOLDEN: &[u8] = &[
        0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, 0x01, 0x01, 0x00, 0x0a, 0x0a, 0x70, 0x72, 0x6f,
        0x62, 0x65, 0x2e, 0x45, 0x63, 0x68, 0x6f, 0x12, 0x04, 0x45, 0x63, 0x68, 0x6f, 0x1a, 0x02,
        0x08, 0x01, 0x20, 0x80, 0xe4, 0x97, 0xd0, 0x12, 0x2a, 0x0a, 0x0a, 0x03, 0x6b, 0x65, 0x79,
        0x12, 0x03, 0x76, 0x61, 0x6c,
    ];

    fn golden_request() -> Request {
        Request {
            service: "probe.Echo".into(),
            method: "Echo".into(),
            payload: Bytes::from_static(&[0x08, 0x01]),
            timeout_nano: 5_000_000_000,
            metadata: vec![KeyValue::new("key", "val")],
        }
    }

    #[test]
    fn hand_encoding_matches_prost() {
        let request = Request {
            service: "a.B".into(),
            method: "M".into(),
            payload: Bytes::from(vec![1u8; 300]),
            timeout_nano: -5,
            metadata: vec![KeyValue::new("k", "v"), KeyValue::new("k", "w")],
        };
        assert_eq!(request.encode_to_bytes(), request.encode_to_vec());
        assert_eq!(
            Request::default().encode_to_bytes(),
            Request::default().encode_to_vec()
        );
        let response = Response {
            status: Some(Status {
                code: 5,
                message: "gone".into(),
                details: vec![],
            }),
            payload: Bytes::from_static(b"xyz"),
        };
        assert_eq!(response.encode_to_bytes(), response.encode_to_vec());
        let ok = Response {
            status: Some(Status::default()),
            payload: Bytes::new(),
        };
        assert_eq!(ok.encode_to_bytes(), ok.encode_to_vec());
    }

    #[test]
    fn a_message_encoded_into_the_request_matches_prost() {
        // The message is encoded straight into the payload field: the same
        // bytes as encoding it first and carrying it, empty or not.
        for inner in [
            KeyValue::new("key", "value"),
            KeyValue::new("", ""),
            KeyValue::new("k", "v".repeat(300)),
        ] {
            let request = Request {
                service: "a.B".into(),
                method: "M".into(),
                payload: inner.encode_to_vec().into(),
                timeout_nano: 7,
                metadata: vec![KeyValue::new("k", "v")],
            };
            let parts = RequestParts {
                service: "a.B",
                method: "M",
                payload: &[],
                timeout_nano: 7,
                metadata: &request.metadata,
            };
            assert_eq!(parts.encode_with_message(&inner), request.encode_to_vec());
        }
    }

    #[test]
    fn golden_unary_request_bytes() {
        let frame = Frame::new(
            1,
            FrameType::Request,
            Flags::EMPTY,
            golden_request().encode_to_vec().into(),
        );
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).expect("encode");
        assert_eq!(&buf[..], GOLDEN);

        let mut wire = BytesMut::from(GOLDEN);
        let decoded = FrameDecoder::new(1 << 20)
            .decode(&mut wire)
            .expect("decode")
            .expect("whole frame");
        assert_eq!(decoded, frame);
        assert_eq!(
            Request::decode(decoded.payload.into_bytes()).expect("request"),
            golden_request()
        );
    }

    #[test]
    fn ok_response_carries_an_empty_status() {
        let r = Response {
            status: Some(Status::default()),
            payload: Bytes::from_static(&[0x08, 0x01]),
        };
        assert_eq!(r.encode_to_vec(), vec![0x0a, 0x00, 0x12, 0x02, 0x08, 0x01]);
    }

    #[test]
    fn status_round_trips_with_details_and_unicode() {
        let s = Status {
            code: 5,
            message: "введите имя — not found ✓".into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/x".into(),
                value: vec![1, 2, 3],
            }],
        };
        let back = Status::decode(&s.encode_to_vec()[..]).expect("decode");
        assert_eq!(back, s);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(Request::decode(&[0xff, 0xff, 0xff][..]).is_err());
        assert!(Response::decode(&[0x0a, 0x05, 0x08][..]).is_err());
    }
}
