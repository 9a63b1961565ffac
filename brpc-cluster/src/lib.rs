//! brpc-cluster: several brpc servers (nodes) serve one fleet. Each node
//! registers itself and its agents in a directory on Redis, and any node
//! can call any agent: a call to an agent on another node goes over a brpc
//! link to that node, whose admin relay carries it on to the agent frame by
//! frame (nothing is decoded on the way).
//!
//! - Connection ids name their node in the top 16 bits
//!   ([`ConnectionId::node`]), so routing a call by id needs no lookup.
//! - The directory holds, per node, its address and its agents (id, name,
//!   labels, identity) with a label index, all with a TTL the node refreshes
//!   (default 15 s): a node that dies silently is gone from it within the
//!   TTL; [`Cluster::leave`] removes it at once. Connects and disconnects
//!   are published on Redis pub/sub ([`Cluster::subscribe`]).
//! - Node-to-node links are brpc clients with mutual TLS: each node presents
//!   a certificate from the cluster CA naming the node identity, which the
//!   other nodes' admin service authorises.
//! - [`Cluster::peer`], [`Cluster::select`] and [`Cluster::broadcast`] give
//!   [`ClusterPeer`]s, whose typed clients (`peer.client(AgentClient::new)`)
//!   are the same whether the agent is local or not.
//!
//! Why the `redis` crate: it is the most used Rust Redis client, kept by
//! the redis-rs project, and its `ConnectionManager` reconnects on its own,
//! which is what lets a node ride out a Redis restart.
//!
//! ```no_run
//! # async fn run(tls: brpc_cluster::NodeTls) -> Result<(), Box<dyn std::error::Error>> {
//! use brpc_cluster::{Cluster, ClusterConfig};
//! let config = ClusterConfig::new(1, "redis://127.0.0.1:6379/", tls);
//! let server = config
//!     .server_builder(brpc::Server::builder())
//!     .bind("0.0.0.0:4433")?;
//! let cluster = Cluster::join(&server, config).await?;
//! for agent in cluster.select(&[("region", "eu")]).await? {
//!     // let facts = agent.client(AgentClient::new).facts(FactsRequest {}).await?;
//!     println!("{} on node {}", agent.name(), agent.node());
//! }
//! # Ok(()) }
//! ```
//!
//! The Redis keys are described in README ("Cluster").

#![deny(rustdoc::broken_intra_doc_links)]

mod directory;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use brpc_client::Client;
use brpc_core::{Channel, ConnectionId, Labels, Peer};
use brpc_server::admin::RELAY_TO;
use brpc_server::{AdminAccess, BroadcastOptions, Registry, Server};
use futures_util::StreamExt;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::broadcast;
use tonic::Status;
use tonic::body::Body;

use directory::Directory;

/// The label a node's link announces in Hello (its node id): links are not
/// agents, and are left out of the directory.
pub use brpc_server::admin::NODE_LABEL;

/// How the nodes of a cluster know each other: the cluster CA, and this
/// node's certificate from it, which must carry `identity` (its common
/// name, a DNS name or a URI, e.g. `spiffe://fleet/node`) and be valid for
/// both server and client use.
pub struct NodeTls {
    /// Trusted to issue node certificates (and, as agents see it, the
    /// nodes' server certificates).
    pub roots: RootCertStore,
    /// This node's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// The identity every node certificate carries.
    pub identity: String,
}

impl Clone for NodeTls {
    fn clone(&self) -> Self {
        NodeTls {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
        }
    }
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// One node's cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    name: String,
    node_id: u16,
    redis_url: String,
    advertise: Option<SocketAddr>,
    server_name: Option<String>,
    ttl: Duration,
    tls: NodeTls,
    admin: AdminAccess,
}

