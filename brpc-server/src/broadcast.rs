//! Fan-out: one call to many peers, with a per-call deadline and a number
//! of calls in flight that adapts to how long they take, results streamed as
//! they complete so a slow or dead peer never holds up the rest.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use brpc_core::{ConnectionId, Peer};
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tonic::Status;

/// Bounds of a [`broadcast`].
///
/// A broadcast starts `initial_concurrency` calls and, while its calls keep
/// answering about as fast as in its fastest round so far, doubles the
/// number in flight, up to `concurrency`: over a long round trip (agents
/// across a WAN) the calls then overlap enough to keep the server busy
/// instead of waiting on the network. Once calls start taking longer (the
/// server or its socket is saturated, datagrams are lost and resent, agents
/// queue), it backs off, never below `initial_concurrency`. A
/// `concurrency` at most `initial_concurrency` is a fixed number in flight.
///
/// The fastest round is the yardstick: in a fleet of near and far agents
/// whose rounds differ much (one round mostly near ones, the next mostly
/// far), the number may stay low, as with a fixed number.
#[derive(Debug, Clone, Copy)]
pub struct BroadcastOptions {
    /// Most calls in flight at once (default 4096).
    pub concurrency: usize,
    /// Calls in flight at the start, and the fewest while calls remain
    /// (default 256, or `concurrency` if smaller).
    pub initial_concurrency: usize,
    /// Time allowed for each peer's call (default 10 s). A call that runs out
    /// yields `DEADLINE_EXCEEDED` and is cancelled on the peer.
    pub timeout: Duration,
}

impl Default for BroadcastOptions {
    fn default() -> Self {
        BroadcastOptions {
            concurrency: 4096,
            initial_concurrency: 256,
            timeout: Duration::from_secs(10),
        }
    }
}

/// One peer's outcome.
#[derive(Debug)]
pub struct BroadcastResult<T> {
    /// The peer's connection id.
    pub id: ConnectionId,
    /// The peer.
    pub peer: Peer,
    /// What its call returned.
    pub result: Result<T, Status>,
    /// How long its call took.
    pub elapsed: Duration,
}

/// Calls `call` on every peer, `options.initial_concurrency` at a time and
/// more, up to `options.concurrency`, while they answer quickly (see
/// [`BroadcastOptions`]), each within
/// `options.timeout`, yielding one result per peer as it completes.
///
/// Each call runs as its own tokio task, so a large fan-out uses every worker
/// thread; dropping the stream aborts the calls still running (and so cancels
/// them on their peers).
///
/// ```no_run
/// # use brpc_server::{broadcast, BroadcastOptions, Server};
/// # use futures_util::StreamExt;
/// # async fn run(server: &Server) {
/// let mut results = broadcast(server.peers().list(), BroadcastOptions::default(), |peer| async move {
///     // e.g. peer.client(AgentClient::new).facts(FactsRequest {}).await.map(|r| r.into_inner())
///     Ok::<_, tonic::Status>(peer.name().to_owned())
/// });
/// while let Some(r) = results.next().await {
///     println!("{}: {:?}", r.id, r.result);
/// }
/// # }
/// ```
pub fn broadcast<F, Fut, T>(
    peers: impl IntoIterator<Item = Peer>,
    options: BroadcastOptions,
    mut call: F,
) -> impl Stream<Item = BroadcastResult<T>>
where
    F: FnMut(Peer) -> Fut,
    Fut: Future<Output = Result<T, Status>> + Send + 'static,
    T: Send + 'static,
{
    let timeout = options.timeout;
    let calls = peers.into_iter().map(move |peer| {
        let call = call(peer.clone());
        let started = Instant::now();
        // Aborted when dropped: a dropped broadcast stops its calls.
        // The time is taken when the call ends, not when the caller
        // next reads the results.
        let mut task = AbortOnDropHandle::new(tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within the broadcast timeout of {timeout:?}"
                ))),
            };
            (result, started.elapsed())
        }));
        async move {
            let (result, elapsed) = match (&mut task).await {
                Ok(done) => done,
                Err(e) => (
                    Err(Status::internal(format!("broadcast call failed: {e}"))),
                    started.elapsed(),
                ),
            };
            BroadcastResult {
                id: peer.connection_id(),
                peer,
                result,
                elapsed,
            }
        }
    });
    adaptive_unordered(calls, options, |r: &BroadcastResult<T>| {
        r.result.is_ok().then_some(r.elapsed)
    })
}

