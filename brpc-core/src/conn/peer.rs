//! The handle to the other end of one connection: who it is, and how to call it.
//!
//! A server's handler gets the calling client's `Peer` from its request; the
//! server's registry holds the same handles; a client holds one for its server.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use tonic::Status;

use super::Side;
use super::connection_error::ConnectionError;
use super::observe::{CallCounts, CallRecord};
use crate::tls::PeerIdentity;

use super::budget::{Budgets, MemoryBudget, WaitingRoom};
use super::io::FrameReader;
use super::transport::{CallReader, CallWriter, Multiplexer, SendError, Transport};
use crate::wire::{Call, CallConfig, Payload, RequestShape};

/// The id the server assigns to each connection during Hello. Unique for the
/// life of one server; a reconnecting client gets a new one. In a cluster the
/// top 16 bits name the node that assigned it ([`ConnectionId::node`]), so
/// ids are unique across the cluster and say where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    /// Bits of the id below the node id.
    pub const NODE_SHIFT: u32 = 48;

    /// The node that assigned the id (its top 16 bits; 0 for a server
    /// that was given no node id).
    pub fn node(self) -> u16 {
        (self.0 >> Self::NODE_SHIFT) as u16
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn-{}", self.0)
    }
}

/// Labels a client announces in Hello, e.g. `region=eu`.
pub type Labels = BTreeMap<String, String>;

/// What the Hello exchange established about a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The server-assigned connection id (both sides know it).
    pub connection_id: ConnectionId,
    /// The client's self-chosen name (as the client sent it in Hello).
    pub name: String,
    /// The client's labels.
    pub labels: Labels,
    /// When the Hello completed.
    pub connected_at: SystemTime,
    /// What the peer's TLS certificate proves, when it sent one: a client's
    /// under mutual TLS, always the server's for a client.
    pub identity: Option<PeerIdentity>,
}

/// Per-call limits a side enforces on one connection.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// Largest frame sent or accepted.
    pub max_message_size: usize,
    /// How long a call may sit in the middle of a frame (or, for a call the
    /// peer opened, before its Request) without a byte arriving; then it is
    /// reset (stream code `0x04`). `None`: no limit.
    pub idle_timeout: Option<std::time::Duration>,
    /// Most calls the peer may have open to this side at once over QUIC (the
    /// builders' `max_concurrent_calls`). A connection starts by allowing
    /// [`INITIAL_CALL_WINDOW`](super::INITIAL_CALL_WINDOW) of them and widens
    /// to this as soon as three quarters of that are in use, so an idle
    /// connection does not pay quinn's per-stream state for the full limit.
    pub max_concurrent_calls: u32,
    /// Most bytes of frames being received that this side holds for the
    /// connection at once (see [`MemoryBudget`]); never less than one
    /// maximum-size message. Default
    /// [`DEFAULT_BUFFER_PER_CONNECTION`](super::DEFAULT_BUFFER_PER_CONNECTION).
    pub buffer_per_connection: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            max_message_size: crate::wire::DEFAULT_MAX_MESSAGE_SIZE,
            idle_timeout: Some(std::time::Duration::from_secs(30)),
            max_concurrent_calls: super::quic::DEFAULT_MAX_CONCURRENT_CALLS,
            buffer_per_connection: super::budget::DEFAULT_BUFFER_PER_CONNECTION,
        }
    }
}

impl CallLimits {
    /// The budgets a connection with these limits charges its reads to:
    /// its own, and `total`, shared with the side's other connections.
    /// `total` must hold at least one maximum-size message
    /// ([`CallLimits::total_budget`] makes one that does).
    pub(crate) fn budgets(&self, total: MemoryBudget) -> Budgets {
        self.budgets_with_room(total, None)
    }

    /// [`CallLimits::budgets`], the connection's own holding the room its
    /// frames wait in over QUIC: `room` is the connection and its receive
    /// window.
    fn budgets_with_room(
        &self,
        total: MemoryBudget,
        room: Option<(&quinn::Connection, u64)>,
    ) -> Budgets {
        let limit = self.buffer_per_connection.max(self.max_message_size);
        let room =
            room.map(|(connection, window)| WaitingRoom::new(connection.clone(), window, limit));
        Budgets {
            connection: MemoryBudget::with_room(limit, room),
            total,
        }
    }