impl ClusterConfig {
    /// Node `node_id` (unique in the cluster, not 0) of the cluster whose
    /// directory is the Redis at `redis_url` (`redis://host:port/`).
    pub fn new(node_id: u16, redis_url: impl Into<String>, tls: NodeTls) -> Self {
        ClusterConfig {
            name: "brpc".into(),
            node_id,
            redis_url: redis_url.into(),
            advertise: None,
            server_name: None,
            ttl: Duration::from_secs(15),
            admin: AdminAccess::new(),
            tls,
        }
    }

    /// The cluster's name, the prefix of its Redis keys (default `brpc`):
    /// several clusters can share one Redis.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How long a node's directory entries outlive its last heartbeat
    /// (default 15 s; heartbeats every third of it). A node restarted after
    /// a crash, its entries still there, waits a third of it and a sixth
    /// (at least a second) to join (see [`Cluster::join`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// The address other nodes dial this one at (default: the server's own
    /// local address, right when it is bound to a specific address).
    pub fn advertise(mut self, addr: SocketAddr) -> Self {
        self.advertise = Some(addr);
        self
    }

    /// The name other nodes check this node's certificate against (default:
    /// the advertised IP address).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Who else may use this node's admin service (operators, brpcctl);
    /// the other nodes always may.
    pub fn admin(mut self, access: AdminAccess) -> Self {
        self.admin = access;
        self
    }

    /// What the node's server needs to be part of the cluster: its node id
    /// (connection ids name it), client certificates verified against the
    /// cluster CA when presented (nodes present one; agents need not), and
    /// the admin service open to the other nodes, whose relay carries their
    /// calls to this node's agents. Replaces an earlier `admin` setting:
    /// give operators' access to [`ClusterConfig::admin`]. It also replaces
    /// an earlier `client_ca`: client certificates become optional, checked
    /// against the cluster CA (agents that must present one need it from
    /// that CA, and an `authorize` hook to insist on it).
    pub fn server_builder(&self, builder: brpc_server::Builder) -> brpc_server::Builder {
        builder
            .node_id(self.node_id)
            .certificate(self.tls.chain.clone(), self.tls.key.clone_key())
            .optional_client_ca(self.tls.roots.clone())
            .admin(self.admin.clone().identity(self.tls.identity.clone()))
    }
}

/// What went wrong joining a cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The Redis URL does not parse.
    #[error("bad Redis URL {url:?}: {source}")]
    RedisUrl {
        /// The URL given.
        url: String,
        /// What the client said.
        source: redis::RedisError,
    },
    /// Redis did not answer.
    #[error(
        "cannot reach the cluster directory at {url}: {source}; start Redis there \
         (e.g. `redis-server --port 6379`) or fix the URL"
    )]
    RedisUnreachable {
        /// The URL given.
        url: String,
        /// What the client said.
        source: redis::RedisError,
    },
    /// Node id 0 is the id of a server outside any cluster.
    #[error("node id 0 is reserved; give every node of the cluster its own id from 1")]
    NodeIdZero,
    /// Another live process is this node: its directory entry was written
    /// again while this one waited to join, or another process took the id
    /// first (of two taking over one id, or between the claim and the
    /// first write).
    #[error(
        "node id {node} is in use by another live process (listening at {}); give every node \
         of the cluster its own id, or stop the other process",
        addr.as_deref().unwrap_or("an address its entry does not give")
    )]
    NodeIdInUse {
        /// The id asked for.
        node: u16,
        /// Where the process holding it listens, if its entry says.
        addr: Option<String>,
    },
    /// The server listens on an unspecified address and none was advertised.
    #[error(
        "the server listens on {0}, which other nodes cannot dial: set ClusterConfig::advertise"
    )]
    NoAdvertiseAddress(SocketAddr),
}

/// A connect or disconnect anywhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    /// Whether the agent connected (`true`) or disconnected.
    pub connected: bool,
    /// The node it is (was) connected to.
    pub node: u16,
    /// Its connection id.
    pub id: ConnectionId,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
}

