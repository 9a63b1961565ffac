//! Compiles the test proto for the tests' agents.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"])?;
    brpc_build::configure().compile_fds(fds)?;
    Ok(())
}
