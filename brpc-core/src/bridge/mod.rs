//! The tonic bridge, an adapter at the edge of the engine: [`Channel`] lets
//! any tonic-generated client call the other side (through the engine's
//! [`Peer::start_call`](crate::Peer::start_call)); [`Router`] dispatches
//! served calls into tonic-generated servers (as the engine's
//! [`Handler`](crate::conn::Handler)). It opens no streams and keeps no
//! deadline logic: both are the engine's. [`direct`] serves and calls the
//! same tonic-generated traits with no http types at all (what `brpc-build`
//! generates code for).

mod channel;
pub mod direct;
pub(crate) mod grpc;
mod router;
mod serve;

pub use channel::Channel;
pub use router::{BoxedService, CallLayer, HostedService, Router};