/// This node's membership of a cluster. Dropping it stops the heartbeats
/// (as a crash would: the node's entries expire after the TTL);
/// [`Cluster::leave`] removes them at once.
pub struct Cluster {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.node_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    node_id: u16,
    registry: Registry,
    directory: Directory,
    tls: NodeTls,
    links: std::sync::Mutex<HashMap<u16, Link>>,
    events: broadcast::Sender<ClusterEvent>,
}

/// A brpc client to another node.
struct Link {
    addr: String,
    client: Arc<Client>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Cluster {
    /// Joins the cluster as the node `server` runs (built with
    /// [`ClusterConfig::server_builder`]): registers the node and its
    /// agents in Redis, keeps them there, and starts listening for the
    /// other nodes' events.
    ///
    /// Two processes must not be one node. If the directory still has an
    /// entry for this node id, `join` watches it for one heartbeat period
    /// (a third of the TTL) and a margin (a sixth of it, at least a
    /// second): an entry left by a process that ended without leaving (a
    /// crash) is not written again, and this process takes the id over;
    /// one that is belongs to a live node, and `join` fails with
    /// [`ClusterError::NodeIdInUse`]. A node restarted after
    /// [`Cluster::leave`] finds no entry and joins at once. After joining,
    /// a node whose heartbeat finds its id held by another process (its
    /// heartbeat came later than that margin, cut off from Redis or
    /// stalled, and the id was taken over) stops writing to the directory
    /// and logs an error; its `leave` removes nothing while the other's
    /// entry is there. Every node of a cluster must run a brpc-cluster with
    /// this check: an older node's entry does not change at its heartbeats,
    /// and a newer process would take its id over.
    ///
    /// # Errors
    /// [`ClusterError`]: Redis unreachable, a bad URL, node id 0, the id in
    /// use by a live node, no address to advertise.
    pub async fn join(server: &Server, config: ClusterConfig) -> Result<Cluster, ClusterError> {
        if config.node_id == 0 {
            return Err(ClusterError::NodeIdZero);
        }
        let advertise = config.advertise.unwrap_or_else(|| server.local_addr());
        if advertise.ip().is_unspecified() {
            return Err(ClusterError::NoAdvertiseAddress(advertise));
        }
        let server_name = config
            .server_name
            .clone()
            .unwrap_or_else(|| advertise.ip().to_string());
        let directory = Directory::connect(
            &config.redis_url,
            &config.name,
            config.node_id,
            config.ttl,
            directory::NodeAddress {
                addr: advertise.to_string(),
                server_name,
                identity: config.tls.identity.clone(),
            },
        )
        .await?;
        let unreachable = |source| ClusterError::RedisUnreachable {
            url: config.redis_url.clone(),
            source,
        };
        if let directory::Claim::InUse { addr } = directory.claim().await.map_err(unreachable)? {
            return Err(ClusterError::NodeIdInUse {
                node: config.node_id,
                addr,
            });
        }
        let (events, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            node_id: config.node_id,
            registry: server.peers().clone(),
            directory,
            tls: config.tls,
            links: std::sync::Mutex::default(),
            events,
        });
        // Subscribed before the first sync, so no connect is missed.
        let local = inner.registry.subscribe();
        match inner.directory.full_sync(&agents_of(&inner)).await {
            Ok(true) => {}
            // Taken by another process since the claim.
            Ok(false) => {
                return Err(ClusterError::NodeIdInUse {
                    node: config.node_id,
                    addr: inner.directory.holder().await.ok().flatten(),
                });
            }
            Err(e) => {
                // The id was claimed: give it back rather than hold it for
                // a TTL with no entries.
                let _ = inner.directory.remove_node().await;
                return Err(unreachable(e));
            }
        }
        let (subscribed, listening) = tokio::sync::oneshot::channel();
        let tasks = vec![
            tokio::spawn(directory::keep(inner.clone(), local)),
            tokio::spawn(directory::listen(inner.clone(), subscribed)),
        ];
        // Events from the other nodes reach subscribers from here on (the
        // subscription is retried in the background if this takes long).
        let _ = tokio::time::timeout(Duration::from_secs(2), listening).await;
        tracing::info!(node = config.node_id, %advertise, "joined the cluster");
        Ok(Cluster { inner, tasks })
    }

