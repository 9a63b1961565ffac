//! The serving half of the engine: accept the peer's calls (one QUIC stream,
//! or one ttrpc stream id, each), read each Request through the call's
//! machine, and hand the call to a [`Handler`]: the tonic
//! [`Router`](crate::Router), brpc's session service, or anything else that
//! answers with frames. Knows nothing of http or tonic.
//!
//! A call ends when its answer is sent, when the caller cancels
//! (STOP_SENDING or a reset), at its deadline, or when the connection closes:
//! the calls are futures owned by [`serve`] (no task each; a call that moved
//! to a task of its own for a large frame is aborted with them), so none
//! outlives the connection.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;
use tonic::Status;
use tracing::Instrument;

use super::call_io::{CallCell, SharedCall, lock, now};
use super::io::large_frame;
use super::observe::CallRecord;
use super::transport::{CallReader, CallWriter, ReadError};
use super::{Peer, codes};
use crate::wire::{Abort, Call, Failure, Frame, Inbound, KeyValue, Payload, Request};

/// What answers the calls a peer opens. The engine reads each call's
/// Request, then hands it to the handler with a [`Reply`] to answer through;
/// it enforces the deadline (dropping the handler's future when it passes),
/// ends the call when the caller cancels, and answers for a handler that
/// returns without ending the call.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Serves one call.
    fn serve<'a>(
        &'a self,
        call: Incoming,
        reply: &'a mut Reply,
    ) -> impl Future<Output = ()> + Send + 'a;

    /// Whether each call runs as a task of its own (`false`: the calls of a
    /// connection are polled by the task serving the connection; see
    /// [`serve`]).
    fn task_per_call(&self) -> bool {
        false
    }
}

/// A call the peer opened, once its Request arrived.
#[derive(Debug)]
pub struct Incoming {
    /// The connection the call came on: who is calling, and a way back.
    pub peer: Peer,
    /// The fully qualified proto service name.
    pub service: String,
    /// The method name.
    pub method: String,
    /// The request metadata, one entry per value.
    pub metadata: Vec<KeyValue>,
    /// The time left for the call when its Request arrived (`None`: no deadline).
    pub timeout: Option<Duration>,
    /// The request message(s).
    pub input: Input,
}

impl Incoming {
    /// The call of `peer` whose Request is `request`, with `timeout` left
    /// and its request messages as `input`.
    fn new(peer: Peer, request: Request, timeout: Option<Duration>, input: Input) -> Self {
        let Request {
            service,
            method,
            metadata,
            ..
        } = request;
        Incoming {
            peer,
            service,
            method,
            metadata,
            timeout,
            input,
        }
    }
}

/// A served call's request messages.
#[derive(Debug)]
pub enum Input {
    /// The one message the Request carried (unary and server-streaming calls).
    Single(Bytes),
    /// Messages arriving as Data frames (client-streaming and bidi calls).
    Stream(MessageStream),
}

