//! The registry of connected peers, keyed by connection id, and the stream of
//! connect/disconnect events.
//!
//! A peer is listed from the moment its Hello is accepted until its connection
//! closes. Reads are cheap and never wait on network I/O. Built for fleets:
//! a lookup by id is a hash lookup, a selection by label reads an index of
//! the peers with that label (not every peer), and [`Registry::page`] lists
//! in pages instead of cloning every handle. Events are sent without ever
//! waiting for a subscriber, so a slow one never holds up accepting.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use brpc_core::{ConnectionError, ConnectionId, Labels, Peer};
use tokio::sync::broadcast;

/// A change in who is connected.
#[derive(Debug, Clone)]
#[non_exhaustive]
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
///         _ => {} // kinds of event a later version adds
///     }
/// }
/// # drop(db); }
/// ```
#[derive(Clone, Debug)]
pub struct Registry {
    table: Arc<RwLock<Table<Peer>>>,
    events: broadcast::Sender<PeerEvent>,
}

/// What the registry's table needs of an entry (a [`Peer`]; the tests list
/// lighter ones).
pub(crate) trait Entry: Clone {
    fn id(&self) -> ConnectionId;
    fn labels(&self) -> &Labels;
}

impl Entry for Peer {
    fn id(&self) -> ConnectionId {
        self.connection_id()
    }

    fn labels(&self) -> &Labels {
        Peer::labels(self)
    }
}

/// The entries by id, their ids in order, and for every label `key=value`
/// the ordered ids of the entries carrying it.
#[derive(Debug)]
pub(crate) struct Table<E> {
    by_id: HashMap<ConnectionId, E>,
    order: BTreeSet<ConnectionId>,
    by_label: HashMap<String, HashMap<String, BTreeSet<ConnectionId>>>,
}

impl<E> Default for Table<E> {
    fn default() -> Self {
        Table {
            by_id: HashMap::new(),
            order: BTreeSet::new(),
            by_label: HashMap::new(),
        }
    }
}

impl<E: Entry> Table<E> {
    pub(crate) fn insert(&mut self, entry: E) {
        let id = entry.id();
        // Ids are never reused; should one be, the old entry goes first.
        self.remove(id);
        for (key, value) in entry.labels() {
            self.by_label
                .entry(key.clone())
                .or_default()
                .entry(value.clone())
                .or_default()
                .insert(id);
        }
        self.order.insert(id);
        self.by_id.insert(id, entry);
    }

    pub(crate) fn remove(&mut self, id: ConnectionId) -> Option<E> {
        let entry = self.by_id.remove(&id)?;
        self.order.remove(&id);
        for (key, value) in entry.labels() {
            if let Some(values) = self.by_label.get_mut(key) {
                if let Some(ids) = values.get_mut(value) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        values.remove(value);
                    }
                }
                if values.is_empty() {
                    self.by_label.remove(key);
                }
            }
        }
        Some(entry)
    }

    pub(crate) fn get(&self, id: ConnectionId) -> Option<&E> {
        self.by_id.get(&id)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Up to `limit` entries after `after` (from the start with `None`), in
    /// id order.
    pub(crate) fn page(&self, after: Option<ConnectionId>, limit: usize) -> Vec<E> {
        self.page_with_labels(std::iter::empty(), after, limit)
    }

    /// Up to `limit` entries carrying every label of `labels` with ids
    /// after `after`, in id order, cloning only the entries returned.
    pub(crate) fn page_with_labels<'a>(
        &self,
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        after: Option<ConnectionId>,
        limit: usize,
    ) -> Vec<E> {
        self.matching(labels, after)
            .filter_map(|id| self.by_id.get(&id).cloned())
            .take(limit)
            .collect()
    }

    /// The ordered ids of the entries carrying every label of `labels`
    /// (all ids for none).
    pub(crate) fn ids_with<'a>(
        &self,
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<ConnectionId> {
        self.matching(labels, None).collect()
    }

    /// The ids after `after` of the entries carrying every label of
    /// `labels` (all entries for none), in order: read from the smallest of
    /// the labels' index sets from `after` on, as far as they are taken.
    fn matching<'a>(
        &self,
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        after: Option<ConnectionId>,
    ) -> impl Iterator<Item = ConnectionId> + '_ {
        let mut sets = Vec::new();
        let mut unknown = false;
        for (key, value) in labels {
            match self.by_label.get(key).and_then(|values| values.get(value)) {
                Some(ids) => sets.push(ids),
                None => unknown = true,
            }
        }
        sets.sort_by_key(|ids| ids.len());
        // A label no entry carries: nothing matches.
        let smallest = (!unknown).then(|| sets.first().copied().unwrap_or(&self.order));
        let rest: Vec<&BTreeSet<ConnectionId>> = sets.into_iter().skip(1).collect();
        let start = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        smallest
            .into_iter()
            .flat_map(move |ids| ids.range((start, Bound::Unbounded)))
            .filter(move |id| rest.iter().all(|ids| ids.contains(id)))
            .copied()
    }

    /// The entries carrying every label of `labels`, in id order.
    pub(crate) fn with_labels<'a>(
        &self,
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<E> {
        self.ids_with(labels)
            .iter()
            .filter_map(|id| self.by_id.get(id).cloned())
            .collect()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &E> {
        self.order.iter().filter_map(|id| self.by_id.get(id))
    }
}

