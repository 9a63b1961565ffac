//! Three nodes in one process over a real `redis-server` (started here on a
//! free loopback port; `.ci/run` installs Debian's package), agents on each:
//! calls from node A reach agents on node C by id and by label, with
//! metadata, deadlines and cancellation across the hop; a broadcast reaches
//! every agent; node C dies and its agents move; Redis goes away and comes
//! back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use brpc::{Client, Server};
use brpc_cluster::{Cluster, ClusterConfig, ClusterError, NodeTls};
use brpc_server::BroadcastOptions;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

#[allow(missing_docs, clippy::unwrap_used)]
mod echo {
    include!(concat!(env!("OUT_DIR"), "/test.echo.v1.rs"));
}
use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};
use echo::{EchoReply, EchoRequest, FailRequest, Number, RangeRequest, SleepRequest};

const NODE_IDENTITY: &str = "spiffe://test-cluster/node";
const LIMIT: Duration = Duration::from_secs(30);

/// A `redis-server` on a free loopback port, stopped when dropped.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server cannot be started ({e}); install it: apt-get install -y redis-server")
            });
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < LIMIT, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { port, child }
    }

    fn start() -> Redis {
        Redis::start_on(free_tcp_port())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A connection of the test's own, to look at what the nodes wrote.
    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The cluster CA and a node certificate from it.
struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "test cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-signed");
        Pki {
            ca: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    fn roots(&self) -> rustls::RootCertStore {
        brpc::tls::pinned_roots(&self.ca).expect("roots")
    }

    fn node(&self, name: &str) -> NodeTls {
        self.certified(
            name,
            vec![
                SanType::IpAddress("127.0.0.1".parse().expect("ip")),
                SanType::URI(NODE_IDENTITY.try_into().expect("uri")),
            ],
        )
    }

    /// A certificate from the cluster CA without the nodes' identity (as an
    /// agent's might be), set up as a node's all the same.
    fn impostor(&self, name: &str) -> NodeTls {
        self.certified(
            name,
            vec![SanType::IpAddress("127.0.0.1".parse().expect("ip"))],
        )
    }

    /// A node's settings with a certificate from the CA for `name` with
    /// `sans`, valid for server and client use.
    fn certified(&self, name: &str, sans: Vec<SanType>) -> NodeTls {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        NodeTls {
            roots: self.roots(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            identity: NODE_IDENTITY.into(),
        }
    }
}

/// What an agent's Echo saw.
#[derive(Default)]
struct Probe {
    in_flight: AtomicUsize,
    dropped: AtomicUsize,
}

struct Agent {
    name: String,
    probe: Arc<Probe>,
}

struct Running(Arc<Probe>, bool);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.1 {
            self.0.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Agent {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let trace = request
            .metadata()
            .get("x-trace")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let relayed = request.metadata().get("brpc-relay-to").is_some();
        let r = request.into_inner();
        Ok(Response::new(EchoReply {
            text: format!("{}|trace={trace}|relay-key-seen={relayed}", r.text),
            seq: r.seq,
            answered_by: self.name.clone(),
            ..Default::default()
        }))
    }

    async fn fail(&self, r: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        let r = r.into_inner();
        Err(Status::new(Code::from_i32(r.code), r.message))
    }

    async fn sleep(&self, r: Request<SleepRequest>) -> Result<Response<EchoReply>, Status> {
        self.probe.in_flight.fetch_add(1, Ordering::SeqCst);
        let mut running = Running(self.probe.clone(), false);
        tokio::time::sleep(Duration::from_millis(r.into_inner().millis)).await;
        running.1 = true;
        Ok(Response::new(EchoReply::default()))
    }

    type RangeStream = Replies;

    async fn range(&self, r: Request<RangeRequest>) -> Result<Response<Replies>, Status> {
        let RangeRequest { from, to } = r.into_inner();
        let name = self.name.clone();
        Ok(Response::new(Box::pin(tokio_stream::iter(from..to).map(
            move |seq| {
                Ok(EchoReply {
                    seq,
                    answered_by: name.clone(),
                    ..Default::default()
                })
            },
        ))))
    }

    async fn sum(&self, r: Request<Streaming<Number>>) -> Result<Response<Number>, Status> {
        let mut input = r.into_inner();
        let mut value = 0;
        while let Some(n) = input.next().await {
            value += n?.value;
        }
        Ok(Response::new(Number { value }))
    }

    type BidiStream = Replies;

    async fn bidi(&self, r: Request<Streaming<EchoRequest>>) -> Result<Response<Replies>, Status> {
        let name = self.name.clone();
        Ok(Response::new(Box::pin(r.into_inner().map(move |m| {
            m.map(|m| EchoReply {
                seq: m.seq,
                text: m.text,
                answered_by: name.clone(),
                ..Default::default()
            })
        }))))
    }

    async fn sink(&self, _: Request<Streaming<EchoRequest>>) -> Result<Response<Number>, Status> {
        Err(Status::unimplemented("sink"))
    }
}

struct Node {
    server: Server,
    cluster: Option<Cluster>,
}

async fn node(pki: &Pki, id: u16, redis: &Redis, ttl: Duration) -> Node {
    node_at(pki, id, redis.url(), ttl).await
}

/// A node whose Redis is at `url`.
async fn node_at(pki: &Pki, id: u16, url: String, ttl: Duration) -> Node {
    node_with(pki.node(&format!("node-{id}")), id, url, ttl).await
}

/// A node with these TLS settings.
async fn node_with(tls: NodeTls, id: u16, url: String, ttl: Duration) -> Node {
    let (config, server) = unjoined(tls, id, url, ttl);
    let cluster = Cluster::join(&server, config).await.expect("joins");
    Node {
        server,
        cluster: Some(cluster),
    }
}

/// A node's configuration and its server, not joined yet.
fn unjoined(tls: NodeTls, id: u16, url: String, ttl: Duration) -> (ClusterConfig, Server) {
    let config = ClusterConfig::new(id, url, tls).name("test").ttl(ttl);
    let server = config
        .server_builder(Server::builder())
        .bind("127.0.0.1:0")
        .expect("bind");
    (config, server)
}

/// What Redis holds for node 1 of the test cluster.
async fn node_1_entry(conn: &mut redis::aio::MultiplexedConnection) -> Option<String> {
    redis::cmd("GET")
        .arg("test:node:1")
        .query_async(conn)
        .await
        .expect("GET")
}

impl Node {
    fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("in the cluster")
    }
}