/// Serves the peer's calls on its connection with `handler` until the
/// connection closes. Every handler still running then is dropped.
///
/// By default the calls of one connection are polled on the task running
/// `serve` (no task per call: spawning copies a call's large future in and
/// out of the runtime several times), until a call reads or writes a frame
/// of 64 KiB or more over QUIC: that call moves to a task of its own (before
/// its handler runs when the Request was that frame). A handler that blocks
/// its thread or computes for long holds up the other calls of its
/// connection: hand such work to `tokio::task::spawn_blocking` or a task of
/// its own, or have the handler ask for a task per call
/// ([`Handler::task_per_call`]; the builders' `task_per_call(true)`). A
/// handler that panics fails its own call (`INTERNAL`), not the connection.
///
/// (Not an `async fn`, which would hold `peer` and `handler` twice in the
/// task of every connection: as its arguments and as its locals.)
pub fn serve<H: Handler>(peer: Peer, handler: H) -> impl Future<Output = ()> + Send + 'static {
    /// New calls accepted in a row before the calls under way are polled
    /// (so a flood of new calls cannot starve them).
    const ACCEPT_STREAK: u32 = 16;
    async move {
        let spawn = handler.task_per_call();
        // Made at the first call: an idle connection (most of a fleet's) holds
        // none of its allocations.
        let mut calls = None;
        let mut streak = 0;
        // When the last calls ended, while the call window may still widen.
        let mut ended = super::peer::Ended::new();
        loop {
            if streak >= ACCEPT_STREAK {
                streak = 0;
                while let Some(Some(())) = calls
                    .as_mut()
                    .and_then(|c: &mut FuturesUnordered<_>| c.next().now_or_never())
                {
                    peer.call_ended(&mut ended);
                }
            }
            // Biased, in a fixed order: new calls first, then the calls under
            // way (unbiased, the order would be random at every turn).
            tokio::select! {
                biased;
                accepted = peer.accept_call() => match accepted {
                    Some((send, recv, stream_id)) => {
                        streak += 1;
                        // A panic anywhere in the call (a handler's Drop, say)
                        // ends that call only. Built in its box: the call's
                        // future is large, and `FuturesUnordered::push` (or a
                        // spawn) would copy it by value several times.
                        let call = boxed(|| {
                            let call = serve_call(peer.clone(), handler.clone(), send, recv, stream_id);
                            std::panic::AssertUnwindSafe(call).catch_unwind().map(|outcome| {
                                if outcome.is_err() {
                                    tracing::error!("a call panicked while ending; it was dropped");
                                }
                            })
                        });
                        // A handler that asks for it has each call on a task
                        // of its own from the start, as a large call moves to
                        // one (aborted if the connection ends first).
                        let served = if spawn {
                            Served::Moved(MovedCall::spawn(call))
                        } else {
                            Served::Here(call)
                        };
                        let calls = calls.get_or_insert_with(FuturesUnordered::new);
                        calls.push(served);
                        peer.widen_call_window(calls.len(), &ended);
                    }
                    None => break,
                },
                // (A disabled branch's future is still made, never polled.)
                Some(()) = next_of(&mut calls), if calls.as_ref().is_some_and(|c| !c.is_empty()) => {
                    streak = 0;
                    peer.call_ended(&mut ended);
                }
            }
        }
    }
}

/// The next call of `calls` to end, once they are made.
async fn next_of<F: Future<Output = ()>>(calls: &mut Option<FuturesUnordered<F>>) -> Option<()> {
    match calls {
        Some(calls) => calls.next().await,
        None => std::future::pending().await,
    }
}

/// A call served on its connection's task, until it reads or writes a large
/// frame over QUIC (`large_frame`): then on a task of its own, so that
/// copying, decoding and encoding large messages runs beside the
/// connection's other calls (and on another core) instead of in turn with
/// them. Small calls stay on the connection's task, where a call costs no
/// spawn and wakes no other thread (unless the handler asks for a task per
/// call: then every call is `Moved` from the start). Dropped (the connection ended, or
/// `serve` was dropped), a moved call's task is aborted: no call outlives
/// its connection either way.
enum Served<F> {
    Here(std::pin::Pin<Box<F>>),
    Moved(MovedCall),
    Over,
}

/// The task of a moved call, aborted when dropped.
struct MovedCall(tokio::task::JoinHandle<()>);

impl MovedCall {
    /// `call` on a task of its own, in the current span (the connection's).
    fn spawn<F: Future<Output = ()> + Send + 'static>(call: std::pin::Pin<Box<F>>) -> Self {
        MovedCall(tokio::spawn(call.in_current_span()))
    }
}

impl Drop for MovedCall {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<F: Future<Output = ()> + Send + 'static> Future for Served<F> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        let this = &mut *self;
        if let Served::Here(call) = this {
            large_frame::serving();
            let poll = call.as_mut().poll(cx);
            if !large_frame::served() || poll.is_ready() {
                return poll;
            }
            if let Served::Here(call) = std::mem::replace(this, Served::Over) {
                // In the connection's span, as it was polled until now.
                *this = Served::Moved(MovedCall::spawn(call));
            }
        }
        match this {
            // A moved call catches its own panics (`serve`): an error here
            // is its abort, when this is dropped.
            Served::Moved(task) => std::pin::Pin::new(&mut task.0).poll(cx).map(|_| ()),
            Served::Here(_) | Served::Over => Poll::Ready(()),
        }
    }
}

