//! The directory on Redis. Keys, for cluster `c` and node `n` (all with the
//! node's TTL, refreshed by its heartbeat):
//!
//! - `c:nodes`: a set of node ids that have joined (a reader keeps those
//!   whose `c:node:n` exists), with the TTL of the last node's heartbeat;
//! - `c:node:n`: the node's address, JSON
//!   `{"addr","server_name","identity","token","beat"}` (`token` marks the
//!   process and `beat` counts its heartbeats, so that another live process
//!   given the same id is told from this one's earlier incarnation:
//!   [`Directory::claim`]); written only while it holds this process's mark;
//! - `c:node:n:agents`: a hash, connection id → JSON `{"name","labels","identity"}`;
//! - `c:node:n:label:<key length>:<key>=<value>`: a set of the connection ids
//!   carrying that label (the label index);
//! - channel `c:events`: JSON `{"event":"connected"|"disconnected","node","id","name","labels"}`.
//!
//! One task per node writes (connects and disconnects as they happen, and
//! the heartbeat); after any failure, or events missed, the next heartbeat
//! rewrites the node's entries whole, atomically.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use brpc_core::{ConnectionId, Labels, Peer};
use brpc_server::PeerEvent;
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use crate::{ClusterError, ClusterEvent, Inner, is_agent};

/// Where a node is dialled.
#[derive(Debug, Clone)]
pub(crate) struct NodeAddress {
    pub(crate) addr: String,
    pub(crate) server_name: String,
    /// The identity its node certificate carries.
    pub(crate) identity: String,
}

/// An agent as the directory lists it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) id: ConnectionId,
    pub(crate) name: String,
    pub(crate) labels: Labels,
}

pub(crate) struct Directory {
    client: redis::Client,
    redis: ConnectionManager,
    prefix: String,
    node: u16,
    ttl: Duration,
    address: NodeAddress,
    /// The label keys of this node's index that exist (as far as this node
    /// wrote them): refreshed by the heartbeat, removed on leaving.
    label_keys: std::sync::Mutex<HashSet<String>>,
    /// The label keys an earlier process of this node left were looked
    /// for (once, at the first full write).
    swept: std::sync::atomic::AtomicBool,
    /// This process's mark in the node's key, which tells it from another
    /// process given the same node id.
    token: String,
    /// Heartbeats written: each writes the node's key anew, so a reader
    /// watching it sees a live node's key change.
    beats: std::sync::atomic::AtomicU64,
}

fn unavailable(error: &redis::RedisError) -> Status {
    Status::unavailable(format!(
        "the cluster directory (Redis) cannot be reached: {error}; calls to this node's own agents still work"
    ))
}

