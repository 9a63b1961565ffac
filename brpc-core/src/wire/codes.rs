//! QUIC application error codes brpc uses, and what each means. Stream codes
//! go in RESET_STREAM and STOP_SENDING; connection codes in CONNECTION_CLOSE.
//! See PROTOCOL.md §5.

/// Stream: the call was cancelled (caller dropped it, or its handler was dropped).
pub const STREAM_CANCELLED: u32 = 0x01;
/// Stream: the peer broke the frame protocol on this stream.
pub const STREAM_PROTOCOL_ERROR: u32 = 0x02;
/// Stream: a frame exceeded the maximum message size.
pub const STREAM_TOO_LARGE: u32 = 0x03;
/// Stream: the call stalled mid-frame (or before its Request) for longer
/// than the idle limit.
pub const STREAM_IDLE: u32 = 0x04;
/// Stream: the call was refused before its Request was read because the
/// receiver's inbound buffer budget is used up, or a later frame of it found
/// no room and no place left to wait for it (a callee answers with a
/// Response with `RESOURCE_EXHAUSTED`); retrying later may succeed.
pub const STREAM_REFUSED: u32 = 0x05;

/// Connection: closed normally by the application.
pub const CONN_NORMAL: u32 = 0x00;
/// Connection: the server is shutting down; reconnect elsewhere or later.
pub const CONN_GOING_AWAY: u32 = 0x01;
/// Connection: the Hello exchange failed (bad first call, bad version, too large).
pub const CONN_HELLO_FAILED: u32 = 0x02;
/// Connection: no Hello arrived within the server's time limit.
pub const CONN_HELLO_TIMEOUT: u32 = 0x03;
/// Connection: the server's authorization refused this client.
pub const CONN_UNAUTHORIZED: u32 = 0x04;
/// Connection: the server is at its connection limit.
pub const CONN_TOO_MANY: u32 = 0x05;

/// What a connection close code means, in a few words ("going away",
/// "unauthorized", …).
pub fn connection_code_meaning(code: u32) -> &'static str {
    match code {
        CONN_NORMAL => "closed",
        CONN_GOING_AWAY => "going away",
        CONN_HELLO_FAILED => "Hello failed",
        CONN_HELLO_TIMEOUT => "Hello timed out",
        CONN_UNAUTHORIZED => "unauthorized",
        CONN_TOO_MANY => "too many connections",
        _ => "unknown code",
    }
}