/// `make()`'s future in a box of its own.
fn boxed<F: Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::pin(make())
}

/// One served call, from its Request to its end. Not an `async fn`: that
/// would hold every argument twice (as given and as moved into its body).
fn serve_call<H: Handler>(
    peer: Peer,
    handler: H,
    send: CallWriter,
    recv: CallReader,
    stream_id: u32,
) -> impl Future<Output = ()> + Send {
    // Boxed: held inline, quinn's future would take its room twice (as
    // given to the block and pinned in it) in every call's future.
    let mut stopped = Box::pin(send.stopped());
    let mut out = Reply::new(&peer, send, stream_id);
    let mut recv = Some(recv);
    async move {
        let span = out.record.span().clone();
        let draining = peer.clone();
        let answered = {
            // Pinned in place and polled by reference: a future moved by value
            // into `select!` would take its room in this one twice.
            let answering = std::pin::pin!(
                std::panic::AssertUnwindSafe(answer(peer, &handler, &mut out, &mut recv))
                    .catch_unwind()
                    .instrument(span)
            );
            tokio::select! {
                biased;
                outcome = answering => Some(outcome.is_ok()),
                // The caller stopped reading: it cancelled. Dropping `answer` drops the handler.
                () = &mut stopped => None,
            }
        };
        let answered = match answered {
            Some(true) => true,
            Some(false) => {
                // The handler (or anything under it) panicked: its call fails,
                // the connection's other calls go on.
                tracing::error!("a handler panicked; its call ends with INTERNAL");
                Box::pin(out.status(Status::internal("the handler panicked"))).await;
                true
            }
            None => false,
        };
        if answered && draining.is_draining() {
            // A graceful shutdown closes the connection once no call is in
            // flight, and a QUIC close discards data not yet delivered: stay in
            // flight until the caller has the answer.
            Box::pin(out.delivered()).await;
        }
        if !answered {
            let abort = out.with(|call| call.abort(Failure::Cancelled));
            Box::pin(out.carry_out(None, abort)).await;
        }
    }
}

/// What a read error means for a call being served; `None`: nothing to
/// answer (the caller or the connection is gone).
fn read_failure(error: ReadError) -> Option<Failure> {
    match error {
        ReadError::TooLarge(e) => {
            Some(Failure::TooLarge(Status::resource_exhausted(e.to_string())))
        }
        ReadError::Truncated => Some(Failure::Truncated),
        e @ ReadError::Exhausted(_) => {
            tracing::debug!(error = ?e, "call ended: no room in the inbound buffer budget");
            Some(Failure::Refused(e.to_status()))
        }
        _ => None,
    }
}

