//! gRPC message framing inside http bodies (the 5-byte prefix tonic reads and
//! writes), and a reader that turns a body into messages and trailers.
//!
//! This is the seam between tonic's http view of a call and ttrpc's message view.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream;
use http::HeaderMap;
use http_body::Frame as BodyFrame;
use http_body_util::StreamBody;
use tonic::Status;
use tonic::body::Body;

use crate::conn::{Input, MessageStream};

/// Length of the gRPC message prefix: compressed flag and u32 length.
const PREFIX_LEN: usize = 5;

/// Messages shorter than this get their gRPC prefix from a static table.
const STATIC_PREFIXES: usize = 256;

/// `[0, 0, 0, 0, len]` for every `len` below [`STATIC_PREFIXES`].
static PREFIXES: [[u8; PREFIX_LEN]; STATIC_PREFIXES] = {
    let mut table = [[0u8; PREFIX_LEN]; STATIC_PREFIXES];
    let mut len = 0;
    while len < STATIC_PREFIXES {
        table[len][PREFIX_LEN - 1] = len as u8;
        len += 1;
    }
    table
};

/// The gRPC prefix (uncompressed flag, u32 length) of a message of `len`
/// bytes, as a chunk of its own: tonic's decoder copies the chunks of a body
/// into its buffer anyway, so the prefix and the message go as two chunks
/// rather than one copied together. Small lengths, the common ones, cost no
/// allocation.
pub(crate) fn message_prefix(len: usize) -> Bytes {
    match PREFIXES.get(len) {
        Some(prefix) => Bytes::from_static(prefix),
        None => {
            let mut prefix = [0u8; PREFIX_LEN];
            prefix[1..].copy_from_slice(&(len as u32).to_be_bytes());
            Bytes::copy_from_slice(&prefix)
        }
    }
}

/// The request body a tonic server reads for a served call's `input`: each
/// message as its prefix and then itself (see [`message_prefix`]).
pub(crate) fn request_body(input: Input) -> Body {
    match input {
        Input::Single(message) => {
            let prefix = message_prefix(message.len());
            let chunks: [BodyItem; 2] = [Ok(BodyFrame::data(prefix)), Ok(BodyFrame::data(message))];
            Body::new(StreamBody::new(stream::iter(chunks)))
        }
        Input::Stream(messages) => Body::new(StreamBody::new(stream::unfold(
            (messages, None),
            |(mut messages, rest): (MessageStream, Option<Bytes>)| async move {
                if let Some(message) = rest {
                    return Some((Ok(BodyFrame::data(message)), (messages, None)));
                }
                Some(match messages.next().await? {
                    Ok(message) => (
                        Ok(BodyFrame::data(message_prefix(message.len()))),
                        (messages, Some(message)),
                    ),
                    Err(status) => (Err(status), (messages, None)),
                })
            },
        ))),
    }
}

type BodyItem = Result<BodyFrame<Bytes>, Status>;

/// One gRPC length-prefixed message in one buffer.
#[cfg(test)]
fn frame_message(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + message.len());
    buf.extend_from_slice(&message_prefix(message.len()));
    buf.extend_from_slice(message);
    buf.freeze()
}

/// What a body of gRPC messages yields next.
#[derive(Debug)]
pub(crate) enum BodyEvent {
    /// One whole message (prefix removed).
    Message(Bytes),
    /// The trailers that end the body.
    Trailers(HeaderMap),
    /// The body ended without trailers.
    End,
}

/// Reads whole gRPC messages out of an http body, whatever its chunking.
pub(crate) struct MessageReader<B> {
    body: B,
    buf: BytesMut,
    max: usize,
    ended: bool,
}

