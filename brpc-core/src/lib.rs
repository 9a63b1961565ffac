//! brpc-core: everything both ends of a brpc connection share.
//!
//! - [`wire`]: the ttrpc frame codec, envelopes and the whole per-call
//!   machine ([`wire::Call`]: what arrives, what may be sent when, timers),
//!   sans-IO (no sockets, tasks or clocks), tested and fuzzed with bytes alone.
//! - [`conn`]: the engine used by both roles: a [`Peer`] handle to open
//!   calls and [`serve`] to answer them through a [`conn::Handler`]; the only
//!   role difference is [`Side`]. No http types inside.
//! - [`bridge`]: tonic at the edge: [`Channel`] for generated clients,
//!   [`Router`] (a handler) for generated servers.
//! - [`session`]: the `brpc.v1.Session` messages and policy (Hello, GoAway).
//! - [`tls`], [`metadata`]: TLS 1.3 configs and metadata mapping ([`status`]
//!   mapping lives in [`wire`]).
//!
//! Binding, accepting, dialing and the registry live in `brpc-server` and
//! `brpc-client`, which add no protocol logic of their own.

#![deny(rustdoc::broken_intra_doc_links)]

pub mod bridge;
pub mod bytestream;
pub mod conn;
pub mod metadata;
// Plumbing the role crates use, not for applications (as tonic's `codegen`).
#[doc(hidden)]
pub mod session;
pub mod tls;
pub mod wire;

pub use bridge::{Channel, Router, direct};
pub use conn::{
    CallLimits, ConnectionError, ConnectionId, ConnectionOptions, Labels, Peer, PeerInfo, Side,
    TransportOptions,
};
pub use session::serve;
pub use wire::{DEFAULT_MAX_MESSAGE_SIZE, status};

/// Re-exported so users name one version of each.
pub use {quinn, rustls, tonic};