/// Reads the Request, runs the handler under the call's deadline, answers.
///
/// The end of a call that went wrong (`carry_out`, `status`) is awaited
/// boxed: those futures are large, and held inline they would size every
/// call's future for a path few calls take.
///
/// The reader is lent in its slot (and taken from it for a streamed
/// request): an `async fn` holds a reader given by value twice.
async fn answer<H: Handler>(
    peer: Peer,
    handler: &H,
    out: &mut Reply,
    slot: &mut Option<CallReader>,
) {
    let Some(reader) = slot.as_mut() else {
        return;
    };
    // Boxed: the read is over before the handler runs, and held inline it
    // would size the whole call's future (which then no longer fits the
    // allocator's fast path for small blocks).
    let reading = Box::pin(read_request(out, reader));
    let Ok((request, first_message, streaming)) = reading.await else {
        return;
    };
    if large_frame::seen() {
        // The Request was a large frame, read in this poll of the
        // connection's task: wait once, so that the call moves to a task of
        // its own (`Served`) before its handler runs.
        tokio::task::yield_now().await;
    }
    out.record.named(&request.service, &request.method);
    // The session service (Hello, GoAway) keeps answering while draining:
    // it is how a draining side says goodbye.
    if peer.is_draining() && request.service != crate::wire::SESSION_SERVICE {
        let abort = out.with(|call| {
            call.abort(Failure::Local(Status::unavailable(
                "this side is shutting down and takes no new calls; reconnect and retry",
            )))
        });
        Box::pin(out.carry_out(Some(reader), abort)).await;
        return;
    }
    // A deadline that is already over (ttrpc's negative timeout_nano) ends
    // the call before the handler runs.
    if let Some(abort) = out.with(|call| call.handle_timeout(now())) {
        Box::pin(out.carry_out(Some(reader), abort)).await;
        return;
    }
    let deadline = out.with(|call| call.deadline());
    let timeout = deadline.map(|at| at.saturating_duration_since(now()));
    // A bad request message (oversized, out of sequence) ends the call with
    // its status whatever the handler makes of the error it sees.
    // Only streamed input can go bad after the handler starts.
    let (input, mut failed) = if streaming {
        let (fail, failed) = oneshot::channel();
        let Some(reader) = slot.take() else {
            return;
        };
        let input = Input::Stream(MessageStream::new(reader, out, first_message, Some(fail)));
        (input, Some(failed))
    } else {
        (Input::Single(first_message.unwrap_or_default()), None)
    };
    // `Some(None)`: the handler returned; `Some(Some(abort))`: the input
    // failed; `None`: the deadline passed.
    let outcome = {
        // The handler's future is made here, not in the block below, which
        // would hold the `Incoming` beside it for the whole call. Each future
        // is pinned in place and polled by reference: moved by value into the
        // next, it would take its room here twice.
        let serving = handler.serve(Incoming::new(peer, request, timeout, input), &mut *out);
        let guarded = std::pin::pin!(async {
            tokio::select! {
                biased;
                Some(abort) = async {
                    match failed.as_mut() {
                        Some(failed) => failed.await.ok(),
                        None => None,
                    }
                } => Some(abort),
                () = serving => None,
            }
        });
        match deadline {
            None => Some(guarded.await),
            Some(at) => tokio::time::timeout_at(tokio::time::Instant::from_std(at), guarded)
                .await
                .ok(),
        }
    };
    if let Some(None) = outcome
        && !out.is_ended()
    {
        // A handler that returned without ending the call.
        Box::pin(out.status(Status::internal("the handler returned without answering"))).await;
    }
    // The input failed (perhaps while the handler was finishing), or the
    // deadline passed: the machine says how the call ends.
    let abort = outcome
        .flatten()
        .or_else(|| failed.as_mut().and_then(|f| f.try_recv().ok()))
        .or_else(|| out.with(|call| call.handle_timeout(now())));
    if let Some(abort) = abort {
        Box::pin(out.carry_out(None, abort)).await;
    }
}

/// Reads a served call's Request through its machine. A call that fails
/// first (stalled, oversized, a protocol violation, a stream that ends) is
/// answered or reset here as the machine says: `Err` holds the status it
/// ended with (`None`: nothing was answered, the caller or the connection
/// is gone).
async fn read_request(
    out: &mut Reply,
    reader: &mut CallReader,
) -> Result<(Request, Option<Bytes>, bool), Option<Status>> {
    loop {
        let frame = match reader.next(&mut out.call).await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                let status = out.with(Call::recv_finished);
                if let Some(status) = &status {
                    Box::pin(out.status(status.clone())).await;
                }
                return Err(status);
            }
            Err(ReadError::Timeout) => {
                // The idle limit, before or in the middle of the Request.
                if let Some(abort) = out.with(|call| call.handle_timeout(now())) {
                    tracing::debug!(status = %abort.status, "call stalled before its Request");
                    return Err(Some(Box::pin(out.carry_out(Some(reader), abort)).await));
                }
                continue;
            }
            Err(e) => {
                let Some(failure) = read_failure(e) else {
                    return Err(None);
                };
                let abort = out.with(|call| call.abort(failure));
                return Err(Some(Box::pin(out.carry_out(Some(reader), abort)).await));
            }
        };
        match out.with(|call| call.recv(frame, now())) {
            Ok(Inbound::Open {
                request,
                first_message,
                streaming,
            }) => return Ok((request, first_message, streaming)),
            Ok(_) => continue,
            Err(status) => {
                let abort = out.with(|call| call.abort(Failure::Protocol(status)));
                return Err(Some(Box::pin(out.carry_out(Some(reader), abort)).await));
            }
        }
    }
}