    /// A budget of `bytes` to share between connections with these limits,
    /// raised to one maximum-size message if smaller (a frame that could
    /// never fit would wait forever).
    pub fn total_budget(&self, bytes: usize) -> MemoryBudget {
        MemoryBudget::new(bytes.max(self.max_message_size))
    }
}

/// The credentials of the process at the other end of a Unix socket
/// (`SO_PEERCRED`), checked when the connection is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixCredentials {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id, where the OS reports it.
    pub pid: Option<i32>,
}

struct Shared {
    transport: Transport,
    credentials: Option<UnixCredentials>,
    side: Side,
    info: PeerInfo,
    limits: CallLimits,
    /// Calls in flight, both directions.
    calls: Arc<CallCounts>,
    /// How this side closed the connection, if it did (code, reason).
    local_close: std::sync::OnceLock<(u32, String)>,
    /// Draining and GoAway, held inline: a `watch` channel would allocate
    /// about 350 bytes more on every connection a server holds.
    lifecycle: Lifecycle,
    /// The QUIC stream limit was raised from the initial window to the full
    /// `max_concurrent_calls`.
    window_widened: AtomicBool,
    /// What frames received on this connection are charged to.
    budgets: Budgets,
}

/// Where a connection is in its ending (see [`Shared::lifecycle`]), and
/// the tasks waiting for it to move on. The flags are atomics: calls read
/// them, each call, from whatever thread runs it.
#[derive(Debug, Default)]
struct Lifecycle {
    /// This side is shutting down: new calls from the peer are refused.
    draining: AtomicBool,
    /// The peer said GoAway: open no new calls to it.
    going_away: AtomicBool,
    /// The reason it gave (set before `going_away`).
    reason: std::sync::Mutex<Option<String>>,
    /// Woken (all of them) when a flag is set.
    changed: tokio::sync::Notify,
}

impl Lifecycle {
    fn start_draining(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    fn go_away(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.going_away.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `flag` is set.
    async fn wait(&self, flag: impl Fn(&Self) -> &AtomicBool) {
        loop {
            // Registered before the flag is read, so that a change made in
            // between still wakes it.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if flag(self).load(Ordering::SeqCst) {
                return;
            }
            changed.await;
        }
    }
}

/// A call this side opened: its two halves, its machine, and whether its
/// Request went out.
pub(crate) struct OpenedCall {
    pub(crate) writer: CallWriter,
    pub(crate) reader: CallReader,
    pub(crate) call: Call,
    pub(crate) sent: Result<(), SendError>,
}

/// The other end of one brpc connection. Cheap to clone.
///
/// Calls go out through [`Peer::channel`] or [`Peer::client`]; the handle stays
/// valid after the connection closes, but calls then fail with `UNAVAILABLE`.
///
/// ```no_run
/// use brpc_core::Peer;
/// use tonic::{Request, Status};
///
/// // Inside any handler brpc serves: who is calling, and a way back to it.
/// async fn handler(request: Request<()>) -> Result<(), Status> {
///     let peer = Peer::from_request(&request)?;
///     println!("{} ({}) {:?}", peer.name(), peer.connection_id(), peer.labels());
///     // let name = peer.client(NamerClient::new).name(NameRequest {}).await?;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Peer {
    shared: Arc<Shared>,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("connection_id", &self.shared.info.connection_id)
            .field("name", &self.shared.info.name)
            .field("labels", &self.shared.info.labels)
            .field("remote_address", &self.remote_address())
            .field("side", &self.shared.side)
            .finish()
    }
}

