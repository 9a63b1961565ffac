//! Echo for every stack: tonic code (with its HTTP/2 transport) and ttrpc-rust code.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/echo.proto");
    let fds = protox::compile(["../proto/echo.proto"], ["../proto"])?;
    // tonic's code (with its HTTP/2 transport, for the tonic stack) and
    // brpc's direct path beside it. `bytes` fields are `bytes::Bytes`, as a
    // bulk service would generate them: every prost stack (brpc, tonic,
    // tonic-h3) then decodes a blob as a slice of the received buffer
    // instead of copying it into a `Vec<u8>`.
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    brpc_build::configure()
        .tonic(|tonic| tonic.build_transport(true))
        .compile_fds_with_config(fds, config)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("ttrpc");
    std::fs::create_dir_all(&out)?;
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(["../proto/echo.proto"])
        .include("../proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    let mut wrapper = String::new();
    for module in ["echo", "echo_ttrpc"] {
        wrapper += &format!(
            "#[path = {:?}]\npub mod {module};\n",
            out.join(format!("{module}.rs")).display().to_string()
        );
    }
    std::fs::write(out.join("protos.rs"), wrapper)?;
    Ok(())
}
