//! The admin service: what `brpcctl` (or any operator's tool) talks to.
//! Off by default; on, it answers only the connections an [`AdminAccess`]
//! authorises, and gives them four things:
//!
//! - `brpc.admin.v1.Admin/ListAgents`: the connected peers, a page at a
//!   time, optionally those with given labels;
//! - `brpc.admin.v1.Admin/Watch`: connect and disconnect events as they
//!   happen (server-streaming);
//! - `brpc.admin.v1.Admin/Stats`: the server's load (peers connected,
//!   handshakes in progress and waiting) and its admission counts (what
//!   [`Server::admission_stats`](crate::Server::admission_stats) returns);
//! - the relay: any call carrying the metadata entry `brpc-relay-to: <id>`
//!   is carried on to the connected peer with that id, as the same service
//!   and method, its messages passed through as bytes (the server decodes
//!   nothing), the answer coming back as the agent gave it.
//!
//! An operator's power to call any agent must not reach agents: a
//! connection that is not authorised gets `PERMISSION_DENIED` for both the
//! service and the relay. The messages are in `proto/brpc_admin.proto` and
//! PROTOCOL.md ("Admin service").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// The label an operator's tool (brpcctl) announces in Hello: such a
/// connection is not an agent.
pub const CLI_LABEL: &str = "brpc.cli";

/// The label a cluster node's link announces in Hello (its node id): with
/// a node's certificate, such a connection is not an agent.
pub const NODE_LABEL: &str = "brpc.node";

use brpc_core::conn::{Handler, Incoming, Input, Reply};
use brpc_core::tls::PeerIdentity;
use brpc_core::wire::KeyValue;
use brpc_core::{ConnectionId, Peer, Router};
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use crate::{PeerEvent, Registry};

/// The admin service's proto name.
pub const ADMIN_SERVICE: &str = "brpc.admin.v1.Admin";
/// The metadata key that asks the server to relay a call to the connected
/// peer whose connection id is its value (decimal).
pub const RELAY_TO: &str = "brpc-relay-to";
/// The metadata key carrying an admin token (see [`AdminAccess::token`]).
pub const ADMIN_TOKEN: &str = "brpc-admin-token";
/// Most peers one `ListAgents` page holds.
pub const MAX_PAGE: u32 = 1000;

/// `ListAgents`' request.
#[derive(Clone, PartialEq, Message)]
pub struct ListAgentsRequest {
    /// Only peers carrying all these labels (none: every peer).
    #[prost(map = "string, string", tag = "1")]
    pub labels: HashMap<String, String>,
    /// Only peers whose connection id is greater (paging: the last id of
    /// the previous page; 0 for the first).
    #[prost(uint64, tag = "2")]
    pub after: u64,
    /// Most peers in the page (0 or more than [`MAX_PAGE`]: [`MAX_PAGE`]).
    #[prost(uint32, tag = "3")]
    pub limit: u32,
}

/// `ListAgents`' answer.
#[derive(Clone, PartialEq, Message)]
pub struct ListAgentsResponse {
    /// The page, ordered by connection id.
    #[prost(message, repeated, tag = "1")]
    pub agents: Vec<AgentInfo>,
    /// Where the next page starts (`after` of the next request); 0 when
    /// this was the last page.
    #[prost(uint64, tag = "2")]
    pub next_after: u64,
}

/// One connected peer.
#[derive(Clone, PartialEq, Message)]
pub struct AgentInfo {
    /// Its connection id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The name it gave in Hello.
    #[prost(string, tag = "2")]
    pub name: String,
    /// The labels it gave in Hello.
    #[prost(map = "string, string", tag = "3")]
    pub labels: HashMap<String, String>,
    /// Its address as the server sees it (`ip:port`).
    #[prost(string, tag = "4")]
    pub remote_address: String,
    /// Its verified certificate's subject (mutual TLS only; empty otherwise).
    #[prost(string, tag = "5")]
    pub identity: String,
    /// When its Hello was accepted, in milliseconds since the Unix epoch.
    #[prost(uint64, tag = "6")]
    pub connected_at_unix_ms: u64,
    /// Calls in flight on its connection, both directions.
    #[prost(uint32, tag = "7")]
    pub calls_in_flight: u32,
}

/// `Watch`'s request.
#[derive(Clone, PartialEq, Message)]
pub struct WatchRequest {
    /// Only events about peers carrying all these labels (none: all).
    #[prost(map = "string, string", tag = "1")]
    pub labels: HashMap<String, String>,
}