impl Peer {
    /// A handle for `connection`, as seen from `side`, after Hello produced
    /// `info`. Frames received on it are charged to a budget of its own
    /// (`limits.buffer_per_connection`) and to `total`, which the side's
    /// other connections share. `receive_window` is the connection's QUIC
    /// receive window, which frames waiting for room in those budgets widen
    /// (`None`: frames wait without widening it, for a handle that reads
    /// no more than one small frame at a time, as a Hello's does).
    #[doc(hidden)]
    pub fn new(
        connection: quinn::Connection,
        side: Side,
        info: PeerInfo,
        limits: CallLimits,
        total: MemoryBudget,
        receive_window: Option<u64>,
    ) -> Self {
        let budgets =
            limits.budgets_with_room(total, receive_window.map(|window| (&connection, window)));
        Self::with_transport(
            Transport::Quic(connection),
            side,
            info,
            limits,
            None,
            budgets,
        )
    }

    /// A handle for a connection whose calls `mux` multiplexes over one
    /// byte stream (a Unix socket), as seen from `side`.
    /// `budgets` are those the link charges the frames it queues for calls to.
    pub(crate) fn new_multiplexed(
        mux: Arc<dyn Multiplexer>,
        side: Side,
        info: PeerInfo,
        limits: CallLimits,
        credentials: Option<UnixCredentials>,
        budgets: Budgets,
    ) -> Self {
        Self::with_transport(
            Transport::Mux(mux),
            side,
            info,
            limits,
            credentials,
            budgets,
        )
    }

    fn with_transport(
        transport: Transport,
        side: Side,
        info: PeerInfo,
        limits: CallLimits,
        credentials: Option<UnixCredentials>,
        budgets: Budgets,
    ) -> Self {
        Peer {
            shared: Arc::new(Shared {
                transport,
                credentials,
                side,
                info,
                limits,
                calls: Arc::default(),
                local_close: std::sync::OnceLock::new(),
                lifecycle: Lifecycle::default(),
                window_widened: AtomicBool::new(false),
                budgets,
            }),
        }
    }