/// Runs the futures of `calls`, in flight at once as [`BroadcastOptions`]
/// says, yielding their outputs as they complete. `answered` gives the time
/// of a call that answered (the measure of how long calls take), `None`
/// for one that failed: a failure says nothing of the time calls take
/// (a peer without the service fails at once, a dead one at the timeout).
///
/// The number in flight is set once per round of as many calls as it
/// allows (so about once per call's time): against the smallest median
/// time of a round so far, a round whose median is at most 5/4 of it
/// doubles the number (by a quarter once it has had to back off), one over
/// twice it takes a quarter off (at least one), and one in between keeps it. A round with
/// answers from fewer than half its calls keeps it too.
#[doc(hidden)]
pub fn adaptive_unordered<I, T>(
    calls: I,
    options: BroadcastOptions,
    answered: fn(&T) -> Option<Duration>,
) -> impl Stream<Item = T>
where
    I: IntoIterator,
    I::Item: Future<Output = T>,
{
    let most = options.concurrency.max(1);
    let least = options.initial_concurrency.clamp(1, most);
    Adaptive {
        calls: calls.into_iter().fuse(),
        running: FuturesUnordered::new(),
        limit: Limit::new(least, most),
        answered,
    }
}

struct Adaptive<I: Iterator, T> {
    calls: std::iter::Fuse<I>,
    running: FuturesUnordered<I::Item>,
    limit: Limit,
    answered: fn(&T) -> Option<Duration>,
}