impl Directory {
    pub(crate) async fn connect(
        url: &str,
        cluster: &str,
        node: u16,
        ttl: Duration,
        address: NodeAddress,
    ) -> Result<Directory, ClusterError> {
        let client = redis::Client::open(url).map_err(|source| ClusterError::RedisUrl {
            url: url.to_owned(),
            source,
        })?;
        let unreachable = |source| ClusterError::RedisUnreachable {
            url: url.to_owned(),
            source,
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let mut redis = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(unreachable)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut redis)
            .await
            .map_err(unreachable)?;
        Ok(Directory {
            client,
            redis,
            prefix: cluster.to_owned(),
            node,
            ttl,
            address,
            label_keys: std::sync::Mutex::default(),
            swept: std::sync::atomic::AtomicBool::new(false),
            token: process_token(),
            beats: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The TTL in milliseconds (PX / PEXPIRE: a TTL of 1.9 s is not 1 s).
    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis().max(1000)).unwrap_or(i64::MAX)
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    fn node_key(&self, node: u16) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    fn agents_key(&self, node: u16) -> String {
        format!("{}:node:{node}:agents", self.prefix)
    }

    fn label_key(&self, node: u16, key: &str, value: &str) -> String {
        format!(
            "{}:node:{node}:label:{}:{key}={value}",
            self.prefix,
            key.len()
        )
    }

    fn events_channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    fn label_keys(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.label_keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node's key: its address, this process's mark and the heartbeat
    /// it is written by.
    fn address_json(&self) -> String {
        serde_json::json!({
            "addr": self.address.addr,
            "server_name": self.address.server_name,
            "identity": self.address.identity,
            "token": self.token,
            "beat": self.beats.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
        .to_string()
    }

    /// Takes this node's id in the directory, unless a live process holds
    /// it. Free, it is taken at once. Held, its key is watched for a
    /// heartbeat period and a margin: a live node writes it anew at every
    /// heartbeat, while one that ended without leaving (an earlier process
    /// of this node, crashed) does not, and is taken over, if the key is
    /// still exactly as seen (compared and set in one step, so of several
    /// processes waiting on one dead key, one takes it).
    pub(crate) async fn claim(&self) -> Result<Claim, redis::RedisError> {
        let key = self.node_key(self.node);
        let mut redis = self.redis.clone();
        for _ in 0..3 {
            let taken: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(self.address_json())
                .arg("NX")
                .arg("PX")
                .arg(self.ttl_ms())
                .query_async(&mut redis)
                .await?;
            if taken.is_some() {
                return Ok(Claim::Taken);
            }
            let seen: Option<String> = redis.get(&key).await?;
            // Gone in between: try again to take it free.
            let Some(seen) = seen else { continue };
            tokio::time::sleep(self.ttl / 3 + (self.ttl / 6).max(Duration::from_secs(1))).await;
            let holder: Option<String> = eval(TAKE_OVER, std::slice::from_ref(&key))
                .arg(&seen)
                .arg(self.address_json())
                .arg(self.ttl_ms())
                .query_async(&mut redis)
                .await?;
            return Ok(match holder {
                None => Claim::Taken,
                Some(json) => Claim::InUse {
                    addr: parse_address(&json).map(|a| a.addr),
                },
            });
        }
        Ok(Claim::InUse {
            addr: self.holder().await?,
        })
    }

    /// Where the process holding this node's id listens, if its key says.
    pub(crate) async fn holder(&self) -> Result<Option<String>, redis::RedisError> {
        let mut redis = self.redis.clone();
        let json: Option<String> = redis.get(self.node_key(self.node)).await?;
        Ok(json.and_then(|json| parse_address(&json)).map(|a| a.addr))
    }

    /// Writes the node's key for another TTL, if it is this process's (or
    /// gone, as after Redis restarted empty).
    async fn own(&self) -> Result<Owned, redis::RedisError> {
        let mut redis = self.redis.clone();
        let owned: i64 = eval(&OWN, &[self.node_key(self.node)])
            .arg(&self.token)
            .arg(self.address_json())
            .arg(self.ttl_ms())
            .query_async(&mut redis)
            .await?;
        Ok(match owned {
            1 => Owned::Yes,
            2 => Owned::WasGone,
            _ => Owned::No,
        })
    }

    /// Adds the node's membership to `pipe`, with the TTL (its key is
    /// written by [`Directory::own`]).
    fn heartbeat_into(&self, pipe: &mut redis::Pipeline) {
        pipe.sadd(self.nodes_key(), self.node)
            .ignore()
            .pexpire(self.nodes_key(), self.ttl_ms())
            .ignore();
    }

    /// Rewrites this node's entries to be exactly `agents`, atomically.
    /// `Ok(false)`: another process holds this node's id; nothing written.
    pub(crate) async fn full_sync(&self, agents: &[Peer]) -> Result<bool, redis::RedisError> {
        let mut old: Vec<String> = self.label_keys().iter().cloned().collect();
        if !self.swept.load(std::sync::atomic::Ordering::Relaxed) {
            // A process that joined afresh knows none of the label keys an
            // earlier process of this node wrote (it may have crashed, and
            // they live on while any agent carries the label): found by
            // their names, once. (Before the key is owned again: the scan
            // may take long, and the write must follow the check closely.)
            old.extend(self.stored_label_keys().await?);
        }
        if matches!(self.own().await?, Owned::No) {
            return Ok(false);
        }
        let ttl = self.ttl_ms();
        let agents_key = self.agents_key(self.node);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.del(&agents_key).ignore();
        for key in &old {
            pipe.del(key).ignore();
        }
        let mut new = HashSet::new();
        for peer in agents {
            pipe.hset(&agents_key, peer.connection_id().0, entry_json(peer))
                .ignore();
            for (k, v) in peer.labels() {
                let key = self.label_key(self.node, k, v);
                pipe.sadd(&key, peer.connection_id().0).ignore();
                new.insert(key);
            }
        }
        pipe.pexpire(&agents_key, ttl).ignore();
        for key in &new {
            pipe.pexpire(key, ttl).ignore();
        }
        self.heartbeat_into(&mut pipe);
        let mut redis = self.redis.clone();
        pipe.query_async::<()>(&mut redis).await?;
        self.swept.store(true, std::sync::atomic::Ordering::Relaxed);
        *self.label_keys() = new;
        Ok(true)
    }

    /// The label keys of this node that Redis holds now.
    async fn stored_label_keys(&self) -> Result<Vec<String>, redis::RedisError> {
        // The key's own text, with glob characters escaped, then any label.
        let mut pattern = String::new();
        for c in format!("{}:node:{}:label:", self.prefix, self.node).chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        let mut redis = self.redis.clone();
        let mut found = redis.scan_match::<_, String>(pattern).await?;
        let mut keys = Vec::new();
        while let Some(key) = found.next_item().await {
            keys.push(key?);
        }
        Ok(keys)
    }

    /// Keeps this node's entries alive for another TTL: those of `agents`,
    /// whose label keys are the ones kept (keys no agent has any more are
    /// left to expire). [`Beat::Gone`]: the node's own key was gone (Redis
    /// restarted empty, or a heartbeat came later than the TTL), so its
    /// entries must be written whole.
    async fn refresh(&self, agents: &[Peer]) -> Result<Beat, redis::RedisError> {
        match self.own().await? {
            Owned::No => return Ok(Beat::Displaced),
            Owned::WasGone => return Ok(Beat::Gone),
            Owned::Yes => {}
        }
        let ttl = self.ttl_ms();
        let keys: HashSet<String> = agents
            .iter()
            .flat_map(|p| p.labels().iter())
            .map(|(k, v)| self.label_key(self.node, k, v))
            .collect();
        let mut pipe = redis::pipe();
        pipe.pexpire(self.agents_key(self.node), ttl).ignore();
        for key in &keys {
            pipe.pexpire(key, ttl).ignore();
        }
        self.heartbeat_into(&mut pipe);
        let mut redis = self.redis.clone();
        pipe.query_async::<()>(&mut redis).await?;
        *self.label_keys() = keys;
        Ok(Beat::Alive)
    }

    /// Lists one agent that connected, and tells the cluster.
    async fn add(&self, peer: &Peer) -> Result<(), redis::RedisError> {
        let ttl = self.ttl_ms();
        let agents_key = self.agents_key(self.node);
        let id = peer.connection_id().0;
        let mut pipe = redis::pipe();
        // pexpire: the TTL is in milliseconds (expire would read seconds).
        pipe.hset(&agents_key, id, entry_json(peer))
            .ignore()
            .pexpire(&agents_key, ttl)
            .ignore();
        let mut keys = Vec::new();
        for (k, v) in peer.labels() {
            let key = self.label_key(self.node, k, v);
            pipe.sadd(&key, id).ignore().pexpire(&key, ttl).ignore();
            keys.push(key);
        }
        pipe.publish(self.events_channel(), event_json(self.node, peer, true))
            .ignore();
        let mut redis = self.redis.clone();
        pipe.query_async::<()>(&mut redis).await?;
        self.label_keys().extend(keys);
        Ok(())
    }

    /// Unlists one agent that disconnected, and tells the cluster.
    async fn remove(&self, peer: &Peer) -> Result<(), redis::RedisError> {
        let id = peer.connection_id().0;
        let mut pipe = redis::pipe();
        pipe.hdel(self.agents_key(self.node), id).ignore();
        for (k, v) in peer.labels() {
            pipe.srem(self.label_key(self.node, k, v), id).ignore();
        }
        pipe.publish(self.events_channel(), event_json(self.node, peer, false))
            .ignore();
        let mut redis = self.redis.clone();
        pipe.query_async(&mut redis).await
    }

    /// Removes this node and its agents from the directory, unless another
    /// process holds the node's id now (`Ok(false)`: nothing removed).
    pub(crate) async fn remove_node(&self) -> Result<bool, redis::RedisError> {
        let mut keys = vec![
            self.node_key(self.node),
            self.nodes_key(),
            self.agents_key(self.node),
        ];
        keys.extend(self.label_keys().iter().cloned());
        let mut redis = self.redis.clone();
        let removed: i64 = eval(&LEAVE, &keys)
            .arg(&self.token)
            .arg(self.node)
            .query_async(&mut redis)
            .await?;
        Ok(removed == 1)
    }

    /// The nodes alive now (their address key exists), with their addresses.
    pub(crate) async fn live_nodes(&self) -> Result<Vec<(u16, NodeAddress)>, Status> {
        let mut redis = self.redis.clone();
        let members: Vec<String> = redis
            .smembers(self.nodes_key())
            .await
            .map_err(|e| unavailable(&e))?;
        let nodes: BTreeSet<u16> = parsed(members, "node id").collect();
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = nodes.iter().map(|n| self.node_key(*n)).collect();
        let addresses: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut redis)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(nodes
            .into_iter()
            .zip(addresses)
            .filter_map(|(node, address)| Some((node, parse_address(&address?)?)))
            .collect())
    }

    /// Node `node`'s address (if it is alive) and its entry for `id` (if listed).
    pub(crate) async fn lookup(
        &self,
        node: u16,
        id: ConnectionId,
    ) -> Result<(Option<NodeAddress>, Option<Entry>), Status> {
        let mut redis = self.redis.clone();
        let (address, entry): (Option<String>, Option<String>) = redis::pipe()
            .get(self.node_key(node))
            .hget(self.agents_key(node), id.0)
            .query_async(&mut redis)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok((
            address.as_deref().and_then(parse_address),
            entry.as_deref().and_then(|e| parse_entry(id, e)),
        ))
    }

    /// Node `node`'s agents with all of `labels`, through its label index.
    pub(crate) async fn select(
        &self,
        node: u16,
        labels: &[(&str, &str)],
    ) -> Result<Vec<Entry>, Status> {
        let mut redis = self.redis.clone();
        let agents_key = self.agents_key(node);
        let pairs: Vec<(u64, String)> = if labels.is_empty() {
            let fields: Vec<(String, String)> = redis
                .hgetall(&agents_key)
                .await
                .map_err(|e| unavailable(&e))?;
            fields
                .into_iter()
                .filter_map(|(id, entry)| Some((parsed([id], "agent id").next()?, entry)))
                .collect()
        } else {
            let keys: Vec<String> = labels
                .iter()
                .map(|(k, v)| self.label_key(node, k, v))
                .collect();
            let members: Vec<String> = redis.sinter(&keys).await.map_err(|e| unavailable(&e))?;
            let ids: Vec<u64> = parsed(members, "agent id").collect();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let entries: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(&agents_key)
                .arg(&ids)
                .query_async(&mut redis)
                .await
                .map_err(|e| unavailable(&e))?;
            ids.into_iter()
                .zip(entries)
                .filter_map(|(id, e)| Some((id, e?)))
                .collect()
        };
        let mut entries: Vec<Entry> = pairs
            .into_iter()
            .filter_map(|(id, json)| parse_entry(ConnectionId(id), &json))
            .collect();
        entries.sort_by_key(|e| e.id);
        Ok(entries)
    }
}

fn labels_json(labels: &Labels) -> serde_json::Value {
    labels
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn entry_json(peer: &Peer) -> String {
    serde_json::json!({
        "name": peer.name(),
        "labels": labels_json(peer.labels()),
        "identity": peer.identity().map(|i| i.subject.clone()).unwrap_or_default(),
    })
    .to_string()
}

fn event_json(node: u16, peer: &Peer, connected: bool) -> String {
    serde_json::json!({
        "event": if connected { "connected" } else { "disconnected" },
        "node": node,
        "id": peer.connection_id().0,
        "name": peer.name(),
        "labels": labels_json(peer.labels()),
    })
    .to_string()
}

fn parse_labels(value: Option<&serde_json::Value>) -> Labels {
    value
        .and_then(serde_json::Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn parse_entry(id: ConnectionId, json: &str) -> Option<Entry> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(Entry {
        id,
        name: value.get("name")?.as_str()?.to_owned(),
        labels: parse_labels(value.get("labels")),
    })
}

fn parse_address(json: &str) -> Option<NodeAddress> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(NodeAddress {
        addr: value.get("addr")?.as_str()?.to_owned(),
        server_name: value.get("server_name")?.as_str()?.to_owned(),
        identity: value
            .get("identity")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    })
}

/// What [`Directory::claim`] found.
pub(crate) enum Claim {
    /// The node id is this process's now.
    Taken,
    /// A live process holds it, listening at `addr` (if its key says).
    InUse { addr: Option<String> },
}

/// Whose the node's key is, as [`Directory::own`] found it.
enum Owned {
    /// This process's: written for another TTL.
    Yes,
    /// Nobody's (expired, or Redis restarted empty): written as this
    /// process's.
    WasGone,
    /// Another process's: left as it is.
    No,
}

/// What a heartbeat found.
enum Beat {
    /// The node's entries live another TTL.
    Alive,
    /// The node's key was gone: its entries must be written whole.
    Gone,
    /// Another process holds this node's id now.
    Displaced,
}

/// Whether a node key's value holds the mark `token` (not if no mark can be
/// read from it). Shared by the scripts below.
const HELD_BY: &str = r"
local function held_by(value, token)
  local ok, entry = pcall(cjson.decode, value)
  return ok and type(entry) == 'table' and entry['token'] == token
end
";

/// Writes the node key (`KEYS[1]`) as `ARGV[2]` for `ARGV[3]` ms if it
/// holds this process's mark (`ARGV[1]`): 1; or if it is gone: 2; another
/// process's key is left as it is: 0.
static OWN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{HELD_BY}
local value = redis.call('GET', KEYS[1])
if value and not held_by(value, ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if value then return 1 end
return 2"
    )
});

/// Takes the node key (`KEYS[1]`) over, writing `ARGV[2]` for `ARGV[3]`
/// ms, if it is still exactly `ARGV[1]` (nothing refreshed it) or gone:
/// nil. Otherwise it is left, and returned.
const TAKE_OVER: &str = r"
local value = redis.call('GET', KEYS[1])
if value and value ~= ARGV[1] then return value end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return nil";

/// Removes a node: its key (`KEYS[1]`), its id `ARGV[2]` from the node set
/// (`KEYS[2]`) and its other keys (`KEYS[3..]`), if the node key holds this
/// process's mark (`ARGV[1]`) or is gone: 1; otherwise nothing: 0.
static LEAVE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{HELD_BY}
local value = redis.call('GET', KEYS[1])
if value and not held_by(value, ARGV[1]) then return 0 end
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1"
    )
});

