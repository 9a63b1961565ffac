//! The QUIC connection engine both roles share: a [`Peer`] opens calls to the
//! other side (through [`Channel`](crate::Channel)) and [`serve`] answers calls
//! from it. The only role difference is [`Side`]: who dialed, and so the parity
//! of ttrpc stream ids.

mod budget;
pub(crate) mod call_io;
mod driver;
mod io;
mod observe;
mod peer;
mod transport;

pub use budget::{DEFAULT_BUFFER_PER_CONNECTION, DEFAULT_BUFFER_TOTAL, MemoryBudget};
pub use driver::serve;
pub(crate) use observe::CallRecord;
pub use observe::code_name;
pub use peer::{CallLimits, ConnectionId, Labels, Peer, PeerInfo};
pub use transport::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEP_ALIVE_INTERVAL, DEFAULT_MAX_CONCURRENT_CALLS,
    DEFAULT_RECEIVE_WINDOW, DEFAULT_SOCKET_BUFFER, INITIAL_CALL_WINDOW, PRE_HELLO_RECEIVE_WINDOW,
    TransportOptions, admit, endpoint, server_transport_config, stable_endpoint_config,
    transport_config,
};

pub(crate) use io::{FrameReader, ReadError, write_frame};
pub(crate) use observe::{
    bytes_received as observe_bytes_received, bytes_sent as observe_bytes_sent,
};

/// Which end of the QUIC connection this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Dialed the connection (the brpc client); opens odd ttrpc stream ids and
    /// sends Hello.
    Dialer,
    /// Accepted the connection (the brpc server); opens even stream ids and
    /// assigns the connection id.
    Acceptor,
}

/// QUIC application error codes brpc uses. Stream codes go in RESET_STREAM and
/// STOP_SENDING; connection codes in CONNECTION_CLOSE. See PROTOCOL.md.
pub mod codes {
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
    /// receiver's inbound buffer budget is used up (its answer is a Response
    /// with `RESOURCE_EXHAUSTED`); retrying later may succeed.
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
}
