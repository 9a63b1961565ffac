//! The connection engine both roles share: a [`Peer`] opens calls to the
//! other side ([`Peer::start_call`], the calling half in `outgoing`) and
//! [`serve`] hands the calls it opens to a [`Handler`] (the serving half in
//! `incoming`). Both halves are thin pumps between the transport and each
//! call's machine ([`crate::wire::Call`]); neither knows http or tonic. The
//! only role difference is [`Side`]: who dialed, and so the parity of ttrpc
//! stream ids.

mod budget;
pub(crate) mod call_io;
mod connection_error;
mod error;
mod incoming;
mod io;
mod observe;
mod options;
mod outgoing;
mod peer;
mod quic;
mod relay;
pub(crate) mod spare;
mod transport;

pub(crate) use budget::Budgets;
pub use budget::{DEFAULT_BUFFER_PER_CONNECTION, DEFAULT_BUFFER_TOTAL, MemoryBudget};
pub use connection_error::ConnectionError;
pub(crate) use incoming::accept_one;
pub use incoming::{CallEnded, Handler, Incoming, Input, MessageStream, Reply, serve};
pub use observe::code_name;
pub use options::ConnectionOptions;
pub use outgoing::{OutgoingCall, RequestBody, ResponseEvent, end_status};
pub use peer::{CallLimits, ConnectionId, Labels, Peer, PeerInfo, UnixCredentials};
pub use quic::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEP_ALIVE_INTERVAL, DEFAULT_MAX_CONCURRENT_CALLS,
    DEFAULT_MAX_UDP_PAYLOAD, DEFAULT_RECEIVE_WINDOW, DEFAULT_SOCKET_BUFFER, INITIAL_CALL_WINDOW,
    LOOPBACK_MAX_UDP_PAYLOAD, PRE_HELLO_RECEIVE_WINDOW, STREAM_RECEIVE_WINDOW, TransportOptions,
    admit, endpoint, server_transport_config, stable_endpoint_config, transport_config,
};
pub use relay::relay;
#[doc(hidden)]
pub use spare::reused as large_buffers_reused;
pub(crate) use transport::{
    BoxFuture, CancelSignal, FrameSink, FrameSource, Lost, Multiplexer, MuxCall, ReadError,
    RequestBuilder, SendError,
};

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

pub use crate::wire::codes;