/// One `Watch` event.
#[derive(Clone, PartialEq, Message)]
pub struct AgentEvent {
    /// What happened: 1 connected, 2 disconnected, 3 events were missed
    /// (the watcher fell behind; `missed` says how many).
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    /// The peer it happened to (absent for kind 3).
    #[prost(message, optional, tag = "2")]
    pub agent: Option<AgentInfo>,
    /// How the connection ended (kind 2).
    #[prost(string, tag = "3")]
    pub reason: String,
    /// How many events were missed (kind 3).
    #[prost(uint64, tag = "4")]
    pub missed: u64,
}

/// `Stats`' request (no fields yet).
#[derive(Clone, PartialEq, Message)]
pub struct StatsRequest {}

/// `Stats`' answer: the server's load now, and what became of the QUIC
/// clients that reached it since it was bound (the counts of
/// [`AdmissionStats`](crate::AdmissionStats), which only grow: read twice and
/// subtract to see a restart storm's shape).
#[derive(Clone, PartialEq, Message)]
pub struct StatsResponse {
    /// Peers in the registry (sessions admitted and not ended).
    #[prost(uint64, tag = "1")]
    pub connected: u64,
    /// TLS handshakes in progress holding a handshake slot (at most
    /// [`Builder::max_handshakes`](crate::Builder::max_handshakes); a client
    /// over the connection limit takes one too, while it is handshaken to
    /// be told so).
    #[prost(uint64, tag = "2")]
    pub handshakes_in_progress: u64,
    /// Clients waiting for a handshake slot.
    #[prost(uint64, tag = "3")]
    pub handshakes_waiting: u64,
    /// Bytes of partly received frames held, all connections.
    #[prost(uint64, tag = "4")]
    pub buffered_bytes: u64,
    /// Refused at once: the handshake queue was full.
    #[prost(uint64, tag = "5")]
    pub refused_queue_full: u64,
    /// Refused after waiting half the Hello limit for a handshake slot.
    #[prost(uint64, tag = "6")]
    pub refused_after_waiting: u64,
    /// Refused: the server was shutting down.
    #[prost(uint64, tag = "7")]
    pub refused_closing: u64,
    /// Handshaken and closed: the server was at its connection limit.
    #[prost(uint64, tag = "8")]
    pub turned_away: u64,
    /// TLS handshakes started for clients within the connection limit
    /// (those turned away are in `turned_away`).
    #[prost(uint64, tag = "9")]
    pub handshakes_started: u64,
    /// Handshakes that failed (a certificate refused, a protocol error, the
    /// client going away).
    #[prost(uint64, tag = "10")]
    pub handshakes_failed: u64,
    /// Handshakes not finished within the Hello limit.
    #[prost(uint64, tag = "11")]
    pub handshakes_timed_out: u64,
    /// Clients handshaken and then refused (bad or late Hello, version, not
    /// authorised, shutting down).
    #[prost(uint64, tag = "12")]
    pub sessions_refused: u64,
    /// Sessions admitted.
    #[prost(uint64, tag = "13")]
    pub admitted: u64,
}

/// [`AgentEvent::kind`]: a peer connected.
pub const EVENT_CONNECTED: u32 = 1;
/// [`AgentEvent::kind`]: a peer disconnected.
pub const EVENT_DISCONNECTED: u32 = 2;
/// [`AgentEvent::kind`]: the watcher fell behind and missed events.
pub const EVENT_MISSED: u32 = 3;

impl AgentInfo {
    /// What the admin service says of `peer`.
    pub fn of(peer: &Peer) -> Self {
        AgentInfo {
            id: peer.connection_id().0,
            name: peer.name().to_owned(),
            labels: peer
                .labels()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            remote_address: peer.remote_address().to_string(),
            identity: peer
                .identity()
                .map(|i| i.subject.clone())
                .unwrap_or_default(),
            connected_at_unix_ms: peer
                .connected_at()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            calls_in_flight: u32::try_from(peer.calls_in_flight()).unwrap_or(u32::MAX),
        }
    }
}

/// Who may use the admin service (see [`Builder::admin`](crate::Builder::admin)).
/// A connection is authorised when its verified mutual-TLS identity matches
/// an allowed name, or when a call carries an allowed token in its
/// `brpc-admin-token` metadata. With neither configured nobody is.
///
/// ```
/// use brpc_server::AdminAccess;
/// let access = AdminAccess::new()
///     .identity("ops.example.com")
///     .token(std::env::var("BRPC_ADMIN_TOKEN").unwrap_or_default());
/// ```
#[derive(Clone, Default)]
pub struct AdminAccess {
    identities: Vec<String>,
    tokens: Vec<Vec<u8>>,
}

