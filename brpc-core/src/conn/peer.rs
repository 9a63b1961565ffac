//! The handle to the other end of one connection: who it is, and how to call it.
//!
//! A server's handler gets the calling client's `Peer` from its request; the
//! server's registry holds the same handles; a client holds one for its server.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tonic::Status;

use super::Side;
use crate::bridge::Channel;

/// The id the server assigns to each connection during Hello. Unique for the
/// life of one server; a reconnecting client gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn-{}", self.0)
    }
}

/// Labels a client announces in Hello, e.g. `region=eu`.
pub type Labels = BTreeMap<String, String>;

/// What the Hello exchange established about a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The server-assigned connection id (both sides know it).
    pub connection_id: ConnectionId,
    /// The client's self-chosen name (as the client sent it in Hello).
    pub name: String,
    /// The client's labels.
    pub labels: Labels,
    /// When the Hello completed.
    pub connected_at: SystemTime,
}

struct Shared {
    connection: quinn::Connection,
    side: Side,
    info: PeerInfo,
    max_message_size: usize,
}

/// The other end of one brpc connection. Cheap to clone.
///
/// Calls go out through [`Peer::channel`] or [`Peer::client`]; the handle stays
/// valid after the connection closes, but calls then fail with `UNAVAILABLE`.
#[derive(Clone)]
pub struct Peer {
    shared: Arc<Shared>,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("connection_id", &self.shared.info.connection_id)
            .field("name", &self.shared.info.name)
            .field("labels", &self.shared.info.labels)
            .field("remote_address", &self.remote_address())
            .field("side", &self.shared.side)
            .finish()
    }
}

impl Peer {
    /// A handle for `connection`, as seen from `side`, after Hello produced `info`.
    pub fn new(
        connection: quinn::Connection,
        side: Side,
        info: PeerInfo,
        max_message_size: usize,
    ) -> Self {
        Peer {
            shared: Arc::new(Shared {
                connection,
                side,
                info,
                max_message_size,
            }),
        }
    }

    /// The handle of the peer that made this call. brpc stamps it on every
    /// request it serves, from the connection the call arrived on; nothing the
    /// peer sends can change it.
    ///
    /// # Errors
    /// `INTERNAL` when the request was not served by brpc.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<Peer, Status> {
        request.extensions().get::<Peer>().cloned().ok_or_else(|| {
            Status::internal("no brpc peer on this request: it was not served by a brpc connection")
        })
    }

    /// A channel that calls the services this peer hosts.
    pub fn channel(&self) -> Channel {
        Channel::new(self.clone())
    }

    /// A typed client of a service this peer hosts, e.g. `peer.client(NamerClient::new)`.
    pub fn client<C>(&self, make: impl FnOnce(Channel) -> C) -> C {
        make(self.channel())
    }

    /// The server-assigned connection id.
    pub fn connection_id(&self) -> ConnectionId {
        self.shared.info.connection_id
    }

    /// The client's name from Hello.
    pub fn name(&self) -> &str {
        &self.shared.info.name
    }

    /// The client's labels from Hello.
    pub fn labels(&self) -> &Labels {
        &self.shared.info.labels
    }

    /// One label's value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.shared.info.labels.get(key).map(String::as_str)
    }

    /// Everything Hello established.
    pub fn info(&self) -> &PeerInfo {
        &self.shared.info
    }

    /// When the connection completed Hello.
    pub fn connected_at(&self) -> SystemTime {
        self.shared.info.connected_at
    }

    /// The peer's current UDP address (it changes if the peer migrates).
    pub fn remote_address(&self) -> SocketAddr {
        self.shared.connection.remote_address()
    }

    /// Which end of the connection this side is.
    pub fn side(&self) -> Side {
        self.shared.side
    }

    /// Largest message this side sends or accepts on the connection.
    pub fn max_message_size(&self) -> usize {
        self.shared.max_message_size
    }

    /// The underlying QUIC connection.
    pub fn quic_connection(&self) -> &quinn::Connection {
        &self.shared.connection
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.connection.close_reason().is_some()
    }

    /// Waits until the connection closes and says why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.shared.connection.closed().await
    }

    /// Closes the connection now with an application `code` and `reason`
    /// (see [`codes`](super::codes)). Calls in flight fail.
    pub fn close(&self, code: u32, reason: &str) {
        self.shared
            .connection
            .close(quinn::VarInt::from_u32(code), reason.as_bytes());
    }
}