/// An EVAL of the script `source` over `keys`: its arguments follow.
fn eval(source: &str, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(source).arg(keys.len()).arg(keys);
    cmd
}

/// A mark unlikely to be any other process's: the process id and 64 bits
/// from the standard library's per-process random hash keys.
fn process_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{}-{:016x}", std::process::id(), hasher.finish())
}

fn parse_event(json: &str) -> Option<ClusterEvent> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(ClusterEvent {
        connected: value.get("event")?.as_str()? == "connected",
        node: u16::try_from(value.get("node")?.as_u64()?).ok()?,
        id: ConnectionId(value.get("id")?.as_u64()?),
        name: value.get("name")?.as_str()?.to_owned(),
        labels: parse_labels(value.get("labels")),
    })
}

/// The node's writer: this node's connects and disconnects as they happen,
/// and a heartbeat every third of the TTL. After a failure (Redis away) or
/// missed events, the next heartbeat rewrites the node's entries whole;
/// until then changes wait for it.
pub(crate) async fn keep(inner: Arc<Inner>, mut local: Receiver<PeerEvent>) {
    let directory = &inner.directory;
    let mut beat = tokio::time::interval(directory.ttl / 3);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stale = false;
    loop {
        // Biased, the heartbeat first: a late one finds out whether another
        // process has taken this node's id before any event is written.
        tokio::select! {
            biased;
            _ = beat.tick() => {
                let agents = crate::agents_of(&inner);
                let result = if stale {
                    directory.full_sync(&agents).await
                } else {
                    match directory.refresh(&agents).await {
                        Ok(Beat::Alive) => Ok(true),
                        // The node's key was gone: write everything again.
                        Ok(Beat::Gone) => directory.full_sync(&agents).await,
                        Ok(Beat::Displaced) => Ok(false),
                        Err(e) => Err(e),
                    }
                };
                match result {
                    Ok(false) => {
                        tracing::error!(
                            node = directory.node,
                            "another process holds this node's id in the cluster directory (two \
                             processes were given one id, or this one's heartbeat came too late, \
                             cut off from Redis or stalled, and the id was taken over): this node \
                             no longer writes its entries; give each node its own id and restart it"
                        );
                        return;
                    }
                    Ok(true) => {
                        if stale {
                            tracing::info!("cluster directory rewritten for this node");
                        }
                        stale = false;
                        // Links to nodes that left stop redialling even
                        // when nothing selects (which prunes them too).
                        if inner.has_links()
                            && let Ok(nodes) = directory.live_nodes().await
                        {
                            inner.prune_links(&nodes);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster heartbeat failed");
                        stale = true;
                    }
                }
            }
            event = local.recv() => {
                let result = match event {
                    Ok(PeerEvent::Connected(peer)) if is_agent(&peer, &inner.tls.identity) && !stale => directory.add(&peer).await,
                    Ok(PeerEvent::Disconnected { peer, .. }) if is_agent(&peer, &inner.tls.identity) && !stale => directory.remove(&peer).await,
                    Ok(_) => Ok(()),
                    Err(RecvError::Lagged(_)) => {
                        stale = true;
                        Ok(())
                    }
                    Err(RecvError::Closed) => return,
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "cluster directory update failed; the next heartbeat rewrites this node's entries");
                    stale = true;
                }
            }
        }
    }
}