/// Accepts the peer's next call and reads its Request as [`serve`] does,
/// but hands the call back instead of to a handler, for the caller to
/// answer through its [`Reply`]: how a server reads the Hello that decides
/// whether the connection is served at all. No deadline applies and
/// nothing watches for the caller cancelling.
///
/// # Errors
/// A call that failed before its Request arrived was answered (or reset)
/// here, and delivered (waiting at most a second), and `Err` holds its
/// status; `Err(None)`: the connection is gone.
pub(crate) async fn accept_one(peer: &Peer) -> Result<(Incoming, Reply), Option<Status>> {
    let (send, mut reader, stream_id) = peer.accept_call().await.ok_or(None)?;
    let mut out = Reply::new(peer, send, stream_id);
    let (request, first_message, streaming) = match read_request(&mut out, &mut reader).await {
        Ok(request) => request,
        Err(status) => {
            // The caller of this is about to close the connection, which
            // would discard an answer not yet delivered.
            if status.is_some() {
                out.delivered().await;
            }
            return Err(status);
        }
    };
    out.record.named(&request.service, &request.method);
    let input = if streaming {
        Input::Stream(MessageStream::new(reader, &mut out, first_message, None))
    } else {
        Input::Single(first_message.unwrap_or_default())
    };
    Ok((Incoming::new(peer.clone(), request, None, input), out))
}

/// Request messages still arriving as Data frames. A bad one (oversized,
/// out of sequence) ends the call with its status whatever the handler makes
/// of the error it sees.
pub struct MessageStream {
    reader: CallReader,
    call: SharedCall,
    first: Option<Bytes>,
    failed: bool,
    fail: Option<oneshot::Sender<Abort>>,
}

impl std::fmt::Debug for MessageStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageStream")
            .field("stream_id", &lock(&self.call).stream_id())
            .field("failed", &self.failed)
            .finish()
    }
}

impl Drop for MessageStream {
    /// Dropped with its handler when the call's deadline ran out, the input
    /// is stopped as the call ends: CANCELLED (PROTOCOL.md §4). A QUIC
    /// stream merely dropped would tell the peer `0x00`, "no error". Not
    /// once the call is answered (its handler finished in time, or an
    /// input that failed ended it), however late the input goes.
    fn drop(&mut self) {
        let expired = !self.failed && {
            let call = lock(&self.call);
            !call.is_done() && !call.is_send_done() && call.deadline().is_some_and(|at| at <= now())
        };
        if expired {
            self.reader.stop(codes::STREAM_CANCELLED);
        }
    }
}

impl MessageStream {
    /// The messages after `first` (the Request's own, if any), read from
    /// `reader` through the machine of the call `reply` answers; a failure
    /// is reported through `fail`.
    fn new(
        reader: CallReader,
        reply: &mut Reply,
        first: Option<Bytes>,
        fail: Option<oneshot::Sender<Abort>>,
    ) -> Self {
        MessageStream {
            reader,
            call: reply.call.share(),
            first,
            failed: false,
            fail,
        }
    }

    /// Ends the call for `failure`: the machine picks the codes, the reader
    /// is stopped here and the rest is carried out by `answer`.
    fn fail(&mut self, failure: Failure) -> Status {
        let abort = lock(&self.call).abort(failure);
        self.end(abort)
    }

    /// Ends the call as `abort` says: the reader is stopped here, the rest
    /// is carried out by `answer`; the status is what the handler sees.
    fn end(&mut self, abort: Abort) -> Status {
        self.failed = true;
        if let Some(code) = abort.stop {
            self.reader.stop(code);
        }
        let status = abort.status.clone();
        if let Some(fail) = self.fail.take() {
            let _ = fail.send(Abort {
                stop: None,
                ..abort
            });
        }
        status
    }

