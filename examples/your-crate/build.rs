fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/hello.proto");
    let fds = protox::compile(["proto/hello.proto"], ["proto"])?;
    // tonic's code, and brpc's direct path beside it (`hello_brpc`).
    brpc_build::configure().compile_fds(fds)?;
    Ok(())
}