/// Passes the cluster's events (Redis pub/sub) to [`crate::Cluster::subscribe`]rs,
/// subscribing again whenever the subscription is lost.
pub(crate) async fn listen(inner: Arc<Inner>, subscribed: tokio::sync::oneshot::Sender<()>) {
    let directory = &inner.directory;
    let mut subscribed = Some(subscribed);
    loop {
        match directory.client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(directory.events_channel()).await.is_ok() {
                    if let Some(subscribed) = subscribed.take() {
                        let _ = subscribed.send(());
                    }
                    let (mut sink, mut messages) = pubsub.split();
                    // A subscription whose connection died without a reset
                    // (a partition, a host gone) would otherwise wait here
                    // for ever: it is pinged every heartbeat, and taken
                    // again when the answer does not come within one.
                    let mut check = tokio::time::interval(directory.ttl / 3);
                    check.reset();
                    loop {
                        tokio::select! {
                            message = messages.next() => {
                                let Some(message) = message else { break };
                                let Ok(payload) = message.get_payload::<String>() else {
                                    continue;
                                };
                                if let Some(event) = parse_event(&payload) {
                                    let _ = inner.events.send(event);
                                }
                            }
                            _ = check.tick() => {
                                let ping = sink.ping::<redis::Value>();
                                if !matches!(tokio::time::timeout(directory.ttl / 3, ping).await, Ok(Ok(_))) {
                                    tracing::info!("cluster events: the subscription stopped answering; subscribing again");
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cluster events: Redis not reachable"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `items` read from Redis as `T`, leaving out (and logging) any that do
/// not parse: one stray entry (another version's, or a hand edit) must not
/// make the whole directory unreadable.
fn parsed<T: std::str::FromStr>(
    items: impl IntoIterator<Item = String>,
    what: &'static str,
) -> impl Iterator<Item = T> {
    items.into_iter().filter_map(move |item| {
        let value = item.parse().ok();
        if value.is_none() {
            tracing::warn!(%item, "cluster directory: not a {what}; left out");
        }
        value
    })
}