    /// This node's id.
    pub fn node_id(&self) -> u16 {
        self.inner.node_id
    }

    /// Leaves the cluster: this node and its agents are removed from the
    /// directory now (other nodes stop routing to it at once).
    pub async fn leave(mut self) {
        // Stopped, and waited for: a heartbeat under way must not write the
        // node back after it is removed.
        for task in std::mem::take(&mut self.tasks) {
            task.abort();
            let _ = task.await;
        }
        match self.inner.directory.remove_node().await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "leaving the cluster: another process holds this node's id now; its entries were left"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "leaving the cluster: could not remove this node from Redis; it expires after the TTL")
            }
        }
    }

    /// Connects and disconnects anywhere in the cluster (this node's too),
    /// as published through Redis.
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.inner.events.subscribe()
    }

    /// The agent with connection id `id`, wherever it is connected.
    ///
    /// # Errors
    /// `NOT_FOUND` when no node lists it; `UNAVAILABLE` when the directory
    /// (for an agent of another node) or the link to its node cannot be
    /// reached.
    pub async fn peer(&self, id: ConnectionId) -> Result<ClusterPeer, Status> {
        let node = id.node();
        if node == self.inner.node_id {
            return self
                .inner
                .registry
                .get(id)
                .filter(|peer| is_agent(peer, &self.inner.tls.identity))
                .map(ClusterPeer::local)
                .ok_or_else(|| not_found(id));
        }
        let (address, entry) = self.inner.directory.lookup(node, id).await?;
        let (Some(address), Some(entry)) = (address, entry) else {
            return Err(not_found(id));
        };
        let link = self.inner.link(node, &address).await?;
        Ok(ClusterPeer::remote(entry, link))
    }

    /// Every agent in the cluster with all of `labels` (all agents if
    /// empty), those of this node first.
    ///
    /// # Errors
    /// `UNAVAILABLE` when the directory cannot be read (this node's agents
    /// alone are still in [`Server::peers`]).
    pub async fn select(&self, labels: &[(&str, &str)]) -> Result<Vec<ClusterPeer>, Status> {
        let mut peers: Vec<ClusterPeer> = self
            .inner
            .registry
            .select_labels(labels.iter().copied())
            .into_iter()
            .filter(|peer| is_agent(peer, &self.inner.tls.identity))
            .map(ClusterPeer::local)
            .collect();
        let nodes = self.inner.directory.live_nodes().await?;
        self.inner.prune_links(&nodes);
        // The other nodes at once: one that is slow to answer (its link
        // reconnecting) holds up only its own agents.
        let remote = nodes
            .into_iter()
            .filter(|(node, _)| *node != self.inner.node_id)
            .map(|(node, address)| async move {
                let entries = self.inner.directory.select(node, labels).await?;
                if entries.is_empty() {
                    return Ok::<_, Status>(Vec::new());
                }
                match self.inner.link(node, &address).await {
                    Ok(link) => Ok(entries
                        .into_iter()
                        .map(|entry| ClusterPeer::remote(entry, link.clone()))
                        .collect()),
                    Err(status) => {
                        tracing::warn!(node, %status, "a node's agents are left out: its link is down");
                        Ok(Vec::new())
                    }
                }
            });
        for found in futures_util::future::join_all(remote).await {
            peers.extend(found?);
        }
        Ok(peers)
    }

    /// Calls `call` on every agent in the cluster with all of `labels`,
    /// `options.initial_concurrency` at once and more, up to
    /// `options.concurrency`, while they answer quickly (as
    /// [`brpc_server::broadcast`]), each within `options.timeout`; a result
    /// per agent, in the order they finish.
    ///
    /// # Errors
    /// What [`Cluster::select`] fails with.
    pub async fn broadcast<T, F, Fut>(
        &self,
        labels: &[(&str, &str)],
        options: BroadcastOptions,
        call: F,
    ) -> Result<Vec<ClusterResult<T>>, Status>
    where
        F: Fn(ClusterPeer) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let peers = self.select(labels).await?;
        let call = &call;
        let results = peers.into_iter().map(|peer| async move {
            let started = Instant::now();
            let (id, name, node) = (peer.id(), peer.name().to_owned(), peer.node());
            let result = match tokio::time::timeout(options.timeout, call(peer)).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within the broadcast's {:?}",
                    options.timeout
                ))),
            };
            ClusterResult {
                id,
                name,
                node,
                result,
                elapsed: started.elapsed(),
            }
        });
        let results = brpc_server::adaptive_unordered(results, options, |r: &ClusterResult<T>| {
            r.result.is_ok().then_some(r.elapsed)
        })
        .collect()
        .await;
        Ok(results)
    }
}