impl<B> MessageReader<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub(crate) fn new(body: B, max_message_size: usize) -> Self {
        MessageReader {
            body,
            buf: BytesMut::new(),
            max: max_message_size,
            ended: false,
        }
    }

    fn take_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::unimplemented(
                "compressed gRPC messages are not supported by brpc; do not enable compression on this client or server",
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            return Err(Status::resource_exhausted(format!(
                "message length {len} exceed maximum message size of {}",
                self.max
            )));
        }
        if self.buf.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        self.buf.advance(PREFIX_LEN);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<BodyEvent, Status>> {
        loop {
            if let Some(message) = self.take_message()? {
                return Poll::Ready(Ok(BodyEvent::Message(message)));
            }
            if self.ended {
                return Poll::Ready(Ok(BodyEvent::End));
            }
            match std::task::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    if !self.buf.is_empty() {
                        return Poll::Ready(Err(Status::internal(
                            "body ended inside a gRPC message",
                        )));
                    }
                }
                Some(Err(e)) => {
                    self.ended = true;
                    return Poll::Ready(Err(Status::from_error(e.into())));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        // A chunk that is exactly one whole message is sliced,
                        // not copied (tonic encodes a unary message that way).
                        if self.buf.is_empty() && data.len() >= PREFIX_LEN && data[0] == 0 {
                            let len =
                                u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
                            if PREFIX_LEN + len == data.len() && len <= self.max {
                                return Poll::Ready(Ok(BodyEvent::Message(
                                    data.slice(PREFIX_LEN..),
                                )));
                            }
                        }
                        self.buf.extend_from_slice(&data)
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.ended = true;
                            return Poll::Ready(Ok(BodyEvent::Trailers(trailers)));
                        }
                    }
                },
            }
        }
    }

    /// The next event, waiting for it.
    pub(crate) async fn next(&mut self) -> Result<BodyEvent, Status> {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The next event if it is ready now, without waiting. Used to tell a
    /// single-message body (unary) from a stream without knowing the method.
    pub(crate) fn next_now(&mut self) -> Option<Result<BodyEvent, Status>> {
        match self.poll_event(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(event) => Some(event),
            Poll::Pending => None,
        }
    }
}

/// The status an http response's trailers (or trailers-only headers) carry.
pub(crate) fn status_from_trailers(trailers: &HeaderMap) -> Status {
    if is_bare_ok(trailers) {
        return Status::ok("");
    }
    Status::from_header_map(trailers).unwrap_or_else(no_final_status)
}

/// The status of a served call whose http response (status 200) ended
/// without a `grpc-status`: `UNKNOWN`, as tonic (0.14.9 on) and grpc-go
/// read such a response.
pub(crate) fn no_final_status() -> Status {
    Status::unknown(
        "the service's response ended without a grpc-status (a tower layer or service \
         that answers with plain http must end with gRPC trailers)",
    )
}

/// The status of a served call whose http response has no `grpc-status`
/// and an http status other than 200 (a layer's plain http answer, say an
/// auth layer's 401), mapped as gRPC maps them.
pub(crate) fn status_from_http(status: http::StatusCode) -> Status {
    use http::StatusCode as H;
    use tonic::Code;
    let code = match status {
        H::BAD_REQUEST => Code::Internal,
        H::UNAUTHORIZED => Code::Unauthenticated,
        H::FORBIDDEN => Code::PermissionDenied,
        H::NOT_FOUND => Code::Unimplemented,
        H::TOO_MANY_REQUESTS | H::BAD_GATEWAY | H::SERVICE_UNAVAILABLE | H::GATEWAY_TIMEOUT => {
            Code::Unavailable
        }
        _ => Code::Unknown,
    };
    Status::new(
        code,
        format!("the service answered with http status {status} and no grpc-status"),
    )
}

/// Whether `trailers` hold `grpc-status: 0` and nothing else: how tonic's
/// server ends an OK reply without trailing metadata, the common end. Read
/// without a header lookup; `Status::from_header_map` clones the whole map.
pub(crate) fn is_bare_ok(trailers: &HeaderMap) -> bool {
    trailers.len() == 1
        && trailers
            .iter()
            .next()
            .is_some_and(|(name, value)| name == "grpc-status" && value == "0")
}

