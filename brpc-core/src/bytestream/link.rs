//! A ttrpc connection over one byte stream: a reader task that routes frames
//! to calls by stream id, and a writer task that serialises every call's
//! frames onto the socket.
//!
//! Routing follows containerd/ttrpc: the dialer opens odd ids, the acceptor
//! even ids (brpc's extension; plain ttrpc servers never do), remote ids must
//! increase, an oversized frame is skipped unread and answered
//! `RESOURCE_EXHAUSTED` on its stream only, Data for a stream that is gone is
//! answered `INVALID_ARGUMENT`, unknown frame types are ignored.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tonic::Status;

use crate::conn::spare;
use crate::conn::{
    BoxFuture, Budgets, CancelSignal, FrameSink, FrameSource, Lost, Multiplexer, MuxCall,
    ReadError, RequestBuilder, SendError, Side,
};
use crate::wire::{Flags, Frame, FrameDecoder, FrameError, FrameType, HEADER_LEN, Response};

/// Frames a call may have queued unread before the connection stops reading
/// for it (as Go's ttrpc, which buffers 64).
const STREAM_BUFFER: usize = 64;
/// How long a call may make the connection's reader wait (for room in its
/// queue, or in the budgets for its frames) before it is dropped: an
/// allowance that refills at a tenth of the time passing
/// ([`ALLOWANCE_REFILL`]), so a call that falls behind now and then keeps
/// going and one that reads more slowly than its peer sends does not.
const STREAM_FULL_WAIT: Duration = Duration::from_secs(1);
const ALLOWANCE_REFILL: u32 = 10;

/// How long frames already queued may take to go out once the connection is
/// closed.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Cancel frames that may wait for room in a connection's outbound queue
/// (each a small task) while its peer does not read.
const MAX_CANCELS_WAITING: usize = 256;

/// Why a connection that used up its side's stream ids closes.
const IDS_USED_UP: &str = "this connection has used all 2^31 stream ids of its side";

type Inbound = Result<Charged, ReadError>;

/// A frame queued for its call, its bytes charged to the connection's
/// budgets until the call takes it (or the frame is dropped unread).
struct Charged {
    frame: Frame,
    _charge: Charge,
}

/// Bytes reserved from budgets, given back when dropped.
struct Charge {
    budgets: Budgets,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budgets.release(self.bytes);
    }
}

/// One call's frames from the connection's reader, at most
/// [`STREAM_BUFFER`] of them. Not a channel: the link can empty it, so a
/// call dropped for not reading gives its frames' budget back at once,
/// though its reading half is still held. (Also smaller than a tokio
/// channel, whose first block alone is 2 KB a call.)
#[derive(Default)]
struct CallQueue(Mutex<QueueState>);

#[derive(Default)]
struct QueueState {
    frames: Frames,
    /// No frame comes any more: the call's route let go of it.
    closed: bool,
    /// The call's reading half, waiting for a frame.
    reader: Option<Waker>,
    /// The connection's reader, waiting for room.
    room: Option<Waker>,
}

/// A call's queued frames, oldest first: the first in place (most calls
/// have one frame each way), the others in a deque allocated only for them.
#[derive(Default)]
struct Frames {
    first: Option<Inbound>,
    rest: VecDeque<Inbound>,
}

impl Frames {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn push_back(&mut self, item: Inbound) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(item);
        } else {
            self.rest.push_back(item);
        }
    }

    fn pop_front(&mut self) -> Option<Inbound> {
        self.first.take().or_else(|| self.rest.pop_front())
    }
}

