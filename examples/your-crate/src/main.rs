//! The smallest crate of one's own on brpc: a server hosting `Hello` and a
//! client calling it over loopback QUIC, with a dev certificate.
//!
//! ```text
//! cargo run -p your-crate
//! ```

mod hello {
    tonic::include_proto!("hello.v1");
}

use hello::hello_client::HelloClient;
use hello::hello_server::{Hello, HelloServer};
use hello::{SayReply, SayRequest};
use tonic::{Request, Response, Status};

struct MyHello;

#[tonic::async_trait]
impl Hello for MyHello {
    async fn say(&self, request: Request<SayRequest>) -> Result<Response<SayReply>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(SayReply {
            text: format!("hello, {name}"),
        }))
    }
}

async fn say_hello(name: &str) -> Result<String, Box<dyn std::error::Error>> {
    let server = brpc::Server::builder()
        .add_service(HelloServer::new(MyHello))
        .bind("127.0.0.1:0")?;
    let client = brpc::Client::builder()
        .pin_certificate(server.certificate().clone())
        .connect(server.local_addr())
        .await?;
    let reply = HelloClient::new(client.channel())
        .say(SayRequest { name: name.into() })
        .await?;
    Ok(reply.into_inner().text)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("{}", say_hello("world").await?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_documented_crate_makes_a_call() {
        assert_eq!(
            super::say_hello("crate").await.expect("call"),
            "hello, crate"
        );
    }
}
