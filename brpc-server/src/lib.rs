//! brpc-server: bind a QUIC endpoint, accept agents, run the Hello handshake,
//! assign connection ids and keep the [`Registry`] of who is connected, with
//! connect/disconnect events, fan-out [`broadcast`] and graceful shutdown.
//!
//! Every call in either direction is handled by `brpc-core`'s engine; this crate
//! adds no protocol logic, only the accepting role's policy (ids, time limits,
//! bookkeeping).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use brpc_server::Server;
//! let server = Server::builder()
//!     // .add_service(GreeterServer::new(MyGreeter))
//!     .bind("127.0.0.1:4433")?;
//! for peer in server.peers().list() {
//!     println!("{} {} {:?}", peer.connection_id(), peer.name(), peer.labels());
//! }
//! # Ok(()) }
//! ```

#![deny(rustdoc::broken_intra_doc_links)]

pub mod admin;
mod broadcast;
mod registry;
mod select;
mod server;
mod state;
mod unix;

pub use admin::AdminAccess;
#[doc(hidden)]
pub use broadcast::adaptive_unordered;
pub use broadcast::{BroadcastOptions, BroadcastResult, broadcast};
pub use brpc_core::{ConnectionId, Peer, Router};
pub use registry::{PeerEvent, Registry};
pub use select::LabelChannel;
pub use server::{BindError, Builder, Server};
pub use state::{Admission, AdmissionStats};
