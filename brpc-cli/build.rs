//! Compiles the fleet example's agent proto for the tests' agents (the CLI
//! itself compiles protos at run time).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"])?;
    brpc_build::configure().compile_fds(fds)?;
    Ok(())
}