impl CallQueue {
    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` if there is room (a closed queue drops it); gives it
    /// back when full.
    fn try_push(&self, item: Inbound) -> Result<(), Inbound> {
        self.offer(item, None)
    }

    /// Queues `item` once there is room (or drops it once closed).
    async fn push(&self, item: Inbound) {
        let mut item = Some(item);
        std::future::poll_fn(|cx| match item.take() {
            Some(next) => match self.offer(next, Some(cx.waker())) {
                Ok(()) => Poll::Ready(()),
                Err(next) => {
                    item = Some(next);
                    Poll::Pending
                }
            },
            None => Poll::Ready(()),
        })
        .await;
    }

    /// [`try_push`](Self::try_push); when full, `room` is woken once there
    /// is room.
    fn offer(&self, item: Inbound, room: Option<&Waker>) -> Result<(), Inbound> {
        let mut state = self.state();
        if state.closed {
            drop(state);
            drop(item);
            return Ok(());
        }
        if state.frames.len() >= STREAM_BUFFER {
            if let Some(room) = room {
                state.room = Some(room.clone());
            }
            return Err(item);
        }
        state.frames.push_back(item);
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
        Ok(())
    }

    /// The next frame; `None` once the queue is closed and empty.
    fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        let mut state = self.state();
        if let Some(item) = state.frames.pop_front() {
            let room = state.room.take();
            drop(state);
            if let Some(room) = room {
                room.wake();
            }
            return Poll::Ready(Some(item));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        if !state
            .reader
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.reader = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// No frame comes any more; with `empty`, the queued ones go now (and
    /// their charges with them).
    fn close(&self, empty: bool) {
        let mut state = self.state();
        state.closed = true;
        let dropped = if empty {
            std::mem::take(&mut state.frames)
        } else {
            Frames::default()
        };
        let wakers = (state.reader.take(), state.room.take());
        drop(state);
        drop(dropped);
        wakers.0.into_iter().chain(wakers.1).for_each(Waker::wake);
    }
}

/// A route's hold on its call's queue: closes it when let go of (queued
/// frames stay for the reading half, as with a connection that closed).
struct QueueTx(Arc<CallQueue>);

impl Drop for QueueTx {
    fn drop(&mut self) {
        self.0.close(false);
    }
}

/// Stream ids are integers chosen by the two peers, in increasing order: a
/// mixing hash (no SipHash) spreads every bit of them over the table.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        // Every bit of the id reaches the low bits the table indexes by
        // (ids strided by a power of two must not share one probe chain).
        let mut x = u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 32;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        self.0 = x ^ (x >> 29);
    }
}

type StreamMap = HashMap<u32, Route, std::hash::BuildHasherDefault<IdHasher>>;

/// A running call: where the reader puts its frames, and what its two
/// halves share.
struct Route {
    /// Its queue; `None` once its reading half is gone, stopped or dropped
    /// for not reading: its frames are then dropped unread.
    tx: Option<QueueTx>,
    /// Its halves still held (reading and sending): the route goes with
    /// the last, so the peer can still cancel a call whose handler has let
    /// go of its input but still sends.
    halves: u8,
    /// How much of its allowance ([`STREAM_FULL_WAIT`]) the call has used
    /// making the reader wait, as of `held_at`.
    held: Duration,
    held_at: Option<tokio::time::Instant>,
    /// The peer sent Cancel: it reads none of this call's frames any more.
    cancelled: bool,
    /// The reader has seen the peer's last frame of the call (delivered or
    /// not): nothing to cancel.
    peer_finished: bool,
    /// Dropped for not reading ([`Link::drop_call`]): what its reader sees.
    dropped: bool,
    /// This side sent Cancel for the call (at most one is sent).
    cancel_sent: bool,
    /// Woken when the peer cancels the call (its sending half's wait).
    cancel_waker: Option<std::task::Waker>,
    /// For a call this side opened: its place among the calls this side
    /// may have running at once, given back with the route.
    _slot: Option<OwnedSemaphorePermit>,
}

/// What the reader does with a frame for a call.
enum Routing {
    Deliver(Arc<CallQueue>),
    /// A call whose reading half is gone: dropped unread.
    Discard,
    /// No such call.
    Unknown,
}

/// What a call dropped for not reading its frames sees (rather than a lost
/// connection: the connection is fine).
const DROPPED: &str = "this call did not take its frames in time (its queue of 64 was \
     full for a second in all, or the inbound buffer budget had no room for a second) and was \
     dropped; read a call's stream promptly";

/// One byte-stream connection. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Link {
    inner: Arc<Inner>,
}

struct Inner {
    side: Side,
    out: mpsc::Sender<Frame>,
    streams: Mutex<StreamMap>,
    /// The id this side's next call takes; past `u32::MAX` the ids are used
    /// up (2^31 calls) and the connection closes once its calls are over.
    next_id: AtomicU64,
    /// Set when this side's ids ran out: the last call to end closes it.
    ids_used_up: AtomicBool,
    incoming: Mutex<mpsc::Receiver<(u32, StreamOutbound, StreamInbound)>>,
    /// Taken while a new id is chosen and its Request queued.
    opening: Mutex<()>,
    closed: watch::Sender<Option<String>>,
    remote_is_brpc: AtomicBool,
    /// What frames queued for calls are charged to.
    budgets: Budgets,
    /// How many running calls the peer cancelled, read without a lock:
    /// every write asks, and almost always none was.
    cancelled_count: AtomicUsize,
    /// Cancel frames waiting for room in `out` (at most
    /// [`MAX_CANCELS_WAITING`]).
    cancels_waiting: AtomicUsize,
    /// Most calls the peer may have running at once (the connection's
    /// `max_concurrent_calls`); a Request past it is refused.
    max_peer_calls: usize,
    /// Calls the peer opened that are running (their routes), changed
    /// under the `streams` lock.
    peer_calls: AtomicUsize,
    /// Places for the calls this side opens: as many as it lets the peer
    /// have, and never fewer than the default limit (this side's own limit
    /// says what the peer may open, not what this side may), so a brpc peer
    /// with the same limit seldom refuses one for being over it (over QUIC
    /// the peer's stream limit makes a caller wait in the same way).
    /// Closed with the connection.
    call_slots: Arc<Semaphore>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("side", &self.inner.side)
            .finish()
    }
}

impl Link {
    /// Starts the reader and writer tasks on `io`. The peer may have at
    /// most `max_peer_calls` calls running at once.
    pub(crate) fn spawn<S>(
        io: S,
        side: Side,
        max_message_size: usize,
        max_peer_calls: usize,
        budgets: Budgets,
    ) -> Link
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read_half, write_half) = tokio::io::split(io);
        let (out, out_rx) = mpsc::channel(256);
        let (incoming_tx, incoming_rx) = mpsc::channel(256);
        let link = Link {
            inner: Arc::new(Inner {
                side,
                out,
                streams: Mutex::new(StreamMap::default()),
                next_id: AtomicU64::new(if side == Side::Dialer { 1 } else { 2 }),
                ids_used_up: AtomicBool::new(false),
                incoming: Mutex::new(incoming_rx),
                opening: Mutex::new(()),
                closed: watch::Sender::new(None),
                remote_is_brpc: AtomicBool::new(false),
                budgets,
                cancelled_count: AtomicUsize::new(0),
                cancels_waiting: AtomicUsize::new(0),
                max_peer_calls,
                peer_calls: AtomicUsize::new(0),
                call_slots: Arc::new(Semaphore::new(
                    max_peer_calls
                        .max(crate::conn::DEFAULT_MAX_CONCURRENT_CALLS as usize)
                        .min(Semaphore::MAX_PERMITS),
                )),
            }),
        };
        tokio::spawn(write_loop(write_half, out_rx, link.clone()));
        tokio::spawn(read_loop(
            read_half,
            link.clone(),
            incoming_tx,
            max_message_size,
        ));
        link
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, StreamMap> {
        self.inner.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes the call `id`'s route, keeping the count of cancelled ones;
    /// whether it was there.
    fn remove_route(&self, streams: &mut StreamMap, id: u32) -> bool {
        match streams.remove(&id) {
            Some(route) => {
                if route.cancelled {
                    self.inner.cancelled_count.fetch_sub(1, Ordering::Relaxed);
                }
                if self.opened_by_peer(id) {
                    self.inner.peer_calls.fetch_sub(1, Ordering::Relaxed);
                }
                true
            }
            None => false,
        }
    }

    /// The peer cancelled the call `id` (a Cancel frame): writes to it fail
    /// from now on and its waiter ([`CancelSignal`]) wakes.
    fn peer_cancelled(&self, id: u32) {
        let waiter = match self.streams().get_mut(&id) {
            Some(route) if !route.cancelled => {
                route.cancelled = true;
                self.inner.cancelled_count.fetch_add(1, Ordering::Relaxed);
                route.cancel_waker.take()
            }
            _ => None,
        };
        // The call's own waiter only: a Cancel wakes no other call.
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }

    /// Whether the peer cancelled the call `id`.
    fn is_cancelled(&self, id: u32) -> bool {
        self.inner.cancelled_count.load(Ordering::Relaxed) > 0
            && self.streams().get(&id).is_some_and(|route| route.cancelled)
    }

    /// Asks the peer (a brpc peer; a plain ttrpc one has no such frame) to
    /// stop the call `id`: this side reads none of its frames any more.
    /// Queued behind the call's frames already queued (its Request among
    /// them), so the peer never sees the Cancel first.
    fn send_cancel(&self, id: u32) {
        if !self.remote_is_brpc() || self.close_reason().is_some() {
            return;
        }
        let frame = Frame::new(id, FrameType::Cancel, Flags::EMPTY, Bytes::new());
        if let Err(mpsc::error::TrySendError::Full(frame)) = self.inner.out.try_send(frame) {
            // Called from a drop: the wait for room is a task's, a bounded
            // number of them (a Cancel is advice: past that it is not sent).
            let waiting = &self.inner.cancels_waiting;
            if waiting.fetch_add(1, Ordering::Relaxed) >= MAX_CANCELS_WAITING {
                waiting.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let link = self.clone();
                    runtime.spawn(async move {
                        let _ = link.inner.out.send(frame).await;
                        link.inner.cancels_waiting.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(_) => {
                    waiting.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// What to do with a frame for the call `id`; `last`: it is the
    /// peer's last frame of the call.
    fn routing(&self, id: u32, last: bool) -> Routing {
        match self.streams().get_mut(&id) {
            Some(route) => {
                route.peer_finished |= last;
                match &route.tx {
                    Some(tx) => Routing::Deliver(tx.0.clone()),
                    None => Routing::Discard,
                }
            }
            None => Routing::Unknown,
        }
    }

    /// How much longer the reader may wait for the call `id` (`None` once
    /// the call is gone): its allowance, refilled for the time since it
    /// was last counted.
    fn hold_left(&self, id: u32) -> Option<Duration> {
        let mut streams = self.streams();
        let route = streams.get_mut(&id)?;
        let now = tokio::time::Instant::now();
        if let Some(at) = route.held_at {
            route.held = route.held.saturating_sub((now - at) / ALLOWANCE_REFILL);
        }
        route.held_at = Some(now);
        Some(STREAM_FULL_WAIT.saturating_sub(route.held))
    }

    /// Counts `waited` against the call `id`'s allowance.
    fn held(&self, id: u32, waited: Duration) {
        if let Some(route) = self.streams().get_mut(&id) {
            route.held += waited;
            route.held_at = Some(tokio::time::Instant::now());
        }
    }

    /// Stops routing frames to the call `id`, which does not take them (its
    /// reader then sees that it was dropped), and tells a brpc peer.
    fn drop_call(&self, id: u32) {
        let (queue, cancel) = match self.streams().get_mut(&id) {
            Some(route) => {
                let queue = route.tx.take();
                route.dropped |= queue.is_some();
                let cancel = queue.is_some() && self.cancel_once(route, id);
                (queue, cancel)
            }
            None => (None, false),
        };
        // Its queued frames go now, and their budget with them (out of the
        // lock).
        if let Some(queue) = queue {
            queue.0.close(true);
        }
        if cancel {
            self.send_cancel(id);
        }
    }

    /// Whether the peer may still send frames of the call `id` (`route`):
    /// it has not sent its last one, and it is not a caller that cancelled
    /// the call (a caller's Cancel abandons the call; a callee's only says
    /// it reads no more, and it may still be sending its answer).
    fn peer_still_sends(&self, route: &Route, id: u32) -> bool {
        let caller_cancelled = route.cancelled && self.opened_by_peer(id);
        !(route.peer_finished || caller_cancelled)
    }

    /// Whether to send Cancel for the call `id` (`route`) now: the peer
    /// still sends, and none was sent yet. Marks it sent.
    fn cancel_once(&self, route: &mut Route, id: u32) -> bool {
        let cancel = !route.cancel_sent && self.peer_still_sends(route, id);
        route.cancel_sent |= cancel;
        cancel
    }

    /// Whether the call `id` was dropped for not reading (asked by its
    /// reading half, which keeps its route).
    fn was_dropped(&self, id: u32) -> bool {
        self.streams().get(&id).is_some_and(|route| route.dropped)
    }

    /// A new call `id` and its two halves, with `first` (the peer's
    /// Request) already queued for its reading half.
    fn register(
        &self,
        id: u32,
        first: Option<Charged>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> (StreamOutbound, StreamInbound) {
        let queue = Arc::new(CallQueue::default());
        // A Request that opens no stream is all the peer sends.
        let peer_finished = first.as_ref().is_some_and(|first| is_last(&first.frame));
        if let Some(first) = first {
            let _ = queue.try_push(Ok(first));
        }
        let mut streams = self.streams();
        if self.opened_by_peer(id) {
            self.inner.peer_calls.fetch_add(1, Ordering::Relaxed);
        }
        streams.insert(
            id,
            Route {
                tx: Some(QueueTx(queue.clone())),
                halves: 2,
                held: Duration::ZERO,
                held_at: None,
                cancelled: false,
                peer_finished,
                dropped: false,
                cancel_sent: false,
                cancel_waker: None,
                _slot: slot,
            },
        );
        drop(streams);
        let outbound = StreamOutbound {
            link: self.clone(),
            id,
        };
        let inbound = StreamInbound {
            link: self.clone(),
            id,
            queue,
            stopped: false,
        };
        (outbound, inbound)
    }

    /// Opens a call and queues its Request, built by `request` for the id:
    /// the next id of this side's
    /// parity. Taking the id and queueing the frame happen under one lock, so
    /// ids reach the socket in increasing order however many calls open at
    /// once (ttrpc servers refuse an id that does not increase).
    async fn open_call(
        &self,
        request: RequestBuilder<'_>,
    ) -> Result<(StreamOutbound, StreamInbound, u32), Status> {
        let closed = || {
            Status::unavailable(format!(
                "connection closed: {}",
                self.close_reason().unwrap_or_default()
            ))
        };
        // Wait for a place among this side's calls, and for room in the
        // queue, first, outside the lock.
        let slot = self
            .inner
            .call_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let permit = self.inner.out.reserve().await.map_err(|_| closed())?;
        if self.close_reason().is_some() {
            return Err(closed());
        }
        let (id, outbound, inbound) = {
            let _order = self.inner.opening.lock().unwrap_or_else(|e| e.into_inner());
            // Again under the lock `close` clears the calls under: a call
            // registered after that would never be ended.
            if self.close_reason().is_some() {
                return Err(closed());
            }
            let Ok(id) = u32::try_from(self.inner.next_id.load(Ordering::Relaxed)) else {
                // Starting again at 1 would break the rule that ids increase
                // (ttrpc servers refuse such a call): the connection is
                // retired instead, once the calls still running are over.
                self.inner.ids_used_up.store(true, Ordering::Relaxed);
                if self.streams().is_empty() {
                    self.close_now(IDS_USED_UP);
                }
                return Err(Status::unavailable(format!(
                    "{IDS_USED_UP}; it closes once its running calls end: open a new connection"
                )));
            };
            let frame = request(id)?;
            self.inner
                .next_id
                .store(u64::from(id) + 2, Ordering::Relaxed);
            let (outbound, inbound) = self.register(id, None, Some(slot));
            permit.send(frame);
            (id, outbound, inbound)
        };
        Ok((outbound, inbound, id))
    }

    /// The next call the peer opened, or `None` once the connection is gone.
    /// One task accepts (the connection's serve loop): the queue keeps one
    /// waker.
    fn poll_accept_call(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<(StreamOutbound, StreamInbound, u32)>> {
        let mut incoming = self
            .inner
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        incoming.poll_recv(cx).map(|accepted| {
            let (id, outbound, inbound) = accepted?;
            Some((outbound, inbound, id))
        })
    }

    pub(crate) fn close_reason(&self) -> Option<String> {
        self.inner.closed.borrow().clone()
    }

    pub(crate) async fn closed(&self) -> String {
        let mut rx = self.inner.closed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "connection dropped".into(),
        }
    }

    /// Ends the connection: the socket is shut down and every call fails.
    pub(crate) fn close(&self, reason: &str) {
        {
            // Under the lock calls are opened under (see `open_call`).
            let _order = self.inner.opening.lock().unwrap_or_else(|e| e.into_inner());
            self.close_now(reason);
        }
        self.drop_unaccepted();
    }

    /// Forgets the calls the peer opened that were never accepted, and
    /// takes no more: each holds the link (and its first frame's charge),
    /// so left queued they would keep the connection's state, and the
    /// budgets, for ever. Dropped outside the queue's lock (a call's drop
    /// may close the link again).
    fn drop_unaccepted(&self) {
        let unaccepted: Vec<_> = {
            let mut incoming = self
                .inner
                .incoming
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            incoming.close();
            std::iter::from_fn(|| incoming.try_recv().ok()).collect()
        };
        drop(unaccepted);
    }

    /// [`close`](Self::close), for a caller holding the `opening` lock.
    fn close_now(&self, reason: &str) {
        self.inner.closed.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason.to_owned());
                true
            } else {
                false
            }
        });
        {
            let mut streams = self.streams();
            streams.clear();
            self.inner.cancelled_count.store(0, Ordering::Relaxed);
            self.inner.peer_calls.store(0, Ordering::Relaxed);
            // Calls waiting for a place fail now.
            self.inner.call_slots.close();
        }
    }

    /// The call `id`'s reading half stopped, or is gone with `release`:
    /// its frames are dropped unread from now on, and a peer still sending
    /// them is told to stop (once). One lock for all of it.
    fn stop_reading(&self, id: u32, release: bool) {
        let (queue, cancel, idle) = {
            let mut streams = self.streams();
            let (queue, cancel) = match streams.get_mut(&id) {
                Some(route) => {
                    let queue = route.tx.take();
                    let cancel = self.cancel_once(route, id);
                    if release {
                        self.release_half(&mut streams, id);
                    }
                    (queue, cancel)
                }
                None => (None, false),
            };
            (queue, cancel, streams.is_empty())
        };
        // What is queued goes now, and its budget with it (out of the lock).
        if let Some(queue) = queue {
            queue.0.close(true);
        }
        if cancel {
            self.send_cancel(id);
        }
        if release {
            self.close_if_used_up(idle);
        }
    }

    /// The sending half of the call `id` is gone.
    fn release_sending(&self, id: u32) {
        let idle = {
            let mut streams = self.streams();
            self.release_half(&mut streams, id);
            streams.is_empty()
        };
        self.close_if_used_up(idle);
    }

    /// One half of the call `id` is gone: with the last the call is
    /// forgotten.
    fn release_half(&self, streams: &mut StreamMap, id: u32) {
        if let Some(route) = streams.get_mut(&id) {
            route.halves -= 1;
            if route.halves == 0 {
                self.remove_route(streams, id);
            }
        }
    }

    /// The last call to end on a connection whose ids ran out closes it.
    fn close_if_used_up(&self, idle: bool) {
        if idle && self.inner.ids_used_up.load(Ordering::Relaxed) {
            self.close(IDS_USED_UP);
        }
    }

    pub(crate) fn remote_is_brpc(&self) -> bool {
        self.inner.remote_is_brpc.load(Ordering::Relaxed)
    }

    pub(crate) fn set_remote_is_brpc(&self) {
        self.inner.remote_is_brpc.store(true, Ordering::Relaxed);
    }

    /// Reserves `bytes` of the budgets for a frame queued for a call, at
    /// once.
    fn charge_now(&self, bytes: usize) -> Option<Charge> {
        let budgets = &self.inner.budgets;
        budgets.try_reserve(bytes).then(|| Charge {
            budgets: budgets.clone(),
            bytes,
        })
    }

    /// [`charge_now`](Self::charge_now) for a frame of the running call
    /// `id`, waiting for room as long as the call's allowance lasts.
    async fn charge_for(&self, id: u32, bytes: usize) -> Option<Charge> {
        if let Some(charge) = self.charge_now(bytes) {
            return Some(charge);
        }
        let budgets = &self.inner.budgets;
        self.within_allowance(id, Box::pin(budgets.reserve(bytes)))
            .await
            .map(|()| Charge {
                budgets: budgets.clone(),
                bytes,
            })
    }

    /// `wait`, for as long as the call `id`'s allowance lasts (counting the
    /// time against it); `None` when that ran out, or the call is gone.
    async fn within_allowance<T>(&self, id: u32, wait: impl Future<Output = T>) -> Option<T> {
        let left = self.hold_left(id)?;
        let started = tokio::time::Instant::now();
        let done = tokio::time::timeout(left, wait).await.ok();
        self.held(id, started.elapsed());
        done
    }

    /// Whether `id` is of the parity the peer opens.
    fn opened_by_peer(&self, id: u32) -> bool {
        let odd = id % 2 == 1;
        match self.inner.side {
            Side::Acceptor => odd,
            Side::Dialer => !odd,
        }
    }

    /// Answers a stream the peer cannot use with a Response carrying `status`.
    async fn refuse(&self, id: u32, status: Status) {
        let response = Response {
            status: Some(crate::status::to_wire(&status)),
            payload: Bytes::new(),
        };
        let frame = Frame::new(
            id,
            FrameType::Response,
            Flags::EMPTY,
            response.encode_to_vec().into(),
        );
        let _ = self.inner.out.send(frame).await;
    }
}

impl Multiplexer for Link {
    fn open<'a>(&'a self, request: RequestBuilder<'a>) -> BoxFuture<'a, Result<MuxCall, Status>> {
        Box::pin(async move {
            let (sink, source, id) = self.open_call(request).await?;
            Ok((
                Box::new(sink) as Box<dyn FrameSink>,
                Box::new(source) as Box<dyn FrameSource>,
                id,
            ))
        })
    }

    fn poll_accept(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<MuxCall>> {
        self.poll_accept_call(cx).map(|accepted| {
            let (sink, source, id) = accepted?;
            Some((
                Box::new(sink) as Box<dyn FrameSink>,
                Box::new(source) as Box<dyn FrameSource>,
                id,
            ))
        })
    }

    fn close(&self, reason: &str) {
        Link::close(self, reason);
    }

    fn close_reason(&self) -> Option<String> {
        Link::close_reason(self)
    }

    fn closed(&self) -> BoxFuture<'static, String> {
        let link = self.clone();
        Box::pin(async move { link.closed().await })
    }

    fn remote_is_brpc(&self) -> bool {
        Link::remote_is_brpc(self)
    }

    fn set_remote_is_brpc(&self) {
        Link::set_remote_is_brpc(self);
    }
}

impl FrameSource for StreamInbound {
    fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Frame>, ReadError>> {
        StreamInbound::poll_next(self, cx)
    }

    fn stop(&mut self) {
        StreamInbound::stop(self);
    }
}

impl FrameSink for StreamOutbound {
    fn try_write(&mut self, frame: Frame) -> Result<Option<Frame>, SendError> {
        debug_assert_eq!(frame.stream_id, self.id, "a frame for another call");
        if self.link.is_cancelled(self.id) {
            return Err(SendError::Stopped);
        }
        let len = HEADER_LEN + frame.payload.len();
        match self.link.inner.out.try_send(frame) {
            Ok(()) => {
                super::super::conn::observe_bytes_sent(len);
                Ok(None)
            }
            Err(mpsc::error::TrySendError::Full(frame)) => Ok(Some(frame)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.lost()),
        }
    }

    fn write(&mut self, frame: Frame) -> BoxFuture<'_, Result<(), SendError>> {
        Box::pin(self.write_frame(frame))
    }

    fn cancel_signal(&self) -> (Arc<dyn CancelSignal>, u32) {
        (self.link.inner.clone(), self.id)
    }
}

impl CancelSignal for Inner {
    fn poll_cancelled(&self, id: u32, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        match streams.get_mut(&id) {
            Some(route) if route.cancelled => std::task::Poll::Ready(()),
            Some(route) => {
                if !route
                    .cancel_waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    route.cancel_waker = Some(cx.waker().clone());
                }
                std::task::Poll::Pending
            }
            // A call that is gone is not cancelled by its peer any more.
            None => std::task::Poll::Pending,
        }
    }
}

/// Frames for one call, routed by the reader task.
pub(crate) struct StreamInbound {
    link: Link,
    id: u32,
    queue: Arc<CallQueue>,
    stopped: bool,
}

impl StreamInbound {
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Frame>, ReadError>> {
        if self.stopped {
            return std::task::Poll::Ready(Err(ReadError::Closed));
        }
        // Each frame taken spends the task's tokio budget, as a channel's
        // would: a call reading a full queue in a loop yields now and then.
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let polled = self.queue.poll_pop(cx);
        if polled.is_ready() {
            coop.made_progress();
        }
        polled.map(|received| match received {
            // Taken: the frame is the call's now, no longer the link's.
            Some(Ok(charged)) => Ok(Some(charged.frame)),
            Some(Err(e)) => Err(e),
            None if self.link.was_dropped(self.id) => Err(ReadError::Exhausted(DROPPED.into())),
            None => Err(ReadError::Lost(Lost::Stream(self.link.close_reason()))),
        })
    }

    pub(crate) fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            // What is queued goes now, and its budget with it; the reader
            // waits no more for room here.
            self.link.stop_reading(self.id, false);
            self.queue.close(true);
        }
    }
}

impl Drop for StreamInbound {
    fn drop(&mut self) {
        // A brpc peer still sending this call's frames is told to stop,
        // unless it cancelled the call itself, its last frame came, or it
        // was told already.
        self.link.stop_reading(self.id, true);
    }
}

/// Whether `frame` is the last its sender sends on its call: a Response, a
/// Data frame closing the stream, or a Request that opens no stream.
fn is_last(frame: &Frame) -> bool {
    is_last_of(frame.kind, frame.flags)
}

/// [`is_last`] for a frame of this type and these flags.
fn is_last_of(kind: FrameType, flags: Flags) -> bool {
    match kind {
        FrameType::Response => true,
        FrameType::Data => flags.contains(Flags::REMOTE_CLOSED),
        FrameType::Request => !flags.contains(Flags::REMOTE_OPEN),
        _ => false,
    }
}

/// The sending half of one call.
pub(crate) struct StreamOutbound {
    link: Link,
    id: u32,
}

impl Drop for StreamOutbound {
    fn drop(&mut self) {
        self.link.release_sending(self.id);
    }
}

impl StreamOutbound {
    fn lost(&self) -> SendError {
        SendError::Lost(Lost::Stream(self.link.close_reason()))
    }

    async fn write_frame(&mut self, frame: Frame) -> Result<(), SendError> {
        debug_assert_eq!(frame.stream_id, self.id, "a frame for another call");
        if self.link.is_cancelled(self.id) {
            return Err(SendError::Stopped);
        }
        super::super::conn::observe_bytes_sent(HEADER_LEN + frame.payload.len());
        self.link
            .inner
            .out
            .send(frame)
            .await
            .map_err(|_| self.lost())
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut io: W,
    mut frames: mpsc::Receiver<Frame>,
    link: Link,
) {
    let mut closed = link.inner.closed.subscribe();
    let mut buf = BytesMut::new();
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            // Closing: what was queued before still goes out (a call's
            // answer sent just before a graceful shutdown closed the link).
            _ = closed.wait_for(Option::is_some) => frames.try_recv().ok(),
        };
        let Some(frame) = frame else { break };
        buf.clear();
        if frame.encode(&mut buf).is_err() {
            continue;
        }
        // Write everything already queued in one go.
        while let Ok(more) = frames.try_recv() {
            let _ = more.encode(&mut buf);
            if buf.len() > 256 * 1024 {
                break;
            }
        }
        // Once closed, what is being written gets a moment to go out, not
        // for ever: a peer that stopped reading must not keep the socket
        // and this task.
        let written = {
            let write = io.write_all(&buf);
            tokio::pin!(write);
            let first = tokio::select! {
                written = &mut write => Some(written),
                _ = closed.wait_for(Option::is_some) => None,
            };
            match first {
                Some(written) => Some(written),
                None => tokio::time::timeout(CLOSE_GRACE, &mut write).await.ok(),
            }
        };
        match written {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                link.close(&format!("write failed: {e}"));
                break;
            }
            None => break,
        }
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, io.shutdown()).await;
}

/// What a connection's read buffer starts with room for.
const READ_BUFFER: usize = 64 * 1024;

async fn read_loop<R: AsyncRead + Unpin>(
    mut io: R,
    link: Link,
    incoming: mpsc::Sender<(u32, StreamOutbound, StreamInbound)>,
    max_message_size: usize,
) {
    let mut decoder = FrameDecoder::new(max_message_size);
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    // The size of `buf`'s allocation while it is a large frame's own buffer
    // (`conn::spare`), 0 otherwise.
    let mut spare = 0;
    let mut last_remote_id = 0u32;
    let mut closed = link.inner.closed.subscribe();
    let reason = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                // A large frame's buffer held it alone (reads stopped at
                // its end): kept for the next large frame.
                spare::give_back(&mut buf, &mut spare, || {
                    BytesMut::with_capacity(READ_BUFFER)
                });
                route(&link, frame, &mut last_remote_id, &incoming).await;
                continue;
            }
            Ok(None) => {}
            Err(FrameError::TooLarge { header, max }) => {
                let status = Status::resource_exhausted(format!(
                    "message length {} exceed maximum message size of {max}",
                    header.length
                ));
                let last = is_last_of(header.kind, header.flags);
                match link.routing(header.stream_id, last) {
                    Routing::Deliver(tx) => {
                        let e = FrameError::TooLarge { header, max };
                        deliver(&link, header.stream_id, &tx, Err(ReadError::TooLarge(e))).await;
                    }
                    Routing::Unknown
                        if header.kind == FrameType::Request
                            && link.opened_by_peer(header.stream_id) =>
                    {
                        last_remote_id = last_remote_id.max(header.stream_id);
                        link.refuse(header.stream_id, status).await;
                    }
                    Routing::Discard | Routing::Unknown => {}
                }
                continue;
            }
        }
        let wanted = decoder.wanted(&buf);
        // A large frame is read into a buffer of its own, a kept one if one
        // is free, and no further: so its buffer can be kept once the frame
        // is done with (a new one per frame costs page faults). Only once
        // its data has started to arrive (a header alone allocates nothing)
        // and if it could be kept at all.
        let whole = buf.len() + wanted;
        if spare == 0
            && decoder.skipping() == 0
            && buf.len() > HEADER_LEN
            && spare::eligible(whole)
            && buf.capacity() - buf.len() < wanted
        {
            spare = spare::own_buffer(&mut buf, whole);
        }
        // Into a large frame's own buffer, no further than the frame.
        let most = if spare > 0 {
            wanted
        } else {
            buf.reserve(wanted.min(1 << 20));
            usize::MAX
        };
        let mut room = (&mut buf).limit(most);
        let read = tokio::select! {
            read = io.read_buf(&mut room) => read,
            _ = closed.wait_for(Option::is_some) => break "closed locally".to_owned(),
        };
        match read {
            Ok(0) => break "peer closed the connection".to_owned(),
            Ok(n) => super::super::conn::observe_bytes_received(n),
            Err(e) => break format!("read failed: {e}"),
        }
    };
    link.close(&reason);
}

/// Hands `item` to the call `id`, waiting for room in its queue only as
/// long as the call's allowance lasts ([`STREAM_FULL_WAIT`], refilling at
/// a tenth of the time passing): a call that stopped reading, or reads more
/// slowly than its peer sends, is dropped rather than stall the
/// connection's other calls.
async fn deliver(link: &Link, id: u32, queue: &CallQueue, item: Inbound) {
    let Err(item) = queue.try_push(item) else {
        return;
    };
    if link.within_allowance(id, queue.push(item)).await.is_none() {
        // (A call that is gone is not dropped again.)
        tracing::debug!(id, "stream buffer full too long; dropping the call");
        link.drop_call(id);
    }
}

async fn route(
    link: &Link,
    frame: Frame,
    last_remote_id: &mut u32,
    incoming: &mpsc::Sender<(u32, StreamOutbound, StreamInbound)>,
) {
    let id = frame.stream_id;
    if frame.kind == FrameType::Cancel {
        // From a brpc peer (to any other it is an unknown type), for a call
        // that is over or never was: nothing to stop.
        if link.remote_is_brpc() {
            link.peer_cancelled(id);
        }
        return;
    }
    match link.routing(id, is_last(&frame)) {
        Routing::Deliver(tx) => {
            match link.charge_for(id, frame.payload.len()).await {
                Some(charge) => {
                    let charged = Charged {
                        frame,
                        _charge: charge,
                    };
                    deliver(link, id, &tx, Ok(charged)).await;
                }
                None => {
                    // As for a call that stopped reading: dropped rather
                    // than the connection stalled.
                    tracing::debug!(id, "inbound buffer budget used up; dropping the call");
                    link.drop_call(id);
                }
            }
            return;
        }
        // Its reader is gone; its peer may not know yet.
        Routing::Discard => return,
        Routing::Unknown => {}
    }
    if !link.opened_by_peer(id) {
        if frame.kind == FrameType::Request {
            // A dialer must use odd ids; an acceptor even ones.
            link.refuse(
                id,
                Status::invalid_argument(match link.inner.side {
                    Side::Acceptor => "StreamID must be odd for calls from the dialing side",
                    Side::Dialer => "StreamID must be even for calls from the accepting side",
                }),
            )
            .await;
        }
        // Frames for a call of ours that has ended are dropped.
        return;
    }
    match frame.kind {
        FrameType::Request => {
            if id <= *last_remote_id {
                link.refuse(
                    id,
                    Status::invalid_argument("StreamID cannot be re-used and must increment"),
                )
                .await;
                return;
            }
            *last_remote_id = id;
            if link.inner.ids_used_up.load(Ordering::Relaxed) {
                // Retiring: it closes once its calls end, so none may start.
                let message = format!("{IDS_USED_UP}; it is closing: call again on a new one");
                link.refuse(id, Status::unavailable(message)).await;
                return;
            }
            // Past the connection's limit of calls a new one is refused:
            // a byte stream has no stream limit to hold the peer back.
            let running = link.inner.peer_calls.load(Ordering::Relaxed);
            if running >= link.inner.max_peer_calls {
                let message = format!(
                    "too many calls at once on this connection ({running}, the limit is {}); \
                     retry when one ends",
                    link.inner.max_peer_calls
                );
                link.refuse(id, Status::resource_exhausted(message)).await;
                return;
            }
            // A new call finds room at once or is refused, as over QUIC.
            let Some(charge) = link.charge_now(frame.payload.len()) else {
                let message = link.inner.budgets.exhausted_message(frame.payload.len());
                link.refuse(id, Status::resource_exhausted(message)).await;
                return;
            };
            let first = Charged {
                frame,
                _charge: charge,
            };
            let (outbound, inbound) = link.register(id, Some(first), None);
            // Not accepted (the connection is going): dropping the halves
            // forgets the call. A full queue (calls not being accepted) is
            // waited for only while the connection is open.
            if let Err(mpsc::error::TrySendError::Full(call)) =
                incoming.try_send((id, outbound, inbound))
            {
                let mut closed = link.inner.closed.subscribe();
                tokio::select! {
                    _ = incoming.send(call) => {}
                    _ = closed.wait_for(Option::is_some) => {}
                }
            }
        }
        FrameType::Data => {
            link.refuse(id, Status::invalid_argument("StreamID is no longer active"))
                .await;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::MemoryBudget;

    fn budgets() -> Budgets {
        Budgets {
            connection: MemoryBudget::new(1 << 20),
            total: MemoryBudget::new(1 << 20),
        }
    }

    async fn open(link: &Link) -> Result<(StreamOutbound, StreamInbound, u32), Status> {
        link.open_call(Box::new(|id| {
            Ok(Frame::new(
                id,
                FrameType::Request,
                Flags::REMOTE_OPEN,
                Bytes::from_static(b"call"),
            ))
        }))
        .await
    }

    async fn accept(link: &Link) -> u32 {
        std::future::poll_fn(|cx| link.poll_accept_call(cx))
            .await
            .expect("a call")
            .2
    }

    /// Two links over one in-memory socket that have said Hello.
    fn brpc_pair() -> (Link, Link) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let dialer = Link::spawn(a, Side::Dialer, 1 << 20, 100, budgets());
        let acceptor = Link::spawn(b, Side::Acceptor, 1 << 20, 100, budgets());
        dialer.set_remote_is_brpc();
        acceptor.set_remote_is_brpc();
        (dialer, acceptor)
    }

    async fn accept_halves(link: &Link) -> (StreamOutbound, StreamInbound) {
        let (outbound, inbound, _) = std::future::poll_fn(|cx| link.poll_accept_call(cx))
            .await
            .expect("a call");
        (outbound, inbound)
    }

    async fn stopped_in_time(outbound: &StreamOutbound) {
        let (signal, id) = outbound.cancel_signal();
        let stopped = std::future::poll_fn(|cx| signal.poll_cancelled(id, cx));
        tokio::time::timeout(Duration::from_secs(30), stopped)
            .await
            .expect("the peer's Cancel arrived");
    }

    /// A call dropped at once, its Request still queued: the Cancel goes
    /// out behind the Request (a Cancel first would find no call, and the
    /// call would then run to its end).
    #[tokio::test]
    async fn a_cancel_never_overtakes_its_calls_request() {
        let (dialer, acceptor) = brpc_pair();
        for _ in 0..20 {
            drop(open(&dialer).await.expect("opened"));
            let (mut outbound, _inbound) = accept_halves(&acceptor).await;
            stopped_in_time(&outbound).await;
            let frame = Frame::new(outbound.id, FrameType::Data, Flags::EMPTY, Bytes::new());
            assert!(matches!(
                FrameSink::try_write(&mut outbound, frame),
                Err(SendError::Stopped)
            ));
        }
    }

    /// A callee that let go of its input (its reading half) and still
    /// sends is cancelled all the same.
    #[tokio::test]
    async fn a_callee_without_its_reading_half_is_still_cancelled() {
        let (dialer, acceptor) = brpc_pair();
        let (out, inbound, _) = open(&dialer).await.expect("opened");
        let (outbound, their_inbound) = accept_halves(&acceptor).await;
        drop(their_inbound);
        drop((out, inbound));
        stopped_in_time(&outbound).await;
    }

    /// A call dropped for not reading tells its peer at once, not when its
    /// reader looks again.
    #[tokio::test]
    async fn a_call_dropped_for_not_reading_cancels_at_once() {
        let (dialer, acceptor) = brpc_pair();
        let (_out, _inbound, id) = open(&dialer).await.expect("opened");
        let (outbound, _their_inbound) = accept_halves(&acceptor).await;
        dialer.drop_call(id);
        stopped_in_time(&outbound).await;
    }

    /// A callee whose caller cancelled sends no Cancel back when its call's
    /// halves go (the caller reads nothing more; a peer that loops calls
    /// and Cancels must not draw a frame, or a task, for each).
    #[tokio::test(start_paused = true)]
    async fn no_cancel_goes_back_to_a_peer_that_cancelled() {
        let (a, mut raw) = tokio::io::duplex(1 << 16);
        let acceptor = Link::spawn(a, Side::Acceptor, 1 << 20, 100, budgets());
        acceptor.set_remote_is_brpc();
        let mut out = BytesMut::new();
        let request = Frame::new(1, FrameType::Request, Flags::REMOTE_OPEN, Bytes::new());
        let cancel = Frame::new(1, FrameType::Cancel, Flags::EMPTY, Bytes::new());
        request.encode(&mut out).expect("encoded");
        cancel.encode(&mut out).expect("encoded");
        raw.write_all(&out).await.expect("written");
        let (outbound, inbound) = accept_halves(&acceptor).await;
        stopped_in_time(&outbound).await;
        drop((outbound, inbound));
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await;
        assert!(read.is_err(), "nothing sent back: {read:?}");
    }

    /// A callee that lets go of a call whose last frame from the peer has
    /// arrived, queued but unread, sends no Cancel: the peer sends nothing
    /// more on it.
    #[tokio::test(start_paused = true)]
    async fn no_cancel_for_a_call_whose_last_frame_came_unread() {
        let (a, mut raw) = tokio::io::duplex(1 << 16);
        let acceptor = Link::spawn(a, Side::Acceptor, 1 << 20, 100, budgets());
        acceptor.set_remote_is_brpc();
        let mut out = BytesMut::new();
        let request = Frame::new(1, FrameType::Request, Flags::REMOTE_OPEN, Bytes::new());
        let last = Frame::new(1, FrameType::Data, Flags::REMOTE_CLOSED, Bytes::new());
        request.encode(&mut out).expect("encoded");
        last.encode(&mut out).expect("encoded");
        raw.write_all(&out).await.expect("written");
        let (outbound, inbound) = accept_halves(&acceptor).await;
        for _ in 0..1000 {
            if acceptor.streams().get(&1).is_some_and(|r| r.peer_finished) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(acceptor.streams().get(&1).is_some_and(|r| r.peer_finished));
        drop((outbound, inbound));
        // A Request that opens no stream is the peer's last frame too.
        let mut out = BytesMut::new();
        let unary = Frame::new(3, FrameType::Request, Flags::EMPTY, Bytes::new());
        unary.encode(&mut out).expect("encoded");
        raw.write_all(&out).await.expect("written");
        drop(accept_halves(&acceptor).await);
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await;
        assert!(read.is_err(), "nothing sent back: {read:?}");
    }

    /// A caller whose callee cancelled (it reads no more, but may still be
    /// answering) tells it to stop when the caller lets go of the call: a
    /// callee's Cancel does not end the call for both.
    #[tokio::test]
    async fn a_caller_cancels_a_callee_that_cancelled_first() {
        let (dialer, acceptor) = brpc_pair();
        let (out, inbound, id) = open(&dialer).await.expect("opened");
        let (outbound, their_inbound) = accept_halves(&acceptor).await;
        drop(their_inbound);
        for _ in 0..10_000 {
            if dialer.is_cancelled(id) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(dialer.is_cancelled(id), "the callee's Cancel arrived");
        drop((out, inbound));
        stopped_in_time(&outbound).await;
    }

    /// Calls the peer opened that were never accepted go with the
    /// connection: their charges are given back and nothing keeps the
    /// link alive (each queued call holds it).
    #[tokio::test]
    async fn unaccepted_calls_go_when_the_connection_closes() {
        let (a, mut raw) = tokio::io::duplex(1 << 16);
        let budgets = budgets();
        let dialer = Link::spawn(a, Side::Dialer, 1 << 20, 100, budgets.clone());
        let mut out = BytesMut::new();
        let request = Frame::new(
            2,
            FrameType::Request,
            Flags::EMPTY,
            Bytes::from(vec![1u8; 1000]),
        );
        request.encode(&mut out).expect("encoded");
        raw.write_all(&out).await.expect("written");
        for _ in 0..10_000 {
            if budgets.connection.in_use() == 1000 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(budgets.connection.in_use(), 1000, "the Request is queued");
        let weak = Arc::downgrade(&dialer.inner);
        dialer.close("closed locally");
        drop(dialer);
        for _ in 0..10_000 {
            if weak.upgrade().is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(weak.upgrade().is_none(), "the link is gone");
        assert_eq!(budgets.connection.in_use(), 0);
        assert_eq!(budgets.total.in_use(), 0);
    }

    /// A call's last frame that is too large still counts as the peer's
    /// last: letting go of the call after it sends no Cancel.
    #[tokio::test(start_paused = true)]
    async fn no_cancel_after_an_oversized_last_frame() {
        let (a, mut raw) = tokio::io::duplex(1 << 16);
        let dialer = Link::spawn(a, Side::Dialer, 1024, 100, budgets());
        dialer.set_remote_is_brpc();
        let (out, mut inbound, id) = open(&dialer).await.expect("opened");
        let mut buf = vec![0u8; 4096];
        let n = raw.read(&mut buf).await.expect("the Request");
        assert!(n > 0);
        let mut header = BytesMut::new();
        let big = Frame::new(
            id,
            FrameType::Response,
            Flags::EMPTY,
            Bytes::from(vec![0u8; 2048]),
        );
        big.encode(&mut header).expect("encoded");
        raw.write_all(&header).await.expect("written");
        let read = std::future::poll_fn(|cx| inbound.poll_next(cx)).await;
        assert!(matches!(read, Err(ReadError::TooLarge(_))), "{read:?}");
        drop((out, inbound));
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "nothing sent after the oversized Response: {read:?}"
        );
    }

    /// A call's route goes with the last of its halves, in either order,
    /// cancelled or not, and leaves no count behind; a call dropped for
    /// not reading is told so by its reader.
    #[tokio::test]
    async fn a_calls_route_goes_with_its_last_half() {
        let (dialer, _acceptor) = brpc_pair();
        let routes = |link: &Link| link.streams().len();

        // Reading half first, then sending half; and the other way round.
        let (out, inbound, _) = open(&dialer).await.expect("opened");
        drop(inbound);
        assert_eq!(routes(&dialer), 1);
        drop(out);
        assert_eq!(routes(&dialer), 0);
        let (out, inbound, _) = open(&dialer).await.expect("opened");
        drop(out);
        assert_eq!(routes(&dialer), 1);
        drop(inbound);
        assert_eq!(routes(&dialer), 0);

        // Cancelled by the peer: counted while it runs, not after (a pair
        // of its own: the calls above wait, cancelled, in the acceptor's
        // queue).
        let (dialer, acceptor) = brpc_pair();
        let (their_out, their_in, _) = open(&dialer).await.expect("opened");
        let (outbound, inbound) = accept_halves(&acceptor).await;
        drop((their_out, their_in));
        stopped_in_time(&outbound).await;
        assert_eq!(acceptor.inner.cancelled_count.load(Ordering::Relaxed), 1);
        drop((outbound, inbound));
        assert_eq!(acceptor.inner.cancelled_count.load(Ordering::Relaxed), 0);
        eventually_empty(&acceptor).await;

        // Dropped for not reading: its reader hears why.
        let (out, mut inbound, id) = open(&dialer).await.expect("opened");
        dialer.drop_call(id);
        let read = std::future::poll_fn(|cx| inbound.poll_next(cx)).await;
        assert!(matches!(read, Err(ReadError::Exhausted(_))), "{read:?}");
        drop((out, inbound));
        assert_eq!(routes(&dialer), 0);
    }

    /// A call dropped for not reading gives back the budget its queued
    /// frames held at once, though its handler still holds its input
    /// (which then hears why, not the frames): the connection's other
    /// calls get that room, not a handler that stopped reading.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_calls_queued_frames_give_their_budget_back_at_once() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let theirs = budgets();
        let dialer = Link::spawn(a, Side::Dialer, 1 << 20, 100, budgets());
        let acceptor = Link::spawn(b, Side::Acceptor, 1 << 20, 100, theirs.clone());
        dialer.set_remote_is_brpc();
        acceptor.set_remote_is_brpc();
        let (mut out, _in, id) = open(&dialer).await.expect("opened");
        let (_their_out, mut their_in) = accept_halves(&acceptor).await;
        // Twice the queue: it fills, the acceptor's reader waits out the
        // call's allowance, and drops the call.
        for _ in 0..2 * STREAM_BUFFER {
            let frame = Frame::new(id, FrameType::Data, Flags::EMPTY, vec![7; 1024].into());
            if out.write_frame(frame).await.is_err() {
                break;
            }
        }
        stopped_in_time(&out).await;
        assert!(acceptor.was_dropped(id));
        assert_eq!(theirs.connection.in_use(), 0, "queued frames still charged");
        assert_eq!(theirs.total.in_use(), 0);
        let read = std::future::poll_fn(|cx| their_in.poll_next(cx)).await;
        assert!(matches!(read, Err(ReadError::Exhausted(_))), "{read:?}");
    }

    /// Frames leave a call's queue in the order they came, whichever of
    /// its two places holds them.
    #[test]
    fn a_calls_frames_leave_in_order() {
        let frame = |n: u32| {
            Ok(Charged {
                frame: Frame::new(n, FrameType::Data, Flags::EMPTY, Bytes::new()),
                _charge: Charge {
                    budgets: budgets(),
                    bytes: 0,
                },
            })
        };
        let id = |item: Option<Inbound>| item.and_then(Result::ok).map(|c| c.frame.stream_id);
        let mut frames = Frames::default();
        frames.push_back(frame(1));
        frames.push_back(frame(2));
        assert_eq!(frames.len(), 2);
        assert_eq!(id(frames.pop_front()), Some(1));
        frames.push_back(frame(3));
        assert_eq!(frames.len(), 2);
        assert_eq!(id(frames.pop_front()), Some(2));
        frames.push_back(frame(4));
        assert_eq!(id(frames.pop_front()), Some(3));
        assert_eq!(id(frames.pop_front()), Some(4));
        assert_eq!(id(frames.pop_front()), None);
        assert_eq!(frames.len(), 0);
    }

    async fn eventually_empty(link: &Link) {
        for _ in 0..1000 {
            if link.streams().is_empty() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{} routes left", link.streams().len());
    }

    /// The allowance refills at a tenth of the time passing.
    #[tokio::test(start_paused = true)]
    async fn a_calls_allowance_refills_with_time() {
        let (dialer, _acceptor) = brpc_pair();
        let (_out, _inbound, id) = open(&dialer).await.expect("opened");
        assert_eq!(dialer.hold_left(id), Some(STREAM_FULL_WAIT));
        dialer.held(id, Duration::from_millis(900));
        assert_eq!(dialer.hold_left(id), Some(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(dialer.hold_left(id), Some(Duration::from_millis(600)));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(dialer.hold_left(id), Some(STREAM_FULL_WAIT));
    }

    /// After the last id of its side a dialer does not start again at 1
    /// (which a ttrpc server refuses as not increasing): new calls fail
    /// `UNAVAILABLE` and the connection closes once its running calls end.
    #[tokio::test]
    async fn a_dialer_that_used_all_its_ids_retires_the_connection() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let dialer = Link::spawn(a, Side::Dialer, 1 << 20, 100, budgets());
        let acceptor = Link::spawn(b, Side::Acceptor, 1 << 20, 100, budgets());
        dialer
            .inner
            .next_id
            .store(u64::from(u32::MAX - 2), Ordering::Relaxed);

        let (out1, in1, id1) = open(&dialer).await.expect("the next-to-last id");
        let (out2, in2, id2) = open(&dialer).await.expect("the last id");
        assert_eq!((id1, id2), (u32::MAX - 2, u32::MAX));
        assert_eq!(accept(&acceptor).await, u32::MAX - 2);
        assert_eq!(accept(&acceptor).await, u32::MAX);

        let refused = open(&dialer).await.err().expect("no id left");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(refused.message().contains("2^31 stream ids"), "{refused:?}");
        // The calls still running keep the connection, either half of one.
        drop((out1, in1));
        drop(in2);
        assert_eq!(dialer.close_reason(), None);
        drop(out2);
        assert_eq!(dialer.close_reason().as_deref(), Some(IDS_USED_UP));
        // The peer sees the connection end.
        let reason = tokio::time::timeout(Duration::from_secs(30), acceptor.closed())
            .await
            .expect("the acceptor notices");
        assert_eq!(reason, "peer closed the connection");
    }

    /// A connection closed while its peer has stopped reading gives what it
    /// was writing a moment (`CLOSE_GRACE`) and then lets go: its reader
    /// and writer tasks end, rather than wait on the socket for ever.
    #[tokio::test(start_paused = true)]
    async fn a_closed_connection_whose_peer_stopped_reading_lets_its_tasks_go() {
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        // The peer's end is kept, and never read.
        let (a, _peer) = tokio::io::duplex(4096);
        let link = Link::spawn(a, Side::Dialer, 1 << 20, 100, budgets());
        assert_eq!(tasks(), 2);
        // More than the socket takes: the writer blocks in the middle.
        let big = Bytes::from(vec![7u8; 64 * 1024]);
        link.inner
            .out
            .send(Frame::new(1, FrameType::Data, Flags::EMPTY, big))
            .await
            .expect("queued");
        tokio::task::yield_now().await;
        link.close("closed locally");
        let started = tokio::time::Instant::now();
        while tasks() > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{} tasks still running",
                tasks()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(started.elapsed() >= CLOSE_GRACE, "waited its grace first");
    }

    /// With no call running the connection closes at once.
    #[tokio::test]
    async fn a_connection_with_no_call_running_closes_when_its_ids_run_out() {
        let (a, _b) = tokio::io::duplex(1 << 16);
        let dialer = Link::spawn(a, Side::Dialer, 1 << 20, 100, budgets());
        dialer
            .inner
            .next_id
            .store(u64::from(u32::MAX) + 2, Ordering::Relaxed);
        let refused = open(&dialer).await.err().expect("no id left");
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert_eq!(dialer.close_reason().as_deref(), Some(IDS_USED_UP));
    }
}