/// Trailers carrying `status`.
pub(crate) fn trailers_for(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        let fallback = Status::new(status.code(), "status message could not be encoded");
        let _ = fallback.add_header(&mut map);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body_of(chunks: Vec<Bytes>, trailers: Option<HeaderMap>) -> tonic::body::Body {
        let mut frames: Vec<Result<http_body::Frame<Bytes>, Status>> = chunks
            .into_iter()
            .map(|c| Ok(http_body::Frame::data(c)))
            .collect();
        if let Some(t) = trailers {
            frames.push(Ok(http_body::Frame::trailers(t)));
        }
        tonic::body::Body::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
    }

    #[tokio::test]
    async fn messages_across_any_chunking() {
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&frame_message(b"one"));
        wire.extend_from_slice(&frame_message(b""));
        wire.extend_from_slice(&frame_message(b"three"));
        let wire = wire.freeze();
        let chunks: Vec<Bytes> = (0..wire.len()).map(|i| wire.slice(i..i + 1)).collect();
        let mut r = MessageReader::new(body_of(chunks, Some(trailers_for(&Status::ok("")))), 64);
        let mut got = Vec::new();
        loop {
            match r.next().await.unwrap() {
                BodyEvent::Message(m) => got.push(m),
                BodyEvent::Trailers(t) => {
                    assert_eq!(status_from_trailers(&t).code(), tonic::Code::Ok);
                    break;
                }
                BodyEvent::End => panic!("no trailers"),
            }
        }
        assert_eq!(got, vec![&b"one"[..], &b""[..], &b"three"[..]]);
    }

    #[tokio::test]
    async fn oversize_and_compressed_are_errors() {
        let mut r = MessageReader::new(body_of(vec![frame_message(&[0u8; 9])], None), 8);
        assert_eq!(
            r.next().await.unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        let mut compressed = BytesMut::from(&frame_message(b"x")[..]);
        compressed[0] = 1;
        let mut r = MessageReader::new(body_of(vec![compressed.freeze()], None), 8);
        assert_eq!(
            r.next().await.unwrap_err().code(),
            tonic::Code::Unimplemented
        );
        let mut r = MessageReader::new(body_of(vec![Bytes::from_static(&[0, 0, 0])], None), 8);
        assert_eq!(r.next().await.unwrap_err().code(), tonic::Code::Internal);
    }

    #[test]
    fn a_prefix_is_the_flag_and_the_big_endian_length_from_the_table_or_not() {
        for len in [0usize, 1, 16, 255, 256, 257, 70_000, u32::MAX as usize] {
            let mut want = vec![0u8];
            want.extend_from_slice(&(len as u32).to_be_bytes());
            assert_eq!(&message_prefix(len)[..], &want[..], "{len}");
        }
    }

    #[tokio::test]
    async fn a_request_body_reads_back_as_its_message() {
        for message in [
            Bytes::new(),
            Bytes::from_static(b"m"),
            Bytes::from(vec![7u8; 300]),
        ] {
            let mut r = MessageReader::new(request_body(Input::Single(message.clone())), 1 << 20);
            assert!(matches!(r.next().await.unwrap(), BodyEvent::Message(m) if m == message));
            assert!(matches!(r.next().await.unwrap(), BodyEvent::End));
        }
    }

    #[test]
    fn next_now_sees_a_ready_single_message_body() {
        let mut r = MessageReader::new(body_of(vec![frame_message(b"m")], None), 8);
        assert!(matches!(r.next_now(), Some(Ok(BodyEvent::Message(_)))));
        assert!(matches!(r.next_now(), Some(Ok(BodyEvent::End))));
    }

    #[test]
    fn the_bare_ok_shortcut_reads_only_a_lone_ok_status() {
        let map = |entries: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in entries {
                map.append(*k, http::HeaderValue::from_static(v));
            }
            map
        };
        let ok = status_from_trailers(&map(&[("grpc-status", "0")]));
        assert_eq!((ok.code(), ok.message()), (tonic::Code::Ok, ""));
        let with_metadata = status_from_trailers(&map(&[("grpc-status", "0"), ("x-k", "v")]));
        assert_eq!(with_metadata.code(), tonic::Code::Ok);
        assert_eq!(with_metadata.metadata().get("x-k").unwrap(), "v");
        let not_found = status_from_trailers(&map(&[("grpc-status", "5")]));
        assert_eq!(not_found.code(), tonic::Code::NotFound);
        let no_status = status_from_trailers(&map(&[("x-status", "0")]));
        assert_eq!(no_status.code(), tonic::Code::Unknown);
        let twice = status_from_trailers(&map(&[("grpc-status", "0"), ("grpc-status", "2")]));
        assert_eq!(
            twice.code(),
            tonic::Code::Ok,
            "the first value, as tonic reads it"
        );
    }

    #[test]
    fn non_ascii_status_survives_trailers() {
        let s = Status::not_found("ключ не найден: ✗ 100%");
        let back = status_from_trailers(&trailers_for(&s));
        assert_eq!(back.code(), tonic::Code::NotFound);
        assert_eq!(back.message(), s.message());
    }
}