impl std::fmt::Debug for AdminAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAccess")
            .field("identities", &self.identities)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl AdminAccess {
    /// Nobody authorised yet.
    pub fn new() -> Self {
        AdminAccess::default()
    }

    /// Authorises clients whose verified certificate (mutual TLS, see
    /// [`Builder::client_ca`](crate::Builder::client_ca)) has `name` as its
    /// common name, a DNS name or a URI (a SPIFFE id, say).
    pub fn identity(mut self, name: impl Into<String>) -> Self {
        self.identities.push(name.into());
        self
    }

    /// Authorises calls carrying `token` as their `brpc-admin-token`
    /// metadata (brpcctl's `--token`). An empty token is ignored. The
    /// server strips the entry from calls it relays, so agents never see it.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        if !token.is_empty() {
            self.tokens.push(token.into_bytes());
        }
        self
    }

    fn identity_allowed(&self, identity: Option<&PeerIdentity>) -> bool {
        let Some(identity) = identity else {
            return false;
        };
        self.identities
            .iter()
            .any(|allowed| identity.carries(allowed))
    }

    fn token_allowed(&self, metadata: &[KeyValue]) -> bool {
        metadata
            .iter()
            .filter(|kv| kv.key.eq_ignore_ascii_case(ADMIN_TOKEN))
            .any(|kv| {
                self.tokens
                    .iter()
                    .any(|t| constant_time_eq(t, kv.value.as_bytes()))
            })
    }

    fn check(&self, call: &Incoming) -> Result<(), Status> {
        if self.identity_allowed(call.peer.identity()) || self.token_allowed(&call.metadata) {
            return Ok(());
        }
        Err(Status::permission_denied(
            "this connection is not authorised for the admin service: connect with an \
             allowed mutual-TLS identity or pass an allowed token (brpc-admin-token)",
        ))
    }
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The server's handler: the router, and in front of it, when enabled, the
/// admin service and the relay.
#[derive(Clone)]
pub(crate) struct ServerHandler {
    pub(crate) router: Router,
    pub(crate) admin: Option<Arc<Admin>>,
}

/// The admin service of one server.
pub(crate) struct Admin {
    pub(crate) access: AdminAccess,
    pub(crate) registry: Registry,
    /// The server's load and admission counts, for `Stats` (`None`: the
    /// server is gone).
    pub(crate) stats: Box<dyn Fn() -> Option<StatsResponse> + Send + Sync>,
}

impl Handler for ServerHandler {
    // Not an `async fn`, which would hold `call` beside the router's future
    // made from it (and every served call's future would carry both).
    fn serve<'a>(
        &'a self,
        call: Incoming,
        reply: &'a mut Reply,
    ) -> impl std::future::Future<Output = ()> + Send + 'a {
        match &self.admin {
            Some(admin) if call.service == ADMIN_SERVICE || relay_target(&call).is_some() => {
                futures_util::future::Either::Left(Box::pin(admin.serve(call, reply)))
            }
            _ => futures_util::future::Either::Right(Handler::serve(&self.router, call, reply)),
        }
    }

    fn task_per_call(&self) -> bool {
        Handler::task_per_call(&self.router)
    }
}

/// The `brpc-relay-to` entry of a call, if it has one.
fn relay_target(call: &Incoming) -> Option<&str> {
    call.metadata
        .iter()
        .find(|kv| kv.key.eq_ignore_ascii_case(RELAY_TO))
        .map(|kv| kv.value.as_str())
}

impl Admin {
    async fn serve(&self, call: Incoming, reply: &mut Reply) {
        if let Err(status) = self.access.check(&call) {
            // Debug, not warn: a peer repeating refused calls must not be
            // able to fill the server's logs.
            tracing::debug!(
                peer = %call.peer.connection_id(),
                service = %call.service,
                method = %call.method,
                "admin call refused: not authorised"
            );
            reply.status(status).await;
            return;
        }
        if let Some(target) = relay_target(&call) {
            let target = target.to_owned();
            self.relay(call, &target, reply).await;
            return;
        }
        match call.method.as_str() {
            "ListAgents" => match decode::<ListAgentsRequest>(&call) {
                Ok(request) => reply.ok_message(&self.list(&request)).await,
                Err(status) => reply.status(status).await,
            },
            "Stats" => match decode::<StatsRequest>(&call) {
                Ok(StatsRequest {}) => match (self.stats)() {
                    Some(stats) => reply.ok_message(&stats).await,
                    None => {
                        reply
                            .status(Status::unavailable("the server is shutting down"))
                            .await;
                    }
                },
                Err(status) => reply.status(status).await,
            },
            "Watch" => match decode::<WatchRequest>(&call) {
                Ok(request) => self.watch(&call.peer, &request, reply).await,
                Err(status) => reply.status(status).await,
            },
            other => {
                reply
                    .status(Status::unimplemented(format!(
                        "method {other} of {ADMIN_SERVICE}"
                    )))
                    .await;
            }
        }
    }

