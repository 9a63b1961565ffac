//! Fan-out: one call to many peers, with bounded concurrency and a per-call
//! deadline, results streamed as they complete so a slow or dead peer never
//! holds up the rest.

use std::future::Future;
use std::time::Duration;

use brpc_core::{ConnectionId, Peer};
use futures_util::stream::{self, Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tonic::Status;

/// Bounds of a [`broadcast`].
#[derive(Debug, Clone, Copy)]
pub struct BroadcastOptions {
    /// Calls in flight at once (default 256).
    pub concurrency: usize,
    /// Time allowed for each peer's call (default 10 s). A call that runs out
    /// yields `DEADLINE_EXCEEDED` and is cancelled on the peer.
    pub timeout: Duration,
}

impl Default for BroadcastOptions {
    fn default() -> Self {
        BroadcastOptions {
            concurrency: 256,
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

/// Calls `call` on every peer, at most `options.concurrency` at a time, each
/// within `options.timeout`, yielding one result per peer as it completes.
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
    stream::iter(peers)
        .map(move |peer| {
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
        })
        .buffer_unordered(options.concurrency.max(1))
}
