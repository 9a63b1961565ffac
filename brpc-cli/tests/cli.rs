//! brpcctl as an operator runs it: a server with the admin service on, two
//! agents, and the built `brpcctl` binary run as a subprocess against them.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use brpc::core::conn::{RequestBody, ResponseEvent};
use brpc::core::wire::KeyValue;
use brpc::server::AdminAccess;
use brpc::server::admin::{ADMIN_SERVICE, ListAgentsRequest, RELAY_TO};
use brpc::{Client, Server};
use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Code, Request, Response, Status};

#[allow(missing_docs, clippy::unwrap_used)]
mod proto {
    include!(concat!(env!("OUT_DIR"), "/fleet.v1.rs"));
}
use proto::agent_server::{Agent, AgentServer};
use proto::{Facts, FactsRequest};

const TOKEN: &str = "op-token-for-tests";
const LIMIT: Duration = Duration::from_secs(60);

/// An agent that says who it is.
struct Named(&'static str);

#[tonic::async_trait]
impl Agent for Named {
    async fn facts(&self, _: Request<FactsRequest>) -> Result<Response<Facts>, Status> {
        Ok(Response::new(Facts {
            hostname: self.0.into(),
            os: "linux".into(),
            cores: 4,
            load: 0.5,
        }))
    }
}

struct Setup {
    server: Server,
    pin: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("brpcctl-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

async fn server(tag: &str, admin: bool) -> Setup {
    let dir = temp_dir(tag);
    let pin = dir.0.join("server.pem");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let mut builder = Server::builder()
        .dev_certificate_file(&pin)
        .optional_client_ca(brpc::tls::pinned_roots(&link_ca().0).expect("roots"))
        .add_service(health);
    if admin {
        builder = builder.admin(AdminAccess::new().token(TOKEN));
    }
    let server = builder.bind("127.0.0.1:0").expect("bind");
    Setup {
        server,
        pin,
        _dir: dir,
    }
}

/// A CA for cluster nodes' client certificates (made once per test
/// process) and a node certificate from it: chain and key.
fn link_ca() -> &'static (
    rustls_pki_types::CertificateDer<'static>,
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivatePkcs8KeyDer<'static>,
) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    static CA: std::sync::OnceLock<(
        rustls_pki_types::CertificateDer<'static>,
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivatePkcs8KeyDer<'static>,
    )> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "nodes CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("self-signed");
        let issuer = Issuer::new(params, key);
        let node_key = KeyPair::generate().expect("key");
        let mut node = CertificateParams::default();
        node.distinguished_name.push(DnType::CommonName, "node-2");
        node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = node.signed_by(&node_key, &issuer).expect("sign");
        (
            ca.der().clone(),
            vec![leaf.der().clone()],
            rustls_pki_types::PrivatePkcs8KeyDer::from(node_key.serialize_der()),
        )
    })
}

async fn agent(setup: &Setup, name: &'static str, region: &str) -> Client {
    Client::builder()
        .name(name)
        .label("region", region)
        .pin_certificate_file(&setup.pin)
        .expect("pin")
        .add_service(AgentServer::new(Named(name)))
        .connect(setup.server.local_addr().to_string())
        .await
        .expect("agent connects")
}

fn brpcctl(setup: &Setup, token: bool, args: &[&str]) -> tokio::process::Command {
    brpcctl_pinned(setup, &setup.pin, token, args)
}

/// brpcctl trusting the certificate in `pin` (the server's, or another).
fn brpcctl_pinned(
    setup: &Setup,
    pin: &std::path::Path,
    token: bool,
    args: &[&str],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_brpcctl"));
    command
        .arg("--server")
        .arg(setup.server.local_addr().to_string())
        .arg("--pin")
        .arg(pin)
        .env_remove("BRPC_ADMIN_TOKEN")
        .kill_on_drop(true);
    if token {
        command.args(["--token", TOKEN]);
    }
    command.args(args);
    command
}

async fn run(setup: &Setup, args: &[&str]) -> Output {
    run_with(setup, true, args).await
}