    /// The handle of the peer that made this call. brpc stamps it on every
    /// request it serves, from the connection the call arrived on; nothing the
    /// peer sends can change it.
    ///
    /// # Errors
    /// `INTERNAL` when the request was not served by brpc.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<Peer, Status> {
        request.extensions().get::<Peer>().cloned().ok_or_else(|| {
            Status::internal("no brpc peer on this request: it was not served by a brpc connection")
        })
    }

    /// The server-assigned connection id.
    pub fn connection_id(&self) -> ConnectionId {
        self.shared.info.connection_id
    }

    /// The client's name from Hello.
    pub fn name(&self) -> &str {
        &self.shared.info.name
    }

    /// The client's labels from Hello.
    pub fn labels(&self) -> &Labels {
        &self.shared.info.labels
    }

    /// One label's value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.shared.info.labels.get(key).map(String::as_str)
    }

    /// Everything Hello established.
    pub fn info(&self) -> &PeerInfo {
        &self.shared.info
    }

    /// When the connection completed Hello.
    pub fn connected_at(&self) -> SystemTime {
        self.shared.info.connected_at
    }

    /// The peer's current UDP address (it changes if the peer migrates).
    /// Over a Unix socket, the unspecified address `0.0.0.0:0`.
    pub fn remote_address(&self) -> SocketAddr {
        self.shared.transport.remote_address()
    }

    /// The Unix peer's credentials (`SO_PEERCRED`), on the accepting side of
    /// a Unix socket.
    pub fn credentials(&self) -> Option<UnixCredentials> {
        self.shared.credentials
    }

    /// Whether the other side speaks brpc (always over QUIC; over a byte
    /// stream, once the Hello succeeded). Only then are response metadata
    /// frames sent and may the accepting side call the dialer.
    pub fn remote_is_brpc(&self) -> bool {
        self.shared.transport.remote_is_brpc()
    }

    /// Records that a byte-stream peer said brpc Hello (QUIC peers always speak brpc).
    pub(crate) fn set_remote_is_brpc(&self) {
        self.shared.transport.set_remote_is_brpc();
    }

    /// Opens a new call to the peer and sends its Request frame (`request`,
    /// encoded by [`encode_request`](crate::wire::encode_request), travelling
    /// as `shape`). The call's machine comes back with the stream; `sent`
    /// says whether the Request went out: a callee that stopped the stream
    /// at once still answers on the reader.
    pub(crate) async fn open_call(
        &self,
        request: Payload,
        shape: RequestShape,
    ) -> Result<OpenedCall, Status> {
        let limits = self.shared.limits;
        let config = self.call_config();
        match &self.shared.transport {
            Transport::Quic(connection) => {
                let (send, recv) = connection.open_bi().await.map_err(|e| {
                    Status::unavailable(format!(
                        "cannot open a call to the peer: connection lost: {e}"
                    ))
                })?;
                let stream_id =
                    crate::wire::stream_id(send.id().index(), self.shared.side == Side::Dialer);
                let mut call = Call::caller(stream_id, config);
                let frame = call.send_request(request, shape)?;
                // Given up while the Request is still being written (its
                // deadline, or its caller dropped): the stream is reset as
                // a cancelled call, not finished mid-frame (which the callee
                // would take for a broken Request).
                let mut opening = CancelUnlessOpened(Some((CallWriter::Quic(send), recv)));
                let (writer, _) = opening.0.as_mut().expect("held until opened");
                let sent = writer.write_frame(frame).await;
                let (writer, recv) = opening.0.take().expect("held until opened");
                let reader = FrameReader::new(recv, limits.max_message_size)
                    .with_budgets(self.shared.budgets.clone(), false);
                Ok(OpenedCall {
                    writer,
                    reader: CallReader::Quic(reader),
                    call,
                    sent,
                })
            }
            Transport::Mux(mux) => {
                if self.shared.side == Side::Acceptor && !mux.remote_is_brpc() {
                    return Err(Status::unimplemented(
                        "the dialer speaks plain ttrpc and serves no calls (it did not say brpc Hello)",
                    ));
                }
                let mut opened = None;
                let (sink, source, _) = mux
                    .open(Box::new(|stream_id| {
                        let mut call = Call::caller(stream_id, config);
                        let frame = call.send_request(request, shape)?;
                        opened = Some(call);
                        Ok(frame)
                    }))
                    .await?;
                let call = opened.ok_or_else(|| Status::internal("no call was opened"))?;
                Ok(OpenedCall {
                    writer: CallWriter::Mux(sink),
                    reader: CallReader::Mux(source),
                    call,
                    sent: Ok(()),
                })
            }
        }
    }

    /// Waits for the next call the peer opens; `None` when the connection is gone.
    pub(crate) async fn accept_call(&self) -> Option<(CallWriter, CallReader, u32)> {
        let limits = self.shared.limits;
        match &self.shared.transport {
            Transport::Quic(connection) => {
                let (send, recv) = connection.accept_bi().await.ok()?;
                let id = recv.id();
                let stream_id =
                    crate::wire::stream_id(id.index(), id.initiator() == quinn::Side::Client);
                let reader = FrameReader::new(recv, limits.max_message_size)
                    .peer_opened()
                    .with_budgets(self.shared.budgets.clone(), true);
                Some((CallWriter::Quic(send), CallReader::Quic(reader), stream_id))
            }
            Transport::Mux(mux) => {
                let (sink, source, id) = std::future::poll_fn(|cx| mux.poll_accept(cx)).await?;
                Some((CallWriter::Mux(sink), CallReader::Mux(source), id))
            }
        }
    }

    /// The limits of one call on this connection, as its machine takes them.
    /// Over a byte stream frames arrive whole: no call waits mid-frame.
    pub(crate) fn call_config(&self) -> CallConfig {
        CallConfig {
            max_message_size: self.shared.limits.max_message_size,
            idle_limit: self
                .shared
                .transport
                .quic()
                .and(self.shared.limits.idle_timeout),
            metadata_frames: self.remote_is_brpc(),
        }
    }

    /// Which end of the connection this side is.
    pub fn side(&self) -> Side {
        self.shared.side
    }

    /// Largest message this side sends or accepts on the connection.
    pub fn max_message_size(&self) -> usize {
        self.shared.limits.max_message_size
    }

    /// The per-call limits this side enforces on the connection.
    pub fn limits(&self) -> CallLimits {
        self.shared.limits
    }

    /// Bytes of frames being received on this connection that this side
    /// holds right now (charged to its budget).
    pub fn buffered_bytes(&self) -> usize {
        self.shared.budgets.connection.in_use()
    }

    /// What the peer's certificate proves (see [`PeerInfo::identity`]).
    pub fn identity(&self) -> Option<&PeerIdentity> {
        self.shared.info.identity.as_ref()
    }

    /// The underlying QUIC connection (`None` over a byte stream).
    pub fn quic_connection(&self) -> Option<&quinn::Connection> {
        self.shared.transport.quic()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.transport.is_closed()
    }

    /// How the connection ended, if it has (see [`ConnectionError`]).
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.shared
            .transport
            .close_reason(self.shared.side, self.local_close())
    }

    /// Waits until the connection ends and says how.
    pub async fn closed(&self) -> ConnectionError {
        self.shared
            .transport
            .closed(self.shared.side, || self.local_close())
            .await
    }

    fn local_close(&self) -> Option<(u32, String)> {
        self.shared.local_close.get().cloned()
    }

    /// Calls in flight on this connection, both directions.
    pub fn calls_in_flight(&self) -> usize {
        self.shared.calls.get(true) + self.shared.calls.get(false)
    }

    /// Calls this side is serving for the peer right now.
    pub fn served_calls_in_flight(&self) -> usize {
        self.shared.calls.get(true)
    }

    /// Waits until no call is in flight on this connection, either way (the
    /// drain of a graceful shutdown; see [`Peer::start_draining`]).
    pub async fn calls_drained(&self) {
        self.shared
            .calls
            .wait_until(|c| c.get(true) == 0 && c.get(false) == 0)
            .await;
    }

    /// Waits until this side serves no call of the peer's.
    pub async fn served_calls_drained(&self) {
        self.shared.calls.wait_until(|c| c.get(true) == 0).await;
    }

    /// Called as a call of the peer's is accepted, with the number being
    /// served (this one included): once the calls QUIC counts against the
    /// initial window fill three quarters of it, the peer may open up to
    /// `max_concurrent_calls` (one MAX_STREAMS frame; it never shrinks
    /// back). QUIC counts a call not only while it is served but after it
    /// ended too, until the caller has acknowledged the answer (the stream
    /// is then freed here) and has the credit back, about one and a half
    /// round trips: `ended` counts the calls that ended within two of the
    /// connection's shortest round trips (quinn's `min_rtt`, not its
    /// smoothed estimate, which a slow handshake leaves high for a while),
    /// so quick calls over a long round trip widen it too. (A caller that
    /// acknowledges late, up to its `max_ack_delay`, keeps streams counted
    /// longer than that; one that sends steadily acknowledges with its next
    /// request.)
    pub(crate) fn widen_call_window(&self, serving: usize, ended: &Ended) {
        if !self.call_window_narrow() {
            return;
        }
        let Transport::Quic(connection) = &self.shared.transport else {
            return;
        };
        let initial = super::quic::initial_call_window(self.shared.limits.max_concurrent_calls);
        let in_use = serving + ended.within(std::time::Instant::now(), 2 * connection.min_rtt());
        if in_use * 4 >= initial as usize * 3
            && !self.shared.window_widened.swap(true, Ordering::Relaxed)
        {
            connection
                .set_max_concurrent_bi_streams(self.shared.limits.max_concurrent_calls.into());
        }
    }

    /// One of the peer's calls ended: recorded in `ended` while the call
    /// window may still widen.
    pub(crate) fn call_ended(&self, ended: &mut Ended) {
        if self.call_window_narrow() {
            ended.record();
        }
    }

    /// Whether this connection's call window may still widen: QUIC, below
    /// `max_concurrent_calls`, not widened yet.
    fn call_window_narrow(&self) -> bool {
        matches!(self.shared.transport, Transport::Quic(_))
            && super::quic::initial_call_window(self.shared.limits.max_concurrent_calls)
                < self.shared.limits.max_concurrent_calls
            && !self.shared.window_widened.load(Ordering::Relaxed)
    }

    #[doc(hidden)]
    /// Whether this connection lets the peer open `max_concurrent_calls`
    /// calls at once yet, not just the initial window (QUIC only; for tests).
    pub fn call_window_widened(&self) -> bool {
        self.shared.window_widened.load(Ordering::Relaxed)
    }

    /// Starts recording one call on this connection (`served`: the peer's
    /// call to this side): its span, in-flight count and outcome.
    pub(crate) fn record_call(&self, served: bool) -> CallRecord {
        CallRecord::new(&self.shared.calls, &self.connection_id(), served)
    }

    /// Stops serving new calls from the peer: they get `UNAVAILABLE`. Calls
    /// already running continue. Used by graceful shutdown.
    pub fn start_draining(&self) {
        self.shared.lifecycle.start_draining();
    }

    /// Whether this side refuses new calls from the peer.
    pub fn is_draining(&self) -> bool {
        self.shared.lifecycle.draining.load(Ordering::SeqCst)
    }

    /// Waits until this side starts draining ([`Peer::start_draining`]): how
    /// a long-lived call it serves (a watch, a subscription) learns to end
    /// so that a graceful shutdown need not wait out its grace period.
    pub async fn draining(&self) {
        self.shared.lifecycle.wait(|l| &l.draining).await;
    }

    /// Whether the peer announced it is going away (GoAway): new calls to it
    /// fail with `UNAVAILABLE`; calls in flight continue.
    pub fn is_going_away(&self) -> bool {
        self.shared.lifecycle.going_away.load(Ordering::SeqCst)
    }

    /// The reason the peer gave when it said GoAway.
    pub fn going_away_reason(&self) -> Option<String> {
        self.shared.lifecycle.reason()
    }

    /// Waits until the peer announces it is going away.
    pub async fn going_away(&self) {
        self.shared.lifecycle.wait(|l| &l.going_away).await;
    }

    pub(crate) fn mark_going_away(&self, reason: String) {
        self.shared.lifecycle.go_away(reason);
    }

    /// Whether new calls can be opened to the peer.
    pub fn is_usable(&self) -> bool {
        !self.is_closed() && !self.is_going_away()
    }

    /// Closes the connection now with an application `code` and `reason`
    /// (see [`codes`](super::codes)). Calls in flight fail.
    pub fn close(&self, code: u32, reason: &str) {
        // The first close is how the connection ended.
        if !self.is_closed() {
            let _ = self.shared.local_close.set((code, reason.to_owned()));
        }
        self.shared.transport.close(code, reason);
    }
}

