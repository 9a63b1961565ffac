//! What a running server's tasks share: its settings and registry
//! ([`Shared`]), and the guards that keep its bookkeeping right however a
//! connection task ends. The QUIC and Unix accept loops both build on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use brpc_core::conn::{MemoryBudget, UnixCredentials, codes};
use brpc_core::tls::PeerIdentity;
use brpc_core::{CallLimits, Labels, Peer, Router, TransportOptions};
use quinn::Endpoint;
use tonic::Status;

use crate::Registry;
use crate::admin::{Admin, StatsResponse};

/// A check of a Unix peer's credentials (see [`Builder::require_unix_credentials`]).
pub(crate) type CredentialCheck = Arc<dyn Fn(&UnixCredentials) -> bool + Send + Sync>;

/// What the server knows of a client when deciding whether to admit it.
#[derive(Debug)]
pub struct Admission<'a> {
    /// The name the client sent in Hello.
    pub name: &'a str,
    /// The labels the client sent in Hello.
    pub labels: &'a Labels,
    /// The client's verified certificate identity (mutual TLS only).
    pub identity: Option<&'a PeerIdentity>,
    /// The client's UDP address.
    pub remote_address: SocketAddr,
}

pub(crate) type Authorize = Arc<dyn Fn(&Admission<'_>) -> Result<(), Status> + Send + Sync>;

/// What every task of a running server shares.
pub(crate) struct Shared {
    /// The QUIC endpoint (`None`: a server on Unix sockets only).
    pub(crate) endpoint: Option<Endpoint>,
    pub(crate) registry: Registry,
    /// The admin service, when enabled.
    pub(crate) admin: Option<Arc<Admin>>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) router: Router,
    pub(crate) hello_timeout: Duration,
    pub(crate) max_hello_size: usize,
    pub(crate) limits: CallLimits,
    pub(crate) next_id: AtomicU64,
    pub(crate) authorize: Option<Authorize>,
    pub(crate) max_connections: usize,
    /// Connections past the accept step and not yet ended.
    pub(crate) connections: Arc<AtomicUsize>,
    /// Permits for TLS handshakes in progress (`Builder::max_handshakes`).
    pub(crate) handshakes: Arc<tokio::sync::Semaphore>,
    /// `Builder::max_handshakes`: the permits `handshakes` started with.
    pub(crate) max_handshakes: usize,
    /// Connections waiting for a handshake permit.
    pub(crate) waiting: Arc<AtomicUsize>,
    pub(crate) transport: TransportOptions,
    /// Inbound bytes being received, across all connections.
    pub(crate) buffer_total: MemoryBudget,
    /// Which Unix clients are admitted.
    pub(crate) unix_check: Option<CredentialCheck>,
    /// What became of the QUIC clients that knocked.
    pub(crate) admission: AdmissionCounters,
}

impl Shared {
    /// The server's load now and its admission counts: the admin service's
    /// `Stats`.
    pub(crate) fn stats(&self) -> StatsResponse {
        let counts = self.admission.snapshot();
        let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        StatsResponse {
            connected: wide(self.registry.len()),
            handshakes_in_progress: wide(
                self.max_handshakes
                    .saturating_sub(self.handshakes.available_permits()),
            ),
            handshakes_waiting: wide(self.waiting.load(Ordering::SeqCst)),
            buffered_bytes: wide(self.buffer_total.in_use()),
            refused_queue_full: counts.refused_queue_full,
            refused_after_waiting: counts.refused_after_waiting,
            refused_closing: counts.refused_closing,
            turned_away: counts.turned_away,
            handshakes_started: counts.handshakes_started,
            handshakes_failed: counts.handshakes_failed,
            handshakes_timed_out: counts.handshakes_timed_out,
            sessions_refused: counts.sessions_refused,
            admitted: counts.admitted,
        }
    }

    /// Most clients waiting for a handshake slot: [`WAITING_PER_HANDSHAKE`]
    /// for each slot.
    pub(crate) fn max_waiting(&self) -> usize {
        self.max_handshakes.saturating_mul(WAITING_PER_HANDSHAKE)
    }
}

