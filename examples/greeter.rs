//! The greeter story: the server hosts `Greeter`, the client hosts `Namer`, and
//! `Greet` calls back the calling client's `Name` over the same connection.
//!
//! One process, server and client over loopback QUIC with a dev certificate:
//!
//! ```text
//! cargo run --example greeter
//! ```
//!
//! Two processes (the server keeps its dev certificate in a file, created on
//! its first run and reused after; the client pins that file):
//!
//! ```text
//! cargo run --example greeter -- server --addr 127.0.0.1:4433
//! cargo run --example greeter -- client --addr 127.0.0.1:4433 --name Ada
//! ```
//!
//! Both take `--cert PATH` (default: `brpc-greeter-cert.pem` in the temp dir).

use std::path::PathBuf;

use brpc::{Client, Peer, Server};
use tonic::{Request, Response, Status};

/// Generated from proto/greeter.proto by brpc-build (see build.rs): tonic's
/// code (the `Greeter` and `Namer` traits) and, beside it, brpc's direct path
/// (`greeter_brpc`, `namer_brpc`: a dispatcher and a typed client each).
#[allow(missing_docs)]
pub mod proto {
    tonic::include_proto!("greeter.v1");
}
use proto::greeter_brpc::{GreeterClient, GreeterService};
use proto::greeter_server::Greeter;
use proto::namer_brpc::{NamerClient, NamerService};
use proto::namer_server::Namer;
use proto::{GreetReply, GreetRequest, NameReply, NameRequest};

/// The server's service: greets whoever calls, by asking them their name.
struct MyGreeter;

#[tonic::async_trait]
impl Greeter for MyGreeter {
    async fn greet(&self, request: Request<GreetRequest>) -> Result<Response<GreetReply>, Status> {
        // The handle of the client making this call, stamped by the server.
        let peer = Peer::from_request(&request)?;
        println!(
            "[server] Greet from {} ({}); calling back its Namer",
            peer.connection_id(),
            peer.remote_address()
        );
        let mut namer = peer.client(NamerClient::new);
        let name = namer.name(NameRequest {}).await?.into_inner().name;
        let greeting = match request.into_inner().greeting {
            g if g.is_empty() => "Hello".to_owned(),
            g => g,
        };
        Ok(Response::new(GreetReply {
            message: format!("{greeting}, {name}"),
        }))
    }
}

/// The client's service: tells the server its name.
struct MyNamer {
    name: String,
}

#[tonic::async_trait]
impl Namer for MyNamer {
    async fn name(&self, _request: Request<NameRequest>) -> Result<Response<NameReply>, Status> {
        println!(
            "[client] server asked for my name; answering {:?}",
            self.name
        );
        Ok(Response::new(NameReply {
            name: self.name.clone(),
        }))
    }
}

/// The greeter story (see the header of examples/greeter.rs).
#[derive(clap::Parser)]
struct Args {
    /// `server` or `client` for two processes; both in one process if absent.
    #[arg(value_parser = ["server", "client"])]
    mode: Option<String>,
    /// The server's address (default 127.0.0.1:4433 for two processes, a
    /// free port in one process).
    #[arg(long)]
    addr: Option<String>,
    /// The server's dev certificate, which the client pins.
    #[arg(long, default_value_os_t = std::env::temp_dir().join("brpc-greeter-cert.pem"))]
    cert: PathBuf,
    /// The name the client answers with.
    #[arg(long, default_value = "Ada")]
    name: String,
}

async fn run_server(addr: &str, cert: &PathBuf) -> Result<Server, Box<dyn std::error::Error>> {
    // A persisted dev certificate: created on the first run, reused after,
    // so clients that pinned it reconnect to a restarted server.
    let server = Server::builder()
        .dev_certificate_file(cert)
        // The direct path: calls decoded straight into the tonic trait.
        .add_direct(GreeterService::new(MyGreeter))
        .bind(addr)?;
    println!(
        "[server] listening on {} (ALPN brpc/1); dev certificate in {}",
        server.local_addr(),
        cert.display()
    );
    Ok(server)
}

async fn run_client(
    addr: &str,
    cert: &PathBuf,
    name: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let client = Client::builder()
        .name(name)
        .add_direct(NamerService::new(MyNamer {
            name: name.to_owned(),
        }))
        .pin_certificate_file(cert)?
        .connect(addr)
        .await?;
    println!(
        "[client] connected to {addr}; server assigned {}",
        client.connection_id()
    );
    let mut greeter = GreeterClient::new(client.channel());
    println!("[client] calling Greet");
    let reply = greeter
        .greet(GreetRequest {
            greeting: "Hello".into(),
        })
        .await?
        .into_inner();
    println!("[client] reply: {}", reply.message);
    client.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(reply.message)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let default_addr = if args.mode.is_some() {
        "127.0.0.1:4433"
    } else {
        "127.0.0.1:0"
    };
    let addr = args.addr.clone().unwrap_or_else(|| default_addr.to_owned());
    match args.mode.as_deref() {
        Some("server") => {
            let _server = run_server(&addr, &args.cert).await?;
            println!("[server] press Ctrl-C to stop");
            tokio::signal::ctrl_c().await?;
        }
        Some(_) => {
            run_client(&addr, &args.cert, &args.name).await?;
        }
        None => {
            let server = run_server(&addr, &args.cert).await?;
            let addr = server.local_addr().to_string();
            let message = run_client(&addr, &args.cert, &args.name).await?;
            server.close();
            if message != format!("Hello, {}", args.name) {
                return Err(format!("unexpected reply {message:?}").into());
            }
            let _ = std::fs::remove_file(&args.cert);
        }
    }
    Ok(())
}