/// An agent named `name` on the first of `servers` that answers, failing
/// over to the others in turn.
async fn agent(pki: &Pki, name: &str, node: &str, servers: &[SocketAddr]) -> (Client, Arc<Probe>) {
    let probe = Arc::new(Probe::default());
    let client = Client::builder()
        .name(name)
        .label("node", node)
        .label("agent", name)
        .trust_roots(pki.roots())
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .add_service(EchoServer::new(Agent {
            name: name.into(),
            probe: probe.clone(),
        }))
        .connect_any(servers.iter().map(ToString::to_string))
        .await
        .expect("agent connects");
    (client, probe)
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < LIMIT, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_route_calls_broadcast_and_survive_a_node_dying() {
    let redis = Redis::start();
    let pki = Pki::new();
    let ttl = Duration::from_secs(3);
    let a = node(&pki, 1, &redis, ttl).await;
    let b = node(&pki, 2, &redis, ttl).await;
    let mut c = node(&pki, 3, &redis, ttl).await;
    let (aa, ba, ca) = (
        a.server.local_addr(),
        b.server.local_addr(),
        c.server.local_addr(),
    );
    let mut events = a.cluster().subscribe();
    let (a1, _) = agent(&pki, "a1", "a", &[aa, ba, ca]).await;
    let (_b1, _) = agent(&pki, "b1", "b", &[ba, ca, aa]).await;
    let (c1, c1_probe) = agent(&pki, "c1", "c", &[ca, aa, ba]).await;
    let (_c2, _) = agent(&pki, "c2", "c", &[ca, ba, aa]).await;
    assert_eq!(c1.connection_id().node(), 3, "ids name their node");
    assert_eq!(a1.connection_id().node(), 1);

    // Connect events from every node reach A through Redis.
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(LIMIT, events.recv())
            .await
            .expect("events in time")
            .expect("event");
        assert!(event.connected);
        seen.insert((event.node, event.name));
    }
    assert!(seen.contains(&(3, "c1".to_owned())), "{seen:?}");

    // From A, c1 by id: unary with metadata; the relay's own key stays on A.
    let cluster = a.cluster();
    let c1_peer = cluster.peer(c1.connection_id()).await.expect("c1 found");
    assert!(c1_peer.local_peer().is_none());
    assert_eq!((c1_peer.name(), c1_peer.node()), ("c1", 3));
    let mut echo = c1_peer.client(EchoClient::new);
    let mut request = Request::new(EchoRequest {
        text: "hello".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-trace", "t-42".parse().expect("ascii"));
    let reply = echo.unary(request).await.expect("unary across nodes");
    assert_eq!(reply.get_ref().answered_by, "c1");
    assert_eq!(
        reply.get_ref().text,
        "hello|trace=t-42|relay-key-seen=false"
    );

    // By label, and a bidi stream across the hop.
    let found = cluster.select(&[("agent", "c1")]).await.expect("select");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id(), c1.connection_id());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = found[0]
        .client(EchoClient::new)
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    for seq in 0..3 {
        tx.send(EchoRequest {
            seq,
            ..Default::default()
        })
        .await
        .expect("send");
        let reply = replies.next().await.expect("reply").expect("ok");
        assert_eq!((reply.seq, reply.answered_by.as_str()), (seq, "c1"));
    }
    drop(tx);
    assert!(replies.next().await.is_none());
    let range: Vec<u64> = echo
        .range(RangeRequest { from: 0, to: 4 })
        .await
        .expect("range")
        .into_inner()
        .map(|r| r.expect("ok").seq)
        .collect()
        .await;
    assert_eq!(range, [0, 1, 2, 3]);
    let status = echo
        .fail(FailRequest {
            code: Code::AlreadyExists as i32,
            message: "c1 says so".into(),
        })
        .await
        .expect_err("fails");
    assert_eq!(
        (status.code(), status.message()),
        (Code::AlreadyExists, "c1 says so")
    );

    // A deadline that runs out across the hop: DEADLINE_EXCEEDED, and the
    // agent's handler is dropped.
    let mut request = Request::new(SleepRequest { millis: 60_000 });
    request.set_timeout(Duration::from_millis(300));
    let status = echo.sleep(request).await.expect_err("times out");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    eventually("c1's handler dropped at the deadline", || async {
        c1_probe.dropped.load(Ordering::SeqCst) == 1
    })
    .await;

    // Cancellation across the hop: the caller drops its call.
    let mut cancelled = echo.clone();
    let call = tokio::spawn(async move { cancelled.sleep(SleepRequest { millis: 60_000 }).await });
    eventually("c1's handler running", || async {
        c1_probe.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    call.abort();
    eventually("c1's handler dropped on cancel", || async {
        c1_probe.dropped.load(Ordering::SeqCst) == 2
    })
    .await;

    // An agent (no node certificate) asking node A to relay to c1: refused.
    let c1_id = c1.connection_id().0.to_string();
    let mut sneaky = EchoClient::with_interceptor(a1.channel(), move |mut request: Request<()>| {
        let id = c1_id.parse().map_err(|_| Status::internal("id"))?;
        request.metadata_mut().insert("brpc-relay-to", id);
        Ok(request)
    });
    let status = sneaky
        .unary(EchoRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A broadcast from A reaches every agent on A, B and C.
    let results = cluster
        .broadcast(&[], BroadcastOptions::default(), |peer| async move {
            let reply = peer
                .client(EchoClient::new)
                .unary(EchoRequest::default())
                .await?;
            Ok(reply.into_inner().answered_by)
        })
        .await
        .expect("broadcast");
    let mut answered: Vec<(u16, String)> = results
        .into_iter()
        .map(|r| (r.node, r.result.expect("each agent answers")))
        .collect();
    answered.sort();
    assert_eq!(
        answered,
        [
            (1, "a1".to_owned()),
            (2, "b1".to_owned()),
            (3, "c1".to_owned()),
            (3, "c2".to_owned())
        ]
    );

    // Node C dies: its heartbeat stops (the Cluster is dropped without
    // leaving) and its server goes. Its agents' entries expire within the
    // TTL, the agents fail over to A or B, and calls reach them again.
    let old_c1 = c1.connection_id();
    drop(c.cluster.take());
    c.server.close();
    let died = Instant::now();
    eventually("c1 back on another node", || async {
        matches!(c1.state(), brpc::ClientState::Connected { connection_id } if connection_id.node() != 3)
    })
    .await;
    eventually("node C's entries gone from the directory", || async {
        cluster
            .peer(old_c1)
            .await
            .is_err_and(|s| s.code() == Code::NotFound)
            && cluster
                .select(&[("node", "c")])
                .await
                .is_ok_and(|peers| peers.iter().all(|p| p.node() != 3))
    })
    .await;
    assert!(
        died.elapsed() < ttl + Duration::from_secs(10),
        "{:?}",
        died.elapsed()
    );
    let moved = cluster.select(&[("agent", "c1")]).await.expect("select");
    assert_eq!(moved.len(), 1);
    assert!(moved[0].node() == 1 || moved[0].node() == 2);
    let reply = moved[0]
        .client(EchoClient::new)
        .unary(EchoRequest::default())
        .await
        .expect("c1 answers on its new node");
    assert_eq!(reply.get_ref().answered_by, "c1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_at_start_and_while_running() {
    let pki = Pki::new();
    // Nothing listens on this port: joining fails, saying what to do.
    let port = free_tcp_port();
    let config = ClusterConfig::new(1, format!("redis://127.0.0.1:{port}/"), pki.node("node-1"));
    let server = config
        .server_builder(Server::builder())
        .bind("127.0.0.1:0")
        .expect("bind");
    let error = Cluster::join(&server, config).await.expect_err("no Redis");
    assert!(
        matches!(error, ClusterError::RedisUnreachable { .. }),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("cannot reach the cluster directory"),
        "{error}"
    );
    drop(server);

    let mut redis = Redis::start();
    let ttl = Duration::from_secs(3);
    let a = node(&pki, 1, &redis, ttl).await;
    let b = node(&pki, 2, &redis, ttl).await;
    let (a1, _) = agent(&pki, "a1", "a", &[a.server.local_addr()]).await;
    let (b1, _) = agent(&pki, "b1", "b", &[b.server.local_addr()]).await;
    let cluster = a.cluster();
    eventually("b1 in the directory", || async {
        cluster.peer(b1.connection_id()).await.is_ok()
    })
    .await;

    // Redis goes away: calls to A's own agents still work, calls that need
    // the directory fail with UNAVAILABLE.
    redis.stop();
    let local = cluster.peer(a1.connection_id()).await.expect("a1 is local");
    local
        .client(EchoClient::new)
        .unary(EchoRequest::default())
        .await
        .expect("a local call without Redis");
    let status = cluster
        .peer(b1.connection_id())
        .await
        .expect_err("the directory is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = cluster
        .select(&[])
        .await
        .expect_err("the directory is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Redis returns (empty: it kept nothing): the nodes write their entries
    // again, and cluster calls work again.
    let _redis = Redis::start_on(redis.port);
    eventually("b1 listed again", || async {
        cluster.peer(b1.connection_id()).await.is_ok()
    })
    .await;
    let reply = cluster
        .peer(b1.connection_id())
        .await
        .expect("b1")
        .client(EchoClient::new)
        .unary(EchoRequest::default())
        .await
        .expect("a cluster call after Redis came back");
    assert_eq!(reply.get_ref().answered_by, "b1");
    // And the other way: B, which reads nothing itself, wrote A's entries
    // again too (A's heartbeat found its key gone).
    eventually("a1 listed again, seen from B", || async {
        b.cluster().peer(a1.connection_id()).await.is_ok()
    })
    .await;

    // A clean shutdown: node B leaves, and its agents are gone from the
    // directory at once, not after the TTL.
    let mut b = b;
    b.cluster.take().expect("b in the cluster").leave().await;
    let status = cluster.peer(b1.connection_id()).await.expect_err("b left");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let everyone = cluster.select(&[]).await.expect("select");
    assert_eq!(
        everyone
            .iter()
            .map(|p| p.name().to_owned())
            .collect::<Vec<_>>(),
        ["a1"]
    );
}

/// Every key a node writes for its agents lives for the node's TTL (in
/// milliseconds), from the moment an agent is listed: a node that dies just
/// after leaves nothing behind for longer. A TTL of 60 s puts the next
/// heartbeat (which sets every TTL again) 20 s away, after this check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_entries_expire_with_the_nodes_ttl() {
    let redis = Redis::start();
    let pki = Pki::new();
    let ttl = Duration::from_secs(60);
    let a = node(&pki, 1, &redis, ttl).await;
    let (_a1, _) = agent(&pki, "a1", "a", &[a.server.local_addr()]).await;
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let key = "test:node:1:agents";
    eventually("a1 listed in the directory", || {
        let mut conn = conn.clone();
        async move {
            let listed: usize = redis::cmd("HLEN")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("HLEN");
            listed == 1
        }
    })
    .await;
    let left: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(
        left > 0 && left <= ttl.as_millis() as i64,
        "{key} expires in {left} ms; the TTL is {ttl:?}"
    );
}

/// A TCP relay to Redis whose connections can be made to go silent without
/// a word (no FIN, no RST), as after a partition or a host gone; the
/// connections made afterwards pass.
struct SilentableRelay {
    addr: SocketAddr,
    /// Connections numbered below this stay silent.
    silent_below: Arc<AtomicUsize>,
    /// Connections made so far (numbered from 1).
    made: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentableRelay {
    async fn start(target: SocketAddr) -> SilentableRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let silent_below = Arc::new(AtomicUsize::new(0));
        let silent = silent_below.clone();
        let made = Arc::new(AtomicUsize::new(0));
        let counted = made.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = counted.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, number, silent.clone()));
                tokio::spawn(pipe(server_read, client_write, number, silent.clone()));
            }
        });
        SilentableRelay {
            addr,
            silent_below,
            made,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Every connection made so far stops passing anything, and stays
    /// open; connections made afterwards pass.
    fn silence_existing(&self) {
        let made = self.made.load(Ordering::SeqCst);
        self.silent_below.store(made + 1, Ordering::SeqCst);
    }
}

impl Drop for SilentableRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    number: usize,
    silent_below: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if number < silent_below.load(Ordering::SeqCst) {
            // Silent: hold both sockets, pass nothing, never close.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A node whose event subscription's connection went silent (no reset)
/// notices when its ping goes unanswered, subscribes again, and hears the
/// cluster's events again. Without the ping it waited on the dead
/// subscription for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_event_subscription_is_noticed_and_taken_again() {
    let redis = Redis::start();
    let relay = SilentableRelay::start(SocketAddr::from(([127, 0, 0, 1], redis.port))).await;
    let pki = Pki::new();
    let ttl = Duration::from_secs(3);
    // A reaches Redis through the relay; B directly.
    let a = node_at(&pki, 1, relay.url(), ttl).await;
    let b = node(&pki, 2, &redis, ttl).await;
    let ba = b.server.local_addr();
    let mut events = a.cluster().subscribe();
    let (_first, _) = agent(&pki, "first", "b", &[ba]).await;
    let event = tokio::time::timeout(LIMIT, events.recv())
        .await
        .expect("an event in time")
        .expect("event");
    assert_eq!(event.name, "first");

    // Every connection A has to Redis goes silent; new ones pass.
    relay.silence_existing();
    let made = relay.made.load(Ordering::SeqCst);
    let mut agents = Vec::new();
    let started = Instant::now();
    let heard = loop {
        assert!(
            started.elapsed() < LIMIT,
            "A heard no event within {LIMIT:?} of its subscription going silent"
        );
        // Events published while A has no live subscription are lost:
        // agents keep coming until A hears one.
        let name = format!("later-{}", agents.len());
        agents.push(agent(&pki, &name, "b", &[ba]).await);
        if let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
            break event;
        }
    };
    assert!(heard.name.starts_with("later-"), "{heard:?}");
    assert!(
        relay.made.load(Ordering::SeqCst) > made,
        "A heard it on a new connection"
    );
    assert_eq!(heard.node, 2);
}

/// Node A with a link to node B (made by selecting B's agent), and B: the
/// link is the only connection on B labelled as node 1's.
async fn linked_pair(pki: &Pki, redis: &Redis, ttl: Duration) -> (Node, Node, Client) {
    let a = node(pki, 1, redis, ttl).await;
    let b = node(pki, 2, redis, ttl).await;
    let (b1, _) = agent(pki, "b1", "b", &[b.server.local_addr()]).await;
    // The peers select returns are dropped here: after this only A's table
    // of links holds the link.
    eventually("b1 selected from A", || async {
        a.cluster()
            .select(&[("agent", "b1")])
            .await
            .is_ok_and(|peers| peers.iter().any(|p| p.node() == 2))
    })
    .await;
    assert_eq!(links_from_a(&b), 1, "A holds one link to B");
    (a, b, b1)
}

/// Connections on `b` from node 1's link.
fn links_from_a(b: &Node) -> usize {
    b.server
        .peers()
        .select(|p| p.label(brpc_cluster::NODE_LABEL) == Some("1"))
        .len()
}

/// Waits up to `within` for node 1's link to `b` to be gone.
async fn link_gone(b: &Node, within: Duration) -> bool {
    let started = Instant::now();
    while links_from_a(b) != 0 {
        if started.elapsed() > within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// A node that left the directory is let go when another node next reads
/// the directory to select: A drops its link to B, and B's server (still
/// up) sees that connection end. With a 60 s TTL, A's heartbeat (every
/// 20 s) does not come round within the 10 s allowed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_select_drops_the_link_to_a_node_that_left() {
    let redis = Redis::start();
    let pki = Pki::new();
    let (a, mut b, _b1) = linked_pair(&pki, &redis, Duration::from_secs(60)).await;

    b.cluster.take().expect("in the cluster").leave().await;
    let peers = a.cluster().select(&[]).await.expect("directory readable");
    assert!(
        peers.iter().all(|p| p.node() != 2),
        "B's agents still listed"
    );
    drop(peers);
    assert!(
        link_gone(&b, Duration::from_secs(10)).await,
        "A's link to B still open 10 s after a select"
    );
}

/// Without any select, A's heartbeat lets the link go (here every second:
/// a third of the 3 s TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_drops_the_link_to_a_node_that_left() {
    let redis = Redis::start();
    let pki = Pki::new();
    let (_a, mut b, _b1) = linked_pair(&pki, &redis, Duration::from_secs(3)).await;

    b.cluster.take().expect("in the cluster").leave().await;
    assert!(
        link_gone(&b, Duration::from_secs(15)).await,
        "A's link to B still open 15 s after B left"
    );
}

/// A server in the directory whose certificate (from the cluster CA) lacks
/// the nodes' identity is not linked to: calls to its agents fail
/// `UNAVAILABLE` saying why, rather than going (with their metadata) to a
/// host that is not a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_node_identity_is_not_linked_to() {
    let redis = Redis::start();
    let pki = Pki::new();
    let ttl = Duration::from_secs(60);
    let a = node(&pki, 1, &redis, ttl).await;
    let impostor = node_with(pki.impostor("not-a-node"), 2, redis.url(), ttl).await;
    let (b1, _) = agent(&pki, "b1", "b", &[impostor.server.local_addr()]).await;
    let started = Instant::now();
    let refused = loop {
        match a.cluster().peer(b1.connection_id()).await {
            Err(status) if status.code() == Code::NotFound => {
                assert!(started.elapsed() < LIMIT, "b1 never listed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    let status = refused.map(|_| ()).expect_err("no link to the impostor");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("without the nodes' identity"),
        "{status:?}"
    );
}

/// An agent that labels itself as a node's link (without a node's
/// certificate) is still an agent: listed in the directory, seen from the
/// other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_claiming_the_node_label_is_still_an_agent() {
    let redis = Redis::start();
    let pki = Pki::new();
    let ttl = Duration::from_secs(60);
    let a = node(&pki, 1, &redis, ttl).await;
    let b = node(&pki, 2, &redis, ttl).await;
    let _sneaky = Client::builder()
        .name("sneaky")
        .label(brpc_cluster::NODE_LABEL, "9")
        .label("agent", "sneaky")
        .trust_roots(pki.roots())
        .add_service(EchoServer::new(Agent {
            name: "sneaky".into(),
            probe: Arc::default(),
        }))
        .connect(a.server.local_addr().to_string())
        .await
        .expect("connects");
    eventually("the sneaky agent listed from B", || async {
        b.cluster()
            .select(&[("agent", "sneaky")])
            .await
            .is_ok_and(|peers| peers.len() == 1 && peers[0].node() == 1)
    })
    .await;
}

/// Stray entries in the directory (a member that is not a node id, a field
/// that is not an agent id: another version's, or a hand edit) are left
/// out; the rest of the cluster is still selected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_directory_entries_are_left_out() {
    let redis = Redis::start();
    let pki = Pki::new();
    let ttl = Duration::from_secs(60);
    let a = node(&pki, 1, &redis, ttl).await;
    let b = node(&pki, 2, &redis, ttl).await;
    let (_b1, _) = agent(&pki, "b1", "b", &[b.server.local_addr()]).await;
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SADD")
        .arg("test:nodes")
        .arg("not-a-node")
        .query_async(&mut conn)
        .await
        .expect("SADD");
    let _: () = redis::cmd("HSET")
        .arg("test:node:2:agents")
        .arg("not-an-id")
        .arg("{}")
        .query_async(&mut conn)
        .await
        .expect("HSET");
    eventually("b1 selected from A despite the stray entries", || async {
        a.cluster()
            .select(&[])
            .await
            .is_ok_and(|peers| peers.iter().any(|p| p.node() == 2))
    })
    .await;
}

/// A node that ended without leaving (a crash) and joined again does not
/// keep its earlier process's label index: the sets of agents by label are
/// written afresh, without the ids of agents that were on the old process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_again_drops_its_old_label_index() {
    let redis = Redis::start();
    let pki = Pki::new();
    // Long enough for the old entries to outlive the new process's wait to
    // join (half of it), which takes the id over.
    let ttl = Duration::from_secs(15);
    let mut a = node(&pki, 1, &redis, ttl).await;
    let (a1, _) = agent(&pki, "a1", "a", &[a.server.local_addr()]).await;
    let old_id = a1.connection_id().0;
    let mut conn = redis.connection().await;
    let members = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("SMEMBERS")
                .arg("test:node:1:label:5:agent=a1")
                .query_async::<Vec<u64>>(&mut conn)
                .await
                .expect("SMEMBERS")
        }
    };
    eventually("a1 in node 1's label index", || {
        let members = members(&mut conn);
        async move { members.await.contains(&old_id) }
    })
    .await;
    // Node 1 goes without leaving (its heartbeat stops, nothing is
    // removed), and joins again at once with no agent yet.
    drop(a.cluster.take());
    a.server.close();
    drop(a);
    drop(a1);
    let _again = node(&pki, 1, &redis, ttl).await;
    assert!(
        !members(&mut conn).await.contains(&old_id),
        "the old process's agent is still in the label index"
    );
}

