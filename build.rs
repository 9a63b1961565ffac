//! Compiles the example and test protos with protox (no protoc needed) and
//! tonic-prost-build's `compile_fds`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/greeter.proto",
        "proto/echo.proto",
        "proto/control.proto",
        "proto/agent.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
