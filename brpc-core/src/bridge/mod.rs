//! The tonic bridge: [`Channel`] lets any tonic-generated client call the other
//! side; [`Router`] dispatches ttrpc calls into tonic-generated servers.

mod channel;
pub(crate) mod grpc;
mod router;

pub use channel::Channel;
pub use router::{BoxedService, CallLayer, HostedService, Router};
