//! Observability of calls: a `tracing` span per call and `metrics` counters and
//! gauges (through the facade, so any exporter can be plugged in).
//!
//! Metric names: `brpc_calls_total{direction,code}`,
//! `brpc_call_errors_total{direction,code}`, `brpc_calls_in_flight{direction}`,
//! `brpc_bytes_sent_total`, `brpc_bytes_received_total`,
//! `brpc_connected_peers` (server).

use std::time::Instant;

use tonic::Code;
use tracing::Span;
use tracing::field::Empty;

use super::Peer;
use super::peer::{InFlight, direction};

/// One call's span, in-flight count and outcome; recorded when dropped.
pub(crate) struct CallRecord {
    _in_flight: InFlight,
    span: Span,
    started: Instant,
    served: bool,
    code: Option<Code>,
}

impl CallRecord {
    pub(crate) fn new(peer: &Peer, served: bool) -> Self {
        let span = tracing::info_span!(
            "brpc.call",
            direction = direction(served),
            peer = %peer.connection_id(),
            service = Empty,
            method = Empty,
            code = Empty,
            duration_ms = Empty,
        );
        CallRecord {
            _in_flight: peer.enter_call(served),
            span,
            started: Instant::now(),
            served,
            code: None,
        }
    }

    pub(crate) fn named(&self, service: &str, method: &str) {
        self.span.record("service", service);
        self.span.record("method", method);
    }

    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// The call's final status code (the last one set wins).
    pub(crate) fn finish(&mut self, code: Code) {
        self.code = Some(code);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // A call dropped before any outcome was cancelled.
        let code = self.code.unwrap_or(Code::Cancelled);
        let elapsed = self.started.elapsed();
        self.span.record("code", code_name(code));
        self.span.record("duration_ms", elapsed.as_secs_f64() * 1e3);
        let direction = direction(self.served);
        let name = code_name(code);
        metrics::counter!("brpc_calls_total", "direction" => direction, "code" => name)
            .increment(1);
        if code != Code::Ok {
            metrics::counter!("brpc_call_errors_total", "direction" => direction, "code" => name)
                .increment(1);
        }
        let _entered = self.span.enter();
        tracing::debug!(
            code = name,
            duration_ms = elapsed.as_secs_f64() * 1e3,
            "call ended"
        );
    }
}

/// The gRPC name of a status code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pub(crate) fn bytes_sent(n: usize) {
    metrics::counter!("brpc_bytes_sent_total").increment(n as u64);
}

pub(crate) fn bytes_received(n: usize) {
    metrics::counter!("brpc_bytes_received_total").increment(n as u64);
}
