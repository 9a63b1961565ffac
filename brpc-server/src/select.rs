//! Picking agents by label, grpctunnel-style: wait for a peer that matches,
//! and a channel that sends each call to a matching peer in turn.
//!
//! Selection only: the calls themselves go through each peer's own
//! [`Channel`](brpc_core::Channel).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use brpc_core::{ConnectionId, Peer};
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;
use tonic::body::Body;
use tower_service::Service;

use crate::registry::{PeerEvent, Registry, Wanted, collect};

/// Whether `peer` carries every label of `labels` with the same value.
pub(crate) fn matches(peer: &Peer, labels: &[(String, String)]) -> bool {
    labels
        .iter()
        .all(|(k, v)| peer.label(k) == Some(v.as_str()))
}

impl Registry {
    /// Waits until a peer for which `filter` holds is connected and returns
    /// it (at once if one already is).
    ///
    /// `filter` may run while the registry is read-locked (as for
    /// [`select`](Registry::select)): it must not call back into the
    /// registry, and should be quick.
    pub async fn wait_for(&self, filter: impl Fn(&Peer) -> bool) -> Peer {
        self.wait_for_matching(&[], filter).await
    }

    /// Waits until a peer with all these labels is connected (looked up in
    /// the label index, then watched for among the connect events).
    pub async fn wait_for_labels<K, V>(&self, labels: impl IntoIterator<Item = (K, V)>) -> Peer
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.wait_for_matching(&collect(labels), |_| true).await
    }

    /// Waits until a usable peer with all of `labels` for which `filter`
    /// holds is connected.
    pub(crate) async fn wait_for_matching(
        &self,
        labels: &[(String, String)],
        filter: impl Fn(&Peer) -> bool,
    ) -> Peer {
        let wanted = |p: &Peer| p.is_usable() && filter(p);
        let mut events = self.subscribe();
        loop {
            // Subscribed before looking, so a peer connecting in between is
            // seen as an event.
            if let Some(peer) = self.next_matching(labels, wanted, None) {
                return peer;
            }
            loop {
                match events.recv().await {
                    Ok(PeerEvent::Connected(peer)) if matches(&peer, labels) && wanted(&peer) => {
                        return peer;
                    }
                    Ok(_) => {}
                    // Missed events: look at the registry again.
                    Err(RecvError::Lagged(_)) => break,
                    // The registry outlives its senders only when the server
                    // is gone; nothing will connect any more.
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        }
    }

    /// A channel over every peer with all these labels: each call goes to
    /// the next matching peer in turn (round-robin), e.g.
    /// `AgentClient::new(server.peers().label_channel([("role", "db")]))`.
    /// With no matching peer a call fails with `UNAVAILABLE`, or waits for
    /// one up to its deadline with [`LabelChannel::wait_for_ready`].
    pub fn label_channel<K, V>(&self, labels: impl IntoIterator<Item = (K, V)>) -> LabelChannel
    where
        K: Into<String>,
        V: Into<String>,
    {
        LabelChannel {
            registry: self.clone(),
            labels: Arc::new(collect(labels)),
            last: Arc::default(),
            wait_for_ready: false,
        }
    }
}

/// Calls a service on whichever connected peer matches a set of labels,
/// round-robin. Hand it to any tonic-generated client. Cheap to clone; clones
/// share the rotation. Made by [`Registry::label_channel`].
///
/// ```no_run
/// # async fn run(server: &brpc_server::Server) {
/// // Each call goes to the next agent with role=db; with wait_for_ready a
/// // call made while none is connected waits for one up to its deadline.
/// let channel = server.peers().label_channel([("role", "db")]).wait_for_ready(true);
/// // let mut db = AgentClient::new(channel);
/// // db.vacuum(VacuumRequest {}).await?;
/// # drop(channel); }
/// ```
#[derive(Clone, Debug)]
pub struct LabelChannel {
    registry: Registry,
    labels: Arc<Wanted>,
    /// The id of the peer the last call went to (0: none yet).
    last: Arc<AtomicU64>,
    wait_for_ready: bool,
}

impl LabelChannel {
    /// With `true`, a call made while no matching peer is connected waits
    /// for one (up to the call's deadline, if it has one) instead of failing
    /// at once with `UNAVAILABLE`.
    pub fn wait_for_ready(mut self, wait: bool) -> Self {
        self.wait_for_ready = wait;
        self
    }

    /// The peer the next call would go to, if one matches now: the next
    /// matching peer by connection id after the one the last call went to.
    pub fn pick(&self) -> Option<Peer> {
        let mut last = self.last.load(Ordering::Relaxed);
        // Calls picking at once each take a different peer: one that lost
        // the race looks again after the peer the winner took.
        loop {
            let after = (last != 0).then_some(ConnectionId(last));
            let peer = self
                .registry
                .next_matching(&self.labels, Peer::is_usable, after)?;
            let id = peer.connection_id().0;
            match self
                .last
                .compare_exchange(last, id, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(peer),
                Err(now) => last = now,
            }
        }
    }

    async fn resolve(&self, timeout: Option<Duration>) -> Result<Peer, Status> {
        if let Some(peer) = self.pick() {
            return Ok(peer);
        }
        let none = || {
            Status::unavailable(format!(
                "no connected peer has the labels {:?}; retry, or use wait_for_ready",
                self.labels
            ))
        };
        if !self.wait_for_ready {
            return Err(none());
        }
        let wait = self.registry.wait_for_matching(&self.labels, |_| true);
        match timeout {
            None => Ok(wait.await),
            Some(limit) => tokio::time::timeout(limit, wait).await.map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no peer with the labels {:?} connected within the call's deadline",
                    self.labels
                ))
            }),
        }
    }
}

impl Service<http::Request<Body>> for LabelChannel {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let channel = self.clone();
        let mut request = request;
        Box::pin(async move {
            let timeout = request
                .headers()
                .get("grpc-timeout")
                .and_then(brpc_core::metadata::parse_grpc_timeout);
            let started = tokio::time::Instant::now();
            match channel.resolve(timeout).await {
                Ok(peer) => {
                    // The wait for a peer came out of the call's deadline.
                    if let Some(limit) = timeout {
                        let left = limit.saturating_sub(started.elapsed());
                        request.headers_mut().insert(
                            "grpc-timeout",
                            brpc_core::metadata::format_grpc_timeout(left),
                        );
                    }
                    peer.channel().call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}