    /// The next request message; `None` once the caller closed its side (or
    /// after an error, which is returned once).
    pub async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        if let Some(m) = self.first.take() {
            return Some(Ok(m));
        }
        if self.failed || lock(&self.call).is_done() {
            return None;
        }
        loop {
            let frame = match self.reader.next(&mut self.call).await {
                Ok(Some(frame)) => frame,
                // A QUIC FIN without the close frame still ends the input.
                Ok(None) => {
                    lock(&self.call).recv_finished();
                    return None;
                }
                Err(ReadError::Timeout) => {
                    // A timer of the call's ran out: the machine says which,
                    // and how the call ends.
                    let Some(abort) = lock(&self.call).handle_timeout(now()) else {
                        continue;
                    };
                    return Some(Err(self.end(abort)));
                }
                Err(e) => {
                    let status = e.to_status();
                    match read_failure(e) {
                        Some(failure) => {
                            self.fail(failure);
                        }
                        None => self.failed = true,
                    }
                    return Some(Err(status));
                }
            };
            let inbound = lock(&self.call).recv(frame, now());
            match inbound {
                Ok(Inbound::Message(m)) => return Some(Ok(m)),
                Ok(Inbound::Closed) => return None,
                Ok(_) => continue,
                Err(status) => return Some(Err(self.fail(Failure::Protocol(status)))),
            }
        }
    }
}

/// A [`Reply`] refused to send because the call has already ended (its
/// final frame went out, the caller cancelled, or the connection is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallEnded;

impl std::fmt::Display for CallEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the call has ended")
    }
}

impl std::error::Error for CallEnded {}

/// The answering half of a served call: writes the frames the call's
/// machine builds, in the order it allows: Headers, messages, Trailers, then
/// the end (an OK close or a Response). A [`Handler`] answers through it.
pub struct Reply {
    send: CallWriter,
    call: CallCell,
    /// A frame write was started and not finished: if the write is abandoned
    /// (deadline), the stream holds a partial frame and can only be reset.
    writing: bool,
    record: CallRecord,
    /// The final frame went out (or the stream was reset).
    ended: bool,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("stream_id", &self.call.read(Call::stream_id))
            .field("ended", &self.ended)
            .finish()
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        // A call abandoned without its final frame (its task was dropped)
        // must not look finished: reset instead of letting the stream end.
        if !self.ended {
            self.send.reset(codes::STREAM_CANCELLED);
        }
    }
}

impl Reply {
    /// The answering half of the call `peer` opened as `stream_id`, sent
    /// through `send`; the call is recorded from now.
    fn new(peer: &Peer, send: CallWriter, stream_id: u32) -> Self {
        Reply {
            send,
            call: CallCell::Alone(Call::callee(stream_id, peer.call_config(), now())),
            writing: false,
            record: peer.record_call(true),
            ended: false,
        }
    }

    fn with<T>(&mut self, f: impl FnOnce(&mut Call) -> T) -> T {
        self.call.with(f)
    }

    /// The largest message this side may send.
    pub fn max_message_size(&self) -> usize {
        self.call.read(|call| call.config().max_message_size)
    }