/// Two processes given one node id: the second to join finds the first's
/// entry refreshed while it waits, and fails, leaving the first's entries
/// as they were; once the first has left, the id can be taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_node_id_in_use_is_refused() {
    let redis = Redis::start();
    let pki = Pki::new();
    // The second waits 6 s for the first's heartbeats, every 4 s: room for
    // a heartbeat 2 s late on a loaded machine.
    let ttl = Duration::from_secs(12);
    let mut first = node(&pki, 1, &redis, ttl).await;
    let (config, server) = unjoined(pki.node("node-1"), 1, redis.url(), ttl);
    let refused = Cluster::join(&server, config.clone())
        .await
        .map(|_| ())
        .expect_err("the id is in use");
    match &refused {
        ClusterError::NodeIdInUse { node, addr } => {
            assert_eq!(*node, 1);
            assert_eq!(*addr, Some(first.server.local_addr().to_string()));
        }
        other => panic!("{other:?}"),
    }
    assert!(refused.to_string().contains("its own id"), "{refused}");
    // The first node's entry is still its own.
    let mut conn = redis.connection().await;
    let entry = node_1_entry(&mut conn).await.expect("node 1's entry");
    assert!(
        entry.contains(&first.server.local_addr().to_string()),
        "{entry}"
    );
    first.cluster.take().expect("joined").leave().await;
    let second = Cluster::join(&server, config)
        .await
        .expect("joins once the first left");
    assert_eq!(second.node_id(), 1);
}

