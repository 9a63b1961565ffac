//! The registry of connected peers, keyed by connection id.
//!
//! A peer is listed from the moment its Hello is answered until its connection
//! closes. Reads are cheap and never wait on network I/O.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use brpc_core::{ConnectionId, Peer};

/// The server's connected peers. Cheap to clone; all clones see the same set.
#[derive(Clone, Default, Debug)]
pub struct Registry {
    peers: Arc<RwLock<HashMap<ConnectionId, Peer>>>,
}

impl Registry {
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
        let mut peers: Vec<Peer> = self.read().values().cloned().collect();
        peers.sort_by_key(Peer::connection_id);
        peers
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

    pub(crate) fn insert(&self, peer: Peer) {
        self.write().insert(peer.connection_id(), peer);
    }

    pub(crate) fn remove(&self, id: ConnectionId) {
        self.write().remove(&id);
    }
}
