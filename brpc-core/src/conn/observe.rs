//! Observability of calls: a `tracing` span per call and `metrics` counters and
//! gauges (through the facade, so any exporter can be plugged in).
//!
//! Metric names: `brpc_calls_total{direction,code}`,
//! `brpc_call_errors_total{direction,code}`, `brpc_calls_in_flight{direction}`,
//! `brpc_bytes_sent_total`, `brpc_bytes_received_total`,
//! `brpc_connected_peers` (server); brpc-server adds
//! `brpc_admission_events_total{event}`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use metrics::{Key, Label, Level, Metadata};
use tonic::Code;
use tracing::Span;
use tracing::field::Empty;

/// Calls in flight on one connection, by direction, and a way to wait for
/// them to end (the drain of a graceful shutdown).
#[derive(Debug, Default)]
pub(crate) struct CallCounts {
    served: AtomicUsize,
    outgoing: AtomicUsize,
    /// Tasks in [`CallCounts::wait_until`]; a count reaching zero wakes
    /// them only when there are any (a `Notify` takes a lock).
    waiters: AtomicUsize,
    drained: tokio::sync::Notify,
}

impl CallCounts {
    fn counter(&self, served: bool) -> &AtomicUsize {
        if served { &self.served } else { &self.outgoing }
    }

    /// Calls in flight in one direction (`served`: the peer's calls to us).
    pub(crate) fn get(&self, served: bool) -> usize {
        self.counter(served).load(Ordering::SeqCst)
    }

