//! Code generation for brpc's direct path, beside `tonic-prost-build`.
//!
//! For every proto service it writes what `tonic-prost-build` writes (the
//! service trait, `FooServer`, `FooClient`) and, in a module `foo_brpc` next
//! to them:
//! - `FooService<T: Foo>`: a dispatcher over the same tonic trait that brpc
//!   serves with no http request or response in between (host it with
//!   `Server::builder().add_direct(FooService::new(my_impl))`);
//! - `FooClient`: a typed client with the same method signatures as tonic's
//!   `FooClient`, whose unary calls take the direct path
//!   (`peer.client(foo_brpc::FooClient::new)`); streaming calls go through
//!   tonic's client over the same [`Channel`](https://docs.rs/brpc).
//!
//! The wire is the same either way: a direct client calls a tonic-path
//! server and the other way round.
//!
//! ```ignore
//! // build.rs (no protoc needed: protox parses the protos)
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let fds = protox::compile(["proto/greeter.proto"], ["proto"])?;
//!     brpc_build::configure().compile_fds(fds)?;
//!     Ok(())
//! }
//! ```
//!
//! Then `tonic::include_proto!("greeter.v1")` as usual. tonic's client and
//! server must be generated (the default): the direct code names both.

use std::fmt::Write as _;
use std::io;

/// A code generator with tonic's defaults for brpc: no tonic transport
/// (brpc is the transport), client and server generated.
pub fn configure() -> Builder {
    Builder {
        tonic: tonic_prost_build::configure().build_transport(false),
        crate_path: "::brpc::core".to_owned(),
    }
}

/// Compiles `fds` with [`configure`]'s defaults into `OUT_DIR`.
///
/// # Errors
/// What prost-build reports (an unwritable output directory).
pub fn compile_fds(fds: prost_types::FileDescriptorSet) -> io::Result<()> {
    configure().compile_fds(fds)
}

/// Configures the generation (see [`configure`]).
#[derive(Debug)]
pub struct Builder {
    tonic: tonic_prost_build::Builder,
    crate_path: String,
}

impl Builder {
    /// Adjusts the `tonic-prost-build` builder that generates tonic's code.
    /// Only its service options act here; message options (extern paths,
    /// type attributes, the output directory) go on the `prost_build::Config`
    /// given to [`compile_fds_with_config`](Builder::compile_fds_with_config).
    ///
    /// The direct code assumes tonic's defaults in these: client and server
    /// both generated, in their usual modules, without `#[cfg]` module
    /// attributes; prost as the codec (a custom `codec_path` would make the
    /// direct unary calls and tonic's streaming ones disagree); the default
    /// `proto_path` (`super`); no `use_arc_self`.
    pub fn tonic(
        mut self,
        adjust: impl FnOnce(tonic_prost_build::Builder) -> tonic_prost_build::Builder,
    ) -> Self {
        self.tonic = adjust(self.tonic);
        self
    }

    /// The path generated code uses for brpc's core crate: `::brpc::core`
    /// (through the `brpc` crate) by default, `::brpc_core` for a crate that
    /// depends on `brpc-core` directly.
    pub fn crate_path(mut self, path: impl Into<String>) -> Self {
        self.crate_path = path.into();
        self
    }

    /// Compiles `fds` into `OUT_DIR` with prost-build's default config.
    ///
    /// # Errors
    /// What prost-build reports.
    pub fn compile_fds(self, fds: prost_types::FileDescriptorSet) -> io::Result<()> {
        self.compile_fds_with_config(fds, prost_build::Config::new())
    }

    /// Compiles `fds` with `config` (for message options and the output
    /// directory).
    ///
    /// # Errors
    /// What prost-build reports.
    pub fn compile_fds_with_config(
        self,
        fds: prost_types::FileDescriptorSet,
        mut config: prost_build::Config,
    ) -> io::Result<()> {
        config.service_generator(Box::new(Generator {
            tonic: self.tonic.service_generator(),
            crate_path: self.crate_path,
        }));
        config.compile_fds(fds)
    }
}

/// tonic's generator, then brpc's code for the same service.
struct Generator {
    tonic: Box<dyn prost_build::ServiceGenerator>,
    crate_path: String,
}

impl prost_build::ServiceGenerator for Generator {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        self.tonic.generate(service.clone(), buf);
        buf.push_str(&generate(&service, &self.crate_path));
    }

    fn finalize(&mut self, buf: &mut String) {
        self.tonic.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.tonic.finalize_package(package, buf);
    }
}

/// tonic-build's module naming: `GreeterService` -> `greeter_service`.
fn snake_case(name: &str) -> String {
    let mut s = String::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        s.push(c.to_ascii_lowercase());
        if chars.peek().is_some_and(|next| next.is_uppercase()) {
            s.push('_');
        }
    }
    s
}

/// A message type as named from inside the generated module.
fn type_path(rust_type: &str) -> String {
    if rust_type == "()" || rust_type.starts_with("::") || rust_type.starts_with("crate::") {
        rust_type.to_owned()
    } else {
        format!("super::{rust_type}")
    }
}