/// Clients a server queues for each handshake slot
/// ([`Builder::max_handshakes`](crate::Builder::max_handshakes)).
const WAITING_PER_HANDSHAKE: usize = 64;

/// Something that became of a QUIC client that reached the server: one
/// count of [`AdmissionStats`] each.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AdmissionEvent {
    RefusedQueueFull,
    RefusedAfterWaiting,
    RefusedClosing,
    TurnedAway,
    HandshakeStarted,
    HandshakeFailed,
    HandshakeTimedOut,
    SessionRefused,
    Admitted,
}

impl AdmissionEvent {
    /// Every event, in the order of their counts.
    #[cfg(test)]
    const ALL: [AdmissionEvent; AdmissionEvent::COUNT] = [
        AdmissionEvent::RefusedQueueFull,
        AdmissionEvent::RefusedAfterWaiting,
        AdmissionEvent::RefusedClosing,
        AdmissionEvent::TurnedAway,
        AdmissionEvent::HandshakeStarted,
        AdmissionEvent::HandshakeFailed,
        AdmissionEvent::HandshakeTimedOut,
        AdmissionEvent::SessionRefused,
        AdmissionEvent::Admitted,
    ];
    /// How many there are (`Admitted` is the last).
    const COUNT: usize = AdmissionEvent::Admitted as usize + 1;

    /// Its name: the field of [`AdmissionStats`] and the `event` label of
    /// `brpc_admission_events_total`.
    fn name(self) -> &'static str {
        match self {
            AdmissionEvent::RefusedQueueFull => "refused_queue_full",
            AdmissionEvent::RefusedAfterWaiting => "refused_after_waiting",
            AdmissionEvent::RefusedClosing => "refused_closing",
            AdmissionEvent::TurnedAway => "turned_away",
            AdmissionEvent::HandshakeStarted => "handshakes_started",
            AdmissionEvent::HandshakeFailed => "handshakes_failed",
            AdmissionEvent::HandshakeTimedOut => "handshakes_timed_out",
            AdmissionEvent::SessionRefused => "sessions_refused",
            AdmissionEvent::Admitted => "admitted",
        }
    }
}

/// The counts behind [`AdmissionStats`], one per [`AdmissionEvent`].
#[derive(Default)]
pub(crate) struct AdmissionCounters([AtomicU64; AdmissionEvent::COUNT]);

impl AdmissionCounters {
    /// Counts one `event`, here and in the metric
    /// `brpc_admission_events_total{event}`. Once per client at most a few
    /// times (not per call), so the metric's label may be built each time.
    pub(crate) fn count(&self, event: AdmissionEvent) {
        self.0[event as usize].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("brpc_admission_events_total", "event" => event.name()).increment(1);
    }

    pub(crate) fn snapshot(&self) -> AdmissionStats {
        let get = |event: AdmissionEvent| self.0[event as usize].load(Ordering::Relaxed);
        AdmissionStats {
            refused_queue_full: get(AdmissionEvent::RefusedQueueFull),
            refused_after_waiting: get(AdmissionEvent::RefusedAfterWaiting),
            refused_closing: get(AdmissionEvent::RefusedClosing),
            turned_away: get(AdmissionEvent::TurnedAway),
            handshakes_started: get(AdmissionEvent::HandshakeStarted),
            handshakes_failed: get(AdmissionEvent::HandshakeFailed),
            handshakes_timed_out: get(AdmissionEvent::HandshakeTimedOut),
            sessions_refused: get(AdmissionEvent::SessionRefused),
            admitted: get(AdmissionEvent::Admitted),
        }
    }
}