    fn list(&self, request: &ListAgentsRequest) -> ListAgentsResponse {
        let limit = match request.limit {
            0 => MAX_PAGE,
            n => n.min(MAX_PAGE),
        } as usize;
        let after = (request.after != 0).then_some(ConnectionId(request.after));
        // The table's own: the request's labels are read as they are.
        let page: Vec<Peer> = self.registry.read().page_with_labels(
            request.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            after,
            limit + 1,
        );
        let more = page.len() > limit;
        let agents: Vec<AgentInfo> = page.iter().take(limit).map(AgentInfo::of).collect();
        let next_after = match (more, agents.last()) {
            (true, Some(last)) => last.id,
            _ => 0,
        };
        ListAgentsResponse { agents, next_after }
    }

    async fn watch(&self, call_peer: &Peer, request: &WatchRequest, reply: &mut Reply) {
        let mut events = self.registry.subscribe();
        // An empty header set tells the caller the watch is on: events from
        // here on will reach it.
        if reply.headers(Vec::new()).await.is_err() {
            return;
        }
        let matches = |peer: &Peer| {
            request
                .labels
                .iter()
                .all(|(k, v)| peer.label(k) == Some(v.as_str()))
        };
        loop {
            let received = tokio::select! {
                biased;
                // A graceful shutdown: end the watch cleanly instead of
                // holding the drain for its whole grace period.
                () = call_peer.draining() => {
                    reply.close().await;
                    return;
                }
                received = events.recv() => received,
            };
            let event = match received {
                Ok(PeerEvent::Connected(peer)) if matches(&peer) => AgentEvent {
                    kind: EVENT_CONNECTED,
                    agent: Some(AgentInfo::of(&peer)),
                    ..AgentEvent::default()
                },
                Ok(PeerEvent::Disconnected { peer, reason }) if matches(&peer) => AgentEvent {
                    kind: EVENT_DISCONNECTED,
                    agent: Some(AgentInfo::of(&peer)),
                    reason: reason.to_string(),
                    ..AgentEvent::default()
                },
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => AgentEvent {
                    kind: EVENT_MISSED,
                    missed,
                    ..AgentEvent::default()
                },
                Err(RecvError::Closed) => {
                    reply.close().await;
                    return;
                }
            };
            if reply.message(event.encode_to_vec().into()).await.is_err() {
                return;
            }
        }
    }

    async fn relay(&self, call: Incoming, target: &str, reply: &mut Reply) {
        let Ok(id) = target.trim().parse::<u64>() else {
            reply
                .status(Status::invalid_argument(format!(
                    "{RELAY_TO} must be a connection id (a decimal number), not {target:?}"
                )))
                .await;
            return;
        };
        let Some(agent) = self.registry.get(ConnectionId(id)) else {
            reply
                .status(Status::not_found(format!(
                    "no peer with connection id {id} is connected to this server"
                )))
                .await;
            return;
        };
        // The relay's own entries stay here: the agent sees the operator's
        // call as the operator made it, without its credentials.
        let metadata: Vec<KeyValue> = call
            .metadata
            .iter()
            .filter(|kv| {
                !kv.key.eq_ignore_ascii_case(RELAY_TO) && !kv.key.eq_ignore_ascii_case(ADMIN_TOKEN)
            })
            .cloned()
            .collect();
        tracing::info!(
            operator = %call.peer.connection_id(),
            agent = id,
            service = %call.service,
            method = %call.method,
            "admin relay"
        );
        brpc_core::conn::relay(call, &agent, metadata, reply).await;
    }
}

/// The one request message of an admin call.
fn decode<M: Message + Default>(call: &Incoming) -> Result<M, Status> {
    match &call.input {
        Input::Single(bytes) => M::decode(bytes.clone())
            .map_err(|e| Status::invalid_argument(format!("{ADMIN_SERVICE}/{}: {e}", call.method))),
        Input::Stream(_) => Err(Status::unimplemented(format!(
            "{ADMIN_SERVICE}/{} takes one request message, not a stream",
            call.method
        ))),
    }
}
