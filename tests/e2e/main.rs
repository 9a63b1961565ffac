//! End-to-end tests over real loopback QUIC and Unix sockets, one module per
//! topic, in one test binary so that the shared fixtures (`tests/common`)
//! and the protos compile and link once.
//!
//! Two topics stay binaries of their own because they install
//! process-global state that would see every other test's calls:
//! `tests/backpressure.rs` (a counting global allocator that measures the
//! process's heap) and `tests/observability.rs` (the global metrics
//! recorder whose counts it checks).

#[path = "../common/mod.rs"]
mod common;

mod admin_relay;
mod call_window;
mod cancellation;
mod datagrams;
mod deadlines;
mod direct;
mod examples;
mod fleet;
mod hostile;
mod interop_ttrpc;
mod leaks;
mod liveness;
mod metadata;
mod middleware;
mod oversize;
mod paused;
mod session;
mod streaming;
mod tls;
mod unary;
mod unix;
