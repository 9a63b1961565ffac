//! `brpcctl`: an operator's tool for a running brpc server and the agents
//! connected to it, as grpcurl and grpc_health_probe are for gRPC.
//!
//! It connects to the server as a brpc client (QUIC, the same TLS options
//! as the library) and talks to the server's admin service, which must be
//! turned on (`Server::builder().admin(AdminAccess::new()...)`) and must
//! authorise this client, by its mutual-TLS identity or by `--token`.
//!
//! ```text
//! brpcctl --server 127.0.0.1:4433 --pin server.pem agents --label region=eu
//! brpcctl ... watch
//! brpcctl ... call --agent 4711 fleet.v1.Agent/Facts --proto agent.proto -d '{}'
//! brpcctl ... call --all fleet.v1.Agent/Facts --proto agent.proto
//! brpcctl ... health
//! brpcctl ... stats
//! ```
//!
//! Exit codes: 0 success; 1 bad arguments or proto; 2 could not connect;
//! 3 the call failed (for several agents: any of them, or no agent
//! matched); 4 (`health` only) the service is not SERVING, as
//! grpc_health_probe.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use brpc_client::Client;
use brpc_core::Peer;
use brpc_core::conn::{RequestBody, ResponseEvent};
use brpc_core::wire::KeyValue;
use brpc_server::admin::{
    ADMIN_SERVICE, ADMIN_TOKEN, AgentEvent, AgentInfo, EVENT_CONNECTED, EVENT_DISCONNECTED,
    ListAgentsRequest, ListAgentsResponse, RELAY_TO, StatsRequest, StatsResponse, WatchRequest,
};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use tonic::Status;

/// Writes a line to standard output. A reader that went away (`brpcctl
/// agents | head`) ends brpcctl quietly, as it would a C tool.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout().lock(), $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

// brpcctl announces `CLI_LABEL` in Hello, so that listings and broadcasts
// leave operators' own connections out.
use brpc_server::admin::{CLI_LABEL, NODE_LABEL};

/// Whether a peer is an agent: not an operator's tool (brpcctl's own
/// connections) nor another cluster node's link. A link says so with its
/// label and presents a verified certificate (brpcctl cannot tell whose;
/// the cluster checks it carries the nodes' identity): a peer with the
/// label and no certificate is shown as an agent, as the cluster lists it.
fn is_agent(agent: &AgentInfo) -> bool {
    let node_link = agent.labels.contains_key(NODE_LABEL) && !agent.identity.is_empty();
    !agent.labels.contains_key(CLI_LABEL) && !node_link
}

#[derive(Parser)]
#[command(
    name = "brpcctl",
    version,
    about = "List, watch, call and health-check a brpc server and its agents"
)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Connection {
    /// The server's UDP address.
    #[arg(
        long,
        short = 's',
        env = "BRPC_SERVER",
        default_value = "127.0.0.1:4433",
        global = true
    )]
    server: String,
    /// Trust exactly this server certificate (PEM or DER), e.g. the dev
    /// certificate file the server persisted.
    #[arg(long, env = "BRPC_PIN", global = true)]
    pin: Option<PathBuf>,
    /// Trust servers whose certificate chains to a CA in this PEM bundle.
    #[arg(long, env = "BRPC_CA", global = true)]
    ca: Option<PathBuf>,
    /// This client's certificate chain (PEM) for mutual TLS.
    #[arg(long, env = "BRPC_CERT", global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// This client's private key (PEM) for mutual TLS.
    #[arg(long, env = "BRPC_KEY", global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the host of --server).
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// An admin token the server accepts (sent as `brpc-admin-token`).
    #[arg(long, env = "BRPC_ADMIN_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Seconds allowed for connecting and for each call (not for `watch`).
    #[arg(long, default_value_t = 10.0, global = true)]
    timeout: f64,
}