    /// Waits until `done` holds of the counts; it is checked again each
    /// time a count reaches zero.
    pub(crate) async fn wait_until(&self, done: impl Fn(&CallCounts) -> bool) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Counted as waiting before checking: a count that reaches zero
            // after this check sees the waiter and wakes it.
            self.waiters.fetch_add(1, Ordering::SeqCst);
            if done(self) {
                self.waiters.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            notified.await;
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Counts one call in flight for as long as it lives.
struct InFlight {
    counts: Arc<CallCounts>,
    served: bool,
}

impl InFlight {
    fn enter(counts: &Arc<CallCounts>, served: bool) -> Self {
        counts.counter(served).fetch_add(1, Ordering::SeqCst);
        calls_in_flight(served).increment(1.0);
        InFlight {
            counts: counts.clone(),
            served,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let before = self
            .counts
            .counter(self.served)
            .fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.counts.waiters.load(Ordering::SeqCst) > 0 {
            self.counts.drained.notify_waiters();
        }
        calls_in_flight(self.served).decrement(1.0);
    }
}

/// The `direction` label of a call.
pub(crate) fn direction(served: bool) -> &'static str {
    if served { "inbound" } else { "outbound" }
}

/// One call's span, in-flight count and outcome; recorded when dropped.
pub(crate) struct CallRecord {
    _in_flight: InFlight,
    span: Span,
    /// When the call started, if anyone may listen for its duration (the
    /// span or the "call ended" event): the clock is not read for nobody.
    started: Option<Instant>,
    served: bool,
    code: Option<Code>,
}

impl CallRecord {
    /// A call on the connection `peer` (its id, for the span) whose calls
    /// are counted in `counts`.
    pub(crate) fn new(counts: &Arc<CallCounts>, peer: &dyn fmt::Display, served: bool) -> Self {
        let span = tracing::info_span!(
            "brpc.call",
            direction = direction(served),
            peer = %peer,
            service = Empty,
            method = Empty,
            code = Empty,
            duration_ms = Empty,
        );
        // With tracing's `log` feature (some dependency may turn it on) and
        // no tracing subscriber, spans and events go to `log` instead.
        let timed = !span.is_disabled()
            || tracing::enabled!(tracing::Level::DEBUG)
            || (!tracing::dispatcher::has_been_set()
                && log::max_level() >= log::LevelFilter::Debug);
        CallRecord {
            _in_flight: InFlight::enter(counts, served),
            span,
            started: timed.then(Instant::now),
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
        let name = code_name(code);
        let (side, index) = (usize::from(self.served), code as usize);
        counter(&CALLS_TOTAL[side][index]).increment(1);
        if code != Code::Ok {
            counter(&CALL_ERRORS_TOTAL[side][index]).increment(1);
        }
        let Some(started) = self.started else {
            return;
        };
        let duration_ms = started.elapsed().as_secs_f64() * 1e3;
        self.span.record("code", name);
        self.span.record("duration_ms", duration_ms);
        let _entered = self.span.enter();
        tracing::debug!(code = name, duration_ms, "call ended");
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

// Metric keys built at compile time: the `metrics::counter!` macro allocates
// its labels on every use when a label value is not a literal, which cost
// several allocations per call even with no recorder installed.

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

fn counter(key: &Key) -> metrics::Counter {
    metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA))
}

/// `brpc_calls_in_flight{direction}`, indexed by `served as usize`.
fn calls_in_flight(served: bool) -> metrics::Gauge {
    static OUTBOUND: [Label; 1] = [Label::from_static_parts("direction", "outbound")];
    static INBOUND: [Label; 1] = [Label::from_static_parts("direction", "inbound")];
    static KEYS: [Key; 2] = [
        Key::from_static_parts("brpc_calls_in_flight", &OUTBOUND),
        Key::from_static_parts("brpc_calls_in_flight", &INBOUND),
    ];
    metrics::with_recorder(|recorder| {
        recorder.register_gauge(&KEYS[usize::from(served)], &METADATA)
    })
}

/// One key per direction (`served as usize`) and code (`Code as usize`).
macro_rules! call_keys {
    ($name:literal) => {
        [
            call_keys!(@direction $name, "outbound"),
            call_keys!(@direction $name, "inbound"),
        ]
    };
    (@direction $name:literal, $direction:literal) => {
        call_keys!(@codes $name, $direction, [
            "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
            "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
            "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"
        ])
    };
    (@codes $name:literal, $direction:literal, [$($code:literal),*]) => {
        [$({
            static LABELS: [Label; 2] = [
                Label::from_static_parts("direction", $direction),
                Label::from_static_parts("code", $code),
            ];
            Key::from_static_parts($name, &LABELS)
        }),*]
    };
}

static CALLS_TOTAL: [[Key; 17]; 2] = call_keys!("brpc_calls_total");
static CALL_ERRORS_TOTAL: [[Key; 17]; 2] = call_keys!("brpc_call_errors_total");

pub(crate) fn bytes_sent(n: usize) {
    metrics::counter!("brpc_bytes_sent_total").increment(n as u64);
}

pub(crate) fn bytes_received(n: usize) {
    metrics::counter!("brpc_bytes_received_total").increment(n as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_the_drain_wakes_when_the_last_call_ends() {
        let counts = Arc::new(CallCounts::default());
        let served = [
            InFlight::enter(&counts, true),
            InFlight::enter(&counts, true),
        ];
        let outgoing = InFlight::enter(&counts, false);
        let waiter = tokio::spawn({
            let counts = counts.clone();
            async move { counts.wait_until(|c| c.get(true) == 0).await }
        });
        tokio::task::yield_now().await;
        let [first, second] = served;
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one served call is still running");
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken when the last served call ended")
            .expect("join");
        // Already drained: returns at once.
        counts.wait_until(|c| c.get(true) == 0).await;
        drop(outgoing);
    }

    #[test]
    fn static_keys_match_code_names() {
        for code in 0..17 {
            let code = Code::from_i32(code);
            for served in [false, true] {
                let key = &CALLS_TOTAL[usize::from(served)][code as usize];
                let labels: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
                assert_eq!(
                    labels,
                    [("direction", direction(served)), ("code", code_name(code))]
                );
            }
        }
    }
}