/// What became of the QUIC clients that reached a server since it was bound
/// ([`Server::admission_stats`](crate::Server::admission_stats)): counts
/// that only grow. A client that retries is counted at each attempt.
///
/// Read twice and subtract to see a restart storm's shape: refusals while
/// the handshake queue is full (the clients come back after their busy
/// backoff), handshakes the server started and the client did not finish
/// (its CPU spent for nothing: the client gave up or went away), and
/// sessions admitted.
///
/// The same counts are the metric `brpc_admission_events_total{event}` (the
/// event named as the field) and, with the admin service on, the answer to
/// `brpc.admin.v1.Admin/Stats` (`brpcctl stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdmissionStats {
    /// Refused at once with `CONNECTION_REFUSED`, no handshake: more clients
    /// were waiting for a handshake slot than the server queues (64 ×
    /// [`Builder::max_handshakes`](crate::Builder::max_handshakes)).
    pub refused_queue_full: u64,
    /// Refused with `CONNECTION_REFUSED` after waiting half the Hello limit
    /// for a handshake slot, no handshake.
    pub refused_after_waiting: u64,
    /// Refused with `CONNECTION_REFUSED` because the server was shutting down.
    pub refused_closing: u64,
    /// Handshaken and closed with `CONN_TOO_MANY`: the server was at
    /// [`Builder::max_connections`](crate::Builder::max_connections).
    pub turned_away: u64,
    /// TLS handshakes started for clients within the connection limit (a
    /// handshake slot taken; a client turned away takes one too, counted
    /// in `turned_away` instead).
    pub handshakes_started: u64,
    /// Handshakes that failed: a certificate refused by either side, a
    /// protocol error, or the client closing or resetting mid-way.
    pub handshakes_failed: u64,
    /// Handshakes not finished within the Hello limit
    /// ([`Builder::hello_timeout`](crate::Builder::hello_timeout)): usually a
    /// client that gave up waiting, or one too starved of CPU to answer.
    pub handshakes_timed_out: u64,
    /// Clients handshaken and then refused: a bad or late Hello, an
    /// unsupported protocol version, not authorised, or the server shutting
    /// down.
    pub sessions_refused: u64,
    /// Sessions admitted and listed in the registry.
    pub admitted: u64,
}

/// Removes a peer from the registry however its task ends (even if aborted).
pub(crate) struct Listed {
    pub(crate) shared: Arc<Shared>,
    pub(crate) peer: Peer,
}

impl Drop for Listed {
    fn drop(&mut self) {
        // A task that ends before its connection (the server stopped
        // serving it) closes it, so that the event says how it ended.
        if !self.peer.is_closed() {
            self.peer
                .close(codes::CONN_NORMAL, "the server stopped serving it");
        }
        if let Some(reason) = self.peer.close_reason() {
            self.shared
                .registry
                .remove(self.peer.connection_id(), reason);
        }
    }
}

/// Holds one place in a count (connections, waiting handshakes) for as
/// long as it lives.
pub(crate) struct Counted(pub(crate) Arc<AtomicUsize>);

impl Counted {
    /// Takes a place in `count`.
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_admission_event_counts_in_its_own_field() {
        // One of each event, counted (i + 1) times: every field of the
        // snapshot must hold its own event's count, named as the field.
        let counters = AdmissionCounters::default();
        for (i, event) in AdmissionEvent::ALL.into_iter().enumerate() {
            assert_eq!(event as usize, i);
            for _ in 0..=i {
                counters.count(event);
            }
        }
        let stats = counters.snapshot();
        let fields = [
            ("refused_queue_full", stats.refused_queue_full),
            ("refused_after_waiting", stats.refused_after_waiting),
            ("refused_closing", stats.refused_closing),
            ("turned_away", stats.turned_away),
            ("handshakes_started", stats.handshakes_started),
            ("handshakes_failed", stats.handshakes_failed),
            ("handshakes_timed_out", stats.handshakes_timed_out),
            ("sessions_refused", stats.sessions_refused),
            ("admitted", stats.admitted),
        ];
        for (event, (name, count)) in AdmissionEvent::ALL.into_iter().zip(fields) {
            assert_eq!(event.name(), name);
            assert_eq!(count, event as u64 + 1, "{name}");
        }
    }
}