/// Labels asked for: every pair must be carried. A list, not a map: two
/// values asked for one key match no peer (none carries both), rather
/// than the last one winning.
pub(crate) type Wanted = Vec<(String, String)>;

/// Label pairs of any string types as [`Wanted`].
pub(crate) fn collect<K: Into<String>, V: Into<String>>(
    labels: impl IntoIterator<Item = (K, V)>,
) -> Wanted {
    labels
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

/// `labels` as the string pairs the table looks up.
fn pairs(labels: &[(String, String)]) -> impl Iterator<Item = (&str, &str)> {
    labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

impl Registry {
    /// An empty registry whose event subscribers may fall `capacity` events
    /// behind before they miss some.
    pub(crate) fn new(capacity: usize) -> Self {
        Registry {
            table: Arc::default(),
            events: broadcast::Sender::new(capacity.max(1)),
        }
    }

    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, Table<Peer>> {
        // A panic while holding the lock cannot leave the table half-updated
        // (insert and remove do not call out), so a poisoned lock is still usable.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table<Peer>> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Every connected peer, ordered by connection id. This clones every
    /// handle: with a large fleet, go through [`page`](Self::page) instead.
    pub fn list(&self) -> Vec<Peer> {
        self.read().values().cloned().collect()
    }

    /// Up to `limit` connected peers with ids after `after` (from the first
    /// with `None`), ordered by connection id: pass the last id of one page
    /// to get the next. Peers that connect or leave between pages are seen
    /// or not by id order; no peer is listed twice.
    ///
    /// ```no_run
    /// # fn run(server: &brpc_server::Server) {
    /// let mut after = None;
    /// loop {
    ///     let page = server.peers().page(after, 1000);
    ///     let Some(last) = page.last() else { break };
    ///     after = Some(last.connection_id());
    ///     for peer in &page { println!("{} {}", peer.connection_id(), peer.name()); }
    /// }
    /// # }
    /// ```
    pub fn page(&self, after: Option<ConnectionId>, limit: usize) -> Vec<Peer> {
        self.read().page(after, limit)
    }

    /// The peer with this connection id, if still connected.
    pub fn get(&self, id: ConnectionId) -> Option<Peer> {
        self.read().get(id).cloned()
    }

    /// Peers for which `filter` holds, ordered by connection id. This looks
    /// at every peer; to select by labels, [`select_labels`](Self::select_labels)
    /// reads an index instead.
    ///
    /// `filter` runs while the registry is read-locked, so that the peers
    /// are not cloned first: it must not call back into the registry (a
    /// connection being listed meanwhile waits for the lock, and a second
    /// read can then deadlock), and it holds up listing while it runs.
    pub fn select(&self, mut filter: impl FnMut(&Peer) -> bool) -> Vec<Peer> {
        self.read()
            .values()
            .filter(|p| filter(p))
            .cloned()
            .collect()
    }

    /// A peer with all of `labels` for which `filter` holds: the first
    /// after `after` in id order, or failing that the first from the start
    /// (so successive calls, each after the last one found, go round
    /// them), cloning only that one. It reads the label index from `after`
    /// on, not every match. `None` if none matches.
    pub(crate) fn next_matching(
        &self,
        labels: &[(String, String)],
        filter: impl Fn(&Peer) -> bool,
        after: Option<ConnectionId>,
    ) -> Option<Peer> {
        let table = self.read();
        let first_after = |after| {
            table
                .matching(pairs(labels), after)
                .filter_map(|id| table.get(id))
                .find(|p| filter(p))
        };
        first_after(after)
            .or_else(|| after.and_then(|_| first_after(None)))
            .cloned()
    }

    /// Peers whose label `key` equals `value`, ordered by connection id
    /// (read from the label index).
    pub fn select_label(&self, key: &str, value: &str) -> Vec<Peer> {
        self.read().with_labels([(key, value)])
    }

    /// Peers carrying every one of `labels`, ordered by connection id (read
    /// from the label index).
    pub fn select_labels<K, V>(&self, labels: impl IntoIterator<Item = (K, V)>) -> Vec<Peer>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let labels = collect(labels);
        self.read().with_labels(pairs(&labels))
    }

    /// [`page`](Self::page) of the peers carrying every one of `labels`
    /// (all peers for none): up to `limit` of them with ids after `after`,
    /// read from the label index and cloning only the peers returned: a page
    /// reads the smallest of the labels' index sets from `after` up to its
    /// last match, not every match before it.
    pub fn page_with_labels<K, V>(
        &self,
        labels: impl IntoIterator<Item = (K, V)>,
        after: Option<ConnectionId>,
        limit: usize,
    ) -> Vec<Peer>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let labels = collect(labels);
        self.read().page_with_labels(pairs(&labels), after, limit)
    }

    /// Number of connected peers.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no peer is connected.
    pub fn is_empty(&self) -> bool {
        self.read().len() == 0
    }

    /// Connect and disconnect events from now on, each exactly once. A
    /// subscriber that falls more than the server's `event_capacity` behind
    /// gets `RecvError::Lagged` and misses the oldest; sending never waits
    /// for a subscriber.
    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    pub(crate) fn insert(&self, peer: Peer) {
        self.write().insert(peer.clone());
        metrics::gauge!("brpc_connected_peers").increment(1.0);
        let _ = self.events.send(PeerEvent::Connected(peer));
    }

    pub(crate) fn remove(&self, id: ConnectionId, reason: ConnectionError) {
        let removed = self.write().remove(id);
        if let Some(peer) = removed {
            metrics::gauge!("brpc_connected_peers").decrement(1.0);
            let _ = self.events.send(PeerEvent::Disconnected { peer, reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listed entry without a connection.
    #[derive(Clone, Debug)]
    struct Fake {
        id: ConnectionId,
        labels: Labels,
    }

    impl Entry for Fake {
        fn id(&self) -> ConnectionId {
            self.id
        }

        fn labels(&self) -> &Labels {
            &self.labels
        }
    }

    const REGIONS: [&str; 4] = ["eu", "us", "ap", "sa"];

    /// Entry `i`: region by `i % 4`, role db for every tenth, the rest app.
    fn fake(i: u64) -> Fake {
        let role = if i.is_multiple_of(10) { "db" } else { "app" };
        Fake {
            id: ConnectionId(i),
            labels: Labels::from([
                ("region".to_owned(), REGIONS[(i % 4) as usize].to_owned()),
                ("role".to_owned(), role.to_owned()),
            ]),
        }
    }

    fn ids(entries: &[Fake]) -> Vec<u64> {
        entries.iter().map(|e| e.id.0).collect()
    }

    #[test]
    fn ten_thousand_entries_are_selected_by_label_and_listed_in_pages() {
        let mut table = Table::default();
        // Inserted out of order: listing is by id whatever the order.
        for i in (1..=10_000).rev() {
            table.insert(fake(i));
        }
        assert_eq!(table.len(), 10_000);
        assert_eq!(table.get(ConnectionId(4242)).map(|e| e.id.0), Some(4242));
        assert!(table.get(ConnectionId(10_001)).is_none());

        let eu = table.with_labels([("region", "eu")]);
        let want: Vec<u64> = (1..=10_000).filter(|i| i % 4 == 0).collect();
        assert_eq!(ids(&eu), want);

        let both = collect([("region", "eu"), ("role", "db")]);
        let want: Vec<u64> = (1..=10_000).filter(|i| i % 20 == 0).collect();
        assert_eq!(ids(&table.with_labels(pairs(&both))), want);
        assert!(table.with_labels([("region", "mars")]).is_empty());
        assert!(table.with_labels([("zone", "eu")]).is_empty());
        assert_eq!(table.with_labels(pairs(&[])).len(), 10_000);
        // Two values for one key: no entry carries both.
        let two_regions = collect([("region", "eu"), ("region", "us")]);
        assert!(table.with_labels(pairs(&two_regions)).is_empty());

        // Pages of 999 cover every id once, in order.
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let page = table.page(after, 999);
            assert!(page.len() <= 999);
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            listed.extend(ids(&page));
        }
        assert_eq!(listed, (1..=10_000).collect::<Vec<_>>());
        assert_eq!(
            ids(&table.page(Some(ConnectionId(9_998)), 10)),
            [9_999, 10_000]
        );

        // Pages of the entries with both labels, 33 at a time, cover each
        // match once, in order, and nothing else.
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let page = table.page_with_labels(pairs(&both), after, 33);
            assert!(page.len() <= 33);
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            listed.extend(ids(&page));
        }
        assert_eq!(
            listed,
            (1..=10_000).filter(|i| i % 20 == 0).collect::<Vec<_>>()
        );
        assert_eq!(
            ids(&table.page_with_labels([("region", "eu")], Some(ConnectionId(9_990)), 10)),
            [9_992, 9_996, 10_000]
        );
        assert!(
            table
                .page_with_labels([("region", "mars")], None, 10)
                .is_empty()
        );
        assert_eq!(
            ids(&table.page_with_labels(pairs(&[]), Some(ConnectionId(5)), 3)),
            [6, 7, 8]
        );
    }

    #[test]
    fn removed_entries_leave_the_index_and_the_pages() {
        let mut table = Table::default();
        for i in 1..=10_000 {
            table.insert(fake(i));
        }
        // Every even id leaves.
        for i in (2..=10_000).step_by(2) {
            assert!(table.remove(ConnectionId(i)).is_some());
        }
        assert!(table.remove(ConnectionId(2)).is_none());
        assert_eq!(table.len(), 5_000);
        // Region eu (i % 4 == 0) held only even ids: its index entry is gone.
        assert!(table.with_labels([("region", "eu")]).is_empty());
        assert!(!table.by_label["region"].contains_key("eu"));
        let us = table.with_labels([("region", "us")]);
        assert_eq!(
            ids(&us),
            (1..=10_000).filter(|i| i % 4 == 1).collect::<Vec<_>>()
        );
        let listed = table.page(None, usize::MAX);
        assert_eq!(ids(&listed), (1..=10_000).step_by(2).collect::<Vec<_>>());
        for i in (1..=10_000).step_by(2) {
            table.remove(ConnectionId(i));
        }
        assert!(table.by_label.is_empty());
        assert!(table.order.is_empty());
    }
}