/// One agent's outcome of a [`Cluster::broadcast`].
#[derive(Debug)]
pub struct ClusterResult<T> {
    /// The agent's connection id.
    pub id: ConnectionId,
    /// Its name.
    pub name: String,
    /// The node it is connected to.
    pub node: u16,
    /// What the call returned.
    pub result: Result<T, Status>,
    /// How long it took.
    pub elapsed: Duration,
}

fn not_found(id: ConnectionId) -> Status {
    Status::not_found(format!(
        "no agent with connection id {} in the cluster",
        id.0
    ))
}

/// Peers that are agents: not other nodes' links, not operators' tools. A
/// link is a peer that says it is one ([`NODE_LABEL`]) and whose verified
/// certificate carries the nodes' identity (`node_identity`): the label
/// alone would let an agent leave itself out of the directory.
fn is_agent(peer: &Peer, node_identity: &str) -> bool {
    let node_link = peer.label(NODE_LABEL).is_some()
        && peer.identity().is_some_and(|id| id.carries(node_identity));
    !node_link && peer.label(brpc_server::admin::CLI_LABEL).is_none()
}

fn agents_of(inner: &Inner) -> Vec<Peer> {
    inner
        .registry
        .select(|peer| is_agent(peer, &inner.tls.identity))
}

impl Inner {
    /// The link to node `node` at `address`, connecting it if need be. The
    /// map is locked only to look and to insert, never across a connect, so
    /// a node that is slow to answer holds up only calls to itself. A link
    /// is kept while its node keeps its address (the client reconnects by
    /// itself); a new address replaces it.
    async fn link(
        &self,
        node: u16,
        address: &directory::NodeAddress,
    ) -> Result<RemoteLink, Status> {
        if let Some(link) = self.lock_links().get(&node)
            && link.addr == address.addr
            && !matches!(link.client.state(), brpc_client::ClientState::Closed { .. })
        {
            return Ok(RemoteLink::of(&link.client));
        }
        let client = Client::builder()
            .name(format!("brpc-node-{}", self.node_id))
            .label(NODE_LABEL, self.node_id.to_string())
            .trust_roots(self.tls.roots.clone())
            .identity(self.tls.chain.clone(), self.tls.key.clone_key())
            .server_name(address.server_name.clone())
            .connect_timeout(Duration::from_secs(5))
            .connect(address.addr.as_str())
            .await
            .map_err(|e| {
                Status::unavailable(format!("cannot reach node {node} at {}: {e}", address.addr))
            })?;
        // The CA may issue agents' certificates too: only one that carries
        // the nodes' identity is another node's, to be trusted with the
        // calls (and metadata) relayed through it.
        let is_node = client
            .peer()
            .and_then(|peer| peer.identity().map(|id| id.carries(&self.tls.identity)));
        if is_node != Some(true) {
            return Err(Status::unavailable(format!(
                "the server at {} (node {node} in the directory) presented a certificate \
                 without the nodes' identity {:?}: not a node of this cluster",
                address.addr, self.tls.identity
            )));
        }
        let client = Arc::new(client);
        let mut links = self.lock_links();
        // Another call may have connected meanwhile: keep the first.
        if let Some(link) = links.get(&node)
            && link.addr == address.addr
            && !matches!(link.client.state(), brpc_client::ClientState::Closed { .. })
        {
            return Ok(RemoteLink::of(&link.client));
        }
        links.insert(
            node,
            Link {
                addr: address.addr.clone(),
                client: client.clone(),
            },
        );
        Ok(RemoteLink::of(&client))
    }