/// A call's stream while its Request is being written: dropped then, the
/// call is cancelled both ways (RESET_STREAM and STOP_SENDING with
/// `STREAM_CANCELLED`).
struct CancelUnlessOpened(Option<(CallWriter, quinn::RecvStream)>);

impl Drop for CancelUnlessOpened {
    fn drop(&mut self) {
        if let Some((mut writer, mut recv)) = self.0.take() {
            writer.reset(crate::wire::codes::STREAM_CANCELLED);
            let _ = recv.stop(quinn::VarInt::from_u32(
                crate::wire::codes::STREAM_CANCELLED,
            ));
        }
    }
}

/// When the peer's last few calls ended, for what QUIC still counts of
/// them against the call window ([`Peer::widen_call_window`]). Kept by the
/// task serving the connection, while the window is narrow.
#[derive(Debug)]
pub(crate) struct Ended {
    start: std::time::Instant,
    /// Microseconds from `start`, plus one (so that `Option` takes no room
    /// of its own: this lives in every connection's task), the oldest at
    /// `next`.
    at: [Option<std::num::NonZeroU64>; CROWD - 1],
    next: usize,
}

/// Calls that fill three quarters of the initial call window.
const CROWD: usize = (super::quic::INITIAL_CALL_WINDOW as usize * 3).div_ceil(4);

