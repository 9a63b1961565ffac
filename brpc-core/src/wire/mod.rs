//! The ttrpc wire, sans-IO: frames, envelopes, stream ids, status mapping,
//! the stream and connection codes, and the per-call machine ([`Call`]).
//! Bytes and time in, frames and events out; no sockets, tasks or clocks.
//! Imports nothing from the rest of the crate.

mod call;
pub mod codes;
mod envelope;
mod frame;
pub mod status;

pub(crate) use call::encode_request_shared;
pub use call::{
    Abort, Call, CallConfig, CallRole, Failure, Inbound, MIN_IDLE_PROGRESS, RequestShape,
    encode_message, encode_request, encode_request_message, encode_request_parts,
};
pub use envelope::{
    HelloRequest, HelloResponse, KeyValue, MAX_METADATA_ENTRIES, Metadata, Request, RequestParts,
    Response, Status,
};
pub use frame::{
    DEFAULT_MAX_MESSAGE_SIZE, Flags, Frame, FrameDecoder, FrameError, FrameHeader, FrameType,
    HEADER_LEN, Payload,
};

/// The fully qualified name of brpc's built-in session service (Hello,
/// GoAway); see PROTOCOL.md.
pub const SESSION_SERVICE: &str = "brpc.v1.Session";

/// The ttrpc stream id of the `index`-th call (counting from 0) opened by one
/// side: odd for the dialing side (1, 3, 5, …), even for the accepting side
/// (2, 4, 6, …). Over QUIC `index` is the QUIC stream's index, so the id is
/// constant for the life of the stream and checkable by the receiver. Ids wrap
/// modulo 2^32 after 2^31 calls, keeping their parity.
pub fn stream_id(index: u64, opened_by_dialer: bool) -> u32 {
    let base: u64 = if opened_by_dialer { 1 } else { 2 };
    (index.wrapping_mul(2).wrapping_add(base) & u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn stream_id_parity() {
        assert_eq!(super::stream_id(0, true), 1);
        assert_eq!(super::stream_id(1, true), 3);
        assert_eq!(super::stream_id(0, false), 2);
        assert_eq!(super::stream_id(5, false), 12);
        assert_eq!(super::stream_id((1 << 31) + 2, true) % 2, 1);
        assert_eq!(super::stream_id((1 << 31) + 3, false) % 2, 0);
    }
}