/// A node whose id another process holds by the time of its heartbeat (it
/// was cut off from Redis for longer than the TTL, and its id was taken
/// over) stops writing: the other's entry stays, and leaving removes
/// nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_id_was_taken_over_stops_writing() {
    let redis = Redis::start();
    let pki = Pki::new();
    let ttl = Duration::from_secs(3);
    let mut a = node(&pki, 1, &redis, ttl).await;
    let mut conn = redis.connection().await;
    let other =
        r#"{"addr":"127.0.0.1:9","server_name":"x","identity":"","token":"another","beat":0}"#;
    redis::cmd("SET")
        .arg("test:node:1")
        .arg(other)
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(&mut conn)
        .await
        .expect("SET");
    // Two heartbeats of node 1 (a third of the TTL apart) and a margin.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let entry = node_1_entry(&mut conn).await.expect("node 1's entry");
    assert_eq!(entry, other, "node 1 wrote over the other process's entry");
    // Nor does it list agents that connect now (they would be listed under
    // the other process).
    let (_a1, _) = agent(&pki, "a1", "a", &[a.server.local_addr()]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("test:node:1:agents")
        .query_async(&mut conn)
        .await
        .expect("HGETALL");
    assert!(listed.is_empty(), "{listed:?}");
    a.cluster.take().expect("joined").leave().await;
    let entry = node_1_entry(&mut conn).await;
    assert_eq!(
        entry.as_deref(),
        Some(other),
        "leaving removed the other's entry"
    );
}

/// Two processes given the id of a node that ended without leaving, joining
/// at the same time: one takes the id over, the other is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_processes_taking_over_one_id_one_joins() {
    let redis = Redis::start();
    let pki = Pki::new();
    let ttl = Duration::from_secs(6);
    let mut crashed = node(&pki, 1, &redis, ttl).await;
    // Ends without leaving: its entry stays until the TTL.
    drop(crashed.cluster.take());
    let start = || {
        let (config, server) = unjoined(pki.node("node-1"), 1, redis.url(), ttl);
        async move {
            let joined = Cluster::join(&server, config).await;
            (server, joined)
        }
    };
    let ((_s1, first), (_s2, second)) = tokio::join!(start(), start());
    let refused = match (first, second) {
        (Ok(_joined), Err(refused)) | (Err(refused), Ok(_joined)) => refused,
        (Ok(_), Ok(_)) => panic!("both joined as node 1"),
        (Err(a), Err(b)) => panic!("neither joined: {a}; {b}"),
    };
    assert!(
        matches!(refused, ClusterError::NodeIdInUse { node: 1, .. }),
        "{refused:?}"
    );
}