#[derive(Subcommand)]
enum Command {
    /// List the agents connected to the server.
    Agents {
        /// Only agents with this label (key=value; repeat for several).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print agents connecting and disconnecting as it happens.
    Watch {
        /// Only agents with this label (key=value; repeat for several).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Call a method, on the server itself or (relayed by the server) on agents.
    Call(CallArgs),
    /// The server's load and what became of the clients that reached it
    /// (refused for load, handshakes failed or timed out, admitted).
    Stats {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The standard gRPC health check (grpc.health.v1.Health/Check).
    Health {
        /// The service to check (empty: the server as a whole).
        #[arg(default_value = "")]
        service: String,
        /// Check this agent instead of the server.
        #[arg(long)]
        agent: Option<u64>,
    },
}

#[derive(Args)]
struct CallArgs {
    /// The method, as `package.Service/Method`.
    method: String,
    /// The .proto file that defines it (compiled at run time).
    #[arg(long)]
    proto: PathBuf,
    /// Directories imports are found in (default: the proto file's own).
    #[arg(long = "import-path", short = 'I')]
    import_paths: Vec<PathBuf>,
    /// The request message as JSON (default `{}`); repeat for a
    /// client-streaming or bidi method, one message each.
    #[arg(long = "data", short = 'd')]
    data: Vec<String>,
    /// Request metadata, `key: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Print fields that have their default value too.
    #[arg(long)]
    emit_defaults: bool,
    /// Call the agent with this connection id.
    #[arg(long, group = "target")]
    agent: Option<u64>,
    /// Call every agent with this label (key=value; repeat for several),
    /// printing one result per agent.
    #[arg(long = "label", value_parser = parse_label, group = "target")]
    labels: Vec<(String, String)>,
    /// Call every connected agent, printing one result per agent.
    #[arg(long, group = "target")]
    all: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("a label is key=value, not {s:?}"))
}

/// How brpcctl ends: its exit code, and what to say first.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
    fn connect(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
    fn call(status: &Status) -> Self {
        Failure {
            code: 3,
            message: format!(
                "ERROR:\n  Code: {}\n  Message: {}",
                brpc_core::conn::code_name(status.code()),
                status.message()
            ),
        }
    }
}

fn main() -> ExitCode {
    // clap would exit with 2 for bad arguments; brpcctl's 2 means "cannot
    // connect", so usage errors exit 1 as documented.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("brpcctl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("{}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let timeout = Duration::try_from_secs_f64(cli.connection.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| Failure::usage("--timeout must be a positive number of seconds"))?;
    // The proto is checked before connecting: a typo should not wait on the network.
    let call = match &cli.command {
        Command::Call(args) => Some(PreparedCall::new(args)?),
        _ => None,
    };
    let client = connect(&cli.connection, timeout).await?;
    let peer = client
        .peer()
        .ok_or_else(|| Failure::connect("the connection closed right after it opened"))?;
    let session = Session {
        peer,
        token: cli.connection.token.clone(),
        timeout,
    };
    let outcome = match cli.command {
        Command::Agents { labels, json } => agents(&session, labels, json).await,
        Command::Watch { labels, json } => watch(&session, labels, json).await,
        Command::Call(args) => match call {
            Some(call) => call.run(&session, &args).await,
            None => Err(Failure::usage("internal: call not prepared")),
        },
        Command::Stats { json } => stats(&session, json).await,
        Command::Health { service, agent } => health(&session, service, agent).await,
    };
    // Closed either way, so that the server lets go of the connection now
    // rather than at its idle timeout.
    client.shutdown(Duration::from_millis(500)).await;
    outcome
}

async fn connect(options: &Connection, timeout: Duration) -> Result<Client, Failure> {
    let mut builder = Client::builder()
        .name("brpcctl")
        .label(CLI_LABEL, "1")
        .reconnect(false)
        .connect_timeout(timeout);
    let tls = |e: brpc_core::tls::TlsError| Failure::usage(e.to_string());
    if let Some(pin) = &options.pin {
        builder = builder.pin_certificate_file(pin).map_err(tls)?;
    }
    if let Some(ca) = &options.ca {
        builder = builder.trust_pem_file(ca).map_err(tls)?;
    }
    if let (Some(cert), Some(key)) = (&options.cert, &options.key) {
        builder = builder.identity_pem_files(cert, key).map_err(tls)?;
    }
    if options.pin.is_none() && options.ca.is_none() {
        return Err(Failure::usage(
            "say how to trust the server: --pin CERT (its certificate, e.g. the dev \
             certificate file it persisted) or --ca BUNDLE (a PEM bundle of CAs)",
        ));
    }
    if let Some(name) = &options.server_name {
        builder = builder.server_name(name);
    }
    builder
        .connect(options.server.as_str())
        .await
        .map_err(|e| Failure::connect(format!("cannot connect to {}: {e}", options.server)))
}

/// The connection and what every call carries.
struct Session {
    peer: Peer,
    token: Option<String>,
    timeout: Duration,
}

impl Session {
    /// Metadata for a call to the admin service, or relayed to `agent`.
    fn admin_metadata(&self, agent: Option<u64>) -> Vec<KeyValue> {
        let mut metadata = Vec::new();
        if let Some(token) = &self.token {
            metadata.push(KeyValue {
                key: ADMIN_TOKEN.into(),
                value: token.clone(),
            });
        }
        if let Some(agent) = agent {
            metadata.push(KeyValue {
                key: RELAY_TO.into(),
                value: agent.to_string(),
            });
        }
        metadata
    }

    /// One call: `on_message` sees each reply message as it arrives; the
    /// status is how the call ended.
    async fn call(
        &self,
        service: &str,
        method: &str,
        metadata: Vec<KeyValue>,
        body: Body,
        deadline: Option<Duration>,
        mut on_message: impl FnMut(Bytes),
    ) -> Status {
        let deadline = deadline.map(|d| tokio::time::Instant::now() + d);
        let body = match body {
            Body::Single(message) => RequestBody::Single(message),
            Body::Stream(messages) => RequestBody::Stream(futures_util::stream::iter(
                messages.into_iter().map(Ok::<_, Status>),
            )),
        };
        let mut call = match self
            .peer
            .start_call(service, method, metadata, deadline, body)
            .await
        {
            Ok(call) => call,
            Err(status) => return status,
        };
        loop {
            match call.next_event().await {
                ResponseEvent::Headers(_) => {}
                ResponseEvent::Message(message) => on_message(message),
                ResponseEvent::End {
                    status, message, ..
                } => {
                    if let Some(message) = message {
                        on_message(message);
                    }
                    return brpc_core::conn::end_status(status);
                }
            }
        }
    }

    /// A unary call whose answer is one `M`.
    async fn unary<M: Message + Default>(
        &self,
        service: &str,
        method: &str,
        metadata: Vec<KeyValue>,
        request: &impl Message,
    ) -> Result<M, Failure> {
        let mut reply = None;
        let status = self
            .call(
                service,
                method,
                metadata,
                Body::Single(request.encode_to_vec().into()),
                Some(self.timeout),
                |bytes| reply = Some(M::decode(bytes)),
            )
            .await;
        if status.code() != tonic::Code::Ok {
            return Err(Failure::call(&status));
        }
        match reply {
            Some(Ok(reply)) => Ok(reply),
            Some(Err(e)) => Err(Failure::call(&Status::internal(format!(
                "{service}/{method} answered a message that does not decode: {e}"
            )))),
            None => Err(Failure::call(&Status::internal(format!(
                "{service}/{method} answered no message"
            )))),
        }
    }

    /// Every agent with `labels` (all of them if none), paging through the
    /// admin service; operators' own connections are left out.
    async fn list(&self, labels: &[(String, String)]) -> Result<Vec<AgentInfo>, Failure> {
        let mut agents = Vec::new();
        let mut after = 0;
        loop {
            let request = ListAgentsRequest {
                labels: labels.iter().cloned().collect(),
                after,
                limit: 0,
            };
            let page: ListAgentsResponse = self
                .unary(
                    ADMIN_SERVICE,
                    "ListAgents",
                    self.admin_metadata(None),
                    &request,
                )
                .await?;
            agents.extend(page.agents.into_iter().filter(is_agent));
            if page.next_after == 0 {
                return Ok(agents);
            }
            after = page.next_after;
        }
    }
}

#[derive(Clone)]
enum Body {
    Single(Bytes),
    Stream(Vec<Bytes>),
}

async fn agents(
    session: &Session,
    labels: Vec<(String, String)>,
    json: bool,
) -> Result<u8, Failure> {
    let agents = session.list(&labels).await?;
    if json {
        let list: Vec<_> = agents.iter().map(agent_json).collect();
        out!("{}", serde_json::Value::Array(list));
        return Ok(0);
    }
    let now = SystemTime::now();
    let rows: Vec<[String; 7]> = agents
        .iter()
        .map(|a| {
            [
                a.id.to_string(),
                a.name.clone(),
                labels_text(&a.labels),
                a.remote_address.clone(),
                if a.identity.is_empty() {
                    "-".into()
                } else {
                    a.identity.clone()
                },
                since(now, a.connected_at_unix_ms),
                a.calls_in_flight.to_string(),
            ]
        })
        .collect();
    print_table(
        [
            "ID",
            "NAME",
            "LABELS",
            "ADDRESS",
            "IDENTITY",
            "CONNECTED",
            "CALLS",
        ],
        &rows,
    );
    Ok(0)
}

async fn watch(
    session: &Session,
    labels: Vec<(String, String)>,
    json: bool,
) -> Result<u8, Failure> {
    let request = WatchRequest {
        labels: labels.into_iter().collect(),
    };
    let mut call = session
        .peer
        .start_call(
            ADMIN_SERVICE,
            "Watch",
            session.admin_metadata(None),
            None,
            RequestBody::<futures_util::stream::Empty<Result<Bytes, Status>>>::Single(
                request.encode_to_vec().into(),
            ),
        )
        .await
        .map_err(|status| Failure::call(&status))?;
    loop {
        match call.next_event().await {
            ResponseEvent::Headers(_) => {
                eprintln!(
                    "watching {} (Ctrl-C to stop)",
                    session.peer.remote_address()
                );
            }
            ResponseEvent::Message(bytes) => {
                let Ok(event) = AgentEvent::decode(bytes) else {
                    eprintln!("brpcctl: an event that does not decode; skipped");
                    continue;
                };
                // Operators' own connections (this one's included) and other
                // nodes' links come and go: not agents.
                if event.agent.as_ref().is_some_and(|a| !is_agent(a)) {
                    continue;
                }
                print_event(&event, json);
            }
            ResponseEvent::End { status, .. } => {
                return match status {
                    Ok(()) => Ok(0),
                    Err(status) => Err(Failure::call(&status)),
                };
            }
        }
    }
}

fn print_event(event: &AgentEvent, json: bool) {
    let kind = match event.kind {
        EVENT_CONNECTED => "connected",
        EVENT_DISCONNECTED => "disconnected",
        _ => "missed",
    };
    if json {
        let mut line = serde_json::json!({ "event": kind });
        if let Some(agent) = &event.agent {
            line["agent"] = agent_json(agent);
        }
        if !event.reason.is_empty() {
            line["reason"] = event.reason.clone().into();
        }
        if event.missed > 0 {
            line["missed"] = event.missed.into();
        }
        out!("{line}");
        return;
    }
    match &event.agent {
        Some(a) => {
            let sign = if event.kind == EVENT_CONNECTED {
                '+'
            } else {
                '-'
            };
            let mut line = format!(
                "{sign} {} {} {} {}",
                a.id,
                a.name,
                a.remote_address,
                labels_text(&a.labels)
            );
            if !event.reason.is_empty() {
                line += &format!(" ({})", event.reason);
            }
            out!("{line}");
        }
        None => out!("! missed {} events (watching too slowly)", event.missed),
    }
}

/// A `call` whose method and request messages are resolved from the proto.
struct PreparedCall {
    service: String,
    method: String,
    output: MessageDescriptor,
    body: Body,
    server_streaming: bool,
    metadata: Vec<KeyValue>,
}

impl PreparedCall {
    fn new(args: &CallArgs) -> Result<Self, Failure> {
        let (service, method) = args.method.rsplit_once('/').ok_or_else(|| {
            Failure::usage(format!(
                "the method is package.Service/Method, not {:?}",
                args.method
            ))
        })?;
        let pool = compile(&args.proto, &args.import_paths)?;
        let service_desc = pool.get_service_by_name(service).ok_or_else(|| {
            let known: Vec<_> = pool.services().map(|s| s.full_name().to_owned()).collect();
            Failure::usage(format!(
                "{} defines no service {service} (it has: {})",
                args.proto.display(),
                known.join(", ")
            ))
        })?;
        let method_desc = service_desc
            .methods()
            .find(|m| m.name() == method)
            .ok_or_else(|| Failure::usage(format!("service {service} has no method {method}")))?;
        let data: Vec<&str> = if args.data.is_empty() {
            vec!["{}"]
        } else {
            args.data.iter().map(String::as_str).collect()
        };
        let messages = data
            .iter()
            .map(|json| encode_json(&method_desc.input(), json))
            .collect::<Result<Vec<_>, _>>()?;
        let body = if method_desc.is_client_streaming() {
            Body::Stream(messages)
        } else if messages.len() == 1 {
            Body::Single(messages.into_iter().next().unwrap_or_default())
        } else {
            return Err(Failure::usage(format!(
                "{method} takes one request message; -d was given {} times",
                messages.len()
            )));
        };
        let metadata = args
            .headers
            .iter()
            .map(|h| {
                let (key, value) = h.split_once(':').ok_or_else(|| {
                    Failure::usage(format!("a header is 'key: value', not {h:?}"))
                })?;
                Ok(KeyValue {
                    key: key.trim().to_ascii_lowercase(),
                    value: value.trim().to_owned(),
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        Ok(PreparedCall {
            service: service.to_owned(),
            method: method.to_owned(),
            output: method_desc.output(),
            body,
            server_streaming: method_desc.is_server_streaming(),
            metadata,
        })
    }

    async fn run(&self, session: &Session, args: &CallArgs) -> Result<u8, Failure> {
        let options = SerializeOptions::new().skip_default_fields(!args.emit_defaults);
        if args.all || !args.labels.is_empty() {
            return self.run_many(session, &args.labels, &options).await;
        }
        // The token goes with every call brpcctl was given one for: a call
        // to the admin service itself needs it as much as a relayed one.
        let mut metadata = self.metadata.clone();
        metadata.extend(session.admin_metadata(args.agent));
        let mut bad = None;
        let status = session
            .call(
                &self.service,
                &self.method,
                metadata,
                self.body.clone(),
                Some(session.timeout),
                |bytes| match decode_json(&self.output, bytes, &options) {
                    Ok(json) => out!(
                        "{}",
                        serde_json::to_string_pretty(&json).unwrap_or_default()
                    ),
                    Err(e) => bad = Some(e),
                },
            )
            .await;
        if let Some(e) = bad {
            return Err(Failure {
                code: 3,
                message: e,
            });
        }
        if status.code() != tonic::Code::Ok {
            return Err(Failure::call(&status));
        }
        Ok(0)
    }

    /// The call on every matching agent at once (64 at a time), one JSON
    /// line per agent as each finishes.
    async fn run_many(
        &self,
        session: &Session,
        labels: &[(String, String)],
        options: &SerializeOptions,
    ) -> Result<u8, Failure> {
        let agents = session.list(labels).await?;
        if agents.is_empty() {
            // A typo in a label must not look like success to a script.
            return Err(Failure {
                code: 3,
                message: if labels.is_empty() {
                    "no agent is connected".to_owned()
                } else {
                    format!("no agent matches the labels {labels:?}; `brpcctl agents` lists them")
                },
            });
        }
        let mut failed = 0usize;
        let mut results = futures_util::stream::iter(agents.iter().map(|agent| async move {
            let mut metadata = self.metadata.clone();
            metadata.extend(session.admin_metadata(Some(agent.id)));
            let mut replies = Vec::new();
            let status = session
                .call(
                    &self.service,
                    &self.method,
                    metadata,
                    self.body.clone(),
                    Some(session.timeout),
                    |bytes| {
                        replies.push(decode_json(&self.output, bytes, options));
                    },
                )
                .await;
            (agent, status, replies)
        }))
        .buffer_unordered(64);
        while let Some((agent, status, replies)) = results.next().await {
            let mut line = serde_json::json!({
                "agent": agent.id,
                "name": agent.name,
                "code": brpc_core::conn::code_name(status.code()),
            });
            if status.code() != tonic::Code::Ok {
                failed += 1;
                line["error"] = status.message().into();
            }
            let undecodable = replies.iter().any(Result::is_err);
            if undecodable && status.code() == tonic::Code::Ok {
                failed += 1;
                line["error"] = "a reply did not decode as the proto's output message".into();
            }
            let replies: Vec<serde_json::Value> = replies
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| serde_json::json!({ "undecodable": e })))
                .collect();
            if self.server_streaming {
                line["replies"] = replies.into();
            } else if let Some(reply) = replies.into_iter().next() {
                line["reply"] = reply;
            }
            out!("{line}");
        }
        if failed > 0 {
            eprintln!("{failed} of {} agents failed", agents.len());
            return Ok(3);
        }
        Ok(0)
    }
}

fn compile(proto: &std::path::Path, import_paths: &[PathBuf]) -> Result<DescriptorPool, Failure> {
    let mut includes = import_paths.to_vec();
    if includes.is_empty() {
        includes.push(
            proto
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from),
        );
    }
    let mut compiler = protox::Compiler::new(&includes)
        .map_err(|e| Failure::usage(format!("import paths: {e}")))?;
    compiler.include_imports(true);
    compiler
        .open_file(proto)
        .map_err(|e| Failure::usage(format!("{}: {e}", proto.display())))?;
    Ok(compiler.descriptor_pool())
}

fn encode_json(desc: &MessageDescriptor, json: &str) -> Result<Bytes, Failure> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let message = DynamicMessage::deserialize(desc.clone(), &mut deserializer)
        .and_then(|m| deserializer.end().map(|()| m))
        .map_err(|e| Failure::usage(format!("-d {json:?} is not a {}: {e}", desc.full_name())))?;
    Ok(message.encode_to_vec().into())
}

fn decode_json(
    desc: &MessageDescriptor,
    bytes: Bytes,
    options: &SerializeOptions,
) -> Result<serde_json::Value, String> {
    let message = DynamicMessage::decode(desc.clone(), bytes)
        .map_err(|e| format!("a reply that is not a {}: {e}", desc.full_name()))?;
    message
        .serialize_with_options(serde_json::value::Serializer, options)
        .map_err(|e| e.to_string())
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

async fn health(session: &Session, service: String, agent: Option<u64>) -> Result<u8, Failure> {
    let request = HealthCheckRequest { service };
    let metadata = if agent.is_some() {
        session.admin_metadata(agent)
    } else {
        Vec::new()
    };
    let reply: HealthCheckResponse = session
        .unary("grpc.health.v1.Health", "Check", metadata, &request)
        .await?;
    let name = match reply.status {
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "UNKNOWN",
    };
    out!("status: {name}");
    Ok(if reply.status == 1 { 0 } else { 4 })
}

async fn stats(session: &Session, json: bool) -> Result<u8, Failure> {
    let s: StatsResponse = session
        .unary(
            ADMIN_SERVICE,
            "Stats",
            session.admin_metadata(None),
            &StatsRequest {},
        )
        .await?;
    let rows = [
        ("connected", s.connected),
        ("handshakes_in_progress", s.handshakes_in_progress),
        ("handshakes_waiting", s.handshakes_waiting),
        ("buffered_bytes", s.buffered_bytes),
        ("refused_queue_full", s.refused_queue_full),
        ("refused_after_waiting", s.refused_after_waiting),
        ("refused_closing", s.refused_closing),
        ("turned_away", s.turned_away),
        ("handshakes_started", s.handshakes_started),
        ("handshakes_failed", s.handshakes_failed),
        ("handshakes_timed_out", s.handshakes_timed_out),
        ("sessions_refused", s.sessions_refused),
        ("admitted", s.admitted),
    ];
    if json {
        let object: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).into()))
            .collect();
        out!("{}", serde_json::Value::Object(object));
        return Ok(0);
    }
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, value) in rows {
        out!("{name:<width$}  {value}");
    }
    Ok(0)
}

fn agent_json(a: &AgentInfo) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "name": a.name,
        "labels": a.labels,
        "remote_address": a.remote_address,
        "identity": a.identity,
        "connected_at": rfc3339(a.connected_at_unix_ms),
        "calls_in_flight": a.calls_in_flight,
    })
}

fn labels_text(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join(",")
    }
}

/// How long ago, as `3m12s`.
fn since(now: SystemTime, unix_ms: u64) -> String {
    let then = UNIX_EPOCH + Duration::from_millis(unix_ms);
    let secs = now.duration_since(then).map_or(0, |d| d.as_secs());
    match secs {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m{:02}s ago", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m ago", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h ago", s / 86_400, (s % 86_400) / 3600),
    }
}

/// `unix_ms` as an RFC 3339 UTC time, to the second.
fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599_000), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn labels_parse_and_print_sorted() {
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_label("nolabel").is_err());
        let labels: HashMap<_, _> =
            [("z".to_owned(), "1".to_owned()), ("a".into(), "2".into())].into();
        assert_eq!(labels_text(&labels), "a=2,z=1");
    }
}