impl Ended {
    pub(crate) fn new() -> Self {
        Ended {
            start: std::time::Instant::now(),
            at: [None; CROWD - 1],
            next: 0,
        }
    }

    /// A call ended now.
    pub(crate) fn record(&mut self) {
        self.record_at(std::time::Instant::now());
    }

    fn record_at(&mut self, now: std::time::Instant) {
        self.at[self.next] = std::num::NonZeroU64::new(self.micros(now).saturating_add(1));
        self.next = (self.next + 1) % self.at.len();
    }

    /// How many of the calls recorded ended within `counted_for` before
    /// `now`.
    fn within(&self, now: std::time::Instant, counted_for: std::time::Duration) -> usize {
        let now = self.micros(now);
        let counted_for = u64::try_from(counted_for.as_micros()).unwrap_or(u64::MAX);
        self.at
            .iter()
            .flatten()
            .filter(|&&at| now.saturating_sub(at.get() - 1) <= counted_for)
            .count()
    }

    fn micros(&self, at: std::time::Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_micros()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::{CROWD, Ended, Lifecycle};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn lifecycle_waiters_wake_at_the_change_they_wait_for() {
        // (Paused time: a waiter that is never woken fails the test at
        // once, when only the timeout is left to run.)
        let within = |f| tokio::time::timeout(Duration::from_secs(10), f);
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        let lifecycle = Arc::new(Lifecycle::default());
        let draining = tokio::spawn({
            let l = lifecycle.clone();
            async move { l.wait(|l| &l.draining).await }
        });
        let going_away = tokio::spawn({
            let l = lifecycle.clone();
            async move { l.wait(|l| &l.going_away).await }
        });
        settle().await;
        // A change that is not the one waited for wakes the waiter, which
        // goes back to waiting.
        lifecycle.go_away("bye".into());
        within(going_away).await.unwrap().unwrap();
        settle().await;
        assert!(!draining.is_finished());
        lifecycle.start_draining();
        within(draining).await.unwrap().unwrap();
        // Once set, waiting returns at once; setting it again is no change.
        lifecycle.start_draining();
        lifecycle.wait(|l| &l.draining).await;
        assert_eq!(lifecycle.reason().as_deref(), Some("bye"));
    }

    /// Calls ending every `gap`, and another arriving `gap` after the last
    /// (served, 1): whether the window widens with the ended ones counted
    /// for `counted_for`, after `n` ended (the ring holds the last few).
    fn crowded(n: u32, gap: Duration, counted_for: Duration) -> bool {
        let mut ended = Ended::new();
        let start = ended.start;
        for i in 0..n {
            ended.record_at(start + gap * i);
        }
        let now = start + gap * n;
        (1 + ended.within(now, counted_for)) * 4 >= 8 * 3
    }

    #[test]
    fn calls_ended_within_the_time_counted_fill_the_window() {
        assert_eq!(CROWD, 6);
        let round_trips = Duration::from_millis(200);
        // A call ending every 5 ms or 39 ms: five of them and one served.
        assert!(crowded(5, Duration::from_millis(5), round_trips));
        assert!(crowded(100, Duration::from_millis(39), round_trips));
        assert!(crowded(5, Duration::ZERO, round_trips));
        // Four: not yet.
        assert!(!crowded(4, Duration::from_millis(5), round_trips));
        // One a round trip (calls one at a time), or now and then: never.
        assert!(!crowded(1000, Duration::from_millis(100), round_trips));
        assert!(!crowded(100, Duration::from_secs(5), round_trips));
        // Months into a connection as on its first day.
        let mut ended = Ended::new();
        let later = ended.start + Duration::from_secs(200 * 24 * 3600);
        for i in 0..10 {
            ended.record_at(later + Duration::from_secs(60) * i);
        }
        let now = later + Duration::from_secs(540) + Duration::from_millis(100);
        assert_eq!(ended.within(now, round_trips), 1);
    }
}
