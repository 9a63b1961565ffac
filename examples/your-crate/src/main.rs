//! The smallest crate of one's own on brpc: a server hosting `Hello` and a
//! client calling it over loopback QUIC, with a dev certificate.
//!
//! ```text
//! cargo run -p your-crate
//! ```

mod hello {
    tonic::include_proto!("hello.v1");
}

// brpc-build's code for the `Hello` service: a dispatcher over tonic's
// trait and a typed client, both on brpc's direct path.
use hello::hello_brpc::{HelloClient, HelloService};
use hello::hello_server::Hello;
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
        .add_direct(HelloService::new(MyHello))
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