    /// Whether this node holds a link to any other.
    fn has_links(&self) -> bool {
        !self.lock_links().is_empty()
    }

    /// Drops the links to nodes that are no longer in the directory (calls
    /// still holding one keep it until they end).
    fn prune_links(&self, live: &[(u16, directory::NodeAddress)]) {
        self.lock_links()
            .retain(|node, _| live.iter().any(|(n, _)| n == node));
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Link>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A link as a route to an agent: its channel, and the client kept alive
/// for as long as a peer or channel uses it.
#[derive(Debug, Clone)]
struct RemoteLink {
    channel: Channel,
    _client: Arc<Client>,
}

impl RemoteLink {
    fn of(client: &Arc<Client>) -> Self {
        RemoteLink {
            channel: client.channel(),
            _client: client.clone(),
        }
    }
}

/// An agent somewhere in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterPeer {
    id: ConnectionId,
    name: String,
    labels: Labels,
    route: Route,
}

#[derive(Debug, Clone)]
enum Route {
    /// Connected to this node.
    Local(Peer),
    /// Connected to another node, reached over the link to it.
    Remote(RemoteLink),
}

impl ClusterPeer {
    fn local(peer: Peer) -> Self {
        ClusterPeer {
            id: peer.connection_id(),
            name: peer.name().to_owned(),
            labels: peer.labels().clone(),
            route: Route::Local(peer),
        }
    }

    fn remote(entry: directory::Entry, link: RemoteLink) -> Self {
        ClusterPeer {
            id: entry.id,
            name: entry.name,
            labels: entry.labels,
            route: Route::Remote(link),
        }
    }

    /// Its connection id.
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// The node it is connected to.
    pub fn node(&self) -> u16 {
        self.id.node()
    }

    /// The name it gave in Hello.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The labels it gave in Hello.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// Its handle, when it is connected to this node.
    pub fn local_peer(&self) -> Option<&Peer> {
        match &self.route {
            Route::Local(peer) => Some(peer),
            Route::Remote(_) => None,
        }
    }

    /// A channel to the services it hosts.
    pub fn channel(&self) -> ClusterChannel {
        match &self.route {
            Route::Local(peer) => ClusterChannel {
                channel: peer.channel(),
                relay_to: None,
                _link: None,
            },
            Route::Remote(link) => ClusterChannel {
                channel: link.channel.clone(),
                relay_to: http::HeaderValue::from_str(&self.id.0.to_string()).ok(),
                _link: Some(link._client.clone()),
            },
        }
    }

    /// A typed client of a service it hosts, e.g.
    /// `peer.client(AgentClient::new)`, whichever node it is on.
    pub fn client<C>(&self, make: impl FnOnce(ClusterChannel) -> C) -> C {
        make(self.channel())
    }
}

/// A channel to an agent anywhere in the cluster: its own connection when
/// it is connected to this node, else the link to its node with the call
/// marked for the relay. Takes any tonic-generated client.
#[derive(Debug, Clone)]
pub struct ClusterChannel {
    channel: Channel,
    relay_to: Option<http::HeaderValue>,
    /// The link the channel goes over, kept open while the channel lives.
    _link: Option<Arc<Client>>,
}

impl tower_service::Service<http::Request<Body>> for ClusterChannel {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = <Channel as tower_service::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.channel.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if let Some(id) = &self.relay_to {
            request.headers_mut().insert(RELAY_TO, id.clone());
        }
        self.channel.call(request)
    }
}
