//! Compiles the example and test protos with protox (no protoc needed) and
//! brpc-build (tonic-prost-build's code plus brpc's direct path); also generates containerd/ttrpc-rust code
//! for the echo proto (ttrpc-codegen, pure Rust), the independent peer of the
//! interop tests.

use std::path::PathBuf;

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
    // tonic's code and, beside it, brpc's direct path over the same traits.
    brpc_build::configure().compile_fds(fds)?;

    // ttrpc-rust's generated files start with inner attributes, so they cannot
    // be include!d; a wrapper names them as #[path] modules instead.
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("ttrpc");
    std::fs::create_dir_all(&out)?;
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(["proto/echo.proto"])
        .include("proto")
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
