//! brpc-client: dial a brpc server once, say Hello, host this side's services on
//! the same connection, and call the server through [`Client::channel`].
//!
//! Calls in both directions run on `brpc-core`'s engine; this crate adds only
//! the dialing role's policy (trust, name and labels, time limits).
//!
//! ```no_run
//! # async fn run(cert: brpc_core::rustls::pki_types::CertificateDer<'static>) -> Result<(), Box<dyn std::error::Error>> {
//! use brpc_client::Client;
//! let client = Client::builder()
//!     .name("agent-7")
//!     .label("region", "eu")
//!     // .add_service(NamerServer::new(MyNamer))
//!     .pin_certificate(cert)
//!     .connect("127.0.0.1:4433")
//!     .await?;
//! println!("connected as {}", client.connection_id());
//! // let mut greeter = GreeterClient::new(client.channel());
//! # Ok(()) }
//! ```

#![deny(rustdoc::broken_intra_doc_links)]

mod client;

pub use brpc_core::{Channel, ConnectionId, Peer, Router};
pub use client::{Builder, Client, ClientState, ConnectError, Disconnect};
