//! What a running server's tasks share: its settings and registry
//! ([`Shared`]), and the guards that keep its bookkeeping right however a
//! connection task ends. The QUIC and Unix accept loops both build on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use brpc_core::conn::{MemoryBudget, UnixCredentials, codes};
use brpc_core::tls::PeerIdentity;
use brpc_core::{CallLimits, Labels, Peer, Router, TransportOptions};
use quinn::Endpoint;
use tonic::Status;

use crate::Registry;

/// A check of a Unix peer's credentials (see [`Builder::require_unix_credentials`]).
pub(crate) type CredentialCheck = Arc<dyn Fn(&UnixCredentials) -> bool + Send + Sync>;

/// What the server knows of a client when deciding whether to admit it.
#[derive(Debug)]
pub struct Admission<'a> {
    /// The name the client sent in Hello.
    pub name: &'a str,
    /// The labels the client sent in Hello.
    pub labels: &'a Labels,
    /// The client's verified certificate identity (mutual TLS only).
    pub identity: Option<&'a PeerIdentity>,
    /// The client's UDP address.
    pub remote_address: SocketAddr,
}

pub(crate) type Authorize = Arc<dyn Fn(&Admission<'_>) -> Result<(), Status> + Send + Sync>;

/// What every task of a running server shares.
pub(crate) struct Shared {
    /// The QUIC endpoint (`None`: a server on Unix sockets only).
    pub(crate) endpoint: Option<Endpoint>,
    pub(crate) registry: Registry,
    /// The admin service, when enabled.
    pub(crate) admin: Option<Arc<crate::admin::Admin>>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) router: Router,
    pub(crate) hello_timeout: Duration,
    pub(crate) max_hello_size: usize,
    pub(crate) limits: CallLimits,
    pub(crate) next_id: AtomicU64,
    pub(crate) authorize: Option<Authorize>,
    pub(crate) max_connections: usize,
    /// Connections past the accept step and not yet ended.
    pub(crate) connections: Arc<AtomicUsize>,
    /// Permits for TLS handshakes in progress (`Builder::max_handshakes`).
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
    /// Most connections waiting for a handshake permit.
    pub(crate) max_waiting: usize,
    /// Connections waiting for a handshake permit.
    pub(crate) waiting: Arc<AtomicUsize>,
    pub(crate) transport: TransportOptions,
    /// Inbound bytes being received, across all connections.
    pub(crate) buffer_total: MemoryBudget,
    /// Which Unix clients are admitted.
    pub(crate) unix_check: Option<CredentialCheck>,
}

/// Removes a peer from the registry however its task ends (even if aborted).
pub(crate) struct Listed {
    pub(crate) shared: Arc<Shared>,
    pub(crate) peer: Peer,
}

impl Drop for Listed {
    fn drop(&mut self) {
        // A task that ends before its connection (the server stopped
        // serving it) closes it, so that the event says how it ended.
        if !self.peer.is_closed() {
            self.peer
                .close(codes::CONN_NORMAL, "the server stopped serving it");
        }
        if let Some(reason) = self.peer.close_reason() {
            self.shared
                .registry
                .remove(self.peer.connection_id(), reason);
        }
    }
}

/// Holds one place in a count (connections, waiting handshakes) for as
/// long as it lives.
pub(crate) struct Counted(pub(crate) Arc<AtomicUsize>);

impl Counted {
    /// Takes a place in `count`.
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