    /// Whether the call's final frame went out (or the call was reset).
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Writes one frame of the call. This and `write_last` are not `async
    /// fn`s, which would hold the frame beside the writer's future made from
    /// it (and they sit inside every call's future).
    fn write(&mut self, frame: Frame) -> impl Future<Output = Result<(), CallEnded>> + Send + '_ {
        self.writing = true;
        let Reply { send, writing, .. } = self;
        let sending = send.write_frame(frame);
        async move {
            let result = sending.await;
            *writing = false;
            result.map_err(|_| CallEnded)
        }
    }

    /// Writes the call's final frame and ends the stream.
    fn write_last(
        &mut self,
        code: tonic::Code,
        frame: Frame,
    ) -> impl Future<Output = ()> + Send + '_ {
        self.record.finish(code);
        let refused = self.writing;
        if refused {
            self.reset(codes::STREAM_CANCELLED);
        }
        let Reply {
            send,
            writing,
            ended,
            ..
        } = self;
        async move {
            if refused {
                return;
            }
            *writing = true;
            let result = send.write_frame(frame).await;
            *writing = false;
            if result.is_ok() {
                send.finish();
                *ended = true;
            }
        }
    }

    /// Carries out what the machine said to end the call early: stop the
    /// reader (if this side still holds it), then answer or reset.
    /// Returns the status the call ended with.
    async fn carry_out(&mut self, reader: Option<&mut CallReader>, abort: Abort) -> Status {
        if let (Some(reader), Some(code)) = (reader, abort.stop) {
            reader.stop(code);
        }
        match (abort.response, abort.reset) {
            (Some(frame), _) => {
                // A peer that grants the stream no credit must not keep the
                // call (and its place among the connection's calls) for
                // ever: the answer gets the call's idle limit, then a reset.
                let limit = self.call.read(|call| call.config().idle_limit);
                let written = self.write_last(abort.status.code(), frame);
                match limit {
                    None => written.await,
                    Some(limit) => {
                        if tokio::time::timeout(limit, written).await.is_err() {
                            self.reset(codes::STREAM_IDLE);
                        }
                    }
                }
            }
            (None, Some(code)) => self.reset(code),
            (None, None) => {}
        }
        abort.status
    }

    /// One reply message. An oversized one ends the call with
    /// `RESOURCE_EXHAUSTED` instead.
    ///
    /// # Errors
    /// [`CallEnded`] when the call is over (including by this message).
    pub fn message(
        &mut self,
        message: Bytes,
    ) -> impl Future<Output = Result<(), CallEnded>> + Send + '_ {
        self.message_payload(Payload::Whole(message))
    }

    /// [`message`](Self::message) for a message encoded by
    /// [`encode_message`](crate::wire::encode_message), perhaps in pieces.
    pub(crate) async fn message_payload(&mut self, message: Payload) -> Result<(), CallEnded> {
        match self.with(|call| call.send_message(message)) {
            Ok(frame) => self.write(frame).await,
            Err(status) => {
                self.status(status).await;
                Err(CallEnded)
            }
        }
    }

    /// The response headers, before any message (not sent to a plain ttrpc
    /// caller). An empty set tells a waiting caller that the handler answered.
    ///
    /// # Errors
    /// [`CallEnded`] when the call is over or the reply already started.
    pub async fn headers(&mut self, entries: Vec<KeyValue>) -> Result<(), CallEnded> {
        match self.with(|call| call.send_headers(entries)) {
            Ok(Some(frame)) => self.write(frame).await,
            Ok(None) => Ok(()),
            Err(_) => Err(CallEnded),
        }
    }

    /// The response trailers, just before the end (none sent when empty or
    /// to a plain ttrpc caller).
    ///
    /// # Errors
    /// [`CallEnded`] when the call is over or trailers were already sent.
    pub async fn trailers(&mut self, entries: Vec<KeyValue>) -> Result<(), CallEnded> {
        if entries.is_empty() {
            return Ok(());
        }
        match self.with(|call| call.send_trailers(entries)) {
            Ok(Some(frame)) => self.write(frame).await,
            Ok(None) => Ok(()),
            Err(_) => Err(CallEnded),
        }
    }

    /// Ends the call after its messages: `trailers`, then the close (OK) or
    /// the error status.
    pub async fn end(&mut self, status: Status, trailers: Vec<KeyValue>) {
        if self.trailers(trailers).await.is_err() {
            return;
        }
        if status.code() == tonic::Code::Ok {
            self.close().await;
        } else {
            self.status(status).await;
        }
    }

    /// Ends a reply stream that finished OK (Data remote-closed, no data).
    pub async fn close(&mut self) {
        if let Ok(frame) = self.with(Call::send_close) {
            self.write_last(tonic::Code::Ok, frame).await;
        }
    }

    /// Ends the call with a non-OK `status`.
    pub async fn status(&mut self, status: Status) {
        self.response(status, Bytes::new()).await;
    }

    /// Ends the call with a Response frame: `status` and, for an OK
    /// unary-style reply, its one message.
    pub async fn response(&mut self, status: Status, payload: Bytes) {
        if let Ok((frame, code)) = self.with(|call| call.send_response(&status, payload)) {
            self.write_last(code, frame).await;
        }
    }

    /// Ends the call OK with a Response frame carrying `payload`:
    /// [`response`](Self::response) without an OK `Status` to build.
    pub(crate) async fn ok_response(&mut self, payload: Bytes) {
        if let Ok((frame, code)) = self.with(|call| call.send_ok_response(payload)) {
            self.write_last(code, frame).await;
        }
    }

    /// Ends the call OK with a Response frame carrying `message`, encoded
    /// straight into the frame.
    ///
    /// The message is encoded when this is called: the future holds only
    /// the frame's write, not the message.
    pub fn ok_message<M: prost::Message>(
        &mut self,
        message: &M,
    ) -> impl Future<Output = ()> + Send + use<'_, M> {
        match self.with(|call| call.send_ok_message(message)) {
            Ok((frame, code)) => futures_util::future::Either::Left(self.write_last(code, frame)),
            Err(_) => futures_util::future::Either::Right(std::future::ready(())),
        }
    }

    /// Waits, at most a second, until the caller has everything sent on
    /// this call (QUIC acknowledged it). Closing the connection right after
    /// an answer would discard what was not yet delivered. Over a byte
    /// stream, whose writer flushes before it closes, it returns at once.
    pub async fn delivered(&self) {
        if let CallWriter::Quic(_) = &self.send {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.send.stopped()).await;
        }
    }

    fn reset(&mut self, code: u32) {
        self.record.finish(tonic::Code::Cancelled);
        self.send.reset(code);
        self.ended = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends on its channel when dropped.
    struct DropSignal(Option<oneshot::Sender<()>>);

    impl Drop for DropSignal {
        fn drop(&mut self) {
            if let Some(signal) = self.0.take() {
                let _ = signal.send(());
            }
        }
    }

    /// A call that never ends, holding `signal`; `large`: it reads or writes
    /// a large frame first.
    fn call(
        signal: DropSignal,
        large: bool,
    ) -> std::pin::Pin<Box<impl Future<Output = ()> + Send + 'static>> {
        Box::pin(async move {
            let _signal = signal;
            large_frame::note(if large { large_frame::LARGE } else { 16 });
            std::future::pending::<()>().await;
        })
    }

    #[tokio::test]
    async fn a_call_moves_to_a_task_of_its_own_only_after_a_large_frame() {
        let (small_signal, mut small_dropped) = oneshot::channel();
        let mut small = Served::Here(call(DropSignal(Some(small_signal)), false));
        assert!((&mut small).now_or_never().is_none());
        assert!(matches!(small, Served::Here(_)), "a small call stays");
        let (large_signal, _large_dropped) = oneshot::channel();
        let mut large = Served::Here(call(DropSignal(Some(large_signal)), true));
        assert!((&mut large).now_or_never().is_none());
        assert!(matches!(large, Served::Moved(_)), "a large call moves");
        // Outside a connection task's poll, a large frame marks nothing.
        large_frame::note(large_frame::LARGE);
        assert!(!large_frame::seen());
        drop(small);
        assert!(small_dropped.try_recv().is_ok());
    }

    #[tokio::test]
    async fn a_moved_call_is_aborted_when_its_connection_drops_it() {
        let (signal, dropped) = oneshot::channel();
        let mut served = Served::Here(call(DropSignal(Some(signal)), true));
        assert!((&mut served).now_or_never().is_none());
        assert!(matches!(served, Served::Moved(_)));
        // The connection's task drops its calls (the connection is over, or
        // `serve` itself was dropped): the moved call's task is aborted, and
        // its future dropped rather than left running.
        drop(served);
        tokio::time::timeout(Duration::from_secs(10), dropped)
            .await
            .expect("the moved call was not dropped: its task outlived the connection")
            .expect("dropped, not leaked");
    }
}