/// The `foo_brpc` module for `service`.
fn generate(service: &prost_build::Service, krate: &str) -> String {
    let name = &service.name;
    let snake = snake_case(name);
    let full_name = if service.package.is_empty() {
        service.proto_name.clone()
    } else {
        format!("{}.{}", service.package, service.proto_name)
    };
    let tr = format!("super::{snake}_server::{name}");
    let mut arms = String::new();
    let mut methods = String::new();
    for m in &service.methods {
        let helper = match (m.client_streaming, m.server_streaming) {
            (false, false) => "unary",
            (false, true) => "server_streaming",
            (true, false) => "client_streaming",
            (true, true) => "streaming",
        };
        let deprecated = if m.options.deprecated() {
            "        #[deprecated]\n"
        } else {
            ""
        };
        let _ = writeln!(
            arms,
            "                {proto:?} => ::std::boxed::Box::pin({krate}::direct::{helper}(call, reply, move |request| <T as {tr}>::{method}(inner, request))),",
            proto = m.proto_name,
            method = m.name,
        );
        let input = type_path(&m.input_type);
        let output = type_path(&m.output_type);
        let request = if m.client_streaming {
            format!("impl ::tonic::IntoStreamingRequest<Message = {input}>")
        } else {
            format!("impl ::tonic::IntoRequest<{input}>")
        };
        let response = if m.server_streaming {
            format!("::tonic::codec::Streaming<{output}>")
        } else {
            output.clone()
        };
        let body = if !m.client_streaming && !m.server_streaming {
            format!(
                "self.channel.unary(::tonic::IntoRequest::into_request(request), {full_name:?}, {proto:?}).await",
                proto = m.proto_name
            )
        } else {
            format!("self.tonic.{}(request).await", m.name)
        };
        let _ = write!(
            methods,
            r#"
        /// `{full_name}/{proto}`{how}.
{deprecated}        pub async fn {method}(
            &mut self,
            request: {request},
        ) -> ::std::result::Result<::tonic::Response<{response}>, ::tonic::Status> {{
            {body}
        }}
"#,
            proto = m.proto_name,
            method = m.name,
            how = if m.client_streaming || m.server_streaming {
                " (through tonic's client)"
            } else {
                " on the direct path"
            },
        );
    }
    format!(
        r#"/// brpc's direct path for `{full_name}` (generated by brpc-build).
pub mod {snake}_brpc {{
    #![allow(unused_variables, dead_code, missing_docs, deprecated, clippy::all)]

    /// Serves [`{name}`]({tr}) on brpc's direct path: host it with
    /// `add_direct`. Calls are decoded straight into the trait's requests.
    pub struct {name}Service<T> {{
        inner: ::std::sync::Arc<T>,
    }}

    impl<T> {name}Service<T> {{
        /// Serves `inner`.
        pub fn new(inner: T) -> Self {{
            Self::from_arc(::std::sync::Arc::new(inner))
        }}

        /// Serves a shared `inner`.
        pub fn from_arc(inner: ::std::sync::Arc<T>) -> Self {{
            Self {{ inner }}
        }}
    }}

    impl<T> ::std::clone::Clone for {name}Service<T> {{
        fn clone(&self) -> Self {{
            Self {{ inner: ::std::clone::Clone::clone(&self.inner) }}
        }}
    }}

    impl<T> ::std::fmt::Debug for {name}Service<T> {{
        fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {{
            f.write_str({service_debug:?})
        }}
    }}

    impl<T: {tr}> {krate}::direct::DirectService for {name}Service<T> {{
        fn service_name(&self) -> &'static str {{
            {full_name:?}
        }}

        fn serve<'a>(
            &'a self,
            call: {krate}::conn::Incoming,
            reply: &'a mut {krate}::conn::Reply,
        ) -> {krate}::direct::ServeFuture<'a> {{
            let inner = &*self.inner;
            match call.method.as_str() {{
{arms}                _ => ::std::boxed::Box::pin({krate}::direct::unimplemented(call, reply)),
            }}
        }}
    }}

    /// Calls `{full_name}` with the same methods as tonic's client; unary
    /// calls take brpc's direct path. Make one with
    /// `peer.client({snake}_brpc::{name}Client::new)`.
    #[derive(Debug, Clone)]
    pub struct {name}Client {{
        channel: {krate}::Channel,
        tonic: super::{snake}_client::{name}Client<{krate}::Channel>,
    }}

    impl {name}Client {{
        /// A client calling through `channel`.
        pub fn new(channel: {krate}::Channel) -> Self {{
            Self {{
                tonic: super::{snake}_client::{name}Client::new(::std::clone::Clone::clone(&channel)),
                channel,
            }}
        }}
{methods}    }}
}}
"#,
        service_debug = format!("{name}Service"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_tonic() {
        assert_eq!(snake_case("Greeter"), "greeter");
        assert_eq!(snake_case("EchoService"), "echo_service");
        assert_eq!(type_path("HelloRequest"), "super::HelloRequest");
        assert_eq!(type_path("()"), "()");
        assert_eq!(type_path("::prost_types::Any"), "::prost_types::Any");
    }
}
