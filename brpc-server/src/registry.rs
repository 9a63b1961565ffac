//! The registry of connected peers, keyed by connection id, and the stream of
//! connect/disconnect events.
//!
//! A peer is listed from the moment its Hello is accepted until its connection
//! closes. Reads are cheap and never wait on network I/O.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use brpc_core::{ConnectionError, ConnectionId, Peer};
use tokio::sync::broadcast;

/// A change in who is connected.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A peer completed Hello and is listed.
    Connected(Peer),
    /// A listed peer's connection closed; it is no longer listed.
    Disconnected {
        /// The handle it had (its calls now fail with `UNAVAILABLE`).
        peer: Peer,
        /// How the connection ended.
        reason: ConnectionError,
    },
}

impl PeerEvent {
    /// The peer the event is about.
    pub fn peer(&self) -> &Peer {
        match self {
            PeerEvent::Connected(peer) | PeerEvent::Disconnected { peer, .. } => peer,
        }
    }
}

/// The server's connected peers. Cheap to clone; all clones see the same set.
///
/// ```no_run
/// # async fn run(server: &brpc_server::Server) {
/// use brpc_server::PeerEvent;
/// let peers = server.peers();
/// for peer in peers.select_label("region", "eu") {
///     println!("{} {} {:?}", peer.connection_id(), peer.name(), peer.remote_address());
/// }
/// // Wait for an agent with role=db, then call it:
/// let db = peers.wait_for_labels([("role", "db")]).await;
/// // let mut agent = db.client(AgentClient::new);
/// let mut events = peers.subscribe();
/// while let Ok(event) = events.recv().await {
///     match event {
///         PeerEvent::Connected(peer) => println!("+ {}", peer.name()),
///         PeerEvent::Disconnected { peer, reason } => println!("- {}: {reason}", peer.name()),
///     }
/// }
/// # drop(db); }
/// ```
#[derive(Clone, Debug)]
pub struct Registry {
    peers: Arc<RwLock<HashMap<ConnectionId, Peer>>>,
    events: broadcast::Sender<PeerEvent>,
}

impl Registry {
    /// An empty registry whose event subscribers may fall `capacity` events
    /// behind before they miss some.
    pub(crate) fn new(capacity: usize) -> Self {
        Registry {
            peers: Arc::default(),
            events: broadcast::Sender::new(capacity.max(1)),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ConnectionId, Peer>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (insert/remove are single operations), so a poisoned lock is still usable.
        self.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ConnectionId, Peer>> {
        self.peers.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Every connected peer, ordered by connection id.
    pub fn list(&self) -> Vec<Peer> {
        self.select(|_| true)
    }

    /// The peer with this connection id, if still connected.
    pub fn get(&self, id: ConnectionId) -> Option<Peer> {
        self.read().get(&id).cloned()
    }

    /// Peers for which `filter` holds, ordered by connection id.
    pub fn select(&self, mut filter: impl FnMut(&Peer) -> bool) -> Vec<Peer> {
        let mut peers: Vec<Peer> = self
            .read()
            .values()
            .filter(|p| filter(p))
            .cloned()
            .collect();
        peers.sort_by_key(Peer::connection_id);
        peers
    }

    /// The `turn`-th (modulo their number) of the peers for which `filter`
    /// holds, in the map's order, which stays the same while nobody connects
    /// or leaves; cloning only that one. `None` if none matches.
    pub(crate) fn nth_matching(&self, filter: impl Fn(&Peer) -> bool, turn: usize) -> Option<Peer> {
        let peers = self.read();
        let count = peers.values().filter(|p| filter(p)).count();
        if count == 0 {
            return None;
        }
        peers
            .values()
            .filter(|p| filter(p))
            .nth(turn % count)
            .cloned()
    }

    /// Peers whose label `key` equals `value`.
    pub fn select_label(&self, key: &str, value: &str) -> Vec<Peer> {
        self.select(|p| p.label(key) == Some(value))
    }

    /// Number of connected peers.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no peer is connected.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Connect and disconnect events from now on, each exactly once. A
    /// subscriber that falls more than the server's `event_capacity` behind
    /// gets `RecvError::Lagged` and misses the oldest.
    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    pub(crate) fn insert(&self, peer: Peer) {
        self.write().insert(peer.connection_id(), peer.clone());
        metrics::gauge!("brpc_connected_peers").increment(1.0);
        let _ = self.events.send(PeerEvent::Connected(peer));
    }

    pub(crate) fn remove(&self, id: ConnectionId, reason: ConnectionError) {
        let removed = self.write().remove(&id);
        if let Some(peer) = removed {
            metrics::gauge!("brpc_connected_peers").decrement(1.0);
            let _ = self.events.send(PeerEvent::Disconnected { peer, reason });
        }
    }
}