async fn run_with(setup: &Setup, token: bool, args: &[&str]) -> Output {
    let output = tokio::time::timeout(LIMIT, brpcctl(setup, token, args).output())
        .await
        .expect("brpcctl finished in time")
        .expect("brpcctl runs");
    eprintln!(
        "brpcctl {args:?} -> {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn agent_proto() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/agent.proto").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_call_watch_and_health_through_brpcctl() {
    let setup = server("main", true).await;
    let eu = agent(&setup, "agent-eu", "eu").await;
    let us = agent(&setup, "agent-us", "us").await;

    // agents: both, with their labels, as JSON.
    let out = run(&setup, &["agents", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let list: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("agents --json is a JSON array");
    let mut seen: Vec<(String, String, u64)> = list
        .iter()
        .map(|a| {
            (
                a["name"].as_str().expect("name").to_owned(),
                a["labels"]["region"].as_str().expect("label").to_owned(),
                a["id"].as_u64().expect("id"),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("agent-eu".into(), "eu".into(), eu.connection_id().0),
            ("agent-us".into(), "us".into(), us.connection_id().0),
        ]
    );
    // The table form names them too, and a label filter picks one.
    let out = run(&setup, &["agents", "--label", "region=eu"]).await;
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("agent-eu") && !table.contains("agent-us"),
        "{table}"
    );

    // call --label: the us agent only, its reply as JSON.
    let proto = agent_proto();
    let out = run(
        &setup,
        &[
            "call",
            "--label",
            "region=us",
            "fleet.v1.Agent/Facts",
            "--proto",
            &proto,
            "-d",
            "{}",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["agent"].as_u64(), Some(us.connection_id().0));
    assert_eq!(lines[0]["code"], "OK");
    assert_eq!(lines[0]["reply"]["hostname"], "agent-us");
    assert_eq!(lines[0]["reply"]["cores"], 4);

    // call --agent: one agent, the reply pretty-printed.
    let id = eu.connection_id().0.to_string();
    let out = run(
        &setup,
        &[
            "call",
            "--agent",
            &id,
            "fleet.v1.Agent/Facts",
            "--proto",
            &proto,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON reply");
    assert_eq!(reply["hostname"], "agent-eu");

    // call --all: one result per agent.
    let out = run(
        &setup,
        &["call", "--all", "fleet.v1.Agent/Facts", "--proto", &proto],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let mut hosts: Vec<String> = stdout_lines(&out)
        .iter()
        .map(|l| {
            l["reply"]["hostname"]
                .as_str()
                .expect("hostname")
                .to_owned()
        })
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["agent-eu", "agent-us"]);

    // Another cluster node's link (its label and a verified certificate;
    // it serves nothing) is not an agent: `call --all` does not call it,
    // and still succeeds.
    let (_, chain, key) = link_ca();
    let link = Client::builder()
        .name("brpc-node-2")
        .label("brpc.node", "2")
        .identity(chain.clone(), key.clone_key().into())
        .pin_certificate_file(&setup.pin)
        .expect("pin")
        .connect(setup.server.local_addr().to_string())
        .await
        .expect("a node's link connects");
    let out = run(
        &setup,
        &["call", "--all", "fleet.v1.Agent/Facts", "--proto", &proto],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout_lines(&out).len(), 2, "the two agents only");
    let out = run(&setup, &["agents", "--json"]).await;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("brpc-node-2"),
        "the link is not listed as an agent"
    );
    drop(link);
    // The label without a certificate does not make a node's link: that
    // peer is listed as the agent it is (as the cluster lists it).
    let claims = Client::builder()
        .name("claims-to-be-a-node")
        .label("brpc.node", "3")
        .pin_certificate_file(&setup.pin)
        .expect("pin")
        .connect(setup.server.local_addr().to_string())
        .await
        .expect("connects");
    let out = run(&setup, &["agents", "--json"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("claims-to-be-a-node"));
    drop(claims);
    // Both gone before `watch` below, which would print their leaving.
    let started = std::time::Instant::now();
    while setup.server.peers().len() > 2 {
        assert!(
            started.elapsed() < LIMIT,
            "the two extra peers did not leave"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Labels no agent has (a typo): exit 3, not a silent success.
    let out = run(
        &setup,
        &[
            "call",
            "--label",
            "region=ue",
            "fleet.v1.Agent/Facts",
            "--proto",
            &proto,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent matches"));

    // A call to the admin service itself carries the token.
    let admin_proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/brpc_admin.proto");
    let out = run(
        &setup,
        &["call", "brpc.admin.v1.Admin/Stats", "--proto", admin_proto],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));

    // A call to an agent that is not there: NOT_FOUND, exit 3.
    let out = run(
        &setup,
        &[
            "call",
            "--agent",
            "1",
            "fleet.v1.Agent/Facts",
            "--proto",
            &proto,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));

    // watch: a third agent joining is printed.
    let mut watcher = brpcctl(&setup, true, &["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("watch runs");
    let mut stderr = BufReader::new(watcher.stderr.take().expect("stderr")).lines();
    let mut stdout = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(LIMIT, stderr.next_line())
        .await
        .expect("watch says it is watching")
        .expect("stderr")
        .expect("a line");
    assert!(ready.starts_with("watching"), "{ready}");
    let third = agent(&setup, "agent-ap", "ap").await;
    let line = tokio::time::timeout(LIMIT, stdout.next_line())
        .await
        .expect("an event in time")
        .expect("stdout")
        .expect("a line");
    let event: serde_json::Value = serde_json::from_str(&line).expect("JSON event");
    assert_eq!(event["event"], "connected");
    assert_eq!(event["agent"]["name"], "agent-ap");
    assert_eq!(event["agent"]["id"].as_u64(), Some(third.connection_id().0));
    drop(watcher);

    // health: SERVING exits 0; an unknown service does not.
    let out = run(&setup, &["health"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "status: SERVING"
    );
    let out = run(&setup, &["health", "no.such.Service"]).await;
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));

    // Without the token brpcctl is refused.
    let out = run_with(&setup, false, &["agents"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"));
}

/// One raw call on `client`'s connection to the server; its end status.
async fn raw_call(
    client: &Client,
    service: &str,
    method: &str,
    metadata: Vec<KeyValue>,
    message: Bytes,
) -> Status {
    let peer = client.peer().expect("connected");
    let mut call = peer
        .start_call(
            service,
            method,
            metadata,
            None,
            RequestBody::<futures_util::stream::Empty<Result<Bytes, Status>>>::Single(message),
        )
        .await
        .expect("call starts");
    loop {
        if let ResponseEvent::End { status, .. } = call.next_event().await {
            return brpc::core::conn::end_status(status);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_refused_the_admin_service_and_the_relay() {
    let setup = server("denied", true).await;
    let mallory = agent(&setup, "mallory", "eu").await;
    let victim = agent(&setup, "victim", "eu").await;
    let list = ListAgentsRequest::default().encode_to_vec().into();
    let status = raw_call(&mallory, ADMIN_SERVICE, "ListAgents", Vec::new(), list).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Asking the server to relay to another agent: refused too.
    let relay = vec![KeyValue {
        key: RELAY_TO.into(),
        value: victim.connection_id().0.to_string(),
    }];
    let status = raw_call(&mallory, "fleet.v1.Agent", "Facts", relay, Bytes::new()).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // A wrong token is no better than none.
    let wrong = vec![KeyValue {
        key: brpc::server::admin::ADMIN_TOKEN.into(),
        value: "op-token-for-tesTs".into(),
    }];
    let list = ListAgentsRequest::default().encode_to_vec().into();
    let status = raw_call(&mallory, ADMIN_SERVICE, "ListAgents", wrong, list).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_service_is_off_by_default() {
    let setup = server("off", false).await;
    let _agent = agent(&setup, "agent", "eu").await;
    let out = run(&setup, &["agents"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNIMPLEMENTED"));
    // The server's own services still answer brpcctl.
    let out = run(&setup, &["health"]).await;
    assert_eq!(out.status.code(), Some(0));
    // Bad arguments exit 1 (2 is "cannot connect"), before any network.
    let out = run(&setup, &["agents", "--label", "no-equals-sign"]).await;
    assert_eq!(out.status.code(), Some(1));
    let out = run(&setup, &["--timeout", "0", "agents"]).await;
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_what_became_of_the_clients() {
    let setup = server("stats", true).await;
    let _eu = agent(&setup, "agent-eu", "eu").await;
    let _us = agent(&setup, "agent-us", "us").await;
    // brpcctl trusting another certificate: it cannot connect (exit 2), and
    // the server counts a handshake started and failed.
    let other = setup._dir.0.join("other.pem");
    let pem = brpc::core::tls::DevCertificate::generate()
        .expect("cert")
        .certificate_pem();
    std::fs::write(&other, pem).expect("write other.pem");
    let out = brpcctl_pinned(&setup, &other, true, &["stats"]).output();
    let out = tokio::time::timeout(LIMIT, out)
        .await
        .expect("brpcctl finished in time")
        .expect("brpcctl runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while setup.server.admission_stats().handshakes_failed == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed handshake was never counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Two agents and brpcctl itself admitted; one handshake failed.
    let out = run(&setup, &["stats", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let stats: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stats --json is a JSON object");
    assert_eq!(stats["admitted"], 3, "{stats}");
    assert_eq!(stats["connected"], 3, "{stats}");
    assert_eq!(stats["handshakes_started"], 4, "{stats}");
    assert_eq!(stats["handshakes_failed"], 1, "{stats}");
    for zero in [
        "handshakes_in_progress",
        "handshakes_waiting",
        "refused_queue_full",
        "refused_after_waiting",
        "refused_closing",
        "turned_away",
        "handshakes_timed_out",
        "sessions_refused",
    ] {
        assert_eq!(stats[zero], 0, "{zero}: {stats}");
    }
    // The same as the library says (the second brpcctl counted too).
    let library = setup.server.admission_stats();
    assert_eq!(library.admitted, 3);
    assert_eq!(library.handshakes_failed, 1);

    // The text form: one name and value a line; a third brpcctl admitted.
    let out = run(&setup, &["stats"]).await;
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let admitted = text
        .lines()
        .find_map(|l| l.strip_prefix("admitted"))
        .expect("an admitted line");
    assert_eq!(admitted.trim(), "4", "{text}");

    // proto/brpc_admin.proto describes the same answer: a generic call
    // with the published proto decodes it with the same names.
    let admin_proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/brpc_admin.proto");
    let header = format!("brpc-admin-token: {TOKEN}");
    let out = run(
        &setup,
        &[
            "call",
            "brpc.admin.v1.Admin/Stats",
            "--proto",
            admin_proto,
            "-H",
            &header,
            "-d",
            "{}",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON reply");
    // proto3 JSON writes 64-bit integers as strings.
    assert_eq!(reply["admitted"], "5", "{reply}");
    assert_eq!(reply["handshakesStarted"], "6", "{reply}");
    assert_eq!(reply["handshakesFailed"], "1", "{reply}");
    // (Not `connected`: the brpcctl before may not be unlisted yet.)

    // Without the token: refused like the rest of the admin service.
    let out = run_with(&setup, false, &["stats"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"));
}
