//! brpc: bidirectional RPC over QUIC.
//!
//! A client dials a server once; that one QUIC connection carries every call in
//! both directions, each on its own stream, framed as ttrpc. Both peers host
//! ordinary `tonic-prost-build` services, and a server handler calls back the
//! very client that is calling it through [`Peer::from_request`].
//!
//! This crate re-exports the three workspace crates:
//! [`brpc_core`] (wire, engine, tonic bridge, TLS), [`brpc_server`] and
//! [`brpc_client`].

#![deny(rustdoc::broken_intra_doc_links)]

pub use brpc_client::{self as client, Client, ClientState, ConnectError, Disconnect};
pub use brpc_core::{
    self as core, Channel, ConnectionError, ConnectionId, ConnectionOptions, Labels, Peer, Router,
    tls,
};
pub use brpc_server::{
    self as server, BroadcastOptions, BroadcastResult, LabelChannel, PeerEvent, Registry, Server,
    broadcast,
};