impl<I, T> Stream for Adaptive<I, T>
where
    I: Iterator,
    I::Item: Future<Output = T>,
{
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        while this.running.len() < this.limit.now {
            match this.calls.next() {
                Some(call) => this.running.push(call),
                None => break,
            }
        }
        match this.running.poll_next_unpin(cx) {
            Poll::Ready(Some(done)) => {
                this.limit.ended((this.answered)(&done));
                Poll::Ready(Some(done))
            }
            // Nothing running and nothing left to start.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

// No field is ever pinned: the calls' futures live in `FuturesUnordered`'s
// own allocations (it is `Unpin` whatever they are), the iterator is only
// called.
impl<I: Iterator, T> Unpin for Adaptive<I, T> {}

/// How many calls a broadcast has in flight (see [`adaptive_unordered`]).
#[derive(Debug)]
struct Limit {
    /// Calls allowed in flight now.
    now: usize,
    least: usize,
    most: usize,
    /// Calls ended in the current round, and the times of those that
    /// answered.
    ended: usize,
    times: Vec<Duration>,
    /// The smallest median of a round so far.
    best: Option<Duration>,
    /// The number had to come down once: it grows by quarters since.
    backed_off: bool,
}

impl Limit {
    fn new(least: usize, most: usize) -> Self {
        Limit {
            now: least,
            least,
            most,
            ended: 0,
            times: Vec::new(),
            best: None,
            backed_off: false,
        }
    }

    /// A call ended, after `answered` if it answered.
    fn ended(&mut self, answered: Option<Duration>) {
        if self.most <= self.least {
            return;
        }
        self.ended += 1;
        if let Some(time) = answered {
            self.times.push(time);
        }
        if self.ended < self.now {
            return;
        }
        self.ended = 0;
        if self.times.len() * 2 < self.now {
            self.times.clear();
            return;
        }
        let middle = self.times.len() / 2;
        let median = *self.times.select_nth_unstable(middle).1;
        self.times.clear();
        let best = *self
            .best
            .insert(self.best.map_or(median, |b| b.min(median)));
        if median <= best * 5 / 4 {
            let more = if self.backed_off {
                (self.now / 4).max(1)
            } else {
                self.now
            };
            self.now = (self.now + more).min(self.most);
        } else if median > best * 2 {
            self.backed_off = true;
            self.now = (self.now - (self.now / 4).max(1)).max(self.least);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Calls in flight now, and the most seen at once.
    #[derive(Default)]
    struct InFlight {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    impl InFlight {
        fn enter(&self) {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
        }
        fn leave(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn options(least: usize, most: usize) -> BroadcastOptions {
        BroadcastOptions {
            concurrency: most,
            initial_concurrency: least,
            timeout: Duration::from_secs(10),
        }
    }

    fn answered(r: &Result<Duration, ()>) -> Option<Duration> {
        r.ok()
    }

    /// `n` calls of `call` run under `options`: how many results, and the
    /// most in flight at once.
    async fn run<F, Fut>(n: usize, options: BroadcastOptions, call: F) -> (usize, usize)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), ()>>,
    {
        let in_flight = Arc::new(InFlight::default());
        let calls = (0..n).map(|_| {
            let in_flight = in_flight.clone();
            let call = &call;
            async move {
                let started = Instant::now();
                in_flight.enter();
                let result = call().await;
                in_flight.leave();
                result.map(|()| started.elapsed())
            }
        });
        let results: Vec<_> = adaptive_unordered(calls, options, answered).collect().await;
        (results.len(), in_flight.most.load(Ordering::SeqCst))
    }

    /// `n` calls that each take 100 ms (a long round trip), answering or
    /// failing, run under `options`: as [`run`].
    async fn after_100_ms(n: usize, options: BroadcastOptions, answer: bool) -> (usize, usize) {
        run(n, options, || async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if answer { Ok(()) } else { Err(()) }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn calls_over_a_long_round_trip_widen_to_the_most_allowed() {
        let (results, most) = after_100_ms(5000, options(16, 1024), true).await;
        assert_eq!(results, 5000);
        assert_eq!(most, 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_queue_for_a_busy_server_stay_near_the_least() {
        // A server that serves 16 calls at a time, 1 ms each: more in
        // flight only wait longer.
        let server = Arc::new(tokio::sync::Semaphore::new(16));
        let (results, most) = run(5000, options(16, 1024), || {
            let server = server.clone();
            async move {
                let _serving = server.acquire().await.expect("open");
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(())
            }
        })
        .await;
        assert_eq!(results, 5000);
        assert!(most <= 32, "{most} in flight at once");
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_least_and_most_is_a_fixed_number() {
        let (results, most) = after_100_ms(1000, options(16, 16), true).await;
        assert_eq!(results, 1000);
        assert_eq!(most, 16);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_calls_do_not_widen_it() {
        let (results, most) = after_100_ms(1000, options(16, 1024), false).await;
        assert_eq!(results, 1000);
        assert_eq!(most, 16);
    }

    #[test]
    fn a_limit_backs_off_when_calls_slow_down_and_then_grows_by_quarters() {
        /// A round of calls that each answered after `ms`, and the number
        /// in flight set after each.
        fn rounds(limit: &mut Limit, ms: &[u64]) -> Vec<usize> {
            ms.iter()
                .map(|&ms| {
                    for _ in 0..limit.now {
                        limit.ended(Some(Duration::from_millis(ms)));
                    }
                    limit.now
                })
                .collect()
        }
        let mut limit = Limit::new(16, 1024);
        assert_eq!(
            rounds(&mut limit, &[10, 12, 30, 15, 10, 100, 100]),
            [32, 64, 48, 48, 60, 45, 34]
        );
        // Never below the least.
        rounds(&mut limit, &[100; 10]);
        assert_eq!(limit.now, 16);

        // Small numbers come down one at a time, to the least.
        let mut limit = Limit::new(1, 8);
        assert_eq!(
            rounds(&mut limit, &[10, 10, 10, 100, 100, 100, 100, 100, 100, 100]),
            [2, 4, 8, 6, 5, 4, 3, 2, 1, 1]
        );

        // The yardstick is the fastest round so far, not the first.
        let mut limit = Limit::new(16, 1024);
        assert_eq!(rounds(&mut limit, &[20, 10, 24]), [32, 64, 48]);

        // A round in which fewer than half the calls answered keeps it.
        let mut limit = Limit::new(16, 1024);
        for i in 0..16 {
            limit.ended((i < 7).then_some(Duration::from_millis(10)));
        }
        assert_eq!(limit.now, 16);
        for i in 0..16 {
            limit.ended((i < 8).then_some(Duration::from_millis(10)));
        }
        assert_eq!(limit.now, 32);
    }
}
