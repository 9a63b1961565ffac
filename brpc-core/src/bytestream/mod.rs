//! The same ttrpc frames over a byte stream (a Unix socket, or any
//! `AsyncRead + AsyncWrite`), calls multiplexed by stream id as containerd's
//! ttrpc does, so brpc talks to plain ttrpc peers (containerd shims,
//! ttrpc-rust, Go ttrpc) both ways. This is the transport only: the Unix
//! server and client are brpc-server's `Server::listen_unix` /
//! `Builder::bind_unix` and brpc-client's `Builder::connect_unix`, which
//! share the registry, events, limits and shutdown with QUIC peers.
//!
//! The same tonic services ([`Router`](crate::Router)) and
//! [`Channel`](crate::Channel) work here as over QUIC. What a byte stream lacks: per-call flow control (a call
//! that stops reading is dropped after its 64-frame buffer stays full for a
//! second), a stream limit (a call past `max_concurrent_calls` is refused
//! with `RESOURCE_EXHAUSTED`), cancellation with plain ttrpc peers (ttrpc
//! has no such signal: a dropped call is abandoned locally and the handler
//! runs to its deadline; between brpc peers a Cancel frame stops it), and
//! TLS (use Unix socket permissions and [`UnixCredentials`]).
//!
//! brpc peers recognise each other with the `brpc.v1.Session/Hello` call: a
//! brpc dialer sends it first; a plain ttrpc server answers it with an error,
//! and the dialer then speaks plain ttrpc. Only after a successful Hello does
//! either side send response metadata frames, and only then may the acceptor
//! call the dialer (even stream ids).

mod link;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use link::Link;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

pub use crate::conn::UnixCredentials;
use crate::conn::{CallLimits, ConnectionId, Labels, MemoryBudget, Peer, PeerInfo, Side};
use crate::wire::HelloRequest;

/// Admits only peers running as this process's user and group (ttrpc's
/// `UnixSocketRequireSameUser`).
pub fn require_same_user() -> impl Fn(&UnixCredentials) -> bool + Send + Sync + Clone {
    let me = current_credentials();
    move |c| Some((c.uid, c.gid)) == me.map(|m| (m.uid, m.gid))
}

/// Admits only peers with this user and group id (ttrpc's `UnixSocketRequireUidGid`).
pub fn require_uid_gid(
    uid: u32,
    gid: u32,
) -> impl Fn(&UnixCredentials) -> bool + Send + Sync + Clone {
    move |c| c.uid == uid && c.gid == gid
}

/// Admits only root peers (ttrpc's `UnixSocketRequireRoot`).
pub fn require_root() -> impl Fn(&UnixCredentials) -> bool + Send + Sync + Clone {
    require_uid_gid(0, 0)
}

/// This process's own credentials, read the way a peer would see them.
fn current_credentials() -> Option<UnixCredentials> {
    let (a, _b) = std::os::unix::net::UnixStream::pair().ok()?;
    let a = UnixStream::from_std({
        a.set_nonblocking(true).ok()?;
        a
    })
    .ok()?;
    credentials(&a)
}

/// The credentials of the process at the other end of `stream`
/// (`SO_PEERCRED`), where the OS reports them.
pub fn credentials(stream: &UnixStream) -> Option<UnixCredentials> {
    let cred = stream.peer_cred().ok()?;
    Some(UnixCredentials {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// Connection ids of byte-stream peers this process dialed (over a byte
/// stream the dialer's own handle has no server-assigned id when the other
/// side is plain ttrpc).
static NEXT_DIALED_ID: AtomicU64 = AtomicU64::new(1);

fn info(connection_id: ConnectionId) -> PeerInfo {
    PeerInfo {
        connection_id,
        name: String::new(),
        labels: Labels::new(),
        connected_at: SystemTime::now(),
        identity: None,
    }
}

/// Acceptor: the handle of a client connected over the byte stream `io`,
/// known as `id`, with the peer's `credentials` (from [`credentials`] for a
/// Unix socket). Its calls are served once [`serve`](crate::serve) runs on
/// it; that is the caller's task, so the caller owns it. Frames waiting
/// for their calls are charged to its connection budget (from `limits`)
/// and to `total`.
#[doc(hidden)]
pub fn accept<S>(
    io: S,
    id: ConnectionId,
    limits: CallLimits,
    credentials: Option<UnixCredentials>,
    total: MemoryBudget,
) -> Peer
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let budgets = limits.budgets(total);
    let link = Link::spawn(
        io,
        Side::Acceptor,
        limits.max_message_size,
        max_peer_calls(&limits),
        budgets.clone(),
    );
    Peer::new_multiplexed(
        Arc::new(link),
        Side::Acceptor,
        info(id),
        limits,
        credentials,
        budgets,
    )
}

/// Most calls the peer may have running at once on one byte stream: the
/// connection's `max_concurrent_calls`, as over QUIC.
fn max_peer_calls(limits: &CallLimits) -> usize {
    usize::try_from(limits.max_concurrent_calls).unwrap_or(usize::MAX)
}

/// Dialer: the handle of the server at the other end of the byte stream
/// `io`, after saying `hello` to find out whether it speaks brpc (then the
/// handle carries the id it assigned, and it may call this side) or plain
/// ttrpc (then calls go one way, to it). Serve this side's services with
/// [`serve`](crate::serve) on the handle. Frames waiting for their calls
/// are charged as for [`accept`].
#[doc(hidden)]
pub async fn dial<S>(io: S, hello: HelloRequest, limits: CallLimits, total: MemoryBudget) -> Peer
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let budgets = limits.budgets(total);
    let link = Arc::new(Link::spawn(
        io,
        Side::Dialer,
        limits.max_message_size,
        max_peer_calls(&limits),
        budgets.clone(),
    ));
    // A dial given up before it returns (its caller's timeout) closes the
    // socket: its tasks would otherwise keep it open.
    let mut abandoned = CloseOnDrop(Some(link.clone()));
    let local = ConnectionId(NEXT_DIALED_ID.fetch_add(1, Ordering::Relaxed));
    // A handle for the Hello call alone; the one handed out carries what it
    // established.
    let greeter = Peer::new_multiplexed(
        link.clone(),
        Side::Dialer,
        info(local),
        limits,
        None,
        budgets.clone(),
    );
    let id = match crate::session::hello_bytestream(&greeter, hello).await {
        Ok(answer) => {
            link.set_remote_is_brpc();
            ConnectionId(answer.connection_id)
        }
        Err(status) => {
            tracing::debug!(%status, "the acceptor did not answer Hello: plain ttrpc");
            local
        }
    };
    drop(greeter);
    abandoned.0 = None;
    Peer::new_multiplexed(link, Side::Dialer, info(id), limits, None, budgets)
}

/// Closes its link when dropped, unless emptied first.
struct CloseOnDrop(Option<Arc<Link>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(link) = self.0.take() {
            link.close("the dial was given up");
        }
    }
}
